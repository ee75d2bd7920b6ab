//! The dynamic SimVP-style CNN (see the trainer's `backbones/cnn.rs`) on plain kernels:
//! dense encoder and decoder, translator blocks computed only at kept positions with kept units.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::kernels::{depth_to_space_add, run_per_sample, transpose_into, Activation, Conv, Positions};
use crate::masks::{gate_units, kept_positions, plan_masks, MaskGenerator, UnitGate};
use crate::ExecError;

/// The architecture and masking of an exported CNN (mirrors the trainer's `Architecture`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CnnSpec {
    pub t_in: usize,
    pub t_out: usize,
    pub channels: usize,
    pub hidden: usize,
    pub units: usize,
    pub blocks: usize,
    pub stride: usize,
    pub patch: usize,
    /// The mask generator's width and the inference masking.
    #[serde(flatten)]
    pub masking: MaskSpec,
}

/// The mask generator's width and the masks an exported model runs with (the same in every spec;
/// flattened into it, so the file's JSON keeps these as top-level fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaskSpec {
    pub generator_width: usize,
    /// The generator also reads the signed mean temporal difference per patch.
    #[serde(default)]
    pub generator_motion: bool,
    /// Whether the DataMask / ModelMask are active, and their keep ratios.
    pub data_mask: bool,
    pub model_mask: bool,
    pub data_keep: f32,
    pub unit_keep: f32,
}

impl MaskSpec {
    /// The DataMask's keep ratio when it is active.
    pub fn data_keep(&self) -> Option<f32> {
        self.data_mask.then_some(self.data_keep)
    }

    /// The ModelMask's keep ratio when it is active.
    pub fn unit_keep(&self) -> Option<f32> {
        self.model_mask.then_some(self.unit_keep)
    }
}

/// The kept patches and units of one sample.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleMasks {
    /// Kept patch indices `py * wp + px`, ascending.
    pub patches: Vec<usize>,
    /// Kept unit indices of each prunable layer, ascending.
    pub units: Vec<Vec<usize>>,
}

/// How to mask a forward pass.
#[derive(Debug, Clone, Copy)]
pub enum MaskPlan<'a> {
    /// The dense backbone: no masks, no mask generator.
    Dense,
    /// The model's own masks from its mask generator and gates (its spec's modes and ratios).
    Dynamic,
    /// Masks given per sample (e.g. from the training framework, to compare).
    Given(&'a [SampleMasks]),
}

/// The result of a forward pass.
#[derive(Debug, Clone)]
pub struct Output {
    /// `[batch, t_out, channels, h, w]`.
    pub prediction: Vec<f32>,
    /// Per-sample masks (empty for `MaskPlan::Dense`).
    pub masks: Vec<SampleMasks>,
    /// Per-sample MACs actually executed.
    pub macs: Vec<u64>,
}

/// A CNN ready to run.
#[derive(Debug, Clone)]
pub struct CnnExec {
    pub spec: CnnSpec,
    pub(crate) enc_in: Conv,
    pub(crate) enc_down: Conv,
    pub(crate) blocks: Vec<(Conv, Conv)>,
    /// Transposed conv (kernel = stride) as a 1x1 conv to `stride^2 * hidden` outputs.
    pub(crate) dec_up: Option<Conv>,
    pub(crate) dec_out: Conv,
    pub(crate) generator: MaskGenerator,
    pub(crate) gates: Vec<UnitGate>,
}

/// Runs one conv over every position of each sample's map.
fn dense_layer(conv: &Conv, inputs: &[Vec<f32>], h: usize, w: usize, act: Activation) -> Vec<Vec<f32>> {
    let (ho, wo) = conv.out_size(h, w);
    run_per_sample(inputs, (h, w), |_| conv, |_| Positions::all(ho, wo), act)
}

impl CnnExec {
    /// Feature-map size of the translator.
    fn low(&self, h: usize, w: usize) -> (usize, usize) {
        self.enc_down.out_size(h, w)
    }

