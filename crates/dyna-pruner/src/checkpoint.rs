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

/// The resume state's directory inside a checkpoint directory (`train --resume`).
pub const RESUME: &str = "resume";

/// Writes weights, config and metadata to `dir`, atomically: the previous checkpoint there
/// (and its `resume/` state) stays whole until the new one is complete on disk.
pub fn save<B: Backend>(dir: &Path, model: &DynamicModel<B>, meta: &CheckpointMeta, config: &RunConfig) -> Result<()> {
    let owned = ["model.mpk", META, CONFIG];
    write_atomically(dir, &owned, &[RESUME], |tmp| {
        model
            .clone()
            .save_file(tmp.join(WEIGHTS), &Recorder::new())
            .map_err(|e| ck_err(dir, format!("cannot write weights: {e}")))?;
        let json = serde_json::to_string_pretty(meta).expect("metadata serializes");
        std::fs::write(tmp.join(META), json).map_err(|e| Error::io(dir.join(META), e))?;
        std::fs::write(tmp.join(CONFIG), config.to_toml()).map_err(|e| Error::io(dir.join(CONFIG), e))
    })
}

/// Replaces the directory `dir` by what `write` puts into a fresh sibling directory: the files
/// are flushed to disk, the entries `keep` of the old directory are moved over, then the new
/// directory is renamed into place and the old one removed. A crash at any point leaves the
/// old directory or the new one whole under `dir` (at worst the old one beside it as
/// `.NAME.old-PID`, with `keep` moved out, which the next write puts back); a failing `write`
/// leaves `dir` as it was. An existing `dir` holding anything but the entries `owned` and
/// `keep` is refused, not replaced.
pub fn write_atomically(
    dir: &Path,
    owned: &[&str],
    keep: &[&str],
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = dir.file_name().ok_or_else(|| ck_err(dir, "names no directory"))?.to_string_lossy().into_owned();
    recover(&parent, &name)?;
    for entry in keep.iter().filter(|_| dir.is_dir()) {
        recover(dir, entry)?;
    }
    if dir.is_dir() {
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let entry = entry.map_err(|e| Error::io(dir, e))?.file_name().to_string_lossy().into_owned();
            if !owned.contains(&entry.as_str()) && !keep.contains(&entry.as_str()) {
                return Err(ck_err(
                    dir,
                    format!("holds `{entry}`, which is not part of it: give a new or empty directory"),
                ));
            }
        }
    } else if dir.exists() {
        return Err(ck_err(dir, "is not a directory"));
    }
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let sibling = |what: &str| parent.join(format!(".{name}.{what}-{}", std::process::id()));
    let (tmp, old) = (sibling("partial"), sibling("old"));
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let written = write(&tmp).and_then(|()| sync_dir(&tmp));
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.is_dir() {
        for entry in keep {
            let from = dir.join(entry);
            if from.exists() {
                std::fs::rename(&from, tmp.join(entry)).map_err(|e| Error::io(&from, e))?;
            }
        }
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
    let _ = std::fs::remove_dir_all(&old);
    sync_dir(&parent)
}

