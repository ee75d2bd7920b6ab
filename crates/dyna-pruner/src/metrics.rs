//! Forecast metrics. Every evaluation reports `mse` on the network's (scaled) values, which
//! training uses to pick the best epoch, plus the task's own metrics:
//!
//! - crowd flow (OpenSTL): `mse`, `mae` are per-frame sums over pixels of the squared / absolute
//!   error on the [0, 1] scale, averaged over frames; `rmse` is per pixel, in trips per cell;
//! - weather (WeatherBench): `rmse`, `mae` weighted by cos(latitude) in physical units, and `acc`,
//!   the anomaly correlation against a climatology, each computed per forecast frame and channel
//!   and averaged over frames; per-channel values as `rmse/<channel>` etc.; `mse` is the plain
//!   per-value mean on the z-scored scale.

use std::collections::BTreeMap;

use crate::data::{Scaler, WindowSet};

/// Running sums of a crowd-flow evaluation.
#[derive(Debug, Clone, Default)]
pub struct CrowdMetrics {
    sum_sq: f64,
    sum_abs: f64,
    frames: u64,
    pixels_per_frame: u64,
    /// Trips per scaled unit.
    unit: f64,
}

impl CrowdMetrics {
    pub fn new(pixels_per_frame: usize, scaler: &Scaler) -> Self {
        CrowdMetrics { pixels_per_frame: pixels_per_frame as u64, unit: scaler.unit(0) as f64, ..Default::default() }
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
    pub fn finish(&self) -> BTreeMap<String, f64> {
        let frames = self.frames.max(1) as f64;
        let pixels = frames * self.pixels_per_frame as f64;
        BTreeMap::from([
            ("mse".to_string(), self.sum_sq / frames),
            ("mae".to_string(), self.sum_abs / frames),
            ("rmse".to_string(), (self.sum_sq / pixels).sqrt() * self.unit),
        ])
    }
}

/// Running sums of a latitude-weighted weather evaluation.
#[derive(Debug, Clone)]
pub struct WeatherMetrics {
    /// cos(latitude) of each row, normalised to mean 1.
    row_weights: Vec<f64>,
    width: usize,
    channels: Vec<String>,
    /// Physical units per scaled unit and offset of each channel.
    scale: Vec<(f64, f64)>,
    /// Climatology in physical units `[C, H, W]`, for the ACC.
    climatology: Option<Vec<f32>>,
    /// Per channel: sums over frames of RMSE, MAE, ACC, and the frame count.
    sums: Vec<[f64; 3]>,
    frames: u64,
    sum_sq_scaled: f64,
    values: u64,
}

impl WeatherMetrics {
    /// `latitudes`: of each row, degrees; `channels`: names; `climatology`: `[C, H, W]` physical.
    pub fn new(
        latitudes: &[f32],
        width: usize,
        channels: Vec<String>,
        scaler: &Scaler,
        climatology: Option<Vec<f32>>,
    ) -> Self {
        let cos: Vec<f64> = latitudes.iter().map(|l| (*l as f64).to_radians().cos().max(0.0)).collect();
        let mean = cos.iter().sum::<f64>() / cos.len().max(1) as f64;
        let plane = latitudes.len() * width;
        let scale = (0..channels.len())
            .map(|c| {
                let offset = scaler.unscale(c * plane, 0.0) as f64;
                (scaler.unscale(c * plane, 1.0) as f64 - offset, offset)
            })
            .collect();
        WeatherMetrics {
            row_weights: cos.iter().map(|c| c / mean).collect(),
            width,
            sums: vec![[0.0; 3]; channels.len()],
            channels,
            scale,
            climatology,
            frames: 0,
            sum_sq_scaled: 0.0,
            values: 0,
        }
    }

    /// Adds scaled predictions and targets of equal length, a whole number of `[C, H, W]` frames.
    pub fn update(&mut self, prediction: &[f32], target: &[f32]) {
        debug_assert_eq!(prediction.len(), target.len());
        let plane = self.row_weights.len() * self.width;
        for (p, t) in prediction.iter().zip(target) {
            let e = (*p - *t) as f64;
            self.sum_sq_scaled += e * e;
        }
        self.values += prediction.len() as u64;
        let frame = plane * self.channels.len();
        for (pf, tf) in prediction.chunks(frame).zip(target.chunks(frame)) {
            for (c, (pp, tp)) in pf.chunks(plane).zip(tf.chunks(plane)).enumerate() {
                let (unit, offset) = self.scale[c];
                let clim = self.climatology.as_ref().map(|cl| &cl[c * plane..(c + 1) * plane]);
                let (mut sq, mut abs, mut wsum) = (0.0, 0.0, 0.0);
                let (mut fo, mut ff, mut oo) = (0.0, 0.0, 0.0);
                for i in 0..plane {
                    let w = self.row_weights[i / self.width];
                    let (f, o) = (pp[i] as f64 * unit + offset, tp[i] as f64 * unit + offset);
                    sq += w * (f - o) * (f - o);
                    abs += w * (f - o).abs();
                    wsum += w;
                    if let Some(cl) = clim {
                        let (df, d_o) = (f - cl[i] as f64, o - cl[i] as f64);
                        fo += w * df * d_o;
                        ff += w * df * df;
                        oo += w * d_o * d_o;
                    }
                }
                let norm = (ff * oo).sqrt();
                let s = &mut self.sums[c];
                s[0] += (sq / wsum).sqrt();
                s[1] += abs / wsum;
                s[2] += if norm > 0.0 { fo / norm } else { 0.0 };
            }
            self.frames += 1;
        }
    }

