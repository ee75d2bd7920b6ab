//! `dyna-pruner`: train, evaluate and demonstrate dynamic co-pruned spatio-temporal models.

mod demo;
mod device;
mod eval;
mod progress;
mod train;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use device::DeviceArg;

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
    /// Evaluate a checkpoint on data files (all their windows) and on persistence.
    Eval {
        #[arg(long)]
        checkpoint: PathBuf,
        /// HDF5 crowd-flow files (merged) or one OpenSTL dataset.npz (its test part).
        #[arg(long, num_args = 1.., required = true)]
        data: Vec<PathBuf>,
        /// Write `{"metrics", "macs_per_sample", "samples", ...}` here.
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
        device: DeviceArg,
    },
    /// Evaluate the shipped dense and dynamic CNNs and persistence on the TaxiNYC test range.
    Demo {
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
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Train {
            config,
            resume,
            stop_after,
            device,
        } => train::run(&config, dyna_pruner::train::RunControl { resume, stop_after }, device),
        Command::Eval {
            checkpoint,
            data,
            out,
            batch_size,
            device,
        } => eval::run(&checkpoint, &data, out.as_deref(), batch_size, device),
        Command::Demo {
            out,
            retrain,
            root,
            device,
        } => demo::run(&out, retrain, &root, device),
    }
}
