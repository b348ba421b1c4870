//! JPEG decoding that gives libjpeg-turbo's samples exactly: PIL decodes with libjpeg-turbo
//! (`JDCT_ISLOW`, fancy upsampling, its YCbCr tables), so every transformers processor sees those
//! samples. A general decoder differs by a few levels per sample, which a processor's `÷ std`
//! (CLIP's 0.27, ImageNet's 0.23) and an upscale turn into more than 2e-2 of pixel value.
//!
//! Covered: 8-bit Huffman-coded baseline, extended and progressive files with 1, 3 or 4
//! components (grayscale; YCbCr, or RGB by Adobe transform / component ids as libjpeg guesses
//! them; CMYK, made RGB as PIL does), any integral sampling factors, restart intervals. Other
//! variants (arithmetic coding, 12-bit, lossless, YCCK) are `Ok(None)`: the caller hands them to
//! a general decoder.
//!
//! Entropy-coded data is read as leniently as libjpeg reads it (a bad Huffman code or a marker
//! inside a scan gives zero bits, not an error), but a file that ends before its last scan does
//! is an error, as it is for PIL. Every size from the header is checked against [`MAX_BYTES`]
//! before anything is allocated.

use image::RgbImage;

/// Most memory one decode may take (coefficients, component planes and the RGB output together):
/// the `image` crate's default allocation limit.
pub const MAX_BYTES: u64 = 512 << 20;

/// Most scans one file may have: each goes over every block of its components, so a small file
/// of many scans could otherwise keep the decoder busy for minutes. Progressive encoders write ~10.
const MAX_SCANS: usize = 1000;

/// `jpeg_natural_order`: the zigzag position → the coefficient's index in the 8×8 block.
const ZIGZAG: [usize; 64] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43,
    36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
];

type Result<T> = std::result::Result<T, String>;

/// Decodes a JPEG file to RGB as PIL's `Image.open(f).convert("RGB")` does; `Ok(None)` for a
/// variant this decoder leaves to others.
pub fn decode(bytes: &[u8]) -> Result<Option<RgbImage>> {
    let mut jpeg = Decoder::default();
    if !jpeg.read(bytes)? {
        return Ok(None);
    }
    jpeg.output().map(Some)
}

#[derive(Clone, Default)]
struct Huffman {
    /// 9-bit lookahead: (code length, symbol); length 0 = a longer code.
    fast: Vec<(u8, u8)>,
    /// Canonical decoding for the longer codes: per length, the largest code (or -1) and the
    /// index of its first symbol minus its first code.
    maxcode: [i32; 18],
    offset: [i32; 17],
    symbols: Vec<u8>,
}

const FAST_BITS: u32 = 9;

impl Huffman {
    fn new(counts: &[u8; 16], symbols: &[u8]) -> Result<Self> {
        let mut table = Huffman { fast: vec![(0, 0); 1 << FAST_BITS], maxcode: [-1; 18], offset: [0; 17], symbols: symbols.to_vec() };
        let (mut code, mut k) = (0i32, 0usize);
        for len in 1..=16 {
            let n = counts[len - 1] as usize;
            table.offset[len] = k as i32 - code;
            if code + n as i32 > (1 << len) {
                return Err("a Huffman table has more codes than its lengths allow".into());
            }
            if n > 0 {
                for i in 0..n {
                    if len as u32 <= FAST_BITS {
                        let shift = FAST_BITS - len as u32;
                        let first = ((code + i as i32) as usize) << shift;
                        for entry in &mut table.fast[first..first + (1 << shift)] {
                            *entry = (len as u8, symbols[k + i]);
                        }
                    }
                }
                code += n as i32;
                k += n;
                table.maxcode[len] = code - 1;
            }
            code <<= 1;
        }
        table.maxcode[17] = i32::MAX;
        Ok(table)
    }
}

/// The entropy-coded data of one scan: byte-stuffing removed; at a marker or the end of the file,
/// zero bits as libjpeg supplies them.
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    acc: u64,
    count: u32,
    /// A marker stopped the reading (`pos` is at its 0xFF).
    at_marker: bool,
    /// Zero bits appended past the end of the file, and whether any was read as data.
    phantom: u32,
    truncated: bool,
}

impl<'a> Bits<'a> {
    fn new(data: &'a [u8], pos: usize) -> Self {
        Bits { data, pos, acc: 0, count: 0, at_marker: false, phantom: 0, truncated: false }
    }

