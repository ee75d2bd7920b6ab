//! A backbone wrapped by the method: mask generator + one unit gate per prunable layer.

use burn::prelude::*;

use crate::backbones::cnn::CnnConfig;
use crate::backbones::{Backbone, BackboneKind, SpatioTemporal};
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
    pub stride: usize,
    /// Patch side in input pixels (a multiple of `stride`).
    pub patch: usize,
    /// Hidden width of the mask generator.
    pub generator_width: usize,
}

/// The output of one forward pass.
pub struct Forward<B: Backend> {
    /// `[batch, t_out, channels, height, width]`.
    pub prediction: Tensor<B, 5>,
    /// Importance S `[batch, hp, wp]` (absent for the dense model).
    pub importance: Option<Tensor<B, 3>>,
    /// Kept fractions per prunable layer (empty for the dense model).
    pub fractions: Vec<LayerFractions<B>>,
}

/// A backbone with the method around it. With [`Masking::DENSE`] it is the dense backbone.
#[derive(Module, Debug)]
pub struct DynamicModel<B: Backend> {
    pub mask_generator: MaskGenerator<B>,
    pub unit_gates: Vec<UnitGate<B>>,
    pub backbone: Backbone<B>,
    patch: usize,
}

impl Architecture {
    pub fn init<B: Backend>(&self, device: &B::Device) -> DynamicModel<B> {
        let backbone = match self.backbone {
            BackboneKind::Cnn => Backbone::Cnn(
                CnnConfig::new(self.t_in, self.t_out, self.channels)
                    .with_hidden(self.hidden)
                    .with_units(self.units)
                    .with_blocks(self.blocks)
                    .with_stride(self.stride)
                    .init(device),
            ),
        };
        let unit_gates = backbone
            .prunable_layers()
            .iter()
            .map(|l| UnitGateConfig::new(l.in_channels, l.units).init(device))
            .collect();
        DynamicModel {
            mask_generator: MaskGeneratorConfig::new(self.channels, self.patch)
                .with_width(self.generator_width)
                .init(device),
            unit_gates,
            backbone,
            patch: self.patch,
        }
    }
}

impl<B: Backend> DynamicModel<B> {
    /// # Shapes
    /// - x: `[batch, t_in, channels, height, width]`
    /// - prediction: `[batch, t_out, channels, height, width]`
    pub fn forward(&self, x: Tensor<B, 5>, masking: Masking) -> Forward<B> {
        if masking.mode == crate::method::MaskMode::Dense {
            let prediction = self.backbone.forward(x, &mut NoMasks);
            return Forward { prediction, importance: None, fractions: Vec::new() };
        }
        let importance = self.mask_generator.forward(x.clone());
        let mut masks = DynamicMasks::new(importance, &self.unit_gates, masking, self.patch);
        let prediction = self.backbone.forward(x, &mut masks);
        Forward { prediction, importance: Some(masks.importance().clone()), fractions: masks.fractions }
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
            layers: macs.layers,
            method: self.mask_generator.macs(height, width) + gates,
        }
    }
}
