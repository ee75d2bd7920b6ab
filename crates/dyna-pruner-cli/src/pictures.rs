//! Pictures of what a dynamic model skips, and the HTML page that shows them (`demo`): per
//! chosen test window the last input frame, the importance map S, the DataMask (kept patches
//! outlined over the input), the prediction, the truth and the error, per forecast frame, with
//! colour bars in physical units; over the whole test range, the spread of the kept fractions
//! and the kept fraction against the sample's signal. Panels are composed as RGB pixels; text
//! is drawn with plotters in the shipped font; files are PNG.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

/// DejaVu Sans (Bitstream Vera licence, see assets/DEJAVU-LICENSE).
pub const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Makes the shipped font plotters' "sans-serif" (idempotent).
pub fn register_font() {
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
}

/// The smallest and largest of `values` (infinite and negative infinite when there are none).
pub fn extent(values: impl IntoIterator<Item = f64>) -> (f64, f64) {
    values.into_iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)))
}

/// How a field is coloured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Palette {
    /// Perceptually ordered, dark to bright (viridis-like): flows, counts.
    Sequential,
    /// Blue below zero, white at zero, red above: errors, anomalies.
    Diverging,
    /// Stepped colours at SEVIR's VIL thresholds (0-255 scale).
    Radar,
}

/// SEVIR's VIL thresholds (the CSI levels), marked on the radar colour bar.
pub const VIL_THRESHOLDS: [f32; 6] = [16.0, 74.0, 133.0, 160.0, 181.0, 219.0];

const VIRIDIS: [[u8; 3]; 6] =
    [[68, 1, 84], [65, 68, 135], [42, 120, 142], [34, 168, 132], [122, 209, 81], [253, 231, 37]];
const RADAR: [[u8; 3]; 7] =
    [[255, 255, 255], [0, 160, 255], [0, 200, 60], [255, 230, 0], [255, 140, 0], [230, 0, 0], [160, 0, 200]];

impl Palette {
    /// The colour of `v` on a bar from `lo` to `hi` (radar: VIL, whatever the bar).
    pub fn colour(self, v: f32, lo: f32, hi: f32) -> [u8; 3] {
        let t = if hi > lo { ((v - lo) / (hi - lo)).clamp(0.0, 1.0) } else { 0.5 };
        match self {
            Palette::Sequential => ramp(&VIRIDIS, t),
            Palette::Diverging => {
                let (a, b) = if t < 0.5 { ([33, 102, 172], 1.0 - 2.0 * t) } else { ([178, 24, 43], 2.0 * t - 1.0) };
                let mix = |c: u8| (255.0 + (f32::from(c) - 255.0) * b).round() as u8;
                [mix(a[0]), mix(a[1]), mix(a[2])]
            }
            Palette::Radar => RADAR[VIL_THRESHOLDS.iter().filter(|&&th| v >= th).count()],
        }
    }
}

fn ramp(stops: &[[u8; 3]], t: f32) -> [u8; 3] {
    let x = t * (stops.len() - 1) as f32;
    let i = (x.floor() as usize).min(stops.len() - 2);
    let f = x - i as f32;
    let mix = |a: u8, b: u8| (f32::from(a) + (f32::from(b) - f32::from(a)) * f).round() as u8;
    [mix(stops[i][0], stops[i + 1][0]), mix(stops[i][1], stops[i + 1][1]), mix(stops[i][2], stops[i + 1][2])]
}

/// An RGB picture.
#[derive(Debug, Clone)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

impl Image {
    pub fn new(width: usize, height: usize) -> Image {
        Image { width, height, rgb: vec![255; width * height * 3] }
    }

    #[cfg(test)]
    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.width + x) * 3;
        [self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]]
    }

    fn set(&mut self, x: usize, y: usize, c: [u8; 3]) {
        let i = (y * self.width + x) * 3;
        self.rgb[i..i + 3].copy_from_slice(&c);
    }

    /// Copies `other` with its top left corner at `(x, y)`.
    fn blit(&mut self, other: &Image, x: usize, y: usize) {
        for row in 0..other.height {
            let src = &other.rgb[row * other.width * 3..(row + 1) * other.width * 3];
            let at = ((y + row) * self.width + x) * 3;
            self.rgb[at..at + src.len()].copy_from_slice(src);
        }
    }

    /// Writes the picture, drawing `texts` (`(text, x, y, size)`) over it first.
    pub fn save(mut self, path: &Path, texts: &[(String, i32, i32, u32)]) -> anyhow::Result<()> {
        register_font();
        {
            let size = (self.width as u32, self.height as u32);
            let backend = BitMapBackend::with_buffer(&mut self.rgb, size).into_drawing_area();
            for (text, x, y, px) in texts {
                backend
                    .draw_text(text, &("sans-serif", *px).into_font().color(&BLACK), (*x, *y))
                    .map_err(|e| anyhow::anyhow!("drawing text on {}: {e}", path.display()))?;
            }
            backend.present().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        }
        let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), self.width as u32, self.height as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().with_context(|| format!("writing {}", path.display()))?;
        writer.write_image_data(&self.rgb).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }
}

