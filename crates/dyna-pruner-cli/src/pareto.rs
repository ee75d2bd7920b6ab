//! `dyna-pruner pareto --task crowd|weather|radar --out DIR`: every shipped model of a task on
//! its held-out test range, against what a user could pick instead at the same cost: MACs per
//! sample and the main metric of each, with the sparse executor's CPU latency per sample at
//! batch 1 measured in one interleaved run. Writes DIR/pareto.json, DIR/pareto.png and
//! DIR/report.html.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;

use dyna_pruner::checkpoint;
use dyna_pruner::data::WindowSet;
use dyna_pruner::eval::evaluate_persistence;
use dyna_pruner::train::{prepare_data, RunControl};
use dyna_pruner_exec::spec::{Architecture, MaskMode, Masking};
use dyna_pruner_exec::MaskPlan;

use crate::bench::interleaved_medians;
use crate::budget::KeepArgs;
use crate::demo::{load_plan, Task};
use crate::device::DeviceArg;
use crate::eval::evaluate_checkpoint;
use crate::report;
use crate::train::train_plan;
use crate::with_backend;

mod plot;

/// What a point of the front is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PointKind {
    /// The strongest dense model of the backbone.
    Dense,
    /// The same backbone with its widths scaled down to a dynamic model's MACs, same epochs.
    DenseSmall,
    /// The dense model pruned once, structurally, then fine-tuned.
    StaticPruned,
    /// The dense model trained the fine-tuning's extra epochs, masks off.
    Control,
    /// Fine-tuned from the dense model with both masks driven by S.
    Dynamic,
    /// The last input frame repeated.
    Persistence,
    /// One budget-conditioned dynamic model at several keep ratios (a line).
    AnyBudget,
}

impl PointKind {
    pub const ALL: [PointKind; 7] = [
        PointKind::Dense,
        PointKind::DenseSmall,
        PointKind::StaticPruned,
        PointKind::Control,
        PointKind::Dynamic,
        PointKind::Persistence,
        PointKind::AnyBudget,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PointKind::Dense => "dense",
            PointKind::DenseSmall => "dense_small",
            PointKind::StaticPruned => "static_pruned",
            PointKind::Control => "control",
            PointKind::Dynamic => "dynamic",
            PointKind::Persistence => "persistence",
            PointKind::AnyBudget => "any_budget",
        }
    }
}

/// A shipped model of a front: its run config (whose `train.out` holds the checkpoint).
struct FrontModel {
    kind: PointKind,
    config: &'static str,
}