    fn fill(&mut self) {
        while self.count <= 56 {
            let mut byte = 0u8;
            if !self.at_marker {
                match self.data.get(self.pos) {
                    None => self.phantom += 8,
                    Some(&0xFF) => {
                        let mut next = self.pos + 1;
                        while self.data.get(next) == Some(&0xFF) {
                            next += 1;
                        }
                        match self.data.get(next) {
                            Some(0) => {
                                byte = 0xFF;
                                self.pos = next + 1;
                            }
                            Some(_) => self.at_marker = true,
                            None => self.phantom += 8,
                        }
                    }
                    Some(&b) => {
                        byte = b;
                        self.pos += 1;
                    }
                }
            }
            self.acc |= (byte as u64) << (56 - self.count);
            self.count += 8;
        }
    }

    fn peek(&mut self, n: u32) -> u32 {
        if self.count < n {
            self.fill();
        }
        (self.acc >> (64 - n)) as u32
    }

    fn consume(&mut self, n: u32) {
        self.acc <<= n;
        self.count -= n;
    }

    fn bits(&mut self, n: u32) -> u32 {
        if n == 0 {
            return 0;
        }
        let v = self.peek(n);
        self.consume(n);
        v
    }

    /// Whether bits past the end of the file were read as data.
    fn ended_early(&self) -> bool {
        self.truncated || self.phantom > self.count
    }

    fn bit(&mut self) -> bool {
        self.bits(1) == 1
    }

    /// `HUFF_EXTEND(receive(s), s)`.
    fn signed(&mut self, s: u32) -> i32 {
        if s == 0 {
            return 0;
        }
        let v = self.bits(s) as i32;
        if v < 1 << (s - 1) {
            v - (1 << s) + 1
        } else {
            v
        }
    }

    /// A symbol; a code that is in no table reads as 0, as libjpeg reads it (with a warning).
    fn decode(&mut self, table: &Huffman) -> u8 {
        let (len, symbol) = table.fast[self.peek(FAST_BITS) as usize];
        if len > 0 {
            self.consume(len as u32);
            return symbol;
        }
        let code = self.peek(16) as i32;
        for len in FAST_BITS as usize + 1..=16 {
            let c = code >> (16 - len);
            if c <= table.maxcode[len] {
                self.consume(len as u32);
                return table.symbols.get((c + table.offset[len]) as usize).copied().unwrap_or(0);
            }
        }
        self.consume(16);
        0
    }

    /// Drops the bits left of the current byte and skips to the next marker: past it if it is a
    /// restart marker, else stopped at it (the scan's end; the rest of the scan reads zeros).
    fn restart(&mut self) {
        self.truncated |= self.ended_early();
        self.phantom = 0;
        self.acc = 0;
        self.count = 0;
        self.at_marker = false;
        match next_marker(self.data, self.pos) {
            Some((marker, at)) if (0xD0..=0xD7).contains(&marker) => self.pos = at + 2,
            Some((_, at)) => {
                self.pos = at;
                self.at_marker = true;
            }
            None => self.pos = self.data.len(),
        }
    }
}

/// The next marker at or after `pos`: its code and the position of its 0xFF.
fn next_marker(data: &[u8], mut pos: usize) -> Option<(u8, usize)> {
    while pos + 1 < data.len() {
        if data[pos] == 0xFF && data[pos + 1] != 0 && data[pos + 1] != 0xFF {
            return Some((data[pos + 1], pos));
        }
        pos += 1;
    }
    None
}

#[derive(Default)]
struct Component {
    id: u8,
    h: usize,
    v: usize,
    table: usize,
    /// The quantization table as it was at the component's first scan (libjpeg latches it).
    quant: Option<[u16; 64]>,
    /// Blocks per row and rows of blocks, padded to whole MCUs.
    blocks_w: usize,
    blocks_h: usize,
    /// Samples per row and rows of this component that hold image data (`downsampled_width`).
    width: usize,
    height: usize,
    coefs: Vec<i16>,
    dc_pred: i32,
}

#[derive(Default)]
struct Decoder {
    width: usize,
    height: usize,
    progressive: bool,
    components: Vec<Component>,
    quant: [Option<[u16; 64]>; 4],
    dc_tables: [Option<Huffman>; 4],
    ac_tables: [Option<Huffman>; 4],
    restart_interval: usize,
    jfif: bool,
    adobe_transform: Option<u8>,
    frame_seen: bool,
    scans: usize,
    eobrun: u32,
}

fn be16(data: &[u8], at: usize) -> Result<usize> {
    match data.get(at..at + 2) {
        Some(b) => Ok(u16::from_be_bytes([b[0], b[1]]) as usize),
        None => Err("truncated file (a marker segment runs past the end)".into()),
    }
}

