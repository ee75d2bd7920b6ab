//! Integration tests: the real `dyna-pruner` binary on small synthetic files in temp dirs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dyna_pruner::data::crowd_h5;
use dyna_pruner::data::npz::npy_bytes;
use dyna_pruner::data::synthetic::crowd_series;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dyna-pruner"))
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dyna-pruner-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("binary runs");
    eprintln!("stdout:\n{}\nstderr:\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// 40 days of synthetic hourly flows on 8x4, with a gap every 100 hours.
fn synthetic_file(dir: &Path) -> PathBuf {
    let path = dir.join("flows.h5");
    crowd_h5::write(&path, &crowd_series(8, 4, 40, 100, 11)).unwrap();
    path
}

fn tiny_config(dir: &Path, data: &Path, out: &str, extra: &str) -> PathBuf {
    let text = format!(
        r#"[data]
files = ["{}"]
train = ["2010-01-01", "2010-01-25"]
val = ["2010-01-25", "2010-02-01"]
test = ["2010-02-01", "2010-02-10"]
[model]
patch = 2
[model.generator]
width = 4
[model.backbone]
kind = "cnn"
hidden = 8
units = 8
blocks = 2
[train]
epochs = 2
batch_size = 16
window_stride = 3
out = "{}"
{extra}
"#,
        data.display(),
        dir.join(out).display()
    );
    let path = dir.join(format!("{out}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn train_then_eval_writes_checkpoint_and_report() {
    let dir = temp_dir("train-eval");
    let data = synthetic_file(&dir);
    let dense = tiny_config(&dir, &data, "dense", "");
    assert!(run(bin().args(["train", "--config"]).arg(&dense)).status.success());
    let ck = dir.join("dense");
    for f in ["model.mpk", "config.toml", "checkpoint.json"] {
        assert!(ck.join(f).is_file(), "missing {f}");
    }
    assert!(!ck.join("resume").exists(), "resume state is removed after a finished run");
    let meta = json(&ck.join("checkpoint.json"));
    for key in ["seed", "commit", "backend", "wall_time_s", "best_epoch"] {
        assert!(meta["provenance"].get(key).is_some(), "provenance lacks {key}");
    }

    // The dynamic model, fine-tuned from the dense one with distillation.
    // AdamW with a learning-rate warm-up, PyTorch's epsilon and clipped gradients.
    let extra = format!(
        "init_from = \"{}\"\nweight_decay = 0.01\nlr_warmup = 0.3\nadam_epsilon = 1e-8\ngrad_clip_norm = 1.0\n\
         [method]\nmode = \"both\"\ndata_keep = 0.5\nunit_keep = 0.5\nwarmup_epochs = 1",
        ck.display()
    );
    let dynamic = tiny_config(&dir, &data, "dynamic", &extra);
    // Its mask generator differs from the dense checkpoint's (it also reads the direction of
    // change): the backbone is taken over, the generator starts afresh (issue 4).
    let text = std::fs::read_to_string(&dynamic).unwrap();
    std::fs::write(&dynamic, text.replace("width = 4", "width = 4\nmotion = true")).unwrap();
    let out = run(bin().args(["train", "--config"]).arg(&dynamic));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("the mask generator starts afresh"));
    assert_eq!(json(&dir.join("dynamic/checkpoint.json"))["architecture"]["model"]["generator"]["motion"], true);

    // Issue 21: the dense model pruned once to half its units (L1), then fine-tuned: an
    // ordinary smaller dense checkpoint.
    let extra = format!("init_from = \"{}\"\nprune_init = \"l1\"", ck.display());
    let pruned = tiny_config(&dir, &data, "pruned", &extra);
    let text = std::fs::read_to_string(&pruned).unwrap();
    std::fs::write(&pruned, text.replace("units = 8", "units = 4")).unwrap();
    let out = run(bin().args(["train", "--config"]).arg(&pruned));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("pruned once from [8, 8] to [4, 4] units"), "{}", stderr(&out));
    assert_eq!(json(&dir.join("pruned/checkpoint.json"))["architecture"]["model"]["backbone"]["units"], 4);
    // Without prune_init a checkpoint of another width is refused.
    std::fs::write(&pruned, std::fs::read_to_string(&pruned).unwrap().replace("prune_init = \"l1\"", "")).unwrap();
    let out = run(bin().args(["train", "--config"]).arg(&pruned));
    assert!(!out.status.success() && stderr(&out).contains("differs from the config"), "{}", stderr(&out));

    let report = dir.join("eval.json");
    let out = run(bin()
        .args(["eval", "--checkpoint"])
        .arg(dir.join("dynamic"))
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&report));
    assert!(out.status.success());
    let r = json(&report);
    assert!(r["metrics"]["mse"].as_f64().unwrap() > 0.0);
    assert!(r["samples"].as_u64().unwrap() > 100);
    let kept_units = r["kept_unit_fraction"].as_f64().unwrap();
    assert_eq!(kept_units, 0.5);
    assert!(r["macs_per_sample"].as_f64().unwrap() > 0.0);
    // `--dense`: the same weights without masks, at the dense model's MACs.
    let dense_report = dir.join("eval-dense.json");
    let out = run(bin()
        .args(["eval", "--dense", "--checkpoint"])
        .arg(dir.join("dynamic"))
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&dense_report));
    assert!(out.status.success(), "{}", stderr(&out));
    let d = json(&dense_report);
    assert!(d["kept_unit_fraction"].is_null(), "{d}");
    assert!(d["macs_per_sample"].as_f64().unwrap() > r["macs_per_sample"].as_f64().unwrap());

    // The same checkpoint on its own config's validation range (no files named).
    let out = run(bin().args(["eval", "--split", "val", "--checkpoint"]).arg(dir.join("dynamic")));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("from the Val range of"));
    let both = run(bin().args(["eval", "--split", "val", "--data"]).arg(&data).arg("--checkpoint").arg(&ck));
    assert!(!both.status.success(), "--data and --split together must be refused");

    // The CNN's two executions of the kept units predict the same; `auto` picks one of them.
    let mut predictions = Vec::new();
    for units in ["select", "mask", "auto"] {
        let out_dir = dir.join(format!("pred-{units}"));
        let out = run(bin()
            .args(["predict", "--checkpoint"])
            .arg(dir.join("dynamic"))
            .arg("--data")
            .arg(&data)
            .args(["--units", units, "--out"])
            .arg(&out_dir));
        assert!(out.status.success(), "{}", stderr(&out));
        let report = json(&out_dir.join("samples.json"));
        predictions.push((npy_floats(&out_dir.join("predictions.npy")), report));
    }
    let (select, mask, auto) = (&predictions[0], &predictions[1], &predictions[2]);
    let worst = select.0.iter().zip(&mask.0).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(worst <= 1e-3, "select and mask differ by {worst}");
    let masks = |r: &serde_json::Value| {
        r["samples"].as_array().unwrap().iter().map(|s| s["kept_patch_fraction"].clone()).collect::<Vec<_>>()
    };
    assert_eq!(masks(&select.1), masks(&mask.1));
    assert_eq!(select.1["unit_execution"], "select");
    assert_eq!(mask.1["unit_execution"], "mask");
    let c = &auto.1["calibration"];
    let faster = if c["select_ms"].as_f64() <= c["mask_ms"].as_f64() { "select" } else { "mask" };
    assert_eq!(auto.1["unit_execution"], faster, "{c}");
    assert!(c["without_masks_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{c}");

    // Issue 24: `--pictures` draws four windows and the adaptivity beside the predictions.
    // Issue 25: predictions are written batch by batch; another batch size writes the same bytes.
    let out_dir = dir.join("pred-pictures");
    let out = run(bin()
        .args(["predict", "--pictures", "--units", "select", "--batch-size", "5", "--checkpoint"])
        .arg(dir.join("dynamic"))
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out_dir));
    assert!(out.status.success(), "{}", stderr(&out));
    let page = std::fs::read_to_string(out_dir.join("report.html")).unwrap();
    let links: Vec<&str> = page.split("<img src=\"").skip(1).map(|s| s.split('"').next().unwrap()).collect();
    assert_eq!(links.len(), 5, "{links:?}");
    assert!(links.iter().all(|l| out_dir.join(l).is_file()), "{links:?}");
    assert_eq!(
        std::fs::read(out_dir.join("predictions.npy")).unwrap(),
        std::fs::read(dir.join("pred-select/predictions.npy")).unwrap()
    );
    assert_eq!(json(&out_dir.join("samples.json"))["batch_size"], 5);
    assert!(json(&out_dir.join("samples.json"))["peak_rss_mb"].as_f64().is_some_and(|mb| mb > 0.0));
}

