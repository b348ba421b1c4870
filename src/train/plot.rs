//! Loss and metric curves as a PNG, drawn pixel by pixel so that the trainer needs no
//! plotting crate (and no system fonts): lines, axes, ticks and a legend on white, text in an
//! embedded 5×7 bitmap font (with a descender row).

use std::path::Path;

use image::{ImageEncoder, Rgb, RgbImage};

use crate::error::{Error, Result};

/// One curve: `points` are `(x, y)` pairs drawn in the given order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const WIDTH: u32 = 900;
const PANEL_HEIGHT: u32 = 300;
const HEADER: u32 = 36;
const FOOTER: u32 = 34;
/// Room for y tick labels on the left of each panel.
const MARGIN_LEFT: i64 = 112;
const MARGIN_RIGHT: i64 = 24;
const MARGIN_TOP: i64 = 14;
/// Room for x tick labels under each panel.
const MARGIN_BOTTOM: i64 = 30;
/// A bound on the image size (and so on memory) whatever the caller passes.
const MAX_PANELS: usize = 64;
/// Two-times scaled font: 12 px per character including spacing, 16 px tall.
const TEXT_SCALE: i64 = 2;
const MAX_LEGEND_CHARS: usize = 32;

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const TEXT: Rgb<u8> = Rgb([20, 20, 20]);
const AXIS: Rgb<u8> = Rgb([90, 90, 90]);
const GRID: Rgb<u8> = Rgb([228, 228, 228]);
const LEGEND_FRAME: Rgb<u8> = Rgb([200, 200, 200]);
/// Series colours (matplotlib's first six "tab" colours); they repeat after six series.
pub const COLORS: [[u8; 3]; 6] = [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189], [140, 86, 75]];

/// Draws each panel's series against a common x axis, one panel under the other (each with
/// its own y range), and writes the PNG to `path` atomically: the image goes to `path.tmp`
/// first and is renamed over `path`, so a reader never sees a half-written plot while
/// training rewrites it.
///
/// Non-finite points (and values beyond ±1e300, whose ranges would overflow) are skipped;
/// a series with a single point is drawn as a marker; a panel without data says so. With no
/// panels at all the image holds the title and one empty panel. More than 64 panels are
/// refused as `Error::Image`.
pub fn line_plot_png(path: &Path, title: &str, x_label: &str, panels: &[Vec<Series>]) -> Result<()> {
    if panels.len() > MAX_PANELS {
        return Err(Error::Image(format!("{}: {} panels requested, at most {MAX_PANELS} are drawn", path.display(), panels.len())));
    }
    let img = render(title, x_label, panels);
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgb8)
        .map_err(|e| Error::Image(format!("{}: {e}", path.display())))?;

    super::write_atomic(path, &png)
}

fn usable(v: f64) -> bool {
    v.is_finite() && v.abs() < 1e300
}

fn usable_points(series: &Series) -> impl Iterator<Item = (f64, f64)> + '_ {
    series.points.iter().copied().filter(|&(x, y)| usable(x) && usable(y))
}

/// Data range widened so that constant data and lone points get a visible, centred range.
fn range(values: impl Iterator<Item = f64>, pad_fraction: f64) -> Option<(f64, f64)> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return None;
    }
    // Differences at the level of float rounding are noise, not a range worth zooming into
    // (ticks 1e-16 apart would all print the same).
    if hi - lo <= lo.abs().max(hi.abs()) * 1e-9 {
        let mid = lo + (hi - lo) / 2.0;
        let pad = if mid == 0.0 { 1.0 } else { mid.abs() * 0.1 };
        return Some((mid - pad, mid + pad));
    }
    let pad = (hi - lo) * pad_fraction;
    Some((lo - pad, hi + pad))
}

