//! Run configuration: TOML with every field defaulted, validated up front into a [`Plan`].
//! Each section checks itself; a bad value is reported with its field, the value and the
//! allowed range. The `[model]` section is the shared spec's [`ModelSpec`] (a flat table of
//! older configs reads too, see `dyna_pruner_spec::legacy`).

use std::path::{Path, PathBuf};

use dyna_pruner_spec::{Architecture, Frames, KeepRange, KeepRanges, ModelSpec};
use serde::{Deserialize, Serialize};

pub use crate::data::config::{ChannelSpec, DataConfig, DataFormat, SyntheticRadarConfig};
use crate::data::Split;
use crate::error::{bad_value, fraction, in_range, non_negative, Error, Result};
use crate::method::MaskMode;

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
    /// Budget-conditioned training: each batch draws its patch and unit keep ratios uniformly
    /// from `[lo, hi]`, and the mask generator and unit gates read them as inputs, so that one
    /// model serves any keep ratio in the range (`--keep`). `data_keep` and `unit_keep` are then
    /// the ratios it runs at by default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_range: Option<KeepRange>,
    /// The unit keep ratios' own range when it should differ from `keep_range` (which then
    /// bounds the patch keep ratios only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit_keep_range: Option<KeepRange>,
    /// Budget-conditioned training by the sandwich rule of slimmable networks: every step also
    /// trains at both ends of the ranges (the loss is the mean of the three), so that the
    /// tightest and the loosest budget see every batch.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub sandwich: bool,
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
            keep_range: None,
            unit_keep_range: None,
            sandwich: false,
        }
    }
}

/// How a checkpoint with more units than the config's model is cut down to it
/// (`train.prune_init`): structured, once, the same for every sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PruneCriterion {
    /// Keep each layer's units whose weights have the largest L1 norm (all tensors a unit
    /// indexes, as Torch-Pruning's magnitude criterion).
    L1,
}

/// The optimizer and the schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Fraction of the run over which the learning rate rises linearly to `lr` (one-cycle
    /// style); the cosine decay follows. 0: start at `lr`.
    pub lr_warmup: f64,
    /// Decoupled weight decay (AdamW); 0 is plain Adam.
    pub weight_decay: f32,
    /// Adam's epsilon. The default is Burn's 1e-5, which the shipped weather and radar models
    /// trained with; a loss as small as crowd flow's on [0, 1] (about 1e-4) needs PyTorch's
    /// 1e-8, or epsilon swamps the gradients' scale and Adam crawls.
    pub adam_epsilon: f32,
    /// When > 0: each parameter tensor's gradient is scaled down to at most this L2 norm (Burn's
    /// clipping is per tensor, not over all parameters at once); 0: no clipping.
    pub grad_clip_norm: f32,
    pub seed: u64,
    /// Use every n-th training window (1: all).
    pub window_stride: usize,
    /// Checkpoint to start from (the trained dense model); it is also the distillation teacher.
    pub init_from: Option<PathBuf>,
    /// When `init_from` has more units per prunable layer than `[model]`: the criterion that
    /// picks the units kept (static structured pruning; the result is an ordinary smaller model).
    pub prune_init: Option<PruneCriterion>,
    /// When fine-tuning a model with the ModelMask from `init_from`: each unit gate starts out
    /// ranking its layer's units by this criterion (bias: the units' standardized scores;
    /// weights: zero), so every sample's first sub-network is the statically pruned one and
    /// training learns how samples differ from it. Unset: the gates start as they are.
    pub gate_init: Option<PruneCriterion>,
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
            lr_warmup: 0.0,
            weight_decay: 0.0,
            adam_epsilon: 1e-5,
            grad_clip_norm: 0.0,
            seed: 42,
            window_stride: 1,
            init_from: None,
            prune_init: None,
            gate_init: None,
            out: PathBuf::from("runs/model"),
            crop: 0,
            augment: false,
        }
    }
}

impl MethodConfig {
    /// The ranges a budget-conditioned run draws its keep ratios from; `None` for one budget.
    pub fn keep_ranges(&self) -> Option<KeepRanges> {
        KeepRanges::new(self.keep_range, self.unit_keep_range)
    }

