//! Scaling of physical values for the network, fitted on the training range only and stored with
//! the model: min-max to [0, 1] for crowd flow (one range for all channels, as ST-ResNet/OpenSTL),
//! z-scores per channel for weather (as WeatherBench/OpenSTL).

use serde::{Deserialize, Serialize};

/// `scaled = (value - min) / (max - min)`, one range for all channels.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MinMaxScaler {
    pub min: f32,
    pub max: f32,
}

impl MinMaxScaler {
    /// Fits on the given values; `None` when they are empty or constant.
    pub fn fit<'a>(chunks: impl IntoIterator<Item = &'a [f32]>) -> Option<Self> {
        let (mut min, mut max) = (f32::INFINITY, f32::NEG_INFINITY);
        for chunk in chunks {
            for &v in chunk {
                min = min.min(v);
                max = max.max(v);
            }
        }
        (max > min).then_some(MinMaxScaler { min, max })
    }

    pub fn range(&self) -> f32 {
        self.max - self.min
    }
}

/// `scaled = (value - mean[c]) / std[c]` for channel c of frames laid out `[.., C, H, W]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZScoreScaler {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// Values per channel plane (`H x W`): the channel of value i is `(i / plane) % channels`.
    pub plane: usize,
}

impl ZScoreScaler {
    /// Fits per channel on whole frames `[.., C, H, W]`; `None` when a channel is constant or
    /// there are no values.
    pub fn fit<'a>(chunks: impl IntoIterator<Item = &'a [f32]>, channels: usize, plane: usize) -> Option<Self> {
        let (mut sum, mut sq, mut n) = (vec![0f64; channels], vec![0f64; channels], vec![0u64; channels]);
        for chunk in chunks {
            for (i, &v) in chunk.iter().enumerate() {
                let c = (i / plane) % channels;
                sum[c] += v as f64;
                sq[c] += v as f64 * v as f64;
                n[c] += 1;
            }
        }
        let mut mean = Vec::with_capacity(channels);
        let mut std = Vec::with_capacity(channels);
        for c in 0..channels {
            let m = sum[c] / n[c].max(1) as f64;
            let var = sq[c] / n[c].max(1) as f64 - m * m;
            if n[c] == 0 || var.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
                return None;
            }
            mean.push(m as f32);
            std.push(var.sqrt() as f32);
        }
        Some(ZScoreScaler { mean, std, plane })
    }

    fn channel(&self, i: usize) -> usize {
        (i / self.plane) % self.mean.len()
    }
}

/// The scaling of a model's inputs and outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Scaler {
    MinMax(MinMaxScaler),
    ZScore(ZScoreScaler),
}

impl Scaler {
    /// Appends the scaled values of `values` (whole frames) to `out`.
    pub fn scale_into(&self, values: &[f32], out: &mut Vec<f32>) {
        match self {
            Scaler::MinMax(s) => {
                let inv = 1.0 / s.range();
                out.extend(values.iter().map(|v| (v - s.min) * inv));
            }
            Scaler::ZScore(s) => {
                out.extend(values.iter().enumerate().map(|(i, v)| {
                    let c = s.channel(i);
                    (v - s.mean[c]) / s.std[c]
                }));
            }
        }
    }

    /// The physical value of the scaled value at index `i` of a run of whole frames.
    pub fn unscale(&self, i: usize, scaled: f32) -> f32 {
        match self {
            Scaler::MinMax(s) => scaled * s.range() + s.min,
            Scaler::ZScore(s) => {
                let c = s.channel(i);
                scaled * s.std[c] + s.mean[c]
            }
        }
    }

    /// Physical units per scaled unit of channel `c`.
    pub fn unit(&self, c: usize) -> f32 {
        match self {
            Scaler::MinMax(s) => s.range(),
            Scaler::ZScore(s) => s.std[c],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_max_round_trip() {
        let s = Scaler::MinMax(MinMaxScaler::fit([&[2.0f32, 4.0, 10.0][..]]).unwrap());
        let mut out = Vec::new();
        s.scale_into(&[2.0, 6.0, 10.0], &mut out);
        assert_eq!(out, vec![0.0, 0.5, 1.0]);
        assert_eq!(s.unscale(1, 0.5), 6.0);
        assert!(MinMaxScaler::fit([&[1.0f32, 1.0][..]]).is_none());
    }

    #[test]
    fn z_scores_per_channel() {
        // two frames of 2 channels x 2 pixels: channel 0 = {1, 3, 1, 3}, channel 1 = {10, 30, 10, 30}
        let frames = [1.0f32, 3.0, 10.0, 30.0, 1.0, 3.0, 10.0, 30.0];
        let s = ZScoreScaler::fit([&frames[..]], 2, 2).unwrap();
        assert_eq!((s.mean.clone(), s.std.clone()), (vec![2.0, 20.0], vec![1.0, 10.0]));
        let s = Scaler::ZScore(s);
        let mut out = Vec::new();
        s.scale_into(&frames, &mut out);
        assert_eq!(out, vec![-1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0]);
        assert_eq!(s.unscale(3, 1.0), 30.0);
        assert!(ZScoreScaler::fit([&[1.0f32, 1.0, 2.0, 3.0][..]], 2, 2).is_none(), "channel 0 is constant");
    }

    #[test]
    fn old_checkpoints_read_as_min_max() {
        let s: Scaler = serde_json::from_str(r#"{"min": 0.0, "max": 2.0}"#).unwrap();
        assert_eq!(s, Scaler::MinMax(MinMaxScaler { min: 0.0, max: 2.0 }));
    }
}
