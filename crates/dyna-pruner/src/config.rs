//! Run configuration: TOML with every field defaulted, validated up front into a [`Plan`].
//! A bad value is reported with its field, the value and the allowed range.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backbones::{BackboneKind, DataScope};
use crate::data::timeslots::parse_date;
use crate::data::{DateRange, SlotFormat, Split};
use crate::error::{Error, Result};
use crate::method::MaskMode;
use crate::model::Architecture;

/// What kind of files `data.files` are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// Crowd flow: ST-ResNet HDF5 files (`data` + `date`) or one OpenSTL `dataset.npz`.
    #[default]
    Crowd,
    /// Gridded netCDF-3/4 variables on a lat/lon grid (ERA5, WeatherBench), one channel each.
    Netcdf,
    /// KNMI 5-minute radar composites, one HDF5 file per frame (`data.files`: files or directories).
    Knmi,
    /// SEVIR `vil` events: `data.catalog` (CATALOG.csv) and the HDF5 files it names under `data.root`.
    Sevir,
    /// Seeded synthetic radar (`data.synthetic`), for tests and benchmarks at any size.
    SyntheticRadar,
}

/// The synthetic radar data set (`data.format = "synthetic_radar"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyntheticRadarConfig {
    /// Independent runs, one per day from 2020-01-01.
    pub sequences: usize,
    /// Frames per run.
    pub frames: usize,
    /// Frame side in pixels.
    pub size: usize,
    pub seed: u64,
}

impl Default for SyntheticRadarConfig {
    fn default() -> Self {
        SyntheticRadarConfig { sequences: 200, frames: 12, size: 64, seed: 7 }
    }
}

/// One channel of netCDF data: a variable, at one value of each dimension other than time,
/// latitude and longitude (e.g. `level = 850`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelSpec {
    /// Variable name inside the files (`t2m`, `z`, `t`).
    pub var: String,
    /// WeatherBench directory of the variable under `data.root` (`2m_temperature`,
    /// `temperature_850`); without it the variable is read from `data.files`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    /// Coordinate value to take on each extra dimension, e.g. `{ level = 850 }`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub select: std::collections::BTreeMap<String, f64>,
}

/// Where the data comes from and how it is cut.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    pub format: DataFormat,
    /// Crowd: HDF5 files (merged) or one OpenSTL `dataset.npz`. netCDF: files holding every
    /// channel without a `dir`, concatenated in time. Relative to the working directory.
    pub files: Vec<PathBuf>,
    pub slot_format: SlotFormat,
    /// netCDF: the channels, stacked in this order.
    pub channels: Vec<ChannelSpec>,
    /// netCDF, WeatherBench layout: the directory holding one directory per variable, each with
    /// yearly files `*_{year}_*.nc`.
    pub root: Option<PathBuf>,
    /// netCDF, WeatherBench layout: the years to read.
    pub years: Vec<i32>,
    /// SEVIR: the catalog (CATALOG.csv); the files it names are under `data.root` (default: the
    /// catalog's directory joined with `data`).
    pub catalog: Option<PathBuf>,
    /// KNMI: average `pool x pool` pixel blocks (1: full 1 km resolution).
    pub pool: usize,
    /// Synthetic radar: the generated data set.
    pub synthetic: SyntheticRadarConfig,
    pub t_in: usize,
    pub t_out: usize,
    /// Time steps from the last input frame to the first target (1: the next frame; 72 with
    /// hourly data and `t_out = 1`: WeatherBench's 3-day forecast).
    pub lead: usize,
    /// `[from, to)` as `YYYY-MM-DD`.
    pub train: [String; 2],
    pub val: [String; 2],
    pub test: [String; 2],
    /// npz only: the last fraction of the training windows used for validation.
    pub val_fraction: f32,
    /// When > 0: split by position in time instead of dates; the last `test_frames` frames are
    /// the test set and the `val_frames` before them validation.
    pub val_frames: usize,
    pub test_frames: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        let taxi = |y: u32| PathBuf::from(format!("data/taxinyc/NYC{y}_Taxi_M16x8_T60_InOut.h5"));
        DataConfig {
            format: DataFormat::Crowd,
            files: vec![taxi(10), taxi(11), taxi(12), taxi(13)],
            slot_format: SlotFormat::Auto,
            channels: Vec::new(),
            root: None,
            years: Vec::new(),
            catalog: None,
            pool: 1,
            synthetic: SyntheticRadarConfig::default(),
            t_in: 4,
            t_out: 4,
            lead: 1,
            train: ["2010-01-01".into(), "2013-01-01".into()],
            val: ["2013-01-01".into(), "2013-07-01".into()],
            test: ["2013-07-01".into(), "2014-01-01".into()],
            val_fraction: 0.1,
            val_frames: 0,
            test_frames: 0,
        }
    }
}

