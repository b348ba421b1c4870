//! Image → pixel values, equal to 🤗 transformers' PIL-based SigLIP image processor.
//!
//! The reference is what Python does with
//! `SiglipImageProcessorPil()(images=PIL.Image.open(path).convert("RGB"))` (in transformers 4.x
//! this class is called `SiglipImageProcessor`; in 5.x that name is the torchvision backend):
//!
//! 1. decode, then `convert("RGB")`: alpha is dropped (not composited), gray is replicated,
//!    16-bit samples keep their high byte; the EXIF orientation is applied first, as
//!    transformers' `load_image` does (`ImageOps.exif_transpose`);
//! 2. `Image.resize((w, h), resample)` — Pillow's `ImagingResample` (`libImaging/Resample.c`),
//!    reproduced bit for bit here: separable passes in 8-bit fixed point with the intermediate
//!    image rounded to `u8`, the pass order Pillow picks, the same coefficients; `NEAREST`
//!    follows Pillow's affine nearest path (`ImagingScaleAffine`);
//! 3. `(u8 as f64 * rescale_factor) as f32`, then `(x - mean) / std` in `f32`, channel-first.
//!
//! Checked against Pillow 13.0 / transformers 5.24 by `tests/preprocess_pil.py` together with
//! the ignored test `preprocess::tests::matches_pillow_reference`: PNG inputs give identical
//! pixel values for every filter. Known, deliberate differences:
//!
//! * JPEG: decoded by [`crate::jpeg`] to libjpeg-turbo's samples exactly (PIL's decoder, CMYK
//!   made RGB as PIL does); only the variants it leaves out (YCCK, arithmetic coding, 12-bit,
//!   lossless) go to zune-jpeg, whose samples differ by a few levels.
//! * 16-bit grayscale PNG: PIL opens it as mode `I;16`, whose `convert("RGB")` saturates every
//!   value ≥ 256 to 255 (a white image); we take the high byte as for 16-bit RGB.
//! * An RGBA image handed to transformers 5 *as is* (no `convert("RGB")` first) is composited on
//!   white by its `convert_to_rgb`; we drop alpha, as `convert("RGB")` does.

use std::io::Cursor;

use candle_core::{Device, Tensor};
use image::{DynamicImage, ImageFormat, RgbImage};
use serde::Deserialize;

use crate::error::{Error, Result};

/// The file whose content [`PreprocessorConfig`] is; every config error names it.
pub const CONFIG_FILE: &str = "preprocessor_config.json";

/// Largest output side accepted from `size` (a 4096² image is already 200 MB of f32).
pub const MAX_OUTPUT_SIDE: u32 = 4096;

/// How an image was cut into tiles: `rows` × `cols` tiles plus a global one, or (0 × 0) one tile,
/// the whole image — what `Idefics3ImageProcessor` returns as `rows` / `cols`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Grid {
    pub rows: usize,
    pub cols: usize,
}

impl Grid {
    /// One tile, the whole image (every processor but a splitting one).
    pub const WHOLE: Grid = Grid { rows: 0, cols: 0 };

    pub fn tiles(self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            1
        } else {
            self.rows * self.cols + 1
        }
    }
}

/// Pixel values of a batch of images: every image's tiles stacked, `[tiles, C, H, W]`, and each
/// image's [`Grid`]. It derefs to the tensor.
#[derive(Debug, Clone)]
pub struct Pixels {
    values: Tensor,
    grids: Vec<Grid>,
}

impl Pixels {
    /// Pixel values [N, C, H, W] of N images of one tile each.
    pub fn whole(values: Tensor) -> Self {
        let n = values.dims().first().copied().unwrap_or(0);
        Self { values, grids: vec![Grid::WHOLE; n] }
    }

    /// Tiles [T, C, H, W] and the grid of each image they belong to, in order (the tiles must add up).
    pub fn tiled(values: Tensor, grids: Vec<Grid>) -> Result<Self> {
        let tiles: usize = grids.iter().map(|g| g.tiles()).sum();
        if values.dims().first() != Some(&tiles) {
            return Err(Error::Image(format!("pixel values {:?} for images of {tiles} tiles in all", values.dims())));
        }
        Ok(Self { values, grids })
    }

    /// The images of `parts`, in order.
    pub fn cat(parts: &[Pixels]) -> Result<Self> {
        let values = Tensor::cat(&parts.iter().map(|p| &p.values).collect::<Vec<_>>(), 0)?;
        Self::tiled(values, parts.iter().flat_map(|p| p.grids.iter().copied()).collect())
    }

    pub fn values(&self) -> &Tensor {
        &self.values
    }

    pub fn grids(&self) -> &[Grid] {
        &self.grids
    }

    /// How many images.
    pub fn len(&self) -> usize {
        self.grids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.grids.is_empty()
    }

    /// The images `which`, in that order.
    pub fn select(&self, which: &[usize]) -> Result<Self> {
        let mut starts = Vec::with_capacity(self.grids.len());
        let mut at = 0;
        for g in &self.grids {
            starts.push(at);
            at += g.tiles();
        }
        let mut parts = Vec::with_capacity(which.len());
        for &i in which {
            let grid = *self.grids.get(i).ok_or_else(|| Error::Image(format!("no image {i} of {}", self.grids.len())))?;
            parts.push(Self { values: self.values.narrow(0, starts[i], grid.tiles())?, grids: vec![grid] });
        }
        Self::cat(&parts)
    }
}

impl std::ops::Deref for Pixels {
    type Target = Tensor;

    fn deref(&self) -> &Tensor {
        &self.values
    }
}

/// Pixel values as the captioner takes them: a [`Pixels`], or a tensor [N, C, H, W] of N
/// one-tile images.
pub trait ImageBatch {
    fn to_pixels(&self) -> Pixels;
}

impl ImageBatch for Tensor {
    fn to_pixels(&self) -> Pixels {
        Pixels::whole(self.clone())
    }
}

impl ImageBatch for Pixels {
    fn to_pixels(&self) -> Pixels {
        self.clone()
    }
}

/// `Idefics3ImageProcessor`'s resizing and splitting: the longest edge to `longest_edge`, then
/// (splitting) up to multiples of `tile`, cut into `tile`² tiles plus the whole image at `tile`²;
/// (not splitting) the whole image at `tile`².
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tiling {
    /// `size.longest_edge`.
    pub longest_edge: u32,
    /// `max_image_size.longest_edge`: the encoder's input side.
    pub tile: u32,
    /// `do_image_splitting`.
    pub split: bool,
}

/// transformers' cap on a resized image's side (`MAX_IMAGE_SIZE`).
const IDEFICS3_MAX_IMAGE_SIZE: u32 = 4096;

/// Split tiles one image may make (SmolVLM's largest split is 4 × 4).
const MAX_TILES: u32 = 1024;

// ------------------------------------------------------------------------------------ config

/// PIL resampling filters, numbered as in `PIL.Image.Resampling` (the `resample` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resample {
    Nearest = 0,
    Lanczos = 1,
    Bilinear = 2,
    Bicubic = 3,
    Box = 4,
    Hamming = 5,
}

impl Resample {
    /// A PIL filter code (`resample` in preprocessor_config.json).
    pub fn from_pil(code: i64) -> Result<Self> {
        Ok(match code {
            0 => Resample::Nearest,
            1 => Resample::Lanczos,
            2 => Resample::Bilinear,
            3 => Resample::Bicubic,
            4 => Resample::Box,
            5 => Resample::Hamming,
            other => {
                return Err(Error::config(
                    CONFIG_FILE,
                    format!("resample = {other} is not a supported PIL filter (0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming)"),
                ))
            }
        })
    }

    /// The PIL filter code.
    pub fn pil_code(self) -> u8 {
        self as u8
    }
}

/// Output size of the resize step (`"size": {"height": H, "width": W}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImageSize {
    pub height: u32,
    pub width: u32,
}