/// The size of a field's panel: each cell drawn as `scale x scale` pixels, or every `step`-th
/// cell of a field larger than the panel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Grid {
    pub height: usize,
    pub width: usize,
    pub scale: usize,
    pub step: usize,
}

impl Grid {
    /// Panels of at most about `side` pixels.
    pub fn fit(height: usize, width: usize, side: usize) -> Grid {
        let longest = height.max(width).max(1);
        Grid { height, width, scale: (side / longest).max(1), step: longest.div_ceil(side).max(1) }
    }

    pub fn pixels(&self) -> (usize, usize) {
        (self.width.div_ceil(self.step) * self.scale, self.height.div_ceil(self.step) * self.scale)
    }

    /// The field cell `(row, column)` shown at panel pixel `(x, y)`.
    fn cell(&self, x: usize, y: usize) -> (usize, usize) {
        ((y / self.scale) * self.step, (x / self.scale) * self.step)
    }
}

/// A field `[height, width]` coloured on `palette` from `lo` to `hi`.
pub fn field_panel(values: &[f32], grid: Grid, palette: Palette, (lo, hi): (f32, f32)) -> Image {
    let (w, h) = grid.pixels();
    let mut img = Image::new(w, h);
    for y in 0..h {
        for x in 0..w {
            let (r, c) = grid.cell(x, y);
            let v = values[r * grid.width + c];
            img.set(x, y, if v.is_finite() { palette.colour(v, lo, hi) } else { [200, 200, 200] });
        }
    }
    img
}

/// The outline colour of a kept patch.
pub const KEPT: [u8; 3] = [255, 0, 160];

/// The input in grey with each kept patch (`kept[py * wp + px]`, patches of `patch` cells)
/// outlined by a one-pixel border inside it.
pub fn mask_panel(values: &[f32], grid: Grid, (lo, hi): (f32, f32), kept: &[bool], patch: usize) -> Image {
    let mut img = field_panel(values, grid, Palette::Sequential, (lo, hi));
    for px in img.rgb.chunks_mut(3) {
        let grey = ((u32::from(px[0]) * 3 + u32::from(px[1]) * 6 + u32::from(px[2])) / 10) as u8;
        px.copy_from_slice(&[grey / 2 + 100; 3]);
    }
    let (hp, wp) = (grid.height.div_ceil(patch), grid.width.div_ceil(patch));
    // Field cells [a, b) of one axis -> pixels [first, last).
    let span = |a: usize, b: usize| (a.div_ceil(grid.step) * grid.scale, b.div_ceil(grid.step) * grid.scale);
    for py in 0..hp {
        for px in 0..wp {
            if !kept[py * wp + px] {
                continue;
            }
            let (x0, x1) = span(px * patch, ((px + 1) * patch).min(grid.width));
            let (y0, y1) = span(py * patch, ((py + 1) * patch).min(grid.height));
            if x0 == x1 || y0 == y1 {
                continue;
            }
            for x in x0..x1 {
                img.set(x, y0, KEPT);
                img.set(x, y1 - 1, KEPT);
            }
            for y in y0..y1 {
                img.set(x0, y, KEPT);
                img.set(x1 - 1, y, KEPT);
            }
        }
    }
    img
}

/// A horizontal colour bar `width x 12` pixels from `lo` to `hi`, radar thresholds ticked.
fn colour_bar(palette: Palette, (lo, hi): (f32, f32), width: usize) -> Image {
    let mut img = Image::new(width, 12);
    for x in 0..width {
        let v = lo + (hi - lo) * x as f32 / (width - 1).max(1) as f32;
        for y in 0..12 {
            img.set(x, y, palette.colour(v, lo, hi));
        }
    }
    if palette == Palette::Radar {
        for th in VIL_THRESHOLDS.iter().filter(|&&t| t > lo && t < hi) {
            let x = ((th - lo) / (hi - lo) * (width - 1) as f32).round() as usize;
            (0..12).for_each(|y| img.set(x, y, [0, 0, 0]));
        }
    }
    img
}

/// A colour bar's end value with as many decimals as its size needs.
fn short(v: f32) -> String {
    match v.abs() {
        a if a >= 100.0 => format!("{v:.0}"),
        a if a >= 1.0 => format!("{v:.2}"),
        _ => format!("{v:.3}"),
    }
}

/// One column of a window picture: its title, palette, range and unit.
pub struct Column<'a> {
    pub title: &'a str,
    pub palette: Palette,
    pub range: (f32, f32),
    pub unit: &'a str,
    /// One panel per shown forecast frame, top to bottom.
    pub panels: Vec<Image>,
}