fn ceil_div(a: usize, b: usize) -> usize {
    a.div_ceil(b)
}

impl Decoder {
    /// Reads the file up to EOI; `false` for a variant left to other decoders.
    fn read(&mut self, data: &[u8]) -> Result<bool> {
        if !data.starts_with(&[0xFF, 0xD8]) {
            return Err("not a JPEG file (no SOI marker)".into());
        }
        let mut pos = 2;
        loop {
            let Some((marker, at)) = next_marker(data, pos) else {
                if self.scans == 0 {
                    return Err("truncated file (no image data)".into());
                }
                // libjpeg and PIL accept a file whose last scan is complete but lacks EOI.
                return Ok(true);
            };
            pos = at + 2;
            match marker {
                0xD8 | 0x01 | 0xD0..=0xD7 => continue,
                0xD9 => {
                    if self.scans == 0 {
                        return Err("the file has no image data (EOI before any scan)".into());
                    }
                    return Ok(true);
                }
                _ => {}
            }
            let len = be16(data, pos)?;
            if len < 2 || pos + len > data.len() {
                return Err(format!("truncated file (a marker segment of {len} bytes runs past the end)"));
            }
            let segment = &data[pos + 2..pos + len];
            pos += len;
            match marker {
                0xC0..=0xC2 => {
                    if !self.frame(segment, marker == 0xC2)? {
                        return Ok(false);
                    }
                }
                0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => return Ok(false),
                0xC4 => self.huffman_tables(segment)?,
                0xDB => self.quant_tables(segment)?,
                0xDD => {
                    self.restart_interval = be16(segment, 0)?;
                }
                0xE0 if segment.starts_with(b"JFIF\0") => self.jfif = true,
                0xEE if segment.starts_with(b"Adobe") && segment.len() >= 12 => {
                    self.adobe_transform = Some(segment[11]);
                }
                0xDA => {
                    if self.scans == MAX_SCANS {
                        return Err(format!("corrupt file (more than {MAX_SCANS} scans)"));
                    }
                    pos = self.scan(segment, data, pos)?;
                    self.scans += 1;
                }
                _ => {}
            }
        }
    }

    fn frame(&mut self, s: &[u8], progressive: bool) -> Result<bool> {
        if self.frame_seen {
            return Err("corrupt file (a second frame header)".into());
        }
        self.frame_seen = true;
        if s.len() < 6 {
            return Err("corrupt frame header (too short)".into());
        }
        if s[0] != 8 {
            return Ok(false);
        }
        let (height, width, n) = (be16(s, 1)?, be16(s, 3)?, s[5] as usize);
        if width == 0 || height == 0 {
            // A height of 0 is announced later by a DNL marker, which libjpeg does not support either.
            return Err(format!("the image is empty ({width}x{height})"));
        }
        // Four components: CMYK as Adobe writes it; YCCK (Adobe transform 2) is left to others.
        if !(n == 1 || n == 3 || (n == 4 && self.adobe_transform != Some(2))) {
            return Ok(false);
        }
        if s.len() < 6 + 3 * n {
            return Err("corrupt frame header (too short for its components)".into());
        }
        self.width = width;
        self.height = height;
        self.progressive = progressive;
        for c in 0..n {
            let b = &s[6 + 3 * c..9 + 3 * c];
            let (h, v) = ((b[1] >> 4) as usize, (b[1] & 15) as usize);
            if !(1..=4).contains(&h) || !(1..=4).contains(&v) || b[2] > 3 {
                return Err(format!("corrupt frame header (component {c}: sampling {h}x{v}, table {})", b[2]));
            }
            self.components.push(Component { id: b[0], h, v, table: b[2] as usize, ..Default::default() });
        }
        let (hmax, vmax) = self.max_sampling();
        // libjpeg's upsampler refuses these too (JERR_FRACT_SAMPLE_NOTIMPL): PIL cannot open them.
        if let Some(c) = self.components.iter().find(|c| hmax % c.h != 0 || vmax % c.v != 0) {
            return Err(format!(
                "unsupported sampling factors ({}x{} against {hmax}x{vmax}: fractional sampling, which libjpeg does not implement)",
                c.h, c.v
            ));
        }
        let (mcus_w, mcus_h) = (ceil_div(width, 8 * hmax), ceil_div(height, 8 * vmax));
        let mut bytes = width as u64 * height as u64 * 3;
        for c in &mut self.components {
            c.blocks_w = mcus_w * c.h;
            c.blocks_h = mcus_h * c.v;
            c.width = ceil_div(width * c.h, hmax);
            c.height = ceil_div(height * c.v, vmax);
            // Coefficients (2 bytes each) and the decoded plane (1 byte).
            bytes += c.blocks_w as u64 * c.blocks_h as u64 * 64 * 3;
        }
        if bytes > MAX_BYTES {
            return Err(format!("the image is too large ({width}x{height} needs {} MiB to decode, more than {} MiB)", bytes >> 20, MAX_BYTES >> 20));
        }
        for c in &mut self.components {
            c.coefs = crate::loading::zeroed(c.blocks_w * c.blocks_h * 64)?;
        }
        Ok(true)
    }

