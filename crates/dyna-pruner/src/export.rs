//! Export of a trained model to the sparse executor (`dyna-pruner-exec`): the weights in the
//! framework's layouts plus a spec, in memory or as a safetensors file.

use std::path::Path;

use burn::module::Param;
use burn::prelude::*;
use dyna_pruner_exec::format::Tensors;
use dyna_pruner_exec::{CnnExec, CnnSpec};

use crate::backbones::Backbone;
use crate::error::{Error, Result};
use crate::method::Masking;
use crate::model::{Architecture, DynamicModel};

fn put<B: Backend, const D: usize>(t: &mut Tensors, name: &str, p: &Param<Tensor<B, D>>) {
    let v = p.val();
    let shape = v.dims().to_vec();
    t.insert(name.to_string(), (shape, v.into_data().convert::<f32>().to_vec().expect("f32 weights")));
}

fn conv<B: Backend>(t: &mut Tensors, name: &str, c: &burn::nn::conv::Conv2d<B>) {
    put(t, &format!("{name}.weight"), &c.weight);
    put(t, &format!("{name}.bias"), c.bias.as_ref().expect("convs have a bias"));
}

/// The executor's spec and tensors of `model` with `masking` as its inference masks.
pub fn export<B: Backend>(model: &DynamicModel<B>, arch: &Architecture, masking: Masking) -> (CnnSpec, Tensors) {
    let mut t = Tensors::new();
    let Backbone::Cnn(cnn) = &model.backbone;
    conv(&mut t, "enc_in", &cnn.enc_in);
    conv(&mut t, "enc_down", &cnn.enc_down);
    for (l, block) in cnn.blocks.iter().enumerate() {
        conv(&mut t, &format!("blocks.{l}.conv1"), &block.conv1);
        conv(&mut t, &format!("blocks.{l}.conv2"), &block.conv2);
    }
    if let Some(up) = &cnn.dec_up {
        put(&mut t, "dec_up.weight", &up.weight);
        put(&mut t, "dec_up.bias", up.bias.as_ref().expect("bias"));
    }
    conv(&mut t, "dec_out", &cnn.dec_out);
    let g = &model.mask_generator;
    conv(&mut t, "generator.conv1", &g.conv1);
    conv(&mut t, "generator.conv2", &g.conv2);
    conv(&mut t, "generator.head", &g.head);
    for (l, gate) in model.unit_gates.iter().enumerate() {
        put(&mut t, &format!("gates.{l}.weight"), &gate.linear.weight);
        put(&mut t, &format!("gates.{l}.bias"), gate.linear.bias.as_ref().expect("bias"));
    }
    let spec = CnnSpec {
        t_in: arch.t_in,
        t_out: arch.t_out,
        channels: arch.channels,
        hidden: arch.hidden,
        units: arch.units,
        blocks: arch.blocks,
        stride: arch.stride,
        patch: arch.patch,
        generator_width: arch.generator_width,
        data_mask: masking.mode.data(),
        model_mask: masking.mode.model(),
        data_keep: masking.data_keep,
        unit_keep: masking.unit_keep,
    };
    (spec, t)
}

/// The executor for `model` (in memory).
pub fn executor<B: Backend>(model: &DynamicModel<B>, arch: &Architecture, masking: Masking) -> CnnExec {
    let (spec, tensors) = export(model, arch, masking);
    dyna_pruner_exec::format::from_tensors(spec, &tensors).expect("exported tensors match their spec")
}

/// Writes the executor file for `model`.
pub fn write<B: Backend>(path: &Path, model: &DynamicModel<B>, arch: &Architecture, masking: Masking) -> Result<()> {
    let (spec, tensors) = export(model, arch, masking);
    dyna_pruner_exec::format::save(path, &spec, &tensors)
        .map_err(|e| Error::Checkpoint { path: path.to_path_buf(), detail: e.to_string() })
}

#[cfg(test)]
mod tests {
    //! The sparse executor against the masked-dense reference forward (the trainer's model).
    use super::*;
    use crate::backbones::BackboneKind;
    use crate::method::{FixedMasks, MaskMode};
    use crate::CpuBackend;
    use dyna_pruner_exec::{MaskPlan, SampleMasks};
    use rand::rngs::StdRng;
    use rand::seq::index::sample;
    use rand::{Rng, SeedableRng};

    type B = CpuBackend;

    fn random_arch(rng: &mut StdRng) -> Architecture {
        let stride = rng.random_range(1..=2);
        Architecture {
            backbone: BackboneKind::Cnn,
            t_in: rng.random_range(2..=4),
            t_out: rng.random_range(1..=3),
            channels: rng.random_range(1..=2),
            hidden: rng.random_range(3..=8),
            units: rng.random_range(2..=9),
            blocks: rng.random_range(1..=3),
            stride,
            patch: stride * rng.random_range(1..=3),
            generator_width: 4,
        }
    }

