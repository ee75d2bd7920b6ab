//! `dyna-pruner predict`: the sparse executor on real data; writes the predicted frames (npy, in
//! physical units), per-sample kept fractions and MACs, and the exported executor model.
//!
//! The model comes from a checkpoint (exported on the way, and written beside the predictions)
//! or from an exported file alone (`--model`): the forward then runs through
//! `dyna-pruner-exec` only, with the scaler and the data section the file carries.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use serde_json::json;

use dyna_pruner::checkpoint;
use dyna_pruner::config::{DataConfig, DataFormat};
use dyna_pruner::data::npz::npy_header;
use dyna_pruner::data::{Scaler, WindowSet};
use dyna_pruner::export;
use dyna_pruner::CpuBackend;
use dyna_pruner_exec::format::{self, ExportedModel};
use dyna_pruner_exec::spec::MaskMode;
use dyna_pruner_exec::{Exec, MaskPlan, UnitExecution};

use crate::pictures::Palette;
use crate::progress::eval_bar;
use crate::report::{self, Style};

/// How `predict` runs a CNN's kept units (`dyna_pruner_exec::UnitExecution`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UnitsArg {
    /// Whichever of the two is faster on the first batch on this machine (said in samples.json).
    Auto,
    /// Select and pack each sample's kept units' weights: the fewest MACs.
    Select,
    /// Compute the batch's kept units (their union) with shared weights and zero each sample's
    /// pruned ones: one weight copy per block, not per sample.
    Mask,
}

/// Runs of each execution timed on the first batch by `--units auto` (after one warm-up run).
const CALIBRATION_RUNS: usize = 3;

/// The execution `auto` picks from the two medians on the same batch.
fn faster(select_ms: f64, mask_ms: f64) -> UnitExecution {
    if select_ms <= mask_ms {
        UnitExecution::Select
    } else {
        UnitExecution::Mask
    }
}

/// The warning `auto` prints when the model with its masks, run the faster way, is slower than
/// the same weights without masks (the dense model's MACs): the masks cost more than they save.
fn slower_than_dense(dynamic_ms: f64, dense_ms: f64, batch: usize) -> Option<String> {
    (dynamic_ms > dense_ms).then(|| {
        format!(
            "warning: with its masks this model takes {dynamic_ms:.2} ms per batch of {batch} on this machine, \
             more than its weights without masks ({dense_ms:.2} ms, the dense model's MACs): here the masks cost \
             more than they save. Its weights without masks are no substitute (they were trained with the pruned \
             units masked), so it runs with its masks; a dense model of its architecture would be faster."
        )
    })
}

/// How a CNN with unit masks runs its kept units (they run two ways with the same prediction;
/// only their speed differs): as `units` says, `auto` timing both on the batch `x` beside the
/// same weights without masks (and warning when both ways are slower than that). Sets it on
/// `exec` and returns it (`None` for models without that choice) with the timings.
pub fn choose_unit_execution(
    exec: &mut Exec,
    (x, batch, h, w): (&[f32], usize, usize, usize),
    units: UnitsArg,
) -> (Option<UnitExecution>, serde_json::Value) {
    if !(exec.masking().mode.model() && exec.set_unit_execution(UnitExecution::Select)) {
        return (None, serde_json::Value::Null);
    }
    let (mode, calibration) = match units {
        UnitsArg::Select => (UnitExecution::Select, serde_json::Value::Null),
        UnitsArg::Mask => (UnitExecution::Mask, serde_json::Value::Null),
        UnitsArg::Auto => {
            let mut mask = exec.clone();
            mask.set_unit_execution(UnitExecution::Mask);
            let select = &*exec;
            let times = crate::bench::interleaved_medians(
                CALIBRATION_RUNS,
                1,
                &mut [
                    Box::new(|| {
                        select.forward(x, batch, h, w, MaskPlan::Dynamic).expect("valid input");
                    }),
                    Box::new(|| {
                        mask.forward(x, batch, h, w, MaskPlan::Dynamic).expect("valid input");
                    }),
                    Box::new(|| {
                        select.forward(x, batch, h, w, MaskPlan::Dense).expect("valid input");
                    }),
                ],
            );
            let mode = faster(times[0], times[1]);
            eprintln!(
                "kept units: selected {:.2} ms, masked {:.2} ms per batch of {batch} on this machine: running {mode:?}",
                times[0], times[1]
            );
            if let Some(warning) = slower_than_dense(times[0].min(times[1]), times[2], batch) {
                eprintln!("{warning}");
            }
            (mode, json!({ "batch": batch, "select_ms": times[0], "mask_ms": times[1], "without_masks_ms": times[2] }))
        }
    };
    exec.set_unit_execution(mode);
    (Some(mode), calibration)
}

