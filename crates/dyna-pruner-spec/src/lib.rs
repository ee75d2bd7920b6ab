//! The model spec of dyna-pruner, shared by the trainer (`dyna-pruner`), the sparse executor
//! (`dyna-pruner-exec`) and the command line; serde only, no deep-learning framework.
//!
//! - [`ModelSpec`] is a run config's `[model]` section: the patch grid, the mask generator and
//!   one [`BackboneSpec`] (a tagged enum: each backbone carries only its own fields).
//! - [`Architecture`] binds a model spec to the data's [`Frames`]; it is what checkpoints and
//!   exported files store, and it lists each backbone's prunable layers and weights
//!   ([`weights`]), which the export and the executor's loader both iterate.
//! - [`Masking`] says how the masks are set at inference ([`masking`]).
//!
//! Files written before this layout (a flat `[model]` table, a flat `architecture` object) keep
//! loading through [`legacy`].

pub mod legacy;
pub mod masking;
pub mod weights;

use serde::{Deserialize, Serialize};

pub use masking::{kept_count, stats_per_channel, top_k, KeepRange, KeepRanges, MaskMode, Masking, PatchRule};
pub use weights::{unit_axes, weights, UnitAxis, WeightSpec};

/// The backbones that exist (the one list; [`BackboneSpec`] holds the sizes of one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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

/// Which layers of the CNN the DataMask prunes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataScope {
    /// The translator's blocks only: the encoder and decoder see every pixel, and pruned
    /// patches take the identity path through the translator.
    #[default]
    Translator,
    /// Every layer: the encoder's feature maps are zero off the kept patches (so a sparse
    /// executor computes them there only), the translator as above, and the decoder's change
    /// is zero off them, so pruned patches predict their last input frame (persistence).
    Network,
}

/// The SimVP-style CNN (trainer: `backbones/cnn.rs`, executor: `cnn.rs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CnnSpec {
    /// Width of the encoder, translator and decoder feature maps.
    pub hidden: usize,
    /// Hidden filters of each translator block: the ModelMask's units.
    pub units: usize,
    /// Translator blocks: the prunable layers.
    pub blocks: usize,
    /// Encoder stride (1 or 2): the translator runs at 1/stride of the input resolution.
    pub stride: usize,
    /// Which layers the DataMask prunes.
    pub data_scope: DataScope,
}

impl Default for CnnSpec {
    /// SimVP's translator width at half resolution.
    fn default() -> Self {
        CnnSpec { hidden: 64, units: 128, blocks: 6, stride: 2, data_scope: DataScope::Translator }
    }
}

/// The ViT over patch tokens (trainer: `backbones/vit.rs`, executor: `vit.rs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VitSpec {
    /// Token width.
    pub dim: usize,
    /// Attention heads per layer (a divisor of `dim`): the first prunable layer's units.
    pub heads: usize,
    /// MLP hidden units per layer: the second prunable layer's units.
    pub mlp: usize,
    /// Encoder layers (two prunable layers each).
    pub layers: usize,
}

impl Default for VitSpec {
    /// The weather ViT's sizes.
    fn default() -> Self {
        VitSpec { dim: 64, heads: 4, mlp: 128, layers: 4 }
    }
}

/// The ConvLSTM encoder-forecaster (trainer: `backbones/convlstm.rs`, executor: `convlstm.rs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConvLstmSpec {
    /// Width of the encoder and decoder feature maps.
    pub hidden: usize,
    /// Hidden (and cell) state channels of every cell: the ModelMask's units.
    pub units: usize,
    /// Stacked cells: the prunable layers.
    pub cells: usize,
    /// Input pixels per state pixel (the encoder's patch conv).
    pub stride: usize,
}

impl Default for ConvLstmSpec {
    /// The radar ConvLSTM's sizes.
    fn default() -> Self {
        ConvLstmSpec { hidden: 32, units: 32, cells: 2, stride: 4 }
    }
}

/// One backbone with its sizes; `kind` names it in configs and files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BackboneSpec {
    Cnn(CnnSpec),
    Vit(VitSpec),
    #[serde(rename = "convlstm")]
    ConvLstm(ConvLstmSpec),
}

impl Default for BackboneSpec {
    fn default() -> Self {
        BackboneSpec::Cnn(CnnSpec::default())
    }
}