/// The float32 values of an `.npy` file written by `predict`.
fn npy_floats(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let header = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    bytes[10 + header..].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

#[test]
fn same_seed_gives_the_same_numbers_and_resume_continues_exactly() {
    let dir = temp_dir("determinism");
    let data = synthetic_file(&dir);
    let a = tiny_config(&dir, &data, "a", "");
    let b = tiny_config(&dir, &data, "b", "");
    assert!(run(bin().args(["train", "--config"]).arg(&a)).status.success());
    // b: stop after one epoch, then resume.
    let out = run(bin().args(["train", "--stop-after", "1", "--config"]).arg(&b));
    assert!(out.status.success());
    assert!(stderr(&out).contains("continue with --resume"));
    assert!(dir.join("b/resume/state.json").is_file());
    assert!(run(bin().args(["train", "--resume", "--config"]).arg(&b)).status.success());
    let (ma, mb) = (json(&dir.join("a/checkpoint.json")), json(&dir.join("b/checkpoint.json")));
    assert_eq!(ma["provenance"]["best_val_mse"], mb["provenance"]["best_val_mse"]);
    // Weight files carry random parameter ids, so compare what the weights compute instead.
    let metrics = |name: &str| {
        let report = dir.join(format!("{name}.json"));
        assert!(run(bin()
            .args(["eval", "--checkpoint"])
            .arg(dir.join(name))
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&report))
        .status
        .success());
        json(&report)["metrics"].clone()
    };
    assert_eq!(metrics("a"), metrics("b"));
}

