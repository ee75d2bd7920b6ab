//! A backbone wrapped by the method: mask generator + one unit gate per prunable layer.

use burn::prelude::*;

use crate::backbones::cnn::CnnConfig;
use crate::backbones::convlstm::ConvLstmConfig;
use crate::backbones::vit::VitConfig;
use crate::backbones::{Backbone, BackboneKind, DataScope, SpatioTemporal};
use crate::macs::MacModel;
use crate::method::mask_generator::{MaskGenerator, MaskGeneratorConfig, UnitGate, UnitGateConfig};
use crate::method::{DynamicMasks, LayerFractions, Masking, NoMasks};

/// Architecture of a [`DynamicModel`]: which backbone, its sizes, and the patch size.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Architecture {
    pub backbone: BackboneKind,
    pub t_in: usize,
    pub t_out: usize,
    pub channels: usize,
    pub hidden: usize,
    pub units: usize,
    pub blocks: usize,
    /// ViT: attention heads per layer.
    #[serde(default = "default_heads")]
    pub heads: usize,
    pub stride: usize,
    /// Patch side in input pixels (a multiple of `stride`).
    pub patch: usize,
    /// Hidden width of the mask generator.
    pub generator_width: usize,
    /// The mask generator also reads the direction of the last temporal change
    /// ([`MaskGeneratorConfig::motion`]); absent in checkpoints from before it existed.
    #[serde(default)]
    pub generator_motion: bool,
    /// CNN: which layers the DataMask prunes; absent in checkpoints from before it existed.
    #[serde(default)]
    pub data_scope: DataScope,
}

fn default_heads() -> usize {
    4
}

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
    pub(crate) patch: usize,
}

impl Architecture {
    /// A freshly initialised mask generator of this architecture.
    pub fn mask_generator<B: Backend>(&self, device: &B::Device) -> MaskGenerator<B> {
        MaskGeneratorConfig::new(self.channels, self.patch)
            .with_width(self.generator_width)
            .with_motion(self.generator_motion)
            .init(device)
    }

    /// The same architecture with `other`'s mask generator and DataMask scope (the parts a dense
    /// checkpoint leaves open for the dynamic model fine-tuned from it).
    pub fn with_generator_of(&self, other: &Architecture) -> Architecture {
        Architecture {
            generator_width: other.generator_width,
            generator_motion: other.generator_motion,
            data_scope: other.data_scope,
            ..self.clone()
        }
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> DynamicModel<B> {
        let backbone = match self.backbone {
            BackboneKind::Cnn => Backbone::Cnn(
                CnnConfig::new(self.t_in, self.t_out, self.channels)
                    .with_hidden(self.hidden)
                    .with_units(self.units)
                    .with_blocks(self.blocks)
                    .with_stride(self.stride)
                    .with_data_scope(self.data_scope)
                    .init(device),
            ),
            BackboneKind::Vit => Backbone::Vit(
                VitConfig::new(self.t_in, self.t_out, self.channels)
                    .with_patch(self.patch)
                    .with_dim(self.hidden)
                    .with_heads(self.heads)
                    .with_mlp(self.units)
                    .with_layers(self.blocks)
                    .init(device),
            ),
            BackboneKind::ConvLstm => Backbone::ConvLstm(
                ConvLstmConfig::new(self.t_in, self.t_out, self.channels)
                    .with_hidden(self.hidden)
                    .with_units(self.units)
                    .with_cells(self.blocks)
                    .with_stride(self.stride)
                    .init(device),
            ),
        };
        let unit_gates = backbone
            .prunable_layers()
            .iter()
            .map(|l| UnitGateConfig::new(l.in_channels, l.units).init(device))
            .collect();
        DynamicModel { mask_generator: self.mask_generator(device), unit_gates, backbone, patch: self.patch }
    }
}

impl<B: Backend> DynamicModel<B> {
    /// # Shapes
    /// - x: `[batch, t_in, channels, height, width]`
    /// - prediction: `[batch, t_out, channels, height, width]`
    pub fn forward(&self, x: Tensor<B, 5>, masking: Masking) -> Forward<B> {
        if masking.mode == crate::method::MaskMode::Dense {
            let prediction = self.backbone.forward(x, &mut NoMasks);
            return Forward { prediction, importance: None, fractions: Vec::new(), data_mask: None };
        }
        let importance = self.mask_generator.forward(x.clone());
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
        let mut masks = DynamicMasks::new(importance, &self.unit_gates, masking, self.patch);
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
        let layers = self.backbone.prunable_layers();
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
    use crate::method::{MaskMode, Masking};
    use crate::{CpuBackend, TrainBackend};
    use burn::tensor::Distribution;

    fn arch(patch: usize, stride: usize) -> Architecture {
        arch_of(BackboneKind::Cnn, patch, stride)
    }

    fn arch_of(backbone: BackboneKind, patch: usize, stride: usize) -> Architecture {
        Architecture {
            backbone,
            t_in: 3,
            t_out: 2,
            channels: 2,
            hidden: 8,
            units: 12,
            blocks: 2,
            heads: 2,
            stride,
            patch,
            generator_width: 4,
            generator_motion: false,
            data_scope: DataScope::Translator,
        }
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
            let model = arch_of(kind, patch, stride).init::<CpuBackend>(&device);
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
    fn hard_fractions_match_the_keep_ratios_per_sample() {
        let device = Default::default();
        // 16x8 frame, patch 2, stride 2: 8x4 = 32 patches, each one feature pixel.
        let model = arch(2, 2).init::<CpuBackend>(&device);
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
        let model = arch(2, 2).init::<TrainBackend>(&device);
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
        let a = Architecture { data_scope: DataScope::Network, ..arch(4, 2) };
        let model = a.init::<CpuBackend>(&device);
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
        let model = arch(4, 2).init::<CpuBackend>(&device);
        let x = input::<CpuBackend>(1, 16, 16, &device);
        let one = Masking::top_k(MaskMode::Both, 1e-3, 1e-3);
        let out = model.forward(x, one);
        let s: Vec<f32> = out.fractions[0].hard.0.clone().into_data().to_vec().unwrap();
        let u: Vec<f32> = out.fractions[0].hard.1.clone().into_data().to_vec().unwrap();
        assert_eq!(s, vec![4.0 / 64.0]);
        assert_eq!(u, vec![1.0 / 12.0]);
    }
}