    fn max_sampling(&self) -> (usize, usize) {
        let hmax = self.components.iter().map(|c| c.h).max().unwrap_or(1);
        let vmax = self.components.iter().map(|c| c.v).max().unwrap_or(1);
        (hmax, vmax)
    }

    fn huffman_tables(&mut self, mut s: &[u8]) -> Result<()> {
        while !s.is_empty() {
            if s.len() < 17 {
                return Err("corrupt Huffman table (too short)".into());
            }
            let (class, id) = (s[0] >> 4, (s[0] & 15) as usize);
            let counts: [u8; 16] = s[1..17].try_into().map_err(|_| "corrupt Huffman table".to_string())?;
            let total: usize = counts.iter().map(|&c| c as usize).sum();
            if class > 1 || id > 3 || total > 256 || s.len() < 17 + total {
                return Err(format!("corrupt Huffman table (class {class}, id {id}, {total} symbols)"));
            }
            let table = Huffman::new(&counts, &s[17..17 + total])?;
            if class == 0 {
                self.dc_tables[id] = Some(table);
            } else {
                self.ac_tables[id] = Some(table);
            }
            s = &s[17 + total..];
        }
        Ok(())
    }

    fn quant_tables(&mut self, mut s: &[u8]) -> Result<()> {
        while !s.is_empty() {
            let (precision, id) = (s[0] >> 4, (s[0] & 15) as usize);
            let size = if precision == 0 { 64 } else { 128 };
            if precision > 1 || id > 3 || s.len() < 1 + size {
                return Err(format!("corrupt quantization table (precision {precision}, id {id})"));
            }
            let mut table = [0u16; 64];
            for (k, &natural) in ZIGZAG.iter().enumerate() {
                table[natural] = if precision == 0 { s[1 + k] as u16 } else { u16::from_be_bytes([s[1 + 2 * k], s[2 + 2 * k]]) };
            }
            self.quant[id] = Some(table);
            s = &s[1 + size..];
        }
        Ok(())
    }

