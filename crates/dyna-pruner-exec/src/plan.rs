//! What a forward pass is asked to mask, and what it returns: the types every executor shares.

use serde::{Deserialize, Serialize};

/// The kept patches and units of one sample.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleMasks {
    /// Kept patch indices `py * wp + px`, ascending.
    pub patches: Vec<usize>,
    /// Kept unit indices of each prunable layer, ascending.
    pub units: Vec<Vec<usize>>,
}

/// How to mask a forward pass.
#[derive(Debug, Clone, Copy)]
pub enum MaskPlan<'a> {
    /// The dense backbone: no masks, no mask generator.
    Dense,
    /// The model's own masks from its mask generator and gates (its spec's modes and ratios).
    Dynamic,
    /// Masks given per sample (e.g. from the training framework, to compare).
    Given(&'a [SampleMasks]),
}

/// The result of a forward pass.
#[derive(Debug, Clone)]
pub struct Output {
    /// `[batch, t_out, channels, h, w]`.
    pub prediction: Vec<f32>,
    /// Per-sample masks (empty for `MaskPlan::Dense`).
    pub masks: Vec<SampleMasks>,
    /// Per-sample MACs actually executed.
    pub macs: Vec<u64>,
}
