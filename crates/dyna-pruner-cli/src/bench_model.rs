//! `dyna-pruner bench --model PATH... --data FILE...`: trained models on real frames, through
//! the framework-free executor: each model's dense path against its own masks, timed in the
//! same rounds, on the first windows of the data. A path is an exported model file
//! (`model.safetensors`, as `predict` writes it) or a checkpoint directory (exported first).

use std::path::{Path, PathBuf};

use anyhow::Context;
use dyna_pruner_exec::format;
use dyna_pruner_exec::spec::MaskMode;
use dyna_pruner_exec::{MaskPlan, UnitExecution};

use crate::bench::{interleaved_medians, BenchPlan, Row};
use crate::budget::KeepArgs;

/// One row per model and batch size.
pub fn run(models: &[PathBuf], data: &[PathBuf], out: &Path, plan: &BenchPlan, keep: KeepArgs) -> anyhow::Result<()> {
    let threads = rayon::current_num_threads();
    println!("{threads} threads, median of {} runs after {} warm-up runs\n", plan.runs, plan.warmup);
    println!(
        "| model | size | batch | kept patches | MAC ratio | dense ms | dynamic ms | dynamic, masked units ms | speedup | efficiency |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for path in models {
        let model = if path.is_dir() { crate::predict::export_checkpoint(path)? } else { format::load(path)? };
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
        for &batch in &plan.batches {
            if batch > windows.len() {
                anyhow::bail!("{name}: batch {batch} needs {batch} windows; the data holds {}", windows.len());
            }
            let x = windows.scaled_inputs(0..batch, &scaler);
            let dense = exec.forward(&x, batch, h, w, MaskPlan::Dense)?;
            let dynamic = exec.forward(&x, batch, h, w, own)?;
            let macs = |o: &dyna_pruner_exec::Output| o.macs.iter().sum::<u64>() as f64;
            let mac_ratio = macs(&dense) / macs(&dynamic);
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
            if let Some(m) = &masked {
                jobs.push(Box::new(|| {
                    m.forward(&x, batch, h, w, own).expect("valid input");
                }));
            }
            let times = interleaved_medians(plan.runs, plan.warmup, &mut jobs);
            drop(jobs);
            let (dense_ms, sparse_ms, masked_units_ms) = (times[0], times[1], times.get(2).copied());
            let row = Row {
                model: Some(name.clone()),
                masked_units_ms,
                ..Row::timed(model.arch.kind().name(), (h, w), (batch, kept as f32), mac_ratio, (dense_ms, sparse_ms))
            };
            println!(
                "| {name} | {h}x{w} | {batch} | {kept:.2} | {mac_ratio:.2} | {dense_ms:.2} | {sparse_ms:.2} | {} | {:.2} | {:.2} |",
                masked_units_ms.map_or("-".into(), |m| format!("{m:.2}")),
                row.speedup,
                row.efficiency
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