/// Cleans up after an atomic write of `parent/name` that was killed (by any process): its
/// unfinished copies (`.NAME.partial-PID`) are removed, and a complete previous version moved
/// aside (`.NAME.old-PID`) is put back when `name` itself is missing, else removed.
fn recover(parent: &Path, name: &str) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(parent) else { return Ok(()) };
    let (partial, old) = (format!(".{name}.partial-"), format!(".{name}.old-"));
    let target = parent.join(name);
    for entry in entries {
        let path = entry.map_err(|e| Error::io(parent, e))?.path();
        let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        if file.starts_with(&old) && !target.exists() {
            std::fs::rename(&path, &target).map_err(|e| Error::io(&path, e))?;
        } else if file.starts_with(&partial) || file.starts_with(&old) {
            std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

/// Flushes every file in `dir` and the directory itself to disk.
fn sync_dir(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.is_file() {
            std::fs::File::open(&path).and_then(|f| f.sync_all()).map_err(|e| Error::io(&path, e))?;
        }
    }
    // Directories cannot be opened for syncing everywhere; where they can, this orders the renames.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
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
    let model = DynamicModel::new(architecture, device)
        .load_file(dir.join(WEIGHTS), &Recorder::new(), device)
        .map_err(|e| ck_err(dir, format!("cannot load weights model.mpk: {e}")))?;
    let exported = crate::export::export(&model, Masking::DENSE, Default::default());
    for (name, (_, values)) in &exported.tensors {
        dyna_pruner_exec::format::check_finite(name, values)
            .map_err(|e| ck_err(dir, format!("model.mpk holds a bad parameter: {e}")))?;
    }
    Ok(model)
}

/// The git commit the running code was built from (`-dirty` when its sources differed from it).
pub fn current_commit() -> String {
    env!("DYNA_PRUNER_COMMIT").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dp-atomic-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write_file(dir: &Path, name: &str, text: &str) -> Result<()> {
        std::fs::write(dir.join(name), text).map_err(|e| Error::io(dir.join(name), e))
    }

    /// Issue 25: weights that parse but hold NaN loaded silently and scored NaN.
    #[test]
    fn issue_25_a_nan_weight_is_refused_with_its_parameter_name() {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/crowd/cnn_dense");
        let dir = temp("nan-weights");
        for name in ["model.mpk", "checkpoint.json", "config.toml"] {
            std::fs::copy(shipped.join(name), dir.join(name)).unwrap();
        }
        let device = Default::default();
        let model = load::<crate::CpuBackend>(&dir, &device).unwrap().model;
        let exported = crate::export::export(&model, Masking::DENSE, Default::default());
        // A tensor of at least four values, the same one every run (the map's order is random).
        let (_, (_, values)) = (exported.tensors.iter())
            .filter(|(_, (_, values))| values.len() >= 4)
            .min_by_key(|(name, _)| name.as_str())
            .unwrap();
        let needle: Vec<u8> = values[..4].iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut bytes = std::fs::read(dir.join("model.mpk")).unwrap();
        let at = bytes.windows(needle.len()).position(|w| w == needle).expect("the weights' bytes");
        bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        std::fs::write(dir.join("model.mpk"), bytes).unwrap();
        let Err(err) = load::<crate::CpuBackend>(&dir, &device) else { panic!("NaN weights loaded") };
        let err = err.to_string();
        assert!(err.contains("non-finite") && err.contains("parameter") && err.contains("nan-weights"), "{err}");
    }

    #[test]
    fn a_directory_is_replaced_whole_and_keeps_what_it_names() {
        let root = temp("replace");
        let dir = root.join("ck");
        write_atomically(&dir, &["a", "b"], &[RESUME], |d| write_file(d, "a", "1")).unwrap();
        std::fs::create_dir(dir.join(RESUME)).unwrap();
        write_file(&dir.join(RESUME), "state.json", "{}").unwrap();
        write_atomically(&dir, &["a", "b"], &[RESUME], |d| write_file(d, "b", "2")).unwrap();
        assert!(!dir.join("a").exists(), "the old files go");
        assert_eq!(std::fs::read_to_string(dir.join("b")).unwrap(), "2");
        assert!(dir.join(RESUME).join("state.json").is_file(), "the resume state is carried over");
        let names: Vec<String> =
            std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names, vec!["ck".to_string()], "no partial or old directory is left beside it");
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// A write that fails half-way (as a crash or a full disk would leave it) changes nothing.
    #[test]
    fn a_failed_write_leaves_the_previous_directory_as_it_was() {
        let root = temp("fail");
        let dir = root.join("ck");
        write_atomically(&dir, &["model"], &[], |d| write_file(d, "model", "best")).unwrap();
        let failed = write_atomically(&dir, &["model"], &[], |d| {
            write_file(d, "model", "half")?;
            Err(ck_err(d, "disk full"))
        });
        assert!(failed.unwrap_err().to_string().contains("disk full"));
        assert_eq!(std::fs::read_to_string(dir.join("model")).unwrap(), "best");
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 1, "the partial directory is removed");
        // A partial directory left by a killed run (of any process id) is cleared first.
        let stale = root.join(".ck.partial-1");
        std::fs::create_dir(&stale).unwrap();
        write_file(&stale, "junk", "x").unwrap();
        write_atomically(&dir, &["model"], &[], |d| write_file(d, "model", "next")).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("model")).unwrap(), "next");
        assert!(!dir.join("junk").exists());
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// Issue 25: a run killed between moving the previous directory aside and renaming the new
    /// one in leaves `.NAME.old-PID`, and inside the directory the partial copy of a nested
    /// write (the resume state's); the next write restores the one and removes the other.
    #[test]
    fn leftovers_of_a_killed_write_are_restored_or_removed() {
        let root = temp("killed");
        let dir = root.join("ck");
        write_atomically(&dir, &["model"], &[RESUME], |d| write_file(d, "model", "best")).unwrap();
        std::fs::rename(&dir, root.join(".ck.old-99")).unwrap();
        write_atomically(&dir, &["model"], &[RESUME], |d| {
            // The previous version is back in place while the new one is written.
            assert_eq!(std::fs::read_to_string(root.join("ck/model")).unwrap(), "best");
            write_file(d, "model", "next")
        })
        .unwrap();
        std::fs::create_dir(dir.join(".resume.partial-7")).unwrap();
        write_atomically(&dir, &["model"], &[RESUME], |d| write_file(d, "model", "third")).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("model")).unwrap(), "third");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "only the model is left");
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 1, "nothing beside the directory");
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// `train.out` pointing at a directory of other things must not wipe them.
    #[test]
    fn a_directory_holding_other_files_is_refused() {
        let root = temp("foreign");
        write_file(&root, "thesis.tex", "years of work").unwrap();
        let err = write_atomically(&root, &["model"], &[], |d| write_file(d, "model", "x")).unwrap_err();
        assert!(err.to_string().contains("thesis.tex"), "{err}");
        assert_eq!(std::fs::read_to_string(root.join("thesis.tex")).unwrap(), "years of work");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