/// Where the model comes from.
pub enum ModelSource {
    Checkpoint(PathBuf),
    Exported(PathBuf),
}

/// Metadata keys of an exported model that `predict --model` reads.
const SCALER: &str = "scaler";
const DATA: &str = "data";

/// The exported form of a checkpoint, with the scaler and the data section it was trained with.
pub fn export_checkpoint(dir: &Path) -> anyhow::Result<ExportedModel> {
    let ck = checkpoint::load::<CpuBackend>(dir, &Default::default())?;
    let data = checkpoint::read_config(dir)?.data;
    let metadata = BTreeMap::from([
        (SCALER.to_string(), serde_json::to_string(&ck.meta.scaler)?),
        (DATA.to_string(), serde_json::to_string(&data)?),
    ]);
    Ok(export::export(&ck.model, ck.meta.masking, metadata))
}

/// The scaler and the data section an exported model was trained with (from its metadata).
pub fn scaler_and_data(model: &ExportedModel, from: &Path) -> anyhow::Result<(Scaler, DataConfig)> {
    Ok((entry(model, SCALER, from)?, entry(model, DATA, from)?))
}

/// One metadata entry of an exported model, parsed.
fn entry<T: serde::de::DeserializeOwned>(model: &ExportedModel, key: &str, path: &Path) -> anyhow::Result<T> {
    let text = model.metadata.get(key).with_context(|| {
        format!("{}: no `{key}` in its metadata (export it with `dyna-pruner predict --checkpoint`)", path.display())
    })?;
    serde_json::from_str(text).with_context(|| format!("{}: bad `{key}` in its metadata", path.display()))
}

