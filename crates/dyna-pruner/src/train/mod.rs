//! Training: end to end with the straight-through masks, the FLOPs-budget loss, keep ratios
//! annealed over warm-up, optional distillation from the checkpoint it starts from, Adam with a
//! cosine learning rate, the best validation epoch kept, and `--resume` from the last epoch.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::grad_clipping::GradientClippingConfig;
use burn::module::AutodiffModule;
use burn::optim::{AdamConfig, AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::record::Recorder as _;
use burn::tensor::backend::AutodiffBackend;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, CheckpointMeta, Provenance, Recorder};
use crate::config::{DataFormat, DataRule, MethodConfig, Plan};
use crate::data::{self, Domain, Horizon, MinMaxScaler, Scaler, Splits, WindowSet, ZScoreScaler};
use crate::error::{Error, Result};
use crate::eval::{default_batch, evaluate, Scoring};
use crate::macs::MacModel;
use crate::method::budget::{annealed, budget_loss, mask_target_loss};
use crate::method::masks::quantile_threshold;
use crate::method::{MaskMode, Masking};
use crate::model::{Architecture, DynamicModel};

/// Receives progress of a training run.
pub trait Progress {
    fn message(&mut self, _text: &str) {}
    fn epoch_start(&mut self, _epoch: usize, _epochs: usize, _steps: usize) {}
    fn step(&mut self, _step: usize, _loss: f64) {}
    fn validating(&mut self, _done: usize, _total: usize) {}
    fn epoch_end(&mut self, _report: &EpochReport) {}
}

/// Ignores progress (tests).
pub struct Quiet;
impl Progress for Quiet {}

/// One finished epoch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochReport {
    pub epoch: usize,
    pub epochs: usize,
    pub train_loss: f64,
    /// Validation MSE (a budget-conditioned run: the mean over `val_mse_by_keep`).
    pub val_mse: f64,
    /// The keep ratios validated (the first pass's, for a budget-conditioned run).
    pub data_keep: f32,
    pub unit_keep: f32,
    /// A budget-conditioned run: `[data_keep, unit_keep, val_mse]` at each end of its range.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub val_mse_by_keep: Vec<[f64; 3]>,
    pub elapsed_s: f64,
    /// Whether this epoch is the best so far (and was saved as the checkpoint).
    pub best: bool,
}

/// State written after every epoch so that `--resume` continues where a run stopped.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ResumeState {
    epochs_done: usize,
    best_epoch: usize,
    best_val_mse: f64,
    elapsed_s: f64,
    history: Vec<EpochReport>,
}

/// The result of a training run.
pub struct Trained {
    pub checkpoint: PathBuf,
    pub meta: CheckpointMeta,
    pub splits: Splits,
    pub history: Vec<EpochReport>,
}

