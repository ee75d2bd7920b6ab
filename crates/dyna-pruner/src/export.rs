//! Export of a trained model to the sparse executor (`dyna-pruner-exec`): every weight under
//! the name and in the layout the shared spec lists (`dyna_pruner_spec::weights`), with the
//! architecture and the inference masking, in memory or as a safetensors file. The way back
//! ([`import`]) loads such tensors into a trainable model; [`prune`] goes out and back through
//! the executor's static structured pruning.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::TensorData;
use dyna_pruner_exec::format::{self, ExportedModel, Tensors};
use dyna_pruner_exec::prune;
use dyna_pruner_exec::Exec;

use crate::config::PruneCriterion;
use crate::error::{Error, Result};
use crate::method::Masking;
use crate::model::DynamicModel;

/// Collects every float parameter of a model under its module path.
struct Collect {
    path: Vec<String>,
    tensors: Tensors,
}

impl<B: Backend> ModuleVisitor<B> for Collect {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let v = param.val();
        let shape = v.dims().to_vec();
        let values = v.into_data().convert::<f32>().to_vec().expect("f32 weights");
        self.tensors.insert(spec_name(&self.path), (shape, values));
    }
}

/// Replaces every float parameter by the tensor of the same exported name.
struct Load<'a> {
    path: Vec<String>,
    tensors: &'a Tensors,
}

impl<B: Backend> ModuleMapper<B> for Load<'_> {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, old, mapper) = param.consume();
        let name = spec_name(&self.path);
        // `import` checked every tensor against the architecture's weight list before mapping.
        let (shape, values) = &self.tensors[&name];
        let new = Tensor::from_data(TensorData::new(values.clone(), shape.clone()), &old.device())
            .set_require_grad(old.is_require_grad());
        Param::from_mapped_value(id, new, mapper)
    }
}

/// The exported name of the parameter at a module path: the mask generator is `generator`,
/// the unit gates `gates.{l}`, the backbone's layers sit at the top (`enc_in`, `blocks.0.conv1`).
fn spec_name(path: &[String]) -> String {
    let parts: Vec<&str> = path.iter().map(String::as_str).collect();
    let rest: Vec<&str> = match parts.as_slice() {
        ["mask_generator", rest @ ..] => std::iter::once("generator").chain(rest.iter().copied()).collect(),
        ["unit_gates", l, "linear", rest @ ..] => ["gates", l].into_iter().chain(rest.iter().copied()).collect(),
        ["backbone", _variant, rest @ ..] => rest.to_vec(),
        other => other.to_vec(),
    };
    rest.join(".")
}

/// The exported form of `model` with `masking` as its inference masks; `metadata` is stored
/// beside it (e.g. the scaler and the data config the CLI needs to read data for it).
pub fn export<B: Backend>(
    model: &DynamicModel<B>,
    masking: Masking,
    metadata: BTreeMap<String, String>,
) -> ExportedModel {
    let mut collect = Collect { path: Vec::new(), tensors: Tensors::new() };
    model.visit(&mut collect);
    ExportedModel { arch: model.arch.clone(), masking, tensors: collect.tensors, metadata }
}

/// A trainable model holding `exported`'s weights.
pub fn import<B: Backend>(exported: &ExportedModel, device: &B::Device) -> Result<DynamicModel<B>> {
    format::check_tensors(&exported.arch, &exported.tensors)
        .map_err(|e| Error::Checkpoint { path: Default::default(), detail: e.to_string() })?;
    let fresh = DynamicModel::new(&exported.arch, device);
    Ok(fresh.map(&mut Load { path: Vec::new(), tensors: &exported.tensors }))
}

/// `model` pruned once, structurally, to `target` (its architecture with fewer units per
/// prunable layer): each layer keeps the units `criterion` ranks first.
pub fn prune<B: Backend>(
    model: &DynamicModel<B>,
    target: &crate::model::Architecture,
    criterion: PruneCriterion,
    device: &B::Device,
) -> Result<DynamicModel<B>> {
    let exported = export(model, Masking::DENSE, BTreeMap::new());
    let kept = match criterion {
        PruneCriterion::L1 => prune::l1_selection(&exported, target).map_err(pruning_failed)?,
    };
    import(&prune::keep_units(&exported, target, &kept).map_err(pruning_failed)?, device)
}

