//! Analytical multiply-accumulate counts per sample (OpenSTL's "FLOPs" are MACs). Convolutions
//! and linear layers count `outputs x fan-in`; pooling counts one MAC per element read; biases,
//! activations and additions are not counted.

use dyna_pruner_spec::kept_count;

/// The MACs of a wrapped backbone for one frame size.
#[derive(Debug, Clone, PartialEq)]
pub struct MacModel {
    /// Backbone layers no mask touches (encoder, decoder).
    pub backbone_fixed: u64,
    /// Backbone layers only the DataMask prunes (the CNN's encoder and decoder under
    /// `DataScope::Network`): they scale with the kept positions, those of prunable layer 0.
    pub backbone_spatial: u64,
    /// Dense MACs of each prunable layer that scale with kept positions x kept units.
    pub layers: Vec<u64>,
    /// Dense MACs of each prunable layer that scale with kept positions^2 x kept units
    /// (attention logits and weighted sums; zero for convolutions).
    pub pairwise: Vec<u64>,
    /// The method's own cost: mask generator and unit gates (only paid by the dynamic model).
    pub method: u64,
}

impl MacModel {
    /// The dense backbone, masks off (no mask generator runs).
    pub fn dense(&self) -> u64 {
        self.backbone_fixed
            + self.backbone_spatial
            + self.layers.iter().sum::<u64>()
            + self.pairwise.iter().sum::<u64>()
    }

    /// MACs of prunable layer `l` at kept fractions `(space, units)`.
    pub fn layer(&self, l: usize, space: f64, units: f64) -> f64 {
        (self.layers[l] as f64 + self.pairwise[l] as f64 * space) * space * units
    }

    /// The dynamic model for one sample, given each layer's hard kept fractions
    /// `(kept pixels / pixels, kept units / units)`.
    pub fn dynamic(&self, fractions: &[(f32, f32)]) -> f64 {
        let pruned: f64 =
            fractions.iter().enumerate().map(|(l, &(space, units))| self.layer(l, space as f64, units as f64)).sum();
        let space = fractions.first().map_or(1.0, |&(space, _)| space as f64);
        (self.backbone_fixed + self.method) as f64 + self.backbone_spatial as f64 * space + pruned
    }

    /// MACs of the dynamic model relative to `backbone_fixed + method + backbone_spatial +
    /// sum(layers)` when every
    /// layer keeps `space x units` (the budget loss's target, on the same scale as its estimate).
    pub fn budget_fraction(&self, space: f32, units: f32) -> f32 {
        let always = (self.backbone_fixed + self.method) as f64;
        let spatial = self.backbone_spatial as f64;
        let kept: f64 = spatial * space as f64
            + (0..self.layers.len()).map(|l| self.layer(l, space as f64, units as f64)).sum::<f64>();
        let all: f64 = spatial + (0..self.layers.len()).map(|l| self.layer(l, 1.0, 1.0)).sum::<f64>();
        ((always + kept) / (always + all)) as f32
    }

    /// The dynamic model's MACs at nominal keep ratios (patch counts rounded up), for planning.
    pub fn nominal_dynamic(&self, patches: usize, data_keep: f32, units: usize, unit_keep: f32) -> f64 {
        let space = kept_count(data_keep, patches) as f32 / patches as f32;
        let unit = kept_count(unit_keep, units) as f32 / units as f32;
        self.dynamic(&vec![(space, unit); self.layers.len()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_scales_prunable_layers_only() {
        let m = MacModel {
            backbone_fixed: 100,
            backbone_spatial: 0,
            layers: vec![400, 400],
            pairwise: vec![0, 0],
            method: 10,
        };
        assert_eq!(m.dense(), 900);
        assert_eq!(m.dynamic(&[(1.0, 1.0), (1.0, 1.0)]), 910.0);
        assert_eq!(m.dynamic(&[(0.5, 0.5), (1.0, 0.25)]), 310.0);
        assert!((m.budget_fraction(0.5, 0.5) - (110.0 + 200.0) / 910.0).abs() < 1e-6);
    }

    #[test]
    fn spatial_cost_scales_with_the_first_layers_kept_positions() {
        let m =
            MacModel { backbone_fixed: 100, backbone_spatial: 200, layers: vec![400], pairwise: vec![0], method: 10 };
        assert_eq!(m.dense(), 700);
        assert_eq!(m.dynamic(&[(0.25, 0.5)]), 110.0 + 50.0 + 50.0);
        assert!((m.budget_fraction(0.25, 0.5) - (110.0 + 50.0 + 50.0) / 710.0).abs() < 1e-6);
    }

    #[test]
    fn pairwise_cost_scales_with_the_square_of_kept_positions() {
        let m = MacModel { backbone_fixed: 0, backbone_spatial: 0, layers: vec![100], pairwise: vec![80], method: 0 };
        assert_eq!(m.dense(), 180);
        assert_eq!(m.dynamic(&[(0.5, 0.5)]), 100.0 * 0.25 + 80.0 * 0.125);
    }
}
