//! `dyna-pruner predict`: the sparse executor on real data; writes the predicted frames (npy, in
//! physical units), per-sample kept fractions and MACs, and the exported executor model.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use serde_json::json;

use dyna_pruner::data::npz::npy_bytes;
use dyna_pruner::export;
use dyna_pruner::train::checkpoint;
use dyna_pruner::CpuBackend;
use dyna_pruner_exec::MaskPlan;

use crate::progress::eval_bar;

pub fn run(checkpoint_dir: &Path, files: &[PathBuf], out: &Path, batch_size: usize) -> anyhow::Result<()> {
    let ck = checkpoint::load::<CpuBackend>(checkpoint_dir, &Default::default())?;
    let (arch, scaler) = (&ck.meta.architecture, &ck.meta.scaler);
    let exec = export::executor(&ck.model, arch, ck.meta.masking);
    let windows = crate::eval::windows_for(checkpoint_dir, arch, files)?;
    let layer_units = exec.layer_units();
    let plan =
        if ck.meta.masking.mode == dyna_pruner::method::MaskMode::Dense { MaskPlan::Dense } else { MaskPlan::Dynamic };
    let (h, w) = (windows.height, windows.width);
    let (mut predictions, mut samples) = (Vec::new(), Vec::new());
    let bar = eval_bar("predict", windows.len());
    let started = Instant::now();
    let indices: Vec<usize> = (0..windows.len()).collect();
    for chunk in indices.chunks(batch_size.max(1)) {
        let mut x = Vec::new();
        for &i in chunk {
            windows.scaled_input_into(i, scaler, &mut x);
        }
        let result = exec.forward(&x, chunk.len(), h, w, plan)?;
        predictions.extend(result.prediction.iter().enumerate().map(|(i, &v)| scaler.unscale(i, v)));
        let patches = h.div_ceil(arch.patch) * w.div_ceil(arch.patch);
        for (j, &i) in chunk.iter().enumerate() {
            let m = result.masks.get(j);
            let kept_units = m.map_or(1.0, |m| {
                m.units.iter().zip(&layer_units).map(|(u, all)| u.len() as f64 / *all as f64).sum::<f64>()
                    / layer_units.len() as f64
            });
            samples.push(json!({
                "window": i,
                "target_date": windows.target_date(i),
                "kept_patch_fraction": m.map_or(1.0, |m| m.patches.len() as f64 / patches as f64),
                "kept_unit_fraction": kept_units,
                "macs": result.macs[j],
            }));
        }
        bar.set_position(samples.len() as u64);
    }
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let shape = [windows.len(), arch.t_out, arch.channels, h, w];
    std::fs::write(out.join("predictions.npy"), npy_bytes(&shape, &predictions)).context("writing predictions.npy")?;
    let report = json!({
        "checkpoint": checkpoint_dir,
        "data": files,
        "shape": shape,
        "units": "physical (inverse of the checkpoint's scaling)",
        "seconds": seconds,
        "samples": samples,
    });
    std::fs::write(out.join("samples.json"), serde_json::to_string_pretty(&report)?).context("writing samples.json")?;
    export::write(&out.join("model.safetensors"), &ck.model, arch, ck.meta.masking)?;
    let mean_macs =
        samples.iter().map(|s| s["macs"].as_f64().unwrap_or(0.0)).sum::<f64>() / samples.len().max(1) as f64;
    println!(
        "{} windows in {seconds:.2}s ({:.3} ms/window), mean {:.2}M MACs/window -> {}/predictions.npy, samples.json, model.safetensors",
        samples.len(),
        1e3 * seconds / samples.len().max(1) as f64,
        mean_macs / 1e6,
        out.display()
    );
    Ok(())
}
