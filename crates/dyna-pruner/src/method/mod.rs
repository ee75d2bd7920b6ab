//! The pruning method, independent of any backbone: one importance map S per sample drives a
//! DataMask over spatial patches and a synchronized ModelMask over each prunable layer's units.
//!
//! A backbone asks for masks layer by layer through [`MaskSource`]; [`DynamicMasks`] answers
//! with the method's masks, [`NoMasks`] with none (the dense model).

pub mod budget;
pub mod mask_generator;
pub mod masks;

use burn::prelude::*;

use mask_generator::UnitGate;

pub use dyna_pruner_spec::{KeepRanges, MaskMode, Masking};

/// The masks of one prunable layer. `None` keeps everything.
pub struct LayerMasks<B: Backend> {
    /// `[batch, 1, h, w]`, 0/1 in the forward pass (straight-through while training).
    pub space: Option<Tensor<B, 4>>,
    /// `[batch, units]`, 0/1 in the forward pass.
    pub units: Option<Tensor<B, 2>>,
}

/// What a backbone calls at each prunable layer, in a fixed order, to get that layer's masks.
pub trait MaskSource<B: Backend> {
    /// Masks for prunable layer `layer`, whose input `features` (`[batch, c, h, w]`) sits at
    /// `stride` input pixels per feature pixel.
    fn layer_masks(&mut self, layer: usize, features: &Tensor<B, 4>, stride: usize) -> LayerMasks<B>;

    /// The DataMask alone, `[batch, 1, h, w]` at `stride` input pixels per pixel, for layers it
    /// prunes without units (the CNN's encoder and decoder under `DataScope::Network`); `None`
    /// when the DataMask is off.
    fn space_mask(&mut self, h: usize, w: usize, stride: usize) -> Option<Tensor<B, 4>>;
}

/// The dense model: no masks anywhere.
pub struct NoMasks;

impl<B: Backend> MaskSource<B> for NoMasks {
    fn layer_masks(&mut self, _: usize, _: &Tensor<B, 4>, _: usize) -> LayerMasks<B> {
        LayerMasks { space: None, units: None }
    }

    fn space_mask(&mut self, _: usize, _: usize, _: usize) -> Option<Tensor<B, 4>> {
        None
    }
}

/// Per-sample kept fractions of one layer, soft (for the budget loss) and hard (for MACs).
pub struct LayerFractions<B: Backend> {
    /// Soft kept fractions `[batch]`: mean S over the layer's pixels, mean unit score.
    pub soft: (Tensor<B, 1>, Tensor<B, 1>),
    /// Hard kept fractions `[batch]`: kept pixels / pixels, kept units / units.
    pub hard: (Tensor<B, 1>, Tensor<B, 1>),
    /// The hard unit mask `[batch, units]` (ModelMask active only).
    pub unit_mask: Option<Tensor<B, 2>>,
}

/// The method's masks for one batch: the DataMask from S (computed once), and the ModelMask of
/// each layer from that layer's gate on S-weighted features. Records the kept fractions.
pub struct DynamicMasks<'a, B: Backend> {
    masking: Masking,
    patch: usize,
    importance: Tensor<B, 3>,
    data_mask: Tensor<B, 3>,
    gates: &'a [UnitGate<B>],
    pub fractions: Vec<LayerFractions<B>>,
}

/// Nearest upsampling of a patch map to a layer's resolution, cropped to `h x w`.
///
/// # Shapes
/// - map: `[batch, hp, wp]`
/// - output: `[batch, 1, h, w]`
pub fn patches_to_pixels<B: Backend>(map: Tensor<B, 3>, cell: usize, h: usize, w: usize) -> Tensor<B, 4> {
    let [b, hp, wp] = map.dims();
    map.reshape([b, hp, 1, wp, 1])
        .expand([b, hp, cell, wp, cell])
        .reshape([b, hp * cell, wp * cell])
        .slice([0..b, 0..h, 0..w])
        .reshape([b, 1, h, w])
}

impl<'a, B: Backend> DynamicMasks<'a, B> {
    /// `importance`: S `[batch, hp, wp]` from the mask generator.
    pub fn new(importance: Tensor<B, 3>, gates: &'a [UnitGate<B>], masking: Masking, patch: usize) -> Self {
        let [b, hp, wp] = importance.dims();
        let data_mask = if masking.mode.data() {
            match masking.data_threshold {
                Some(tau) => masks::threshold_ste(importance.clone(), tau),
                None => {
                    masks::top_k_ste(importance.clone().reshape([b, hp * wp]), masking.data_keep).reshape([b, hp, wp])
                }
            }
        } else {
            importance.ones_like()
        };
        DynamicMasks { masking, patch, importance, data_mask, gates, fractions: Vec::new() }
    }