/// Issue 25: `train` killed with SIGKILL at 20 random moments (some during a save) leaves a
/// checkpoint directory that either loads or does not exist; resuming (or restarting, when no
/// epoch had finished) then ends with the numbers of an uninterrupted run.
#[test]
fn train_killed_at_random_moments_loads_or_is_absent_and_resumes_exactly() {
    use rand::{Rng, SeedableRng};
    let dir = temp_dir("sigkill");
    let data = synthetic_file(&dir);
    let ten_epochs = |name: &str| {
        let cfg = tiny_config(&dir, &data, name, "");
        std::fs::write(&cfg, std::fs::read_to_string(&cfg).unwrap().replace("epochs = 2", "epochs = 10")).unwrap();
        cfg
    };
    let (reference, killed) = (ten_epochs("reference"), ten_epochs("killed"));
    let started = std::time::Instant::now();
    assert!(run(bin().args(["train", "--config"]).arg(&reference)).status.success());
    let full = started.elapsed();
    let ck = dir.join("killed");
    let train = |resume: bool| {
        let mut cmd = bin();
        cmd.args(["train", "--config"]).arg(&killed);
        if resume {
            cmd.arg("--resume");
        }
        cmd
    };
    let eval = |checkpoint: &Path, name: &str| {
        let report = dir.join(format!("{name}.json"));
        let out = run(bin()
            .args(["eval", "--checkpoint"])
            .arg(checkpoint)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&report));
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        json(&report)["metrics"].clone()
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(25);
    let mut resumed = 0;
    for k in 0..20 {
        let resume = ck.join("resume/state.json").is_file();
        let mut child =
            train(resume).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
        std::thread::sleep(full.mul_f64(rng.random_range(0.05..0.9)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let parts = ["model.mpk", "checkpoint.json", "config.toml"].map(|f| ck.join(f).is_file());
        if parts.iter().any(|&p| p) {
            assert!(parts.iter().all(|&p| p), "kill {k}: a partial checkpoint {parts:?}");
            eval(&ck, &format!("kill{k}"));
        }
        resumed += usize::from(resume);
    }
    assert!(resumed >= 3, "only {resumed} of 20 kills left a run to resume: the kills came too late");
    let out = run(&mut train(ck.join("resume/state.json").is_file()));
    assert!(out.status.success(), "{}", stderr(&out));
    let (a, b) = (json(&dir.join("reference/checkpoint.json")), json(&ck.join("checkpoint.json")));
    assert_eq!(a["provenance"]["best_val_mse"], b["provenance"]["best_val_mse"]);
    assert_eq!(eval(&dir.join("reference"), "reference"), eval(&ck, "killed"));
}

#[test]
fn eval_rejects_a_missing_file_with_its_name() {
    let dir = temp_dir("missing");
    let data = synthetic_file(&dir);
    let cfg = tiny_config(&dir, &data, "m", "epochs = 1");
    let cfg_text = std::fs::read_to_string(&cfg).unwrap().replace("epochs = 2\n", "");
    std::fs::write(&cfg, cfg_text).unwrap();
    assert!(run(bin().args(["train", "--config"]).arg(&cfg)).status.success());
    let out = run(bin().args(["eval", "--checkpoint"]).arg(dir.join("m")).args(["--data", "/nonexistent/flows.h5"]));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("/nonexistent/flows.h5") && !err.contains("panicked"), "{err}");

    let not_hdf5 = dir.join("notes.h5");
    std::fs::write(&not_hdf5, "not an hdf5 file").unwrap();
    let out = run(bin().args(["eval", "--checkpoint"]).arg(dir.join("m")).arg("--data").arg(&not_hdf5));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not a valid HDF5"), "{}", stderr(&out));
}

#[test]
fn bf16_and_direct_launches_are_refused_off_the_gpu() {
    let out = run(bin().args(["bench", "--precision", "bf16", "--out", "/nonexistent/bench"]));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("--precision and --launch apply to --device cuda") && !err.contains("panicked"), "{err}");
    let out = run(bin().args(["eval", "--checkpoint", "/nonexistent/ck", "--split", "test", "--precision", "bf16"]));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("--precision bf16 runs on the GPU") && !err.contains("panicked"), "{err}");
    let out = run(bin().args(["demo", "--retrain", "--precision", "bf16", "--out", "/nonexistent/demo"]));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("--precision bf16 runs on the GPU") && !err.contains("panicked"), "{err}");
    let out = run(bin().args(["bench", "--device", "cuda", "--precision", "f16"]));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("f16"), "{}", stderr(&out));
}

