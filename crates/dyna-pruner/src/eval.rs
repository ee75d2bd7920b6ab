//! Evaluation of a model (or of persistence) on a set of windows: metrics, MACs per sample and
//! kept fractions.

use std::collections::BTreeMap;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::{Scaler, WindowSet};
use crate::method::{MaskMode, Masking};
use crate::metrics::Metrics;
use crate::model::DynamicModel;

/// What an evaluation measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Evaluation {
    pub metrics: BTreeMap<String, f64>,
    /// Mean MACs per sample (absent for persistence).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub macs_per_sample: Option<f64>,
    /// MACs per sample of the same network without masks (absent for persistence).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dense_macs_per_sample: Option<f64>,
    pub samples: usize,
    /// Mean fraction of pixels computed by the prunable layers (dynamic models only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept_patch_fraction: Option<f64>,
    /// Mean fraction of units kept in the prunable layers (dynamic models only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept_unit_fraction: Option<f64>,
    /// Each window's MACs and kept fractions, in window order (empty for persistence).
    #[serde(skip, default)]
    pub per_sample: Vec<SampleCost>,
}

/// Per-sample record of a dynamic forward: MACs and mean kept fractions over layers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SampleCost {
    pub macs: f64,
    pub kept_patch_fraction: f32,
    pub kept_unit_fraction: f32,
}

/// How predictions are scored: the model's scaler and, for weather, the climatology `[C, H, W]`.
#[derive(Debug, Clone, Copy)]
pub struct Scoring<'a> {
    pub scaler: &'a Scaler,
    pub climatology: Option<&'a [f32]>,
}

/// Pixels of one batch (batch x height x width) that the default batch size keeps under: the
/// activations of every backbone grow with them, and 64 windows of whole KNMI frames
/// (382x350) took 15 GB.
pub const BATCH_PIXELS: usize = 1 << 20;

/// The batch size when none is given for frames of `height x width`: at most 64 windows,
/// fewer for large frames.
pub fn default_batch(height: usize, width: usize) -> usize {
    (BATCH_PIXELS / (height * width).max(1)).clamp(1, 64)
}

/// Runs `model` over `windows` in batches; `on_batch(done, total)` reports progress. A NaN or
/// infinite prediction is an error naming its window, never a NaN score.
pub fn evaluate<B: Backend>(
    model: &DynamicModel<B>,
    windows: &WindowSet,
    scoring: Scoring<'_>,
    masking: Masking,
    batch_size: usize,
    device: &B::Device,
    on_batch: &mut dyn FnMut(usize, usize),
) -> crate::Result<Evaluation> {
    let mut metrics = Metrics::for_windows(windows, scoring.scaler, scoring.climatology);
    let mac_model = model.mac_model(windows.height, windows.width);
    let mut costs = Vec::with_capacity(windows.len());
    let indices: Vec<usize> = (0..windows.len()).collect();
    for chunk in indices.chunks(batch_size.max(1)) {
        let (x, y) = windows.batch::<B>(chunk, scoring.scaler, device);
        let out = model.forward(x, masking);
        // As f32 whatever the backend's float element (bf16 on the GPU).
        let pred: Vec<f32> = out.prediction.into_data().convert::<f32>().to_vec().expect("f32 prediction");
        if let Some(at) = pred.iter().position(|v| !v.is_finite()) {
            let window = chunk[at / (pred.len() / chunk.len())];
            return Err(crate::Error::NonFinitePrediction {
                detail: format!("{} in window {window} of {}", pred[at], windows.len()),
            });
        }
        let target: Vec<f32> = y.into_data().convert::<f32>().to_vec().expect("f32 target");
        metrics.update(&pred, &target);
        costs.extend(sample_costs(&mac_model, &out.fractions, chunk.len()));
        on_batch(costs.len(), windows.len());
    }
    let n = costs.len().max(1) as f64;
    let dynamic = masking.mode != MaskMode::Dense;
    Ok(Evaluation {
        metrics: metrics.finish(),
        macs_per_sample: Some(costs.iter().map(|c| c.macs).sum::<f64>() / n),
        dense_macs_per_sample: Some(mac_model.dense() as f64),
        samples: windows.len(),
        kept_patch_fraction: dynamic.then(|| costs.iter().map(|c| c.kept_patch_fraction as f64).sum::<f64>() / n),
        kept_unit_fraction: dynamic.then(|| costs.iter().map(|c| c.kept_unit_fraction as f64).sum::<f64>() / n),
        per_sample: costs,
    })
}