    /// `rmse`, `mae`, `acc` (means over channels) and per channel, plus the scaled `mse`.
    pub fn finish(&self) -> BTreeMap<String, f64> {
        let frames = self.frames.max(1) as f64;
        let mut out = BTreeMap::from([("mse".to_string(), self.sum_sq_scaled / self.values.max(1) as f64)]);
        let names = ["rmse", "mae", "acc"];
        for (k, name) in names.iter().enumerate() {
            if k == 2 && self.climatology.is_none() {
                continue;
            }
            let per: Vec<f64> = self.sums.iter().map(|s| s[k] / frames).collect();
            out.insert(name.to_string(), per.iter().sum::<f64>() / per.len().max(1) as f64);
            for (c, v) in self.channels.iter().zip(&per) {
                out.insert(format!("{name}/{c}"), *v);
            }
        }
        out
    }
}

/// The metrics of a window set: weather metrics on a lat/lon grid, crowd-flow metrics otherwise.
pub enum Metrics {
    Crowd(CrowdMetrics),
    Weather(WeatherMetrics),
}

impl Metrics {
    /// `climatology`: `[C, H, W]` in physical units (weather only; the ACC is left out without it).
    pub fn for_windows(windows: &WindowSet, scaler: &Scaler, climatology: Option<&[f32]>) -> Self {
        match windows.grid() {
            Some(g) => Metrics::Weather(WeatherMetrics::new(
                &g.latitudes,
                windows.width,
                g.channels.iter().map(|(n, _)| n.clone()).collect(),
                scaler,
                climatology.map(<[f32]>::to_vec),
            )),
            None => Metrics::Crowd(CrowdMetrics::new(windows.frame_len(), scaler)),
        }
    }

    pub fn update(&mut self, prediction: &[f32], target: &[f32]) {
        match self {
            Metrics::Crowd(m) => m.update(prediction, target),
            Metrics::Weather(m) => m.update(prediction, target),
        }
    }

    pub fn finish(&self) -> BTreeMap<String, f64> {
        match self {
            Metrics::Crowd(m) => m.finish(),
            Metrics::Weather(m) => m.finish(),
        }
    }
}

/// The time-mean of the input frames of `windows` in physical units `[C, H, W]`: the
/// climatology of the training period for the ACC.
pub fn climatology(windows: &WindowSet) -> Vec<f32> {
    let f = windows.frame_len();
    let mut sum = vec![0f64; f];
    let mut n = 0u64;
    for i in 0..windows.len() {
        for frame in windows.input(i).chunks(f) {
            sum.iter_mut().zip(frame).for_each(|(s, v)| *s += *v as f64);
            n += 1;
        }
    }
    sum.iter().map(|s| (s / n.max(1) as f64) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{MinMaxScaler, ZScoreScaler};

    #[test]
    fn openstl_convention() {
        // two frames of 2 pixels; errors 0.1, 0.1 | 0.0, 0.2
        let mut m = CrowdMetrics::new(2, &Scaler::MinMax(MinMaxScaler { min: 0.0, max: 100.0 }));
        m.update(&[0.1, 0.1, 0.0, 0.2], &[0.0; 4]);
        let r = m.finish();
        assert!((r["mse"] - (0.02 + 0.04) / 2.0).abs() < 1e-7);
        assert!((r["mae"] - 0.2).abs() < 1e-7);
        assert!((r["rmse"] - (0.06f64 / 4.0).sqrt() * 100.0).abs() < 1e-4);
    }

    #[test]
    fn latitude_weighting_and_acc() {
        // 2 rows (lat 0 and 60: weights 1 and 0.5, normalised 4/3 and 2/3), 1 column, 1 channel;
        // z-scores with std 2 K, mean 280 K.
        let scaler = Scaler::ZScore(ZScoreScaler { mean: vec![280.0], std: vec![2.0], plane: 2 });
        let clim = vec![280.0, 280.0];
        let mut m = WeatherMetrics::new(&[0.0, 60.0], 1, vec!["t2m".into()], &scaler, Some(clim));
        // error 1 K at the equator, 0 at 60N: rmse = sqrt((4/3 * 1) / 2)
        m.update(&[0.5, 1.0], &[0.0, 1.0]);
        let r = m.finish();
        assert!((r["rmse"] - (2.0f64 / 3.0).sqrt()).abs() < 1e-6, "{r:?}");
        assert!((r["mae"] - 2.0 / 3.0).abs() < 1e-6, "{r:?}");
        assert_eq!(r["rmse/t2m"], r["rmse"]);
        // anomalies f = (1, 2) K, o = (0, 2) K: acc = w2*4 / sqrt((w1 + 4 w2) * 4 w2)
        let (w1, w2): (f64, f64) = (4.0 / 3.0, 2.0 / 3.0);
        let acc = w2 * 4.0 / ((w1 + 4.0 * w2) * 4.0 * w2).sqrt();
        assert!((r["acc"] - acc).abs() < 1e-6, "{} vs {acc}", r["acc"]);
        assert!((r["mse"] - 0.125).abs() < 1e-9);
    }
}