/// The content of `preprocessor_config.json` (SigLIP's image processor).
///
/// Parse it with [`PreprocessorConfig::from_json`] (or serde: the type deserialises through the
/// same validation). Omitted fields — and `null` ones — take SigLIP's defaults; unknown fields
/// (`image_processor_type`, `processor_class`, ...) are ignored. `Default` is SigLIP's default.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawPreprocessorConfig")]
pub struct PreprocessorConfig {
    /// Default `true`.
    pub do_resize: bool,
    /// Default 224×224.
    pub size: ImageSize,
    /// Default bicubic (3).
    pub resample: Resample,
    /// Default `true`.
    pub do_rescale: bool,
    /// Default 1/255.
    pub rescale_factor: f64,
    /// Default `true`.
    pub do_normalize: bool,
    /// Default `[0.5; 3]`. transformers casts mean and std to float32, so do we.
    pub image_mean: [f32; 3],
    /// Default `[0.5; 3]`.
    pub image_std: [f32; 3],
    /// Read but ignored: images are always converted to RGB.
    pub do_convert_rgb: Option<bool>,
    /// A splitting processor's (`Idefics3ImageProcessor`) sizes; `size` is then its tile.
    pub tiling: Option<Tiling>,
}

impl Default for PreprocessorConfig {
    fn default() -> Self {
        Self {
            do_resize: true,
            size: ImageSize { height: 224, width: 224 },
            resample: Resample::Bicubic,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
            do_convert_rgb: None,
            tiling: None,
        }
    }
}

/// Scalar or per-channel value (`image_mean`/`image_std` may be either in HF configs).
#[derive(Deserialize)]
#[serde(untagged)]
enum PerChannel {
    One(f64),
    Many(Vec<f64>),
}

/// preprocessor_config.json as written; validated into [`PreprocessorConfig`].
#[derive(Deserialize)]
struct RawPreprocessorConfig {
    #[serde(default)]
    do_resize: Option<bool>,
    #[serde(default)]
    size: Option<serde_json::Value>,
    #[serde(default)]
    resample: Option<i64>,
    #[serde(default)]
    do_rescale: Option<bool>,
    #[serde(default)]
    rescale_factor: Option<f64>,
    #[serde(default)]
    do_normalize: Option<bool>,
    #[serde(default)]
    image_mean: Option<PerChannel>,
    #[serde(default)]
    image_std: Option<PerChannel>,
    #[serde(default)]
    do_convert_rgb: Option<bool>,
    /// Which processor wrote the file: its class decides the defaults of omitted fields.
    #[serde(default)]
    image_processor_type: Option<String>,
    #[serde(default)]
    feature_extractor_type: Option<String>,
    // Steps SigLIP does not use; refused when switched on rather than silently skipped.
    #[serde(default)]
    do_center_crop: Option<bool>,
    #[serde(default)]
    do_pad: Option<bool>,
    // Idefics3ImageProcessor's.
    #[serde(default)]
    max_image_size: Option<serde_json::Value>,
    #[serde(default)]
    do_image_splitting: Option<bool>,
}

/// `{"longest_edge": N}` of a splitting processor's `size` / `max_image_size`.
fn longest_edge(key: &str, value: Option<&serde_json::Value>, default: u32) -> std::result::Result<u32, String> {
    let Some(value) = value.filter(|v| !v.is_null()) else { return Ok(default) };
    let n = value.get("longest_edge").and_then(|v| v.as_u64()).ok_or_else(|| format!("{key} = {value} has no positive integer `longest_edge`"))?;
    if n == 0 || n > IDEFICS3_MAX_IMAGE_SIZE as u64 {
        return Err(format!("{key}.longest_edge = {n} is out of range (1..={IDEFICS3_MAX_IMAGE_SIZE})"));
    }
    Ok(n as u32)
}

/// Whether `class` splits images into tiles as `Idefics3ImageProcessor` does.
fn splits_images(class: &str) -> bool {
    class.starts_with("Idefics3ImageProcessor")
}

fn parse_size(value: &serde_json::Value) -> std::result::Result<ImageSize, String> {
    let obj = match value {
        // Older files (`ViTFeatureExtractor`'s `"size": 224`): a square, as transformers'
        // `get_size_dict(size, default_to_square=True)` reads it.
        serde_json::Value::Number(n) => {
            let side = n.as_u64().filter(|&n| n > 0 && n <= MAX_OUTPUT_SIDE as u64);
            let side = side.ok_or_else(|| format!("size = {n} is out of range (1..={MAX_OUTPUT_SIDE})"))? as u32;
            return Ok(ImageSize { height: side, width: side });
        }
        serde_json::Value::Object(obj) => obj,
        other => return Err(format!("size = {other} is not supported; expected {{\"height\": H, \"width\": W}} (SigLIP resizes to a fixed size)")),
    };
    for key in ["shortest_edge", "longest_edge", "max_height", "max_width"] {
        if obj.get(key).is_some_and(|v| !v.is_null()) {
            return Err(format!(
                "size = {value} uses `{key}` (aspect-preserving resize), which is not supported; expected {{\"height\": H, \"width\": W}} as in SigLIP"
            ));
        }
    }
    let side = |key: &str| -> std::result::Result<u32, String> {
        let v = obj.get(key).ok_or_else(|| format!("size = {value} has no `{key}`; expected {{\"height\": H, \"width\": W}}"))?;
        let n = v.as_u64().ok_or_else(|| format!("size.{key} = {v} is not a positive integer"))?;
        if n == 0 || n > MAX_OUTPUT_SIDE as u64 {
            return Err(format!("size.{key} = {n} is out of range (1..={MAX_OUTPUT_SIDE})"));
        }
        Ok(n as u32)
    };
    Ok(ImageSize { height: side("height")?, width: side("width")? })
}

fn per_channel(name: &str, value: Option<PerChannel>, default: [f32; 3]) -> std::result::Result<[f32; 3], String> {
    let values = match value {
        None => return Ok(default),
        Some(PerChannel::One(v)) => vec![v; 3],
        Some(PerChannel::Many(v)) => v,
    };
    let [a, b, c] = values[..] else {
        return Err(format!("{name} has {} values, expected 3 (one per RGB channel)", values.len()));
    };
    let out = [a as f32, b as f32, c as f32];
    if out.iter().any(|v| !v.is_finite()) {
        return Err(format!("{name} = {values:?} contains a value that is not a finite float32"));
    }
    Ok(out)
}

impl TryFrom<RawPreprocessorConfig> for PreprocessorConfig {
    type Error = String;

    fn try_from(raw: RawPreprocessorConfig) -> std::result::Result<Self, String> {
        let class = raw.image_processor_type.as_deref().or(raw.feature_extractor_type.as_deref()).unwrap_or_default();
        let defaults = PreprocessorConfig::defaults_of(class);
        if raw.do_center_crop == Some(true) {
            return Err("do_center_crop = true is not supported (SigLIP's processor does not crop)".into());
        }
        let tiling = if splits_images(class) {
            // Its padding only evens out the tile counts of a batch: each image is taken alone.
            let tile = longest_edge("max_image_size", raw.max_image_size.as_ref(), 364)?;
            let longest = longest_edge("size", raw.size.as_ref(), 4 * 364)?;
            Some(Tiling { longest_edge: longest, tile, split: raw.do_image_splitting.unwrap_or(true) })
        } else {
            if raw.do_pad == Some(true) {
                return Err("do_pad = true is not supported (SigLIP's processor does not pad)".into());
            }
            None
        };
        let size = match (&raw.size, tiling) {
            (_, Some(t)) => ImageSize { height: t.tile, width: t.tile },
            (None | Some(serde_json::Value::Null), None) => defaults.size,
            (Some(v), None) => parse_size(v)?,
        };
        let resample = match raw.resample {
            None => defaults.resample,
            Some(code) => Resample::from_pil(code).map_err(|e| match e {
                Error::Config { reason, .. } => reason,
                other => other.to_string(),
            })?,
        };
        let rescale_factor = raw.rescale_factor.unwrap_or(defaults.rescale_factor);
        if !rescale_factor.is_finite() {
            return Err(format!("rescale_factor = {rescale_factor} is not finite"));
        }
        let image_mean = per_channel("image_mean", raw.image_mean, defaults.image_mean)?;
        let image_std = per_channel("image_std", raw.image_std, defaults.image_std)?;
        if image_std.contains(&0.0) {
            return Err(format!("image_std = {image_std:?} contains 0 (division by zero)"));
        }
        Ok(Self {
            do_resize: raw.do_resize.unwrap_or(defaults.do_resize),
            size,
            resample,
            do_rescale: raw.do_rescale.unwrap_or(defaults.do_rescale),
            rescale_factor,
            do_normalize: raw.do_normalize.unwrap_or(defaults.do_normalize),
            image_mean,
            image_std,
            do_convert_rgb: raw.do_convert_rgb,
            tiling,
        })
    }
}

