//! `dyna-pruner bench --device cuda`: the CNN's sparse GPU path (`DynamicModel::forward_gathered`:
//! the kept patches' pixels and each sample's kept units through the gathered kernels) timed
//! against the model's dense forward (Burn's `conv2d`: our dense GPU path) in the same run, in
//! one `--precision` (Burn fixes the GPU's float type at its first tensor) for each of
//! `--launch fused,direct`, all with the same weights. Every sparse forward is first checked
//! against the CPU's f32 masked-dense forward under the masks it chose. Optionally next to a
//! PyTorch twin of the dense CNN (`scripts/torch_twin.py`) timed on the same device in every
//! precision its users pick. Clocks are read after a device sync; JIT and autotune run in the
//! warm-up. Build with `--features autotune` for these timings: without it Burn runs fixed
//! kernels (the report says which).

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
use dyna_pruner::CpuBackend;
use dyna_pruner_exec::spec::BackboneSpec;

use crate::bench::{architecture, BenchPlan, Row};
use crate::device::{Launch, Precision};
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

/// The CNN rows on the GPU in `precision`: the dense and the sparse forward of each launch in
/// `launches`, every sparse forward first checked against the f32 masked-dense reference on
/// the CPU under the masks it chose. All variants run the same weights (drawn on the CPU with
/// a fixed seed). One precision per process: Burn fixes the GPU's float type at its first
/// tensor ([`dyna_pruner::cuda_device`]).
pub fn run(
    device_name: &str,
    out: &Path,
    plan: &BenchPlan,
    precision: Precision,
    launches: &[Launch],
) -> anyhow::Result<()> {
    use burn::tensor::bf16;
    use dyna_pruner::{cuda_device, CudaBackend, CudaDirectBackend};
    if !cfg!(feature = "autotune") {
        eprintln!("note: built without `--features autotune`: Burn's dense forward runs untuned kernels");
    }
    let arch = architecture(BackboneKind::Cnn, plan.data_scope);
    let cpu = Default::default();
    CpuBackend::seed(&cpu, 1);
    // The reference too is loaded from the record: Burn initialises parameters lazily, so a
    // clone taken before their first use draws weights of its own.
    let weights = DynamicModel::<CpuBackend>::new(&arch, &cpu).into_weight_bytes()?;
    let reference = DynamicModel::<CpuBackend>::from_weight_bytes(&arch, &weights, &cpu)?;
    let shapes = (&plan.sizes[..], &plan.batches[..]);
    let torch = (plan.torch_twin.as_deref())
        .map(|s| TorchTimes::measure(s, &arch, shapes, (plan.runs, plan.warmup), "cuda", 0))
        .transpose()?;
    println!("{device_name}: {arch:?}\nmedian of {} runs after {} warm-up runs\n", plan.runs, plan.warmup);
    println!(
        "| size | batch | precision | launch | kept | MAC ratio | dense ms | sparse ms (host) | speedup | torch f32 / tf32 / bf16 ms | sparse / torch best |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let bench = Bench { arch: &arch, plan, reference: (&reference, &cpu), weights: &weights, torch: torch.as_ref() };
    let mut rows = Vec::new();
    for &launch in launches {
        let variant = (precision, launch);
        let timed = match variant {
            (Precision::F32, Launch::Fused) => bench.rows::<CudaBackend>(&cuda_device::<f32>()?, variant),
            (Precision::F32, Launch::Direct) => bench.rows::<CudaDirectBackend>(&cuda_device::<f32>()?, variant),
            (Precision::Bf16, Launch::Fused) => bench.rows::<CudaBackend<bf16>>(&cuda_device::<bf16>()?, variant),
            (Precision::Bf16, Launch::Direct) => {
                bench.rows::<CudaDirectBackend<bf16>>(&cuda_device::<bf16>()?, variant)
            }
        };
        rows.extend(timed?.into_iter().map(|mut row| {
            row.precision = Some(precision);
            row.launch = Some(launch);
            row
        }));
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let report = Report {
        device: device_name.to_string(),
        backend: "cuda",
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

/// The samples of each batch checked against the CPU reference (its forward at 384x384 takes
/// seconds per sample).
const CHECKED_SAMPLES: usize = 2;

/// What every variant of one bench run shares.
struct Bench<'a> {
    arch: &'a Architecture,
    plan: &'a BenchPlan,
    /// The f32 model on the CPU that every sparse forward is checked against, and its device.
    reference: (&'a DynamicModel<CpuBackend>, &'a burn::tensor::Device<CpuBackend>),
    /// Its weights, loaded into each variant's backend.
    weights: &'a [u8],
    torch: Option<&'a TorchTimes>,
}

impl Bench<'_> {
    /// The rows of backend `B` (`variant`): the dense forward, then per kept fraction the sparse
    /// forward, checked, then timed.
    fn rows<B: GatheredBackend>(&self, device: &B::Device, variant: (Precision, Launch)) -> anyhow::Result<Vec<Row>> {
        let (arch, plan) = (self.arch, self.plan);
        let model = DynamicModel::<B>::from_weight_bytes(arch, self.weights, device)?;
        let BackboneSpec::Cnn(cnn) = &arch.model.backbone else { unreachable!("the GPU bench runs the CNN") };
        let name = format!("{:?} {:?}", variant.0, variant.1).to_lowercase();
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
                let input = TensorData::new(values, shape);
                let x = Tensor::<B, 5>::from_data(input.clone(), device);
                let checked = batch.min(CHECKED_SAMPLES);
                let x_reference = Tensor::<CpuBackend, 5>::from_data(input, self.reference.1).narrow(0, 0, checked);
                let macs = model.mac_model(h, w);
                progress(format!(
                    "{name}, {size}x{size}, batch {batch}: dense forward (warm-up compiles and autotunes new shapes)"
                ));
                let dense = median_ms::<B>(device, plan.runs, plan.warmup, || {
                    let _ = model.forward(x.clone(), Masking::DENSE).prediction;
                });
                eprintln!(
                    "  dense forward: {:.2} ms, of which {:.2} ms until the call returns",
                    dense.wall, dense.host
                );
                let dense_ms = dense.wall;
                let torch_ms = self.torch.map(|t| t.at(size, batch));
                let torch_best_ms = torch_ms.as_ref().and_then(best);
                for &f in &plan.fractions {
                    let masking = Masking::top_k(MaskMode::Both, f, f);
                    progress(format!("{size}x{size}, batch {batch}, kept {f:.1}: sparse forward, checked, then timed"));
                    let (worst, scale) = self.check(&model, x.clone(), x_reference.clone(), masking, (h, w));
                    let allowed = variant.0.tolerance() * scale;
                    if worst > allowed {
                        anyhow::bail!(
                            "{name}, {size}x{size}, batch {batch}, kept {f}: the sparse path differs from the f32 masked-dense reference by {worst} (allowed {allowed})"
                        );
                    }
                    let sparse = median_ms::<B>(device, plan.runs, plan.warmup, || {
                        let _ = model.forward_gathered(x.clone(), GatheredMasks::Method(masking));
                    });
                    let sparse_ms = sparse.wall;
                    let grid = arch.patch_grid(h, w);
                    let mac_ratio = macs.dense() as f64 / macs.nominal_dynamic(grid.0 * grid.1, f, cnn.units, f);
                    let row = Row {
                        burn_dense_ms: Some(dense_ms),
                        sparse_host_ms: Some(sparse.host),
                        reference_max_diff: Some(worst),
                        torch_ms: torch_ms.clone(),
                        torch_best_ms,
                        ..Row::timed("cnn", (h, w), (batch, f), mac_ratio, (dense_ms, sparse_ms))
                    };
                    let speedup = row.speedup;
                    println!(
                        "| {size}x{size} | {batch} | {:?} | {:?} | {f:.1} | {mac_ratio:.2} | {dense_ms:.2} | {sparse_ms:.2} ({:.2}) | {speedup:.2} | {} | {} |",
                        variant.0,
                        variant.1,
                        sparse.host,
                        torch_ms.as_ref().map_or("-".into(), crate::torch_twin::columns),
                        torch_best_ms.map_or("-".into(), |t| format!("{:.2}", sparse_ms / t))
                    );
                    eprintln!(
                        "  checked against the f32 masked-dense reference: max |diff| {:.2e} (allowed {:.2e}); sparse forward: {:.2} ms, of which {:.2} ms until the call returns",
                        worst, allowed, sparse.wall, sparse.host
                    );
                    rows.push(row);
                }
            }
        }
        Ok(rows)
    }

    /// The sparse forward of `model` against the f32 reference's masked-dense forward under the
    /// masks it chose, on the samples `x_reference` holds (the first of the batch: each
    /// sample's forward is its own): the largest difference and the reference's largest value.
    /// (The gates' pooled sums round differently from the reference's, so near-tied unit
    /// scores can rank apart here; the choice itself is tested on the CPU.)
    fn check<B: GatheredBackend>(
        &self,
        model: &DynamicModel<B>,
        x: Tensor<B, 5>,
        x_reference: Tensor<CpuBackend, 5>,
        masking: Masking,
        (h, w): (usize, usize),
    ) -> (f64, f64) {
        let (got, used) = model.forward_gathered(x, GatheredMasks::Method(masking));
        let (reference, device) = self.reference;
        let checked = x_reference.dims()[0];
        let got = Tensor::<CpuBackend, 5>::from_data(got.narrow(0, 0, checked).into_data().convert::<f32>(), device);
        let arch = self.arch;
        let masks = &used.to_lists()[..checked];
        let mut fixed = FixedMasks::new(masks, arch.patch_grid(h, w), &arch.layer_units(), arch.patch(), device);
        let want = reference.forward_masked(x_reference, &mut fixed);
        let scale = want.clone().abs().max().into_scalar().elem::<f64>().max(1e-3);
        let worst = (got - want).abs().max().into_scalar().elem::<f64>();
        (worst, scale)
    }
}
