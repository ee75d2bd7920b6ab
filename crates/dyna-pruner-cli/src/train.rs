//! `dyna-pruner train`: fit a model from a TOML config, then score it on the test range.

use std::path::Path;

use dyna_pruner::checkpoint;
use dyna_pruner::config::{Plan, RunConfig};
use dyna_pruner::eval::{default_batch, evaluate_persistence, Evaluation};
use dyna_pruner::train::{train, RunControl};

use crate::device::DeviceArg;
use crate::eval::{evaluate_checkpoint, table_header, table_metrics, table_row};
use crate::progress::Bars;
use crate::with_backend;

/// Trains `plan` and returns the best checkpoint's test evaluation (`None` if stopped early).
pub fn train_plan(plan: &Plan, control: RunControl, device: DeviceArg) -> anyhow::Result<Option<Evaluation>> {
    with_backend!(device, |B, T, dev| {
        let Some(trained) = train::<T>(plan, &dev, control, &mut Bars::default())? else {
            return Ok(None);
        };
        let ck = checkpoint::load::<B>(&trained.checkpoint, &dev)?;
        let test_set = &trained.splits.test;
        let test = evaluate_checkpoint(&ck, test_set, default_batch(test_set.height, test_set.width), &dev, "test")?;
        let persistence = evaluate_persistence(&trained.splits.test, ck.meta.scoring());
        let cols = table_metrics(&trained.splits.test);
        println!(
            "checkpoint {} (best epoch {}, {:.0}s)\ntest range: {} windows\n{}",
            trained.checkpoint.display(),
            trained.meta.provenance.best_epoch,
            trained.meta.provenance.wall_time_s,
            trained.splits.test.len(),
            table_header(cols)
        );
        println!("{}", table_row("model", &test, test.dense_macs_per_sample, cols));
        println!("{}", table_row("persistence", &persistence, None, cols));
        Ok(Some(test))
    })
}

pub fn run(config: &Path, control: RunControl, device: DeviceArg) -> anyhow::Result<()> {
    let plan = RunConfig::load(config)?;
    train_plan(&plan, control, device).map(|_| ())
}