impl PreprocessorConfig {
    /// The defaults of an image processor class (`image_processor_type`, or the older
    /// `feature_extractor_type`): `ViTImageProcessor` resizes bilinearly; SigLIP's (and any
    /// other) bicubically; both normalise with mean = std = 0.5 at 224×224. `Idefics3ImageProcessor`
    /// resamples with LANCZOS; `BlipImageProcessor` is bicubic at 384² with CLIP's mean and std.
    pub fn defaults_of(class: &str) -> Self {
        if class.starts_with("ViTImageProcessor") || class == "ViTFeatureExtractor" {
            Self { resample: Resample::Bilinear, ..Self::default() }
        } else if splits_images(class) {
            Self { resample: Resample::Lanczos, ..Self::default() }
        } else if class.starts_with("BlipImageProcessor") {
            // transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD at 384².
            Self {
                size: ImageSize { height: 384, width: 384 },
                image_mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
                image_std: [0.268_629_54, 0.261_302_58, 0.275_777_11],
                ..Self::default()
            }
        } else {
            Self::default()
        }
    }

    /// Parses preprocessor_config.json; every error names the file.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let raw: RawPreprocessorConfig =
            serde_json::from_slice(bytes).map_err(|e| Error::config(CONFIG_FILE, format!("not valid JSON for an image processor: {e}")))?;
        Self::try_from(raw).map_err(|reason| Error::config(CONFIG_FILE, reason))
    }

    /// Height and width of the pixel values produced for an image of `width`×`height`.
    pub fn output_size(&self, width: u32, height: u32) -> ImageSize {
        if self.do_resize {
            self.size
        } else {
            ImageSize { height, width }
        }
    }

    /// RGB image → pixel values `[tiles, 3, H, W]` (f32, CPU) and how it was cut: one tile
    /// unless the processor splits images.
    pub fn preprocess(&self, image: &RgbImage) -> Result<Pixels> {
        let (width, height) = image.dimensions();
        if width == 0 || height == 0 {
            return Err(Error::Image(format!("image is empty ({width}x{height})")));
        }
        if let Some(tiling) = self.tiling {
            let (tiles, grid) = self.tiles(image, tiling)?;
            let values = tiles.iter().map(|t| self.normalized(t)).collect::<Result<Vec<_>>>()?;
            return Pixels::tiled(Tensor::cat(&values, 0)?, vec![grid]);
        }
        let resized;
        let pixels: &RgbImage = if self.do_resize && (width, height) != (self.size.width, self.size.height) {
            resized = resize(image, self.size.width, self.size.height, self.resample)?;
            &resized
        } else {
            image
        };
        Ok(Pixels::whole(self.normalized(pixels)?))
    }

    /// `Idefics3ImageProcessor`'s resizes (each a Pillow resize of 8-bit RGB, as its PIL backend
    /// does) and crops: the tiles in rows, then the global image; or the whole image alone.
    fn tiles(&self, image: &RgbImage, tiling: Tiling) -> Result<(Vec<RgbImage>, Grid)> {
        let resample = self.resample;
        let resize_to = |img: &RgbImage, (w, h): (u32, u32)| if img.dimensions() == (w, h) { Ok(img.clone()) } else { resize(img, w, h, resample) };
        let mut img = image.clone();
        if self.do_resize {
            img = resize_to(&img, idefics3_resized(img.width(), img.height(), tiling.longest_edge))?;
        }
        let tile = tiling.tile;
        if !tiling.split {
            return Ok((vec![resize_to(&img, (tile, tile))?], Grid::WHOLE));
        }
        img = resize_to(&img, multiples_of(img.width(), img.height(), tile))?;
        let (w, h) = img.dimensions();
        if w <= tile && h <= tile {
            return Ok((vec![img], Grid::WHOLE));
        }
        let (rows, cols) = ((h - tile) / tile + 1, (w - tile) / tile + 1);
        if rows * cols > MAX_TILES {
            return Err(Error::Image(format!(
                "a {w}x{h} image in {tile}-pixel tiles makes {rows}x{cols} tiles, more than {MAX_TILES} (check size and max_image_size in {CONFIG_FILE})"
            )));
        }
        let mut tiles = Vec::with_capacity((rows * cols + 1) as usize);
        for r in 0..rows {
            for c in 0..cols {
                tiles.push(image::imageops::crop_imm(&img, c * tile, r * tile, tile, tile).to_image());
            }
        }
        tiles.push(resize_to(&img, (tile, tile))?);
        Ok((tiles, Grid { rows: rows as usize, cols: cols as usize }))
    }

    /// Rescaled and normalized, `[1, 3, H, W]`.
    fn normalized(&self, pixels: &RgbImage) -> Result<Tensor> {
        let (w, h) = (pixels.width() as usize, pixels.height() as usize);
        let plane = w * h;
        let samples: &[u8] = pixels.as_raw();
        if samples.len() != plane * 3 {
            return Err(Error::Image(format!("internal: {w}x{h} RGB image holds {} bytes", samples.len())));
        }

        // Each output value depends only on (channel, u8 value): a 3×256 table computes every
        // value exactly as numpy does, and the per-pixel work is a lookup.
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, out) in table.iter_mut().enumerate() {
                let mut x = if self.do_rescale { (v as f64 * self.rescale_factor) as f32 } else { v as f32 };
                if self.do_normalize {
                    x = (x - self.image_mean[c]) / self.image_std[c];
                }
                *out = x;
            }
        }
        let mut data = vec![0f32; plane * 3];
        let (r_plane, rest) = data.split_at_mut(plane);
        let (g_plane, b_plane) = rest.split_at_mut(plane);
        let [lut_r, lut_g, lut_b] = &lut;
        for (((px, r), g), b) in samples.chunks_exact(3).zip(r_plane).zip(g_plane).zip(b_plane) {
            *r = lut_r[px[0] as usize];
            *g = lut_g[px[1] as usize];
            *b = lut_b[px[2] as usize];
        }
        Ok(Tensor::from_vec(data, (1, 3, h, w), &Device::Cpu)?)
    }
}

/// The size `Idefics3ImageProcessor` resizes to first: the longest edge to `max_len` (the other
/// by the aspect ratio, rounded up to even), then within its 4096 cap — Python's float
/// arithmetic and truncation, as `_resize_output_size_rescale_to_max_len` and
/// `_resize_output_size_scale_below_upper_bound` do it.
fn idefics3_resized(width: u32, height: u32, max_len: u32) -> (u32, u32) {
    let (mut w, mut h) = (width as i64, height as i64);
    let aspect = w as f64 / h as f64;
    if w >= h {
        w = max_len as i64;
        h = (w as f64 / aspect) as i64;
        h += h % 2;
    } else {
        h = max_len as i64;
        w = (h as f64 * aspect) as i64;
        w += w % 2;
    }
    let (w, h) = (w.max(1), h.max(1));
    let (cap, aspect) = (IDEFICS3_MAX_IMAGE_SIZE as i64, w as f64 / h as f64);
    let (w, h) = if w >= h && w > cap {
        (cap, (cap as f64 / aspect) as i64)
    } else if h > w && h > cap {
        ((cap as f64 * aspect) as i64, cap)
    } else {
        (w, h)
    };
    (w.max(1) as u32, h.max(1) as u32)
}

/// `resize_for_vision_encoder`: both sides up to multiples of `tile`, the second by the aspect
/// ratio of the first.
fn multiples_of(width: u32, height: u32, tile: u32) -> (u32, u32) {
    let up = |v: i64| (v + tile as i64 - 1) / tile as i64 * tile as i64;
    let aspect = width as f64 / height as f64;
    let (w, h) = if width >= height {
        let w = up(width as i64);
        (w, up((w as f64 / aspect) as i64))
    } else {
        let h = up(height as i64);
        (up((h as f64 * aspect) as i64), h)
    };
    (w.max(tile as i64) as u32, h.max(tile as i64) as u32)
}

// ------------------------------------------------------------------------------------ decode

