//! `dyna-pruner eval`: a checkpoint on any supported data file, against persistence.

use std::path::{Path, PathBuf};

use anyhow::Context;
use burn::prelude::Backend;
use serde_json::json;

use dyna_pruner::checkpoint::{self, Checkpoint};
use dyna_pruner::config::{DataConfig, DataFormat, RunConfig};
use dyna_pruner::data::{self, Domain, Horizon, WindowSet};
use dyna_pruner::eval::{default_batch, evaluate, evaluate_persistence, Evaluation};
use dyna_pruner::model::Architecture;
use dyna_pruner::train::prepare_data;

use crate::budget::{BudgetArgs, LatencyChoice};
use crate::device::{DeviceArg, Precision};
use crate::progress::eval_bar;
use crate::with_backend;

/// Evaluates a loaded checkpoint with its own scaler and masks, with a progress bar.
pub fn evaluate_checkpoint<B: Backend>(
    ck: &Checkpoint<B>,
    windows: &WindowSet,
    batch_size: usize,
    device: &B::Device,
    label: &str,
) -> anyhow::Result<Evaluation> {
    let bar = eval_bar(label, windows.len());
    let result = evaluate(&ck.model, windows, ck.meta.scoring(), ck.meta.masking, batch_size, device, &mut |d, _| {
        bar.set_position(d as u64)
    });
    bar.finish_and_clear();
    result.with_context(|| format!("evaluating checkpoint {}", ck.dir.display()))
}

/// All windows of `files` for a model of architecture `arch` trained on data read by `data`
/// (its training config's section: format, slot format, netCDF channels, lead), checking the
/// channels.
pub fn windows_for(data: &DataConfig, arch: &Architecture, files: &[PathBuf]) -> anyhow::Result<WindowSet> {
    let mut d = data.clone();
    d.files = files.to_vec();
    match d.format {
        DataFormat::Netcdf => {
            // Every channel from the given files, not from the training layout.
            d.root = None;
            d.years.clear();
            d.channels.iter_mut().for_each(|c| c.dir = None);
        }
        DataFormat::Sevir => {
            // The given file is a catalog; the HDF5 files sit in `data/` beside it.
            let [catalog] = files else {
                anyhow::bail!(
                    "the model reads SEVIR: give --data exactly one CATALOG.csv (its HDF5 files in data/ beside it), not {} paths",
                    files.len()
                );
            };
            d.catalog = Some(catalog.clone());
            d.root = None;
        }
        DataFormat::SyntheticRadar => anyhow::bail!(
            "the model was trained on synthetic radar, which has no files; evaluate it with --split val|test"
        ),
        DataFormat::Crowd | DataFormat::Knmi => {}
    }
    let windows = data::load(&d)?.all_windows(Horizon::of(&d), files)?;
    check_channels(windows, &files[0], arch)
}

fn check_channels(windows: WindowSet, from: &Path, arch: &Architecture) -> anyhow::Result<WindowSet> {
    if windows.channels != arch.frames.channels {
        anyhow::bail!(
            "{} holds frames with {} channels; the model expects {}",
            from.display(),
            windows.channels,
            arch.frames.channels
        );
    }
    Ok(windows)
}

/// The metrics a results table shows for `windows`: by what the frames measure.
pub fn table_metrics(windows: &WindowSet) -> &'static [&'static str] {
    match windows.domain() {
        Domain::Weather(_) => &["rmse", "mae", "acc"],
        Domain::Radar => &["csi_m", "csi/16", "csi/74", "csi/133", "mse", "mae"],
        Domain::Crowd => &["mse", "mae", "rmse"],
    }
}

/// The header of a results table with `metrics` columns.
pub fn table_header(metrics: &[&str]) -> String {
    let cols: String = metrics.iter().map(|m| format!(" {m:>9} |")).collect();
    let rule: String = metrics.iter().map(|_| "-----------|").collect();
    format!(
        "| model            |{cols}      MACs |  ratio | patch | units |\n|------------------|{rule}-----------|--------|-------|-------|"
    )
}

/// One line of a results table; its MACs ratio is over `dense_macs`.
pub fn table_row(name: &str, e: &Evaluation, dense_macs: Option<f64>, metrics: &[&str]) -> String {
    let macs = e.macs_per_sample.map(|m| format!("{:.2}M", m / 1e6)).unwrap_or_else(|| "-".into());
    let ratio = match (e.macs_per_sample, dense_macs) {
        (Some(m), Some(d)) => format!("{:.3}", m / d),
        _ => "-".into(),
    };
    let kept = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
    let cols: String =
        metrics.iter().map(|m| format!(" {:>9.4} |", e.metrics.get(*m).copied().unwrap_or(f64::NAN))).collect();
    format!(
        "| {name:<16} |{cols} {macs:>9} | {ratio:>6} | {:>5} | {:>5} |",
        kept(e.kept_patch_fraction),
        kept(e.kept_unit_fraction)
    )
}

/// Which range of a run config `eval --split` evaluates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SplitArg {
    Val,
    Test,
}

/// What `eval` runs on.
pub enum Source {
    /// All windows of these files.
    Files(Vec<PathBuf>),
    /// A range of a run config (the checkpoint's config.toml unless given), read or generated
    /// as training reads it.
    Split { split: SplitArg, config: Option<PathBuf> },
}

/// The process's peak resident memory so far in MB (Linux's VmHWM), if known.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The windows of `split` of the run config `config`.
fn split_windows(config: &Path, split: SplitArg) -> anyhow::Result<WindowSet> {
    let plan = RunConfig::load(config)?;
    let (splits, _) = prepare_data(&plan)?;
    Ok(match split {
        SplitArg::Val => splits.val,
        SplitArg::Test => splits.test,
    })
}

