//! A backbone wrapped by the method: mask generator + one unit gate per prunable layer.

use burn::prelude::*;
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};

use crate::backbones::{Backbone, SpatioTemporal};
use crate::macs::MacModel;
use crate::method::mask_generator::{MaskGenerator, UnitGate, UnitGateConfig};
use crate::method::{DynamicMasks, LayerFractions, Masking, NoMasks};

pub use dyna_pruner_spec::Architecture;

/// The output of one forward pass.
pub struct Forward<B: Backend> {
    /// `[batch, t_out, channels, height, width]`.
    pub prediction: Tensor<B, 5>,
    /// Importance S `[batch, hp, wp]` (absent for the dense model).
    pub importance: Option<Tensor<B, 3>>,
    /// Kept fractions per prunable layer (empty for the dense model).
    pub fractions: Vec<LayerFractions<B>>,
    /// The hard DataMask `[batch, hp, wp]` (absent for the dense model).
    pub data_mask: Option<Tensor<B, 3>>,
}

/// A backbone with the method around it. With [`Masking::DENSE`] it is the dense backbone.
#[derive(Module, Debug)]
pub struct DynamicModel<B: Backend> {
    pub mask_generator: MaskGenerator<B>,
    pub unit_gates: Vec<UnitGate<B>>,
    pub backbone: Backbone<B>,
    #[module(skip)]
    pub arch: Architecture,
}

/// A freshly initialised mask generator of `arch`.
pub fn mask_generator<B: Backend>(arch: &Architecture, device: &B::Device) -> MaskGenerator<B> {
    MaskGenerator::new(arch.frames.channels, arch.model.patch, arch.model.generator, device)
}

/// Freshly initialised unit gates of `arch`, one per prunable layer.
pub fn unit_gates<B: Backend>(arch: &Architecture, device: &B::Device) -> Vec<UnitGate<B>> {
    let budget_inputs = arch.model.generator.budget_inputs();
    arch.prunable_layers()
        .iter()
        .map(|l| UnitGateConfig::new(l.in_channels, l.units).with_budget_inputs(budget_inputs).init(device))
        .collect()
}

impl<B: Backend> DynamicModel<B> {
    /// A freshly initialised model of `arch`.
    pub fn new(arch: &Architecture, device: &B::Device) -> Self {
        DynamicModel {
            mask_generator: mask_generator(arch, device),
            unit_gates: unit_gates(arch, device),
            backbone: Backbone::new(arch, device),
            arch: arch.clone(),
        }
    }

    /// This model's weights as bytes, for [`Self::from_weight_bytes`] on any backend. Burn
    /// initialises parameters lazily, so a `clone()` of a fresh model taken before their first
    /// use draws weights of its own: copy a model through these bytes instead.
    pub fn into_weight_bytes(self) -> crate::Result<Vec<u8>> {
        BinBytesRecorder::<FullPrecisionSettings>::default()
            .record(self.into_record(), ())
            .map_err(|e| crate::Error::Weights { op: "record the model's weights", detail: e.to_string() })
    }

    /// The model of `arch` with the weights that [`Self::into_weight_bytes`] wrote, on `device`.
    ///
    /// # Panics
    /// When the weights are of another architecture (Burn's `load_record` panics): this copies
    /// a model between backends; checkpoints on disk go through [`crate::checkpoint`], which
    /// checks the architecture first.
    pub fn from_weight_bytes(arch: &Architecture, weights: &[u8], device: &B::Device) -> crate::Result<Self> {
        let record = BinBytesRecorder::<FullPrecisionSettings>::default()
            .load(weights.to_vec(), device)
            .map_err(|e| crate::Error::Weights { op: "load recorded weights into the model", detail: e.to_string() })?;
        Ok(Self::new(arch, device).load_record(record))
    }

    /// # Shapes
    /// - x: `[batch, t_in, channels, height, width]`
    /// - prediction: `[batch, t_out, channels, height, width]`
    pub fn forward(&self, x: Tensor<B, 5>, masking: Masking) -> Forward<B> {
        if masking.mode == crate::method::MaskMode::Dense {
            let prediction = self.backbone.forward(x, &mut NoMasks);
            return Forward { prediction, importance: None, fractions: Vec::new(), data_mask: None };
        }
        let importance = self.mask_generator.forward(x.clone(), &masking);
        self.forward_with_importance(x, importance, masking)
    }