#[test]
fn invalid_config_value_names_the_field_and_range() {
    let dir = temp_dir("badcfg");
    let data = synthetic_file(&dir);
    let cfg = tiny_config(&dir, &data, "bad", "lr = -0.1");
    let out = run(bin().args(["train", "--config"]).arg(&cfg));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("train.lr") && err.contains("(0, 1]") && !err.contains("panicked"), "{err}");
}

#[test]
fn npz_archives_are_read_as_openstl_windows() {
    use std::io::Write;
    let dir = temp_dir("npz");
    let data = synthetic_file(&dir);
    let cfg = tiny_config(&dir, &data, "n", "");
    assert!(run(bin().args(["train", "--config"]).arg(&cfg)).status.success());
    // An OpenSTL-style archive of 5 test windows [N, 4, 2, 8, 4].
    let series = crowd_series(8, 4, 1, 0, 5);
    let frame = series.frame_len();
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for n in 0..5 {
        x.extend_from_slice(&series.values[n * frame..(n + 4) * frame]);
        y.extend_from_slice(&series.values[(n + 4) * frame..(n + 8) * frame]);
    }
    let npz = dir.join("dataset.npz");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&npz).unwrap());
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for (name, values) in [("X_train", &x), ("Y_train", &y), ("X_test", &x), ("Y_test", &y)] {
        zip.start_file(format!("{name}.npy"), opts).unwrap();
        zip.write_all(&npy_bytes(&[5, 4, 2, 8, 4], values)).unwrap();
    }
    zip.finish().unwrap();
    let report = dir.join("npz.json");
    let out =
        run(bin().args(["eval", "--checkpoint"]).arg(dir.join("n")).arg("--data").arg(&npz).arg("--out").arg(&report));
    assert!(out.status.success());
    assert_eq!(json(&report)["samples"], 5);
}