    fn input(rng: &mut StdRng, arch: &Architecture, batch: usize, h: usize, w: usize) -> (Vec<f32>, Tensor<B, 5>) {
        let n = batch * arch.t_in * arch.channels * h * w;
        let x: Vec<f32> = (0..n).map(|_| rng.random_range(0.0..1.0)).collect();
        let t =
            Tensor::from_data(TensorData::new(x.clone(), [batch, arch.t_in, arch.channels, h, w]), &Default::default());
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
        let grid = (h.div_ceil(arch.patch), w.div_ceil(arch.patch));
        let mut fixed = FixedMasks::new(masks, grid, arch.units, arch.patch, &Default::default());
        model.forward_masked(x, &mut fixed).into_data().to_vec().unwrap()
    }

    #[test]
    fn executor_matches_the_masked_dense_reference_on_random_models_and_masks() {
        let mut rng = StdRng::seed_from_u64(2026);
        for case in 0..12 {
            let arch = random_arch(&mut rng);
            let model = arch.init::<B>(&Default::default());
            let exec = executor(&model, &arch, Masking::DENSE);
            let (batch, h, w) = (rng.random_range(1..=3), rng.random_range(5..=17), rng.random_range(5..=17));
            let (x, xt) = input(&mut rng, &arch, batch, h, w);
            let n = h.div_ceil(arch.patch) * w.div_ceil(arch.patch);
            let masks: Vec<SampleMasks> = (0..batch)
                .map(|_| {
                    let kept = rng.random_range(1..=n);
                    let mut patches = sample(&mut rng, n, kept).into_vec();
                    patches.sort_unstable();
                    let units = (0..arch.blocks)
                        .map(|_| {
                            let kept = rng.random_range(1..=arch.units);
                            let mut u = sample(&mut rng, arch.units, kept).into_vec();
                            u.sort_unstable();
                            u
                        })
                        .collect();
                    SampleMasks { patches, units }
                })
                .collect();
            let out = exec.forward(&x, batch, h, w, MaskPlan::Given(&masks)).unwrap();
            let want = reference(&model, &arch, xt, &masks, h, w);
            assert_close(&out.prediction, &want, &format!("case {case}: {arch:?} batch {batch} {h}x{w}"));
        }
    }

    #[test]
    fn all_ones_masks_equal_the_dense_forward_and_one_patch_one_unit_works() {
        let mut rng = StdRng::seed_from_u64(7);
        let arch = Architecture { stride: 2, patch: 4, ..random_arch(&mut rng) };
        let model = arch.init::<B>(&Default::default());
        let exec = executor(&model, &arch, Masking::DENSE);
        let (batch, h, w) = (2, 13, 10);
        let (x, xt) = input(&mut rng, &arch, batch, h, w);
        let dense = exec.forward(&x, batch, h, w, MaskPlan::Dense).unwrap();
        let burn_dense: Vec<f32> = model.forward(xt.clone(), Masking::DENSE).prediction.into_data().to_vec().unwrap();
        assert_close(&dense.prediction, &burn_dense, "dense");
        let n = h.div_ceil(4) * w.div_ceil(4);
        let all =
            vec![SampleMasks { patches: (0..n).collect(), units: vec![(0..arch.units).collect(); arch.blocks] }; batch];
        let ones = exec.forward(&x, batch, h, w, MaskPlan::Given(&all)).unwrap();
        assert_eq!(ones.prediction, dense.prediction, "all-ones masks must reproduce the dense path exactly");
        assert_eq!(ones.macs, dense.macs);
        let one = vec![SampleMasks { patches: vec![n - 1], units: vec![vec![0]; arch.blocks] }; batch];
        let out = exec.forward(&x, batch, h, w, MaskPlan::Given(&one)).unwrap();
        assert_close(&out.prediction, &reference(&model, &arch, xt, &one, h, w), "one patch, one unit");
        assert!(out.macs[0] < dense.macs[0]);
    }

    #[test]
    fn executor_masks_and_macs_match_the_trainer() {
        let mut rng = StdRng::seed_from_u64(11);
        for case in 0..4 {
            let arch = random_arch(&mut rng);
            let model = arch.init::<B>(&Default::default());
            let masking = Masking { mode: MaskMode::Both, data_keep: 0.5, unit_keep: 0.4 };
            let exec = executor(&model, &arch, masking);
            let (batch, h, w) = (3, rng.random_range(6..=16), rng.random_range(6..=16));
            let (x, xt) = input(&mut rng, &arch, batch, h, w);
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
                    let units: Vec<usize> = (0..arch.units).filter(|&i| u[b * arch.units + i] == 1.0).collect();
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
}