/// The target `(data_keep, unit_keep)` pairs of training step `step`: the method's own, or for a
/// budget-conditioned run one pair drawn from `method.keep_range` and `method.unit_keep_range`
/// (the same for the same seed and step, so a resumed run draws what it would have), followed
/// with `method.sandwich` by both ends of the ranges.
fn step_keep_ratios(method: &MethodConfig, seed: u64, step: usize) -> Vec<(f32, f32)> {
    let Some(ranges) = method.keep_ranges() else {
        return vec![(method.data_keep, method.unit_keep)];
    };
    let mut rng = StdRng::seed_from_u64(seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let drawn =
        (rng.random_range(ranges.data.lo..=ranges.data.hi), rng.random_range(ranges.units.lo..=ranges.units.hi));
    let ends = if method.sandwich { ranges.ends().to_vec() } else { Vec::new() };
    std::iter::once(drawn).chain(ends).collect()
}

fn resume_dir(out: &Path) -> PathBuf {
    out.join(checkpoint::RESUME)
}

/// Loads the data of a plan and fits the scaler on its training windows: min-max for crowd
/// flow, z-scores per channel for netCDF weather data.
pub fn prepare_data(plan: &Plan) -> Result<(Splits, Scaler)> {
    let d = &plan.config.data;
    let source = data::load(d)?;
    let splits = source.split(Horizon::of(d), plan.split, d.val_fraction, &d.files)?;
    let t = &splits.train;
    let frames = || (0..t.len()).flat_map(|i| [t.input(i), t.target(i)]);
    let constant = |what: &str| Error::BadValues {
        path: d.files.first().or(d.root.as_ref()).cloned().unwrap_or_default(),
        field: "data".into(),
        detail: format!("the training range is constant{what}; scaling needs spread"),
    };
    let scaler = match d.format {
        DataFormat::Crowd => Scaler::MinMax(MinMaxScaler::fit(frames()).ok_or_else(|| constant(""))?),
        DataFormat::Netcdf => Scaler::ZScore(
            ZScoreScaler::fit(frames(), t.channels, t.height * t.width).ok_or_else(|| constant(" in a channel"))?,
        ),
        // SEVIR's convention: VIL / 255.
        DataFormat::Knmi | DataFormat::Sevir | DataFormat::SyntheticRadar => {
            Scaler::MinMax(MinMaxScaler { min: 0.0, max: 255.0 })
        }
    };
    Ok((splits, scaler))
}

/// How a run starts and stops.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunControl {
    /// Continue from the last finished epoch of an interrupted run (`out/resume/`).
    pub resume: bool,
    /// Stop after this many epochs of this invocation (continue later with `resume`).
    pub stop_after: Option<usize>,
}

/// Trains the model of `plan` on `device`, writing the best checkpoint to `plan.config.train.out`.
/// Returns `None` when the run stopped early (`control.stop_after`) and can be resumed.
pub fn train<B: AutodiffBackend>(
    plan: &Plan,
    device: &B::Device,
    control: RunControl,
    progress: &mut dyn Progress,
) -> Result<Option<Trained>> {
    let t = &plan.config.train;
    let clip = (t.grad_clip_norm > 0.0).then_some(GradientClippingConfig::Norm(t.grad_clip_norm));
    match t.weight_decay {
        0.0 => {
            let adam = AdamConfig::new().with_epsilon(t.adam_epsilon).with_grad_clipping(clip).init();
            train_with::<B, _>(plan, device, adam, control, progress)
        }
        decay => {
            let adamw = AdamWConfig::new()
                .with_weight_decay(decay)
                .with_epsilon(t.adam_epsilon)
                .with_grad_clipping(clip)
                .init();
            train_with::<B, _>(plan, device, adamw, control, progress)
        }
    }
}

fn train_with<B: AutodiffBackend, O: Optimizer<DynamicModel<B>, B>>(
    plan: &Plan,
    device: &B::Device,
    optim: O,
    control: RunControl,
    progress: &mut dyn Progress,
) -> Result<Option<Trained>> {
    let (mut run, mut model) = Run::<B, _>::setup(plan, device, optim, control.resume, progress)?;
    let epochs = plan.config.train.epochs;
    let first = run.state.epochs_done + 1;
    for epoch in first..=epochs {
        if control.stop_after.is_some_and(|n| epoch - first >= n) {
            progress.message(&format!("stopped after epoch {}; continue with --resume", epoch - 1));
            return Ok(None);
        }
        let started = Instant::now();
        let train_loss;
        (model, train_loss) = run.epoch(model, epoch, progress)?;
        run.end_epoch(&model, epoch, train_loss, started, progress)?;
    }
    let out = &plan.config.train.out;
    let _ = std::fs::remove_dir_all(resume_dir(out));
    let meta = checkpoint::read_meta(out)?;
    Ok(Some(Trained { checkpoint: out.clone(), meta, splits: run.splits, history: run.state.history }))
}

