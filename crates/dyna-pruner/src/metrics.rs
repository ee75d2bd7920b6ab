//! Forecast metrics. Every evaluation reports `mse` on the network's (scaled) values, which
//! training uses to pick the best epoch, plus the task's own metrics:
//!
//! - crowd flow (OpenSTL): `mse`, `mae` are per-frame sums over pixels of the squared / absolute
//!   error on the [0, 1] scale, averaged over frames; `rmse` is per pixel, in trips per cell;
//! - weather (WeatherBench): `rmse`, `mae` weighted by cos(latitude) in physical units, and `acc`,
//!   the anomaly correlation against a climatology, each computed per forecast frame and channel
//!   and averaged over frames; per-channel values as `rmse/<channel>` etc.; `mse` is the plain
//!   per-value mean on the z-scored scale;
//! - radar (SEVIR / Earthformer): `csi`, `pod`, `sucr`, `bias` at each VIL threshold of
//!   [`VIL_THRESHOLDS`] (0-255 scale) from hit / miss / false-alarm counts pooled over all pixels
//!   and frames, `csi_m` their mean CSI, and `mse`, `mae` per pixel on the [0, 1] scale; target
//!   pixels without data (NaN) are skipped, a prediction without data counts as no rain.

use std::collections::BTreeMap;

use crate::data::{Domain, Scaler, WindowSet};

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

/// SEVIR's VIL thresholds for the CSI (0-255 scale).
pub const VIL_THRESHOLDS: [f32; 6] = [16.0, 74.0, 133.0, 160.0, 181.0, 219.0];

/// Running counts of a radar evaluation.
#[derive(Debug, Clone, Default)]
pub struct RadarMetrics {
    /// Per threshold: hits, misses, false alarms.
    counts: [[u64; 3]; VIL_THRESHOLDS.len()],
    sum_sq: f64,
    sum_abs: f64,
    pixels: u64,
}

impl RadarMetrics {
    /// Adds predictions and targets on the [0, 1] scale (VIL / 255); NaN targets are skipped.
    pub fn update(&mut self, prediction: &[f32], target: &[f32]) {
        debug_assert_eq!(prediction.len(), target.len());
        for (&p, &t) in prediction.iter().zip(target) {
            if t.is_nan() {
                continue;
            }
            let p = if p.is_nan() { 0.0 } else { p };
            let e = (p - t) as f64;
            self.sum_sq += e * e;
            self.sum_abs += e.abs();
            self.pixels += 1;
            let (p, t) = (p * 255.0, t * 255.0);
            for (c, &thr) in self.counts.iter_mut().zip(&VIL_THRESHOLDS) {
                match (p >= thr, t >= thr) {
                    (true, true) => c[0] += 1,
                    (false, true) => c[1] += 1,
                    (true, false) => c[2] += 1,
                    (false, false) => {}
                }
            }
        }
    }

    /// `mse`, `mae`, `csi_m` and `csi/T`, `pod/T`, `sucr/T`, `bias/T` per threshold T. A ratio
    /// whose denominator is zero is 0 (BIAS: 1 when neither forecast nor observation has
    /// events), as Earthformer's small-epsilon convention gives.
    pub fn finish(&self) -> BTreeMap<String, f64> {
        let n = self.pixels.max(1) as f64;
        let mut out = BTreeMap::from([("mse".to_string(), self.sum_sq / n), ("mae".to_string(), self.sum_abs / n)]);
        let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let mut csi_sum = 0.0;
        for (&[h, m, f], thr) in self.counts.iter().zip(VIL_THRESHOLDS) {
            let csi = ratio(h, h + m + f);
            csi_sum += csi;
            out.insert(format!("csi/{thr}"), csi);
            out.insert(format!("pod/{thr}"), ratio(h, h + m));
            out.insert(format!("sucr/{thr}"), ratio(h, h + f));
            out.insert(format!("bias/{thr}"), if h + m + f == 0 { 1.0 } else { ratio(h + f, h + m) });
        }
        out.insert("csi_m".to_string(), csi_sum / VIL_THRESHOLDS.len() as f64);
        out
    }
}

/// The metrics of a window set: by what the frames measure.
pub enum Metrics {
    Crowd(CrowdMetrics),
    Weather(WeatherMetrics),
    Radar(RadarMetrics),
}

impl Metrics {
    /// `climatology`: `[C, H, W]` in physical units (weather only; the ACC is left out without it).
    pub fn for_windows(windows: &WindowSet, scaler: &Scaler, climatology: Option<&[f32]>) -> Self {
        match windows.domain() {
            Domain::Weather(g) => Metrics::Weather(WeatherMetrics::new(
                &g.latitudes,
                windows.width,
                g.channels.iter().map(|(n, _)| n.clone()).collect(),
                scaler,
                climatology.map(<[f32]>::to_vec),
            )),
            Domain::Radar => Metrics::Radar(RadarMetrics::default()),
            Domain::Crowd => Metrics::Crowd(CrowdMetrics::new(windows.frame_len(), scaler)),
        }
    }

    pub fn update(&mut self, prediction: &[f32], target: &[f32]) {
        match self {
            Metrics::Crowd(m) => m.update(prediction, target),
            Metrics::Weather(m) => m.update(prediction, target),
            Metrics::Radar(m) => m.update(prediction, target),
        }
    }

    pub fn finish(&self) -> BTreeMap<String, f64> {
        match self {
            Metrics::Crowd(m) => m.finish(),
            Metrics::Weather(m) => m.finish(),
            Metrics::Radar(m) => m.finish(),
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

    #[test]
    fn csi_pod_sucr_bias_from_pooled_counts() {
        // threshold 16 (0.0627): obs wet at pixels 0, 1; forecast wet at 1, 2; pixel 3 has no data
        let (wet, dry) = (100.0 / 255.0, 0.0);
        let mut m = RadarMetrics::default();
        m.update(&[dry, wet, wet, wet], &[wet, wet, dry, f32::NAN]);
        let r = m.finish();
        assert!((r["csi/16"] - 1.0 / 3.0).abs() < 1e-12, "{r:?}");
        assert_eq!((r["pod/16"], r["sucr/16"], r["bias/16"]), (0.5, 0.5, 1.0));
        // 74 (0.29): 100 >= 74, same counts; 133 and up: no events at all
        assert_eq!(r["csi/74"], r["csi/16"]);
        assert_eq!((r["csi/133"], r["bias/219"]), (0.0, 1.0));
        assert!((r["csi_m"] - 2.0 / 3.0 / 6.0).abs() < 1e-12);
        let e = 100.0f64 / 255.0;
        assert!((r["mse"] - 2.0 * e * e / 3.0).abs() < 1e-6, "no-data pixel skipped");
    }
}
