//! `dyna-pruner demo --task crowd|weather|radar`: the shipped dense and dynamic models (or freshly
//! retrained ones) and persistence on the task's held-out test range; prints a table and writes
//! DIR/report.json (radar: the KNMI test frames; DIR/report_synthetic.json for the synthetic set).

use std::path::Path;

use anyhow::Context;
use serde_json::json;

use dyna_pruner::checkpoint;
use dyna_pruner::config::{Plan, RunConfig};
use dyna_pruner::data::Split;
use dyna_pruner::eval::{default_batch, evaluate_persistence};
use dyna_pruner::train::{prepare_data, RunControl};

use crate::budget::KeepArgs;
use crate::device::{DeviceArg, Precision};
use crate::eval::{evaluate_checkpoint, table_header, table_metrics, table_row};
use crate::pictures::Palette;
use crate::report::{demo_table, draw_pictures, write_page, Style, RADAR_STYLE};
use crate::train::train_plan;
use crate::with_backend;

/// The demonstrations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Task {
    /// TaxiNYC crowd flow, 4 -> 4 hours, CNN.
    Crowd,
    /// ERA5 2 m temperature over the UK, 12 -> 12 hours, ViT.
    Weather,
    /// KNMI radar (and the synthetic radar set), 6 -> 6 five-minute frames, ConvLSTM.
    Radar,
}

/// What a demonstration runs: committed configs and checkpoints, and how it reports.
pub(crate) struct Demo {
    pub(crate) task: &'static str,
    pub(crate) dataset: &'static str,
    backbone: &'static str,
    label: &'static str,
    pub(crate) dense_config: &'static str,
    dynamic_config: &'static str,
    dense_model: &'static str,
    dynamic_model: &'static str,
    /// The task's budget-conditioned model (`demo --keep`), if it has one.
    any_budget_model: Option<&'static str>,
    pub(crate) main_metric: &'static str,
    /// The main metric is a skill (CSI): the relative change is (dense - dynamic) / dense.
    pub(crate) higher_is_better: bool,
    /// How its fields are drawn in the pictures.
    style: Style,
    /// Report file and the subdirectory of the demo's checkpoints in the output directory.
    report: &'static str,
    subdir: &'static str,
}

impl Task {
    /// The demonstration of the task's front (`pareto`): radar's is the synthetic set, whose
    /// test range carries skill (the 92 KNMI frames cannot).
    pub(crate) fn front_demo(self) -> Demo {
        self.demos().pop().expect("every task has a demonstration")
    }

    fn demos(self) -> Vec<Demo> {
        match self {
            Task::Crowd => vec![Demo {
                task: "crowd_flow",
                dataset: "TaxiNYC",
                backbone: "cnn",
                label: "CNN",
                dense_config: "configs/crowd/cnn_dense.toml",
                dynamic_config: "configs/crowd/cnn_dynamic.toml",
                dense_model: "models/crowd/cnn_dense",
                dynamic_model: "models/crowd/cnn_dynamic",
                any_budget_model: Some("models/crowd/any_budget"),
                main_metric: "mse",
                higher_is_better: false,
                style: Style { palette: Palette::Sequential, unit: "trips/h", anomaly: false, step: "h" },
                report: "report.json",
                subdir: "",
            }],
            Task::Weather => vec![Demo {
                task: "weather",
                dataset: "ERA5 t2m, UK/Ireland 0.25 deg, March 2019",
                backbone: "vit",
                label: "ViT",
                dense_config: "configs/weather/vit_dense.toml",
                dynamic_config: "configs/weather/vit_dynamic.toml",
                dense_model: "models/weather/vit_dense",
                dynamic_model: "models/weather/vit_dynamic",
                any_budget_model: Some("models/weather/any_budget"),
                main_metric: "rmse",
                higher_is_better: false,
                style: Style { palette: Palette::Diverging, unit: "K anomaly", anomaly: true, step: "h" },
                report: "report.json",
                subdir: "",
            }],
            Task::Radar => vec![
                Demo {
                    task: "radar_nowcasting",
                    dataset: "KNMI radar composite, 2010-08-26, 2 km",
                    backbone: "convlstm",
                    label: "ConvLSTM",
                    dense_config: "configs/radar/knmi_dense.toml",
                    dynamic_config: "configs/radar/knmi_dynamic.toml",
                    dense_model: "models/radar/knmi_dense",
                    dynamic_model: "models/radar/knmi_dynamic",
                    any_budget_model: None,
                    main_metric: "csi_m",
                    higher_is_better: true,
                    style: RADAR_STYLE,
                    report: "report.json",
                    subdir: "knmi",
                },
                Demo {
                    task: "radar_nowcasting",
                    dataset: "synthetic radar (seeded), 64x64",
                    backbone: "convlstm",
                    label: "ConvLSTM",
                    dense_config: "configs/radar/synthetic_dense.toml",
                    dynamic_config: "configs/radar/synthetic_dynamic.toml",
                    dense_model: "models/radar/synthetic_dense",
                    dynamic_model: "models/radar/synthetic_dynamic",
                    any_budget_model: Some("models/radar/synthetic_any_budget"),
                    main_metric: "csi_m",
                    higher_is_better: true,
                    style: RADAR_STYLE,
                    report: "report_synthetic.json",
                    subdir: "synthetic",
                },
            ],
        }
    }
}