impl BackboneSpec {
    pub fn kind(&self) -> BackboneKind {
        match self {
            BackboneSpec::Cnn(_) => BackboneKind::Cnn,
            BackboneSpec::Vit(_) => BackboneKind::Vit,
            BackboneSpec::ConvLstm(_) => BackboneKind::ConvLstm,
        }
    }

    /// The backbone of `kind` with its default sizes.
    pub fn of_kind(kind: BackboneKind) -> BackboneSpec {
        match kind {
            BackboneKind::Cnn => BackboneSpec::Cnn(CnnSpec::default()),
            BackboneKind::Vit => BackboneSpec::Vit(VitSpec::default()),
            BackboneKind::ConvLstm => BackboneSpec::ConvLstm(ConvLstmSpec::default()),
        }
    }
}

/// The mask generator: per-patch statistics -> two 3x3 convs -> importance S.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GeneratorSpec {
    /// Hidden width of its convolutions.
    pub width: usize,
    /// It also reads the signed mean temporal difference per patch (where things arrive).
    pub motion: bool,
    /// A budget-conditioned model: the range its keep ratios were drawn from while training
    /// (the run config's `method.keep_range`). The mask generator and every unit gate then
    /// read the forward's two keep ratios ([`Masking::budget_inputs`]) as inputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_range: Option<KeepRange>,
    /// The unit keep ratios' own range when it differs from `keep_range` (the run config's
    /// `method.unit_keep_range`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_keep_range: Option<KeepRange>,
}

impl Default for GeneratorSpec {
    fn default() -> Self {
        GeneratorSpec { width: 16, motion: false, keep_range: None, unit_keep_range: None }
    }
}

impl GeneratorSpec {
    /// The trained keep ranges of a budget-conditioned model.
    pub fn keep_ranges(&self) -> Option<KeepRanges> {
        KeepRanges::new(self.keep_range, self.unit_keep_range)
    }

    /// Inputs the mask generator and each unit gate take besides the features: the two keep
    /// ratios of a budget-conditioned model, none otherwise.
    pub fn budget_inputs(&self) -> usize {
        if self.keep_range.is_some() {
            2
        } else {
            0
        }
    }
}

/// A run config's `[model]` section: everything about the network but the data's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSpec {
    /// Patch side in input pixels: the DataMask's unit (a multiple of the CNN's and the
    /// ConvLSTM's stride; the ViT's token side).
    pub patch: usize,
    pub generator: GeneratorSpec,
    pub backbone: BackboneSpec,
}

impl Default for ModelSpec {
    fn default() -> Self {
        ModelSpec { patch: 2, generator: GeneratorSpec::default(), backbone: BackboneSpec::default() }
    }
}

/// The data's shape: frames in, frames out, channels per frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Frames {
    pub t_in: usize,
    pub t_out: usize,
    pub channels: usize,
}

/// A model spec bound to the data's shape: enough to build the network and read its weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Architecture {
    pub frames: Frames,
    pub model: ModelSpec,
}

/// One layer whose positions (DataMask) and units (ModelMask) can be pruned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrunableLayer {
    /// Channels of the layer input (what the unit gate pools).
    pub in_channels: usize,
    /// Prunable units (hidden filters, heads, MLP units, state channels).
    pub units: usize,
    /// Input pixels per feature pixel at this layer.
    pub stride: usize,
}

impl Architecture {
    /// `backbone` over `frames` with `patch`-pixel patches and the default mask generator.
    pub fn new(frames: Frames, patch: usize, backbone: BackboneSpec) -> Architecture {
        Architecture { frames, model: ModelSpec { patch, generator: GeneratorSpec::default(), backbone } }
    }

    /// The same architecture with the mask generator `generator`.
    pub fn with_generator(mut self, generator: GeneratorSpec) -> Architecture {
        self.model.generator = generator;
        self
    }

    /// The same architecture with `other`'s mask generator and (CNN) DataMask scope: the parts a
    /// dense checkpoint leaves open for the dynamic model fine-tuned from it.
    pub fn with_generator_of(&self, other: &Architecture) -> Architecture {
        let mut a = self.clone().with_generator(other.model.generator);
        if let (BackboneSpec::Cnn(mine), BackboneSpec::Cnn(theirs)) = (&mut a.model.backbone, &other.model.backbone) {
            mine.data_scope = theirs.data_scope;
        }
        a
    }

