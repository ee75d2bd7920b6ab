//! Progress for training and evaluation, with an ETA: indicatif bars on a terminal, and plain
//! lines at most every [`LINE_EVERY`] when stderr is a log (`nohup`, a remote runner), where
//! indicatif would print nothing until an epoch ends.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use dyna_pruner::train::{EpochReport, Progress};

/// How often a log gets a progress line within an epoch.
const LINE_EVERY: Duration = Duration::from_secs(10);

/// Progress on stderr: a bar per epoch (plain lines in a log), then a line per finished epoch.
pub struct Bars {
    bar: Option<ProgressBar>,
    epoch: usize,
    epochs: usize,
    /// Whether stderr is a log rather than a terminal.
    plain: bool,
    /// When the last plain line was written, and when the epoch started.
    last_line: Instant,
    epoch_start: Instant,
    steps: usize,
}

impl Default for Bars {
    fn default() -> Self {
        let now = Instant::now();
        Bars {
            bar: None,
            epoch: 0,
            epochs: 0,
            plain: !std::io::stderr().is_terminal(),
            last_line: now,
            epoch_start: now,
            steps: 0,
        }
    }
}

impl Bars {
    /// Writes `text` as a plain line if stderr is a log and the last line is old enough (or `now`).
    fn plain_line(&mut self, now: bool, text: impl FnOnce() -> String) {
        if self.plain && (now || self.last_line.elapsed() >= LINE_EVERY) {
            self.last_line = Instant::now();
            eprintln!(
                "epoch {}/{}: {} | {:.0}s into the epoch",
                self.epoch,
                self.epochs,
                text(),
                self.epoch_start.elapsed().as_secs_f64()
            );
        }
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).expect("valid template").progress_chars("=> ")
}

impl Progress for Bars {
    fn message(&mut self, text: &str) {
        eprintln!("{text}");
    }

    fn epoch_start(&mut self, epoch: usize, epochs: usize, steps: usize) {
        self.epoch = epoch;
        self.epochs = epochs;
        self.steps = steps;
        self.epoch_start = Instant::now();
        self.last_line = self.epoch_start;
        let bar = ProgressBar::new(steps as u64);
        bar.set_style(style("epoch {prefix} [{bar:30}] {pos}/{len} loss {msg} | {elapsed_precise} ETA {eta_precise}"));
        bar.set_prefix(format!("{epoch}/{epochs}"));
        self.bar = Some(bar);
    }

    fn step(&mut self, step: usize, loss: f64) {
        if let Some(bar) = &self.bar {
            bar.set_position(step as u64);
            bar.set_message(format!("{loss:.3e}"));
        }
        let steps = self.steps;
        self.plain_line(step == 1, || format!("step {step}/{steps}, loss {loss:.3e}"));
    }

    fn validating(&mut self, done: usize, total: usize) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!("validating {done}/{total}"));
        }
        self.plain_line(done == 0, || format!("validating {done}/{total} windows"));
    }

    fn epoch_end(&mut self, r: &EpochReport) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let per_epoch = r.elapsed_s / r.epoch as f64;
        let eta = per_epoch * (r.epochs - r.epoch) as f64;
        eprintln!(
            "epoch {}/{}: train loss {:.4e}, val mse {:.4} (keep data {:.2}, units {:.2}){} | {:.0}s elapsed, ETA {:.0}s",
            r.epoch,
            r.epochs,
            r.train_loss,
            r.val_mse,
            r.data_keep,
            r.unit_keep,
            if r.best { ", saved" } else { "" },
            r.elapsed_s,
            eta
        );
    }
}

/// A bar for evaluation over `total` windows.
pub fn eval_bar(label: &str, total: usize) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    bar.set_style(style("{prefix} [{bar:30}] {pos}/{len} windows | ETA {eta}"));
    bar.set_prefix(label.to_string());
    bar
}