    /// Checks every field of the section.
    pub fn validate(&self) -> Result<()> {
        fraction("method.data_keep", self.data_keep)?;
        fraction("method.unit_keep", self.unit_keep)?;
        if self.data_rule == DataRule::Batch && !self.mode.data() {
            return Err(bad_value(
                "method.data_rule",
                "\"batch\"",
                "\"per_sample\" unless method.mode has the DataMask (data or both)",
            ));
        }
        non_negative("method.budget_weight", self.budget_weight)?;
        non_negative("method.warmup_epochs", self.warmup_epochs)?;
        non_negative("method.distill_weight", self.distill_weight)?;
        non_negative("method.mask_target_weight", self.mask_target_weight)?;
        if !self.mask_target_level.is_finite() {
            return Err(bad_value("method.mask_target_level", self.mask_target_level, "a finite level"));
        }
        for (field, range) in [("method.keep_range", self.keep_range), ("method.unit_keep_range", self.unit_keep_range)]
        {
            if let Some(range) = range.filter(|r| !r.is_valid()) {
                return Err(bad_value(field, range, "[lo, hi] with 0 < lo <= hi <= 1"));
            }
        }
        if let Some(range) = self.unit_keep_range.filter(|_| self.keep_range.is_none() || !self.mode.model()) {
            return Err(bad_value(
                "method.unit_keep_range",
                range,
                "unset unless method.keep_range is set and method.mode has the ModelMask (model or both)",
            ));
        }
        if self.sandwich && self.keep_range.is_none() {
            return Err(bad_value("method.sandwich", true, "false unless method.keep_range is set"));
        }
        if let Some(range) = self.keep_range {
            if self.mode == MaskMode::Dense || self.data_rule == DataRule::Batch {
                return Err(bad_value(
                    "method.keep_range",
                    range,
                    "unset unless method.mode has a mask and method.data_rule is \"per_sample\"",
                ));
            }
            let units = self.unit_keep_range.map_or(("method.keep_range", range), |r| ("method.unit_keep_range", r));
            for (field, keep, active, (name, range)) in [
                ("method.data_keep", self.data_keep, self.mode.data(), ("method.keep_range", range)),
                ("method.unit_keep", self.unit_keep, self.mode.model(), units),
            ] {
                if active && !range.contains(keep) {
                    return Err(bad_value(field, keep, format!("a keep ratio in {name} = {range}")));
                }
            }
        }
        Ok(())
    }
}

impl TrainConfig {
    /// Checks every field of the section; `patch` is the model's (crops hold whole patches).
    pub fn validate(&self, patch: usize) -> Result<()> {
        in_range("train.epochs", self.epochs, 1, 100_000)?;
        in_range("train.batch_size", self.batch_size, 1, 4096)?;
        in_range("train.window_stride", self.window_stride, 1, 10_000)?;
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr <= 1.0) {
            return Err(bad_value("train.lr", self.lr, "a learning rate in (0, 1]"));
        }
        if !(0.0..1.0).contains(&self.lr_warmup) {
            return Err(bad_value("train.lr_warmup", self.lr_warmup, "a fraction of the run in [0, 1)"));
        }
        non_negative("train.weight_decay", self.weight_decay)?;
        non_negative("train.grad_clip_norm", self.grad_clip_norm)?;
        if !(self.adam_epsilon > 0.0 && self.adam_epsilon <= 1.0) {
            return Err(bad_value("train.adam_epsilon", self.adam_epsilon, "a number in (0, 1]"));
        }
        if self.prune_init.is_some() && self.init_from.is_none() {
            return Err(bad_value("train.prune_init", "set", "train.init_from (the checkpoint to prune)"));
        }
        if self.gate_init.is_some() && self.init_from.is_none() {
            return Err(bad_value("train.gate_init", "set", "train.init_from (the checkpoint whose units it ranks)"));
        }
        if self.crop > 0 {
            in_range("train.crop", self.crop, patch, 4096)?;
            if !self.crop.is_multiple_of(patch) {
                return Err(bad_value("train.crop", self.crop, format!("a multiple of model.patch = {patch}")));
            }
        }
        if self.augment && self.crop == 0 {
            return Err(bad_value("train.augment", "true", "train.crop > 0 (rotations need square crops)"));
        }
        Ok(())
    }
}

/// A whole run configuration (`dyna-pruner train --config FILE`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    pub data: DataConfig,
    #[serde(deserialize_with = "dyna_pruner_spec::legacy::model_spec")]
    pub model: ModelSpec,
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
        let d = &self.config.data;
        let mut model = self.config.model.clone();
        model.generator.keep_range = self.config.method.keep_range;
        model.generator.unit_keep_range = self.config.method.unit_keep_range;
        Architecture { frames: Frames { t_in: d.t_in, t_out: d.t_out, channels }, model }
    }
}

impl RunConfig {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Plan> {
        Self::read(path)?.validate().map_err(|e| match e {
            Error::Config { field, value, expected, .. } => {
                Error::Config { file: Some(path.to_path_buf()), field, value, expected }
            }
            other => other,
        })
    }

