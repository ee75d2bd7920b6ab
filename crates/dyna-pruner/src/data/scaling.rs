//! Min-max scaling to [0, 1], fitted on the training range only and stored with the model.

use serde::{Deserialize, Serialize};

/// `scaled = (value - min) / (max - min)`, one range for all channels (as ST-ResNet/OpenSTL).
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

    /// Appends the scaled values of `values` to `out`.
    pub fn scale_into(&self, values: &[f32], out: &mut Vec<f32>) {
        let inv = 1.0 / self.range();
        out.extend(values.iter().map(|v| (v - self.min) * inv));
    }

    pub fn unscale(&self, scaled: f32) -> f32 {
        scaled * self.range() + self.min
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let s = MinMaxScaler::fit([&[2.0f32, 4.0, 10.0][..]]).unwrap();
        let mut out = Vec::new();
        s.scale_into(&[2.0, 6.0, 10.0], &mut out);
        assert_eq!(out, vec![0.0, 0.5, 1.0]);
        assert_eq!(s.unscale(0.5), 6.0);
        assert!(MinMaxScaler::fit([&[1.0f32, 1.0][..]]).is_none());
    }
}