    pub fn importance(&self) -> &Tensor<B, 3> {
        &self.importance
    }

    /// The hard DataMask `[batch, hp, wp]` (ones when the DataMask is off).
    pub fn data_mask(&self) -> Tensor<B, 3> {
        self.data_mask.clone().detach()
    }
}

impl<B: Backend> MaskSource<B> for DynamicMasks<'_, B> {
    fn layer_masks(&mut self, layer: usize, features: &Tensor<B, 4>, stride: usize) -> LayerMasks<B> {
        let [b, _, h, w] = features.dims();
        let cell = self.patch / stride;
        let soft_space = patches_to_pixels(self.importance.clone(), cell, h, w);
        let device = features.device();
        let ones = || Tensor::<B, 1>::ones([b], &device);
        let (space, soft_s, hard_s) = if self.masking.mode.data() {
            let m = patches_to_pixels(self.data_mask.clone(), cell, h, w);
            let hard = m.clone().detach().mean_dims(&[2, 3]).reshape([b]);
            (Some(m), soft_space.clone().mean_dims(&[2, 3]).reshape([b]), hard)
        } else {
            (None, ones(), ones())
        };
        let (units, soft_u, hard_u) = if self.masking.mode.model() {
            let scores = self.gates[layer].forward(features.clone(), soft_space, &self.masking);
            let m = masks::top_k_ste(scores.clone(), self.masking.unit_keep);
            let hard = m.clone().detach().mean_dim(1).reshape([b]);
            (Some(m), scores.mean_dim(1).reshape([b]), hard)
        } else {
            (None, ones(), ones())
        };
        let unit_mask = units.as_ref().map(|u| u.clone().detach());
        self.fractions.push(LayerFractions { soft: (soft_s, soft_u), hard: (hard_s, hard_u), unit_mask });
        LayerMasks { space, units }
    }

    fn space_mask(&mut self, h: usize, w: usize, stride: usize) -> Option<Tensor<B, 4>> {
        let mode = self.masking.mode;
        mode.data().then(|| patches_to_pixels(self.data_mask.clone(), self.patch / stride, h, w))
    }
}

/// Masks given per sample as kept patch and unit lists, e.g. to run the reference forward with
/// exactly the masks the sparse executor used.
pub struct FixedMasks<B: Backend> {
    data: Tensor<B, 3>,
    units: Vec<Tensor<B, 2>>,
    patch: usize,
}

impl<B: Backend> FixedMasks<B> {
    /// `masks[b]`: kept patches of the `hp x wp` grid and kept units of each layer (of
    /// `layer_units[l]`).
    pub fn new(
        masks: &[dyna_pruner_exec::SampleMasks],
        (hp, wp): (usize, usize),
        layer_units: &[usize],
        patch: usize,
        device: &B::Device,
    ) -> Self {
        let b = masks.len();
        let mut data = vec![0.0f32; b * hp * wp];
        for (i, m) in masks.iter().enumerate() {
            m.patches.iter().for_each(|&p| data[i * hp * wp + p] = 1.0);
        }
        let units = layer_units
            .iter()
            .enumerate()
            .map(|(l, &units)| {
                let mut u = vec![0.0f32; b * units];
                for (i, m) in masks.iter().enumerate() {
                    m.units[l].iter().for_each(|&k| u[i * units + k] = 1.0);
                }
                Tensor::from_data(TensorData::new(u, [b, units]), device)
            })
            .collect();
        FixedMasks { data: Tensor::from_data(TensorData::new(data, [b, hp, wp]), device), units, patch }
    }
}

impl<B: Backend> MaskSource<B> for FixedMasks<B> {
    fn layer_masks(&mut self, layer: usize, features: &Tensor<B, 4>, stride: usize) -> LayerMasks<B> {
        let [_, _, h, w] = features.dims();
        LayerMasks {
            space: Some(patches_to_pixels(self.data.clone(), self.patch / stride, h, w)),
            units: Some(self.units[layer].clone()),
        }
    }

    fn space_mask(&mut self, h: usize, w: usize, stride: usize) -> Option<Tensor<B, 4>> {
        Some(patches_to_pixels(self.data.clone(), self.patch / stride, h, w))
    }
}
