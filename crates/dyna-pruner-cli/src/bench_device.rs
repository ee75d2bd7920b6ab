//! `dyna-pruner bench --device cuda`: on a GPU the sparse path is the framework-ops one
//! (`DynamicModel::forward_gathered`: selected im2col rows of the kept patches, batched matmuls
//! with each sample's kept units), timed against the model's dense forward (Burn's `conv2d`:
//! our dense GPU path) in the same run, optionally next to a PyTorch twin of the
//! dense CNN (`scripts/torch_twin.py`) timed on the same device. Clocks are read after a device
//! sync; JIT and autotune run in the warm-up. Build with `--features autotune` for these
//! timings: without it Burn runs fixed kernels (the report says which).

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use burn::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use dyna_pruner::backbones::BackboneKind;
use dyna_pruner::gathered::{GatheredBackend, GatheredMasks};
use dyna_pruner::method::{FixedMasks, MaskMode, Masking};
use dyna_pruner::model::{Architecture, DynamicModel};
use dyna_pruner_exec::spec::BackboneSpec;

use crate::bench::{architecture, BenchPlan, Row};
use crate::torch_twin::{best, TorchTimes};

#[derive(Serialize)]
struct Report {
    device: String,
    backend: &'static str,
    /// Whether Burn's kernels were autotuned (built with `--features autotune`).
    autotune: bool,
    architecture: Architecture,
    runs: usize,
    warmup: usize,
    torch: Option<serde_json::Value>,
    rows: Vec<Row>,
}

/// Medians over `runs` runs of `f` after `warmup`, in ms.
struct Timing {
    /// Until the device sync after `f` returns: the wall time.
    wall: f64,
    /// Until `f` returns: the host's share (dispatching work to the device thread; Burn's fusion
    /// may still hold the last operations, which the sync then runs). Near `wall` means that
    /// the host, not the GPU, bounds the forward.
    host: f64,
}

/// Times `f`, each run followed by a device sync: medians over `runs` runs after `warmup`.
fn median_ms<B: Backend>(device: &B::Device, runs: usize, warmup: usize, mut f: impl FnMut()) -> Timing {
    let mut time = || {
        let t = Instant::now();
        f();
        let host = t.elapsed().as_secs_f64() * 1e3;
        B::sync(device).expect("device sync");
        (t.elapsed().as_secs_f64() * 1e3, host)
    };
    for _ in 0..warmup {
        time();
    }
    let (mut wall, mut host): (Vec<f64>, Vec<f64>) = (0..runs).map(|_| time()).unzip();
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Timing { wall: median(&mut wall), host: median(&mut host) }
}