/// Where the test windows come from, in words.
fn test_range(plan: &Plan) -> String {
    match plan.split {
        Split::Dates(_) => format!("test range {} .. {}", plan.config.data.test[0], plan.config.data.test[1]),
        Split::LastFrames { test, .. } => format!("last {test} frames"),
    }
}

/// Loads a committed config with its data and checkpoint paths taken relative to `root`.
pub(crate) fn load_plan(root: &Path, config: &str) -> anyhow::Result<Plan> {
    let mut plan = RunConfig::load(&root.join(config))?;
    let t = &mut plan.config.train;
    let paths = plan.config.data.files.iter_mut().chain([&mut t.out]).chain(t.init_from.as_mut());
    for f in paths.filter(|f| f.is_relative()) {
        *f = root.join(&*f);
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

/// Runs the demos of `task` into `out`; `batch_size` test windows per forward (default: by
/// frame size); with `keep` set, also the task's shipped budget-conditioned model at it.
pub fn run(
    task: Task,
    out: &Path,
    retrain: bool,
    root: &Path,
    (device, precision): (DeviceArg, Precision),
    (batch_size, keep): (Option<usize>, KeepArgs),
) -> anyhow::Result<()> {
    if precision == Precision::Bf16 && device == DeviceArg::Cpu {
        // Before any retraining: the evaluation would refuse it.
        anyhow::bail!("--precision bf16 runs on the GPU (`--device cuda`); the CPU backend computes in f32");
    }
    for demo in task.demos() {
        if keep.is_set() && demo.any_budget_model.is_none() {
            eprintln!("{}: no budget-conditioned model; --keep applies to the other demonstrations", demo.dataset);
        }
        let paths = (out.join(demo.subdir), out.join(demo.report));
        run_one(&demo, (&paths.0, &paths.1), retrain, root, (device, precision), (batch_size, keep))?;
    }
    Ok(())
}

fn run_one(
    demo: &Demo,
    (out, report_path): (&Path, &Path),
    retrain: bool,
    root: &Path,
    (device, precision): (DeviceArg, Precision),
    (batch_size, keep): (Option<usize>, KeepArgs),
) -> anyhow::Result<()> {
    let dense_plan = load_plan(root, demo.dense_config)?;
    let (dense_dir, dynamic_dir) = (out.join("dense"), out.join("dynamic"));
    if retrain {
        let mut dense = dense_plan.clone();
        dense.config.train.out = dense_dir.clone();
        eprintln!("retraining the dense {} ({})", demo.label, demo.dense_config);
        train_plan(&dense, RunControl::default(), device)?;
        let mut dynamic = load_plan(root, demo.dynamic_config)?;
        dynamic.config.train.out = dynamic_dir.clone();
        dynamic.config.train.init_from = Some(dense_dir.clone());
        eprintln!("fine-tuning the dynamic {} from it ({})", demo.label, demo.dynamic_config);
        train_plan(&dynamic, RunControl::default(), device)?;
    } else {
        copy_dir(&root.join(demo.dense_model), &dense_dir)?;
        copy_dir(&root.join(demo.dynamic_model), &dynamic_dir)?;
    }
    let (splits, _) = prepare_data(&dense_plan)?;
    let test = &splits.test;
    let batch = batch_size.unwrap_or_else(|| default_batch(test.height, test.width));
    let report = with_backend!(device, precision, |B, T, dev| {
        let dense = checkpoint::load::<B>(&dense_dir, &dev)?;
        let dynamic = checkpoint::load::<B>(&dynamic_dir, &dev)?;
        if dense.meta.scaler != dynamic.meta.scaler {
            anyhow::bail!("the dense and dynamic checkpoints were fitted with different scalers");
        }
        let d = evaluate_checkpoint(&dense, test, batch, &dev, "dense")?;
        let y = evaluate_checkpoint(&dynamic, test, batch, &dev, "dynamic")?;
        let p = evaluate_persistence(test, dense.meta.scoring());
        let dense_macs = d.macs_per_sample.unwrap_or(f64::NAN);
        let dynamic_macs = y.macs_per_sample.unwrap_or(f64::NAN);
        let mac_reduction = 1.0 - dynamic_macs / dense_macs;
        let main = demo.main_metric;
        let sign = if demo.higher_is_better { -1.0 } else { 1.0 };
        let relative_error_change = sign * (y.metrics[main] - d.metrics[main]) / d.metrics[main];
        let dc = &dense_plan.config.data;
        println!(
            "{} {}: {} windows ({} -> {} frames, lead {}, {}x{} grid)",
            demo.dataset,
            test_range(&dense_plan),
            test.len(),
            dc.t_in,
            dc.t_out,
            dc.lead,
            test.height,
            test.width
        );
        let cols = table_metrics(test);
        println!("{}", table_header(cols));
        println!("{}", table_row(&format!("dense {}", demo.label), &d, Some(dense_macs), cols));
        println!("{}", table_row(&format!("dynamic {}", demo.label), &y, Some(dense_macs), cols));
        let any_budget = match demo.any_budget_model.filter(|_| keep.is_set()) {
            Some(dir) => {
                let mut ck = checkpoint::load::<B>(&root.join(dir), &dev)?;
                ck.meta.masking = keep.apply(&ck.meta.architecture, ck.meta.masking, dir)?;
                let e = evaluate_checkpoint(&ck, test, batch, &dev, "any budget")?;
                println!("{}", table_row(&format!("any-budget {}", demo.label), &e, Some(dense_macs), cols));
                json!({ "model": dir, "masking": ck.meta.masking, "metrics": e.metrics, "macs_per_sample": e.macs_per_sample })
            }
            None => serde_json::Value::Null,
        };
        println!("{}", table_row("persistence", &p, None, cols));
        // How much better (positive) or worse the dense model is than persistence.
        let better = if demo.higher_is_better {
            d.metrics[main] / p.metrics[main] - 1.0
        } else {
            1.0 - d.metrics[main] / p.metrics[main]
        };
        let side = if (better >= 0.0) == demo.higher_is_better { "above" } else { "below" };
        println!(
            "MAC reduction {:.1}% | relative {main} change {:+.2}% (worse is positive) | dense {main} {:.1}% {side} persistence\n",
            100.0 * mac_reduction,
            100.0 * relative_error_change,
            100.0 * better.abs()
        );
        let report = json!({
            "task": demo.task,
            "dataset": demo.dataset,
            "backbone": demo.backbone,
            "test_samples": test.len(),
            "precision": precision,
            "main_metric": main,
            "dense": { "metrics": d.metrics, "macs_per_sample": dense_macs },
            "dynamic": {
                "metrics": y.metrics,
                "macs_per_sample": dynamic_macs,
                "kept_patch_fraction": y.kept_patch_fraction,
                "kept_unit_fraction": y.kept_unit_fraction,
            },
            "persistence": { "metrics": p.metrics },
            "any_budget": any_budget,
            "mac_reduction": mac_reduction,
            "relative_error_change": relative_error_change,
        });
        let pictures = draw_pictures(out, test, &dynamic, &y, dense_macs, demo.style, &dev)?;
        let title = format!("{} {}: what the dynamic model skips", demo.dataset, demo.label);
        let made_by = "Made by `dyna-pruner demo`: each window picture runs the shipped dynamic checkpoint on \
                       that window with its own masks; S and the DataMask are its mask generator's; values are in \
                       physical units after the checkpoint's scaler.";
        let html = write_page(out, &title, &demo_table(&report), &pictures, made_by)?;
        eprintln!("wrote {} pictures and {}", pictures.len(), html.display());
        report
    });
    std::fs::write(report_path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", report_path.display()))?;
    eprintln!("wrote {}", report_path.display());
    Ok(())
}