/// Trains from `config_text` (written to DIR/NAME.toml; its `out` must be DIR/NAME), then runs
/// `eval` and `predict` on `data`; returns train's stdout, the eval report and predict's samples.json.
fn train_eval_predict(
    dir: &Path,
    name: &str,
    config_text: &str,
    data: &Path,
) -> (String, serde_json::Value, serde_json::Value) {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(&config, config_text).unwrap();
    let out = run(bin().args(["train", "--config"]).arg(&config));
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let ck = dir.join(name);
    let report = dir.join("eval.json");
    let out = run(bin().args(["eval", "--checkpoint"]).arg(&ck).arg("--data").arg(data).arg("--out").arg(&report));
    assert!(out.status.success());
    let pred = dir.join("pred");
    let predict = |source: &str, from: &Path, out: &Path, units: &str| {
        let args = [
            "--data".as_ref(),
            data.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
            "--units".as_ref(),
            units.as_ref(),
        ];
        run(bin().args(["predict", source]).arg(from).args(args))
    };
    assert!(predict("--checkpoint", &ck, &pred, "select").status.success());
    // The exported model alone, through the framework-free executor: the same floats.
    let alone = dir.join("pred-model");
    let exported = pred.join("model.safetensors");
    assert!(predict("--model", &exported, &alone, "select").status.success());
    let npy = |d: &Path| std::fs::read(d.join("predictions.npy")).unwrap();
    assert!(npy(&pred) == npy(&alone), "predict --model must equal predict --checkpoint bit for bit");
    let (a, b) = (json(&pred.join("samples.json")), json(&alone.join("samples.json")));
    assert_eq!(a["samples"], b["samples"], "the same masks and MACs per window");
    assert!(!alone.join("model.safetensors").exists());
    // `--units auto` (the default) times both executions of the kept units on the first batch;
    // only a CNN has the choice.
    let auto = dir.join("pred-auto");
    assert!(run(bin().args(["predict", "--model"]).arg(&exported).arg("--data").arg(data).arg("--out").arg(&auto))
        .status
        .success());
    assert_eq!(npy(&auto), npy(&pred), "a ViT or ConvLSTM runs as with --units select");
    assert!(json(&auto.join("samples.json"))["calibration"].is_null());
    // And timed on the same data, dense path against its own masks, and against a reference
    // model's dense forward (here its own weights: the same MACs as its dense path).
    let bench = dir.join("bench");
    let out = run(bin()
        .args(["bench", "--model"])
        .arg(&exported)
        .arg("--data")
        .arg(data)
        .arg("--reference")
        .arg(&ck)
        .args(["--batches", "2", "--runs", "1", "--warmup", "0", "--out"])
        .arg(&bench));
    assert!(out.status.success(), "{}", stderr(&out));
    let rows = json(&bench.join("bench.json"))["rows"].clone();
    assert_eq!(rows[0]["model"], exported.display().to_string());
    assert_eq!(rows[0]["batch"], 2);
    assert!(rows[0]["mac_ratio"].as_f64().unwrap() > 1.0, "the dynamic model does fewer MACs: {rows}");
    let against = &rows[0]["against"];
    assert_eq!(against["model"], ck.display().to_string());
    assert_eq!(against["mac_ratio"], rows[0]["mac_ratio"], "the same weights' dense MACs: {rows}");
    assert!(against["dense_ms"].as_f64().unwrap() > 0.0 && against["efficiency"].as_f64().unwrap() > 0.0);
    (stdout, json(&report), a)
}