/// "Nice" tick positions (1, 2 or 5 × 10^k apart) inside `[lo, hi]`, and their spacing.
fn ticks(lo: f64, hi: f64) -> (Vec<f64>, f64) {
    let raw = (hi - lo) / 5.0;
    if !(raw.is_finite() && raw > 0.0) {
        return (vec![lo, hi], hi - lo);
    }
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = magnitude
        * match raw / magnitude {
            n if n < 1.5 => 1.0,
            n if n < 3.0 => 2.0,
            n if n < 7.0 => 5.0,
            _ => 10.0,
        };
    // The slack keeps an end tick that rounding puts a hair outside the range (3e-4 / 5e-5
    // is 5.999…); it is drawn on the edge pixel.
    let first = (lo / step - 1e-9).ceil();
    let last = (hi / step + 1e-9).floor();
    if !(first.is_finite() && last.is_finite()) || last - first > 50.0 {
        return (vec![lo, hi], hi - lo);
    }
    // Multiples of the step rather than repeated addition, so 0 is exactly 0.
    let ticks = (0..=(last - first) as i64).map(|k| (first + k as f64) * step).collect();
    (ticks, step)
}

/// Labels for one axis, all in one notation: fixed point with just enough decimals to tell
/// neighbouring ticks apart while that stays short, otherwise whichever of fixed and
/// scientific notation is narrower (1.5e7 rather than 15000000, 2.5e-4 rather than 0.00025,
/// but 1.000001 rather than 1.000001e0).
fn tick_labels(ticks: &[f64], step: f64) -> Vec<String> {
    let step = if step > 0.0 && step.is_finite() { step } else { 1.0 };
    let magnitude = ticks.iter().fold(0.0f64, |m, t| m.max(t.abs()));
    let step_exp = step.log10().floor();
    let fixed_decimals = (-step_exp).clamp(0.0, 12.0) as usize;
    let sci_decimals = if magnitude > 0.0 { (magnitude.log10().floor() - step_exp).clamp(0.0, 12.0) as usize } else { 0 };
    let format = |v: f64, sci: bool| {
        if v == 0.0 {
            "0".to_string()
        } else if sci {
            format!("{v:.sci_decimals$e}")
        } else {
            format!("{v:.fixed_decimals$}")
        }
    };
    let fixed: Vec<String> = ticks.iter().map(|&t| format(t, false)).collect();
    let widest = |labels: &[String]| labels.iter().map(|l| l.len()).max().unwrap_or(0);
    if widest(&fixed) <= 6 {
        return fixed;
    }
    let sci: Vec<String> = ticks.iter().map(|&t| format(t, true)).collect();
    if widest(&sci) < widest(&fixed) {
        sci
    } else {
        fixed
    }
}

struct Rect {
    left: i64,
    top: i64,
    right: i64,
    bottom: i64,
}

impl Rect {
    fn x(&self, v: f64, (lo, hi): (f64, f64)) -> i64 {
        (self.left as f64 + (v - lo) / (hi - lo) * (self.right - self.left) as f64).round() as i64
    }

    fn y(&self, v: f64, (lo, hi): (f64, f64)) -> i64 {
        (self.bottom as f64 - (v - lo) / (hi - lo) * (self.bottom - self.top) as f64).round() as i64
    }
}

fn render(title: &str, x_label: &str, panels: &[Vec<Series>]) -> RgbImage {
    let drawn = panels.len().max(1);
    let height = HEADER + FOOTER + PANEL_HEIGHT * drawn as u32;
    let mut img = RgbImage::from_pixel(WIDTH, height, WHITE);

    let x_range = range(panels.iter().flatten().flat_map(usable_points).map(|(x, _)| x), 0.0).unwrap_or((0.0, 1.0));

    let max_chars = (WIDTH as usize - 20) / (6 * TEXT_SCALE as usize);
    let title = truncate(title, max_chars);
    draw_text(&mut img, (WIDTH as i64 - text_width(&title)) / 2, 11, TEXT, &title);
    let x_label = truncate(x_label, max_chars);
    draw_text(&mut img, (WIDTH as i64 - text_width(&x_label)) / 2, height as i64 - FOOTER as i64 + 12, TEXT, &x_label);

    let empty = Vec::new();
    for p in 0..drawn {
        let series = panels.get(p).unwrap_or(&empty);
        let top = (HEADER + PANEL_HEIGHT * p as u32) as i64;
        let rect =
            Rect { left: MARGIN_LEFT, top: top + MARGIN_TOP, right: WIDTH as i64 - MARGIN_RIGHT, bottom: top + PANEL_HEIGHT as i64 - MARGIN_BOTTOM };
        draw_panel(&mut img, &rect, x_range, series);
    }
    img
}