/// MACs and kept fractions of each sample of a batch from the hard per-layer fractions.
pub fn sample_costs<B: Backend>(
    mac_model: &crate::macs::MacModel,
    fractions: &[crate::method::LayerFractions<B>],
    batch: usize,
) -> Vec<SampleCost> {
    if fractions.is_empty() {
        let dense = mac_model.dense() as f64;
        return vec![SampleCost { macs: dense, kept_patch_fraction: 1.0, kept_unit_fraction: 1.0 }; batch];
    }
    let per_layer: Vec<(Vec<f32>, Vec<f32>)> = fractions
        .iter()
        .map(|f| {
            let s: Vec<f32> = f.hard.0.clone().into_data().convert::<f32>().to_vec().expect("f32");
            let u: Vec<f32> = f.hard.1.clone().into_data().convert::<f32>().to_vec().expect("f32");
            (s, u)
        })
        .collect();
    (0..batch)
        .map(|b| {
            let layer: Vec<(f32, f32)> = per_layer.iter().map(|(s, u)| (s[b], u[b])).collect();
            let l = layer.len() as f32;
            SampleCost {
                macs: mac_model.dynamic(&layer),
                kept_patch_fraction: layer.iter().map(|p| p.0).sum::<f32>() / l,
                kept_unit_fraction: layer.iter().map(|p| p.1).sum::<f32>() / l,
            }
        })
        .collect()
}

/// Persistence (the last input frame repeated) on `windows`.
pub fn evaluate_persistence(windows: &WindowSet, scoring: Scoring<'_>) -> Evaluation {
    let scaler = scoring.scaler;
    let mut metrics = Metrics::for_windows(windows, scaler, scoring.climatology);
    let (mut pred, mut target) = (Vec::new(), Vec::new());
    for i in 0..windows.len() {
        pred.clear();
        target.clear();
        windows.persistence(i, scaler, &mut pred);
        scaler.scale_into(windows.target(i), &mut target);
        metrics.update(&pred, &target);
    }
    Evaluation {
        metrics: metrics.finish(),
        macs_per_sample: None,
        dense_macs_per_sample: None,
        samples: windows.len(),
        kept_patch_fraction: None,
        kept_unit_fraction: None,
        per_sample: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `evaluate` of a small random CNN (`units` per block, `blocks` blocks, 2 -> 1 frames of
    /// one channel) on `windows`, values unscaled, two windows per batch.
    fn evaluate_cnn(units: usize, blocks: usize, windows: &WindowSet, masking: Masking) -> crate::Result<Evaluation> {
        use crate::data::MinMaxScaler;
        use dyna_pruner_spec::{Architecture, BackboneSpec, CnnSpec, DataScope, Frames};
        let cnn = CnnSpec { hidden: 4, units, blocks, stride: 1, data_scope: DataScope::Network };
        let arch = Architecture::new(Frames { t_in: 2, t_out: 1, channels: 1 }, 2, BackboneSpec::Cnn(cnn));
        let device = Default::default();
        let model = DynamicModel::<crate::CpuBackend>::new(&arch, &device);
        let scaler = Scaler::MinMax(MinMaxScaler { min: 0.0, max: 1.0 });
        let scoring = Scoring { scaler: &scaler, climatology: None };
        evaluate(&model, windows, scoring, masking, 2, &device, &mut |_, _| {})
    }

    #[test]
    fn a_non_finite_prediction_is_an_error_naming_its_window() {
        let (n, frame) = (3, 4 * 4);
        let mut x = vec![0.5; n * 2 * frame];
        x[2 * frame + frame + 5] = f32::INFINITY; // window 1's last input frame
        let windows = WindowSet::from_pairs(x, vec![0.5; n * frame], n, 2, 1, [1, 4, 4]);
        let err = evaluate_cnn(4, 1, &windows, Masking::DENSE).unwrap_err();
        assert!(err.to_string().contains("window 1 of 3"), "{err}");
    }

    /// `eval` and `train` printed each model's MACs over its own MACs (a ratio of 1.000 at any
    /// keep): the ratio's denominator is the network without masks.
    #[test]
    fn the_dense_macs_are_those_of_the_network_without_masks() {
        use crate::method::MaskMode;
        let (n, frame) = (3, 8 * 8);
        let windows = WindowSet::from_pairs(vec![0.5; n * 2 * frame], vec![0.5; n * frame], n, 2, 1, [1, 8, 8]);
        let run = |masking| evaluate_cnn(8, 2, &windows, masking).unwrap();
        let dense = run(Masking::DENSE);
        let dynamic = run(Masking::top_k(MaskMode::Both, 0.25, 0.25));
        assert_eq!(dense.dense_macs_per_sample, dense.macs_per_sample);
        assert_eq!(dynamic.dense_macs_per_sample, dense.macs_per_sample);
        assert!(dynamic.macs_per_sample.unwrap() < 0.6 * dense.macs_per_sample.unwrap());
    }

    #[test]
    fn the_default_batch_shrinks_with_the_frame() {
        assert_eq!(default_batch(16, 8), 64);
        assert_eq!(default_batch(382, 350), 7);
        assert_eq!(default_batch(1226, 1760), 1);
        assert!(default_batch(613, 380) * 613 * 380 <= BATCH_PIXELS);
    }
}