fn describe_magic(bytes: &[u8]) -> Option<&'static str> {
    const KNOWN: &[(&[u8], &str)] = &[
        (b"GIF87a", "GIF"),
        (b"GIF89a", "GIF"),
        (b"BM", "BMP"),
        (b"II*\0", "TIFF"),
        (b"MM\0*", "TIFF"),
        (b"\0\0\x01\0", "ICO"),
        (b"qoif", "QOI"),
        (b"8BPS", "PSD"),
        (b"\xff\x0a", "JPEG XL"),
        (b"\0\0\0\x0cJXL ", "JPEG XL"),
        (b"<svg", "SVG"),
        (b"<?xml", "XML/SVG"),
    ];
    if bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        return Some("WebP");
    }
    if bytes.len() >= 12 && &bytes[4..8] == b"ftyp" {
        return Some(match &bytes[8..12] {
            b"avif" | b"avis" => "AVIF",
            b"heic" | b"heix" | b"mif1" | b"msf1" | b"hevc" => "HEIC/HEIF",
            _ => "an ISO media file (MP4/HEIF/AVIF)",
        });
    }
    KNOWN.iter().find(|(magic, _)| bytes.starts_with(magic)).map(|(_, name)| *name)
}

/// The formats [`decode_image`] reads. In WASM the JS package hands the others to the browser.
#[cfg(not(target_arch = "wasm32"))]
const SUPPORTED: &str = "PNG, JPEG, WebP, GIF, BMP and TIFF";
#[cfg(target_arch = "wasm32")]
const SUPPORTED: &str = "PNG and JPEG";

/// WebP, GIF (its first frame), BMP and TIFF, natively: what Pillow opens besides PNG and JPEG.
#[cfg(not(target_arch = "wasm32"))]
fn native_format(bytes: &[u8]) -> Option<(ImageFormat, &'static str)> {
    match image::guess_format(bytes).ok()? {
        ImageFormat::WebP => Some((ImageFormat::WebP, "WebP")),
        ImageFormat::Gif => Some((ImageFormat::Gif, "GIF")),
        ImageFormat::Bmp => Some((ImageFormat::Bmp, "BMP")),
        ImageFormat::Tiff => Some((ImageFormat::Tiff, "TIFF")),
        _ => None,
    }
}

#[cfg(target_arch = "wasm32")]
fn native_format(_: &[u8]) -> Option<(ImageFormat, &'static str)> {
    None
}

/// Decodes an image (recognised by content, not by name: PNG and JPEG, natively also WebP, GIF,
/// BMP and TIFF) to 8-bit RGB, the way
/// transformers' `load_image` does (`PIL.Image.open`, `ImageOps.exif_transpose`, `convert("RGB")`):
/// the EXIF orientation applied, alpha dropped, gray replicated, 16-bit samples truncated to their
/// high byte.
pub fn decode_image(bytes: &[u8]) -> Result<RgbImage> {
    let rgb = decode_stored(bytes)?;
    Ok(match exif_orientation(bytes) {
        Some(orientation) => apply_orientation(rgb, orientation),
        None => rgb,
    })
}

/// The image as stored, before its EXIF orientation.
fn decode_stored(bytes: &[u8]) -> Result<RgbImage> {
    let (format, name) = if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        (ImageFormat::Png, "PNG")
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        (ImageFormat::Jpeg, "JPEG")
    } else if bytes.is_empty() {
        return Err(Error::Image("could not decode: the input is empty (0 bytes)".into()));
    } else if let Some(known) = native_format(bytes) {
        known
    } else {
        let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        let what = match describe_magic(bytes) {
            Some(kind) => format!("this looks like {kind}, an unsupported format; only {SUPPORTED} are supported"),
            None => format!("unsupported format: not a {}", SUPPORTED.replace(" and ", " or ")),
        };
        return Err(Error::Image(format!("could not decode: {what} (first bytes {})", head.join(" "))));
    };
    if format == ImageFormat::Jpeg {
        match crate::jpeg::decode(bytes) {
            Ok(Some(rgb)) => return Ok(rgb),
            Ok(None) => {}
            Err(e) => return Err(Error::Image(format!("could not decode JPEG: {e}"))),
        }
    }
    let decoded = image::ImageReader::with_format(Cursor::new(bytes), format).decode().map_err(|e| {
        Error::Image(match e {
            image::ImageError::Limits(l) => {
                format!("could not decode {name}: the image is too large ({l})")
            }
            image::ImageError::Unsupported(u) => {
                format!("could not decode {name}: unsupported variant ({u})")
            }
            other => format!("could not decode {name}: corrupt or truncated file ({other})"),
        })
    })?;
    let rgb = dynamic_to_rgb(decoded)?;
    if rgb.width() == 0 || rgb.height() == 0 {
        return Err(Error::Image(format!("{name} image is empty ({}x{})", rgb.width(), rgb.height())));
    }
    Ok(rgb)
}

/// The EXIF orientation tag (0x0112) of a JPEG (the first `Exif` APP1 segment) or a PNG (its
/// `eXIf` chunk), as PIL's `getexif()` finds it; `None` if absent or not one number.
pub fn exif_orientation(bytes: &[u8]) -> Option<u16> {
    let u16_be = |at: usize| bytes.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]]) as usize);
    let u32_be = |at: usize| bytes.get(at..at + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize);
    if bytes.starts_with(&[0xFF, 0xD8]) {
        let mut pos = 2;
        // Markers up to the first scan; APPn segments come before it.
        while bytes.get(pos) == Some(&0xFF) {
            let marker = *bytes.get(pos + 1)?;
            if marker == 0xFF {
                pos += 1;
                continue;
            }
            if marker == 0xDA || marker == 0xD9 {
                return None;
            }
            let len = u16_be(pos + 2)?;
            let segment = bytes.get(pos + 4..pos + 2 + len.max(2))?;
            if marker == 0xE1 && segment.starts_with(b"Exif\0\0") {
                return tiff_orientation(&segment[6..]);
            }
            pos += 2 + len;
        }
        None
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        let mut pos = 8;
        while let (Some(len), Some(kind)) = (u32_be(pos), bytes.get(pos + 4..pos + 8)) {
            let data = bytes.get(pos + 8..(pos + 8).checked_add(len)?)?;
            match kind {
                b"eXIf" => return tiff_orientation(data.strip_prefix(b"Exif\0\0").unwrap_or(data)),
                b"IEND" => return None,
                _ => pos += 12 + len,
            }
        }
        None
    } else {
        None
    }
}

/// Orientation (tag 0x0112) from IFD0 of a TIFF structure.
fn tiff_orientation(tiff: &[u8]) -> Option<u16> {
    let little = match tiff.get(..4)? {
        [b'I', b'I', 42, 0] => true,
        [b'M', b'M', 0, 42] => false,
        _ => return None,
    };
    let u16_at = |at: usize| tiff.get(at..at + 2).map(|b| if little { u16::from_le_bytes([b[0], b[1]]) } else { u16::from_be_bytes([b[0], b[1]]) });
    let u32_at = |at: usize| {
        tiff.get(at..at + 4).map(|b| {
            let b = [b[0], b[1], b[2], b[3]];
            if little {
                u32::from_le_bytes(b)
            } else {
                u32::from_be_bytes(b)
            }
        })
    };
    let ifd = u32_at(4)? as usize;
    let entries = u16_at(ifd)? as usize;
    for i in 0..entries {
        let entry = ifd.checked_add(2 + 12 * i)?;
        if u16_at(entry)? != 0x0112 {
            continue;
        }
        let (kind, count) = (u16_at(entry + 2)?, u32_at(entry + 4)?);
        if count != 1 {
            return None;
        }
        return match kind {
            1 | 7 => tiff.get(entry + 8).map(|&b| b as u16),
            3 | 8 => u16_at(entry + 8),
            4 | 9 => u32_at(entry + 8).and_then(|v| u16::try_from(v).ok()),
            _ => None,
        };
    }
    None
}

/// `ImageOps.exif_transpose`: orientations 2–8 flip and/or rotate the stored image upright.
pub fn apply_orientation(rgb: RgbImage, orientation: u16) -> RgbImage {
    use image::imageops::{flip_horizontal, flip_vertical, rotate180, rotate270, rotate90};
    match orientation {
        2 => flip_horizontal(&rgb),
        3 => rotate180(&rgb),
        4 => flip_vertical(&rgb),
        5 => flip_horizontal(&rotate90(&rgb)),
        6 => rotate90(&rgb),
        7 => flip_horizontal(&rotate270(&rgb)),
        8 => rotate270(&rgb),
        _ => rgb,
    }
}

fn rgb_from_raw(width: u32, height: u32, data: Vec<u8>) -> Result<RgbImage> {
    let len = data.len();
    RgbImage::from_raw(width, height, data).ok_or_else(|| Error::Image(format!("internal: {len} bytes do not make a {width}x{height} RGB image")))
}

