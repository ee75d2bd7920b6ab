//! `dyna-pruner bench`: wall-clock of the sparse executor against its own dense path (the fair
//! baseline: same kernels) and against Burn's dense forward, on random CNNs and ViTs at several
//! frame sizes, batches and kept fractions.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use burn::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use dyna_pruner::backbones::{BackboneKind, DataScope};
use dyna_pruner::export;
use dyna_pruner::method::{MaskMode, Masking};
use dyna_pruner::model::{Architecture, DynamicModel};
use dyna_pruner::CpuBackend;
use dyna_pruner_exec::spec::{BackboneSpec, CnnSpec, ConvLstmSpec, Frames, VitSpec};
use dyna_pruner_exec::MaskPlan;

use crate::torch_twin::{best, TorchTimes};

/// What to measure (`bench`'s options).
#[derive(clap::Args)]
pub struct BenchPlan {
    /// Backbones to time: cnn, vit, convlstm.
    #[arg(long, value_delimiter = ',', default_values = ["cnn", "vit"], value_parser = crate::parse_backbone)]
    pub backbones: Vec<BackboneKind>,
    /// Square frame sizes of the CNN and ConvLSTM rows.
    #[arg(long, value_delimiter = ',', default_values_t = [32, 128, 384])]
    pub sizes: Vec<usize>,
    /// Frame sizes HxW of the ViT rows (WeatherBench's 5.625 deg grid is 32x64).
    #[arg(long, value_delimiter = ',', default_values = ["32x64", "128x128"], value_parser = crate::parse_size)]
    pub vit_sizes: Vec<(usize, usize)>,
    #[arg(long, value_delimiter = ',', default_values_t = [1, 16])]
    pub batches: Vec<usize>,
    /// Kept patch fractions (the unit fraction is the same).
    #[arg(long, value_delimiter = ',', default_values_t = [1.0, 0.5, 0.3, 0.2])]
    pub fractions: Vec<f32>,
    /// Timed runs per measurement (the median is reported).
    #[arg(long, default_value_t = 20)]
    pub runs: usize,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// The layers the CNN's DataMask prunes, `translator` or `network` (also the encoder and
    /// decoder).
    #[arg(long, default_value = "translator", value_parser = crate::parse_scope)]
    pub data_scope: DataScope,
    /// Also time this PyTorch twin of the dense CNN (scripts/torch_twin.py) in every precision
    /// on the same device (on the CPU with the same threads): CNN rows get `torch_ms` and
    /// `torch_best_ms`.
    #[arg(long)]
    pub torch_twin: Option<PathBuf>,
}

/// One measured configuration (CPU and GPU benches alike).
#[derive(Serialize, Default)]
pub struct Row {
    /// The exported model timed (`bench --model`); absent for the random models.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub backbone: &'static str,
    pub height: usize,
    pub width: usize,
    pub batch: usize,
    pub kept_fraction: f32,
    pub mac_ratio: f64,
    pub dense_ms: f64,
    pub sparse_ms: f64,
    pub speedup: f64,
    pub efficiency: f64,
    /// Burn's own dense forward of the same model (flex on the CPU; on the GPU the dense path
    /// is that forward, so this equals `dense_ms`); absent for exported models.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burn_dense_ms: Option<f64>,
    /// `bench --model`, CNN: the model's own masks with `UnitExecution::Mask` (the batch's kept
    /// units computed with shared weights and each sample's pruned ones zeroed, instead of each
    /// sample's kept ones selected; the same prediction).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub masked_units_ms: Option<f64>,
    /// GPU: until the sparse forward call returns (the host's share of `sparse_ms`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sparse_host_ms: Option<f64>,
    /// The PyTorch twin's dense forward per precision (`f32`, `tf32`, `bf16`) on the same
    /// device and threads (`--torch-twin`, CNN rows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torch_ms: Option<BTreeMap<String, f64>>,
    /// The fastest of `torch_ms`: what a PyTorch user gets at best.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torch_best_ms: Option<f64>,
    /// GPU: the backend's float element.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precision: Option<crate::device::Precision>,
    /// GPU: fused or direct kernel launches.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub launch: Option<crate::device::Launch>,
    /// GPU: the sparse output's largest difference from the f32 masked-dense reference.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference_max_diff: Option<f64>,
    /// `bench --model --reference`: the reference model's dense forward, timed in the same rounds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub against: Option<Against>,
}