fn draw_panel(img: &mut RgbImage, rect: &Rect, x_range: (f64, f64), series: &[Series]) {
    let y_data = range(series.iter().flat_map(usable_points).map(|(_, y)| y), 0.05);
    let y_range = y_data.unwrap_or((0.0, 1.0));

    let (x_ticks, x_step) = ticks(x_range.0, x_range.1);
    let mut last_label_end = i64::MIN;
    for (&t, label) in x_ticks.iter().zip(tick_labels(&x_ticks, x_step)) {
        let px = rect.x(t, x_range);
        vline(img, px, rect.top, rect.bottom, GRID);
        let w = text_width(&label);
        let start = px - w / 2;
        // Wide labels on a narrow spacing would overlap; drop the ones that would.
        if start > last_label_end + 6 {
            draw_text(img, start, rect.bottom + 8, TEXT, &label);
            last_label_end = start + w;
        }
    }
    let (y_ticks, y_step) = ticks(y_range.0, y_range.1);
    for (&t, label) in y_ticks.iter().zip(tick_labels(&y_ticks, y_step)) {
        let py = rect.y(t, y_range);
        hline(img, rect.left, rect.right, py, GRID);
        draw_text(img, rect.left - 8 - text_width(&label), py - 7, TEXT, &label);
    }
    hline(img, rect.left, rect.right, rect.bottom, AXIS);
    vline(img, rect.left, rect.top, rect.bottom, AXIS);
    hline(img, rect.left, rect.right, rect.top, GRID);
    vline(img, rect.right, rect.top, rect.bottom, GRID);

    if y_data.is_none() {
        let msg = "no data";
        draw_text(img, (rect.left + rect.right - text_width(msg)) / 2, (rect.top + rect.bottom) / 2 - 7, AXIS, msg);
    }

    for (i, s) in series.iter().enumerate() {
        let color = Rgb(COLORS[i % COLORS.len()]);
        let pixels: Vec<(i64, i64)> = usable_points(s).map(|(x, y)| (rect.x(x, x_range), rect.y(y, y_range))).collect();
        match pixels.as_slice() {
            [] => {}
            [(x, y)] => fill(img, x - 3, y - 3, 7, 7, color),
            _ => {
                for pair in pixels.windows(2) {
                    line(img, pair[0], pair[1], color);
                }
            }
        }
    }

    draw_legend(img, rect, series);
}

/// Top-right box listing each series with its colour; drawn last so that it stays readable
/// over the curves.
fn draw_legend(img: &mut RgbImage, rect: &Rect, series: &[Series]) {
    if series.is_empty() {
        return;
    }
    let row = 18;
    // A legend taller than the panel would spill into the next one; the rest is summarised.
    let max_rows = ((rect.bottom - rect.top - 24) / row).max(1) as usize;
    let shown = if series.len() > max_rows { max_rows - 1 } else { series.len() };
    let mut names: Vec<String> = series[..shown].iter().map(|s| truncate(&s.name, MAX_LEGEND_CHARS)).collect();
    if shown < series.len() {
        names.push(format!("... {} more", series.len() - shown));
    }
    let text_w = names.iter().map(|n| text_width(n)).max().unwrap_or(0);
    let width = 10 + 20 + 8 + text_w + 10;
    let height = 8 + row * names.len() as i64 + 4;
    let left = rect.right - 8 - width;
    let top = rect.top + 8;
    fill(img, left, top, width, height, WHITE);
    hline(img, left, left + width, top, LEGEND_FRAME);
    hline(img, left, left + width, top + height, LEGEND_FRAME);
    vline(img, left, top, top + height, LEGEND_FRAME);
    vline(img, left + width, top, top + height, LEGEND_FRAME);
    for (i, name) in names.iter().enumerate() {
        let y = top + 8 + row * i as i64;
        if i < shown {
            fill(img, left + 10, y + 5, 20, 4, Rgb(COLORS[i % COLORS.len()]));
        }
        draw_text(img, left + 38, y, TEXT, name);
    }
}

