//! Files written before the tagged backbone: a flat `[model]` table (`backbone = "cnn"`,
//! `hidden`, `units`, `blocks`, `heads`, `stride`, `patch`, `generator_width`, ...) and a flat
//! `architecture` object in `checkpoint.json`. They are read into today's types, so shipped
//! checkpoints and old configs keep working; new files are always written in today's layout.
//!
//! Use [`model_spec`] and [`architecture`] as serde `deserialize_with` functions.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::{
    Architecture, BackboneKind, BackboneSpec, CnnSpec, ConvLstmSpec, DataScope, Frames, GeneratorSpec, ModelSpec,
    VitSpec,
};

/// The flat `[model]` table, with the defaults it had.
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FlatModel {
    backbone: BackboneKind,
    /// CNN, ConvLSTM: feature-map width; ViT: token width.
    hidden: usize,
    /// CNN: hidden filters per block; ViT: MLP hidden units; ConvLSTM: state channels.
    units: usize,
    /// CNN: blocks; ViT: layers; ConvLSTM: cells.
    blocks: usize,
    heads: usize,
    /// CNN, ConvLSTM: encoder stride (ignored for the ViT, whose layers sit at `patch`).
    stride: usize,
    patch: usize,
    generator_width: usize,
    generator_motion: bool,
    data_scope: DataScope,
}

impl Default for FlatModel {
    fn default() -> Self {
        FlatModel {
            backbone: BackboneKind::Cnn,
            hidden: 64,
            units: 128,
            blocks: 6,
            heads: 4,
            stride: 2,
            patch: 2,
            generator_width: 16,
            generator_motion: false,
            data_scope: DataScope::Translator,
        }
    }
}

impl TryFrom<FlatModel> for ModelSpec {
    type Error = String;

    fn try_from(m: FlatModel) -> Result<ModelSpec, String> {
        if m.data_scope == DataScope::Network && m.backbone != BackboneKind::Cnn {
            return Err(format!("data_scope = \"network\" needs backbone = \"cnn\", not \"{}\"", m.backbone.name()));
        }
        let backbone = match m.backbone {
            BackboneKind::Cnn => BackboneSpec::Cnn(CnnSpec {
                hidden: m.hidden,
                units: m.units,
                blocks: m.blocks,
                stride: m.stride,
                data_scope: m.data_scope,
            }),
            BackboneKind::Vit => {
                BackboneSpec::Vit(VitSpec { dim: m.hidden, heads: m.heads, mlp: m.units, layers: m.blocks })
            }
            BackboneKind::ConvLstm => BackboneSpec::ConvLstm(ConvLstmSpec {
                hidden: m.hidden,
                units: m.units,
                cells: m.blocks,
                stride: m.stride,
            }),
        };
        Ok(ModelSpec {
            patch: m.patch,
            generator: GeneratorSpec {
                width: m.generator_width,
                motion: m.generator_motion,
                ..GeneratorSpec::default()
            },
            backbone,
        })
    }
}

/// Keys only the flat layout has.
const FLAT_ONLY: [&str; 8] =
    ["hidden", "units", "blocks", "heads", "stride", "generator_width", "generator_motion", "data_scope"];

fn is_flat(v: &Value) -> bool {
    v.get("backbone").is_some_and(Value::is_string) || FLAT_ONLY.iter().any(|k| v.get(k).is_some())
}

/// Reads a `[model]` section in either layout.
pub fn model_spec<'de, D: Deserializer<'de>>(d: D) -> Result<ModelSpec, D::Error> {
    let v = Value::deserialize(d)?;
    if is_flat(&v) {
        let flat = serde_json::from_value::<FlatModel>(v).map_err(D::Error::custom)?;
        ModelSpec::try_from(flat).map_err(D::Error::custom)
    } else {
        serde_json::from_value::<ModelSpec>(v).map_err(D::Error::custom)
    }
}

