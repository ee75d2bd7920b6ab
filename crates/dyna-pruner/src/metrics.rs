//! Crowd-flow metrics in OpenSTL's convention: MSE and MAE are per-frame sums over pixels of the
//! squared / absolute error on the [0, 1] scale, averaged over frames; RMSE is per pixel, in
//! trips per cell.

use std::collections::BTreeMap;

use crate::data::MinMaxScaler;

/// Running sums of a crowd-flow evaluation.
#[derive(Debug, Clone, Default)]
pub struct CrowdMetrics {
    sum_sq: f64,
    sum_abs: f64,
    frames: u64,
    pixels_per_frame: u64,
}

impl CrowdMetrics {
    pub fn new(pixels_per_frame: usize) -> Self {
        CrowdMetrics { pixels_per_frame: pixels_per_frame as u64, ..Default::default() }
    }

    /// Adds scaled predictions and targets of equal length, a whole number of frames.
    pub fn update(&mut self, prediction: &[f32], target: &[f32]) {
        debug_assert_eq!(prediction.len(), target.len());
        for (p, t) in prediction.iter().zip(target) {
            let e = (*p - *t) as f64;
            self.sum_sq += e * e;
            self.sum_abs += e.abs();
        }
        self.frames += prediction.len() as u64 / self.pixels_per_frame;
    }

    /// `mse`, `mae` (OpenSTL, [0, 1] scale) and `rmse` (trips per cell).
    pub fn finish(&self, scaler: &MinMaxScaler) -> BTreeMap<String, f64> {
        let frames = self.frames.max(1) as f64;
        let pixels = frames * self.pixels_per_frame as f64;
        BTreeMap::from([
            ("mse".to_string(), self.sum_sq / frames),
            ("mae".to_string(), self.sum_abs / frames),
            ("rmse".to_string(), (self.sum_sq / pixels).sqrt() * scaler.range() as f64),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openstl_convention() {
        // two frames of 2 pixels; errors 0.1, 0.1 | 0.0, 0.2
        let mut m = CrowdMetrics::new(2);
        m.update(&[0.1, 0.1, 0.0, 0.2], &[0.0; 4]);
        let r = m.finish(&MinMaxScaler { min: 0.0, max: 100.0 });
        assert!((r["mse"] - (0.02 + 0.04) / 2.0).abs() < 1e-7);
        assert!((r["mae"] - 0.2).abs() < 1e-7);
        assert!((r["rmse"] - (0.06f64 / 4.0).sqrt() * 100.0).abs() < 1e-4);
    }
}