/// The models of a task's front, in training order (each after the checkpoint it starts from).
fn front(task: Task) -> Vec<FrontModel> {
    use PointKind::*;
    let m = |kind, config| FrontModel { kind, config };
    match task {
        Task::Crowd => vec![
            m(Dense, "configs/crowd/full_dense.toml"),
            m(DenseSmall, "configs/crowd/full_dense_small50.toml"),
            m(DenseSmall, "configs/crowd/full_dense_small70.toml"),
            m(DenseSmall, "configs/crowd/full_dense_small80.toml"),
            m(Control, "configs/crowd/full_dense_control.toml"),
            m(StaticPruned, "configs/crowd/full_static50.toml"),
            m(StaticPruned, "configs/crowd/full_static70.toml"),
            m(StaticPruned, "configs/crowd/full_static80.toml"),
            m(Dynamic, "configs/crowd/full_dynamic50.toml"),
            m(Dynamic, "configs/crowd/full_dynamic70.toml"),
            m(Dynamic, "configs/crowd/full_dynamic80.toml"),
            // Fine-tuned from the older, smaller dense CNN (stride 2, hidden 32).
            m(Dynamic, "configs/crowd/cnn_dynamic.toml"),
            m(AnyBudget, "configs/crowd/any_budget.toml"),
        ],
        Task::Weather => vec![
            m(Dense, "configs/weather/vit_dense.toml"),
            m(DenseSmall, "configs/weather/vit_dense_small50.toml"),
            m(DenseSmall, "configs/weather/vit_dense_small70.toml"),
            m(DenseSmall, "configs/weather/vit_dense_small80.toml"),
            m(Control, "configs/weather/vit_dense_control.toml"),
            m(StaticPruned, "configs/weather/vit_static.toml"),
            m(Dynamic, "configs/weather/vit_dynamic50.toml"),
            m(Dynamic, "configs/weather/vit_dynamic.toml"),
            m(Dynamic, "configs/weather/vit_dynamic80.toml"),
            m(AnyBudget, "configs/weather/any_budget.toml"),
        ],
        Task::Radar => vec![
            m(Dense, "configs/radar/synthetic_dense.toml"),
            m(DenseSmall, "configs/radar/synthetic_dense_small70.toml"),
            m(DenseSmall, "configs/radar/synthetic_dense_small80.toml"),
            m(Control, "configs/radar/synthetic_dense_control.toml"),
            m(StaticPruned, "configs/radar/synthetic_static50.toml"),
            m(StaticPruned, "configs/radar/synthetic_static70.toml"),
            m(StaticPruned, "configs/radar/synthetic_static80.toml"),
            m(Dynamic, "configs/radar/synthetic_dynamic.toml"),
            m(Dynamic, "configs/radar/synthetic_dynamic70.toml"),
            m(Dynamic, "configs/radar/synthetic_dynamic80.toml"),
            m(AnyBudget, "configs/radar/synthetic_any_budget.toml"),
        ],
    }
}

/// One point of the front.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub name: String,
    pub kind: PointKind,
    pub macs_per_sample: f64,
    pub metric: f64,
    /// Median CPU executor time per sample at batch 1 (0 for persistence).
    pub latency_ms: f64,
}

/// `DIR/pareto.json`.
#[derive(Debug, Serialize)]
pub struct Front {
    pub task: &'static str,
    pub dataset: &'static str,
    pub main_metric: &'static str,
    pub higher_is_better: bool,
    pub test_samples: usize,
    /// Threads of the latency measurement.
    pub threads: usize,
    pub points: Vec<Point>,
}

/// How `pareto` runs.
pub struct Options {
    pub retrain: bool,
    /// Timed runs per model (after `warmup` untimed ones).
    pub runs: usize,
    pub warmup: usize,
    pub device: DeviceArg,
    /// Further keep ratios of the budget-conditioned model.
    pub keep: KeepArgs,
}