/// The executor's refusal to score or cut a model, as a checkpoint error (the caller names the file).
fn pruning_failed(e: dyna_pruner_exec::ExecError) -> Error {
    Error::Checkpoint { path: Default::default(), detail: e.to_string() }
}

/// `model` with each unit gate ranking its layer's units by `criterion`, the same for every
/// sample: the gate's bias holds the units' standardized scores and its weights are zero, so at
/// any unit keep ratio the gates keep what static pruning by `criterion` would (a layer whose
/// units cannot be scored keeps its gate). Training then learns how samples differ.
pub fn rank_gates_by<B: Backend>(mut model: DynamicModel<B>, criterion: PruneCriterion) -> Result<DynamicModel<B>> {
    let exported = export(&model, Masking::DENSE, BTreeMap::new());
    let scores = match criterion {
        PruneCriterion::L1 => prune::unit_l1_norms(&exported).map_err(pruning_failed)?,
    };
    for (gate, scores) in model.unit_gates.iter_mut().zip(scores) {
        let Some(scores) = scores else { continue };
        let n = scores.len() as f64;
        let mean = scores.iter().sum::<f64>() / n;
        let std = (scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / n).sqrt();
        let bias: Vec<f32> = scores.iter().map(|s| if std > 0.0 { ((s - mean) / std) as f32 } else { 0.0 }).collect();
        let linear = &mut gate.linear;
        let device = linear.weight.device();
        linear.weight = linear.weight.clone().map(|w| w.zeros_like().require_grad());
        linear.bias = Some(Param::from_tensor(Tensor::from_floats(bias.as_slice(), &device)));
    }
    Ok(model)
}

/// The executor for `model` (in memory).
pub fn executor<B: Backend>(model: &DynamicModel<B>, masking: Masking) -> Exec {
    export(model, masking, BTreeMap::new()).executor().expect("an exported model matches its architecture")
}

/// Writes the executor file for `model`.
pub fn write<B: Backend>(
    path: &Path,
    model: &DynamicModel<B>,
    masking: Masking,
    metadata: BTreeMap<String, String>,
) -> Result<()> {
    format::save(path, &export(model, masking, metadata))
        .map_err(|e| Error::Checkpoint { path: path.to_path_buf(), detail: e.to_string() })
}

#[cfg(test)]
mod tests {
    //! The sparse executor against the masked-dense reference forward (the trainer's model).
    use super::*;
    use crate::method::{FixedMasks, MaskMode};
    use crate::model::Architecture;
    use crate::CpuBackend;
    use dyna_pruner_exec::{MaskPlan, SampleMasks, UnitExecution};
    use dyna_pruner_spec::{BackboneSpec, CnnSpec, ConvLstmSpec, DataScope, Frames, GeneratorSpec, KeepRange, VitSpec};
    use rand::rngs::StdRng;
    use rand::seq::index::sample;
    use rand::{Rng, SeedableRng};

    type B = CpuBackend;

    type RandomArch = fn(&mut StdRng) -> Architecture;

    fn random_frames(rng: &mut StdRng) -> Frames {
        Frames { t_in: rng.random_range(2..=4), t_out: rng.random_range(1..=3), channels: rng.random_range(1..=2) }
    }

    fn random_generator(rng: &mut StdRng) -> GeneratorSpec {
        // Half of them budget-conditioned, over a range holding the tests' keep ratios.
        let keep_range = rng.random_bool(0.5).then_some(KeepRange { lo: 0.3, hi: 0.6 });
        GeneratorSpec { width: 4, motion: rng.random_bool(0.5), keep_range, unit_keep_range: None }
    }

    fn random_cnn(rng: &mut StdRng, data_scope: DataScope) -> Architecture {
        let stride = rng.random_range(1..=2);
        let frames = random_frames(rng);
        let cnn = CnnSpec {
            hidden: rng.random_range(3..=8),
            units: rng.random_range(2..=9),
            blocks: rng.random_range(1..=3),
            stride,
            data_scope,
        };
        let patch = stride * rng.random_range(1..=3);
        Architecture::new(frames, patch, BackboneSpec::Cnn(cnn)).with_generator(random_generator(rng))
    }

