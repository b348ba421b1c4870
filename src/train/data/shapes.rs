//! The built-in synthetic dataset: scenes of coloured shapes, drawn deterministically from a seed.

use super::*;
use crate::rng::{mix64, SplitMix64};

pub(super) const COLOURS: [(&str, [u8; 3]); 4] =
    [("red", [215, 40, 40]), ("green", [40, 165, 60]), ("blue", [45, 85, 215]), ("yellow", [235, 200, 35])];
pub(super) const SHAPES: [&str; 3] = ["circle", "square", "triangle"];
pub(super) const PAIRS: u64 = (COLOURS.len() * SHAPES.len()) as u64;

/// Every word a shapes caption can contain, in a fixed order.
pub fn shapes_vocabulary() -> Vec<&'static str> {
    let mut words = vec!["a", "left", "of", "above"];
    words.extend(COLOURS.iter().map(|(name, _)| *name));
    words.extend(SHAPES.iter());
    words
}

/// Renders scene `index` of the shapes set seeded with `seed` and returns it with its caption.
///
/// The caption depends only on (seed, index), not on `size`, so a scene keeps its caption at
/// every resolution (positions are re-drawn to scale). `size` is not range-checked here: below
/// [`SHAPES_MIN_SIZE`] the shapes are clipped rather than guaranteed to fit, and the image costs
/// `size² × 3` bytes. [`ImageSource::load_rgb`] and [`load_dataset`] check sizes that come from
/// user input.
pub fn shapes_scene(seed: u64, index: u64, size: u32) -> (RgbImage, String) {
    let layout = ShapesLayout::new(seed, index, size);
    (layout.render(), layout.caption())
}

/// A scene's generator: hashing the seed before combining keeps (seed, index) and
/// (seed+1, index-1) apart.
pub(super) fn scene_rng(seed: u64, index: u64) -> SplitMix64 {
    SplitMix64::from_state(mix64(seed ^ 0x243F_6A88_85A3_08D3).wrapping_add(mix64(index)))
}

#[derive(Debug, Clone, Copy)]
pub(super) struct ShapeObj {
    pub(super) colour: usize,
    pub(super) shape: usize,
    pub(super) rgb: [u8; 3],
    /// Top-left corner and side of the bounding box, in pixels.
    pub(super) x: i64,
    pub(super) y: i64,
    pub(super) d: i64,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct ShapesLayout {
    pub(super) size: i64,
    pub(super) vertical: bool,
    pub(super) background: [u8; 3],
    /// `first` is left of (or above) `second`; the caption names it first.
    pub(super) first: ShapeObj,
    pub(super) second: ShapeObj,
}

impl ShapesLayout {
    pub(super) fn new(seed: u64, index: u64, size: u32) -> Self {
        let mut rng = scene_rng(seed, index);
        // Caption-determining draws come first and never depend on `size`.
        let vertical = rng.next_u64() >> 63 == 1;
        let pair_a = rng.below(PAIRS);
        let mut pair_b = rng.below(PAIRS - 1);
        if pair_b >= pair_a {
            pair_b += 1;
        }

        let base = rng.range(228, 250);
        let mut background = [0u8; 3];
        for c in background.iter_mut() {
            *c = (base + rng.range(-5, 5)).clamp(0, 255) as u8;
        }
        let mut tint = |pair: u64| -> [u8; 3] {
            let proto = COLOURS[(pair / SHAPES.len() as u64) as usize % COLOURS.len()].1;
            let mut rgb = [0u8; 3];
            for (out, p) in rgb.iter_mut().zip(proto) {
                *out = (p as i64 + rng.range(-12, 12)).clamp(0, 255) as u8;
            }
            rgb
        };
        let rgb_a = tint(pair_a);
        let rgb_b = tint(pair_b);

        // Sizes are 25-40% of the canvas; margin + gap + both sides stay within it, so shapes
        // never touch the border or each other.
        let s = size as i64;
        let margin = (s / 32).max(1);
        let gap = (s / 16).max(1);
        let d_min = (s * 25 / 100).max(1);
        let d_max = (s * 40 / 100).max(d_min);
        let d_a = rng.range(d_min, d_max);
        let d_b = rng.range(d_min, d_max);
        let free = (s - 2 * margin - gap - d_a - d_b).max(0);
        let before = rng.range(0, free);
        let between = rng.range(0, free - before);
        let main_a = margin + before;
        let main_b = main_a + d_a + gap + between;
        // Cross-axis centres stay within s/8 of each other; with sides of at least s/4 the two
        // shapes always overlap on that axis, so "left of" never also reads as "above".
        let jitter = s / 16;
        let mut cross = |d: i64| -> i64 {
            let start = (s - d) / 2 + rng.range(-jitter, jitter);
            start.clamp(margin, (s - margin - d).max(margin))
        };
        let cross_a = cross(d_a);
        let cross_b = cross(d_b);

        let obj = |pair: u64, rgb: [u8; 3], main: i64, cross: i64, d: i64| {
            let (x, y) = if vertical { (cross, main) } else { (main, cross) };
            ShapeObj { colour: (pair / SHAPES.len() as u64) as usize % COLOURS.len(), shape: (pair % SHAPES.len() as u64) as usize, rgb, x, y, d }
        };
        ShapesLayout {
            size: s,
            vertical,
            background,
            first: obj(pair_a, rgb_a, main_a, cross_a, d_a),
            second: obj(pair_b, rgb_b, main_b, cross_b, d_b),
        }
    }