    /// Runs a batch `x` (`[batch, t_in, channels, h, w]`, scaled) under `plan`.
    pub fn forward(
        &self,
        x: &[f32],
        batch: usize,
        h: usize,
        w: usize,
        plan: MaskPlan<'_>,
    ) -> Result<Output, ExecError> {
        let s = &self.spec;
        let (t, c) = (s.t_in, s.channels);
        let per_sample = crate::check_input(x, batch, [t, c, h, w], plan, s.blocks)?;
        // Frames as channels, channels last.
        let inputs: Vec<Vec<f32>> = (0..batch)
            .map(|b| {
                let mut v = vec![0.0; per_sample];
                transpose_into(&x[b * per_sample..(b + 1) * per_sample], t * c, h * w, &mut v);
                v
            })
            .collect();
        let skip = dense_layer(&self.enc_in, &inputs, h, w, Activation::Gelu);
        let (h2, w2) = self.low(h, w);
        let mut z = dense_layer(&self.enc_down, &skip, h, w, Activation::Gelu);
        let mut macs = vec![self.fixed_macs(h, w); batch];

        // The DataMask and the importance map S per sample.
        let cell = s.patch / s.stride;
        let wp = w.div_ceil(s.patch);
        let keep = s.masking.data_keep();
        let (mut masks, importance) =
            plan_masks(plan, &self.generator, x, (batch, per_sample), (t, h, w), keep, &mut macs);
        let positions: Vec<Option<Vec<u32>>> =
            masks.iter().map(|m| kept_positions(&m.patches, wp, cell, (h2, w2))).collect();

        // Each sample's hidden map of the current block, reused across blocks (see sparse_block).
        let mut hidden_maps = vec![Vec::new(); batch];
        for (l, (conv1, conv2)) in self.blocks.iter().enumerate() {
            if masks.is_empty() {
                let hidden = dense_layer(conv1, &z, h2, w2, Activation::Gelu);
                let update = dense_layer(conv2, &hidden, h2, w2, Activation::None);
                for (zb, ub) in z.iter_mut().zip(&update) {
                    zb.iter_mut().zip(ub).for_each(|(a, b)| *a += b);
                }
                for m in &mut macs {
                    *m += (h2 * w2) as u64 * (conv1.macs_per_position() + conv2.macs_per_position());
                }
                continue;
            }
            if matches!(plan, MaskPlan::Dynamic) {
                let gate = &self.gates[l];
                let keep = s.masking.unit_keep();
                let units = gate_units(gate, &z, &importance, (h2, w2, cell, wp), keep);
                for ((m, u), mc) in masks.iter_mut().zip(units).zip(macs.iter_mut()) {
                    if s.masking.model_mask {
                        *mc += gate.macs(h2 * w2);
                    }
                    m.units.push(u);
                }
            }
            self.sparse_block(l, conv1, conv2, &mut z, &masks, &positions, &mut hidden_maps, (h2, w2), &mut macs);
        }

        // The decoder map: the skip map plus the upsampled translator output.
        let mut d = skip;
        match &self.dec_up {
            Some(up) => {
                for (db, rows) in d.iter_mut().zip(dense_layer(up, &z, h2, w2, Activation::Gelu)) {
                    depth_to_space_add(&rows, (h2, w2), s.stride, (h, w), db);
                }
            }
            None => {
                for (db, zb) in d.iter_mut().zip(&z) {
                    db.iter_mut().zip(zb).for_each(|(a, b)| *a += b);
                }
            }
        }
        let delta = dense_layer(&self.dec_out, &d, h, w, Activation::None);
        let out_c = s.t_out * c;
        let mut prediction = vec![0.0; batch * out_c * h * w];
        for b in 0..batch {
            let last = &x[b * per_sample + (t - 1) * c * h * w..b * per_sample + t * c * h * w];
            let dst = &mut prediction[b * out_c * h * w..(b + 1) * out_c * h * w];
            transpose_into(&delta[b], h * w, out_c, dst);
            for frame in dst.chunks_exact_mut(c * h * w) {
                frame.iter_mut().zip(last).for_each(|(a, l)| *a += l);
            }
        }
        Ok(Output { prediction, masks, macs })
    }