/// Reads an `architecture` object in either layout (the flat one has `t_in`, `t_out` and
/// `channels` beside the model's fields).
pub fn architecture<'de, D: Deserializer<'de>>(d: D) -> Result<Architecture, D::Error> {
    let mut v = Value::deserialize(d)?;
    if v.get("frames").is_some() {
        return serde_json::from_value(v).map_err(D::Error::custom);
    }
    let mut take = |key: &str| {
        v.as_object_mut()
            .and_then(|o| o.remove(key))
            .and_then(|n| n.as_u64())
            .ok_or_else(|| D::Error::custom(format!("architecture: missing or bad `{key}`")))
    };
    let frames =
        Frames { t_in: take("t_in")? as usize, t_out: take("t_out")? as usize, channels: take("channels")? as usize };
    let model = serde_json::from_value::<FlatModel>(v).map_err(D::Error::custom)?;
    Ok(Architecture { frames, model: ModelSpec::try_from(model).map_err(D::Error::custom)? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Section {
        #[serde(deserialize_with = "model_spec")]
        model: ModelSpec,
    }

    #[derive(Deserialize)]
    struct Meta {
        #[serde(deserialize_with = "architecture")]
        architecture: Architecture,
    }

    fn model(toml_text: &str) -> Result<ModelSpec, toml::de::Error> {
        toml::from_str::<Section>(toml_text).map(|s| s.model)
    }

    #[test]
    fn a_flat_model_table_reads_as_the_tagged_spec() {
        let vit = model(
            "[model]\nbackbone = \"vit\"\nhidden = 64\nunits = 128\nblocks = 4\nheads = 4\npatch = 4\nstride = 2\n",
        )
        .unwrap();
        assert_eq!(vit.backbone, BackboneSpec::Vit(VitSpec { dim: 64, heads: 4, mlp: 128, layers: 4 }));
        assert_eq!(vit.patch, 4);
        let cnn = model("[model]\nhidden = 32\ngenerator_motion = true\n").unwrap();
        assert_eq!(cnn.backbone, BackboneSpec::Cnn(CnnSpec { hidden: 32, ..CnnSpec::default() }));
        assert!(cnn.generator.motion);
        let lstm = model("[model]\nbackbone = \"convlstm\"\nblocks = 3\nstride = 4\npatch = 16\n").unwrap();
        assert_eq!(lstm.backbone, BackboneSpec::ConvLstm(ConvLstmSpec { cells: 3, hidden: 64, units: 128, stride: 4 }));
        let err = model("[model]\nbackbone = \"vit\"\ndata_scope = \"network\"\n").unwrap_err().to_string();
        assert!(err.contains("data_scope"), "{err}");
    }

    #[test]
    fn the_tagged_layout_reads_as_itself_and_reports_its_errors() {
        let m = model("[model]\npatch = 4\n[model.backbone]\nkind = \"cnn\"\nhidden = 8\n").unwrap();
        assert_eq!(m.backbone, BackboneSpec::Cnn(CnnSpec { hidden: 8, ..CnnSpec::default() }));
        let err = model("[model]\npach = 4\n").unwrap_err().to_string();
        assert!(err.contains("pach"), "{err}");
        let err = model("[model]\nhidden = 4\nhiden = 3\n").unwrap_err().to_string();
        assert!(err.contains("hiden"), "{err}");
    }

    #[test]
    fn a_flat_checkpoint_architecture_reads_as_the_tagged_spec() {
        let json = r#"{"architecture": {"backbone": "cnn", "t_in": 4, "t_out": 4, "channels": 2, "hidden": 32,
            "units": 64, "blocks": 8, "stride": 2, "patch": 2, "generator_width": 16}}"#;
        let a = serde_json::from_str::<Meta>(json).unwrap().architecture;
        assert_eq!(a.frames, Frames { t_in: 4, t_out: 4, channels: 2 });
        assert_eq!(
            a.model.backbone,
            BackboneSpec::Cnn(CnnSpec { hidden: 32, units: 64, blocks: 8, ..CnnSpec::default() })
        );
        let current = format!("{{\"architecture\": {}}}", serde_json::to_string(&a).unwrap());
        assert_eq!(serde_json::from_str::<Meta>(&current).unwrap().architecture, a);
        assert!(serde_json::from_str::<Meta>(r#"{"architecture": {"backbone": "cnn", "t_in": 4}}"#).is_err());
    }
}