#[test]
fn weather_vit_trains_evaluates_and_predicts_on_the_shipped_era5_file() {
    let dir = temp_dir("weather");
    let era5 = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/era5-uk-t2m/era5_t2m_2019-03_uk_0.25deg.nc");
    let text = format!(
        r#"[data]
format = "netcdf"
files = ["{}"]
channels = [{{ var = "t2m" }}]
t_in = 6
t_out = 6
train = ["2019-03-01", "2019-03-19"]
val = ["2019-03-19", "2019-03-22"]
test = ["2019-03-22", "2019-04-01"]
[model]
patch = 8
generator = {{ width = 4 }}
backbone = {{ kind = "vit", dim = 8, mlp = 8, layers = 1, heads = 2 }}
[method]
mode = "both"
data_keep = 0.5
unit_keep = 0.5
[train]
epochs = 1
batch_size = 16
window_stride = 8
out = "{}"
"#,
        era5.display(),
        dir.join("vit").display()
    );
    let (stdout, r, samples) = train_eval_predict(&dir, "vit", &text, &era5);
    assert!(stdout.contains("acc") && stdout.contains("persistence"), "weather metrics in the table");
    let meta = json(&dir.join("vit/checkpoint.json"));
    assert_eq!(meta["scaler"]["mean"].as_array().unwrap().len(), 1, "z-scores per channel");
    assert_eq!(meta["climatology"].as_array().unwrap().len(), 33 * 49);
    let rmse = r["metrics"]["rmse"].as_f64().unwrap();
    assert!(rmse > 0.1 && rmse < 20.0, "rmse in K: {rmse}");
    assert!(r["metrics"]["acc"].as_f64().is_some() && r["metrics"]["rmse/t2m"].as_f64() == Some(rmse));
    assert!(r["kept_patch_fraction"].as_f64().unwrap() < 0.6);
    assert_eq!(samples["shape"], serde_json::json!([744 - 11, 6, 1, 33, 49]));
}

#[test]
fn radar_convlstm_trains_on_knmi_crops_evaluates_and_predicts() {
    let dir = temp_dir("radar");
    let knmi = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/knmi-radar");
    let text = format!(
        r#"[data]
format = "knmi"
files = ["{}"]
pool = 8
t_in = 3
t_out = 2
val_frames = 10
test_frames = 12
# The flat [model] table of older configs still reads.
[model]
backbone = "convlstm"
hidden = 4
units = 4
blocks = 1
stride = 4
patch = 8
generator_width = 4
[method]
mode = "both"
data_keep = 0.5
data_rule = "batch"
unit_keep = 0.5
[train]
epochs = 1
batch_size = 16
window_stride = 4
crop = 32
augment = true
out = "{}"
"#,
        knmi.display(),
        dir.join("convlstm").display()
    );
    let (stdout, r, samples) = train_eval_predict(&dir, "convlstm", &text, &knmi);
    assert!(stdout.contains("csi_m") && stdout.contains("persistence"), "radar metrics in the table");
    assert!(stdout.contains("8 windows"), "the last 12 frames hold 8 windows of 5");
    assert_eq!(r["samples"], 92 - 4);
    let csi = r["metrics"]["csi_m"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&csi), "csi_m {csi}");
    assert!(r["persistence"]["metrics"]["csi/16"].as_f64().unwrap() > 0.1, "rain in the KNMI frames");
    assert_eq!(samples["shape"], serde_json::json!([92 - 4, 2, 1, 95, 87]));
    // The batch rule: a threshold on S calibrated on the training windows, so the number of
    // kept patches differs between samples (rainy ones keep more).
    let tau = json(&dir.join("convlstm/checkpoint.json"))["masking"]["data_threshold"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&tau), "threshold {tau}");
    let kept: Vec<f64> =
        samples["samples"].as_array().unwrap().iter().map(|s| s["kept_patch_fraction"].as_f64().unwrap()).collect();
    assert!(kept.iter().any(|&k| k != kept[0]), "per-sample counts: {kept:?}");
}

/// A temporary repository root for the weather task: the shipped data, and every committed
/// weather config with its model shrunk to a few channels and one short epoch.
fn tiny_weather_root(name: &str) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let root = temp_dir(name);
    std::os::unix::fs::symlink(repo.join("data").canonicalize().unwrap(), root.join("data")).unwrap();
    std::fs::create_dir_all(root.join("configs/weather")).unwrap();
    for entry in std::fs::read_dir(repo.join("configs/weather")).unwrap() {
        let path = entry.unwrap().path();
        let mut cfg: toml::Table = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let model = cfg["model"].as_table_mut().unwrap();
        model.insert("generator".into(), toml::Value::Table(toml::toml! { width = 4 }));
        let backbone = model["backbone"].as_table_mut().unwrap();
        // Each config keeps its MLP relative to the others (a statically pruned one stays smaller).
        let mlp = backbone["mlp"].as_integer().unwrap();
        backbone.insert("mlp".into(), (mlp / 8).max(2).into());
        backbone.insert("dim".into(), 8.into());
        backbone.insert("heads".into(), 2.into());
        backbone.insert("layers".into(), 1.into());
        let train = cfg["train"].as_table_mut().unwrap();
        train.insert("epochs".into(), 1.into());
        train.insert("window_stride".into(), 25.into());
        let method = cfg.entry("method").or_insert(toml::Value::Table(Default::default()));
        method.as_table_mut().unwrap().insert("warmup_epochs".into(), 0.0.into());
        std::fs::write(root.join("configs/weather").join(path.file_name().unwrap()), toml::to_string(&cfg).unwrap())
            .unwrap();
    }
    root
}

