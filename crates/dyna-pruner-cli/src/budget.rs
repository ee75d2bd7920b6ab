//! Budgets chosen at inference for budget-conditioned models (`method.keep_range`):
//! `--keep R [--keep-units U]` names the keep ratios; `--latency-ms T` picks the largest budget
//! whose latency per batch on the running machine meets T. Budgets lie on one axis, the position
//! along the trained ranges (0: both keep ratios at their lower ends, 1: at their upper ends).
//! The executor is timed at a few positions (cached per model, machine and batch shape), latency
//! is interpolated between them, and the chosen budget is timed again.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{anyhow, Context};
use serde::{Deserialize, Serialize};

use dyna_pruner_exec::format::ExportedModel;
use dyna_pruner_exec::spec::{Architecture, KeepRanges, Masking};
use dyna_pruner_exec::{Exec, MaskPlan};

/// `--keep` and `--keep-units`.
#[derive(clap::Args, Debug, Clone, Copy, Default)]
pub struct KeepArgs {
    /// Run a budget-conditioned model (trained with `method.keep_range`) at this patch keep
    /// ratio instead of its default. Unless --keep-units is given, the units are kept at the
    /// same position along their trained range (R itself where the two ranges are the same, or
    /// where the model prunes units only).
    #[arg(long)]
    pub keep: Option<f32>,
    /// The unit keep ratio of a budget-conditioned model.
    #[arg(long)]
    pub keep_units: Option<f32>,
}

impl KeepArgs {
    pub fn is_set(&self) -> bool {
        self.keep.is_some() || self.keep_units.is_some()
    }

    /// `masking` at these keep ratios (unchanged when none is given); an error names `model`
    /// when it was trained for one budget or a ratio lies outside its trained range.
    pub fn apply(&self, arch: &Architecture, masking: Masking, model: &str) -> anyhow::Result<Masking> {
        if !self.is_set() {
            return Ok(masking);
        }
        let ranges = trained_ranges(arch, masking, model, "--keep and --keep-units")?;
        if self.keep_units.is_some() && !masking.mode.model() {
            anyhow::bail!("{model} prunes no units (method.mode = data): --keep-units has nothing to set; use --keep");
        }
        if self.keep.is_some() && self.keep_units.is_some() && !masking.mode.data() {
            anyhow::bail!(
                "{model} keeps every patch (method.mode = model): --keep would set nothing but the unit keep \
                 ratio; give --keep-units alone"
            );
        }
        let data_keep = self.keep.unwrap_or(masking.data_keep);
        let unit_keep = match (self.keep_units, self.keep) {
            (Some(units), _) => units,
            // Without the DataMask `--keep` names the unit keep ratio itself.
            (None, Some(keep)) if !masking.mode.data() => keep,
            (None, Some(keep)) => ranges.units_matching(keep).unwrap_or(masking.unit_keep),
            (None, None) => masking.unit_keep,
        };
        masking.with_keep(ranges, data_keep, unit_keep).map_err(|e| anyhow!("{model}: {e}"))
    }
}

/// `--keep`, `--keep-units` or `--latency-ms` (`eval`, `predict`).
#[derive(clap::Args, Debug, Clone, Copy, Default)]
pub struct BudgetArgs {
    #[command(flatten)]
    pub keep: KeepArgs,
    /// Run a budget-conditioned model at the largest budget (patch and unit keep ratios at the
    /// same position along their trained ranges) whose latency per batch of --batch-size windows
    /// on this machine's CPU executor meets this target: timed at a few budgets on the first
    /// batch (cached per model and machine), interpolated, and timed again at the chosen one.
    #[arg(long, conflicts_with_all = ["keep", "keep_units"])]
    pub latency_ms: Option<f64>,
}

/// The keep ranges of a budget-conditioned model; an error naming `model` and `what` otherwise.
pub fn trained_ranges(arch: &Architecture, masking: Masking, model: &str, what: &str) -> anyhow::Result<KeepRanges> {
    arch.model.generator.keep_ranges().ok_or_else(|| {
        anyhow!(
            "{model} was trained for one budget (patches {}, units {}); {what} need a budget-conditioned model \
             (trained with method.keep_range)",
            masking.data_keep,
            masking.unit_keep
        )
    })
}