/// A training run in progress: the data, the optimizer, the teacher, the schedule (the model
/// itself passes through its steps by value, as the optimizer takes it).
struct Run<'a, B: AutodiffBackend, O> {
    plan: &'a Plan,
    device: &'a B::Device,
    splits: Splits,
    scaler: Scaler,
    architecture: Architecture,
    optim: O,
    /// The checkpoint the run started from, with its masking: the distillation teacher.
    teacher: Option<(DynamicModel<B::InnerBackend>, Masking)>,
    mac_model: MacModel,
    /// Weather: the training period's mean frame, stored with every saved checkpoint for the ACC.
    climatology: Option<Vec<f32>>,
    train_idx: Vec<usize>,
    steps_per_epoch: usize,
    warmup_steps: usize,
    state: ResumeState,
}

impl<'a, B: AutodiffBackend, O: Optimizer<DynamicModel<B>, B>> Run<'a, B, O> {
    /// Loads the data and builds the model: from scratch, or from a trained checkpoint (its
    /// scaler then stays, and it teaches).
    fn setup(
        plan: &'a Plan,
        device: &'a B::Device,
        optim: O,
        resume: bool,
        progress: &mut dyn Progress,
    ) -> Result<(Self, DynamicModel<B>)> {
        let cfg = &plan.config;
        let (splits, fitted) = prepare_data(plan)?;
        let t = &splits.train;
        progress.message(&format!(
            "windows: {} train, {} validation, {} test ({}x{} grid, {} channels)",
            t.len(),
            splits.val.len(),
            splits.test.len(),
            t.height,
            t.width,
            t.channels
        ));
        B::seed(device, cfg.train.seed);
        let architecture = plan.architecture(t.channels);
        let (model, scaler, teacher) = match &cfg.train.init_from {
            Some(dir) => {
                let mut init = checkpoint::load::<B>(dir, device)?;
                let teacher = init.model.valid();
                if let Some(criterion) = cfg.train.prune_init {
                    let target = architecture.with_generator_of(&init.meta.architecture);
                    init.model = crate::export::prune(&init.model, &target, criterion, device).map_err(|e| {
                        Error::Checkpoint { path: dir.clone(), detail: format!("train.prune_init: {e}") }
                    })?;
                    progress.message(&format!(
                        "{}: pruned once from {:?} to {:?} units per layer ({criterion:?})",
                        dir.display(),
                        init.meta.architecture.layer_units(),
                        target.layer_units()
                    ));
                    init.meta.architecture = target;
                }
                // The generator may differ (a dense checkpoint never trained its own); the rest may not.
                if init.meta.architecture.with_generator_of(&architecture) != architecture {
                    return Err(Error::Checkpoint {
                        path: dir.clone(),
                        detail: format!(
                            "architecture {:?} differs from the config's {architecture:?}",
                            init.meta.architecture
                        ),
                    });
                }
                let mut model = init.model;
                if init.meta.architecture != architecture {
                    let taken;
                    (model, taken) = with_generator_of(model, &init.meta, &architecture, device);
                    progress.message(&format!("{}: {taken}", dir.display()));
                }
                if let Some(criterion) = cfg.train.gate_init {
                    model = crate::export::rank_gates_by(model, criterion).map_err(|e| Error::Checkpoint {
                        path: dir.clone(),
                        detail: format!("train.gate_init: {e}"),
                    })?;
                    progress
                        .message(&format!("unit gates start ranking the units of {} by {criterion:?}", dir.display()));
                }
                (model, init.meta.scaler.clone(), Some((teacher, init.meta.masking)))
            }
            None => (DynamicModel::new(&architecture, device), fitted, None),
        };
        let train_idx: Vec<usize> = (0..t.len()).step_by(cfg.train.window_stride).collect();
        let steps_per_epoch = train_idx.len().div_ceil(cfg.train.batch_size);
        let warmup_steps = (cfg.method.warmup_epochs as f64 * steps_per_epoch as f64).round() as usize;
        let mac_model = model.mac_model(t.height, t.width);
        let climatology = t.grid().map(|_| crate::metrics::climatology(t));
        let (model, optim, state) = if resume {
            let (model, optim, state) = resumed(&cfg.train.out, &architecture, optim, device)?;
            progress.message(&format!("resuming after epoch {} of {}", state.epochs_done, cfg.train.epochs));
            (model, optim, state)
        } else {
            let state = ResumeState {
                epochs_done: 0,
                best_epoch: 0,
                best_val_mse: f64::INFINITY,
                elapsed_s: 0.0,
                history: Vec::new(),
            };
            (model, optim, state)
        };
        let run = Run {
            plan,
            device,
            splits,
            scaler,
            architecture,
            optim,
            teacher,
            mac_model,
            climatology,
            train_idx,
            steps_per_epoch,
            warmup_steps,
            state,
        };
        Ok((run, model))
    }