    /// [`Self::forward`] with S already computed by this model's mask generator (the batch
    /// DataMask rule reads S before choosing the threshold).
    ///
    /// # Shapes
    /// - x: `[batch, t_in, channels, height, width]`
    /// - importance: `[batch, ceil(height / patch), ceil(width / patch)]`
    /// - prediction: `[batch, t_out, channels, height, width]`
    pub fn forward_with_importance(&self, x: Tensor<B, 5>, importance: Tensor<B, 3>, masking: Masking) -> Forward<B> {
        let mut masks = DynamicMasks::new(importance, &self.unit_gates, masking, self.arch.model.patch);
        let prediction = self.backbone.forward(x, &mut masks);
        Forward {
            prediction,
            importance: Some(masks.importance().clone()),
            data_mask: Some(masks.data_mask()),
            fractions: masks.fractions,
        }
    }

    /// The prediction under masks from any source (e.g. [`crate::method::FixedMasks`]).
    ///
    /// # Shapes
    /// - x: `[batch, t_in, channels, height, width]`
    /// - output: `[batch, t_out, channels, height, width]`
    pub fn forward_masked(&self, x: Tensor<B, 5>, masks: &mut dyn crate::method::MaskSource<B>) -> Tensor<B, 5> {
        self.backbone.forward(x, masks)
    }