pub fn run(
    source: &ModelSource,
    files: &[PathBuf],
    out: &Path,
    (batch_size, units, budget): (Option<usize>, UnitsArg, crate::budget::BudgetArgs),
    pictures: bool,
) -> anyhow::Result<()> {
    let (model, label) = match source {
        ModelSource::Checkpoint(dir) => (export_checkpoint(dir)?, dir.display().to_string()),
        ModelSource::Exported(path) => (format::load(path)?, path.display().to_string()),
    };
    let from = Path::new(&label);
    let (scaler, data) = scaler_and_data(&model, from)?;
    let mut exec = model.executor()?;
    let arch = &model.arch;
    let windows = crate::eval::windows_for(&data, arch, files)?;
    let batch_size = batch_size.unwrap_or_else(|| dyna_pruner::eval::default_batch(windows.height, windows.width));
    let layer_units = arch.layer_units();
    let (h, w) = (windows.height, windows.width);
    let plan = if model.masking.mode == MaskMode::Dense { MaskPlan::Dense } else { MaskPlan::Dynamic };
    let (unit_execution, calibration) = if windows.is_empty() {
        (None, serde_json::Value::Null)
    } else {
        let batch = batch_size.max(1).min(windows.len());
        let x = windows.scaled_inputs(0..batch, &scaler);
        choose_unit_execution(&mut exec, (&x, batch, h, w), units)
    };
    let budget = match budget.latency_ms {
        Some(target) if !windows.is_empty() => {
            let batch = batch_size.max(1).min(windows.len());
            let x = windows.scaled_inputs(0..batch, &scaler);
            let choice = crate::budget::meet_latency(&mut exec, &model, &label, (&x, batch, h, w), target)?;
            eprintln!("{}", choice.summary());
            json!(choice)
        }
        Some(_) => anyhow::bail!("--latency-ms: no windows in the data to time"),
        None => {
            exec.set_masking(budget.keep.apply(arch, model.masking, &label)?);
            serde_json::Value::Null
        }
    };
    let masking = exec.masking();
    let (hp, wp) = arch.patch_grid(h, w);
    // Predictions go to disk batch by batch: memory holds one batch, not the data set's.
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let shape = [windows.len(), arch.frames.t_out, arch.frames.channels, h, w];
    let npy_path = out.join("predictions.npy");
    let file = std::fs::File::create(&npy_path).with_context(|| format!("creating {}", npy_path.display()))?;
    let mut npy = std::io::BufWriter::new(file);
    npy.write_all(&npy_header(&shape)).context("writing predictions.npy")?;
    let mut samples = Vec::new();
    let bar = eval_bar("predict", windows.len());
    let started = Instant::now();
    let indices: Vec<usize> = (0..windows.len()).collect();
    for chunk in indices.chunks(batch_size.max(1)) {
        let x = windows.scaled_inputs(chunk.iter().copied(), &scaler);
        let result = exec.forward(&x, chunk.len(), h, w, plan)?;
        for (i, &v) in result.prediction.iter().enumerate() {
            npy.write_all(&scaler.unscale(i, v).to_le_bytes()).context("writing predictions.npy")?;
        }
        for (j, &i) in chunk.iter().enumerate() {
            let m = result.masks.get(j);
            let kept_units = m.map_or(1.0, |m| {
                m.units.iter().zip(&layer_units).map(|(u, all)| u.len() as f64 / *all as f64).sum::<f64>()
                    / layer_units.len() as f64
            });
            samples.push(json!({
                "window": i,
                "target_date": windows.target_date(i),
                "kept_patch_fraction": m.map_or(1.0, |m| m.patches.len() as f64 / (hp * wp) as f64),
                "kept_unit_fraction": kept_units,
                "macs": result.macs[j],
            }));
        }
        bar.set_position(samples.len() as u64);
    }
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    npy.flush().context("writing predictions.npy")?;
    let report = json!({
        "model": label,
        "data": files,
        "shape": shape,
        "units": "physical (inverse of the model's scaling)",
        "unit_execution": unit_execution,
        "calibration": calibration,
        "masking": masking,
        "latency_budget": budget,
        "seconds": seconds,
        "batch_size": batch_size,
        "peak_rss_mb": crate::eval::peak_rss_mb(),
        "samples": samples,
    });
    std::fs::write(out.join("samples.json"), serde_json::to_string_pretty(&report)?).context("writing samples.json")?;
    let mut written = "predictions.npy, samples.json".to_string();
    if let ModelSource::Checkpoint(_) = source {
        format::save(&out.join("model.safetensors"), &model)?;
        written.push_str(", model.safetensors");
    }
    if pictures && !windows.is_empty() {
        let macs: Vec<f64> = samples.iter().map(|s| s["macs"].as_f64().unwrap_or(0.0)).collect();
        let patches: Vec<f64> = samples.iter().map(|s| s["kept_patch_fraction"].as_f64().unwrap_or(1.0)).collect();
        let drawn = draw(&exec, &windows, &scaler, &data, (&macs, &patches), plan, out)?;
        let made_by = format!(
            "Made by `dyna-pruner predict --pictures` with {label}: the sparse executor on each drawn window with the \
             model's own masks; values in physical units after its scaler."
        );
        let table = format!("<p>{} windows of {}.</p>\n", windows.len(), report::esc(&format!("{files:?}")));
        let page = report::write_page(out, "What the dynamic model skips", &table, &drawn, &made_by)?;
        written.push_str(&format!(", {} pictures, {}", drawn.len(), page.display()));
    }
    let mean_macs =
        samples.iter().map(|s| s["macs"].as_f64().unwrap_or(0.0)).sum::<f64>() / samples.len().max(1) as f64;
    println!(
        "{} windows in {seconds:.2}s ({:.3} ms/window), mean {:.2}M MACs/window -> {}: {written}",
        samples.len(),
        1e3 * seconds / samples.len().max(1) as f64,
        mean_macs / 1e6,
        out.display()
    );
    Ok(())
}