    /// The keep ratios training step `step` trains at (`step_keep_ratios`), annealed from 1 to
    /// their targets over warm-up.
    fn maskings_at(&self, step: usize) -> Vec<Masking> {
        (step_keep_ratios(&self.plan.config.method, self.plan.config.train.seed, step).into_iter())
            .map(|(data_keep, unit_keep)| self.annealed(step, data_keep, unit_keep))
            .collect()
    }

    /// Masks at `step` of warm-up for target keep ratios `data_keep` and `unit_keep`.
    fn annealed(&self, step: usize, data_keep: f32, unit_keep: f32) -> Masking {
        let me = &self.plan.config.method;
        let progress = if self.warmup_steps == 0 { 1.0 } else { step as f32 / self.warmup_steps as f32 };
        Masking::top_k(me.mode, annealed(data_keep, progress), annealed(unit_keep, progress))
    }

    /// The masks validation runs at the end of the epoch ending at `step`: the targets, or
    /// for a budget-conditioned run both ends of its ranges (the epoch's score is their mean).
    fn validation_maskings(&self, step: usize) -> Vec<Masking> {
        let me = &self.plan.config.method;
        match me.keep_ranges() {
            None => vec![self.annealed(step, me.data_keep, me.unit_keep)],
            Some(ranges) => {
                ranges.ends().map(|(data_keep, unit_keep)| self.annealed(step, data_keep, unit_keep)).to_vec()
            }
        }
    }

    /// One pass over the training windows; returns the model and the mean loss.
    fn epoch(
        &mut self,
        mut model: DynamicModel<B>,
        epoch: usize,
        progress: &mut dyn Progress,
    ) -> Result<(DynamicModel<B>, f64)> {
        let cfg = &self.plan.config;
        let mut order = self.train_idx.clone();
        let mut crop_rng = StdRng::seed_from_u64(cfg.train.seed.wrapping_add(epoch as u64));
        order.shuffle(&mut crop_rng);
        progress.epoch_start(epoch, cfg.train.epochs, self.steps_per_epoch);
        let mut loss_sum = 0.0;
        for (s, chunk) in order.chunks(cfg.train.batch_size).enumerate() {
            let step = (epoch - 1) * self.steps_per_epoch + s;
            let (x, y) = match cfg.train.crop {
                0 => self.splits.train.batch::<B>(chunk, &self.scaler, self.device),
                crop => self.splits.train.batch_crops::<B>(
                    chunk,
                    (crop, cfg.train.augment),
                    &mut crop_rng,
                    &self.scaler,
                    self.device,
                ),
            };
            let loss = self.loss(&model, x, y, step, epoch)?;
            let value = loss.clone().into_scalar().elem::<f64>();
            if !value.is_finite() {
                return Err(Error::BadValues {
                    path: cfg.train.out.clone(),
                    field: "training loss".into(),
                    detail: format!("became {value} at epoch {epoch}, step {s}; lower train.lr"),
                });
            }
            loss_sum += value;
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let lr = scheduled_lr(cfg.train.lr, cfg.train.lr_warmup, step, self.steps_per_epoch * cfg.train.epochs);
            model = self.optim.step(lr, model, grads);
            progress.step(s + 1, value);
        }
        Ok((model, loss_sum / self.steps_per_epoch as f64))
    }