/// A row's model with its own masks against another model's dense forward (the dense model it
/// stands in for), timed in the same rounds on the same windows.
#[derive(Serialize, Default, Clone)]
pub struct Against {
    pub model: String,
    pub dense_ms: f64,
    /// The reference's MACs over the row's model's with its masks.
    pub mac_ratio: f64,
    /// The reference's time over the row's model's with its masks.
    pub speedup: f64,
    /// `speedup / mac_ratio`.
    pub efficiency: f64,
}

impl Row {
    /// A row of `backbone` at `(height, width)`, `batch` and `kept_fraction`: the dense and the
    /// sparse path's times, with the speedup and the efficiency (speedup / MAC ratio) they give.
    pub fn timed(
        backbone: &'static str,
        (height, width): (usize, usize),
        (batch, kept_fraction): (usize, f32),
        mac_ratio: f64,
        (dense_ms, sparse_ms): (f64, f64),
    ) -> Row {
        let speedup = dense_ms / sparse_ms;
        Row {
            backbone,
            height,
            width,
            batch,
            kept_fraction,
            mac_ratio,
            dense_ms,
            sparse_ms,
            speedup,
            efficiency: speedup / mac_ratio,
            ..Row::default()
        }
    }
}

#[derive(Serialize)]
struct Report {
    threads: usize,
    architectures: Vec<Architecture>,
    runs: usize,
    warmup: usize,
    /// The PyTorch twin's reports (`--torch-twin`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    torch: Vec<serde_json::Value>,
    rows: Vec<Row>,
}

/// The benchmarked architectures: the crowd CNN's (4 -> 4 frames, 2 channels) with patches of
/// 8 pixels; a weather ViT (12 -> 12 frames, 1 channel, 4x4-pixel tokens); the radar ConvLSTM's
/// (6 -> 6 frames, 1 channel, 2 cells at stride 4, patches of 16 pixels). `cnn_scope` is the
/// CNN's DataMask scope; the others prune their own layers.
pub fn architecture(kind: BackboneKind, cnn_scope: DataScope) -> Architecture {
    match kind {
        BackboneKind::Cnn => Architecture::new(
            Frames { t_in: 4, t_out: 4, channels: 2 },
            8,
            BackboneSpec::Cnn(CnnSpec { hidden: 32, units: 64, blocks: 8, stride: 2, data_scope: cnn_scope }),
        ),
        BackboneKind::Vit => Architecture::new(
            Frames { t_in: 12, t_out: 12, channels: 1 },
            4,
            BackboneSpec::Vit(VitSpec { dim: 128, heads: 8, mlp: 256, layers: 6 }),
        ),
        BackboneKind::ConvLstm => Architecture::new(
            Frames { t_in: 6, t_out: 6, channels: 1 },
            16,
            BackboneSpec::ConvLstm(ConvLstmSpec::default()),
        ),
    }
}