/// The backbone and the patch grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    pub backbone: BackboneKind,
    /// CNN, ConvLSTM: feature-map width; ViT: token width.
    pub hidden: usize,
    /// CNN: hidden filters per block; ViT: MLP hidden units per layer; ConvLSTM: state channels.
    pub units: usize,
    /// CNN: translator blocks; ViT: encoder layers; ConvLSTM: stacked cells.
    pub blocks: usize,
    /// ViT: attention heads per layer (a divisor of `hidden`).
    pub heads: usize,
    /// CNN (1 or 2), ConvLSTM: encoder stride (the ViT's tokens sit at `patch`).
    pub stride: usize,
    pub patch: usize,
    pub generator_width: usize,
    /// The mask generator also reads the signed temporal difference (the direction things move).
    pub generator_motion: bool,
    /// CNN: which layers the DataMask prunes, `"translator"` (default) or `"network"` (also the
    /// encoder and decoder; pruned patches then predict persistence).
    pub data_scope: DataScope,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
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

/// How the DataMask's patch budget is shared between samples while training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataRule {
    /// Every sample keeps its own top `ceil(data_keep * N)` patches, at inference too.
    #[default]
    PerSample,
    /// The batch keeps its top `data_keep` of all its samples' patches, so a sample with more
    /// important patches keeps more of them; at inference a threshold on S, calibrated on the
    /// training windows to keep `data_keep` of their patches, does the same per sample.
    Batch,
}

/// The pruning method's targets and loss weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MethodConfig {
    pub mode: MaskMode,
    /// Final fraction of patches kept by the DataMask (per sample, or on average: `data_rule`).
    pub data_keep: f32,
    /// How that fraction is shared between samples.
    pub data_rule: DataRule,
    /// Final fraction of units kept by the ModelMask.
    pub unit_keep: f32,
    /// Weight lambda of the FLOPs-budget loss.
    pub budget_weight: f32,
    /// Epochs over which the keep ratios anneal from 1 to their targets.
    pub warmup_epochs: f32,
    /// Weight of `mse(prediction, teacher prediction)` when `train.init_from` is set.
    pub distill_weight: f32,
    /// Weight of the supervision of S by the patches whose targets hold signal (0: off).
    pub mask_target_weight: f32,
    /// A patch holds signal when a target value exceeds this (scaled units: VIL / 255 for radar).
    pub mask_target_level: f32,
}

impl Default for MethodConfig {
    fn default() -> Self {
        MethodConfig {
            mode: MaskMode::Dense,
            data_keep: 1.0,
            data_rule: DataRule::PerSample,
            unit_keep: 1.0,
            budget_weight: 1.0,
            warmup_epochs: 1.0,
            distill_weight: 1.0,
            mask_target_weight: 0.0,
            mask_target_level: 0.0,
        }
    }
}

/// The optimizer and the schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub seed: u64,
    /// Use every n-th training window (1: all).
    pub window_stride: usize,
    /// Checkpoint to start from (the trained dense model); it is also the distillation teacher.
    pub init_from: Option<PathBuf>,
    /// Output checkpoint directory.
    pub out: PathBuf,
    /// When > 0: train on random `crop x crop` windows of the frames (validation and test use
    /// whole frames).
    pub crop: usize,
    /// Random flips and 90-degree rotations of the training windows (square crops only).
    pub augment: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 10,
            batch_size: 32,
            lr: 1e-3,
            seed: 42,
            window_stride: 1,
            init_from: None,
            out: PathBuf::from("runs/model"),
            crop: 0,
            augment: false,
        }
    }
}

/// A whole run configuration (`dyna-pruner train --config FILE`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    pub data: DataConfig,
    pub model: ModelConfig,
    pub method: MethodConfig,
    pub train: TrainConfig,
}

/// A validated [`RunConfig`] with its dates parsed.
#[derive(Debug, Clone)]
pub struct Plan {
    pub config: RunConfig,
    pub split: Split,
}

impl Plan {
    /// The model architecture for data with `channels` channels per frame.
    pub fn architecture(&self, channels: usize) -> Architecture {
        let (d, m) = (&self.config.data, &self.config.model);
        Architecture {
            backbone: m.backbone,
            t_in: d.t_in,
            t_out: d.t_out,
            channels,
            hidden: m.hidden,
            units: m.units,
            blocks: m.blocks,
            heads: m.heads,
            // The ViT's prunable layers sit on the token grid.
            stride: if m.backbone == BackboneKind::Vit { m.patch } else { m.stride },
            patch: m.patch,
            generator_width: m.generator_width,
            generator_motion: m.generator_motion,
            data_scope: m.data_scope,
        }
    }
}

