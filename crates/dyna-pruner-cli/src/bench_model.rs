//! `dyna-pruner bench --model PATH... --data FILE...`: trained models on real frames, through
//! the framework-free executor: each model's dense path against its own masks, timed in the
//! same rounds, on the first windows of the data, and with `--reference` against another
//! model's dense forward in the same rounds. A path is an exported model file
//! (`model.safetensors`, as `predict` writes it) or a checkpoint directory (exported first).

use std::path::{Path, PathBuf};

use anyhow::Context;
use dyna_pruner::data::{Scaler, WindowSet};
use dyna_pruner_exec::format;
use dyna_pruner_exec::spec::MaskMode;
use dyna_pruner_exec::{Exec, ExportedModel, MaskPlan, Output, UnitExecution};

use crate::bench::{interleaved_medians, Against, BenchPlan, Row};
use crate::budget::KeepArgs;

/// A model to time: an exported file, or a checkpoint directory exported first.
fn load(path: &Path) -> anyhow::Result<ExportedModel> {
    if path.is_dir() {
        crate::predict::export_checkpoint(path)
    } else {
        Ok(format::load(path)?)
    }
}

/// The first `batch` windows, scaled, for the model `name`.
fn batch_inputs(name: &str, windows: &WindowSet, batch: usize, scaler: &Scaler) -> anyhow::Result<Vec<f32>> {
    if batch > windows.len() {
        anyhow::bail!("{name}: batch {batch} needs {batch} windows; the data holds {}", windows.len());
    }
    Ok(windows.scaled_inputs(0..batch, scaler))
}

/// The MACs of a forward's whole batch.
fn total_macs(output: &Output) -> f64 {
    output.macs.iter().sum::<u64>() as f64
}

/// `--reference`: a dense model's executor, and per batch size the scaled inputs (on its own
/// windows of the data) and the MACs of its dense forward.
struct Reference {
    name: String,
    exec: Exec,
    size: (usize, usize),
    inputs: Vec<(Vec<f32>, f64)>,
}