pub fn run(task: Task, out: &Path, root: &Path, options: &Options) -> anyhow::Result<()> {
    let models = front(task);
    let plans = models.iter().map(|m| load_plan(root, m.config)).collect::<anyhow::Result<Vec<_>>>()?;
    let demo = task.front_demo();
    debug_assert_eq!(demo.dense_config, models[0].config);
    if options.retrain {
        let started = Instant::now();
        for (m, plan) in models.iter().zip(&plans) {
            eprintln!("training {} ({})", m.kind.name(), m.config);
            train_plan(plan, RunControl::default(), options.device)?;
        }
        eprintln!("retrained {} models in {:.0} s", models.len(), started.elapsed().as_secs_f64());
    }
    let dirs: Vec<PathBuf> = plans.iter().map(|p| p.config.train.out.clone()).collect();
    for (dir, m) in dirs.iter().zip(&models) {
        if !dir.join("checkpoint.json").is_file() {
            anyhow::bail!("{}: no checkpoint of {} (train it, or run pareto --retrain)", dir.display(), m.config);
        }
    }
    let (splits, _) = prepare_data(&plans[0])?;
    let test = &splits.test;
    let main = demo.main_metric;
    // Each model's point at its own masks; the budget-conditioned one at the keep ratios of the
    // dynamic models of its architecture and at `--keep`.
    let mut runs: Vec<(usize, Masking)> = Vec::new();
    let mut points = with_backend!(options.device, |B, T, dev| {
        let mut points = Vec::new();
        let mut dynamic_keeps = Vec::new();
        for (i, (dir, m)) in dirs.iter().zip(&models).enumerate() {
            let mut ck = checkpoint::load::<B>(dir, &dev)?;
            let name = dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
            let arch = ck.meta.architecture.clone();
            let maskings = match m.kind {
                PointKind::AnyBudget => {
                    any_budget_maskings(&arch, ck.meta.masking, &dynamic_keeps, options.keep, &name)?
                }
                kind => {
                    if kind == PointKind::Dynamic {
                        dynamic_keeps.push((arch.clone(), ck.meta.masking));
                    }
                    vec![ck.meta.masking]
                }
            };
            for masking in maskings {
                ck.meta.masking = masking;
                let label = match m.kind {
                    PointKind::AnyBudget => format!("{name} @{}/{}", masking.data_keep, masking.unit_keep),
                    _ => name.clone(),
                };
                let e = evaluate_checkpoint(&ck, test, 64, &dev, &label)?;
                let metric = *e.metrics.get(main).with_context(|| format!("{label}: no {main} on this data"))?;
                runs.push((i, masking));
                points.push(Point {
                    name: label,
                    kind: m.kind,
                    macs_per_sample: e.macs_per_sample.unwrap_or(0.0),
                    metric,
                    latency_ms: 0.0,
                });
            }
            if m.kind == PointKind::Dense {
                let p = evaluate_persistence(test, ck.meta.scoring());
                let metric = p.metrics[main];
                points.push(Point {
                    name: "persistence".into(),
                    kind: PointKind::Persistence,
                    macs_per_sample: 0.0,
                    metric,
                    latency_ms: 0.0,
                });
            }
        }
        points
    });
    let latencies = latencies(&dirs, &runs, test, options)?;
    for (p, ms) in points.iter_mut().filter(|p| p.kind != PointKind::Persistence).zip(latencies) {
        p.latency_ms = ms;
    }
    let front = Front {
        task: demo.task,
        dataset: demo.dataset,
        main_metric: main,
        higher_is_better: demo.higher_is_better,
        test_samples: test.len(),
        threads: rayon::current_num_threads(),
        points,
    };
    print_table(&front);
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let json = out.join("pareto.json");
    std::fs::write(&json, serde_json::to_string_pretty(&front)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let png = out.join("pareto.png");
    plot::draw(&front, &png)?;
    let caption = format!(
        "{} on the test range against MACs per sample (left) and the CPU executor's latency per sample at batch 1, {} threads (right).",
        front.main_metric, front.threads
    );
    let made_by = "Made by `dyna-pruner pareto`: every shipped model of the task evaluated with its own masks; \
                   latencies are medians of interleaved runs over the first test windows.";
    let page = report::write_page(
        out,
        &format!("{}: the front", front.dataset),
        &html_table(&front),
        &[(png.clone(), caption)],
        made_by,
    )?;
    eprintln!("wrote {}, {} and {}", json.display(), png.display(), page.display());
    Ok(())
}

/// The masks a budget-conditioned model's points run: the keep ratios of the dynamic models of
/// the same backbone (`dynamic`: their architecture and masks) that lie in its trained range, and
/// `keep` when given.
fn any_budget_maskings(
    arch: &Architecture,
    own: Masking,
    dynamic: &[(Architecture, Masking)],
    keep: KeepArgs,
    name: &str,
) -> anyhow::Result<Vec<Masking>> {
    let ranges = crate::budget::trained_ranges(arch, own, name, "any_budget points")?;
    let mut maskings: Vec<Masking> = dynamic
        .iter()
        .filter(|(a, _)| a.with_generator_of(arch) == *arch)
        .filter_map(|(_, m)| own.with_keep(ranges, m.data_keep, m.unit_keep).ok())
        .collect();
    if keep.is_set() {
        maskings.push(keep.apply(arch, own, name)?);
    }
    if maskings.is_empty() {
        maskings.push(own);
    }
    let mut distinct = Vec::with_capacity(maskings.len());
    for m in maskings {
        if !distinct.contains(&m) {
            distinct.push(m);
        }
    }
    Ok(distinct)
}

/// Median executor time per sample at batch 1 of each run (a checkpoint of `dirs` and its
/// masks), cycling over the first test windows, all interleaved in the same rounds.
fn latencies(
    dirs: &[PathBuf],
    runs: &[(usize, Masking)],
    test: &WindowSet,
    options: &Options,
) -> anyhow::Result<Vec<f64>> {
    let windows = test.len().min(16);
    let (h, w) = (test.height, test.width);
    let mut prepared = Vec::new();
    let mut loaded: Vec<Option<(dyna_pruner_exec::Exec, Vec<Vec<f32>>)>> = vec![None; dirs.len()];
    for &(i, masking) in runs {
        if loaded[i].is_none() {
            let model = crate::predict::export_checkpoint(&dirs[i])?;
            let (scaler, _) = crate::predict::scaler_and_data(&model, &dirs[i])?;
            let inputs: Vec<Vec<f32>> = (0..windows).map(|j| test.scaled_inputs(j..j + 1, &scaler)).collect();
            loaded[i] = Some((model.executor()?, inputs));
        }
        let (exec, inputs) = loaded[i].clone().expect("loaded above");
        let mut exec = exec;
        exec.set_masking(masking);
        prepared.push((exec, inputs, masking.mode != MaskMode::Dense));
    }
    let mut jobs: Vec<Box<dyn FnMut() + '_>> = prepared
        .iter()
        .map(|(exec, inputs, own)| {
            let mut next = 0;
            Box::new(move || {
                let plan = if *own { MaskPlan::Dynamic } else { MaskPlan::Dense };
                exec.forward(&inputs[next % inputs.len()], 1, h, w, plan).expect("valid input");
                next += 1;
            }) as Box<dyn FnMut() + '_>
        })
        .collect();
    Ok(interleaved_medians(options.runs, options.warmup, &mut jobs))
}

/// The points as an HTML table.
fn html_table(front: &Front) -> String {
    let mut html = format!(
        "<table><tr><th>model</th><th>kind</th><th>MACs per sample</th><th>{}</th><th>latency ms</th></tr>\n",
        report::esc(front.main_metric)
    );
    for p in &front.points {
        html += &format!(
            "<tr><th>{}</th><td>{}</td><td>{:.2} M</td><td>{:.4}</td><td>{:.2}</td></tr>\n",
            report::esc(&p.name),
            p.kind.name(),
            p.macs_per_sample / 1e6,
            p.metric,
            p.latency_ms
        );
    }
    html + &format!("</table>\n<p>Test range: {} windows.</p>\n", front.test_samples)
}

fn print_table(front: &Front) {
    let dense = front.points.iter().find(|p| p.kind == PointKind::Dense).map_or(f64::NAN, |p| p.metric);
    let sign = if front.higher_is_better { -1.0 } else { 1.0 };
    println!(
        "{} test range: {} windows; latency: CPU executor, batch 1, {} threads\n",
        front.dataset, front.test_samples, front.threads
    );
    println!("| model | kind | MACs per sample | {} | vs dense (worse is +) | latency ms |", front.main_metric);
    println!("|---|---|---|---|---|---|");
    for p in &front.points {
        println!(
            "| {} | {} | {:.2} M | {:.4} | {:+.1}% | {:.2} |",
            p.name,
            p.kind.name(),
            p.macs_per_sample / 1e6,
            p.metric,
            100.0 * sign * (p.metric - dense) / dense + 0.0,
            p.latency_ms
        );
    }
}