    /// The loss of one batch at `step`: prediction, S supervision, distillation, FLOPs budget;
    /// the mean over the step's keep ratios (`maskings_at`).
    fn loss(
        &self,
        model: &DynamicModel<B>,
        x: Tensor<B, 5>,
        y: Tensor<B, 5>,
        step: usize,
        epoch: usize,
    ) -> Result<Tensor<B, 1>> {
        let me = &self.plan.config.method;
        let teacher_pred = self
            .teacher
            .as_ref()
            .filter(|_| me.distill_weight > 0.0)
            .map(|(t, m)| Tensor::<B, 5>::from_inner(t.forward(x.clone().inner(), *m).prediction));
        let losses = (self.maskings_at(step).into_iter())
            .map(|masking| self.loss_at(model, (x.clone(), y.clone()), masking, teacher_pred.clone(), epoch))
            .collect::<Result<Vec<_>>>()?;
        let count = losses.len() as f32;
        Ok(losses.into_iter().reduce(|a, b| a + b).expect("at least one keep ratio") / count)
    }

    /// The loss of one batch `(x, y)` at one keep ratio.
    fn loss_at(
        &self,
        model: &DynamicModel<B>,
        (x, y): (Tensor<B, 5>, Tensor<B, 5>),
        mut masking: Masking,
        teacher_pred: Option<Tensor<B, 5>>,
        epoch: usize,
    ) -> Result<Tensor<B, 1>> {
        let (me, out) = (&self.plan.config.method, &self.plan.config.train.out);
        // Batch rule: S first, then the batch's own quantile of it (its top `data_keep` of all
        // patches pass), then the forward on that S.
        let importance = if me.data_rule == DataRule::Batch {
            let s = model.mask_generator.forward(x.clone(), &masking);
            let scores = s.clone().detach().into_data().to_vec::<f32>().expect("f32 importance");
            let threshold = quantile_threshold(scores, masking.data_keep);
            masking.data_threshold = Some(threshold.ok_or_else(|| non_finite_importance(out, epoch))?);
            Some(s)
        } else {
            None
        };
        let fwd = match importance {
            Some(s) => model.forward_with_importance(x, s, masking),
            None => model.forward(x, masking),
        };
        let missing_data = *self.splits.train.domain() == Domain::Radar;
        let mut loss = prediction_loss(fwd.prediction.clone(), y.clone(), missing_data);
        if let Some(s) = fwd.importance.clone().filter(|_| me.mask_target_weight > 0.0) {
            let supervision = mask_target_loss(s, y, self.architecture.patch(), me.mask_target_level);
            loss = loss + supervision * me.mask_target_weight;
        }
        if let Some(t) = teacher_pred {
            loss = loss + (fwd.prediction - t).powi_scalar(2).mean() * me.distill_weight;
        }
        if me.mode != MaskMode::Dense && me.budget_weight > 0.0 {
            let soft: Vec<_> = fwd.fractions.iter().map(|f| f.soft.clone()).collect();
            let target = self.mac_model.budget_fraction(
                if me.mode.data() { masking.data_keep } else { 1.0 },
                if me.mode.model() { masking.unit_keep } else { 1.0 },
            );
            loss = loss + budget_loss(&self.mac_model, &soft, target) * me.budget_weight;
        }
        Ok(loss)
    }

