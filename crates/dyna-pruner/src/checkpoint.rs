//! Checkpoints: a directory with the weights (`model.mpk`), the run config (`config.toml`) and
//! `checkpoint.json` (architecture, scaler, masking, provenance: seed, commit, backend, wall time).

use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder};
use serde::{Deserialize, Serialize};

use crate::config::RunConfig;
use crate::data::Scaler;
use crate::error::{Error, Result};
use crate::method::Masking;
use crate::model::{Architecture, DynamicModel};

/// The recorder of all weight files.
pub type Recorder = NamedMpkFileRecorder<FullPrecisionSettings>;

/// Where and how a checkpoint was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub seed: u64,
    pub commit: String,
    pub backend: String,
    pub threads: usize,
    pub wall_time_s: f64,
    pub epochs: usize,
    pub best_epoch: usize,
    pub best_val_mse: f64,
    pub train_windows: usize,
    pub data_files: Vec<PathBuf>,
    /// The checkpoint this one was fine-tuned from, if any.
    pub init_from: Option<PathBuf>,
}

/// `checkpoint.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// Read in either layout (see `dyna_pruner_spec::legacy`), written in today's.
    #[serde(deserialize_with = "dyna_pruner_spec::legacy::architecture")]
    pub architecture: Architecture,
    pub scaler: Scaler,
    /// Weather: the training period's mean frame `[C, H, W]` in physical units (for the ACC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub climatology: Option<Vec<f32>>,
    /// How the masks are set at inference.
    pub masking: Masking,
    pub provenance: Provenance,
}

/// A loaded checkpoint.
pub struct Checkpoint<B: Backend> {
    pub model: DynamicModel<B>,
    pub meta: CheckpointMeta,
    pub dir: PathBuf,
}

const WEIGHTS: &str = "model";
const META: &str = "checkpoint.json";
const CONFIG: &str = "config.toml";

fn ck_err(path: &Path, detail: impl Into<String>) -> Error {
    Error::Checkpoint { path: path.to_path_buf(), detail: detail.into() }
}

/// Writes weights, config and metadata to `dir` (created if needed).
pub fn save<B: Backend>(dir: &Path, model: &DynamicModel<B>, meta: &CheckpointMeta, config: &RunConfig) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    model
        .clone()
        .save_file(dir.join(WEIGHTS), &Recorder::new())
        .map_err(|e| ck_err(dir, format!("cannot write weights: {e}")))?;
    let json = serde_json::to_string_pretty(meta).expect("metadata serializes");
    std::fs::write(dir.join(META), json).map_err(|e| Error::io(dir.join(META), e))?;
    std::fs::write(dir.join(CONFIG), config.to_toml()).map_err(|e| Error::io(dir.join(CONFIG), e))
}

/// Reads `checkpoint.json` of `dir`.
pub fn read_meta(dir: &Path) -> Result<CheckpointMeta> {
    let path = dir.join(META);
    if !dir.is_dir() {
        return Err(ck_err(dir, "is not a directory (expected model.mpk, checkpoint.json, config.toml)"));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| ck_err(&path, format!("malformed metadata: {e}")))
}

impl CheckpointMeta {
    /// How this checkpoint's predictions are scored.
    pub fn scoring(&self) -> crate::eval::Scoring<'_> {
        crate::eval::Scoring { scaler: &self.scaler, climatology: self.climatology.as_deref() }
    }
}

/// Reads the run config a checkpoint was trained with (`config.toml`).
pub fn read_config(dir: &Path) -> Result<RunConfig> {
    let path = dir.join(CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    toml::from_str(&text).map_err(|e| ck_err(&path, format!("malformed run config: {e}")))
}

/// Loads a checkpoint onto `device`.
pub fn load<B: Backend>(dir: &Path, device: &B::Device) -> Result<Checkpoint<B>> {
    let meta = read_meta(dir)?;
    let model = load_weights(dir, &meta.architecture, device)?;
    Ok(Checkpoint { model, meta, dir: dir.to_path_buf() })
}

/// Loads weights of `architecture` from `dir/model.mpk`.
pub fn load_weights<B: Backend>(
    dir: &Path,
    architecture: &Architecture,
    device: &B::Device,
) -> Result<DynamicModel<B>> {
    DynamicModel::new(architecture, device)
        .load_file(dir.join(WEIGHTS), &Recorder::new(), device)
        .map_err(|e| ck_err(dir, format!("cannot load weights model.mpk: {e}")))
}

/// The git commit the running code was built from (`-dirty` when its sources differed from it).
pub fn current_commit() -> String {
    env!("DYNA_PRUNER_COMMIT").to_string()
}