    pub fn kind(&self) -> BackboneKind {
        self.model.backbone.kind()
    }

    pub fn patch(&self) -> usize {
        self.model.patch
    }

    /// The prunable layers, in the order the backbone asks for their masks (one unit gate each).
    pub fn prunable_layers(&self) -> Vec<PrunableLayer> {
        let patch = self.model.patch;
        match &self.model.backbone {
            BackboneSpec::Cnn(s) => {
                vec![PrunableLayer { in_channels: s.hidden, units: s.units, stride: s.stride }; s.blocks]
            }
            BackboneSpec::Vit(s) => {
                let attention = PrunableLayer { in_channels: s.dim, units: s.heads, stride: patch };
                let mlp = PrunableLayer { in_channels: s.dim, units: s.mlp, stride: patch };
                (0..s.layers).flat_map(|_| [attention, mlp]).collect()
            }
            BackboneSpec::ConvLstm(s) => {
                vec![PrunableLayer { in_channels: s.hidden, units: s.units, stride: s.stride }; s.cells]
            }
        }
    }

    /// Units of each prunable layer, in mask order.
    pub fn layer_units(&self) -> Vec<usize> {
        self.prunable_layers().iter().map(|l| l.units).collect()
    }

    /// Patches of a `height x width` frame: `(rows, columns)`.
    pub fn patch_grid(&self, height: usize, width: usize) -> (usize, usize) {
        (height.div_ceil(self.model.patch), width.div_ceil(self.model.patch))
    }

    /// Checks every size against its allowed range; fields are named as in a run config
    /// (`data.t_in`, `model.backbone.hidden`).
    pub fn validate(&self) -> Result<(), SpecError> {
        let f = &self.frames;
        in_range("data.t_in", f.t_in, 1, 64)?;
        in_range("data.t_out", f.t_out, 1, 64)?;
        in_range("channels", f.channels, 1, 4096)?;
        self.model.validate()
    }
}

impl ModelSpec {
    /// Checks every size against its allowed range (fields named `model.*`).
    pub fn validate(&self) -> Result<(), SpecError> {
        in_range("model.patch", self.patch, 1, 256)?;
        in_range("model.generator.width", self.generator.width, 1, 256)?;
        let stride = match &self.backbone {
            BackboneSpec::Cnn(s) => {
                in_range("model.backbone.hidden", s.hidden, 1, 1024)?;
                in_range("model.backbone.units", s.units, 1, 4096)?;
                in_range("model.backbone.blocks", s.blocks, 1, 64)?;
                in_range("model.backbone.stride", s.stride, 1, 2)?;
                s.stride
            }
            BackboneSpec::Vit(s) => {
                in_range("model.backbone.dim", s.dim, 1, 1024)?;
                in_range("model.backbone.heads", s.heads, 1, 64)?;
                in_range("model.backbone.mlp", s.mlp, 1, 4096)?;
                in_range("model.backbone.layers", s.layers, 1, 64)?;
                if !s.dim.is_multiple_of(s.heads) {
                    return Err(SpecError::new(
                        "model.backbone.heads",
                        s.heads,
                        format!("a divisor of model.backbone.dim = {}", s.dim),
                    ));
                }
                1
            }
            BackboneSpec::ConvLstm(s) => {
                in_range("model.backbone.hidden", s.hidden, 1, 1024)?;
                in_range("model.backbone.units", s.units, 1, 4096)?;
                in_range("model.backbone.cells", s.cells, 1, 64)?;
                in_range("model.backbone.stride", s.stride, 1, 16)?;
                s.stride
            }
        };
        if !self.patch.is_multiple_of(stride) {
            return Err(SpecError::new(
                "model.patch",
                self.patch,
                format!("a multiple of model.backbone.stride = {stride}"),
            ));
        }
        Ok(())
    }
}

/// A value outside its allowed range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field} = {value}: expected {expected}")]
pub struct SpecError {
    /// The field as a run config names it.
    pub field: String,
    pub value: String,
    pub expected: String,
}

impl SpecError {
    pub fn new(field: &str, value: impl ToString, expected: impl Into<String>) -> SpecError {
        SpecError { field: field.into(), value: value.to_string(), expected: expected.into() }
    }
}