    /// The analytical MAC model of this network for frames of `height x width`.
    pub fn mac_model(&self, height: usize, width: usize) -> MacModel {
        let macs = self.backbone.macs(height, width);
        let layers = self.arch.prunable_layers();
        let gates: u64 = self
            .unit_gates
            .iter()
            .zip(&layers)
            .map(|(g, l)| g.macs(height.div_ceil(l.stride) * width.div_ceil(l.stride)))
            .sum();
        MacModel {
            backbone_fixed: macs.fixed,
            backbone_spatial: macs.spatial,
            layers: macs.layers,
            pairwise: macs.pairwise,
            method: self.mask_generator.macs(height, width) + gates,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbones::BackboneKind;
    use crate::method::{MaskMode, Masking};
    use crate::{CpuBackend, TrainBackend};
    use burn::tensor::Distribution;
    use dyna_pruner_spec::{BackboneSpec, CnnSpec, ConvLstmSpec, DataScope, Frames, GeneratorSpec, VitSpec};

    fn arch(patch: usize, stride: usize) -> Architecture {
        arch_of(BackboneKind::Cnn, patch, stride)
    }

    fn arch_of(kind: BackboneKind, patch: usize, stride: usize) -> Architecture {
        let backbone = match kind {
            BackboneKind::Cnn => {
                BackboneSpec::Cnn(CnnSpec { hidden: 8, units: 12, blocks: 2, stride, ..CnnSpec::default() })
            }
            BackboneKind::Vit => BackboneSpec::Vit(VitSpec { dim: 8, heads: 2, mlp: 12, layers: 2 }),
            BackboneKind::ConvLstm => BackboneSpec::ConvLstm(ConvLstmSpec { hidden: 8, units: 12, cells: 2, stride }),
        };
        Architecture::new(Frames { t_in: 3, t_out: 2, channels: 2 }, patch, backbone)
            .with_generator(GeneratorSpec { width: 4, ..GeneratorSpec::default() })
    }

    fn input<B: Backend>(b: usize, h: usize, w: usize, device: &B::Device) -> Tensor<B, 5> {
        Tensor::random([b, 3, 2, h, w], Distribution::Uniform(0.0, 1.0), device)
    }

    #[test]
    fn all_ones_masks_reproduce_the_dense_forward_exactly() {
        let device = Default::default();
        let cases =
            [(BackboneKind::Cnn, 2, 2, 10, 6), (BackboneKind::Cnn, 4, 2, 9, 7), (BackboneKind::Cnn, 3, 1, 8, 5)];
        let convlstm = [(BackboneKind::ConvLstm, 4, 2, 9, 7), (BackboneKind::ConvLstm, 4, 4, 8, 8)];
        for (kind, patch, stride, h, w) in cases.into_iter().chain(convlstm) {
            let model = DynamicModel::<CpuBackend>::new(&arch_of(kind, patch, stride), &device);
            let x = input::<CpuBackend>(3, h, w, &device);
            let dense = model.forward(x.clone(), Masking::DENSE).prediction;
            let ones = Masking::top_k(MaskMode::Both, 1.0, 1.0);
            let masked = model.forward(x, ones).prediction;
            assert_eq!(dense.dims(), [3, 2, 2, h, w]);
            let (a, b): (Vec<f32>, Vec<f32>) =
                (dense.into_data().to_vec().unwrap(), masked.into_data().to_vec().unwrap());
            assert_eq!(a, b, "{kind:?} patch {patch} stride {stride} {h}x{w}");
        }
    }

    #[test]
    fn models_from_the_weight_bytes_of_a_fresh_model_agree() {
        let device = Default::default();
        let arch = arch_of(BackboneKind::Cnn, 2, 2);
        let weights = DynamicModel::<CpuBackend>::new(&arch, &device).into_weight_bytes().unwrap();
        let x = input::<CpuBackend>(2, 10, 6, &device);
        let outputs: Vec<Vec<f32>> = (0..2)
            .map(|_| {
                let model = DynamicModel::<CpuBackend>::from_weight_bytes(&arch, &weights, &device).unwrap();
                model
                    .forward(x.clone(), Masking::top_k(MaskMode::Both, 0.5, 0.5))
                    .prediction
                    .into_data()
                    .to_vec()
                    .unwrap()
            })
            .collect();
        assert_eq!(outputs[0], outputs[1]);
    }

    #[test]
    fn hard_fractions_match_the_keep_ratios_per_sample() {
        let device = Default::default();
        // 16x8 frame, patch 2, stride 2: 8x4 = 32 patches, each one feature pixel.
        let model = DynamicModel::<CpuBackend>::new(&arch(2, 2), &device);
        let masking = Masking::top_k(MaskMode::Both, 0.25, 0.5);
        let out = model.forward(input::<CpuBackend>(4, 16, 8, &device), masking);
        assert_eq!(out.fractions.len(), 2);
        for f in &out.fractions {
            let s: Vec<f32> = f.hard.0.clone().into_data().to_vec().unwrap();
            let u: Vec<f32> = f.hard.1.clone().into_data().to_vec().unwrap();
            assert!(s.iter().all(|&v| v == 8.0 / 32.0), "{s:?}");
            assert!(u.iter().all(|&v| v == 6.0 / 12.0), "{u:?}");
        }
    }

    #[test]
    fn gradient_reaches_the_mask_generator_and_gates() {
        let device = Default::default();
        let model = DynamicModel::<TrainBackend>::new(&arch(2, 2), &device);
        let masking = Masking::top_k(MaskMode::Both, 0.5, 0.5);
        let out = model.forward(input::<TrainBackend>(2, 8, 8, &device), masking);
        let grads = out.prediction.powi_scalar(2).mean().backward();
        let g = model.mask_generator.head.weight.grad(&grads).expect("mask generator gets a gradient");
        assert!(g.abs().sum().into_scalar() > 0.0);
        let g = model.unit_gates[0].linear.weight.grad(&grads).expect("unit gate gets a gradient");
        assert!(g.abs().sum().into_scalar() > 0.0);
    }

    #[test]
    fn network_scope_predicts_persistence_at_pruned_patches_only() {
        let device = Default::default();
        let mut a = arch(4, 2);
        if let BackboneSpec::Cnn(s) = &mut a.model.backbone {
            s.data_scope = DataScope::Network;
        }
        let model = DynamicModel::<CpuBackend>::new(&a, &device);
        let (h, w) = (12, 8);
        let x = input::<CpuBackend>(2, h, w, &device);
        let out = model.forward(x.clone(), Masking::top_k(MaskMode::Both, 0.5, 0.5));
        let kept: Vec<f32> = out.data_mask.unwrap().into_data().to_vec().unwrap();
        let pred: Vec<f32> = out.prediction.into_data().to_vec().unwrap();
        let x: Vec<f32> = x.into_data().to_vec().unwrap();
        let (mut changed, plane) = (0, h * w);
        for b in 0..2 {
            for t in 0..2 {
                for c in 0..2 {
                    for p in 0..plane {
                        let patch = (p / w / 4) * 2 + (p % w) / 4;
                        let got = pred[((b * 2 + t) * 2 + c) * plane + p];
                        let last = x[((b * 3 + 2) * 2 + c) * plane + p];
                        if kept[b * 6 + patch] == 0.0 {
                            assert_eq!(got, last, "pruned pixel {p} of sample {b} is not its last frame");
                        } else if got != last {
                            changed += 1;
                        }
                    }
                }
            }
        }
        assert!(changed > 0, "kept patches are computed");
        let macs = model.mac_model(h, w);
        assert_eq!(macs.backbone_fixed, 0);
        assert!(macs.backbone_spatial > 0);
    }

    #[test]
    fn a_mask_keeping_one_patch_and_one_unit_works() {
        let device = Default::default();
        let model = DynamicModel::<CpuBackend>::new(&arch(4, 2), &device);
        let x = input::<CpuBackend>(1, 16, 16, &device);
        let one = Masking::top_k(MaskMode::Both, 1e-3, 1e-3);
        let out = model.forward(x, one);
        let s: Vec<f32> = out.fractions[0].hard.0.clone().into_data().to_vec().unwrap();
        let u: Vec<f32> = out.fractions[0].hard.1.clone().into_data().to_vec().unwrap();
        assert_eq!(s, vec![4.0 / 64.0]);
        assert_eq!(u, vec![1.0 / 12.0]);
    }
}