    /// One masked residual block: conv1 with the kept units at the kept positions, GELU, conv2
    /// reading that (zero elsewhere) at the kept positions, added into `z`.
    #[allow(clippy::too_many_arguments)]
    fn sparse_block(
        &self,
        l: usize,
        conv1: &Conv,
        conv2: &Conv,
        z: &mut [Vec<f32>],
        masks: &[SampleMasks],
        positions: &[Option<Vec<u32>>],
        hidden_maps: &mut [Vec<f32>],
        (h2, w2): (usize, usize),
        macs: &mut [u64],
    ) {
        let all_units = self.spec.units;
        // Weights restricted to each sample's kept units (borrowed when it keeps them all).
        let selected: Vec<(Cow<'_, Conv>, Cow<'_, Conv>)> = masks
            .iter()
            .map(|m| {
                let u = &m.units[l];
                if u.len() == all_units {
                    (Cow::Borrowed(conv1), Cow::Borrowed(conv2))
                } else {
                    (Cow::Owned(conv1.select_outputs(u)), Cow::Owned(conv2.select_inputs(u)))
                }
            })
            .collect();
        let pos_of = |b: usize| match &positions[b] {
            Some(list) => Positions::List(list),
            None => Positions::all(h2, w2),
        };
        let hidden = run_per_sample(z, (h2, w2), |b| &selected[b].0, pos_of, Activation::Gelu);
        // Hidden maps: zero at pruned positions, so conv2 reads no pruned work. The kept
        // positions are the same in every block, so a map is zeroed only when first used (or
        // when its unit count changes) and later blocks overwrite just the kept positions.
        for (b, rows) in hidden.into_iter().enumerate() {
            match &positions[b] {
                None => hidden_maps[b] = rows,
                Some(list) => {
                    let k = selected[b].0.cout;
                    let map = &mut hidden_maps[b];
                    if map.len() != h2 * w2 * k {
                        map.clear();
                        map.resize(h2 * w2 * k, 0.0);
                    }
                    for (i, &p) in list.iter().enumerate() {
                        map[p as usize * k..(p as usize + 1) * k].copy_from_slice(&rows[i * k..(i + 1) * k]);
                    }
                }
            }
        }
        let update = run_per_sample(hidden_maps, (h2, w2), |b| &selected[b].1, pos_of, Activation::None);
        let hid = self.spec.hidden;
        for b in 0..z.len() {
            let n = pos_of(b).len() as u64;
            macs[b] += n * (selected[b].0.macs_per_position() + selected[b].1.macs_per_position());
            match &positions[b] {
                None => z[b].iter_mut().zip(&update[b]).for_each(|(a, u)| *a += u),
                Some(list) => {
                    for (i, &p) in list.iter().enumerate() {
                        let dst = &mut z[b][p as usize * hid..(p as usize + 1) * hid];
                        dst.iter_mut().zip(&update[b][i * hid..(i + 1) * hid]).for_each(|(a, u)| *a += u);
                    }
                }
            }
        }
    }

    /// MACs of the layers no mask touches, as the trainer's `Cnn::macs` counts them.
    pub fn fixed_macs(&self, h: usize, w: usize) -> u64 {
        let (h2, w2) = self.low(h, w);
        let up = self.dec_up.as_ref().map_or(0, |u| (h2 * w2) as u64 * u.macs_per_position());
        (h * w) as u64 * (self.enc_in.macs_per_position() + self.dec_out.macs_per_position())
            + (h2 * w2) as u64 * self.enc_down.macs_per_position()
            + up
    }
}