pub fn run(
    checkpoint_dir: &Path,
    source: &Source,
    out: Option<&Path>,
    (batch_size, dense, budget): (Option<usize>, bool, BudgetArgs),
    (device, precision): (DeviceArg, Precision),
) -> anyhow::Result<()> {
    let label = checkpoint_dir.display().to_string();
    with_backend!(device, precision, |B, T, dev| {
        let mut ck = checkpoint::load::<B>(checkpoint_dir, &dev)?;
        if dense {
            ck.meta.masking = dyna_pruner::method::Masking::DENSE;
        }
        ck.meta.masking = budget.keep.apply(&ck.meta.architecture, ck.meta.masking, &label)?;
        let arch = &ck.meta.architecture;
        let (windows, from) = match source {
            Source::Files(files) => {
                let data = checkpoint::read_config(checkpoint_dir)?.data;
                let paths = match files.as_slice() {
                    [one] if one.is_dir() => format!("{}", one.display()),
                    _ => format!("{} file(s)", files.len()),
                };
                (windows_for(&data, arch, files)?, paths)
            }
            Source::Split { split, config } => {
                let config = config.clone().unwrap_or_else(|| checkpoint_dir.join("config.toml"));
                let windows = check_channels(split_windows(&config, *split)?, &config, arch)?;
                (windows, format!("the {split:?} range of {}", config.display()))
            }
        };
        let batch_size = batch_size.unwrap_or_else(|| default_batch(windows.height, windows.width));
        let latency = match budget.latency_ms {
            Some(target) => {
                let choice = latency_keep(checkpoint_dir, &windows, batch_size, target)?;
                eprintln!("{}", choice.summary());
                ck.meta.masking = choice.masking;
                Some(choice)
            }
            None => None,
        };
        let e = evaluate_checkpoint(&ck, &windows, batch_size, &dev, "eval").with_context(|| match precision {
            Precision::Bf16 => "at --precision bf16, where Burn runs every operation in bf16 (not an autocast)",
            Precision::F32 => "at --precision f32",
        })?;
        let p = evaluate_persistence(&windows, ck.meta.scoring());
        let cols = table_metrics(&windows);
        println!(
            "{} windows of {}x{} from {from}\n{}",
            windows.len(),
            windows.height,
            windows.width,
            table_header(cols)
        );
        println!("{}", table_row("model", &e, e.dense_macs_per_sample, cols));
        println!("{}", table_row("persistence", &p, None, cols));
        if let Some(out) = out {
            let mut report = serde_json::to_value(&e)?;
            report["persistence"] = json!({ "metrics": p.metrics });
            report["checkpoint"] = json!(checkpoint_dir);
            report["batch_size"] = json!(batch_size);
            report["peak_rss_mb"] = json!(peak_rss_mb());
            report["masking"] = json!(ck.meta.masking);
            report["precision"] = json!(precision);
            report["latency_budget"] = json!(latency);
            std::fs::write(out, serde_json::to_string_pretty(&report)?)
                .with_context(|| format!("writing {}", out.display()))?;
            eprintln!("wrote {}", out.display());
        }
        Ok(())
    })
}

/// `--latency-ms`: the keep ratio at which the checkpoint's CPU executor (its kept units run
/// as `predict --units auto` runs them) meets `target_ms` per batch of `batch` windows.
fn latency_keep(dir: &Path, windows: &WindowSet, batch: usize, target_ms: f64) -> anyhow::Result<LatencyChoice> {
    if windows.is_empty() {
        anyhow::bail!("--latency-ms: no windows in the data to time");
    }
    let model = crate::predict::export_checkpoint(dir)?;
    let (scaler, _) = crate::predict::scaler_and_data(&model, dir)?;
    let mut exec = model.executor()?;
    let batch = batch.min(windows.len());
    let (h, w) = (windows.height, windows.width);
    let x = windows.scaled_inputs(0..batch, &scaler);
    crate::predict::choose_unit_execution(&mut exec, (&x, batch, h, w), crate::predict::UnitsArg::Auto);
    crate::budget::meet_latency(&mut exec, &model, &dir.display().to_string(), (&x, batch, h, w), target_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dyna_pruner_exec::spec::{BackboneSpec, ConvLstmSpec, Frames};

    /// Issue 25: the default batch shrinks with the frame so that memory follows batch x frame
    /// size (whole KNMI frames: 7 windows, where 64 took 15.5 GB).
    #[test]
    fn peak_memory_is_read() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss_mb().is_some_and(|mb| mb > 1.0));
        }
    }

    /// `eval --data` on a SEVIR checkpoint used to read the first path as the catalog and drop
    /// the others without a word.
    #[test]
    fn sevir_checkpoints_take_exactly_one_catalog() {
        let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs/radar/sevir_dense.toml");
        let data = RunConfig::read(Path::new(config)).unwrap().data;
        let lstm = ConvLstmSpec { hidden: 8, units: 8, cells: 1, stride: 2 };
        let arch = Architecture::new(Frames { t_in: 13, t_out: 12, channels: 1 }, 8, BackboneSpec::ConvLstm(lstm));
        let two = [PathBuf::from("a/CATALOG.csv"), PathBuf::from("b/CATALOG.csv")];
        let err = windows_for(&data, &arch, &two).unwrap_err().to_string();
        assert!(err.contains("exactly one CATALOG.csv") && err.contains("not 2 paths"), "{err}");
    }
}