    /// Validates, keeps the checkpoint when the epoch is the best after warm-up, and writes
    /// the resume state.
    fn end_epoch(
        &mut self,
        model: &DynamicModel<B>,
        epoch: usize,
        train_loss: f64,
        started: Instant,
        progress: &mut dyn Progress,
    ) -> Result<()> {
        let cfg = &self.plan.config;
        let out = &cfg.train.out;
        let mut maskings = self.validation_maskings(epoch * self.steps_per_epoch);
        let valid = model.valid();
        if cfg.method.data_rule == DataRule::Batch {
            let end_masking = &mut maskings[0];
            let threshold =
                calibrate_threshold(&valid, &self.splits.train, &self.scaler, end_masking.data_keep, self.device);
            end_masking.data_threshold = Some(threshold.ok_or_else(|| non_finite_importance(out, epoch))?);
        }
        let scoring = Scoring { scaler: &self.scaler, climatology: None };
        let batch = default_batch(self.splits.val.height, self.splits.val.width);
        let (windows, passes) = (self.splits.val.len(), maskings.len());
        let mut val_mse_by_keep = Vec::new();
        for (pass, masking) in maskings.iter().enumerate() {
            progress.validating(pass * windows, passes * windows);
            let val = evaluate(&valid, &self.splits.val, scoring, *masking, batch, self.device, &mut |d, _| {
                progress.validating(pass * windows + d, passes * windows)
            })?;
            val_mse_by_keep.push([masking.data_keep as f64, masking.unit_keep as f64, val.metrics["mse"]]);
        }
        let val_mse = val_mse_by_keep.iter().map(|v| v[2]).sum::<f64>() / passes as f64;
        let end_masking = maskings[0];
        if cfg.method.keep_range.is_none() {
            val_mse_by_keep.clear();
        }
        let warm = epoch * self.steps_per_epoch >= self.warmup_steps;
        let best = warm && val_mse < self.state.best_val_mse;
        self.state.elapsed_s += started.elapsed().as_secs_f64();
        let report = EpochReport {
            epoch,
            epochs: cfg.train.epochs,
            train_loss,
            val_mse,
            data_keep: end_masking.data_keep,
            unit_keep: end_masking.unit_keep,
            val_mse_by_keep,
            elapsed_s: self.state.elapsed_s,
            best,
        };
        progress.epoch_end(&report);
        self.state.history.push(report);
        self.state.epochs_done = epoch;
        if best {
            self.state.best_epoch = epoch;
            self.state.best_val_mse = val_mse;
            let me = &cfg.method;
            let masking = Masking {
                data_threshold: end_masking.data_threshold,
                ..Masking::top_k(me.mode, me.data_keep, me.unit_keep)
            };
            let meta = meta_for::<B>(
                self.plan,
                self.architecture.clone(),
                self.scaler.clone(),
                self.climatology.clone(),
                &self.splits,
                &self.state,
                masking,
            );
            checkpoint::save(out, model, &meta, &self.plan.config)?;
        }
        save_resume(out, model, &self.optim, &self.state)
    }
}

/// The model, optimizer and state of an interrupted run (`out/resume/`).
fn resumed<B: AutodiffBackend, O: Optimizer<DynamicModel<B>, B>>(
    out: &Path,
    architecture: &Architecture,
    optim: O,
    device: &B::Device,
) -> Result<(DynamicModel<B>, O, ResumeState)> {
    let dir = resume_dir(out);
    let text = std::fs::read_to_string(dir.join("state.json"))
        .map_err(|e| Error::Checkpoint { path: dir.clone(), detail: format!("nothing to resume (state.json: {e})") })?;
    let state: ResumeState =
        serde_json::from_str(&text).map_err(|e| Error::Checkpoint { path: dir.clone(), detail: e.to_string() })?;
    let model = checkpoint::load_weights::<B>(&dir, architecture, device)?;
    let record = Recorder::new()
        .load(dir.join("optim"), device)
        .map_err(|e| Error::Checkpoint { path: dir.clone(), detail: format!("optimizer state: {e}") })?;
    Ok((model, optim.load_record(record), state))
}