/// `v` in `lo..=hi`, or an error naming `field`.
pub fn in_range(field: &str, v: usize, lo: usize, hi: usize) -> Result<(), SpecError> {
    if (lo..=hi).contains(&v) {
        Ok(())
    } else {
        Err(SpecError::new(field, v, format!("an integer in {lo}..={hi}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arch(backbone: BackboneSpec, patch: usize) -> Architecture {
        Architecture::new(Frames { t_in: 3, t_out: 2, channels: 2 }, patch, backbone)
    }

    #[test]
    fn command_line_names_are_the_config_names() {
        for kind in BackboneKind::ALL {
            assert_eq!(serde_json::to_string(&kind).unwrap(), format!("\"{}\"", kind.name()));
            let spec = BackboneSpec::of_kind(kind);
            assert_eq!(spec.kind(), kind);
            let json = serde_json::to_value(&spec).unwrap();
            assert_eq!(json["kind"], kind.name());
        }
    }

    #[test]
    fn a_model_section_reads_from_toml_with_defaults_per_backbone() {
        let m: ModelSpec = toml::from_str("patch = 4\n[backbone]\nkind = \"vit\"\nheads = 2\n").unwrap();
        assert_eq!(m.backbone, BackboneSpec::Vit(VitSpec { heads: 2, ..VitSpec::default() }));
        assert_eq!(m.generator, GeneratorSpec::default());
        let m: ModelSpec = toml::from_str("[backbone]\nkind = \"convlstm\"\n").unwrap();
        assert_eq!(m.backbone, BackboneSpec::ConvLstm(ConvLstmSpec::default()));
        assert_eq!(toml::from_str::<ModelSpec>("").unwrap(), ModelSpec::default());
    }

    #[test]
    fn fields_of_another_backbone_are_rejected() {
        // A ViT has no stride; a CNN has no heads.
        let err = toml::from_str::<ModelSpec>("[backbone]\nkind = \"vit\"\nstride = 4\n").unwrap_err();
        assert!(err.to_string().contains("stride"), "{err}");
        let err = toml::from_str::<ModelSpec>("[backbone]\nkind = \"cnn\"\nheads = 1\n").unwrap_err();
        assert!(err.to_string().contains("heads"), "{err}");
        assert!(toml::from_str::<ModelSpec>("[backbone]\nkind = \"mlp\"\n").is_err());
    }

    #[test]
    fn architectures_round_trip_through_json() {
        for kind in BackboneKind::ALL {
            let a = arch(BackboneSpec::of_kind(kind), 4);
            let back: Architecture = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
            assert_eq!(back, a);
        }
    }

    #[test]
    fn validation_names_the_field_and_range() {
        let cnn = |stride, patch| arch(BackboneSpec::Cnn(CnnSpec { stride, ..CnnSpec::default() }), patch);
        cnn(2, 4).validate().unwrap();
        let e = cnn(2, 3).validate().unwrap_err();
        assert_eq!(e.field, "model.patch");
        assert!(e.expected.contains("multiple of model.backbone.stride = 2"), "{e}");
        assert_eq!(cnn(3, 3).validate().unwrap_err().field, "model.backbone.stride");
        let vit = arch(BackboneSpec::Vit(VitSpec { dim: 10, heads: 4, ..VitSpec::default() }), 3);
        assert!(vit.validate().unwrap_err().to_string().contains("a divisor of model.backbone.dim = 10"));
        let e = Architecture { frames: Frames { t_in: 0, t_out: 1, channels: 1 }, ..cnn(2, 2) }.validate();
        assert_eq!(e.unwrap_err().field, "data.t_in");
    }

    #[test]
    fn prunable_layers_follow_the_backbone() {
        let vit = arch(BackboneSpec::Vit(VitSpec { dim: 8, heads: 2, mlp: 5, layers: 3 }), 4);
        assert_eq!(vit.layer_units(), vec![2, 5, 2, 5, 2, 5]);
        assert!(vit.prunable_layers().iter().all(|l| l.stride == 4 && l.in_channels == 8));
        let lstm = arch(BackboneSpec::ConvLstm(ConvLstmSpec { units: 7, cells: 2, ..Default::default() }), 8);
        assert_eq!(lstm.layer_units(), vec![7, 7]);
        assert_eq!(arch(BackboneSpec::default(), 2).patch_grid(9, 4), (5, 2));
    }
}
