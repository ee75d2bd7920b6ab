//! The PyTorch peer in the same bench run: `scripts/torch_twin.py` times the dense CNN of the
//! same architecture in every precision PyTorch users run (f32, TF32 on CUDA, bf16 autocast) on
//! the same device and thread count; each bench row records them all and the fastest.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use anyhow::Context;
use dyna_pruner::model::Architecture;
use dyna_pruner_exec::spec::BackboneSpec;

/// The twin's times: per (size, batch), per precision, the median ms.
pub struct TorchTimes {
    /// The twin's JSON report, stored in the bench report as it came.
    pub report: serde_json::Value,
}

impl TorchTimes {
    /// Runs `script` for the CNN `arch` at `sizes` x `batches` on `device` (`cpu` or `cuda`),
    /// on the CPU with `threads` threads.
    pub fn measure(
        script: &Path,
        arch: &Architecture,
        (sizes, batches): (&[usize], &[usize]),
        (runs, warmup): (usize, usize),
        device: &str,
        threads: usize,
    ) -> anyhow::Result<TorchTimes> {
        let BackboneSpec::Cnn(cnn) = &arch.model.backbone else { anyhow::bail!("the PyTorch twin is a CNN") };
        let f = arch.frames;
        let list = |v: &[usize]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",");
        eprintln!("timing the PyTorch twin ({} on {device})", script.display());
        let out = Command::new("python3")
            .arg(script)
            .args(["--device", device, "--threads", &threads.to_string()])
            .args(["--sizes", &list(sizes), "--batches", &list(batches)])
            .args(["--runs", &runs.to_string(), "--warmup", &warmup.max(3).to_string()])
            .args(["--hidden", &cnn.hidden.to_string(), "--units", &cnn.units.to_string()])
            .args(["--blocks", &cnn.blocks.to_string(), "--stride", &cnn.stride.to_string()])
            .args(["--t-in", &f.t_in.to_string(), "--t-out", &f.t_out.to_string()])
            .args(["--channels", &f.channels.to_string()])
            .output()
            .with_context(|| format!("running python3 {}", script.display()))?;
        if !out.status.success() {
            anyhow::bail!("{} failed: {}", script.display(), String::from_utf8_lossy(&out.stderr));
        }
        let report = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("reading the JSON printed by {}", script.display()))?;
        Ok(TorchTimes { report })
    }

    /// Median ms per precision at `size` x `size`, batch `batch`.
    pub fn at(&self, size: usize, batch: usize) -> BTreeMap<String, f64> {
        let rows = self.report["rows"].as_array().map(Vec::as_slice).unwrap_or_default();
        rows.iter()
            .filter(|r| r["size"].as_u64() == Some(size as u64) && r["batch"].as_u64() == Some(batch as u64))
            .filter_map(|r| Some((r["precision"].as_str()?.to_string(), r["dense_ms"].as_f64()?)))
            .collect()
    }
}

/// The fastest of the twin's precisions.
pub fn best(times: &BTreeMap<String, f64>) -> Option<f64> {
    times.values().copied().min_by(f64::total_cmp)
}

/// `f32 / tf32 / bf16` ms for a table cell (`-` where a precision was not timed).
pub fn columns(times: &BTreeMap<String, f64>) -> String {
    let cell = |p: &str| times.get(p).map_or("-".to_string(), |v| format!("{v:.2}"));
    ["f32", "tf32", "bf16"].map(cell).join(" / ")
}