/// Issue 21: `pareto --retrain` trains every model of a front and writes a JSON with one point
/// per model and persistence, and a PNG that decodes to the documented size.
#[test]
fn pareto_on_tiny_models_writes_a_valid_json_and_a_decodable_png() {
    let root = tiny_weather_root("pareto");
    let out = root.join("front");
    let o = run(bin()
        .args(["pareto", "--task", "weather", "--retrain", "--runs", "2", "--root"])
        .arg(&root)
        .arg("--out")
        .arg(&out));
    assert!(o.status.success(), "{}", stderr(&o));
    let front: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("pareto.json")).unwrap()).unwrap();
    assert_eq!(front["task"], "weather");
    assert_eq!(front["main_metric"], "rmse");
    assert_eq!(front["higher_is_better"], false);
    let points = front["points"].as_array().unwrap();
    let kinds: Vec<&str> = points.iter().map(|p| p["kind"].as_str().unwrap()).collect();
    for kind in ["dense", "dense_small", "static_pruned", "control", "dynamic", "persistence"] {
        assert!(kinds.contains(&kind), "no {kind} point in {kinds:?}");
    }
    for p in points {
        let (macs, metric, ms) =
            (p["macs_per_sample"].as_f64().unwrap(), p["metric"].as_f64().unwrap(), p["latency_ms"].as_f64().unwrap());
        assert!(metric.is_finite() && metric > 0.0, "{p}");
        if p["kind"] == "persistence" {
            assert_eq!((macs, ms), (0.0, 0.0));
        } else {
            assert!(macs > 0.0 && ms > 0.0, "{p}");
        }
    }
    // The statically pruned model does fewer MACs than the dense one it was cut from.
    let macs_of = |kind: &str| points.iter().find(|p| p["kind"] == kind).unwrap()["macs_per_sample"].as_f64().unwrap();
    assert!(macs_of("static_pruned") < macs_of("dense"));
    let decoder = png::Decoder::new(std::fs::File::open(out.join("pareto.png")).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut pixels).unwrap();
    assert_eq!((info.width, info.height), (1400, 560));
    let page = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(page.contains("<img src=\"pareto.png\"") && page.contains("static_pruned"), "{page}");
    let distinct: std::collections::HashSet<&[u8]> = pixels.chunks(3).collect();
    assert!(distinct.len() > 8, "a blank picture ({} colours)", distinct.len());
}

/// Issue 24: `demo` draws its pictures (decodable PNGs with colour, each linked from
/// report.html, every link resolving) beside its report.
#[test]
fn demo_writes_pictures_and_a_report_page_that_links_them() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = temp_dir("demo-pictures");
    let o = run(bin().args(["demo", "--task", "weather", "--root"]).arg(&repo).arg("--out").arg(&out));
    assert!(o.status.success(), "{}", stderr(&o));
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    let links: Vec<&str> = html.split("<img src=\"").skip(1).map(|s| s.split('"').next().unwrap()).collect();
    assert_eq!(links.len(), 5, "four windows and the adaptivity picture: {links:?}");
    assert!(html.contains("<table>") && html.contains("rmse"));
    for link in links {
        let decoder = png::Decoder::new(std::fs::File::open(out.join(link)).unwrap());
        let mut reader = decoder.read_info().unwrap();
        let mut pixels = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut pixels).unwrap();
        assert!(info.width >= 600 && info.height >= 300, "{link}: {}x{}", info.width, info.height);
        let distinct: std::collections::HashSet<&[u8]> = pixels.chunks(info.color_type.samples()).collect();
        assert!(distinct.len() > 16, "{link}: {} colours", distinct.len());
    }
}

