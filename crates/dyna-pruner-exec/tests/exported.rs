//! Exported models run by the executor alone: the fixtures (one small model per backbone, an
//! input batch, the trainer's prediction and masks for it) are written by the trainer crate's
//! `write_exec_fixtures`.

use std::path::{Path, PathBuf};

use dyna_pruner_exec::spec::BackboneSpec;
use dyna_pruner_exec::{format, prune};
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

/// Static pruning keeps exactly the units it names, and the smaller model's dense forward
/// equals the original's forward with every patch and only those units kept.
#[test]
fn a_statically_pruned_model_equals_the_masked_original() {
    for name in ["cnn", "vit", "convlstm"] {
        let model = format::load(&fixture(&format!("{name}.safetensors"))).unwrap();
        let io: Io = serde_json::from_str(&std::fs::read_to_string(fixture(&format!("{name}.json"))).unwrap()).unwrap();
        let axes = dyna_pruner_exec::spec::unit_axes(&model.arch);
        // Every cuttable layer keeps its even units (at least one), the others all of theirs.
        let kept: Vec<Vec<usize>> = model
            .arch
            .layer_units()
            .iter()
            .zip(&axes)
            .map(|(&n, a)| if a.is_some() { (0..n).step_by(2).collect() } else { (0..n).collect() })
            .collect();
        let mut target = model.arch.clone();
        match &mut target.model.backbone {
            BackboneSpec::Cnn(s) => s.units = kept[0].len(),
            BackboneSpec::Vit(s) => s.mlp = kept[1].len(),
            BackboneSpec::ConvLstm(s) => s.units = kept[0].len(),
        }
        let pruned = prune::keep_units(&model, &target, &kept).unwrap();
        assert_eq!(pruned.arch, target);
        let (h, w) = model.arch.patch_grid(io.height, io.width);
        let all = SampleMasks { patches: (0..h * w).collect(), units: kept.clone() };
        let given = vec![all; io.batch];
        let reference = model
            .executor()
            .unwrap()
            .forward(&io.input, io.batch, io.height, io.width, MaskPlan::Given(&given))
            .unwrap();
        let small =
            pruned.executor().unwrap().forward(&io.input, io.batch, io.height, io.width, MaskPlan::Dense).unwrap();
        let scale = reference.prediction.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        let worst = small.prediction.iter().zip(&reference.prediction).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst <= 1e-4 * scale, "{name}: max |diff| {worst} against the masked original");
        // The L1 selection names as many units as the target has, from the largest norms.
        let selection = prune::l1_selection(&model, &target).unwrap();
        let norms = prune::unit_l1_norms(&model).unwrap();
        for (l, (sel, n)) in selection.iter().zip(&norms).enumerate() {
            assert_eq!(sel.len(), target.layer_units()[l]);
            if let Some(n) = n {
                let weakest_kept = sel.iter().map(|&u| n[u]).fold(f64::INFINITY, f64::min);
                let strongest_dropped = (0..n.len()).filter(|u| !sel.contains(u)).map(|u| n[u]).fold(0.0, f64::max);
                assert!(weakest_kept >= strongest_dropped, "{name} layer {l}");
            }
        }
        // Another backbone's shape is not a cut.
        assert!(prune::keep_units(&model, &target, &kept[1..]).is_err());
    }
}