/// `channels` samples per pixel → RGB: 1 or 2 (gray, gray+alpha) replicate, 3 or 4 keep RGB.
fn to_rgb8<T: Copy>(samples: &[T], channels: usize, width: u32, height: u32, to_u8: impl Fn(T) -> u8) -> Result<RgbImage> {
    let mut out = Vec::with_capacity(samples.len() / channels.max(1) * 3);
    match channels {
        1 | 2 => {
            for px in samples.chunks_exact(channels) {
                let v = to_u8(px[0]);
                out.extend_from_slice(&[v, v, v]);
            }
        }
        3 | 4 => {
            for px in samples.chunks_exact(channels) {
                out.extend_from_slice(&[to_u8(px[0]), to_u8(px[1]), to_u8(px[2])]);
            }
        }
        n => return Err(Error::Image(format!("internal: {n} channels per pixel"))),
    }
    rgb_from_raw(width, height, out)
}

fn dynamic_to_rgb(image: DynamicImage) -> Result<RgbImage> {
    let (w, h) = (image.width(), image.height());
    let same = |v: u8| v;
    let high = |v: u16| (v >> 8) as u8;
    match image {
        DynamicImage::ImageRgb8(img) => Ok(img),
        DynamicImage::ImageRgba8(img) => to_rgb8(img.as_raw(), 4, w, h, same),
        DynamicImage::ImageLuma8(img) => to_rgb8(img.as_raw(), 1, w, h, same),
        DynamicImage::ImageLumaA8(img) => to_rgb8(img.as_raw(), 2, w, h, same),
        DynamicImage::ImageRgb16(img) => to_rgb8(img.as_raw(), 3, w, h, high),
        DynamicImage::ImageRgba16(img) => to_rgb8(img.as_raw(), 4, w, h, high),
        DynamicImage::ImageLuma16(img) => to_rgb8(img.as_raw(), 1, w, h, high),
        DynamicImage::ImageLumaA16(img) => to_rgb8(img.as_raw(), 2, w, h, high),
        // Float images do not come out of the PNG/JPEG decoders; convert generically.
        other => Ok(other.to_rgb8()),
    }
}

/// Raw RGBA pixels (e.g. a canvas' `ImageData`) → RGB, dropping alpha like PIL's `convert("RGB")`.
pub fn rgba_to_rgb(pixels: &[u8], width: u32, height: u32) -> Result<RgbImage> {
    if width == 0 || height == 0 {
        return Err(Error::Image(format!("RGBA image is empty ({width}x{height})")));
    }
    let expected = (width as usize).checked_mul(height as usize).and_then(|n| n.checked_mul(4));
    if expected != Some(pixels.len()) {
        let expected = expected.map_or_else(|| "more than fits in memory".to_string(), |n| n.to_string());
        return Err(Error::Image(format!(
            "RGBA buffer has {} bytes, but a {width}x{height} RGBA image needs {expected} (width * height * 4)",
            pixels.len()
        )));
    }
    to_rgb8(pixels, 4, width, height, |v| v)
}

// ------------------------------------------------------------------------------------ resize
//
// A transcription of Pillow's libImaging/Resample.c (ImagingResample for 8-bit images) and, for
// NEAREST, of libImaging/Geometry.c (ImagingScaleAffine). Every float operation is written in
// the order C evaluates it so that the fixed-point coefficients come out identical.

/// Pillow: `PRECISION_BITS = 32 - 8 - 2`.
const PRECISION_BITS: u32 = 32 - 8 - 2;
const HALF: i32 = 1 << (PRECISION_BITS - 1);

fn box_filter(x: f64) -> f64 {
    if x > -0.5 && x <= 0.5 {
        1.0
    } else {
        0.0
    }
}

fn bilinear_filter(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

fn hamming_filter(x: f64) -> f64 {
    let x = x.abs();
    if x == 0.0 {
        return 1.0;
    }
    if x >= 1.0 {
        return 0.0;
    }
    let x = x * std::f64::consts::PI;
    // C: `sin(x) / x * (0.54f + 0.46f * cos(x))` — float literals promoted to double.
    x.sin() / x * (0.54f32 as f64 + 0.46f32 as f64 * x.cos())
}

fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        return ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    }
    if x < 2.0 {
        return (((x - 5.0) * x + 8.0) * x - 4.0) * A;
    }
    0.0
}

fn sinc_filter(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

fn lanczos_filter(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc_filter(x) * sinc_filter(x / 3.0)
    } else {
        0.0
    }
}

/// A filter function and its support, as Pillow's `struct filter`.
type Filter = (fn(f64) -> f64, f64);

fn filter_of(resample: Resample) -> Option<Filter> {
    match resample {
        Resample::Nearest => None,
        Resample::Box => Some((box_filter, 0.5)),
        Resample::Bilinear => Some((bilinear_filter, 1.0)),
        Resample::Hamming => Some((hamming_filter, 1.0)),
        Resample::Bicubic => Some((bicubic_filter, 2.0)),
        Resample::Lanczos => Some((lanczos_filter, 3.0)),
    }
}

/// Fixed-point coefficients of one axis (Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`).
#[derive(Debug)]
struct AxisCoeffs {
    /// Per output index: first input index and number of taps. Always
    /// `first + taps <= in_size` and `taps <= ksize`.
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    /// `out_size * ksize` weights scaled by `2^PRECISION_BITS`.
    weights: Vec<i32>,
}

impl AxisCoeffs {
    fn taps(&self, out_index: usize) -> (usize, &[i32]) {
        let (first, taps) = self.bounds[out_index];
        let start = out_index * self.ksize;
        (first, &self.weights[start..start + taps])
    }
}

fn precompute_coeffs(in_size: u32, out_size: u32, filter: fn(f64) -> f64, filter_support: f64) -> Result<AxisCoeffs> {
    if in_size == 0 || out_size == 0 {
        return Err(Error::Image(format!("cannot resize between sizes {in_size} and {out_size}")));
    }
    // `float in0 = 0, in1 = inSize`: `(double)(in1 - in0) / outSize`.
    let scale = (in_size as f32 - 0.0f32) as f64 / out_size as f64;
    let filterscale = if scale < 1.0 { 1.0 } else { scale };
    let support = filter_support * filterscale;
    let ksize = (support.ceil() as usize) * 2 + 1;
    let out = out_size as usize;
    let total = out
        .checked_mul(ksize)
        .filter(|&n| n <= (1 << 28))
        .ok_or_else(|| Error::Image(format!("resize {in_size} → {out_size} needs too many filter coefficients")))?;

    let mut bounds = Vec::with_capacity(out);
    let mut weights = vec![0i32; total];
    let mut k = vec![0f64; ksize];
    let inv_filterscale = 1.0 / filterscale;
    for (xx, row) in weights.chunks_exact_mut(ksize).enumerate() {
        let center = 0.0 + (xx as f64 + 0.5) * scale;
        let mut ww = 0.0;
        // `(int)` truncates toward zero, as `as` does.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let taps = (xmax - xmin).clamp(0, ksize as i64) as usize;
        let xmin = (xmin as usize).min(in_size as usize);
        let taps = taps.min(in_size as usize - xmin);
        for (x, kx) in k.iter_mut().take(taps).enumerate() {
            let w = filter(((x + xmin) as f64 - center + 0.5) * inv_filterscale);
            *kx = w;
            ww += w;
        }
        if ww != 0.0 {
            for kx in k.iter_mut().take(taps) {
                *kx /= ww;
            }
        }
        for (dst, &kx) in row.iter_mut().zip(k.iter().take(taps)) {
            let scaled = kx * (1u32 << PRECISION_BITS) as f64;
            *dst = if kx < 0.0 { (-0.5 + scaled) as i32 } else { (0.5 + scaled) as i32 };
        }
        bounds.push((xmin, taps));
    }
    Ok(AxisCoeffs { bounds, ksize, weights })
}

#[inline(always)]
fn clip8(ss: i32) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

#[inline(always)]
fn mac(acc: i32, sample: u8, weight: i32) -> i32 {
    // Pillow's sums fit in i32 by design (two spare bits); wrapping keeps debug builds panic-free.
    acc.wrapping_add((sample as i32).wrapping_mul(weight))
}

