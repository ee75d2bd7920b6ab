//! `dyna-pruner`: train, evaluate and demonstrate dynamic co-pruned spatio-temporal models.

mod bench;
#[cfg(feature = "cuda")]
mod bench_device;
mod bench_model;
mod budget;
mod demo;
mod device;
mod eval;
mod pareto;
mod pictures;
mod predict;
mod progress;
mod report;
mod torch_twin;
mod train;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use device::DeviceArg;
use dyna_pruner::backbones::{BackboneKind, DataScope};

#[derive(Parser)]
#[command(
    name = "dyna-pruner",
    version,
    about = "Input-dependent co-pruning of data and model for spatio-temporal prediction"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model from a TOML config; writes a checkpoint directory (train.out).
    Train {
        #[arg(long)]
        config: PathBuf,
        /// Continue an interrupted run from its last finished epoch.
        #[arg(long)]
        resume: bool,
        /// Stop after this many epochs of this invocation; continue later with --resume.
        #[arg(long, value_name = "EPOCHS")]
        stop_after: Option<usize>,
        #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
        device: DeviceArg,
    },
    /// Evaluate a checkpoint on data files (all their windows) or on a range of its own training
    /// config, and persistence on the same windows.
    Eval {
        #[arg(long)]
        checkpoint: PathBuf,
        /// Files in the checkpoint's data format: crowd-flow HDF5 files (merged) or one OpenSTL
        /// dataset.npz (its test part), netCDF files, KNMI radar files or directories of them, a
        /// SEVIR CATALOG.csv (its files under data/ beside it).
        #[arg(long, num_args = 1.., required_unless_present = "split", conflicts_with = "split")]
        data: Vec<PathBuf>,
        /// Instead of --data: the validation or test range of the checkpoint's own config.toml
        /// (same files, dates, synthetic seed), e.g. to compare trained variants on validation.
        #[arg(long, value_enum)]
        split: Option<eval::SplitArg>,
        /// With --split: take the range from this run config's [data] instead of the
        /// checkpoint's (e.g. more synthetic runs, later dates).
        #[arg(long, requires = "split")]
        config: Option<PathBuf>,
        /// Write `{"metrics", "macs_per_sample", "samples", ...}` here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Windows per batch; by default 64, fewer for large frames (memory grows with
        /// batch x frame size, not with the number of windows).
        #[arg(long)]
        batch_size: Option<usize>,
        #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
        device: DeviceArg,
        /// Evaluate the checkpoint's weights without masks (what `predict --path dense` runs).
        #[arg(long, conflicts_with_all = ["keep", "keep_units", "latency_ms"])]
        dense: bool,
        #[command(flatten)]
        budget: budget::BudgetArgs,
        /// The float element the model runs in: f32, or bf16 (weights and activations; with
        /// `--device cuda`).
        #[arg(long, value_enum, default_value_t = device::Precision::F32)]
        precision: device::Precision,
    },
    /// Run the sparse executor of a checkpoint (or of an exported model alone) on data files;
    /// writes DIR/predictions.npy, DIR/samples.json (per-sample kept fractions and MACs) and,
    /// from a checkpoint, the exported model DIR/model.safetensors.
    Predict {
        #[arg(long, required_unless_present = "model", conflicts_with = "model")]
        checkpoint: Option<PathBuf>,
        /// An exported model (`model.safetensors` written by `predict --checkpoint`): run through
        /// the framework-free executor alone.
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long, num_args = 1.., required = true)]
        data: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        /// Windows per batch; by default 64, fewer for large frames (memory grows with
        /// batch x frame size, not with the number of windows).
        #[arg(long)]
        batch_size: Option<usize>,
        /// CNN: how the blocks run each sample's kept units: `select` their weights (fewest
        /// MACs), `mask`: compute the batch's kept units with shared weights and zero each
        /// sample's pruned ones (one weight copy per block), or `auto`: the faster on the first
        /// batch. The predictions are the same.
        #[arg(long, value_enum, default_value_t = predict::UnitsArg::Auto)]
        units: predict::UnitsArg,
        /// Also draw DIR/pictures/ (four windows: the most and least pruned, two typical; and
        /// the kept fractions over all windows) and DIR/report.html.
        #[arg(long)]
        pictures: bool,
        #[command(flatten)]
        budget: budget::BudgetArgs,
    },
    /// Time the sparse executor against its dense path and Burn's dense forward; writes DIR/bench.json.
    Bench {
        #[arg(long, default_value = "bench-out")]
        out: PathBuf,
        #[command(flatten)]
        plan: bench::BenchPlan,
        /// `cpu`: the sparse executor (CNN, ViT and ConvLSTM rows). `cuda`: the CNN's framework-ops sparse
        /// path against Burn's dense forward on the GPU (needs the `cuda` feature).
        #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
        device: DeviceArg,
        /// Instead of random models: these trained models (exported `model.safetensors` files
        /// or checkpoint directories) on the first windows of `--data`, dense path against their
        /// own masks (CPU); rows carry a `model` field.
        #[arg(long, alias = "checkpoint", num_args = 1.., requires = "data")]
        model: Vec<PathBuf>,
        /// With `--model`: data files in the models' format.
        #[arg(long, num_args = 1.., requires = "model")]
        data: Vec<PathBuf>,
        /// With `--model`: also time this model's dense forward (the dense model the others
        /// stand in for) in the same rounds as each row, on the same frames; rows get `against`
        /// (its time, its MACs over the row's, speedup and efficiency against it).
        #[arg(long, requires = "model")]
        reference: Option<PathBuf>,
        /// With `--model`: budget-conditioned models at these keep ratios.
        #[command(flatten)]
        keep: budget::KeepArgs,
        /// `--device cuda`: the float element to time (f32; bf16: weights and activations in
        /// bf16, the gathered kernels accumulating in f32). One per run: Burn fixes the GPU's
        /// float type at its first tensor.
        #[arg(long, value_enum, default_value = "f32")]
        precision: device::Precision,
        /// `--device cuda`: `fused` (through Burn's fusion layer) and/or `direct` (each
        /// operation launched when called).
        #[arg(long, value_enum, value_delimiter = ',', default_values = ["fused"])]
        launch: Vec<device::Launch>,
    },
    /// Evaluate the shipped dense and dynamic models and persistence on a task's test range:
    /// crowd (TaxiNYC, CNN) or weather (ERA5 t2m, ViT).
    Demo {
        #[arg(long, value_enum, default_value_t = demo::Task::Crowd)]
        task: demo::Task,
        #[arg(long, default_value = "demo-out")]
        out: PathBuf,
        /// Train both models from scratch with the committed configs first.
        #[arg(long)]
        retrain: bool,
        /// Repository root holding configs/, models/ and data/.
        #[arg(long, default_value = ".")]
        root: PathBuf,
        #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
        device: DeviceArg,
        /// Test windows per forward (default: up to 64, fewer for large frames).
        #[arg(long)]
        batch_size: Option<usize>,
        /// Also the task's budget-conditioned model at these keep ratios.
        #[command(flatten)]
        keep: budget::KeepArgs,
        /// The float element of the evaluation: f32, or bf16 with `--device cuda` (`--retrain`
        /// trains in f32).
        #[arg(long, value_enum, default_value_t = device::Precision::F32)]
        precision: device::Precision,
    },
    /// Every shipped model of a task on its test range against the alternatives at the same
    /// cost (dense, smaller dense, statically pruned, control, dynamic, persistence): MACs and
    /// the main metric, with the CPU executor's latency per sample at batch 1 measured in one
    /// run. Writes DIR/pareto.json and DIR/pareto.png.
    Pareto {
        #[arg(long, value_enum, default_value_t = demo::Task::Crowd)]
        task: demo::Task,
        #[arg(long, default_value = "pareto-out")]
        out: PathBuf,
        /// Train every model of the front with its committed config first (overwrites the
        /// shipped checkpoints under --root).
        #[arg(long)]
        retrain: bool,
        /// Repository root holding configs/, models/ and data/.
        #[arg(long, default_value = ".")]
        root: PathBuf,
        /// Timed runs per model for the latency (after 3 untimed ones).
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// Device for training and evaluation (the latency is always the CPU executor's).
        #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
        device: DeviceArg,
        /// The budget-conditioned model is evaluated at the keep ratios of the task's dynamic
        /// models; also at these.
        #[command(flatten)]
        keep: budget::KeepArgs,
    },
}