    pub(super) fn caption(&self) -> String {
        let name = |o: &ShapeObj| format!("{} {}", COLOURS[o.colour].0, SHAPES[o.shape]);
        let relation = if self.vertical { "above" } else { "left of" };
        format!("a {} {relation} a {}", name(&self.first), name(&self.second))
    }

    pub(super) fn render(&self) -> RgbImage {
        let s = self.size.max(0) as u32;
        let mut img = RgbImage::from_pixel(s, s, Rgb(self.background));
        for obj in [&self.first, &self.second] {
            draw_shape(&mut img, obj);
        }
        img
    }
}

/// Pixel-centre tests in doubled integer coordinates: exact on every platform, and a pixel is
/// painted only when its centre is inside the shape.
pub(super) fn draw_shape(img: &mut RgbImage, o: &ShapeObj) {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let (cx2, cy2) = (2 * o.x + o.d, 2 * o.y + o.d);
    for py in o.y.max(0)..(o.y + o.d).min(h) {
        for px in o.x.max(0)..(o.x + o.d).min(w) {
            let (x2, y2) = (2 * px + 1, 2 * py + 1);
            let inside = match o.shape {
                0 => (x2 - cx2).pow(2) + (y2 - cy2).pow(2) <= o.d * o.d,
                1 => true,
                // Upright triangle: apex at the top centre, base along the bottom edge.
                _ => 2 * (x2 - cx2).abs() <= y2 - 2 * o.y,
            };
            if inside {
                img.put_pixel(px as u32, py as u32, Rgb(o.rgb));
            }
        }
    }
}

pub(super) fn load_shapes(split: Split, opts: &DatasetOptions) -> Result<Dataset> {
    check_shapes_size(opts.shapes_size).map_err(|r| Error::config("shapes", r))?;
    let (count, offset) = match split {
        Split::Train => (opts.shapes_train, 0),
        Split::Val => (opts.shapes_val, SHAPES_SPLIT_STRIDE),
        Split::Test => (opts.shapes_test, 2 * SHAPES_SPLIT_STRIDE),
    };
    if count as u64 > SHAPES_SPLIT_STRIDE {
        return Err(Error::config("shapes", format!("{count} {split} samples would overlap the next split; at most {SHAPES_SPLIT_STRIDE}")));
    }
    let samples = (0..count as u64)
        .map(|i| {
            let (seed, index, size) = (opts.shapes_seed, offset + i, opts.shapes_size);
            // Only the layout is needed for the caption; pixels are rendered when loaded.
            let caption = ShapesLayout::new(seed, index, size).caption();
            Sample { image: ImageSource::Shapes { seed, index, size }, captions: vec![caption] }
        })
        .collect();
    Ok(Dataset { name: format!("shapes (seed {}, {}px)", opts.shapes_seed, opts.shapes_size), split, samples, skipped: SkipCounts::default() })
}