/// The CNN rows on backend `B` (the GPU in practice; any backend works).
pub fn run<B: GatheredBackend>(
    device: &B::Device,
    device_name: &str,
    out: &Path,
    plan: &BenchPlan,
) -> anyhow::Result<()> {
    if !cfg!(feature = "autotune") {
        eprintln!("note: built without `--features autotune`: Burn's dense forward runs untuned kernels");
    }
    let arch = architecture(BackboneKind::Cnn, plan.data_scope);
    B::seed(device, 1);
    let model = DynamicModel::<B>::new(&arch, device);
    let BackboneSpec::Cnn(cnn) = &arch.model.backbone else { unreachable!("the GPU bench runs the CNN") };
    let shapes = (&plan.sizes[..], &plan.batches[..]);
    let torch = (plan.torch_twin.as_deref())
        .map(|s| TorchTimes::measure(s, &arch, shapes, (plan.runs, plan.warmup), "cuda", 0))
        .transpose()?;
    println!("{device_name}: {arch:?}\nmedian of {} runs after {} warm-up runs\n", plan.runs, plan.warmup);
    println!(
        "| size | batch | kept | MAC ratio | dense (conv2d) ms | sparse ms | speedup | efficiency | torch f32 / tf32 / bf16 ms | sparse / torch best |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    let mut rng = StdRng::seed_from_u64(1);
    // Progress on stderr: on a fresh machine the first warm-up of each shape compiles and
    // autotunes its kernels, which takes minutes without other output.
    let start = Instant::now();
    let progress = |what: String| eprintln!("[{:>4.0} s] {what}", start.elapsed().as_secs_f64());
    for &size in &plan.sizes {
        for &batch in &plan.batches {
            let (h, w) = (size, size);
            let shape = [batch, arch.frames.t_in, arch.frames.channels, h, w];
            let values: Vec<f32> = (0..shape.iter().product()).map(|_| rng.random_range(0.0..1.0)).collect();
            let x = Tensor::<B, 5>::from_data(TensorData::new(values, shape), device);
            let macs = model.mac_model(h, w);
            progress(format!(
                "{size}x{size}, batch {batch}: dense forward (warm-up compiles and autotunes new shapes)"
            ));
            let dense = median_ms::<B>(device, plan.runs, plan.warmup, || {
                let _ = model.forward(x.clone(), Masking::DENSE).prediction;
            });
            eprintln!("  dense forward: {:.2} ms, of which {:.2} ms until the call returns", dense.wall, dense.host);
            let dense_ms = dense.wall;
            let torch_ms = torch.as_ref().map(|t| t.at(size, batch));
            let torch_best_ms = torch_ms.as_ref().and_then(best);
            for &f in &plan.fractions {
                let masking = Masking::top_k(MaskMode::Both, f, f);
                progress(format!("{size}x{size}, batch {batch}, kept {f:.1}: sparse forward, checked, then timed"));
                // On this device: the sparse path against the masked-dense reference under the masks
                // it chose. (The gates' pooled sums round differently from the reference's, so
                // near-tied unit scores can rank apart here; the choice itself is tested on the CPU.)
                let (got, used) = model.forward_gathered(x.clone(), GatheredMasks::Method(masking));
                let grid = arch.patch_grid(h, w);
                let units = arch.layer_units();
                let mut fixed = FixedMasks::new(&used.to_lists(), grid, &units, arch.patch(), device);
                let want = model.forward_masked(x.clone(), &mut fixed);
                let scale = want.clone().abs().max().into_scalar().elem::<f64>().max(1e-3);
                let worst = (got - want).abs().max().into_scalar().elem::<f64>();
                if worst > 1e-3 * scale {
                    anyhow::bail!("{size}x{size}, batch {batch}, kept {f}: the sparse path differs from the masked-dense reference by {worst} (scale {scale})");
                }
                let sparse = median_ms::<B>(device, plan.runs, plan.warmup, || {
                    let _ = model.forward_gathered(x.clone(), GatheredMasks::Method(masking));
                });
                let sparse_ms = sparse.wall;
                let patches = grid.0 * grid.1;
                let mac_ratio = macs.dense() as f64 / macs.nominal_dynamic(patches, f, cnn.units, f);
                let speedup = dense_ms / sparse_ms;
                let row = Row {
                    model: None,
                    backbone: "cnn",
                    height: h,
                    width: w,
                    batch,
                    kept_fraction: f,
                    mac_ratio,
                    dense_ms,
                    sparse_ms,
                    speedup,
                    efficiency: speedup / mac_ratio,
                    burn_dense_ms: Some(dense_ms),
                    masked_units_ms: None,
                    sparse_host_ms: Some(sparse.host),
                    torch_ms: torch_ms.clone(),
                    torch_best_ms,
                };
                println!(
                    "| {size}x{size} | {batch} | {f:.1} | {mac_ratio:.2} | {dense_ms:.2} | {sparse_ms:.2} | {speedup:.2} | {:.2} | {} | {} |",
                    row.efficiency,
                    torch_ms.as_ref().map_or("-".into(), crate::torch_twin::columns),
                    torch_best_ms.map_or("-".into(), |t| format!("{:.2}", sparse_ms / t))
                );
                eprintln!(
                    "  checked against the masked-dense reference: max |diff| {worst:.2e} (max |value| {scale:.2}); sparse forward: {:.2} ms, of which {:.2} ms until the call returns",
                    sparse.wall, sparse.host
                );
                rows.push(row);
            }
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let backend = std::any::type_name::<B>();
    let backend = if backend.to_lowercase().contains("cuda") { "cuda" } else { "flex" };
    let report = Report {
        device: device_name.to_string(),
        backend,
        autotune: cfg!(feature = "autotune"),
        architecture: arch,
        runs: plan.runs,
        warmup: plan.warmup,
        torch: torch.map(|t| t.report),
        rows,
    };
    let path = out.join("bench.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("\nwrote {}", path.display());
    Ok(())
}