/// The GPU's name from `nvidia-smi`, or "cuda device 0".
#[cfg(feature = "cuda")]
fn gpu_name() -> String {
    std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name", "--format=csv,noheader", "--id=0"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "cuda device 0".into())
}

pub(crate) fn parse_backbone(s: &str) -> Result<BackboneKind, String> {
    BackboneKind::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| {
        let names: Vec<&str> = BackboneKind::ALL.iter().map(|k| k.name()).collect();
        format!("`{s}` is not a backbone ({})", names.join(", "))
    })
}

pub(crate) fn parse_scope(s: &str) -> Result<DataScope, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| format!("`{s}` is not a DataMask scope (translator, network)"))
}

pub(crate) fn parse_size(s: &str) -> Result<(usize, usize), String> {
    let bad = || format!("`{s}` is not a frame size HxW with both sides >= 1 (e.g. 32x64)");
    let (h, w) = s.split_once('x').ok_or_else(bad)?;
    match (h.trim().parse(), w.trim().parse()) {
        (Ok(h), Ok(w)) if h > 0 && w > 0 => Ok((h, w)),
        _ => Err(bad()),
    }
}

fn main() -> anyhow::Result<()> {
    dyna_pruner_exec::keep_freed_memory();
    let cli = Cli::parse();
    if let Command::Eval { batch_size: Some(0), .. }
    | Command::Predict { batch_size: Some(0), .. }
    | Command::Demo { batch_size: Some(0), .. } = cli.command
    {
        anyhow::bail!("--batch-size must be at least 1");
    }
    match cli.command {
        Command::Train { config, resume, stop_after, device } => {
            train::run(&config, dyna_pruner::train::RunControl { resume, stop_after }, device)
        }
        Command::Eval { checkpoint, data, split, config, out, batch_size, device, dense, budget, precision } => {
            let source = match split {
                Some(split) => eval::Source::Split { split, config },
                None => eval::Source::Files(data),
            };
            eval::run(&checkpoint, &source, out.as_deref(), (batch_size, dense, budget), (device, precision))
        }
        Command::Demo { task, out, retrain, root, device, batch_size, keep, precision } => {
            demo::run(task, &out, retrain, &root, (device, precision), (batch_size, keep))
        }
        Command::Pareto { task, out, retrain, root, runs, device, keep } => {
            if runs == 0 {
                anyhow::bail!("pareto: --runs must be >= 1");
            }
            pareto::run(task, &out, &root, &pareto::Options { retrain, runs, warmup: 3, device, keep })
        }
        Command::Predict { checkpoint, model, data, out, batch_size, units, pictures, budget } => {
            let source = match (checkpoint, model) {
                (Some(dir), _) => predict::ModelSource::Checkpoint(dir),
                (None, Some(file)) => predict::ModelSource::Exported(file),
                (None, None) => unreachable!("clap requires --checkpoint or --model"),
            };
            predict::run(&source, &data, &out, (batch_size, units, budget), pictures)
        }
        Command::Bench { out, plan, device, model, data, reference, keep, precision, launch } => {
            if keep.is_set() && model.is_empty() {
                anyhow::bail!("bench: --keep and --keep-units apply to trained models (--model)");
            }
            if plan.runs == 0
                || plan.fractions.iter().any(|f| !(*f > 0.0 && *f <= 1.0))
                || plan.sizes.contains(&0)
                || plan.batches.contains(&0)
            {
                anyhow::bail!("bench: --runs >= 1, sizes and batches >= 1, fractions in (0, 1]");
            }
            let gpu_default = precision == device::Precision::F32 && launch == [device::Launch::Fused];
            match device {
                DeviceArg::Cpu if !gpu_default => {
                    anyhow::bail!("bench: --precision and --launch apply to --device cuda (the CPU executor runs f32)")
                }
                DeviceArg::Cpu if !model.is_empty() => {
                    bench_model::run(&model, &data, reference.as_deref(), &out, &plan, keep)
                }
                DeviceArg::Cpu => bench::run(&out, &plan),
                #[cfg(feature = "cuda")]
                DeviceArg::Cuda => bench_device::run(&gpu_name(), &out, &plan, precision, &launch),
                #[cfg(not(feature = "cuda"))]
                DeviceArg::Cuda => {
                    anyhow::bail!("this binary was built without CUDA support; rebuild with `--features cuda`")
                }
            }
        }
    }
}
