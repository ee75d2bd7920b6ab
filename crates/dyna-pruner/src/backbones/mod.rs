//! The backbones the method wraps. [`BackboneKind`] lists them; [`Backbone`] holds one.
//!
//! The contract ([`SpatioTemporal`]): map `[batch, t_in, c, h, w]` to `[batch, t_out, c, h, w]`,
//! ask the [`MaskSource`] for masks at each prunable layer (in the order of
//! [`SpatioTemporal::prunable_layers`]), apply them so that pruned positions and units cost
//! nothing in a sparse executor, and count dense MACs analytically.

pub mod cnn;
pub mod convlstm;
pub mod vit;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::method::MaskSource;

/// The backbones that exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackboneKind {
    /// SimVP-style CNN: strided conv encoder -> masked residual translator -> decoder.
    Cnn,
    /// ViT over patches: token dropping, attention heads and MLP units as units.
    Vit,
    /// ConvLSTM encoder-forecaster: state updates only at kept positions, hidden channels as units.
    #[serde(rename = "convlstm")]
    ConvLstm,
}

impl BackboneKind {
    pub const ALL: [BackboneKind; 3] = [BackboneKind::Cnn, BackboneKind::Vit, BackboneKind::ConvLstm];

    /// The name used in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            BackboneKind::Cnn => "cnn",
            BackboneKind::Vit => "vit",
            BackboneKind::ConvLstm => "convlstm",
        }
    }
}

/// Which layers of the CNN the DataMask prunes (defined beside the executor, which reads it
/// from exported files).
pub use dyna_pruner_exec::DataScope;

/// One layer whose positions (DataMask) and units (ModelMask) can be pruned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrunableLayer {
    /// Channels of the layer input (what the unit gate pools).
    pub in_channels: usize,
    /// Prunable units (hidden filters).
    pub units: usize,
    /// Input pixels per feature pixel at this layer.
    pub stride: usize,
}

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

    /// The prunable layers, in the order `forward` asks for their masks.
    fn prunable_layers(&self) -> Vec<PrunableLayer>;

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

impl<B: Backend> SpatioTemporal<B> for Backbone<B> {
    fn forward(&self, x: Tensor<B, 5>, masks: &mut dyn MaskSource<B>) -> Tensor<B, 5> {
        match self {
            Backbone::Cnn(m) => m.forward(x, masks),
            Backbone::Vit(m) => m.forward(x, masks),
            Backbone::ConvLstm(m) => m.forward(x, masks),
        }
    }

    fn prunable_layers(&self) -> Vec<PrunableLayer> {
        match self {
            Backbone::Cnn(m) => m.prunable_layers(),
            Backbone::Vit(m) => m.prunable_layers(),
            Backbone::ConvLstm(m) => m.prunable_layers(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_names_are_the_config_names() {
        for kind in BackboneKind::ALL {
            assert_eq!(serde_json::to_string(&kind).unwrap(), format!("\"{}\"", kind.name()));
        }
    }
}