fn truncate(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        return text.to_string();
    }
    let mut out: String = text.chars().take(max_chars.saturating_sub(3)).collect();
    out.push_str("...");
    out
}

fn put(img: &mut RgbImage, x: i64, y: i64, color: Rgb<u8>) {
    if x >= 0 && y >= 0 && x < img.width() as i64 && y < img.height() as i64 {
        img.put_pixel(x as u32, y as u32, color);
    }
}

fn fill(img: &mut RgbImage, x: i64, y: i64, w: i64, h: i64, color: Rgb<u8>) {
    for yy in y..y + h {
        for xx in x..x + w {
            put(img, xx, yy, color);
        }
    }
}

fn hline(img: &mut RgbImage, x0: i64, x1: i64, y: i64, color: Rgb<u8>) {
    fill(img, x0, y, x1 - x0 + 1, 1, color);
}

fn vline(img: &mut RgbImage, x: i64, y0: i64, y1: i64, color: Rgb<u8>) {
    fill(img, x, y0, 1, y1 - y0 + 1, color);
}

/// Bresenham with a 2×2 pen: one-pixel lines are hard to see at 900 px.
fn line(img: &mut RgbImage, (x0, y0): (i64, i64), (x1, y1): (i64, i64), color: Rgb<u8>) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let (mut x, mut y, mut err) = (x0, y0, dx + dy);
    loop {
        fill(img, x, y, 2, 2, color);
        if x == x1 && y == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

fn text_width(text: &str) -> i64 {
    let n = text.chars().count() as i64;
    if n == 0 {
        0
    } else {
        n * 6 * TEXT_SCALE - TEXT_SCALE
    }
}

fn draw_text(img: &mut RgbImage, x: i64, y: i64, color: Rgb<u8>, text: &str) {
    for (i, c) in text.chars().enumerate() {
        let code = c as u32;
        // Characters outside printable ASCII have no glyph; '?' marks them.
        let glyph = if (32..127).contains(&code) { &FONT[(code - 32) as usize] } else { &FONT[('?' as u32 - 32) as usize] };
        let gx = x + i as i64 * 6 * TEXT_SCALE;
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..5 {
                if bits & (0b10000 >> col) != 0 {
                    fill(img, gx + col * TEXT_SCALE, y + row as i64 * TEXT_SCALE, TEXT_SCALE, TEXT_SCALE, color);
                }
            }
        }
    }
}