    fn random_arch(rng: &mut StdRng) -> Architecture {
        random_cnn(rng, DataScope::Translator)
    }

    fn random_vit(rng: &mut StdRng) -> Architecture {
        let heads = rng.random_range(1..=3);
        let patch = rng.random_range(1..=3);
        let frames = random_frames(rng);
        let vit = VitSpec {
            dim: heads * rng.random_range(4..=6),
            mlp: rng.random_range(2..=9),
            layers: rng.random_range(1..=3),
            heads,
        };
        Architecture::new(frames, patch, BackboneSpec::Vit(vit)).with_generator(random_generator(rng))
    }

    /// Random masks: per sample some patches, per prunable layer some units.
    fn random_masks(rng: &mut StdRng, model: &DynamicModel<B>, batch: usize, patches: usize) -> Vec<SampleMasks> {
        let layers = model.arch.prunable_layers();
        (0..batch)
            .map(|_| {
                let kept = rng.random_range(1..=patches);
                let mut p = sample(rng, patches, kept).into_vec();
                p.sort_unstable();
                let units = layers
                    .iter()
                    .map(|l| {
                        let kept = rng.random_range(1..=l.units);
                        let mut u = sample(rng, l.units, kept).into_vec();
                        u.sort_unstable();
                        u
                    })
                    .collect();
                SampleMasks { patches: p, units }
            })
            .collect()
    }

    fn input(rng: &mut StdRng, arch: &Architecture, batch: usize, h: usize, w: usize) -> (Vec<f32>, Tensor<B, 5>) {
        let f = arch.frames;
        let n = batch * f.t_in * f.channels * h * w;
        let x: Vec<f32> = (0..n).map(|_| rng.random_range(0.0..1.0)).collect();
        let t = Tensor::from_data(TensorData::new(x.clone(), [batch, f.t_in, f.channels, h, w]), &Default::default());
        (x, t)
    }