fn meta_for<B: Backend>(
    plan: &Plan,
    architecture: crate::model::Architecture,
    scaler: Scaler,
    climatology: Option<Vec<f32>>,
    splits: &Splits,
    state: &ResumeState,
    masking: Masking,
) -> CheckpointMeta {
    let cfg = &plan.config;
    let train_windows = splits.train.len();
    CheckpointMeta {
        architecture,
        scaler,
        climatology,
        masking,
        provenance: Provenance {
            seed: cfg.train.seed,
            commit: checkpoint::current_commit(),
            backend: backend_name::<B>(),
            threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            wall_time_s: state.elapsed_s,
            epochs: cfg.train.epochs,
            best_epoch: state.best_epoch,
            best_val_mse: state.best_val_mse,
            train_windows,
            data_files: cfg.data.files.clone(),
            init_from: cfg.train.init_from.clone(),
        },
    }
}

/// The DataMask threshold that keeps `data_keep` of all patches of `windows` (whole frames):
/// the inference form of [`DataRule::Batch`], computed with `model`'s mask generator. `None`
/// when there are no windows or S is not finite.
pub fn calibrate_threshold<B: Backend>(
    model: &DynamicModel<B>,
    windows: &WindowSet,
    scaler: &Scaler,
    data_keep: f32,
    device: &B::Device,
) -> Option<f32> {
    let indices: Vec<usize> = (0..windows.len()).collect();
    let mut scores = Vec::new();
    for chunk in indices.chunks(64) {
        let (x, _) = windows.batch::<B>(chunk, scaler, device);
        let s = model.mask_generator.forward(x, &Masking::top_k(MaskMode::Data, data_keep, 1.0));
        scores.extend(s.into_data().to_vec::<f32>().expect("f32 importance"));
    }
    quantile_threshold(scores, data_keep)
}

/// `model`, taken over from a checkpoint (`init`) whose mask generator differs from
/// `architecture`'s, with that generator: a dynamic checkpoint's trained generator and gates
/// only gain the keep ratios (with zero weights); otherwise the parts whose shape differs start
/// afresh. Also says which parts were taken over.
fn with_generator_of<B: Backend>(
    mut model: DynamicModel<B>,
    init: &CheckpointMeta,
    architecture: &Architecture,
    device: &B::Device,
) -> (DynamicModel<B>, &'static str) {
    let (from, to) = (init.architecture.model.generator, architecture.model.generator);
    let trained = init.masking.mode != MaskMode::Dense;
    let taken = if trained && from.budget_inputs() == 0 && (from.width, from.motion) == (to.width, to.motion) {
        model.mask_generator = model.mask_generator.conditioned_on_budget(to);
        let gates = std::mem::take(&mut model.unit_gates);
        model.unit_gates = gates.into_iter().map(|g| g.conditioned_on_budget(to.budget_inputs())).collect();
        "backbone, mask generator and unit gates taken over; the keep ratios enter them with zero weights"
    } else {
        model.mask_generator = crate::model::mask_generator(architecture, device);
        // A budget-conditioned model's gates read two more inputs.
        if from.budget_inputs() != to.budget_inputs() {
            model.unit_gates = crate::model::unit_gates(architecture, device);
            "backbone taken over; the mask generator and unit gates start afresh (their shape differs)"
        } else {
            "backbone and unit gates taken over; the mask generator starts afresh (its shape differs)"
        }
    };
    model.arch = architecture.clone();
    (model, taken)
}

fn non_finite_importance(out: &Path, epoch: usize) -> Error {
    Error::BadValues {
        path: out.to_path_buf(),
        field: "importance S".into(),
        detail: format!("not finite in epoch {epoch}, so no DataMask threshold; lower train.lr"),
    }
}

/// `flex` or `cuda`: the backend that ran the training.
fn backend_name<B: Backend>() -> String {
    let name = std::any::type_name::<B>().to_lowercase();
    ["cuda", "flex"].into_iter().find(|b| name.contains(b)).unwrap_or("unknown").to_string()
}

