//! `dyna-pruner demo`: the shipped dense and dynamic CNNs (or freshly retrained ones) and
//! persistence on the TaxiNYC test range; prints a table and writes DIR/report.json.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::json;

use dyna_pruner::config::{Plan, RunConfig};
use dyna_pruner::eval::evaluate_persistence;
use dyna_pruner::train::{checkpoint, prepare_data, RunControl};

use crate::device::DeviceArg;
use crate::eval::{evaluate_checkpoint, table_row, TABLE_HEADER};
use crate::train::train_plan;
use crate::with_backend;

const DENSE_CONFIG: &str = "configs/crowd/cnn_dense.toml";
const DYNAMIC_CONFIG: &str = "configs/crowd/cnn_dynamic.toml";
const DENSE_MODEL: &str = "models/crowd/cnn_dense";
const DYNAMIC_MODEL: &str = "models/crowd/cnn_dynamic";

/// Loads a committed config with its data paths taken relative to `root`.
fn load_plan(root: &Path, config: &str) -> anyhow::Result<Plan> {
    let mut plan = RunConfig::load(&root.join(config))?;
    for f in &mut plan.config.data.files {
        if f.is_relative() {
            *f = root.join(&*f);
        }
    }
    Ok(plan)
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading shipped checkpoint {}", from.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}

pub fn run(out: &Path, retrain: bool, root: &Path, device: DeviceArg) -> anyhow::Result<()> {
    let dense_plan = load_plan(root, DENSE_CONFIG)?;
    let (dense_dir, dynamic_dir) = (out.join("dense"), out.join("dynamic"));
    if retrain {
        let mut dense = dense_plan.clone();
        dense.config.train.out = dense_dir.clone();
        eprintln!("retraining the dense CNN ({DENSE_CONFIG})");
        train_plan(&dense, RunControl::default(), device)?;
        let mut dynamic = load_plan(root, DYNAMIC_CONFIG)?;
        dynamic.config.train.out = dynamic_dir.clone();
        dynamic.config.train.init_from = Some(dense_dir.clone());
        eprintln!("fine-tuning the dynamic CNN from it ({DYNAMIC_CONFIG})");
        train_plan(&dynamic, RunControl::default(), device)?;
    } else {
        copy_dir(&root.join(DENSE_MODEL), &dense_dir)?;
        copy_dir(&root.join(DYNAMIC_MODEL), &dynamic_dir)?;
    }
    let (splits, _) = prepare_data(&dense_plan)?;
    let test = &splits.test;
    let report = with_backend!(device, |B, T, dev| {
        let dense = checkpoint::load::<B>(&dense_dir, &dev)?;
        let dynamic = checkpoint::load::<B>(&dynamic_dir, &dev)?;
        if dense.meta.scaler != dynamic.meta.scaler {
            anyhow::bail!("the dense and dynamic checkpoints were fitted with different scalers");
        }
        let d = evaluate_checkpoint(&dense, test, 256, &dev, "dense");
        let y = evaluate_checkpoint(&dynamic, test, 256, &dev, "dynamic");
        let p = evaluate_persistence(test, &dense.meta.scaler);
        let dense_macs = d.macs_per_sample.unwrap_or(f64::NAN);
        let dynamic_macs = y.macs_per_sample.unwrap_or(f64::NAN);
        let mac_reduction = 1.0 - dynamic_macs / dense_macs;
        let relative_error_change = (y.metrics["mse"] - d.metrics["mse"]) / d.metrics["mse"];
        println!(
            "TaxiNYC test range {} .. {}: {} windows (4 -> 4 hours, 16x8 grid)",
            dense_plan.config.data.test[0],
            dense_plan.config.data.test[1],
            test.len()
        );
        println!("{TABLE_HEADER}");
        println!("{}", table_row("dense CNN", &d, Some(dense_macs)));
        println!("{}", table_row("dynamic CNN", &y, Some(dense_macs)));
        println!("{}", table_row("persistence", &p, None));
        println!(
            "MAC reduction {:.1}% | relative MSE change {:+.2}% | dense MSE {:.1}% below persistence",
            100.0 * mac_reduction,
            100.0 * relative_error_change,
            100.0 * (1.0 - d.metrics["mse"] / p.metrics["mse"])
        );
        json!({
            "task": "crowd_flow",
            "dataset": "TaxiNYC",
            "backbone": "cnn",
            "test_samples": test.len(),
            "main_metric": "mse",
            "dense": { "metrics": d.metrics, "macs_per_sample": dense_macs },
            "dynamic": {
                "metrics": y.metrics,
                "macs_per_sample": dynamic_macs,
                "kept_patch_fraction": y.kept_patch_fraction,
                "kept_unit_fraction": y.kept_unit_fraction,
            },
            "persistence": { "metrics": p.metrics },
            "mac_reduction": mac_reduction,
            "relative_error_change": relative_error_change,
        })
    });
    let path: PathBuf = out.join("report.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