    /// Decodes one scan's entropy-coded data starting at `pos`; returns where it ends.
    fn scan(&mut self, s: &[u8], data: &[u8], pos: usize) -> Result<usize> {
        if !self.frame_seen || self.components.is_empty() {
            return Err("corrupt file (a scan before the frame header)".into());
        }
        let n = *s.first().ok_or("corrupt scan header (empty)")? as usize;
        if n == 0 || n > 4 || s.len() < 1 + 2 * n + 3 {
            return Err("corrupt scan header".into());
        }
        let mut members = Vec::with_capacity(n);
        for i in 0..n {
            let (id, tables) = (s[1 + 2 * i], s[2 + 2 * i]);
            let c = self
                .components
                .iter()
                .position(|c| c.id == id)
                .ok_or_else(|| format!("corrupt scan header (component id {id} is not in the frame)"))?;
            members.push((c, (tables >> 4) as usize & 3, (tables & 15) as usize & 3));
        }
        let (ss, se, ah, al) = (s[1 + 2 * n] as usize, s[2 + 2 * n] as usize, (s[3 + 2 * n] >> 4) as u32, (s[3 + 2 * n] & 15) as u32);
        if self.progressive {
            let valid = if ss == 0 { se == 0 } else { se >= ss && se <= 63 && n == 1 };
            if !valid || al > 13 || ah > 13 {
                return Err(format!("corrupt progressive scan (Ss {ss}, Se {se}, Ah {ah}, Al {al}, {n} components)"));
            }
        }
        // In a sequential scan libjpeg ignores Ss, Se, Ah and Al; so do we.
        for &(c, dc, ac) in &members {
            let comp = &mut self.components[c];
            if comp.quant.is_none() {
                comp.quant = Some(
                    self.quant[comp.table].ok_or_else(|| format!("corrupt file (quantization table {} is used but never defined)", comp.table))?,
                );
            }
            comp.dc_pred = 0;
            let needs_dc = !self.progressive || (ss == 0 && ah == 0);
            let needs_ac = !self.progressive || ss > 0;
            if needs_dc && self.dc_tables[dc].is_none() {
                return Err(format!("corrupt file (Huffman DC table {dc} is used but never defined)"));
            }
            if needs_ac && self.ac_tables[ac].is_none() {
                return Err(format!("corrupt file (Huffman AC table {ac} is used but never defined)"));
            }
        }
        self.eobrun = 0;
        let mut bits = Bits::new(data, pos);
        let (hmax, vmax) = self.max_sampling();
        // A scan of one component goes block by block over that component's real extent; an
        // interleaved scan goes MCU by MCU, each MCU holding h×v blocks of every component.
        // libjpeg refuses an interleaved scan of more than 10 blocks per MCU (JERR_BAD_MCU_SIZE).
        if n > 1 && members.iter().map(|&(c, ..)| self.components[c].h * self.components[c].v).sum::<usize>() > 10 {
            return Err("corrupt file (sampling factors too large for an interleaved scan)".into());
        }
        let (units_w, units) = if n == 1 {
            let comp = &self.components[members[0].0];
            let w = ceil_div(comp.width, 8);
            (w, w * ceil_div(comp.height, 8))
        } else {
            let w = ceil_div(self.width, 8 * hmax);
            (w, w * ceil_div(self.height, 8 * vmax))
        };
        let scan = Scan { ss, se, ah, al };
        for i in 0..units {
            if self.restart_interval > 0 && i > 0 && i % self.restart_interval == 0 {
                bits.restart();
                self.eobrun = 0;
                for &(c, _, _) in &members {
                    self.components[c].dc_pred = 0;
                }
            }
            let (ux, uy) = (i % units_w, i / units_w);
            for &(c, dc, ac) in &members {
                if n == 1 {
                    self.block(&mut bits, c, ux, uy, dc, ac, scan)?;
                    continue;
                }
                let (h, v) = (self.components[c].h, self.components[c].v);
                for by in 0..v {
                    for bx in 0..h {
                        self.block(&mut bits, c, ux * h + bx, uy * v + by, dc, ac, scan)?;
                    }
                }
            }
        }
        if bits.ended_early() {
            return Err("truncated file (the image data ends before the image does)".into());
        }
        Ok(match next_marker(data, bits.pos) {
            Some((_, at)) => at,
            None => data.len(),
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn block(&mut self, bits: &mut Bits, c: usize, x: usize, y: usize, dc: usize, ac: usize, scan: Scan) -> Result<()> {
        let Scan { ss, se, ah, al } = scan;
        let (dc, ac) = (self.dc_tables[dc].as_ref(), self.ac_tables[ac].as_ref());
        let comp = &mut self.components[c];
        let at = (y * comp.blocks_w + x) * 64;
        let block = &mut comp.coefs[at..at + 64];
        if !self.progressive {
            return sequential_block(bits, block, &mut comp.dc_pred, dc, ac);
        }
        if ss == 0 && ah == 0 {
            let s = bits.decode(dc.ok_or("no DC table")?) as u32;
            if s > 15 {
                return Err("corrupt data (a DC difference of more than 15 bits)".into());
            }
            comp.dc_pred = comp.dc_pred.wrapping_add(bits.signed(s));
            block[0] = comp.dc_pred.wrapping_shl(al) as i16;
        } else if ss == 0 {
            if bits.bit() {
                block[0] |= 1 << al;
            }
        } else if ah == 0 {
            ac_first(bits, block, &mut self.eobrun, ac.ok_or("no AC table")?, ss, se, al);
        } else {
            ac_refine(bits, block, &mut self.eobrun, ac.ok_or("no AC table")?, ss, se, al);
        }
        Ok(())
    }

    /// Dequantization, the IDCT, upsampling and colour conversion.
    fn output(mut self) -> Result<RgbImage> {
        let (hmax, vmax) = self.max_sampling();
        let mut planes = Vec::with_capacity(self.components.len());
        for c in &mut self.components {
            let quant = c.quant.unwrap_or([0; 64]);
            let stride = c.blocks_w * 8;
            let mut plane = crate::loading::zeroed::<u8>(stride * c.blocks_h * 8)?;
            for by in 0..c.blocks_h {
                for bx in 0..c.blocks_w {
                    let at = (by * c.blocks_w + bx) * 64;
                    idct_islow(&c.coefs[at..at + 64], &quant, &mut plane[by * 8 * stride + bx * 8..], stride);
                }
            }
            c.coefs = Vec::new();
            planes.push(plane);
        }
        let (w, h) = (self.width, self.height);
        let mut rgb = crate::loading::zeroed::<u8>(w * h * 3)?;
        let mut rows: Vec<Vec<u8>> = self.components.iter().map(|_| vec![0u8; w + 2 * hmax + 16]).collect();
        let transform = self.colour_transform();
        for y in 0..h {
            for (k, c) in self.components.iter().enumerate() {
                upsample_row(c, &planes[k], y, hmax / c.h, vmax / c.v, &mut rows[k]);
            }
            let out = &mut rgb[y * w * 3..(y + 1) * w * 3];
            match (rows.len(), transform) {
                (1, _) => {
                    for (px, &l) in out.chunks_exact_mut(3).zip(&rows[0]) {
                        px.fill(l);
                    }
                }
                (_, Transform::Rgb) => {
                    for (x, px) in out.chunks_exact_mut(3).enumerate() {
                        px.copy_from_slice(&[rows[0][x], rows[1][x], rows[2][x]]);
                    }
                }
                (4, _) => {
                    for (x, px) in out.chunks_exact_mut(3).enumerate() {
                        px.copy_from_slice(&cmyk_to_rgb([rows[0][x], rows[1][x], rows[2][x], rows[3][x]]));
                    }
                }
                (_, Transform::YCbCr) => {
                    for (x, px) in out.chunks_exact_mut(3).enumerate() {
                        px.copy_from_slice(&ycc_to_rgb(rows[0][x], rows[1][x], rows[2][x]));
                    }
                }
            }
        }
        RgbImage::from_raw(w as u32, h as u32, rgb).ok_or_else(|| "internal error: RGB buffer size".to_string())
    }

    /// libjpeg's guess of a 3-component file's colour space (`default_decompress_parms`).
    fn colour_transform(&self) -> Transform {
        if self.jfif {
            return Transform::YCbCr;
        }
        if let Some(t) = self.adobe_transform {
            return if t == 0 { Transform::Rgb } else { Transform::YCbCr };
        }
        let ids: Vec<u8> = self.components.iter().map(|c| c.id).collect();
        if ids == b"RGB" {
            Transform::Rgb
        } else {
            Transform::YCbCr
        }
    }
}

/// A progressive scan's spectral band and successive-approximation bits.
#[derive(Clone, Copy)]
struct Scan {
    ss: usize,
    se: usize,
    ah: u32,
    al: u32,
}

#[derive(Clone, Copy)]
enum Transform {
    YCbCr,
    Rgb,
}

fn sequential_block(bits: &mut Bits, block: &mut [i16], pred: &mut i32, dc: Option<&Huffman>, ac: Option<&Huffman>) -> Result<()> {
    let (dc, ac) = (dc.ok_or("no DC table")?, ac.ok_or("no AC table")?);
    let s = bits.decode(dc) as u32;
    if s > 15 {
        return Err("corrupt data (a DC difference of more than 15 bits)".into());
    }
    *pred = pred.wrapping_add(bits.signed(s));
    block[0] = *pred as i16;
    let mut k = 1;
    while k < 64 {
        let rs = bits.decode(ac);
        let (r, s) = ((rs >> 4) as usize, (rs & 15) as u32);
        if s != 0 {
            k += r;
            let v = bits.signed(s);
            block[ZIGZAG[k.min(63)]] = v as i16;
        } else if r == 15 {
            k += 15;
        } else {
            break;
        }
        k += 1;
    }
    Ok(())
}

fn ac_first(bits: &mut Bits, block: &mut [i16], eobrun: &mut u32, ac: &Huffman, ss: usize, se: usize, al: u32) {
    if *eobrun > 0 {
        *eobrun -= 1;
        return;
    }
    let mut k = ss;
    while k <= se {
        let rs = bits.decode(ac);
        let (r, s) = ((rs >> 4) as u32, (rs & 15) as u32);
        if s != 0 {
            k += r as usize;
            let v = bits.signed(s);
            block[ZIGZAG[k.min(63)]] = (v << al) as i16;
        } else if r == 15 {
            k += 15;
        } else {
            *eobrun = (1 << r) + bits.bits(r) - 1;
            break;
        }
        k += 1;
    }
}

fn ac_refine(bits: &mut Bits, block: &mut [i16], eobrun: &mut u32, ac: &Huffman, ss: usize, se: usize, al: u32) {
    let (p1, m1) = (1i16 << al, (-1i16) << al);
    let refine = |bits: &mut Bits, coef: &mut i16| {
        if bits.bit() && *coef & p1 == 0 {
            *coef = coef.wrapping_add(if *coef >= 0 { p1 } else { m1 });
        }
    };
    let mut k = ss;
    if *eobrun == 0 {
        while k <= se {
            let rs = bits.decode(ac);
            let (mut r, s) = ((rs >> 4) as i32, rs & 15);
            let mut value = 0;
            if s != 0 {
                value = if bits.bit() { p1 } else { m1 };
            } else if r != 15 {
                *eobrun = (1 << r) + bits.bits(r as u32);
                break;
            }
            while k <= se {
                let z = ZIGZAG[k];
                if block[z] != 0 {
                    refine(bits, &mut block[z]);
                } else {
                    r -= 1;
                    if r < 0 {
                        break;
                    }
                }
                k += 1;
            }
            if value != 0 && k <= se {
                block[ZIGZAG[k]] = value;
            }
            k += 1;
        }
    }
    if *eobrun > 0 {
        while k <= se {
            let z = ZIGZAG[k];
            if block[z] != 0 {
                refine(bits, &mut block[z]);
            }
            k += 1;
        }
        *eobrun -= 1;
    }
}

/// `range_limit[x & RANGE_MASK]` for an IDCT output `x` (centred on 0): a clamp to 0..=255 for
/// any sane value, and libjpeg's wrap-around for the insane ones.
fn range_limit(x: i32) -> u8 {
    let i = x.wrapping_add(128) & 1023;
    if i < 256 {
        i as u8
    } else if i < 640 {
        255
    } else {
        0
    }
}

/// libjpeg's `jpeg_idct_islow`: the accurate integer IDCT (13-bit constants, 2 extra bits between
/// the passes), column pass then row pass.
fn idct_islow(coefs: &[i16], quant: &[u16; 64], out: &mut [u8], stride: usize) {
    const CONST_BITS: i32 = 13;
    const PASS1_BITS: i32 = 2;
    const F0_298: i64 = 2446;
    const F0_390: i64 = 3196;
    const F0_541: i64 = 4433;
    const F0_765: i64 = 6270;
    const F0_899: i64 = 7373;
    const F1_175: i64 = 9633;
    const F1_501: i64 = 12299;
    const F1_847: i64 = 15137;
    const F1_961: i64 = 16069;
    const F2_053: i64 = 16819;
    const F2_562: i64 = 20995;
    const F3_072: i64 = 25172;
    fn descale(x: i64, n: i32) -> i64 {
        (x + (1 << (n - 1))) >> n
    }
    /// The even and odd parts of one 8-point IDCT, before descaling: outputs 0..8.
    fn butterfly(i: [i64; 8]) -> [i64; 8] {
        let z1 = (i[2] + i[6]) * F0_541;
        let tmp2 = z1 - i[6] * F1_847;
        let tmp3 = z1 + i[2] * F0_765;
        let tmp0 = (i[0] + i[4]) << CONST_BITS;
        let tmp1 = (i[0] - i[4]) << CONST_BITS;
        let (t10, t13, t11, t12) = (tmp0 + tmp3, tmp0 - tmp3, tmp1 + tmp2, tmp1 - tmp2);
        let (o0, o1, o2, o3) = (i[7], i[5], i[3], i[1]);
        let (z1, z2, z3, z4) = (o0 + o3, o1 + o2, o0 + o2, o1 + o3);
        let z5 = (z3 + z4) * F1_175;
        let (mut a0, mut a1, mut a2, mut a3) = (o0 * F0_298, o1 * F2_053, o2 * F3_072, o3 * F1_501);
        let (z1, z2) = (-z1 * F0_899, -z2 * F2_562);
        let (z3, z4) = (-z3 * F1_961 + z5, -z4 * F0_390 + z5);
        a0 += z1 + z3;
        a1 += z2 + z4;
        a2 += z2 + z3;
        a3 += z1 + z4;
        [t10 + a3, t11 + a2, t12 + a1, t13 + a0, t13 - a0, t12 - a1, t11 - a2, t10 - a3]
    }
    let mut ws = [0i64; 64];
    for col in 0..8 {
        let input: [i64; 8] = std::array::from_fn(|r| coefs[r * 8 + col] as i64 * quant[r * 8 + col] as i64);
        let o = butterfly(input);
        for r in 0..8 {
            // libjpeg keeps the workspace in `int`.
            ws[r * 8 + col] = descale(o[r], CONST_BITS - PASS1_BITS) as i32 as i64;
        }
    }
    for row in 0..8 {
        let input: [i64; 8] = std::array::from_fn(|c| ws[row * 8 + c]);
        let o = butterfly(input);
        for c in 0..8 {
            out[row * stride + c] = range_limit(descale(o[c], CONST_BITS + PASS1_BITS + 3) as i32);
        }
    }
}

/// Output row `y` of a component, upsampled by `hx`×`vx` as libjpeg-turbo's `jdsample.c` does
/// with `do_fancy_upsampling`: the triangle filters for 2h1v, 1h2v and 2h2v (the rows above and
/// below the image repeat its first and last), replication for other integral factors.
fn upsample_row(c: &Component, plane: &[u8], y: usize, hx: usize, vx: usize, out: &mut [u8]) {
    let stride = c.blocks_w * 8;
    let row = |i: usize| &plane[i * stride..i * stride + stride];
    let (dw, dh) = (c.width, c.height);
    let fancy_h = hx == 2 && dw > 2;
    if hx == 1 && vx == 1 {
        out[..dw].copy_from_slice(&row(y)[..dw]);
    } else if hx == 2 && vx == 1 && fancy_h {
        let input = row(y);
        out[0] = input[0];
        out[1] = ((input[0] as u32 * 3 + input[1] as u32 + 2) >> 2) as u8;
        for x in 1..dw - 1 {
            let v = input[x] as u32 * 3;
            out[2 * x] = ((v + input[x - 1] as u32 + 1) >> 2) as u8;
            out[2 * x + 1] = ((v + input[x + 1] as u32 + 2) >> 2) as u8;
        }
        let v = input[dw - 1] as u32;
        out[2 * dw - 2] = ((v * 3 + input[dw - 2] as u32 + 1) >> 2) as u8;
        out[2 * dw - 1] = v as u8;
    } else if vx == 2 && (hx == 1 || fancy_h) {
        let i = y / 2;
        let (near, far, bias) = if y % 2 == 0 { (i, i.saturating_sub(1), 1) } else { (i, (i + 1).min(dh - 1), 2) };
        let (near, far) = (row(near), row(far));
        if hx == 1 {
            for x in 0..dw {
                out[x] = ((near[x] as u32 * 3 + far[x] as u32 + bias) >> 2) as u8;
            }
        } else {
            let sum = |x: usize| near[x] as u32 * 3 + far[x] as u32;
            let (mut last, mut this) = (sum(0), sum(0));
            for x in 0..dw {
                let next = if x + 1 < dw { sum(x + 1) } else { this };
                if x == 0 {
                    out[0] = ((this * 4 + 8) >> 4) as u8;
                } else {
                    out[2 * x] = ((this * 3 + last + 8) >> 4) as u8;
                }
                if x + 1 == dw {
                    out[2 * x + 1] = ((this * 4 + 7) >> 4) as u8;
                } else {
                    out[2 * x + 1] = ((this * 3 + next + 7) >> 4) as u8;
                }
                last = this;
                this = next;
            }
        }
    } else {
        let input = row(y / vx);
        for x in 0..dw {
            out[x * hx..x * hx + hx].fill(input[x]);
        }
    }
}

/// A CMYK sample as PIL makes it RGB: read as `CMYK;I` (Adobe's inverted convention, which PIL
/// assumes for every CMYK JPEG), then `convert("RGB")`'s `cmyk2rgb` (`nk - c·nk/255`, rounded as
/// its `MULDIV255`).
fn cmyk_to_rgb(stored: [u8; 4]) -> [u8; 3] {
    let [c, m, y, k] = stored.map(|v| 255 - v as u32);
    let nk = 255 - k;
    let muldiv255 = |a: u32| {
        let t = a * nk + 128;
        ((t >> 8) + t) >> 8
    };
    [c, m, y].map(|v| nk.saturating_sub(muldiv255(v)) as u8)
}

/// `ycc_rgb_convert` with libjpeg's tables (16-bit fixed point, rounding folded in).
fn ycc_to_rgb(y: u8, cb: u8, cr: u8) -> [u8; 3] {
    const HALF: i32 = 1 << 15;
    let (y, cb, cr) = (y as i32, cb as i32 - 128, cr as i32 - 128);
    let clamp = |v: i32| v.clamp(0, 255) as u8;
    [clamp(y + ((91881 * cr + HALF) >> 16)), clamp(y + ((-22554 * cb - 46802 * cr + HALF) >> 16)), clamp(y + ((116130 * cb + HALF) >> 16))]
}