impl Reference {
    fn load(path: &Path, data: &[PathBuf], batches: &[usize]) -> anyhow::Result<Reference> {
        let name = path.display().to_string();
        let model = load(path).with_context(|| format!("reference {name}"))?;
        let (scaler, data_config) = crate::predict::scaler_and_data(&model, path)?;
        let windows = crate::eval::windows_for(&data_config, &model.arch, data)
            .with_context(|| format!("reference {name}: reading the data in its format"))?;
        let (exec, (h, w)) = (model.executor()?, (windows.height, windows.width));
        let inputs = batches
            .iter()
            .map(|&batch| {
                let x = batch_inputs(&name, &windows, batch, &scaler)?;
                let macs = total_macs(&exec.forward(&x, batch, h, w, MaskPlan::Dense)?);
                Ok((x, macs))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Reference { name, exec, size: (h, w), inputs })
    }
}

/// One row per model and batch size.
pub fn run(
    models: &[PathBuf],
    data: &[PathBuf],
    reference: Option<&Path>,
    out: &Path,
    plan: &BenchPlan,
    keep: KeepArgs,
) -> anyhow::Result<()> {
    let threads = rayon::current_num_threads();
    let reference = reference.map(|path| Reference::load(path, data, &plan.batches)).transpose()?;
    println!("{threads} threads, median of {} runs after {} warm-up runs\n", plan.runs, plan.warmup);
    if let Some(r) = &reference {
        println!("against: {}'s dense forward, timed in the same rounds\n", r.name);
    }
    let against_columns = if reference.is_some() { " against: ms | speedup | MAC ratio | efficiency |" } else { "" };
    println!(
        "| model | size | batch | kept patches | MAC ratio | dense ms | dynamic ms | dynamic, masked units ms | speedup | efficiency |{against_columns}"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|{}", if reference.is_some() { "---|---|---|---|" } else { "" });
    let mut rows = Vec::new();
    for path in models {
        let model = load(path)?;
        let (scaler, data_config) = crate::predict::scaler_and_data(&model, path)?;
        let mut exec = model.executor()?;
        exec.set_masking(keep.apply(&model.arch, model.masking, &path.display().to_string())?);
        // A CNN with unit masks can also mask the pruned units instead of selecting the kept ones.
        let mut masked = exec.clone();
        let masked = (model.masking.mode.model() && masked.set_unit_execution(UnitExecution::Mask)).then_some(masked);
        // A dense model's own masks are none.
        let own = if model.masking.mode == MaskMode::Dense { MaskPlan::Dense } else { MaskPlan::Dynamic };
        let windows = crate::eval::windows_for(&data_config, &model.arch, data)?;
        let (h, w) = (windows.height, windows.width);
        let name = path.display().to_string();
        if let Some(r) = reference.as_ref().filter(|r| r.size != (h, w)) {
            anyhow::bail!("{name}: frames of {h}x{w}, but the reference {} reads {}x{}", r.name, r.size.0, r.size.1);
        }
        for (b, &batch) in plan.batches.iter().enumerate() {
            let x = batch_inputs(&name, &windows, batch, &scaler)?;
            let dense = exec.forward(&x, batch, h, w, MaskPlan::Dense)?;
            let dynamic = exec.forward(&x, batch, h, w, own)?;
            let mac_ratio = total_macs(&dense) / total_macs(&dynamic);
            let (hp, wp) = model.arch.patch_grid(h, w);
            let kept =
                dynamic.masks.iter().map(|m| m.patches.len() as f64).sum::<f64>() / (batch * hp * wp).max(1) as f64;
            let kept = if dynamic.masks.is_empty() { 1.0 } else { kept };
            let mut jobs: Vec<Box<dyn FnMut() + '_>> = vec![
                Box::new(|| {
                    exec.forward(&x, batch, h, w, MaskPlan::Dense).expect("valid input");
                }),
                Box::new(|| {
                    exec.forward(&x, batch, h, w, own).expect("valid input");
                }),
            ];
            let masked_at = masked.as_ref().map(|m| {
                jobs.push(Box::new(|| {
                    m.forward(&x, batch, h, w, own).expect("valid input");
                }));
                jobs.len() - 1
            });
            if let Some(r) = &reference {
                let x = &r.inputs[b].0;
                jobs.push(Box::new(move || {
                    r.exec.forward(x, batch, h, w, MaskPlan::Dense).expect("valid input");
                }));
            }
            let times = interleaved_medians(plan.runs, plan.warmup, &mut jobs);
            drop(jobs);
            let (dense_ms, sparse_ms, masked_units_ms) = (times[0], times[1], masked_at.map(|i| times[i]));
            let against = reference.as_ref().map(|r| {
                let (dense_ms, mac_ratio) = (times[times.len() - 1], r.inputs[b].1 / total_macs(&dynamic));
                let speedup = dense_ms / sparse_ms;
                Against { model: r.name.clone(), dense_ms, mac_ratio, speedup, efficiency: speedup / mac_ratio }
            });
            let row = Row {
                model: Some(name.clone()),
                masked_units_ms,
                against,
                ..Row::timed(model.arch.kind().name(), (h, w), (batch, kept as f32), mac_ratio, (dense_ms, sparse_ms))
            };
            println!(
                "| {name} | {h}x{w} | {batch} | {kept:.2} | {mac_ratio:.2} | {dense_ms:.2} | {sparse_ms:.2} | {} | {:.2} | {:.2} |{}",
                masked_units_ms.map_or("-".into(), |m| format!("{m:.2}")),
                row.speedup,
                row.efficiency,
                row.against.as_ref().map_or(String::new(), |a| format!(
                    " {:.2} | {:.2} | {:.2} | {:.2} |",
                    a.dense_ms, a.speedup, a.mac_ratio, a.efficiency
                ))
            );
            rows.push(row);
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let path = out.join("bench.json");
    let report =
        serde_json::json!({ "threads": threads, "runs": plan.runs, "warmup": plan.warmup, "data": data, "rows": rows });
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("\nwrote {}", path.display());
    Ok(())
}