/// Issue 26: one budget-conditioned model, run at keep ratios chosen at inference: `--keep 1`
/// is the dense forward of its weights, a keep outside the trained range is refused naming it,
/// and `--latency-ms` picks a keep, reports it and caches its calibration.
#[test]
fn issue_26_a_budget_conditioned_model_runs_at_any_keep_in_its_range() {
    let dir = temp_dir("any-budget");
    let data = synthetic_file(&dir);
    let dense = tiny_config(&dir, &data, "dense", "");
    assert!(run(bin().args(["train", "--config"]).arg(&dense)).status.success());
    let extra = format!(
        "init_from = \"{}\"\n[method]\nmode = \"both\"\ndata_keep = 0.5\nunit_keep = 0.5\nkeep_range = [0.25, 1.0]\n\
         warmup_epochs = 1",
        dir.join("dense").display()
    );
    let config = tiny_config(&dir, &data, "any", &extra);
    let out = run(bin().args(["train", "--config"]).arg(&config));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("the mask generator and unit gates start afresh"), "{}", stderr(&out));
    let ck = dir.join("any");
    let meta = json(&ck.join("checkpoint.json"));
    assert_eq!(meta["architecture"]["model"]["generator"]["keep_range"], serde_json::json!([0.25, 1.0]));

    let eval = |name: &str, args: &[&str]| {
        let report = dir.join(format!("{name}.json"));
        let mut cmd = bin();
        cmd.args(["eval", "--checkpoint"]).arg(&ck).arg("--data").arg(&data).arg("--out").arg(&report).args(args);
        let out = run(&mut cmd);
        (out.status.success().then(|| json(&report)), stderr(&out))
    };
    let (all, _) = eval("keep1", &["--keep", "1"]);
    let (dense, _) = eval("dense", &["--dense"]);
    let (all, dense) = (all.unwrap(), dense.unwrap());
    assert_eq!(all["metrics"], dense["metrics"], "keep 1 is the dense forward of the same weights");
    let (tight, _) = eval("tight", &["--keep", "0.25", "--keep-units", "0.5"]);
    let tight = tight.unwrap();
    assert_eq!(tight["masking"]["data_keep"], 0.25);
    assert_eq!(tight["masking"]["unit_keep"], 0.5);
    assert!(tight["macs_per_sample"].as_f64() < all["macs_per_sample"].as_f64());
    let (refused, err) = eval("outside", &["--keep", "0.1"]);
    assert!(refused.is_none() && err.contains("0.1") && err.contains("[0.25, 1]"), "{err}");
    // A model trained for one budget has no range to choose from.
    let out = run(bin()
        .args(["eval", "--checkpoint"])
        .arg(dir.join("dense"))
        .arg("--data")
        .arg(&data)
        .args(["--keep", "0.5"]));
    assert!(!out.status.success() && stderr(&out).contains("trained for one budget"), "{}", stderr(&out));

    // A latency target: calibrated once per model and machine (the second run reads the cache).
    let cache = dir.join("cache");
    for (round, note) in [(1, "written to"), (2, "from")] {
        let out_dir = dir.join(format!("latency{round}"));
        let out = run(bin()
            .env("DYNA_PRUNER_CACHE", &cache)
            .args(["predict", "--checkpoint"])
            .arg(&ck)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&out_dir)
            .args(["--batch-size", "1", "--latency-ms", "1000"]));
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stderr(&out).contains(&format!("calibration {note}")), "{}", stderr(&out));
        let samples = json(&out_dir.join("samples.json"));
        // A second per window is met by every budget: the largest keep.
        assert_eq!(samples["latency_budget"]["position"], 1.0, "{}", samples["latency_budget"]);
        assert_eq!(samples["latency_budget"]["masking"]["data_keep"], 1.0, "{}", samples["latency_budget"]);
        assert!(samples["latency_budget"]["measured_ms"].as_f64().unwrap() > 0.0);
    }
    assert!(cache.join("latency.json").is_file());
}