/// How a data format's fields are drawn.
fn style_of(data: &DataConfig) -> Style {
    match data.format {
        DataFormat::Crowd => Style { palette: Palette::Sequential, unit: "flow", anomaly: false, step: "step" },
        DataFormat::Netcdf => Style { palette: Palette::Sequential, unit: "", anomaly: false, step: "step" },
        DataFormat::Knmi | DataFormat::Sevir | DataFormat::SyntheticRadar => report::RADAR_STYLE,
    }
}

/// The pictures of `predict --pictures`: the chosen windows run again one by one for their
/// prediction, masks and S; every window's MACs and kept patch fraction are given.
fn draw(
    exec: &Exec,
    windows: &WindowSet,
    scaler: &Scaler,
    data: &DataConfig,
    (macs, patches): (&[f64], &[f64]),
    plan: MaskPlan<'_>,
    out: &Path,
) -> anyhow::Result<Vec<(PathBuf, String)>> {
    let dir = out.join("pictures");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let (h, w) = (windows.height, windows.width);
    let arch = exec.arch();
    let (hp, wp) = arch.patch_grid(h, w);
    let x0 = windows.scaled_inputs(0..1, scaler);
    let dense = exec.forward(&x0, 1, h, w, MaskPlan::Dense)?.macs[0] as f64;
    let fractions: Vec<f64> = macs.iter().map(|m| m / dense).collect();
    let signal = report::signals(windows);
    let layout = report::Layout { test: windows, patch: arch.patch(), style: style_of(data), climatology: None };
    let mut drawn = Vec::new();
    for (k, (window, label)) in report::chosen_windows(&fractions, &signal).into_iter().enumerate() {
        let x = windows.scaled_inputs(window..window + 1, scaler);
        let result = exec.forward(&x, 1, h, w, plan)?;
        let prediction: Vec<f32> = result.prediction.iter().enumerate().map(|(i, &v)| scaler.unscale(i, v)).collect();
        let kept = (0..hp * wp).map(|p| result.masks.first().is_none_or(|m| m.patches.contains(&p))).collect();
        let view = report::WindowView {
            window,
            label,
            input: windows.input(window),
            truth: windows.target(window),
            prediction: &prediction,
            importance: exec.importance(&x, h, w),
            kept,
            macs_fraction: fractions[window],
        };
        let path = dir.join(format!("window_{}_{label}.png", k + 1));
        let caption = report::draw_window(&path, &layout, &view)?;
        drawn.push((path, caption));
    }
    let path = dir.join("adaptivity.png");
    let caption = report::adaptivity(&path, &signal, &fractions, patches)?;
    drawn.push((path, caption));
    Ok(drawn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_takes_the_faster_execution_and_selection_on_a_tie() {
        assert_eq!(faster(1.0, 2.0), UnitExecution::Select);
        assert_eq!(faster(2.0, 2.0), UnitExecution::Select);
        assert_eq!(faster(2.5, 2.0), UnitExecution::Mask);
    }

    #[test]
    fn issue_22_a_dynamic_model_slower_than_its_weights_without_masks_says_so() {
        assert_eq!(slower_than_dense(1.5, 2.0, 256), None);
        let warning = slower_than_dense(211.1, 187.2, 256).expect("slower");
        assert!(warning.contains("211.10 ms per batch of 256") && warning.contains("187.20 ms"), "{warning}");
    }
}