/// Budgets timed over the trained ranges by a calibration.
const CALIBRATION_POINTS: usize = 5;
/// Timed runs per budget in a calibration (after one warm-up round), and of the chosen one.
const CALIBRATION_RUNS: usize = 7;
pub const CHECK_RUNS: usize = 20;
/// How far the check may miss the calibration's prediction before the budget is chosen again.
const CHECK_TOLERANCE: f64 = 0.05;
/// At most this many checks (each choosing the budget on the rescaled calibration).
const CHECK_ROUNDS: usize = 3;

/// Median latency per batch at each timed budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// `(position, ms)`, position along the trained ranges ascending ([`KeepRanges::at`]).
    pub points: Vec<(f32, f64)>,
}

impl Calibration {
    /// Latency predicted at `position`: linear between the timed points, made non-decreasing
    /// (a timing that fell below a smaller budget's is noise), constant beyond the ends.
    pub fn predict(&self, position: f32) -> f64 {
        let mut monotone = self.points.clone();
        for i in 1..monotone.len() {
            monotone[i].1 = monotone[i].1.max(monotone[i - 1].1);
        }
        let (first, last) = (monotone[0], monotone[monotone.len() - 1]);
        if position <= first.0 {
            return first.1;
        }
        for pair in monotone.windows(2) {
            let ((k0, t0), (k1, t1)) = (pair[0], pair[1]);
            if position <= k1 {
                let f = if k1 > k0 { ((position - k0) / (k1 - k0)) as f64 } else { 1.0 };
                return t0 + f * (t1 - t0);
            }
        }
        last.1
    }

    /// The same curve at another level: every latency times `factor`.
    pub fn scaled(&self, factor: f64) -> Calibration {
        Calibration { points: self.points.iter().map(|&(p, ms)| (p, ms * factor)).collect() }
    }

    /// The largest position (on a grid of 1/1000) whose predicted latency is at most
    /// `target_ms`; 0, the smallest budget, when none is.
    pub fn choose(&self, target_ms: f64) -> f32 {
        let steps = 1000;
        (0..=steps).rev().map(|i| i as f32 / steps as f32).find(|&p| self.predict(p) <= target_ms).unwrap_or(0.0)
    }
}

/// What the calibration cache is keyed by: the model's weights and masks, the machine and the
/// batch shape timed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CacheKey {
    pub model: String,
    pub machine: String,
    pub batch: usize,
    pub height: usize,
    pub width: usize,
}

impl CacheKey {
    pub fn new(model: &ExportedModel, machine: String, batch: usize, height: usize, width: usize) -> CacheKey {
        CacheKey { model: fingerprint(model), machine, batch, height, width }
    }

    fn text(&self) -> String {
        // Points are positions along the trained ranges (entries from before were keep ratios).
        format!(
            "{} | {} | batch {} | {}x{} | by position",
            self.model, self.machine, self.batch, self.height, self.width
        )
    }
}

/// A hash (FNV-1a, 64 bits) of a model's architecture, masks and every weight.
pub fn fingerprint(model: &ExportedModel) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            hash = (hash ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(serde_json::to_string(&model.arch).unwrap_or_default().as_bytes());
    eat(serde_json::to_string(&model.masking).unwrap_or_default().as_bytes());
    let mut names: Vec<&String> = model.tensors.keys().collect();
    names.sort();
    for name in names {
        eat(name.as_bytes());
        model.tensors[name].1.iter().for_each(|v| eat(&v.to_le_bytes()));
    }
    format!("{hash:016x}")
}

/// This machine as the cache knows it: host name, CPU model and the executor's threads.
pub fn this_machine() -> String {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let host = read("/proc/sys/kernel/hostname").trim().to_string();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown CPU", str::trim)
        .to_string();
    format!("{host} / {cpu} / {} threads", rayon::current_num_threads())
}

/// The calibration cache: `$DYNA_PRUNER_CACHE/latency.json`, by default under
/// `$XDG_CACHE_HOME/dyna-pruner` or `~/.cache/dyna-pruner`.
pub fn cache_file() -> PathBuf {
    let dir = std::env::var_os("DYNA_PRUNER_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(std::env::temp_dir)
            .join("dyna-pruner")
    });
    dir.join("latency.json")
}