/// 5×7 bitmap glyphs for printable ASCII (' ' to '~'), one row per byte, bit 4 leftmost,
/// plus an eighth row for the descenders of g, j, p, q, y and the comma.
#[rustfmt::skip]
const FONT: [[u8; 8]; 95] = [
    [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000], // ' '
    [0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00000, 0b00100, 0b00000], // '!'
    [0b01010, 0b01010, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000], // '"'
    [0b01010, 0b01010, 0b11111, 0b01010, 0b11111, 0b01010, 0b01010, 0b00000], // '#'
    [0b00100, 0b01111, 0b10100, 0b01110, 0b00101, 0b11110, 0b00100, 0b00000], // '$'
    [0b11000, 0b11001, 0b00010, 0b00100, 0b01000, 0b10011, 0b00011, 0b00000], // '%'
    [0b01100, 0b10010, 0b10100, 0b01000, 0b10101, 0b10010, 0b01101, 0b00000], // '&'
    [0b00100, 0b00100, 0b01000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000], // '\''
    [0b00010, 0b00100, 0b01000, 0b01000, 0b01000, 0b00100, 0b00010, 0b00000], // '('
    [0b01000, 0b00100, 0b00010, 0b00010, 0b00010, 0b00100, 0b01000, 0b00000], // ')'
    [0b00000, 0b00100, 0b10101, 0b01110, 0b10101, 0b00100, 0b00000, 0b00000], // '*'
    [0b00000, 0b00100, 0b00100, 0b11111, 0b00100, 0b00100, 0b00000, 0b00000], // '+'
    [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b01100, 0b00100, 0b01000], // ','
    [0b00000, 0b00000, 0b00000, 0b11111, 0b00000, 0b00000, 0b00000, 0b00000], // '-'
    [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b01100, 0b01100, 0b00000], // '.'
    [0b00000, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0b00000, 0b00000], // '/'
    [0b01110, 0b10001, 0b10011, 0b10101, 0b11001, 0b10001, 0b01110, 0b00000], // '0'
    [0b00100, 0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110, 0b00000], // '1'
    [0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b01000, 0b11111, 0b00000], // '2'
    [0b11111, 0b00010, 0b00100, 0b00010, 0b00001, 0b10001, 0b01110, 0b00000], // '3'
    [0b00010, 0b00110, 0b01010, 0b10010, 0b11111, 0b00010, 0b00010, 0b00000], // '4'
    [0b11111, 0b10000, 0b11110, 0b00001, 0b00001, 0b10001, 0b01110, 0b00000], // '5'
    [0b00110, 0b01000, 0b10000, 0b11110, 0b10001, 0b10001, 0b01110, 0b00000], // '6'
    [0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b01000, 0b01000, 0b00000], // '7'
    [0b01110, 0b10001, 0b10001, 0b01110, 0b10001, 0b10001, 0b01110, 0b00000], // '8'
    [0b01110, 0b10001, 0b10001, 0b01111, 0b00001, 0b00010, 0b01100, 0b00000], // '9'
    [0b00000, 0b01100, 0b01100, 0b00000, 0b01100, 0b01100, 0b00000, 0b00000], // ':'
    [0b00000, 0b01100, 0b01100, 0b00000, 0b00000, 0b01100, 0b00100, 0b01000], // ';'
    [0b00010, 0b00100, 0b01000, 0b10000, 0b01000, 0b00100, 0b00010, 0b00000], // '<'
    [0b00000, 0b00000, 0b11111, 0b00000, 0b11111, 0b00000, 0b00000, 0b00000], // '='
    [0b01000, 0b00100, 0b00010, 0b00001, 0b00010, 0b00100, 0b01000, 0b00000], // '>'
    [0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b00000, 0b00100, 0b00000], // '?'
    [0b01110, 0b10001, 0b00001, 0b01101, 0b10101, 0b10101, 0b01110, 0b00000], // '@'
    [0b01110, 0b10001, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b00000], // 'A'
    [0b11110, 0b10001, 0b10001, 0b11110, 0b10001, 0b10001, 0b11110, 0b00000], // 'B'
    [0b01110, 0b10001, 0b10000, 0b10000, 0b10000, 0b10001, 0b01110, 0b00000], // 'C'
    [0b11100, 0b10010, 0b10001, 0b10001, 0b10001, 0b10010, 0b11100, 0b00000], // 'D'
    [0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b11111, 0b00000], // 'E'
    [0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b10000, 0b00000], // 'F'
    [0b01110, 0b10001, 0b10000, 0b10111, 0b10001, 0b10001, 0b01111, 0b00000], // 'G'
    [0b10001, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001, 0b00000], // 'H'
    [0b01110, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110, 0b00000], // 'I'
    [0b00111, 0b00010, 0b00010, 0b00010, 0b00010, 0b10010, 0b01100, 0b00000], // 'J'
    [0b10001, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010, 0b10001, 0b00000], // 'K'
    [0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b11111, 0b00000], // 'L'
    [0b10001, 0b11011, 0b10101, 0b10101, 0b10001, 0b10001, 0b10001, 0b00000], // 'M'
    [0b10001, 0b10001, 0b11001, 0b10101, 0b10011, 0b10001, 0b10001, 0b00000], // 'N'
    [0b01110, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110, 0b00000], // 'O'
    [0b11110, 0b10001, 0b10001, 0b11110, 0b10000, 0b10000, 0b10000, 0b00000], // 'P'
    [0b01110, 0b10001, 0b10001, 0b10001, 0b10101, 0b10010, 0b01101, 0b00000], // 'Q'
    [0b11110, 0b10001, 0b10001, 0b11110, 0b10100, 0b10010, 0b10001, 0b00000], // 'R'
    [0b01111, 0b10000, 0b10000, 0b01110, 0b00001, 0b00001, 0b11110, 0b00000], // 'S'
    [0b11111, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00000], // 'T'
    [0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110, 0b00000], // 'U'
    [0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100, 0b00000], // 'V'
    [0b10001, 0b10001, 0b10001, 0b10101, 0b10101, 0b10101, 0b01010, 0b00000], // 'W'
    [0b10001, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001, 0b10001, 0b00000], // 'X'
    [0b10001, 0b10001, 0b01010, 0b00100, 0b00100, 0b00100, 0b00100, 0b00000], // 'Y'
    [0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0b11111, 0b00000], // 'Z'
    [0b01110, 0b01000, 0b01000, 0b01000, 0b01000, 0b01000, 0b01110, 0b00000], // '['
    [0b00000, 0b10000, 0b01000, 0b00100, 0b00010, 0b00001, 0b00000, 0b00000], // '\\'
    [0b01110, 0b00010, 0b00010, 0b00010, 0b00010, 0b00010, 0b01110, 0b00000], // ']'
    [0b00100, 0b01010, 0b10001, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000], // '^'
    [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b11111, 0b00000], // '_'
    [0b01000, 0b00100, 0b00010, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000], // '`'
    [0b00000, 0b00000, 0b01110, 0b00001, 0b01111, 0b10001, 0b01111, 0b00000], // 'a'
    [0b10000, 0b10000, 0b10110, 0b11001, 0b10001, 0b10001, 0b11110, 0b00000], // 'b'
    [0b00000, 0b00000, 0b01110, 0b10000, 0b10000, 0b10001, 0b01110, 0b00000], // 'c'
    [0b00001, 0b00001, 0b01101, 0b10011, 0b10001, 0b10001, 0b01111, 0b00000], // 'd'
    [0b00000, 0b00000, 0b01110, 0b10001, 0b11111, 0b10000, 0b01110, 0b00000], // 'e'
    [0b00110, 0b01001, 0b01000, 0b11100, 0b01000, 0b01000, 0b01000, 0b00000], // 'f'
    [0b00000, 0b00000, 0b01111, 0b10001, 0b10001, 0b01111, 0b00001, 0b01110], // 'g'
    [0b10000, 0b10000, 0b10110, 0b11001, 0b10001, 0b10001, 0b10001, 0b00000], // 'h'
    [0b00100, 0b00000, 0b01100, 0b00100, 0b00100, 0b00100, 0b01110, 0b00000], // 'i'
    [0b00010, 0b00000, 0b00110, 0b00010, 0b00010, 0b00010, 0b10010, 0b01100], // 'j'
    [0b10000, 0b10000, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010, 0b00000], // 'k'
    [0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110, 0b00000], // 'l'
    [0b00000, 0b00000, 0b11010, 0b10101, 0b10101, 0b10001, 0b10001, 0b00000], // 'm'
    [0b00000, 0b00000, 0b10110, 0b11001, 0b10001, 0b10001, 0b10001, 0b00000], // 'n'
    [0b00000, 0b00000, 0b01110, 0b10001, 0b10001, 0b10001, 0b01110, 0b00000], // 'o'
    [0b00000, 0b00000, 0b11110, 0b10001, 0b10001, 0b11110, 0b10000, 0b10000], // 'p'
    [0b00000, 0b00000, 0b01111, 0b10001, 0b10001, 0b01111, 0b00001, 0b00001], // 'q'
    [0b00000, 0b00000, 0b10110, 0b11001, 0b10000, 0b10000, 0b10000, 0b00000], // 'r'
    [0b00000, 0b00000, 0b01110, 0b10000, 0b01110, 0b00001, 0b11110, 0b00000], // 's'
    [0b01000, 0b01000, 0b11100, 0b01000, 0b01000, 0b01001, 0b00110, 0b00000], // 't'
    [0b00000, 0b00000, 0b10001, 0b10001, 0b10001, 0b10011, 0b01101, 0b00000], // 'u'
    [0b00000, 0b00000, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100, 0b00000], // 'v'
    [0b00000, 0b00000, 0b10001, 0b10001, 0b10101, 0b10101, 0b01010, 0b00000], // 'w'
    [0b00000, 0b00000, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001, 0b00000], // 'x'
    [0b00000, 0b00000, 0b10001, 0b10001, 0b10001, 0b01111, 0b00001, 0b01110], // 'y'
    [0b00000, 0b00000, 0b11111, 0b00010, 0b00100, 0b01000, 0b11111, 0b00000], // 'z'
    [0b00010, 0b00100, 0b00100, 0b01000, 0b00100, 0b00100, 0b00010, 0b00000], // '{'
    [0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00000], // '|'
    [0b01000, 0b00100, 0b00100, 0b00010, 0b00100, 0b00100, 0b01000, 0b00000], // '}'
    [0b00000, 0b00000, 0b01000, 0b10101, 0b00010, 0b00000, 0b00000, 0b00000], // '~'
];

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::path::PathBuf;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("wasmcap-plot-{}-{name}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn series(name: &str, points: Vec<(f64, f64)>) -> Series {
        Series { name: name.to_string(), points }
    }

    fn count_color(img: &RgbImage, color: [u8; 3]) -> usize {
        img.pixels().filter(|p| p.0 == color).count()
    }

    #[test]
    fn writes_a_png_with_every_series_colour() {
        let dir = temp_dir("colours");
        let path = dir.join("curves.png");
        let loss: Vec<(f64, f64)> = (0..200).map(|i| (i as f64, 3.0 / (1.0 + i as f64 / 20.0))).collect();
        let val: Vec<(f64, f64)> = (0..10).map(|i| (i as f64 * 20.0, 2.5 / (1.0 + i as f64))).collect();
        let bleu: Vec<(f64, f64)> = (0..10).map(|i| (i as f64 * 20.0, 0.02 * i as f64)).collect();
        let cider: Vec<(f64, f64)> = (0..10).map(|i| (i as f64 * 20.0, 0.3 - 0.03 * i as f64)).collect();
        let panels = vec![vec![series("train loss", loss), series("val loss", val)], vec![series("BLEU-4", bleu), series("CIDEr-D", cider)]];
        line_plot_png(&path, "training", "step", &panels).unwrap();

        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (WIDTH, HEADER + FOOTER + 2 * PANEL_HEIGHT));
        // Well above the 80 pixels of a legend swatch: the curves themselves were drawn.
        for color in &COLORS[..2] {
            assert!(count_color(&img, *color) > 400, "colour {color:?}");
        }
        assert!(count_color(&img, TEXT.0) > 100, "no text drawn");
        assert!(!dir.join("curves.png.tmp").exists());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rewrites_an_existing_plot() {
        let dir = temp_dir("rewrite");
        let path = dir.join("p.png");
        line_plot_png(&path, "a", "x", &[vec![series("s", vec![(0.0, 1.0), (1.0, 2.0)])]]).unwrap();
        line_plot_png(&path, "b", "x", &[vec![], vec![]]).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.height(), HEADER + FOOTER + 2 * PANEL_HEIGHT);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn degenerate_input_does_not_panic() {
        let dir = temp_dir("degenerate");
        let path = dir.join("empty.png");
        line_plot_png(&path, "", "", &[]).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (WIDTH, HEADER + FOOTER + PANEL_HEIGHT));

        let panels = vec![
            vec![],
            vec![series("empty", vec![])],
            vec![series("not finite", vec![(f64::NAN, 1.0), (1.0, f64::INFINITY), (2.0, f64::NEG_INFINITY), (3.0, 1e308)])],
            vec![series("one point", vec![(5.0, 0.25)])],
            vec![series("constant", vec![(0.0, 7.0), (10.0, 7.0), (f64::NAN, f64::NAN), (20.0, 7.0)])],
            vec![series("zero", vec![(0.0, 0.0), (0.0, 0.0)])],
            vec![series("huge span", vec![(-1e299, -1e299), (1e299, 1e299)])],
            vec![series("tiny span", vec![(0.0, 1.0), (1.0, 1.0 + 1e-15)])],
            (0..9).map(|k| series(&"x".repeat(100 * k), vec![(k as f64, k as f64)])).collect(),
            (0..40).map(|k| series(&format!("s{k}"), vec![(0.0, k as f64), (1.0, -(k as f64))])).collect(),
        ];
        let title = "ünïcode ±∞ and a very long title ".repeat(10);
        line_plot_png(&path, &title, "step", &panels).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.height(), HEADER + FOOTER + panels.len() as u32 * PANEL_HEIGHT);
        // The lone point is a 7×7 marker in the first colour (plus the legend swatches).
        assert!(count_color(&img, COLORS[0]) >= 49);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn errors_instead_of_panicking() {
        let dir = temp_dir("errors");
        let missing = dir.join("no-such-dir").join("p.png");
        let err = line_plot_png(&missing, "t", "x", &[]).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");

        let too_many = vec![Vec::new(); MAX_PANELS + 1];
        let err = line_plot_png(&dir.join("p.png"), "t", "x", &too_many).unwrap_err();
        assert!(matches!(err, Error::Image(_)), "{err}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn tick_positions_and_labels() {
        let (t, step) = ticks(0.0, 1.0);
        assert_eq!(step, 0.2);
        assert_eq!(tick_labels(&t, step), ["0", "0.2", "0.4", "0.6", "0.8", "1.0"]);

        let (t, step) = ticks(-5.3, 9.7);
        assert_eq!(tick_labels(&t, step), ["-5", "0", "5"]);

        let (t, step) = ticks(1.0e6, 1.6e7);
        assert_eq!(tick_labels(&t, step), ["5.0e6", "1.0e7", "1.5e7"]);

        let (t, step) = ticks(0.0, 3.0e-4);
        assert_eq!(tick_labels(&t, step), ["0", "5.0e-5", "1.0e-4", "1.5e-4", "2.0e-4", "2.5e-4", "3.0e-4"]);

        let (t, step) = ticks(1.0, 1.000005);
        assert_eq!(tick_labels(&t, step)[1], "1.000001");

        assert_eq!(ticks(1.0, 1.0).0, [1.0, 1.0]);
    }

    #[test]
    fn font_glyphs_fit_five_columns_and_digits_differ() {
        assert!(FONT.iter().flatten().all(|row| row & !0b11111 == 0));
        let digits = &FONT[('0' as usize - 32)..=('9' as usize - 32)];
        for (i, a) in digits.iter().enumerate() {
            for b in &digits[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(FONT[0], [0; 8], "space must be blank");
    }
}