    fn assert_close(got: &[f32], reference: &[f32], what: &str) {
        let scale = reference.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-3);
        let worst = got.iter().zip(reference).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst <= 1e-4 * scale, "{what}: max |diff| {worst} > 1e-4 x {scale}");
    }

    fn reference(
        model: &DynamicModel<B>,
        arch: &Architecture,
        x: Tensor<B, 5>,
        masks: &[SampleMasks],
        h: usize,
        w: usize,
    ) -> Vec<f32> {
        let grid = arch.patch_grid(h, w);
        let units: Vec<usize> = model.arch.layer_units();
        let mut fixed = FixedMasks::new(masks, grid, &units, arch.patch(), &Default::default());
        model.forward_masked(x, &mut fixed).into_data().to_vec().unwrap()
    }

    fn random_network_cnn(rng: &mut StdRng) -> Architecture {
        random_cnn(rng, DataScope::Network)
    }

    fn random_convlstm(rng: &mut StdRng) -> Architecture {
        let stride = [1, 2, 4][rng.random_range(0..3)];
        let patch = stride * rng.random_range(1..=2);
        let frames = random_frames(rng);
        let lstm = ConvLstmSpec {
            hidden: rng.random_range(3..=8),
            units: rng.random_range(2..=9),
            cells: rng.random_range(1..=3),
            stride,
        };
        Architecture::new(frames, patch, BackboneSpec::ConvLstm(lstm)).with_generator(random_generator(rng))
    }

    /// For one random model: random masks against the masked-dense reference, the executor's
    /// dense path against Burn's dense forward, all-ones masks equal to the dense path, and one
    /// patch with one unit per layer against the reference.
    fn check_against_reference(
        rng: &mut StdRng,
        arch: &Architecture,
        sides: std::ops::RangeInclusive<usize>,
        case: usize,
    ) {
        let model = DynamicModel::<B>::new(arch, &Default::default());
        let exec = executor(&model, Masking::DENSE);
        let (batch, h, w) = (rng.random_range(1..=3), rng.random_range(sides.clone()), rng.random_range(sides));
        let what = format!("case {case}: {arch:?} batch {batch} {h}x{w}");
        let (x, xt) = input(rng, arch, batch, h, w);
        let (hp, wp) = arch.patch_grid(h, w);
        let n = hp * wp;
        let masks = random_masks(rng, &model, batch, n);
        let out = exec.forward(&x, batch, h, w, MaskPlan::Given(&masks)).unwrap();
        assert_close(&out.prediction, &reference(&model, arch, xt.clone(), &masks, h, w), &what);
        let dense = exec.forward(&x, batch, h, w, MaskPlan::Dense).unwrap();
        let burn_dense: Vec<f32> = model.forward(xt.clone(), Masking::DENSE).prediction.into_data().to_vec().unwrap();
        assert_close(&dense.prediction, &burn_dense, &format!("{what}: dense"));
        let layer_units: Vec<usize> = model.arch.layer_units();
        let all = vec![
            SampleMasks {
                patches: (0..n).collect(),
                units: layer_units.iter().map(|&u| (0..u).collect()).collect()
            };
            batch
        ];
        let ones = exec.forward(&x, batch, h, w, MaskPlan::Given(&all)).unwrap();
        assert_eq!(ones.prediction, dense.prediction, "{what}: all-ones masks must equal the dense path");
        let one = vec![SampleMasks { patches: vec![n - 1], units: vec![vec![0]; layer_units.len()] }; batch];
        let out = exec.forward(&x, batch, h, w, MaskPlan::Given(&one)).unwrap();
        assert_close(&out.prediction, &reference(&model, arch, xt, &one, h, w), &format!("{what}: one"));
    }

    /// `cases` random models of one backbone (from `random`), each checked against the reference.
    fn check_random_models(seed: u64, random: RandomArch, sides: std::ops::RangeInclusive<usize>) {
        let mut rng = StdRng::seed_from_u64(seed);
        for case in 0..10 {
            let arch = random(&mut rng);
            check_against_reference(&mut rng, &arch, sides.clone(), case);
        }
    }

    #[test]
    fn executor_matches_the_masked_dense_reference_on_random_models_and_masks() {
        check_random_models(2026, random_arch, 5..=17);
    }

    #[test]
    fn network_scope_executor_matches_the_masked_dense_reference_on_random_models_and_masks() {
        check_random_models(2029, random_network_cnn, 5..=17);
    }

    #[test]
    fn network_scope_executor_predictions_and_macs_match_the_trainer() {
        let mut rng = StdRng::seed_from_u64(13);
        for case in 0..4 {
            let arch = random_network_cnn(&mut rng);
            let model = DynamicModel::<B>::new(&arch, &Default::default());
            // Whole patches: the trainer's MAC model scales the encoder and decoder by the
            // translator's kept fraction, which then equals the full resolution's.
            let (h, w) = (arch.patch() * rng.random_range(2..=5), arch.patch() * rng.random_range(2..=5));
            let (x, xt) = input(&mut rng, &arch, 2, h, w);
            let masking = Masking::top_k(MaskMode::Both, 0.5, 0.4);
            let out = executor(&model, masking).forward(&x, 2, h, w, MaskPlan::Dynamic).unwrap();
            let fwd = model.forward(xt, masking);
            let want: Vec<f32> = fwd.prediction.into_data().to_vec().unwrap();
            assert_close(&out.prediction, &want, &format!("case {case}: {arch:?} {h}x{w}"));
            let costs = crate::eval::sample_costs(&model.mac_model(h, w), &fwd.fractions, 2);
            for (got, c) in out.macs.iter().zip(&costs) {
                assert!((*got as f64 - c.macs).abs() <= 1e-6 * c.macs, "case {case}: {got} vs {}", c.macs);
            }
            let dense = model.mac_model(h, w).dense() as f64;
            assert!(costs.iter().all(|c| c.macs < 0.8 * dense), "case {case}: half the patches kept");
        }
    }

    /// `UnitExecution::Mask` (the batch's kept units computed, pruned ones zeroed) predicts what `Select`
    /// does, under given and under the model's own masks, with at least as many MACs.
    #[test]
    fn masked_unit_execution_predicts_as_unit_selection() {
        let mut rng = StdRng::seed_from_u64(2031);
        for case in 0..8 {
            let arch = if case % 2 == 0 { random_arch(&mut rng) } else { random_network_cnn(&mut rng) };
            let model = DynamicModel::<B>::new(&arch, &Default::default());
            let select = executor(&model, Masking::top_k(MaskMode::Both, 0.5, 0.5));
            let mut mask = select.clone();
            assert!(mask.set_unit_execution(UnitExecution::Mask));
            let (batch, h, w) = (rng.random_range(1..=3), rng.random_range(5..=17), rng.random_range(5..=17));
            let (x, _) = input(&mut rng, &arch, batch, h, w);
            let (hp, wp) = arch.patch_grid(h, w);
            let given = random_masks(&mut rng, &model, batch, hp * wp);
            for plan in [MaskPlan::Given(&given), MaskPlan::Dynamic] {
                let (a, b) =
                    (select.forward(&x, batch, h, w, plan).unwrap(), mask.forward(&x, batch, h, w, plan).unwrap());
                assert_close(&b.prediction, &a.prediction, &format!("case {case}: {arch:?}"));
                assert_eq!(a.masks, b.masks);
                assert!(a.macs.iter().zip(&b.macs).all(|(s, m)| m >= s), "case {case}: {:?} {:?}", a.macs, b.macs);
            }
        }
    }

    /// `UnitExecution::Mask` computes the union of the batch's kept units, not every unit: where
    /// all samples keep the same units it does the MACs of `Select`, and where one keeps them all
    /// every sample computes them all (and it predicts the same either way).
    #[test]
    fn issue_22_masked_units_compute_only_the_batch_union() {
        let mut rng = StdRng::seed_from_u64(2032);
        let arch = random_arch(&mut rng);
        let model = DynamicModel::<B>::new(&arch, &Default::default());
        let select = executor(&model, Masking::top_k(MaskMode::Both, 0.5, 0.5));
        let mut mask = select.clone();
        assert!(mask.set_unit_execution(UnitExecution::Mask));
        let (batch, h, w) = (3, 9, 11);
        let (x, _) = input(&mut rng, &arch, batch, h, w);
        let (hp, wp) = arch.patch_grid(h, w);
        let mut given = random_masks(&mut rng, &model, batch, hp * wp);
        let units = arch.prunable_layers().iter().map(|l| l.units).collect::<Vec<_>>();
        let both = |given: &[SampleMasks]| {
            let plan = MaskPlan::Given(given);
            (select.forward(&x, batch, h, w, plan).unwrap(), mask.forward(&x, batch, h, w, plan).unwrap())
        };
        // The same units in every sample: the first half of each layer's.
        given.iter_mut().for_each(|m| m.units = units.iter().map(|&n| (0..n.div_ceil(2)).collect()).collect());
        let (a, b) = both(&given);
        assert_close(&b.prediction, &a.prediction, "same units");
        assert_eq!(a.macs, b.macs, "the union is each sample's own units");
        // Sample 0 keeps every unit: the others then compute them all too.
        given[0].units = units.iter().map(|&n| (0..n).collect()).collect();
        let (a, b) = both(&given);
        assert_close(&b.prediction, &a.prediction, "every unit in sample 0");
        assert_eq!(b.macs[0], a.macs[0], "sample 0 keeps the whole union");
        assert!(b.macs[1] > a.macs[1], "sample 1 computes the union: {:?} {:?}", a.macs, b.macs);
    }

    #[test]
    fn vit_executor_matches_the_masked_dense_reference_on_random_models_and_masks() {
        check_random_models(2027, random_vit, 3..=13);
    }

    #[test]
    fn convlstm_executor_matches_the_masked_dense_reference_on_random_models_and_masks() {
        check_random_models(2028, random_convlstm, 3..=15);
    }

    #[test]
    fn all_ones_masks_equal_the_dense_forward_and_one_patch_one_unit_works() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut arch = random_arch(&mut rng);
        arch.model.patch = 4;
        let BackboneSpec::Cnn(cnn) = &mut arch.model.backbone else { unreachable!() };
        cnn.stride = 2;
        let (units, blocks) = (cnn.units, cnn.blocks);
        let model = DynamicModel::<B>::new(&arch, &Default::default());
        let exec = executor(&model, Masking::DENSE);
        let (batch, h, w) = (2, 13, 10);
        let (x, xt) = input(&mut rng, &arch, batch, h, w);
        let dense = exec.forward(&x, batch, h, w, MaskPlan::Dense).unwrap();
        let burn_dense: Vec<f32> = model.forward(xt.clone(), Masking::DENSE).prediction.into_data().to_vec().unwrap();
        assert_close(&dense.prediction, &burn_dense, "dense");
        let n = h.div_ceil(4) * w.div_ceil(4);
        let all = vec![SampleMasks { patches: (0..n).collect(), units: vec![(0..units).collect(); blocks] }; batch];
        let ones = exec.forward(&x, batch, h, w, MaskPlan::Given(&all)).unwrap();
        assert_eq!(ones.prediction, dense.prediction, "all-ones masks must reproduce the dense path exactly");
        assert_eq!(ones.macs, dense.macs);
        let one = vec![SampleMasks { patches: vec![n - 1], units: vec![vec![0]; blocks] }; batch];
        let out = exec.forward(&x, batch, h, w, MaskPlan::Given(&one)).unwrap();
        assert_close(&out.prediction, &reference(&model, &arch, xt, &one, h, w), "one patch, one unit");
        assert!(out.macs[0] < dense.macs[0]);
    }

    #[test]
    fn executor_masks_and_macs_match_the_trainer() {
        let mut rng = StdRng::seed_from_u64(11);
        // Cases 0-5: per-sample top-k; 6-8: a threshold at the batch's median S (counts differ
        // per sample); 9-11: a threshold above every S (no patch kept at all).
        for case in 0..12 {
            let arch = match case % 3 {
                0 => random_arch(&mut rng),
                1 => random_vit(&mut rng),
                _ => random_convlstm(&mut rng),
            };
            let model = DynamicModel::<B>::new(&arch, &Default::default());
            let (batch, h, w) = (3, rng.random_range(6..=16), rng.random_range(6..=16));
            let (x, xt) = input(&mut rng, &arch, batch, h, w);
            let mut masking = Masking::top_k(MaskMode::Both, 0.5, 0.4);
            if case >= 6 {
                // Midway between two neighbouring scores: the executor's S differs from the
                // trainer's in the last bits, which must not move a patch across the threshold.
                let mut s = model.mask_generator.forward(xt.clone(), &masking).into_data().to_vec::<f32>().unwrap();
                s.sort_by(|a, b| a.total_cmp(b));
                let median = (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0;
                masking.data_threshold = Some(if case < 9 { median } else { 1.5 });
            }
            let exec = executor(&model, masking);
            let out = exec.forward(&x, batch, h, w, MaskPlan::Dynamic).unwrap();
            let fwd = model.forward(xt, masking);
            // Masks: the trainer's hard DataMask and unit masks as index lists.
            let data: Vec<f32> = fwd.data_mask.clone().unwrap().into_data().to_vec().unwrap();
            let n = data.len() / batch;
            for (b, m) in out.masks.iter().enumerate() {
                let patches: Vec<usize> = (0..n).filter(|&i| data[b * n + i] == 1.0).collect();
                assert_eq!(m.patches, patches, "case {case}: sample {b} patches");
                for (l, f) in fwd.fractions.iter().enumerate() {
                    let u: Vec<f32> = f.unit_mask.clone().unwrap().into_data().to_vec().unwrap();
                    let all = u.len() / batch;
                    let units: Vec<usize> = (0..all).filter(|&i| u[b * all + i] == 1.0).collect();
                    assert_eq!(m.units[l], units, "case {case}: sample {b} layer {l} units");
                }
            }
            let want: Vec<f32> = fwd.prediction.into_data().to_vec().unwrap();
            assert_close(&out.prediction, &want, &format!("case {case}"));
            // MACs executed equal the analytical count from the hard fractions.
            let costs = crate::eval::sample_costs(&model.mac_model(h, w), &fwd.fractions, batch);
            for (got, c) in out.macs.iter().zip(&costs) {
                assert!((*got as f64 - c.macs).abs() <= 1e-6 * c.macs, "case {case}: {got} vs {}", c.macs);
            }
        }
    }

    /// A budget-conditioned model at keep 1 (every patch and unit) is its dense forward, in the
    /// trainer and in the executor; its importance map moves with the keep ratios it reads.
    #[test]
    fn issue_26_keep_one_is_the_dense_forward_of_the_same_weights() {
        let mut rng = StdRng::seed_from_u64(26);
        let range = KeepRange { lo: 0.25, hi: 1.0 };
        for make in [random_arch as RandomArch, random_vit, random_convlstm] {
            let mut arch = make(&mut rng);
            arch.model.generator.keep_range = Some(range);
            let model = DynamicModel::<B>::new(&arch, &Default::default());
            let (batch, h, w) = (2, 12, 10);
            let (x, xt) = input(&mut rng, &arch, batch, h, w);
            let ranges = arch.model.generator.keep_ranges().unwrap();
            let all = Masking::top_k(MaskMode::Both, 0.5, 0.5).with_keep(ranges, 1.0, 1.0).unwrap();
            let dense: Vec<f32> = model.forward(xt.clone(), Masking::DENSE).prediction.into_data().to_vec().unwrap();
            let kept: Vec<f32> = model.forward(xt.clone(), all).prediction.into_data().to_vec().unwrap();
            assert_eq!(kept, dense, "{:?}", arch.kind());
            let mut exec = executor(&model, Masking::top_k(MaskMode::Both, 0.25, 0.25));
            let tight = exec.importance(&x[..x.len() / batch], h, w);
            exec.set_masking(all);
            assert_ne!(exec.importance(&x[..x.len() / batch], h, w), tight, "S reads the keep ratios");
            let out = exec.forward(&x, batch, h, w, MaskPlan::Dynamic).unwrap();
            let plain = exec.forward(&x, batch, h, w, MaskPlan::Dense).unwrap();
            assert_close(&out.prediction, &plain.prediction, "executor at keep 1");
            assert_close(&out.prediction, &dense, "executor against the trainer");
        }
    }

    #[test]
    fn the_exported_file_loads_back_as_the_same_executor_for_every_backbone() {
        let mut rng = StdRng::seed_from_u64(5);
        let dir = std::env::temp_dir().join(format!("dyna-pruner-export-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let makers: [RandomArch; 3] = [random_arch, random_vit, random_convlstm];
        for (i, random) in makers.into_iter().enumerate() {
            let arch = random(&mut rng);
            let model = DynamicModel::<B>::new(&arch, &Default::default());
            let masking = Masking::top_k(MaskMode::Both, 0.5, 0.5);
            let path = dir.join(format!("model{i}.safetensors"));
            write(&path, &model, masking, BTreeMap::new()).unwrap();
            let file = dyna_pruner_exec::format::load(&path).unwrap();
            assert_eq!(file.arch, arch);
            assert_eq!(file.masking, masking);
            let loaded = file.executor().unwrap();
            let exec = executor(&model, masking);
            assert_eq!(std::mem::discriminant(&loaded), std::mem::discriminant(&exec));
            let (x, _) = input(&mut rng, &arch, 2, 9, 11);
            let want = exec.forward(&x, 2, 9, 11, MaskPlan::Dynamic).unwrap();
            let got = loaded.forward(&x, 2, 9, 11, MaskPlan::Dynamic).unwrap();
            assert_eq!(got.prediction, want.prediction, "{arch:?}");
            assert_eq!(got.masks, want.masks);
        }
    }

    /// Issue 21: static pruning through the executor's cut and back into the trainer keeps
    /// the L1-ranked units, and the smaller model predicts as the original with only those
    /// units kept (every patch kept).
    #[test]
    fn static_pruning_predicts_as_the_original_with_the_l1_units_masked() {
        let mut rng = StdRng::seed_from_u64(17);
        let makers: [RandomArch; 3] = [random_arch, random_vit, random_convlstm];
        for random in makers {
            let arch = random(&mut rng);
            let model = DynamicModel::<B>::new(&arch, &Default::default());
            let mut target = arch.clone();
            match &mut target.model.backbone {
                BackboneSpec::Cnn(s) => s.units = s.units.div_ceil(2),
                BackboneSpec::Vit(s) => s.mlp = s.mlp.div_ceil(2),
                BackboneSpec::ConvLstm(s) => s.units = s.units.div_ceil(2),
            }
            let pruned = prune(&model, &target, PruneCriterion::L1, &Default::default()).unwrap();
            assert_eq!(pruned.arch, target);
            let kept = dyna_pruner_exec::prune::l1_selection(&export(&model, Masking::DENSE, BTreeMap::new()), &target)
                .unwrap();
            let (batch, h, w) = (2, 9, 11);
            let (_, xt) = input(&mut rng, &arch, batch, h, w);
            let (ph, pw) = arch.patch_grid(h, w);
            let masks = vec![SampleMasks { patches: (0..ph * pw).collect(), units: kept }; batch];
            let want = reference(&model, &arch, xt.clone(), &masks, h, w);
            let got: Vec<f32> = pruned.forward(xt, Masking::DENSE).prediction.into_data().to_vec().unwrap();
            assert_close(&got, &want, &format!("{arch:?}"));
        }
    }

    /// Issue 21: gates ranked by the L1 criterion keep, in every sample and at any unit keep
    /// ratio, the units static pruning by L1 keeps.
    #[test]
    fn issue_21_gates_ranked_by_l1_keep_the_statically_pruned_units() {
        let mut rng = StdRng::seed_from_u64(21);
        let makers: [RandomArch; 3] = [random_arch, random_vit, random_convlstm];
        for random in makers {
            let arch = random(&mut rng);
            let model = DynamicModel::<B>::new(&arch, &Default::default());
            let norms =
                dyna_pruner_exec::prune::unit_l1_norms(&export(&model, Masking::DENSE, BTreeMap::new())).unwrap();
            let model = rank_gates_by(model, PruneCriterion::L1).unwrap();
            let (batch, h, w) = (3, 9, 11);
            let (_, xt) = input(&mut rng, &arch, batch, h, w);
            for unit_keep in [0.4f32, 0.6] {
                let fwd = model.forward(xt.clone(), Masking::top_k(MaskMode::Model, 1.0, unit_keep));
                let mut scored = 0;
                for (f, norms) in fwd.fractions.iter().zip(&norms) {
                    let Some(norms) = norms else { continue };
                    scored += 1;
                    let want =
                        dyna_pruner_exec::prune::largest(norms, dyna_pruner_spec::kept_count(unit_keep, norms.len()));
                    let u: Vec<f32> = f.unit_mask.clone().unwrap().into_data().to_vec().unwrap();
                    for sample in u.chunks(norms.len()) {
                        let got: Vec<usize> = (0..norms.len()).filter(|&i| sample[i] == 1.0).collect();
                        assert_eq!(got, want, "{arch:?} at {unit_keep}");
                    }
                }
                assert!(scored > 0, "{arch:?}: no layer was scored");
            }
        }
    }

    /// Writes the exported models the executor crate's tests load
    /// (`crates/dyna-pruner-exec/tests/fixtures/`): one small random model per backbone, an
    /// input batch, and this crate's prediction and the masks for it. Run again after a change
    /// of the file format: `cargo test -p dyna-pruner write_exec_fixtures -- --ignored`.
    #[test]
    #[ignore = "writes the executor's test fixtures"]
    fn write_exec_fixtures() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dyna-pruner-exec/tests/fixtures");
        std::fs::create_dir_all(&dir).unwrap();
        let mut rng = StdRng::seed_from_u64(2026);
        B::seed(&Default::default(), 2026);
        let makers: [RandomArch; 3] = [random_arch, random_vit, random_convlstm];
        for (name, random) in ["cnn", "vit", "convlstm"].into_iter().zip(makers) {
            let arch = random(&mut rng);
            let model = DynamicModel::<B>::new(&arch, &Default::default());
            let masking = Masking::top_k(MaskMode::Both, 0.5, 0.5);
            let (batch, h, w) = (2, 9, 11);
            let (x, xt) = input(&mut rng, &arch, batch, h, w);
            let prediction: Vec<f32> = model.forward(xt, masking).prediction.into_data().to_vec().unwrap();
            let masks = executor(&model, masking).forward(&x, batch, h, w, MaskPlan::Dynamic).unwrap().masks;
            write(&dir.join(format!("{name}.safetensors")), &model, masking, BTreeMap::new()).unwrap();
            let io = serde_json::json!({ "batch": batch, "height": h, "width": w, "input": x,
                "prediction": prediction, "masks": masks });
            std::fs::write(dir.join(format!("{name}.json")), serde_json::to_string(&io).unwrap()).unwrap();
        }
    }
}