/// Median wall time in ms of each of `jobs`, timed in rounds (one run of each job per round,
/// after `warmup` rounds), so that a change of load on a shared machine hits every job alike and
/// the ratios between them stay fair.
pub fn interleaved_medians(runs: usize, warmup: usize, jobs: &mut [Box<dyn FnMut() + '_>]) -> Vec<f64> {
    for _ in 0..warmup {
        jobs.iter_mut().for_each(|f| f());
    }
    let mut times = vec![Vec::with_capacity(runs); jobs.len()];
    for _ in 0..runs {
        for (f, t) in jobs.iter_mut().zip(&mut times) {
            let start = Instant::now();
            f();
            t.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    times
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        })
        .collect()
}

pub fn run(out: &Path, plan: &BenchPlan) -> anyhow::Result<()> {
    let threads = rayon::current_num_threads();
    println!("{threads} threads, median of {} runs after {} warm-up runs", plan.runs, plan.warmup);
    let mut rows = Vec::new();
    let mut architectures = Vec::new();
    let mut torch_reports = Vec::new();
    for &kind in &plan.backbones {
        let arch = architecture(kind, plan.data_scope);
        let sizes: Vec<(usize, usize)> = match kind {
            BackboneKind::Cnn | BackboneKind::ConvLstm => plan.sizes.iter().map(|&s| (s, s)).collect(),
            BackboneKind::Vit => plan.vit_sizes.clone(),
        };
        // PyTorch's CPU defaults on the same threads, for the CNN.
        let twin = plan.torch_twin.as_deref().filter(|_| kind == BackboneKind::Cnn);
        let shapes = (&plan.sizes[..], &plan.batches[..]);
        let torch = twin
            .map(|s| TorchTimes::measure(s, &arch, shapes, (plan.runs, plan.warmup), "cpu", threads))
            .transpose()?;
        rows.extend(bench_backbone(&arch, &sizes, plan, torch.as_ref())?);
        torch_reports.extend(torch.map(|t| t.report));
        architectures.push(arch);
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let report = Report { threads, architectures, runs: plan.runs, warmup: plan.warmup, torch: torch_reports, rows };
    let path = out.join("bench.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("\nwrote {}", path.display());
    Ok(())
}

fn bench_backbone(
    arch: &Architecture,
    sizes: &[(usize, usize)],
    plan: &BenchPlan,
    torch: Option<&TorchTimes>,
) -> anyhow::Result<Vec<Row>> {
    let device = Default::default();
    let model = DynamicModel::<CpuBackend>::new(arch, &device);
    let dense_exec = export::executor(&model, Masking::DENSE);
    let name = arch.kind().name();
    let mut rows = Vec::new();
    println!("\n{arch:?}\n");
    println!(
        "| backbone | size | batch | kept | MAC ratio | dense ms | sparse ms | speedup | efficiency | burn dense ms | ours/burn | torch f32 / tf32 / bf16 ms | dense / torch best |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut rng = StdRng::seed_from_u64(1);
    for &(h, w) in sizes {
        for &batch in &plan.batches {
            let n = batch * arch.frames.t_in * arch.frames.channels * h * w;
            let x: Vec<f32> = (0..n).map(|_| rng.random_range(0.0..1.0)).collect();
            let dense_macs = dense_exec.forward(&x, batch, h, w, MaskPlan::Dense)?.macs[0] as f64;
            let shape = [batch, arch.frames.t_in, arch.frames.channels, h, w];
            let burn_dense_ms = interleaved_medians(
                plan.runs,
                plan.warmup,
                &mut [Box::new(|| {
                    let xt = Tensor::<CpuBackend, 5>::from_data(TensorData::new(x.clone(), shape), &device);
                    let _: Vec<f32> = model.forward(xt, Masking::DENSE).prediction.into_data().to_vec().expect("f32");
                })],
            )[0];
            let torch_ms = torch.map(|t| t.at(h, batch)).filter(|_| h == w);
            let torch_best_ms = torch_ms.as_ref().and_then(best);
            // The dense path and every fraction's sparse path, timed in the same rounds.
            let mut sparse = Vec::new();
            for &f in &plan.fractions {
                let masking = Masking::top_k(MaskMode::Both, f, f);
                let exec = export::executor(&model, masking);
                let macs = exec.forward(&x, batch, h, w, MaskPlan::Dynamic)?.macs.iter().sum::<u64>();
                sparse.push((f, exec, macs as f64 / batch as f64));
            }
            let mut jobs: Vec<Box<dyn FnMut() + '_>> = vec![Box::new(|| {
                dense_exec.forward(&x, batch, h, w, MaskPlan::Dense).expect("valid input");
            })];
            for (_, exec, _) in &sparse {
                jobs.push(Box::new(|| {
                    exec.forward(&x, batch, h, w, MaskPlan::Dynamic).expect("valid input");
                }));
            }
            let times = interleaved_medians(plan.runs, plan.warmup, &mut jobs);
            drop(jobs);
            let dense_ms = times[0];
            for ((f, _, sparse_macs), &sparse_ms) in sparse.iter().zip(&times[1..]) {
                let (f, sparse_macs) = (*f, *sparse_macs);
                let mac_ratio = dense_macs / sparse_macs;
                let row = Row {
                    burn_dense_ms: Some(burn_dense_ms),
                    torch_ms: torch_ms.clone(),
                    torch_best_ms,
                    ..Row::timed(name, (h, w), (batch, f), mac_ratio, (dense_ms, sparse_ms))
                };
                let speedup = row.speedup;
                println!(
                    "| {name} | {h}x{w} | {batch} | {f:.1} | {mac_ratio:.2} | {dense_ms:.2} | {sparse_ms:.2} | {speedup:.2} | {:.2} | {burn_dense_ms:.2} | {:.2} | {} | {} |",
                    row.efficiency,
                    dense_ms / burn_dense_ms,
                    torch_ms.as_ref().map_or("-".into(), crate::torch_twin::columns),
                    torch_best_ms.map_or("-".into(), |t| format!("{:.2}", dense_ms / t))
                );
                rows.push(row);
            }
        }
    }
    Ok(rows)
}
