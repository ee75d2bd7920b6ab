//! Exported models run by the executor alone: the fixtures (one small model per backbone, an
//! input batch, the trainer's prediction and masks for it) are written by the trainer crate's
//! `write_exec_fixtures`.

use std::path::{Path, PathBuf};

use dyna_pruner_exec::format;
use dyna_pruner_exec::{ExecError, MaskPlan, SampleMasks};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

#[derive(serde::Deserialize)]
struct Io {
    batch: usize,
    height: usize,
    width: usize,
    input: Vec<f32>,
    prediction: Vec<f32>,
    masks: Vec<SampleMasks>,
}

#[test]
fn every_backbone_predicts_from_its_exported_file_as_the_trainer_did() {
    for name in ["cnn", "vit", "convlstm"] {
        let model = format::load(&fixture(&format!("{name}.safetensors"))).unwrap();
        assert_eq!(model.arch.kind().name(), name);
        let io: Io = serde_json::from_str(&std::fs::read_to_string(fixture(&format!("{name}.json"))).unwrap()).unwrap();
        let out =
            model.executor().unwrap().forward(&io.input, io.batch, io.height, io.width, MaskPlan::Dynamic).unwrap();
        assert_eq!(out.masks, io.masks, "{name}: the masks the trainer chose");
        let scale = io.prediction.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        let worst = out.prediction.iter().zip(&io.prediction).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst <= 1e-4 * scale, "{name}: max |diff| {worst} against the trainer's prediction");
        assert_eq!(out.macs.len(), io.batch);
    }
}

/// A fresh path in the temporary directory.
fn temp_path(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!("dp-exec-{what}-{}.safetensors", std::process::id()))
}

#[test]
fn a_file_that_disagrees_with_its_architecture_is_refused_by_name() {
    let model = format::load(&fixture("cnn.safetensors")).unwrap();
    // A weight missing.
    let mut missing = model.clone();
    missing.tensors.remove("blocks.0.conv1.weight");
    let err = format::save(Path::new("/nonexistent/x.safetensors"), &missing).unwrap_err().to_string();
    assert!(err.contains("blocks.0.conv1.weight") && err.contains("missing"), "{err}");
    // A weight of the wrong shape.
    let mut wrong = model.clone();
    wrong.tensors.get_mut("enc_in.bias").unwrap().0 = vec![1, 2];
    assert!(matches!(wrong.executor(), Err(ExecError::Tensor { name, .. }) if name == "enc_in.bias"));
    // A weight of another backbone.
    let mut extra = model.clone();
    extra.tensors.insert("layers.0.qkv.weight".into(), (vec![1], vec![0.0]));
    let err = extra.executor().unwrap_err().to_string();
    assert!(err.contains("layers.0.qkv.weight") && err.contains("not a weight of this cnn"), "{err}");
    // A non-finite weight, written by hand past the checks.
    let (mut nan, path) = (model.clone(), temp_path("nan"));
    nan.tensors.get_mut("dec_out.bias").unwrap().1[0] = f32::NAN;
    format::save(&path, &nan).unwrap();
    let err = format::load(&path).unwrap_err().to_string();
    std::fs::remove_file(&path).unwrap();
    assert!(err.contains("dec_out.bias") && err.contains("non-finite"), "{err}");
}

#[test]
fn a_file_that_is_no_exported_model_is_refused_with_its_path() {
    let path = temp_path("not-a-model");
    std::fs::write(&path, b"not safetensors at all").unwrap();
    let err = format::load(&path).unwrap_err().to_string();
    std::fs::remove_file(&path).unwrap();
    assert!(err.contains(&path.display().to_string()) && err.contains("not an exported dyna-pruner model"), "{err}");
    let err = format::load(Path::new("/nonexistent/model.safetensors")).unwrap_err().to_string();
    assert!(err.contains("/nonexistent/model.safetensors"), "{err}");
}
