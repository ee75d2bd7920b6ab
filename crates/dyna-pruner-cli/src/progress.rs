//! Terminal progress for training and evaluation (indicatif), with an ETA.

use indicatif::{ProgressBar, ProgressStyle};

use dyna_pruner::train::{EpochReport, Progress};

/// Progress bars on stderr: one per epoch, then a line per finished epoch.
#[derive(Default)]
pub struct Bars {
    bar: Option<ProgressBar>,
    epoch: usize,
    epochs: usize,
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
    }

    fn validating(&mut self, done: usize, total: usize) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!("validating {done}/{total}"));
        }
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
