//! The backbones the method wraps. [`BackboneKind`] (in the spec crate) lists them; [`Backbone`]
//! holds one, built from its [`BackboneSpec`].
//!
//! The contract ([`SpatioTemporal`]): map `[batch, t_in, c, h, w]` to `[batch, t_out, c, h, w]`,
//! ask the [`MaskSource`] for masks at each prunable layer (in the order of
//! [`Architecture::prunable_layers`]), apply them so that pruned positions and units cost
//! nothing in a sparse executor, and count dense MACs analytically.

pub mod cnn;
pub mod convlstm;
pub mod vit;

use burn::prelude::*;
use dyna_pruner_spec::{Architecture, BackboneSpec};

use crate::method::MaskSource;

pub use dyna_pruner_spec::{BackboneKind, DataScope, PrunableLayer};

/// Dense MACs per sample: the part no mask touches, the part only the DataMask prunes, and each prunable layer's, split into the
/// part linear in the kept positions and the part over pairs of kept positions (attention).
#[derive(Debug, Clone, PartialEq)]
pub struct BackboneMacs {
    pub fixed: u64,
    /// Layers that only the DataMask prunes: scale with the kept positions (the CNN's encoder
    /// and decoder under [`DataScope::Network`]).
    pub spatial: u64,
    /// Scales with kept positions x kept units.
    pub layers: Vec<u64>,
    /// Scales with kept positions^2 x kept units.
    pub pairwise: Vec<u64>,
}

/// What every backbone implements.
pub trait SpatioTemporal<B: Backend> {
    /// Prediction.
    ///
    /// # Shapes
    /// - x: `[batch, t_in, channels, height, width]`
    /// - output: `[batch, t_out, channels, height, width]`
    fn forward(&self, x: Tensor<B, 5>, masks: &mut dyn MaskSource<B>) -> Tensor<B, 5>;

    /// Dense MACs per sample for frames of `height x width`.
    fn macs(&self, height: usize, width: usize) -> BackboneMacs;
}

/// One backbone of any kind.
// A model holds exactly one backbone, never a collection of them: the size difference is moot.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Backbone<B: Backend> {
    Cnn(cnn::Cnn<B>),
    Vit(vit::Vit<B>),
    ConvLstm(convlstm::ConvLstm<B>),
}

impl<B: Backend> Backbone<B> {
    /// A freshly initialised backbone of `arch`.
    pub fn new(arch: &Architecture, device: &B::Device) -> Self {
        let (frames, patch) = (arch.frames, arch.model.patch);
        match &arch.model.backbone {
            BackboneSpec::Cnn(s) => Backbone::Cnn(cnn::Cnn::new(frames, s, device)),
            BackboneSpec::Vit(s) => Backbone::Vit(vit::Vit::new(frames, patch, s, device)),
            BackboneSpec::ConvLstm(s) => Backbone::ConvLstm(convlstm::ConvLstm::new(frames, s, device)),
        }
    }
}

impl<B: Backend> SpatioTemporal<B> for Backbone<B> {
    fn forward(&self, x: Tensor<B, 5>, masks: &mut dyn MaskSource<B>) -> Tensor<B, 5> {
        match self {
            Backbone::Cnn(m) => m.forward(x, masks),
            Backbone::Vit(m) => m.forward(x, masks),
            Backbone::ConvLstm(m) => m.forward(x, masks),
        }
    }

    fn macs(&self, height: usize, width: usize) -> BackboneMacs {
        match self {
            Backbone::Cnn(m) => m.macs(height, width),
            Backbone::Vit(m) => m.macs(height, width),
            Backbone::ConvLstm(m) => m.macs(height, width),
        }
    }
}