/// Lays `columns` out side by side, rows labelled by `row_labels`, a colour bar under each
/// column, and writes the PNG; returns its size.
pub fn save_columns(
    path: &Path,
    title: &str,
    row_labels: &[String],
    columns: &[Column<'_>],
) -> anyhow::Result<(usize, usize)> {
    let (pw, ph) = (columns[0].panels[0].width, columns[0].panels[0].height);
    let (gap, left, top) = (14, 70, 56);
    let col_w = pw.max(150);
    let width = left + columns.len() * (col_w + gap);
    let height = top + row_labels.len() * (ph + gap) + 60;
    let mut img = Image::new(width, height);
    let mut texts = vec![(title.to_string(), 8, 8, 18)];
    for (i, col) in columns.iter().enumerate() {
        let x = left + i * (col_w + gap);
        texts.push((col.title.to_string(), x as i32, (top - 20) as i32, 14));
        for (r, panel) in col.panels.iter().enumerate() {
            img.blit(panel, x, top + r * (ph + gap));
        }
        let y = top + row_labels.len() * (ph + gap);
        img.blit(&colour_bar(col.palette, col.range, col_w), x, y);
        let (lo, hi) = col.range;
        texts.push((format!("{} .. {} {}", short(lo), short(hi), col.unit), x as i32, (y + 16) as i32, 12));
    }
    for (r, label) in row_labels.iter().enumerate() {
        texts.push((label.clone(), 6, (top + r * (ph + gap) + ph / 2) as i32, 13));
    }
    img.save(path, &texts)?;
    Ok((width, height))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mask_panel_outlines_exactly_the_kept_patches() {
        for (h, w, patch, side) in [(16, 8, 2, 128), (33, 49, 4, 200), (10, 10, 4, 10)] {
            let grid = Grid::fit(h, w, side);
            let values: Vec<f32> = (0..h * w).map(|i| (i % 7) as f32).collect();
            let (hp, wp) = (h.div_ceil(patch), w.div_ceil(patch));
            let kept: Vec<bool> = (0..hp * wp).map(|i| i % 3 == 0).collect();
            let img = mask_panel(&values, grid, (0.0, 6.0), &kept, patch);
            let (pw, ph) = grid.pixels();
            assert_eq!((img.width, img.height), (pw, ph));
            for py in 0..hp {
                for px in 0..wp {
                    // The pixel rectangle of the patch.
                    let x0 = (px * patch).div_ceil(grid.step) * grid.scale;
                    let x1 = ((px + 1) * patch).min(w).div_ceil(grid.step) * grid.scale;
                    let y0 = (py * patch).div_ceil(grid.step) * grid.scale;
                    let y1 = ((py + 1) * patch).min(h).div_ceil(grid.step) * grid.scale;
                    for y in y0..y1 {
                        for x in x0..x1 {
                            let border = x == x0 || x + 1 == x1 || y == y0 || y + 1 == y1;
                            let outlined = img.pixel(x, y) == KEPT;
                            assert_eq!(
                                outlined,
                                kept[py * wp + px] && border,
                                "{h}x{w} patch ({py}, {px}) pixel ({x}, {y})"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn palettes_run_from_their_ends() {
        assert_eq!(Palette::Sequential.colour(0.0, 0.0, 1.0), VIRIDIS[0]);
        assert_eq!(Palette::Sequential.colour(1.0, 0.0, 1.0), VIRIDIS[5]);
        assert_eq!(Palette::Diverging.colour(0.0, -1.0, 1.0), [255, 255, 255]);
        assert_eq!(Palette::Radar.colour(10.0, 0.0, 255.0), RADAR[0]);
        assert_eq!(Palette::Radar.colour(74.0, 0.0, 255.0), RADAR[2]);
    }

    #[test]
    fn a_saved_picture_decodes_with_its_size_and_is_not_blank() {
        let grid = Grid::fit(16, 8, 128);
        let values: Vec<f32> = (0..128).map(|i| i as f32).collect();
        let panel = field_panel(&values, grid, Palette::Sequential, (0.0, 127.0));
        let col = |t| Column {
            title: t,
            palette: Palette::Sequential,
            range: (0.0, 127.0),
            unit: "trips",
            panels: vec![panel.clone(); 2],
        };
        let path = std::env::temp_dir().join(format!("dp-pictures-{}.png", std::process::id()));
        let size = save_columns(&path, "test", &["+1 h".into(), "+2 h".into()], &[col("a"), col("b")]).unwrap();
        let decoder = png::Decoder::new(std::fs::File::open(&path).unwrap());
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width as usize, info.height as usize), size);
        let mean = buf.iter().map(|&v| f64::from(v)).sum::<f64>() / buf.len() as f64;
        let var = buf.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / buf.len() as f64;
        assert!(var > 100.0, "variance {var}");
    }
}