fn read_cache(path: &std::path::Path) -> BTreeMap<String, Calibration> {
    // A missing or unreadable cache is only a slower start: it is rebuilt.
    std::fs::read_to_string(path).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
}

/// The model run at the keep ratio meeting a latency target, and what was measured.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyChoice {
    pub target_ms: f64,
    pub batch: usize,
    /// The budget chosen: its position along the trained ranges ([`KeepRanges::at`]).
    pub position: f32,
    pub masking: Masking,
    pub predicted_ms: f64,
    /// Median of [`CHECK_RUNS`] timed runs at the chosen budget.
    pub measured_ms: f64,
    /// Checks run: each after the first chose again on the calibration rescaled by the last
    /// check's measured / predicted.
    pub rounds: usize,
    /// The calibration as last rescaled (the cache keeps it as timed).
    pub calibration: Calibration,
    /// Whether the calibration came from the cache.
    pub cached: bool,
    pub cache: PathBuf,
}

/// Picks the largest budget whose latency on the batch `x` (`batch` windows of `h x w`) meets
/// `target_ms`, sets `exec` to run at it, and times it (choosing again, up to [`CHECK_ROUNDS`]
/// times, when the time misses the prediction by more than [`CHECK_TOLERANCE`]).
pub fn meet_latency(
    exec: &mut Exec,
    model: &ExportedModel,
    label: &str,
    (x, batch, h, w): (&[f32], usize, usize, usize),
    target_ms: f64,
) -> anyhow::Result<LatencyChoice> {
    if !(target_ms.is_finite() && target_ms > 0.0) {
        anyhow::bail!("--latency-ms must be a positive number of milliseconds, not {target_ms}");
    }
    let ranges = trained_ranges(&model.arch, model.masking, label, "--latency-ms")?;
    let at = |position: f32| {
        let (data_keep, unit_keep) = ranges.at(position);
        model.masking.with_keep(ranges, data_keep, unit_keep).map_err(|e| anyhow!("{label}: {e}"))
    };
    let cache = cache_file();
    let key = CacheKey::new(model, this_machine(), batch, h, w).text();
    let mut entries = read_cache(&cache);
    let (calibration, cached) = match entries.get(&key) {
        Some(c) => (c.clone(), true),
        None => {
            let positions: Vec<f32> =
                (0..CALIBRATION_POINTS).map(|i| i as f32 / (CALIBRATION_POINTS - 1) as f32).collect();
            let maskings = positions.iter().map(|&p| at(p)).collect::<anyhow::Result<Vec<Masking>>>()?;
            let execs: Vec<Exec> = maskings
                .iter()
                .map(|&m| {
                    let mut e = exec.clone();
                    e.set_masking(m);
                    e
                })
                .collect();
            let shown: Vec<String> =
                maskings.iter().map(|m| format!("({:.3}, {:.3})", m.data_keep, m.unit_keep)).collect();
            eprintln!(
                "calibrating {label} at (patch, unit) keep {} on batches of {batch} ({h}x{w}) ...",
                shown.join(" ")
            );
            let mut jobs: Vec<Box<dyn FnMut() + '_>> = execs
                .iter()
                .map(|e| {
                    Box::new(move || {
                        e.forward(x, batch, h, w, MaskPlan::Dynamic).expect("valid input");
                    }) as Box<dyn FnMut()>
                })
                .collect();
            let times = crate::bench::interleaved_medians(CALIBRATION_RUNS, 1, &mut jobs);
            drop(jobs);
            let calibration = Calibration { points: positions.into_iter().zip(times).collect() };
            entries.insert(key, calibration.clone());
            if let Some(dir) = cache.parent() {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            std::fs::write(&cache, serde_json::to_string_pretty(&entries)?)
                .with_context(|| format!("writing the latency calibration {}", cache.display()))?;
            (calibration, false)
        }
    };
    // The calibration gives the shape of latency against the budget; how fast this machine runs
    // right now sets its level. When the check misses the prediction by more than
    // CHECK_TOLERANCE, the curve is rescaled by measured / predicted and the budget chosen again.
    let mut curve = calibration;
    let mut previous = None;
    for round in 1..=CHECK_ROUNDS {
        let position = curve.choose(target_ms);
        let masking = at(position)?;
        exec.set_masking(masking);
        let run = &mut || {
            exec.forward(x, batch, h, w, MaskPlan::Dynamic).expect("valid input");
        };
        let measured_ms = crate::bench::interleaved_medians(CHECK_RUNS, 1, &mut [Box::new(run)])[0];
        let predicted_ms = curve.predict(position);
        let ratio = measured_ms / predicted_ms;
        if (ratio - 1.0).abs() <= CHECK_TOLERANCE || round == CHECK_ROUNDS || previous == Some(position) {
            return Ok(LatencyChoice {
                target_ms,
                batch,
                position,
                masking,
                predicted_ms,
                measured_ms,
                rounds: round,
                calibration: curve,
                cached,
                cache,
            });
        }
        previous = Some(position);
        curve = curve.scaled(ratio);
    }
    unreachable!("the last round returns")
}

impl LatencyChoice {
    /// One line for the terminal.
    pub fn summary(&self) -> String {
        let fastest = self.calibration.predict(0.0);
        let note = if fastest > self.target_ms {
            format!(" (the target is below the fastest budget's {fastest:.2} ms)")
        } else {
            String::new()
        };
        format!(
            "latency target {:.2} ms per batch of {}: patch keep {:.3}, unit keep {:.3}, predicted {:.2} ms, measured {:.2} ms (median of {}, check {} of {}){note}; \
             calibration {} {}",
            self.target_ms,
            self.batch,
            self.masking.data_keep,
            self.masking.unit_keep,
            self.predicted_ms,
            self.measured_ms,
            CHECK_RUNS,
            self.rounds,
            CHECK_ROUNDS,
            if self.cached { "from" } else { "written to" },
            self.cache.display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dyna_pruner_exec::spec::{KeepRange, MaskMode};

    #[test]
    fn the_fit_interpolates_and_never_falls_with_keep() {
        let c = Calibration { points: vec![(0.2, 1.0), (0.4, 3.0), (0.6, 2.5), (0.8, 5.0)] };
        assert_eq!(c.predict(0.1), 1.0);
        assert!((c.predict(0.3) - 2.0).abs() < 1e-6);
        // 0.6's timing is below 0.4's: taken as 0.4's.
        assert!((c.predict(0.5) - 3.0).abs() < 1e-6);
        assert!((c.predict(0.7) - 4.0).abs() < 1e-6);
        assert_eq!(c.predict(0.9), 5.0);
        assert!((c.choose(4.0) - 0.7).abs() < 1e-3, "{}", c.choose(4.0));
        assert_eq!(c.choose(9.0), 1.0);
        assert_eq!(c.choose(0.5), 0.0);
        let slower = c.scaled(2.0);
        assert!((slower.predict(0.3) - 4.0).abs() < 1e-6);
        assert!((slower.choose(8.0) - 0.7).abs() < 1e-3, "{}", slower.choose(8.0));
    }

    #[test]
    fn issue_26_the_calibration_cache_is_keyed_by_model_and_machine() {
        use dyna_pruner_exec::spec::{BackboneSpec, CnnSpec, Frames};
        let arch = Architecture::new(
            Frames { t_in: 2, t_out: 1, channels: 1 },
            2,
            BackboneSpec::Cnn(CnnSpec { hidden: 4, units: 4, blocks: 1, stride: 2, ..CnnSpec::default() }),
        );
        let tensors = dyna_pruner_exec::spec::weights(&arch)
            .iter()
            .map(|w| (w.name.clone(), (w.shape.clone(), vec![0.5f32; w.shape.iter().product()])))
            .collect();
        let masking = Masking::top_k(MaskMode::Both, 0.5, 0.5);
        let model = ExportedModel { arch, masking, tensors, metadata: BTreeMap::new() };
        let mut other = model.clone();
        other.tensors.values_mut().next().unwrap().1[0] = 0.25;
        let key = |m: &ExportedModel, machine: &str| CacheKey::new(m, machine.into(), 1, 8, 8);
        assert_eq!(key(&model, "a"), key(&model.clone(), "a"));
        assert_ne!(key(&model, "a"), key(&other, "a"), "other weights");
        assert_ne!(key(&model, "a"), key(&model, "b"), "another machine");
        assert_ne!(key(&model, "a").text(), CacheKey::new(&model, "a".into(), 2, 8, 8).text(), "another batch");
        assert!(this_machine().contains("threads"));
    }

    #[test]
    fn keep_needs_a_budget_conditioned_model_and_stays_in_its_range() {
        use dyna_pruner_exec::spec::{BackboneSpec, CnnSpec, Frames};
        let mut arch =
            Architecture::new(Frames { t_in: 2, t_out: 1, channels: 1 }, 2, BackboneSpec::Cnn(CnnSpec::default()));
        let masking = Masking::top_k(MaskMode::Both, 0.5, 0.5);
        let keep = KeepArgs { keep: Some(0.3), keep_units: None };
        assert_eq!(KeepArgs::default().apply(&arch, masking, "m").unwrap(), masking);
        let err = keep.apply(&arch, masking, "models/x").unwrap_err().to_string();
        assert!(err.contains("models/x was trained for one budget") && err.contains("method.keep_range"), "{err}");
        arch.model.generator.keep_range = Some(KeepRange { lo: 0.25, hi: 0.75 });
        assert_eq!(keep.apply(&arch, masking, "m").unwrap(), Masking::top_k(MaskMode::Both, 0.3, 0.3));
        let both = KeepArgs { keep: Some(0.3), keep_units: Some(0.7) };
        assert_eq!(both.apply(&arch, masking, "m").unwrap(), Masking::top_k(MaskMode::Both, 0.3, 0.7));
        let err = KeepArgs { keep: Some(0.9), keep_units: None }.apply(&arch, masking, "m").unwrap_err().to_string();
        assert!(err.contains("0.9") && err.contains("[0.25, 0.75]"), "{err}");
        let units_only = Masking::top_k(MaskMode::Model, 1.0, 0.5);
        assert!(both.apply(&arch, units_only, "m").unwrap_err().to_string().contains("--keep-units alone"));
        assert_eq!(keep.apply(&arch, units_only, "m").unwrap(), Masking::top_k(MaskMode::Model, 1.0, 0.3));
        let patches_only = Masking::top_k(MaskMode::Data, 0.5, 1.0);
        let units = KeepArgs { keep: None, keep_units: Some(0.3) };
        assert!(units.apply(&arch, patches_only, "m").unwrap_err().to_string().contains("prunes no units"));
        arch.model.generator.unit_keep_range = Some(KeepRange { lo: 0.2, hi: 0.4 });
        let err = both.apply(&arch, masking, "m").unwrap_err().to_string();
        assert!(err.contains("unit keep ratio 0.7") && err.contains("[0.2, 0.4]"), "{err}");
    }

    /// A model whose unit range differs from its patch range (the weather any-budget ViT:
    /// patches [0.6, 1], units [0.25, 0.5]) ran at no `--keep R` alone: the units took R too.
    #[test]
    fn issue_26_keep_alone_keeps_units_at_the_same_position_of_their_range() {
        use dyna_pruner_exec::spec::{BackboneSpec, CnnSpec, Frames};
        let mut arch =
            Architecture::new(Frames { t_in: 2, t_out: 1, channels: 1 }, 2, BackboneSpec::Cnn(CnnSpec::default()));
        arch.model.generator.keep_range = Some(KeepRange { lo: 0.6, hi: 1.0 });
        arch.model.generator.unit_keep_range = Some(KeepRange { lo: 0.25, hi: 0.5 });
        let masking = Masking::top_k(MaskMode::Both, 1.0, 0.5);
        for (keep, units) in [(0.6, 0.25), (0.8, 0.375), (1.0, 0.5)] {
            let got = KeepArgs { keep: Some(keep), keep_units: None }.apply(&arch, masking, "m").unwrap();
            assert_eq!(got.data_keep, keep);
            assert!((got.unit_keep - units).abs() < 1e-6, "--keep {keep}: units {} not {units}", got.unit_keep);
        }
        let err = KeepArgs { keep: Some(0.5), keep_units: None }.apply(&arch, masking, "m").unwrap_err().to_string();
        assert!(err.contains("patch keep ratio 0.5") && err.contains("[0.6, 1]"), "{err}");
        // Units only: `--keep` is the unit keep ratio.
        let units_only = Masking::top_k(MaskMode::Model, 1.0, 0.5);
        let got = KeepArgs { keep: Some(0.3), keep_units: None }.apply(&arch, units_only, "m").unwrap();
        assert_eq!(got, Masking::top_k(MaskMode::Model, 1.0, 0.3));
    }
}