    /// Reads a TOML file without validating it.
    pub fn read(path: &Path) -> Result<RunConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        toml::from_str(&text).map_err(|e| Error::Format {
            path: path.to_path_buf(),
            format: "TOML run config",
            detail: e.to_string(),
        })
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a RunConfig always serializes")
    }

    /// Checks every section, then what crosses sections.
    pub fn validate(self) -> Result<Plan> {
        let split = self.data.validate()?;
        self.model.validate()?;
        let g = &self.model.generator;
        for (field, range, instead) in [
            ("model.generator.keep_range", g.keep_range, "unset (write method.keep_range)"),
            ("model.generator.unit_keep_range", g.unit_keep_range, "unset (write method.unit_keep_range)"),
        ] {
            if let Some(range) = range {
                return Err(bad_value(field, range, instead));
            }
        }
        self.method.validate()?;
        self.train.validate(self.model.patch)?;
        if self.train.gate_init.is_some() && !self.method.mode.model() {
            return Err(bad_value(
                "train.gate_init",
                "set",
                format!("unset unless method.mode has the ModelMask (model or both), not {:?}", self.method.mode),
            ));
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
    fn issue_26_keep_range_is_checked_against_the_mode_and_the_default_keeps() {
        let parse = |text: &str| toml::from_str::<RunConfig>(text).unwrap();
        let check = |text: &str| parse(text).validate().err().map(|e| e.to_string());
        let ok = "[method]\nmode = \"both\"\ndata_keep = 0.5\nunit_keep = 0.3\nkeep_range = [0.2, 0.6]\n";
        assert_eq!(check(ok), None);
        let plan = parse(ok).validate().unwrap();
        assert_eq!(plan.architecture(1).model.generator.keep_range, Some(KeepRange { lo: 0.2, hi: 0.6 }));
        let outside = check("[method]\nmode = \"both\"\ndata_keep = 0.9\nkeep_range = [0.2, 0.6]\n").unwrap();
        assert!(outside.contains("method.data_keep") && outside.contains("[0.2, 0.6]"), "{outside}");
        let dense = check("[method]\nkeep_range = [0.2, 0.6]\n").unwrap();
        assert!(dense.contains("method.keep_range"), "{dense}");
        let reversed = check("[method]\nmode = \"data\"\ndata_keep = 0.5\nkeep_range = [0.6, 0.2]\n").unwrap();
        assert!(reversed.contains("0 < lo <= hi <= 1"), "{reversed}");
        let in_model = check("[model.generator]\nkeep_range = [0.2, 0.6]\n").unwrap();
        assert!(in_model.contains("method.keep_range"), "{in_model}");
        assert_eq!(check(&format!("{ok}sandwich = true\n")), None);
        let no_range = check("[method]\nmode = \"both\"\ndata_keep = 0.5\nsandwich = true\n").unwrap();
        assert!(no_range.contains("method.sandwich") && no_range.contains("method.keep_range"), "{no_range}");
    }

    #[test]
    fn issue_21_gate_init_needs_a_checkpoint_and_the_model_mask() {
        let check = |text: &str| toml::from_str::<RunConfig>(text).unwrap().validate().err().map(|e| e.to_string());
        let model = "[method]\nmode = \"model\"\nunit_keep = 0.3\n";
        let init = "[train]\ninit_from = \"models/dense\"\ngate_init = \"l1\"\n";
        assert_eq!(check(&format!("{model}{init}")), None);
        let no_checkpoint = check(&format!("{model}[train]\ngate_init = \"l1\"\n")).unwrap();
        assert!(
            no_checkpoint.contains("train.gate_init") && no_checkpoint.contains("train.init_from"),
            "{no_checkpoint}"
        );
        let data_only = check(&format!("[method]\nmode = \"data\"\ndata_keep = 0.5\n{init}")).unwrap();
        assert!(data_only.contains("train.gate_init") && data_only.contains("ModelMask"), "{data_only}");
    }

    #[test]
    fn issue_26_the_units_can_have_their_own_keep_range() {
        let parse = |text: &str| toml::from_str::<RunConfig>(text).unwrap();
        let check = |text: &str| parse(text).validate().err().map(|e| e.to_string());
        let both =
            "[method]\nmode = \"both\"\ndata_keep = 1.0\nkeep_range = [0.6, 1.0]\nunit_keep_range = [0.25, 0.5]\n";
        let ok = format!("{both}unit_keep = 0.25\n");
        assert_eq!(check(&ok), None);
        let ranges = parse(&ok).validate().unwrap().architecture(1).model.generator.keep_ranges().unwrap();
        assert_eq!((ranges.data, ranges.units), (KeepRange { lo: 0.6, hi: 1.0 }, KeepRange { lo: 0.25, hi: 0.5 }));
        let outside = check(&format!("{both}unit_keep = 0.7\n")).unwrap();
        assert!(outside.contains("method.unit_keep") && outside.contains("unit_keep_range = [0.25, 0.5]"), "{outside}");
        let alone = check("[method]\nmode = \"model\"\nunit_keep = 0.3\nunit_keep_range = [0.2, 0.6]\n").unwrap();
        assert!(alone.contains("method.unit_keep_range") && alone.contains("method.keep_range is set"), "{alone}");
        let no_units = check(
            "[method]\nmode = \"data\"\ndata_keep = 0.5\nkeep_range = [0.2, 0.6]\nunit_keep_range = [0.2, 0.6]\n",
        );
        assert!(no_units.unwrap().contains("ModelMask"));
    }

    #[test]
    fn invalid_value_names_field_and_range() {
        let cfg: RunConfig = toml::from_str("[method]\nunit_keep = 1.5\n").unwrap();
        let msg = cfg.validate().unwrap_err().to_string();
        assert!(msg.contains("method.unit_keep") && msg.contains("(0, 1]"), "{msg}");
        let cfg: RunConfig =
            toml::from_str("[model]\npatch = 3\n[model.backbone]\nkind = \"cnn\"\nstride = 2\n").unwrap();
        assert!(cfg.validate().unwrap_err().to_string().contains("multiple of model.backbone.stride"));
        let cfg: RunConfig = toml::from_str("[data]\ntrain = [\"2013-02-30\", \"2014-01-01\"]\n").unwrap();
        assert!(cfg.validate().unwrap_err().to_string().contains("data.train"));
        let cfg: RunConfig = toml::from_str("[method]\nmode = \"model\"\ndata_rule = \"batch\"\n").unwrap();
        assert!(cfg.validate().unwrap_err().to_string().contains("method.data_rule"));
        assert!(toml::from_str::<RunConfig>("[method]\ndata_rule = \"global\"\n").is_err());
        // The DataMask's scope is a CNN field: another backbone has none.
        let err = toml::from_str::<RunConfig>("[model.backbone]\nkind = \"vit\"\ndata_scope = \"network\"\n");
        assert!(err.unwrap_err().to_string().contains("data_scope"));
        assert!(toml::from_str::<RunConfig>("[model.backbone]\ndata_scope = \"everything\"\n").is_err());
    }

    /// The repository's root.
    fn repo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    /// The entries two levels below `dir` of the repository (`configs/<task>/<file>`,
    /// `models/<task>/<model>`).
    fn two_levels_below(dir: &str) -> Vec<PathBuf> {
        let entries = |d: &Path| std::fs::read_dir(d).unwrap().map(|e| e.unwrap().path()).collect::<Vec<_>>();
        entries(&repo().join(dir)).iter().flat_map(|task| entries(task)).collect()
    }

    #[test]
    fn every_committed_config_validates() {
        let configs = two_levels_below("configs");
        for path in &configs {
            RunConfig::load(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
        assert!(configs.len() >= 7, "found {} configs", configs.len());
    }

    #[test]
    fn unknown_fields_are_rejected() {
        assert!(toml::from_str::<RunConfig>("[train]\nepoch = 3\n").is_err());
    }

    #[test]
    fn shipped_checkpoint_configs_in_the_flat_layout_still_read() {
        let models = two_levels_below("models");
        for model in &models {
            let path = model.join("config.toml");
            let cfg = RunConfig::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            // Written back in today's layout, it reads as the same config.
            assert_eq!(toml::from_str::<RunConfig>(&cfg.config.to_toml()).unwrap(), cfg.config);
        }
        assert!(models.len() >= 8, "found {} checkpoints", models.len());
    }

    /// The committed configs (in today's layout) describe exactly the architectures their
    /// shipped checkpoints (written in the flat layout) hold.
    #[test]
    fn committed_configs_build_the_architectures_of_their_checkpoints() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut n = 0;
        for dir in std::fs::read_dir(repo.join("configs")).unwrap() {
            for file in std::fs::read_dir(dir.unwrap().path()).unwrap() {
                let plan = RunConfig::load(&file.unwrap().path()).unwrap();
                let out = repo.join(&plan.config.train.out);
                if !out.join("checkpoint.json").is_file() {
                    continue;
                }
                let meta = crate::checkpoint::read_meta(&out).unwrap();
                assert_eq!(
                    plan.architecture(meta.architecture.frames.channels),
                    meta.architecture,
                    "{}",
                    out.display()
                );
                n += 1;
            }
        }
        assert!(n >= 8, "found {n} shipped checkpoints of committed configs");
    }

    #[test]
    fn round_trips_through_toml() {
        let cfg = RunConfig::default();
        let back: RunConfig = toml::from_str(&cfg.to_toml()).unwrap();
        assert_eq!(back, cfg);
    }
}