fn save_resume<B: AutodiffBackend, O: Optimizer<crate::model::DynamicModel<B>, B>>(
    out: &Path,
    model: &crate::model::DynamicModel<B>,
    optim: &O,
    state: &ResumeState,
) -> Result<()> {
    let dir = resume_dir(out);
    let fail =
        |what: &str, e: String| Error::Checkpoint { path: dir.clone(), detail: format!("cannot write {what}: {e}") };
    checkpoint::write_atomically(&dir, &["model.mpk", "optim.mpk", "state.json"], &[], |tmp| {
        model.clone().save_file(tmp.join("model"), &Recorder::new()).map_err(|e| fail("weights", e.to_string()))?;
        Recorder::new().record(optim.to_record(), tmp.join("optim")).map_err(|e| fail("optimizer", e.to_string()))?;
        let json = serde_json::to_string_pretty(state).expect("state serializes");
        std::fs::write(tmp.join("state.json"), json).map_err(|e| Error::io(dir.join("state.json"), e))
    })
}

/// Mean squared error; with `missing_data`, over the target pixels that have data (not NaN).
fn prediction_loss<B: Backend>(prediction: Tensor<B, 5>, target: Tensor<B, 5>, missing_data: bool) -> Tensor<B, 1> {
    if !missing_data {
        return (prediction - target).powi_scalar(2).mean();
    }
    let missing = target.clone().is_nan();
    let valid = missing.clone().bool_not().float();
    let target = target.mask_fill(missing, 0.0);
    ((prediction - target).powi_scalar(2) * valid.clone()).sum() / valid.sum().clamp_min(1.0)
}

/// A linear rise from `lr / 25` to `lr` over the first `warmup` fraction of the run (none when
/// 0), then a cosine decay to 5% of `lr` at its end.
fn scheduled_lr(lr: f64, warmup: f64, step: usize, total: usize) -> f64 {
    let rise = (warmup * total as f64).round() as usize;
    if step < rise {
        return lr * (0.04 + 0.96 * step as f64 / rise as f64);
    }
    let t = (step - rise) as f64 / (total - rise).max(1) as f64;
    lr * (0.05 + 0.95 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))
}

#[cfg(test)]
mod tests {
    use super::{scheduled_lr, step_keep_ratios, MaskMode, MethodConfig};
    use dyna_pruner_spec::KeepRange;

    #[test]
    fn issue_26_sandwich_steps_also_train_at_both_ends_of_the_ranges() {
        let fixed = MethodConfig { data_keep: 0.5, unit_keep: 0.3, ..MethodConfig::default() };
        assert_eq!(step_keep_ratios(&fixed, 1, 7), vec![(0.5, 0.3)]);
        let ranged = MethodConfig {
            mode: MaskMode::Both,
            keep_range: Some(KeepRange { lo: 0.6, hi: 0.9 }),
            unit_keep_range: Some(KeepRange { lo: 0.2, hi: 0.5 }),
            ..fixed
        };
        let drawn = step_keep_ratios(&ranged, 1, 7);
        assert_eq!(drawn.len(), 1);
        let (d, u) = drawn[0];
        assert!((0.6..=0.9).contains(&d) && (0.2..=0.5).contains(&u), "{d} {u}");
        assert_eq!(step_keep_ratios(&ranged, 1, 7), drawn, "a resumed run draws the same");
        assert_ne!(step_keep_ratios(&ranged, 1, 8), drawn);
        let sandwich = step_keep_ratios(&MethodConfig { sandwich: true, ..ranged }, 1, 7);
        assert_eq!(sandwich, vec![drawn[0], (0.6, 0.2), (0.9, 0.5)]);
    }

    #[test]
    fn the_learning_rate_rises_to_its_peak_then_decays() {
        let lr = |step| scheduled_lr(2e-3, 0.25, step, 100);
        assert!((lr(0) - 8e-5).abs() < 1e-12);
        assert!(lr(10) > lr(5) && lr(24) < 2e-3);
        assert!((lr(25) - 2e-3).abs() < 1e-12);
        assert!(lr(60) < lr(25) && lr(99) > 1e-4 - 1e-9);
        // Without warm-up the run starts at its peak.
        assert_eq!(scheduled_lr(1e-3, 0.0, 0, 100), 1e-3);
    }
}
