//! Scaled batches of windows as tensors. No-data pixels (NaN, radar only) read as 0 in the
//! inputs and stay NaN in the targets, where the loss and the metrics skip them.

use burn::prelude::*;
use rand::Rng;

use super::{Scaler, WindowSet};

/// NaN (no data) inputs read as 0.
fn fill_missing(values: &mut [f32]) {
    values.iter_mut().filter(|v| v.is_nan()).for_each(|v| *v = 0.0);
}

/// Copies the `crop x crop` square at `(top, left)` of every `[h, w]` plane of `frames` into
/// `out`, transformed by `k` in 0..8: `k % 4` quarter turns, then a mirror when `k >= 4`.
fn crop_planes(
    frames: &[f32],
    (h, w): (usize, usize),
    (top, left, crop): (usize, usize, usize),
    k: usize,
    out: &mut Vec<f32>,
) {
    for plane in frames.chunks(h * w) {
        for y in 0..crop {
            for x in 0..crop {
                let (mut sy, mut sx) = (y, if k >= 4 { crop - 1 - x } else { x });
                for _ in 0..k % 4 {
                    (sy, sx) = (crop - 1 - sx, sy);
                }
                out.push(plane[(top + sy) * w + left + sx]);
            }
        }
    }
}

impl WindowSet {
    /// Inputs and targets of the windows at `indices`, scaled.
    ///
    /// # Shapes
    /// - inputs: `[indices.len(), t_in, channels, height, width]`
    /// - targets: `[indices.len(), t_out, channels, height, width]`
    pub fn batch<B: Backend>(
        &self,
        indices: &[usize],
        scaler: &Scaler,
        device: &B::Device,
    ) -> (Tensor<B, 5>, Tensor<B, 5>) {
        let x = self.scaled_inputs(indices.iter().copied(), scaler);
        let mut y = Vec::new();
        for &i in indices {
            scaler.scale_into(self.target(i), &mut y);
        }
        let n = indices.len();
        let (c, h, w) = (self.channels, self.height, self.width);
        (
            Tensor::from_data(TensorData::new(x, [n, self.t_in, c, h, w]), device),
            Tensor::from_data(TensorData::new(y, [n, self.t_out, c, h, w]), device),
        )
    }

    /// The scaled inputs of `indices`, one window after another (`[n, t_in, channels, h, w]`).
    pub fn scaled_inputs(&self, indices: impl IntoIterator<Item = usize>, scaler: &Scaler) -> Vec<f32> {
        let mut x = Vec::new();
        for i in indices {
            self.scaled_input_into(i, scaler, &mut x);
        }
        x
    }

    /// Appends the scaled inputs of window `i` to `out` as the network reads them: no data (NaN)
    /// as 0.
    pub fn scaled_input_into(&self, i: usize, scaler: &Scaler, out: &mut Vec<f32>) {
        let start = out.len();
        scaler.scale_into(self.input(i), out);
        fill_missing(&mut out[start..]);
    }

    /// Like [`WindowSet::batch`], on a random `crop x crop` square of each window (the same for
    /// all its frames), randomly flipped and rotated when `augment`. A square is drawn up to 10
    /// times until at least half of the last input frame has data.
    ///
    /// # Shapes
    /// - inputs: `[indices.len(), t_in, channels, crop, crop]`
    /// - targets: `[indices.len(), t_out, channels, crop, crop]`
    pub fn batch_crops<B: Backend>(
        &self,
        indices: &[usize],
        (crop, augment): (usize, bool),
        rng: &mut impl Rng,
        scaler: &Scaler,
        device: &B::Device,
    ) -> (Tensor<B, 5>, Tensor<B, 5>) {
        let (h, w) = (self.height, self.width);
        let crop = crop.min(h).min(w);
        let plane = h * w;
        let (mut x, mut y, mut scaled) = (Vec::new(), Vec::new(), Vec::new());
        for &i in indices {
            let input = self.input(i);
            let last = &input[input.len() - self.channels * plane..];
            let mut place = (0, 0);
            for _ in 0..10 {
                place = (rng.random_range(0..=h - crop), rng.random_range(0..=w - crop));
                let valid = (0..crop * crop)
                    .filter(|p| last[(place.0 + p / crop) * w + place.1 + p % crop].is_finite())
                    .count();
                if 2 * valid >= crop * crop {
                    break;
                }
            }
            let k = if augment { rng.random_range(0..8) } else { 0 };
            for (frames, out) in [(input, &mut x), (self.target(i), &mut y)] {
                scaled.clear();
                scaler.scale_into(frames, &mut scaled);
                crop_planes(&scaled, (h, w), (place.0, place.1, crop), k, out);
            }
        }
        fill_missing(&mut x);
        let (n, c) = (indices.len(), self.channels);
        (
            Tensor::from_data(TensorData::new(x, [n, self.t_in, c, crop, crop]), device),
            Tensor::from_data(TensorData::new(y, [n, self.t_out, c, crop, crop]), device),
        )
    }

    /// The scaled persistence forecast of window `i`: its last input frame, `t_out` times.
    pub fn persistence(&self, i: usize, scaler: &Scaler, out: &mut Vec<f32>) {
        let f = self.frame_len();
        let last = &self.input(i)[(self.t_in - 1) * f..];
        for _ in 0..self.t_out {
            scaler.scale_into(last, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_eight_crop_transforms_are_distinct_and_preserve_values() {
        // one 3x3 plane inside a 4x5 frame
        let frame: Vec<f32> = (0..20).map(|v| v as f32).collect();
        let mut seen = Vec::new();
        for k in 0..8 {
            let mut out = Vec::new();
            crop_planes(&frame, (4, 5), (1, 2, 3), k, &mut out);
            let mut sorted = out.clone();
            sorted.sort_by(f32::total_cmp);
            assert_eq!(sorted, vec![7.0, 8.0, 9.0, 12.0, 13.0, 14.0, 17.0, 18.0, 19.0]);
            assert_eq!(out[4], 13.0, "the centre stays");
            seen.push(out);
        }
        assert_eq!(seen[0], vec![7.0, 8.0, 9.0, 12.0, 13.0, 14.0, 17.0, 18.0, 19.0]);
        seen.sort_by(|a, b| a.partial_cmp(b).unwrap());
        seen.dedup();
        assert_eq!(seen.len(), 8);
    }
}