impl RunConfig {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Plan> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let config: RunConfig = toml::from_str(&text).map_err(|e| Error::Format {
            path: path.to_path_buf(),
            format: "TOML run config",
            detail: e.to_string(),
        })?;
        config.validate().map_err(|e| match e {
            Error::Config { field, value, expected, .. } => {
                Error::Config { file: Some(path.to_path_buf()), field, value, expected }
            }
            other => other,
        })
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a RunConfig always serializes")
    }

    /// Checks every field against its allowed range.
    pub fn validate(self) -> Result<Plan> {
        let bad = |field: &str, value: String, expected: &str| Error::Config {
            file: None,
            field: field.into(),
            value,
            expected: expected.into(),
        };
        let in_range = |field: &str, v: usize, lo: usize, hi: usize| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(bad(field, v.to_string(), &format!("an integer in {lo}..={hi}")))
            }
        };
        let fraction = |field: &str, v: f32| {
            if v > 0.0 && v <= 1.0 {
                Ok(())
            } else {
                Err(bad(field, v.to_string(), "a fraction in (0, 1]"))
            }
        };
        let non_negative = |field: &str, v: f32| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(bad(field, v.to_string(), "a finite number >= 0"))
            }
        };
        let (d, m, me, t) = (&self.data, &self.model, &self.method, &self.train);
        match d.format {
            DataFormat::Crowd if d.files.is_empty() => {
                return Err(bad("data.files", "[]".into(), "at least one HDF5 or npz file"));
            }
            DataFormat::Netcdf => {
                if d.channels.is_empty() {
                    return Err(bad("data.channels", "[]".into(), "at least one { var = \"...\" }"));
                }
                let in_dirs = d.channels.iter().filter(|c| c.dir.is_some()).count();
                if in_dirs > 0 && (d.root.is_none() || d.years.is_empty()) {
                    return Err(bad(
                        "data.root/data.years",
                        format!("root {:?}, years {:?}", d.root, d.years),
                        "a root directory and at least one year when a channel names a `dir`",
                    ));
                }
                if in_dirs < d.channels.len() && d.files.is_empty() {
                    return Err(bad("data.files", "[]".into(), "netCDF files holding the channels without a `dir`"));
                }
            }
            DataFormat::Knmi if d.files.is_empty() => {
                return Err(bad("data.files", "[]".into(), "KNMI HDF5 files or directories holding them"));
            }
            DataFormat::Sevir if d.catalog.is_none() => {
                return Err(bad("data.catalog", "none".into(), "the path of SEVIR's CATALOG.csv"));
            }
            DataFormat::SyntheticRadar => {
                let g = &d.synthetic;
                in_range("data.synthetic.sequences", g.sequences, 3, 100_000)?;
                in_range("data.synthetic.frames", g.frames, 2, 1000)?;
                in_range("data.synthetic.size", g.size, 8, 384)?;
            }
            DataFormat::Crowd | DataFormat::Knmi | DataFormat::Sevir => {}
        }
        in_range("data.pool", d.pool, 1, 64)?;
        if t.crop > 0 {
            in_range("train.crop", t.crop, m.patch, 4096)?;
            if t.crop % m.patch != 0 {
                return Err(bad("train.crop", t.crop.to_string(), &format!("a multiple of model.patch = {}", m.patch)));
            }
        }
        if t.augment && t.crop == 0 {
            return Err(bad("train.augment", "true".into(), "train.crop > 0 (rotations need square crops)"));
        }
        in_range("data.t_in", d.t_in, 2, 64)?;
        in_range("data.t_out", d.t_out, 1, 64)?;
        in_range("data.lead", d.lead, 1, 10_000)?;
        fraction("data.val_fraction", d.val_fraction)?;
        let range = |field: &str, [from, to]: &[String; 2]| -> Result<DateRange> {
            let date = |s: &str| {
                parse_date(s)
                    .map(|(y, mo, da)| (y * 10_000 + mo * 100 + da) as u32)
                    .ok_or_else(|| bad(field, format!("{from:?}..{to:?}"), "two dates YYYY-MM-DD, from before to"))
            };
            let r = DateRange { from: date(from)?, to: date(to)? };
            if r.from < r.to {
                Ok(r)
            } else {
                Err(bad(field, format!("{from:?}..{to:?}"), "two dates YYYY-MM-DD, from before to"))
            }
        };
        let split = if d.test_frames > 0 {
            if d.val_frames == 0 {
                return Err(bad("data.val_frames", "0".into(), "> 0 when data.test_frames is set"));
            }
            Split::LastFrames { val: d.val_frames, test: d.test_frames }
        } else {
            Split::Dates([range("data.train", &d.train)?, range("data.val", &d.val)?, range("data.test", &d.test)?])
        };
        in_range("model.hidden", m.hidden, 1, 1024)?;
        in_range("model.units", m.units, 1, 4096)?;
        in_range("model.blocks", m.blocks, 1, 64)?;
        in_range("model.heads", m.heads, 1, 64)?;
        if m.backbone == BackboneKind::Vit && m.hidden % m.heads != 0 {
            return Err(bad("model.heads", m.heads.to_string(), &format!("a divisor of model.hidden = {}", m.hidden)));
        }
        match m.backbone {
            BackboneKind::Cnn => in_range("model.stride", m.stride, 1, 2)?,
            BackboneKind::ConvLstm => in_range("model.stride", m.stride, 1, 16)?,
            BackboneKind::Vit => {}
        }
        in_range("model.patch", m.patch, 1, 256)?;
        in_range("model.generator_width", m.generator_width, 1, 256)?;
        if m.backbone != BackboneKind::Vit && m.patch % m.stride != 0 {
            return Err(bad("model.patch", m.patch.to_string(), &format!("a multiple of model.stride = {}", m.stride)));
        }
        if m.data_scope == DataScope::Network && m.backbone != BackboneKind::Cnn {
            return Err(bad(
                "model.data_scope",
                "\"network\"".into(),
                "\"translator\" unless model.backbone = \"cnn\"",
            ));
        }
        fraction("method.data_keep", me.data_keep)?;
        if me.data_rule == DataRule::Batch && !me.mode.data() {
            return Err(bad(
                "method.data_rule",
                "\"batch\"".into(),
                "\"per_sample\" unless method.mode has the DataMask (data or both)",
            ));
        }
        fraction("method.unit_keep", me.unit_keep)?;
        non_negative("method.budget_weight", me.budget_weight)?;
        non_negative("method.warmup_epochs", me.warmup_epochs)?;
        non_negative("method.distill_weight", me.distill_weight)?;
        non_negative("method.mask_target_weight", me.mask_target_weight)?;
        if !me.mask_target_level.is_finite() {
            return Err(bad("method.mask_target_level", me.mask_target_level.to_string(), "a finite level"));
        }
        in_range("train.epochs", t.epochs, 1, 100_000)?;
        in_range("train.batch_size", t.batch_size, 1, 4096)?;
        in_range("train.window_stride", t.window_stride, 1, 10_000)?;
        if !(t.lr.is_finite() && t.lr > 0.0 && t.lr <= 1.0) {
            return Err(bad("train.lr", t.lr.to_string(), "a learning rate in (0, 1]"));
        }
        Ok(Plan { config: self, split })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        RunConfig::default().validate().unwrap();
    }

    #[test]
    fn invalid_value_names_field_and_range() {
        let cfg: RunConfig = toml::from_str("[method]\nunit_keep = 1.5\n").unwrap();
        let msg = cfg.validate().unwrap_err().to_string();
        assert!(msg.contains("method.unit_keep") && msg.contains("(0, 1]"), "{msg}");
        let cfg: RunConfig = toml::from_str("[model]\npatch = 3\nstride = 2\n").unwrap();
        assert!(cfg.validate().unwrap_err().to_string().contains("multiple of model.stride"));
        let cfg: RunConfig = toml::from_str("[data]\ntrain = [\"2013-02-30\", \"2014-01-01\"]\n").unwrap();
        assert!(cfg.validate().unwrap_err().to_string().contains("data.train"));
        let cfg: RunConfig = toml::from_str("[method]\nmode = \"model\"\ndata_rule = \"batch\"\n").unwrap();
        assert!(cfg.validate().unwrap_err().to_string().contains("method.data_rule"));
        assert!(toml::from_str::<RunConfig>("[method]\ndata_rule = \"global\"\n").is_err());
        let cfg: RunConfig = toml::from_str("[model]\nbackbone = \"vit\"\ndata_scope = \"network\"\n").unwrap();
        assert!(cfg.validate().unwrap_err().to_string().contains("model.data_scope"));
        assert!(toml::from_str::<RunConfig>("[model]\ndata_scope = \"everything\"\n").is_err());
    }

    #[test]
    fn every_committed_config_validates() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let mut n = 0;
        for dir in std::fs::read_dir(&root).unwrap() {
            for file in std::fs::read_dir(dir.unwrap().path()).unwrap() {
                let path = file.unwrap().path();
                if path.extension().is_some_and(|e| e == "toml") {
                    RunConfig::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    n += 1;
                }
            }
        }
        assert!(n >= 7, "found {n} configs");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        assert!(toml::from_str::<RunConfig>("[train]\nepoch = 3\n").is_err());
    }

    #[test]
    fn round_trips_through_toml() {
        let cfg = RunConfig::default();
        let back: RunConfig = toml::from_str(&cfg.to_toml()).unwrap();
        assert_eq!(back, cfg);
    }
}
