//! `dyna-pruner eval`: a checkpoint on any supported data file, against persistence.

use std::path::{Path, PathBuf};

use anyhow::Context;
use burn::prelude::Backend;
use serde_json::json;

use dyna_pruner::data::{self, SlotFormat, WindowSet};
use dyna_pruner::eval::{evaluate, evaluate_persistence, Evaluation};
use dyna_pruner::model::Architecture;
use dyna_pruner::train::checkpoint::{self, Checkpoint};

use crate::device::DeviceArg;
use crate::progress::eval_bar;
use crate::with_backend;

/// Evaluates a loaded checkpoint with its own scaler and masks, with a progress bar.
pub fn evaluate_checkpoint<B: Backend>(
    ck: &Checkpoint<B>,
    windows: &WindowSet,
    batch_size: usize,
    device: &B::Device,
    label: &str,
) -> Evaluation {
    let bar = eval_bar(label, windows.len());
    let result = evaluate(&ck.model, windows, &ck.meta.scaler, ck.meta.masking, batch_size, device, &mut |d, _| {
        bar.set_position(d as u64)
    });
    bar.finish_and_clear();
    result
}

/// All windows of `files` for a checkpoint of architecture `arch`, checking the channel count.
pub fn windows_for(arch: &Architecture, files: &[PathBuf]) -> anyhow::Result<WindowSet> {
    let windows = data::load(files, SlotFormat::Auto)?.all_windows(arch.t_in, arch.t_out, files)?;
    if windows.channels != arch.channels {
        anyhow::bail!(
            "{} holds frames with {} channels; the checkpoint expects {}",
            files[0].display(),
            windows.channels,
            arch.channels
        );
    }
    Ok(windows)
}

/// One line of a results table.
pub fn table_row(name: &str, e: &Evaluation, dense_macs: Option<f64>) -> String {
    let macs = e.macs_per_sample.map(|m| format!("{:.2}M", m / 1e6)).unwrap_or_else(|| "-".into());
    let ratio = match (e.macs_per_sample, dense_macs) {
        (Some(m), Some(d)) => format!("{:.3}", m / d),
        _ => "-".into(),
    };
    let kept = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
    format!(
        "| {name:<12} | {:>9.4} | {:>8.4} | {:>8.2} | {macs:>9} | {ratio:>6} | {:>5} | {:>5} |",
        e.metrics["mse"],
        e.metrics["mae"],
        e.metrics["rmse"],
        kept(e.kept_patch_fraction),
        kept(e.kept_unit_fraction)
    )
}

pub const TABLE_HEADER: &str = "| model        |       mse |      mae |     rmse |      MACs |  ratio | patch | units |\n|--------------|-----------|----------|----------|-----------|--------|-------|-------|";

pub fn run(
    checkpoint_dir: &Path,
    files: &[PathBuf],
    out: Option<&Path>,
    batch_size: usize,
    device: DeviceArg,
) -> anyhow::Result<()> {
    with_backend!(device, |B, T, dev| {
        let ck = checkpoint::load::<B>(checkpoint_dir, &dev)?;
        let arch = &ck.meta.architecture;
        let windows = windows_for(arch, files)?;
        let e = evaluate_checkpoint(&ck, &windows, batch_size, &dev, "eval");
        let p = evaluate_persistence(&windows, &ck.meta.scaler);
        println!(
            "{} windows of {}x{} from {} file(s)\n{TABLE_HEADER}",
            windows.len(),
            windows.height,
            windows.width,
            files.len()
        );
        println!("{}", table_row("model", &e, e.macs_per_sample));
        println!("{}", table_row("persistence", &p, None));
        if let Some(out) = out {
            let mut report = serde_json::to_value(&e)?;
            report["persistence"] = json!({ "metrics": p.metrics });
            report["checkpoint"] = json!(checkpoint_dir);
            std::fs::write(out, serde_json::to_string_pretty(&report)?)
                .with_context(|| format!("writing {}", out.display()))?;
            eprintln!("wrote {}", out.display());
        }
        Ok(())
    })
}