/// Horizontal pass on `rows` of `src` (RGB, `src_w` wide) → `rows.len()` rows, `out_w` wide.
fn resample_horizontal(src: &[u8], src_w: usize, rows: std::ops::Range<usize>, coeffs: &AxisCoeffs, out_w: usize) -> Vec<u8> {
    let stride = src_w * 3;
    let mut out = vec![0u8; rows.len() * out_w * 3];
    let src_rows = src[rows.start * stride..rows.end * stride].chunks_exact(stride);
    for (line_out, line_in) in out.chunks_exact_mut(out_w * 3).zip(src_rows) {
        for (xx, px_out) in line_out.chunks_exact_mut(3).enumerate() {
            let (first, k) = coeffs.taps(xx);
            let px_in = &line_in[first * 3..(first + k.len()) * 3];
            let (mut s0, mut s1, mut s2) = (HALF, HALF, HALF);
            for (p, &w) in px_in.chunks_exact(3).zip(k) {
                s0 = mac(s0, p[0], w);
                s1 = mac(s1, p[1], w);
                s2 = mac(s2, p[2], w);
            }
            px_out[0] = clip8(s0);
            px_out[1] = clip8(s1);
            px_out[2] = clip8(s2);
        }
    }
    out
}

/// Vertical pass: `src` rows of `row_len` bytes, `coeffs` bounds relative to `src`'s first row.
fn resample_vertical(src: &[u8], row_len: usize, coeffs: &AxisCoeffs, out_h: usize) -> Vec<u8> {
    let mut out = vec![0u8; out_h * row_len];
    let mut acc = vec![HALF; row_len];
    for (yy, line_out) in out.chunks_exact_mut(row_len).enumerate() {
        let (first, k) = coeffs.taps(yy);
        acc.fill(HALF);
        // Summing row by row instead of tap by tap per pixel: integer sums, same result.
        for (line_in, &w) in src[first * row_len..(first + k.len()) * row_len].chunks_exact(row_len).zip(k) {
            for (a, &p) in acc.iter_mut().zip(line_in) {
                *a = mac(*a, p, w);
            }
        }
        for (o, &a) in line_out.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// Pillow's `ImagingScaleAffine` (what `Image.resize(.., NEAREST)` runs).
fn resize_nearest(src: &[u8], in_w: u32, in_h: u32, out_w: u32, out_h: u32) -> Vec<u8> {
    // COORD(v): v < 0 ? -1 : (int)v
    let coord = |v: f64| if v < 0.0 { -1 } else { v as i64 };
    let a0 = (in_w as f32 - 0.0f32) as f64 / out_w as f64;
    let a4 = (in_h as f32 - 0.0f32) as f64 / out_h as f64;
    let (out_w, out_h) = (out_w as usize, out_h as usize);
    let mut xintab = vec![0usize; out_w];
    let (mut xmin, mut xmax) = (out_w, 0usize);
    let mut xo = 0.0 + a0 * 0.5;
    for (x, slot) in xintab.iter_mut().enumerate() {
        let xin = coord(xo);
        if xin >= 0 && xin < in_w as i64 {
            xmax = x + 1;
            xmin = xmin.min(x);
            *slot = xin as usize;
        }
        xo += a0;
    }
    let stride = in_w as usize * 3;
    let mut out = vec![0u8; out_w * out_h * 3];
    let mut yo = 0.0 + a4 * 0.5;
    for line_out in out.chunks_exact_mut(out_w * 3) {
        let yi = coord(yo);
        if yi >= 0 && yi < in_h as i64 && xmin < xmax {
            let line_in = &src[yi as usize * stride..(yi as usize + 1) * stride];
            for (px_out, &xin) in line_out[xmin * 3..xmax * 3].chunks_exact_mut(3).zip(&xintab[xmin..xmax]) {
                px_out.copy_from_slice(&line_in[xin * 3..xin * 3 + 3]);
            }
        }
        yo += a4;
    }
    out
}

/// `PIL.Image.resize((width, height), resample)` of an RGB image, bit-exact with Pillow 13.0
/// (8-bit fixed point, two passes with a `u8` image in between; `Nearest` as Pillow's affine path).
pub fn resize(image: &RgbImage, width: u32, height: u32, resample: Resample) -> Result<RgbImage> {
    let (in_w, in_h) = image.dimensions();
    if in_w == 0 || in_h == 0 || width == 0 || height == 0 {
        return Err(Error::Image(format!("cannot resize a {in_w}x{in_h} image to {width}x{height}")));
    }
    let src: &[u8] = image.as_raw();
    if src.len() != in_w as usize * in_h as usize * 3 {
        return Err(Error::Image(format!("internal: {in_w}x{in_h} RGB image holds {} bytes", src.len())));
    }
    if (in_w, in_h) == (width, height) {
        return Ok(image.clone());
    }
    let Some((filter, support)) = filter_of(resample) else {
        return rgb_from_raw(width, height, resize_nearest(src, in_w, in_h, width, height));
    };

    let need_horizontal = width != in_w;
    let need_vertical = height != in_h;
    // Pillow 13 (python-pillow/Pillow#9549) runs the vertical pass first when the height shrinks
    // by more than twice as many pixels as the width; earlier Pillows always start horizontally,
    // which changes some pixels by ±1–2 for such (tall) images.
    let dy = in_h as i64 - height as i64;
    let dx = in_w as i64 - width as i64;
    let horizontal_first = !(dy > 0 && dy > dx * 2);
    let (out_w, out_h) = (width as usize, height as usize);

    let data = if horizontal_first {
        let mut vert = precompute_coeffs(in_h, height, filter, support)?;
        let mut rows = 0..in_h as usize;
        let mut tmp = None;
        if need_horizontal {
            // Only the rows the vertical pass reads; its bounds become relative to them.
            let first = vert.bounds.iter().map(|b| b.0).min().unwrap_or(0);
            let last = vert.bounds.iter().map(|b| b.0 + b.1).max().unwrap_or(first);
            rows = first..last.max(first);
            for b in &mut vert.bounds {
                b.0 -= first;
            }
            let horiz = precompute_coeffs(in_w, width, filter, support)?;
            tmp = Some(resample_horizontal(src, in_w as usize, rows.clone(), &horiz, out_w));
        }
        match (tmp, need_vertical) {
            (Some(tmp), true) => resample_vertical(&tmp, out_w * 3, &vert, out_h),
            (Some(tmp), false) => tmp,
            (None, _) => resample_vertical(src, in_w as usize * 3, &vert, out_h),
        }
    } else {
        // Here height shrinks, so the vertical pass is always needed.
        let vert = precompute_coeffs(in_h, height, filter, support)?;
        let tmp = resample_vertical(src, in_w as usize * 3, &vert, out_h);
        if need_horizontal {
            let horiz = precompute_coeffs(in_w, width, filter, support)?;
            resample_horizontal(&tmp, in_w as usize, 0..out_h, &horiz, out_w)
        } else {
            tmp
        }
    };
    rgb_from_raw(width, height, data)
}

// ------------------------------------------------------------------------------------ tests

#[cfg(test)]
mod tests {
    use super::*;

    const SIGLIP_JSON: &str = r#"{"do_normalize": true, "do_rescale": true, "do_resize": true, "image_mean": [0.5,0.5,0.5], "image_processor_type": "SiglipImageProcessor", "image_std": [0.5,0.5,0.5], "processor_class": "SiglipProcessor", "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"height": 224, "width": 224}}"#;

    fn pattern(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 37 + y * 11) as u8, (x * x + 3 * y) as u8, ((x ^ y) * 29) as u8]))
    }

    fn tensor_values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn blip_defaults_are_clips_at_384() {
        let cfg = PreprocessorConfig::from_json(br#"{"image_processor_type": "BlipImageProcessor"}"#).unwrap();
        assert_eq!((cfg.size, cfg.resample), (ImageSize { height: 384, width: 384 }, Resample::Bicubic));
        assert_eq!(cfg.image_mean, [0.481_454_66, 0.457_827_5, 0.408_210_73]);
        assert_eq!(cfg.image_std, [0.268_629_54, 0.261_302_58, 0.275_777_11]);
    }

    #[test]
    fn config_defaults() {
        let cfg = PreprocessorConfig::from_json(b"{}").unwrap();
        assert_eq!(cfg, PreprocessorConfig::default());
        assert!(cfg.do_resize && cfg.do_rescale && cfg.do_normalize);
        assert_eq!(cfg.size, ImageSize { height: 224, width: 224 });
        assert_eq!(cfg.resample, Resample::Bicubic);
        assert_eq!(cfg.rescale_factor, 1.0 / 255.0);
        assert_eq!(cfg.image_mean, [0.5; 3]);
        assert_eq!(cfg.image_std, [0.5; 3]);
    }

    #[test]
    fn config_siglip_full() {
        let cfg = PreprocessorConfig::from_json(SIGLIP_JSON.as_bytes()).unwrap();
        assert_eq!(cfg.size, ImageSize { height: 224, width: 224 });
        assert_eq!(cfg.resample, Resample::Bicubic);
        assert_eq!(cfg.rescale_factor, 0.00392156862745098);
        assert_eq!(cfg.do_convert_rgb, None);
        // serde path goes through the same validation
        let via_serde: PreprocessorConfig = serde_json::from_str(SIGLIP_JSON).unwrap();
        assert_eq!(via_serde, cfg);
    }

    #[test]
    fn config_variants() {
        let cfg = PreprocessorConfig::from_json(
            br#"{"size": {"height": 384, "width": 512}, "resample": 2, "image_mean": 0.25, "image_std": [0.1, 0.2, 0.3],
                 "do_convert_rgb": null, "do_rescale": null, "do_center_crop": false}"#,
        )
        .unwrap();
        assert_eq!(cfg.size, ImageSize { height: 384, width: 512 });
        assert_eq!(cfg.resample, Resample::Bilinear);
        assert_eq!(cfg.image_mean, [0.25; 3]);
        assert_eq!(cfg.image_std, [0.1, 0.2, 0.3]);
        assert!(cfg.do_rescale);
    }

    #[test]
    fn config_errors_name_the_file() {
        let cases: &[(&str, &str)] = &[
            (r#"{"size": {"shortest_edge": 224}}"#, "shortest_edge"),
            (r#"{"size": 0}"#, "out of range"),
            (r#"{"size": -3}"#, "out of range"),
            (r#"{"size": {"height": 0, "width": 224}}"#, "size.height"),
            (r#"{"size": {"height": 224}}"#, "width"),
            (r#"{"resample": 7}"#, "resample = 7"),
            (r#"{"image_mean": [0.5, 0.5]}"#, "image_mean has 2 values"),
            (r#"{"image_std": [0.5, 0.0, 0.5]}"#, "image_std"),
            (r#"{"do_center_crop": true}"#, "do_center_crop"),
            (r#"{"do_resize": "yes"}"#, "not valid JSON"),
            ("not json", "not valid JSON"),
        ];
        for (json, needle) in cases {
            let err = PreprocessorConfig::from_json(json.as_bytes()).unwrap_err().to_string();
            assert!(err.starts_with("preprocessor_config.json: "), "{json}: {err}");
            assert!(err.contains(needle), "{json}: {err}");
        }
    }

    #[test]
    fn config_vit_feature_extractor() {
        // nlpconnect/vit-gpt2-image-captioning's file, as the hub has it.
        let legacy = br#"{"do_normalize": true, "do_resize": true, "feature_extractor_type": "ViTFeatureExtractor",
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2, "size": 224}"#;
        let cfg = PreprocessorConfig::from_json(legacy).unwrap();
        assert_eq!(cfg.size, ImageSize { height: 224, width: 224 });
        assert_eq!(cfg.resample, Resample::Bilinear);
        assert!(cfg.do_rescale);
        assert_eq!(cfg.rescale_factor, 1.0 / 255.0);
        // ViTImageProcessor's defaults where the file is silent: bilinear, not SigLIP's bicubic.
        let bare = PreprocessorConfig::from_json(br#"{"image_processor_type": "ViTImageProcessor", "size": 32}"#).unwrap();
        assert_eq!((bare.resample, bare.size), (Resample::Bilinear, ImageSize { height: 32, width: 32 }));
        let siglip = PreprocessorConfig::from_json(br#"{"image_processor_type": "SiglipImageProcessor"}"#).unwrap();
        assert_eq!(siglip.resample, Resample::Bicubic);
    }

    #[test]
    fn identity_resize_is_a_copy() {
        let img = pattern(13, 9);
        for r in [Resample::Nearest, Resample::Bicubic, Resample::Bilinear, Resample::Lanczos] {
            assert_eq!(resize(&img, 13, 9, r).unwrap(), img);
        }
        // do_resize with the image already at the target size leaves pixels untouched.
        let cfg = PreprocessorConfig { size: ImageSize { height: 9, width: 13 }, do_normalize: false, ..Default::default() };
        let v = tensor_values(&cfg.preprocess(&img).unwrap());
        let px = img.get_pixel(4, 2);
        for c in 0..3 {
            assert_eq!(v[c * 13 * 9 + 2 * 13 + 4], (px[c] as f64 / 255.0) as f32);
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([200, 17, 255]));
        for r in [Resample::Nearest, Resample::Lanczos, Resample::Bilinear, Resample::Bicubic, Resample::Box, Resample::Hamming] {
            for (w, h) in [(224, 224), (5, 3), (37, 7), (60, 23), (10, 100)] {
                let out = resize(&img, w, h, r).unwrap();
                assert!(out.pixels().all(|p| p.0 == [200, 17, 255]), "{r:?} {w}x{h}");
            }
        }
        let t = PreprocessorConfig::default().preprocess(&img).unwrap();
        assert_eq!(t.dims(), &[1, 3, 224, 224]);
        let v = tensor_values(&t);
        let expect = |u: u8| (((u as f64 * (1.0 / 255.0)) as f32) - 0.5) / 0.5;
        assert!(v[..224 * 224].iter().all(|&x| x == expect(200)));
        assert!(v[224 * 224..2 * 224 * 224].iter().all(|&x| x == expect(17)));
        assert!(v[2 * 224 * 224..].iter().all(|&x| x == 1.0));
    }

    #[test]
    fn bicubic_coefficients_4_to_2() {
        // scale 2 → filter support 2·2 = 4, ksize 9. Output 0: center 1.0, taps x = 0..3 at
        // (x + 0.5 - 1) / 2 = -0.25, 0.25, 0.75, 1.25; output 1: center 3.0, xmin = (int)(-0.5) = 0,
        // taps at -1.25, -0.75, -0.25, 0.25. Bicubic (a = -0.5): w(0.25) = 0.8671875,
        // w(0.75) = 0.2265625, w(1.25) = -0.0703125 (exact in binary); sum 1.890625.
        let c = precompute_coeffs(4, 2, bicubic_filter, 2.0).unwrap();
        assert_eq!(c.ksize, 9);
        assert_eq!(bicubic_filter(0.25), 0.8671875);
        assert_eq!(bicubic_filter(-0.75), 0.2265625);
        assert_eq!(bicubic_filter(1.25), -0.0703125);
        let fix = |k: f64| {
            let s = k / 1.890625 * (1 << 22) as f64;
            if s < 0.0 {
                (s - 0.5) as i32
            } else {
                (s + 0.5) as i32
            }
        };
        let w0 = [fix(0.8671875), fix(0.8671875), fix(0.2265625), fix(-0.0703125)];
        assert_eq!(c.taps(0), (0, &w0[..]));
        let w1 = [fix(-0.0703125), fix(0.2265625), fix(0.8671875), fix(0.8671875)];
        assert_eq!(c.taps(1), (0, &w1[..]));
        assert_eq!(w0, [1923834, 1923834, 502623, -155987]);

        // Pixels [0, 100, 200, 255]: (0.8671875·100 + 0.2265625·200 - 0.0703125·255) / 1.890625
        // = 60.35 → 60; (−0.0703125·0 + 0.2265625·100 + 0.8671875·(200 + 255)) / 1.890625 = 220.7 → 221.
        let img = RgbImage::from_fn(4, 1, |x, _| {
            let v = [0u8, 100, 200, 255][x as usize];
            image::Rgb([v, v, v])
        });
        let out = resize(&img, 2, 1, Resample::Bicubic).unwrap();
        assert_eq!(out.get_pixel(0, 0).0, [60; 3]);
        assert_eq!(out.get_pixel(1, 0).0, [221; 3]);
    }

    #[test]
    fn nearest_picks_pillow_pixels() {
        // 4 → 2: a0 = 2, xo = 1, 3 → pixels 1 and 3.  3 → 7 upscale: xo = 3/14 + k·3/7.
        let img = RgbImage::from_fn(4, 3, |x, y| image::Rgb([x as u8, y as u8, 0]));
        let out = resize(&img, 2, 3, Resample::Nearest).unwrap();
        assert_eq!(out.get_pixel(0, 0).0, [1, 0, 0]);
        assert_eq!(out.get_pixel(1, 2).0, [3, 2, 0]);
        let img = RgbImage::from_fn(3, 1, |x, _| image::Rgb([x as u8, 0, 0]));
        let out = resize(&img, 7, 1, Resample::Nearest).unwrap();
        let xs: Vec<u8> = out.pixels().map(|p| p[0]).collect();
        assert_eq!(xs, [0, 0, 1, 1, 1, 2, 2]);
    }

    #[test]
    fn rgba_to_rgb_checks_length() {
        let err = rgba_to_rgb(&[0; 10], 2, 2).unwrap_err().to_string();
        assert!(err.contains("10") && err.contains("16"), "{err}");
        assert!(rgba_to_rgb(&[], 0, 5).unwrap_err().to_string().contains("empty"));
        let rgb = rgba_to_rgb(&[1, 2, 3, 0, 4, 5, 6, 255], 2, 1).unwrap();
        assert_eq!(rgb.as_raw(), &[1, 2, 3, 4, 5, 6]); // alpha dropped, not composited
    }

    fn encode_png(img: DynamicImage) -> Vec<u8> {
        let mut buf = Cursor::new(Vec::new());
        img.write_to(&mut buf, ImageFormat::Png).unwrap();
        buf.into_inner()
    }

    #[test]
    fn decode_garbage_and_truncated() {
        let err = decode_image(b"hello, this is not an image").unwrap_err().to_string();
        assert!(err.contains("could not decode") && err.contains("not a PNG, JPEG"), "{err}");
        let err = decode_image(b"qoif\x00\x00\x00\x01\x00\x00\x00\x01\x03\x00").unwrap_err().to_string();
        assert!(err.contains("QOI") && err.contains(&format!("only {SUPPORTED}")), "{err}");
        // A format decoded natively, cut short: an error that names it.
        #[cfg(not(target_arch = "wasm32"))]
        {
            let err = decode_image(b"GIF89a\x01\x00\x01\x00").unwrap_err().to_string();
            assert!(err.contains("could not decode GIF"), "{err}");
        }
        assert!(decode_image(b"").unwrap_err().to_string().contains("empty"));

        let png = encode_png(DynamicImage::ImageRgb8(pattern(64, 48)));
        for cut in [8, 20, 40, png.len() / 2, png.len() - 13] {
            let err = decode_image(&png[..cut]).unwrap_err().to_string();
            assert!(err.contains("could not decode PNG"), "cut {cut}: {err}");
        }
        let jpeg_header = [0xFF, 0xD8, 0xFF, 0xE0, 0x00];
        let err = decode_image(&jpeg_header).unwrap_err().to_string();
        assert!(err.contains("could not decode JPEG"), "{err}");
    }

    #[test]
    fn truncated_jpeg_never_panics() {
        let mut buf = Cursor::new(Vec::new());
        DynamicImage::ImageRgb8(pattern(64, 48)).write_to(&mut buf, ImageFormat::Jpeg).unwrap();
        let jpg = buf.into_inner();
        // Cut inside the headers: an error that says so.
        for cut in [3, 4, 30, 200] {
            let err = decode_image(&jpg[..cut]).unwrap_err().to_string();
            assert!(err.contains("could not decode JPEG"), "cut {cut}: {err}");
        }
        // Cut inside the entropy-coded data: an error, as PIL raises one.
        for cut in (700..jpg.len() - 2).step_by(97) {
            let err = decode_image(&jpg[..cut]).unwrap_err().to_string();
            assert!(err.contains("truncated"), "cut {cut}: {err}");
        }
    }

    #[test]
    fn decode_color_types_like_pil() {
        let rgb = pattern(5, 4);
        assert_eq!(decode_image(&encode_png(DynamicImage::ImageRgb8(rgb.clone()))).unwrap(), rgb);

        let rgba = image::RgbaImage::from_fn(5, 4, |x, y| {
            let p = rgb.get_pixel(x, y);
            image::Rgba([p[0], p[1], p[2], (x * 60) as u8])
        });
        assert_eq!(decode_image(&encode_png(DynamicImage::ImageRgba8(rgba))).unwrap(), rgb);

        let gray = image::GrayImage::from_fn(3, 2, |x, y| image::Luma([(x * 80 + y) as u8]));
        let out = decode_image(&encode_png(DynamicImage::ImageLuma8(gray.clone()))).unwrap();
        assert!(out.enumerate_pixels().all(|(x, y, p)| p.0 == [gray.get_pixel(x, y)[0]; 3]));

        let rgb16 = image::ImageBuffer::<image::Rgb<u16>, _>::from_fn(3, 2, |x, y| image::Rgb([0x1280 + x as u16, 0xFFFF, (y as u16) << 8 | 0xFF]));
        let out = decode_image(&encode_png(DynamicImage::ImageRgb16(rgb16))).unwrap();
        assert_eq!(out.get_pixel(1, 1).0, [0x12, 0xFF, 0x01]); // high byte, as PIL
    }

    /// Cross-check with Pillow / transformers. Run `tests/preprocess_pil.py` first, then
    /// `cargo test --lib preprocess -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn matches_pillow_reference() {
        let dir = std::env::var("WASMCAP_PIL_DIR").unwrap_or_else(|_| "/tmp/wasmcap_pil".into());
        let dir = std::path::Path::new(&dir);
        let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        let read = |name: &serde_json::Value| std::fs::read(dir.join(name.as_str().unwrap())).unwrap();
        let mut worst = 0f32;
        for case in manifest["decode"].as_array().unwrap() {
            let ours = decode_image(&read(&case["file"])).unwrap();
            let theirs = read(&case["rgb"]);
            assert_eq!(ours.as_raw().len(), theirs.len(), "{case}");
            let max = ours.as_raw().iter().zip(&theirs).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0);
            let n = ours.as_raw().iter().zip(&theirs).filter(|(a, b)| a != b).count();
            println!("decode {:<28} max-abs {max:>3} ({n} of {} samples differ)", case["name"].as_str().unwrap(), theirs.len());
            if case["exact"].as_bool().unwrap_or(true) {
                assert_eq!(max, 0, "{case}");
            }
        }
        for case in manifest["preprocess"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let cfg = PreprocessorConfig::from_json(case["config"].to_string().as_bytes()).unwrap();
            let img = decode_image(&read(&case["file"])).unwrap();
            let t0 = std::time::Instant::now();
            let t = cfg.preprocess(&img).unwrap();
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            let shape: Vec<usize> = case["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
            assert_eq!(t.dims(), &shape[..], "{name}");
            let ours = tensor_values(&t);
            let theirs: Vec<f32> = read(&case["expected"]).chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            let max = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let n = ours.iter().zip(&theirs).filter(|(a, b)| a != b).count();
            // resized u8 image (before rescale) compared too, when Python saved it
            let mut px = String::new();
            if let Some(resized) = case.get("resized").and_then(|v| v.as_str()) {
                let pil = std::fs::read(dir.join(resized)).unwrap();
                let r = resize(&img, cfg.size.width, cfg.size.height, cfg.resample).unwrap();
                let m = r.as_raw().iter().zip(&pil).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0);
                px = format!(", resized u8 max-abs {m}");
            }
            println!("{name:<44} {:>4}x{:<4} max-abs {max:.3e} ({n} values differ){px}  [{ms:.1} ms]", shape[3], shape[2]);
            worst = worst.max(max);
        }
        assert!(worst <= 1e-6, "pixel values differ from Pillow's by {worst}");
        if let Some(big) = manifest.get("timing").and_then(|v| v.as_str()) {
            let bytes = read(&serde_json::Value::String(big.into()));
            let t0 = std::time::Instant::now();
            let img = decode_image(&bytes).unwrap();
            let t1 = std::time::Instant::now();
            let cfg = PreprocessorConfig::default();
            let _ = cfg.preprocess(&img).unwrap();
            let t2 = std::time::Instant::now();
            println!(
                "timing {}x{} JPEG: decode {:.0} ms, preprocess {:.0} ms",
                img.width(),
                img.height(),
                (t1 - t0).as_secs_f64() * 1e3,
                (t2 - t1).as_secs_f64() * 1e3
            );
        }
    }
}
