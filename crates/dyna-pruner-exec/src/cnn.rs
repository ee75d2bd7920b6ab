//! The dynamic SimVP-style CNN (see the trainer's `backbones/cnn.rs`) on plain kernels:
//! translator blocks computed only at kept positions with kept units; the encoder and decoder
//! dense, or (`DataScope::Network`) at the kept positions too, with pruned patches predicting
//! their last input frame.

use std::borrow::Cow;

use dyna_pruner_spec::{Architecture, CnnSpec, DataScope, Masking};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::kernels::{
    add_upsampled, run_jobs_into_maps, run_per_sample, transpose_into, Activation, Conv, Job, Positions,
};
use crate::masks::{
    gate_units, importance_mass, kept_positions, plan_masks, pool_by_patch, sum_vectors, MaskGenerator, Pooled,
    UnitGate,
};
use crate::plan::{MaskPlan, Output, SampleMasks};
use crate::pool::{map_buffer, recycle};
use crate::ExecError;

/// The unit gates' pooled translator map per sample (`masks::Pooled`), kept up to date without
/// re-reading the whole map: a block changes the map only at the kept positions, so the sum over
/// the other positions is pooled once and each update re-reads only the kept rows.
struct GateInput<'a> {
    pooled: Vec<Pooled>,
    /// Per sample: the pooled sum over the positions no block changes (all of S's mass).
    fixed: Vec<Pooled>,
    importance: &'a [Vec<f32>],
    /// Per sample with kept positions: S at each of them, in their order (looked up once: the
    /// lookup's divisions cost more than the pooling itself).
    kept_importance: Vec<Vec<f32>>,
    /// The map's `(h2, w2)`, the feature pixels per patch side and the patches per row.
    grid: (usize, usize, usize, usize),
    channels: usize,
}

impl<'a> GateInput<'a> {
    fn new(
        z: &[Vec<f32>],
        channels: usize,
        importance: &'a [Vec<f32>],
        grid: (usize, usize, usize, usize),
        patches: &[SampleMasks],
        positions: &[Option<Vec<u32>>],
    ) -> Self {
        let (_, w2, cell, wp) = grid;
        let fixed = (0..z.len())
            .map(|b| {
                let weighted = match &positions[b] {
                    // S of the kept patches set to zero: the sum over the rest.
                    Some(_) => {
                        let mut rest = importance[b].clone();
                        patches[b].patches.iter().for_each(|&p| rest[p] = 0.0);
                        pool_by_patch(&z[b], channels, grid, &rest).weighted
                    }
                    None => vec![0.0; channels],
                };
                Pooled { weighted, mass: importance_mass(grid, &importance[b]) }
            })
            .collect();
        let kept_importance = (importance.iter().zip(positions))
            .map(|(sc, list)| {
                let list = list.as_deref().unwrap_or_default();
                list.iter().map(|&p| sc[(p as usize / w2 / cell) * wp + (p as usize % w2) / cell]).collect()
            })
            .collect();
        let mut input = GateInput { pooled: Vec::new(), fixed, importance, kept_importance, grid, channels };
        input.update(z, positions);
        input
    }

    /// Pools the maps again after a block changed them at `positions`.
    fn update(&mut self, z: &[Vec<f32>], positions: &[Option<Vec<u32>>]) {
        let hid = self.channels;
        self.pooled = (0..z.len())
            .into_par_iter()
            .map(|b| {
                let kept = match &positions[b] {
                    None => pool_by_patch(&z[b], hid, self.grid, &self.importance[b]).weighted,
                    Some(list) => (list.par_chunks(ROWS_PER_TASK))
                        .zip(self.kept_importance[b].par_chunks(ROWS_PER_TASK))
                        .map(|(part, s_part)| {
                            let mut sum = vec![0.0f32; hid];
                            for (&p, &s) in part.iter().zip(s_part) {
                                let p = p as usize;
                                sum.iter_mut().zip(&z[b][p * hid..(p + 1) * hid]).for_each(|(a, f)| *a += s * f);
                            }
                            sum
                        })
                        .reduce(|| vec![0.0; hid], sum_vectors),
                };
                let fixed = &self.fixed[b];
                let weighted = fixed.weighted.iter().zip(&kept).map(|(a, b)| a + b).collect();
                Pooled { weighted, mass: fixed.mass }
            })
            .collect();
    }
}

/// Kept positions per parallel task when pooling the kept rows.
const ROWS_PER_TASK: usize = 1024;

/// How a translator block runs each sample's kept units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnitExecution {
    /// Each sample's kept units' weights are selected and packed, and only they are computed:
    /// the fewest MACs, but a copy of the weights per sample and block.
    #[default]
    Select,
    /// The batch's kept units (the union of its samples') are computed for every sample at its
    /// kept positions with one shared copy of their weights, and each sample's pruned units
    /// among them are zeroed before the second conv: the same prediction with more MACs and
    /// one weight copy per block instead of one per sample (faster where the samples keep
    /// nearly the same units, or few positions each, as on small grids).
    Mask,
}

/// A CNN ready to run.
#[derive(Debug, Clone)]
pub struct CnnExec {
    pub arch: Architecture,
    pub masking: Masking,
    /// How the blocks run the kept units (set before a forward; `Select` by default).
    pub unit_execution: UnitExecution,
    /// The backbone part of `arch`.
    pub(crate) spec: CnnSpec,
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

/// Runs one conv per sample at `positions[b]` (all positions where `None`) into a fresh map
/// that is zero at the other positions.
fn layer_at(
    conv: &Conv,
    inputs: &[Vec<f32>],
    (h, w): (usize, usize),
    positions: &[Option<Vec<u32>>],
    act: Activation,
) -> Vec<Vec<f32>> {
    let (ho, wo) = conv.out_size(h, w);
    let mut maps: Vec<Vec<f32>> = (0..inputs.len())
        .map(|_| {
            let mut m = map_buffer(ho * wo * conv.cout);
            m.par_chunks_mut(1 << 16).for_each(|part| part.fill(0.0));
            m
        })
        .collect();
    let jobs: Vec<Job<'_>> = (inputs.iter().zip(positions))
        .map(|(input, list)| {
            let positions = list.as_deref().map_or(Positions::all(ho, wo), Positions::List);
            Job { conv, input, h, w, positions, act }
        })
        .collect();
    run_jobs_into_maps(&jobs, &mut maps, false);
    maps
}

/// `add_upsampled` at the translator positions `positions[b]` only (all where `None`): GELU of
/// the transposed conv `up` there, added into the `stride x stride` pixels each produces.
fn add_upsampled_at(
    up: &Conv,
    inputs: &[Vec<f32>],
    (h2, w2): (usize, usize),
    st: usize,
    (h, w): (usize, usize),
    positions: &[Option<Vec<u32>>],
    maps: &mut [Vec<f32>],
) {
    let c = up.cout / (st * st);
    let pos_of = |b: usize| positions[b].as_deref().map_or(Positions::all(h2, w2), Positions::List);
    let rows = run_per_sample(inputs, (h2, w2), |_| up, pos_of, Activation::Gelu);
    maps.par_iter_mut().zip(&rows).enumerate().for_each(|(b, (map, rows))| {
        let kept = pos_of(b);
        for i in 0..kept.len() {
            let (y2, x2) = (kept.get(i) / w2, kept.get(i) % w2);
            for (tap, src) in rows[i * up.cout..(i + 1) * up.cout].chunks(c).enumerate() {
                let (y, x) = (y2 * st + tap / st, x2 * st + tap % st);
                if y < h && x < w {
                    map[(y * w + x) * c..(y * w + x + 1) * c].iter_mut().zip(src).for_each(|(a, v)| *a += v);
                }
            }
        }
    });
    rows.into_iter().for_each(recycle);
}

/// Zeroes, at each sample's kept positions, the hidden channels of the units it prunes in
/// block `l` among `columns` (the units the hidden maps hold, ascending; `UnitExecution::Mask`):
/// the second conv then reads exactly what it reads under `Select`.
fn zero_pruned_units<'p>(
    hidden_maps: &mut [Vec<f32>],
    masks: &[SampleMasks],
    (l, columns, units): (usize, &[usize], usize),
    pos_of: &(dyn Fn(usize) -> Positions<'p> + Sync),
) {
    hidden_maps.par_iter_mut().zip(masks).enumerate().for_each(|(b, (map, m))| {
        let kept = &m.units[l];
        if kept.len() == columns.len() {
            return;
        }
        let mut is_kept = vec![false; units];
        kept.iter().for_each(|&u| is_kept[u] = true);
        let pruned: Vec<usize> = (0..columns.len()).filter(|&c| !is_kept[columns[c]]).collect();
        let (positions, width) = (pos_of(b), columns.len());
        for i in 0..positions.len() {
            let row = &mut map[positions.get(i) * width..(positions.get(i) + 1) * width];
            pruned.iter().for_each(|&c| row[c] = 0.0);
        }
    });
}

/// The units kept by any sample in block `l`, ascending.
fn kept_by_any(masks: &[SampleMasks], l: usize, units: usize) -> Vec<usize> {
    let mut any = vec![false; units];
    masks.iter().for_each(|m| m.units[l].iter().for_each(|&u| any[u] = true));
    (0..units).filter(|&u| any[u]).collect()
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
        let (s, f, patch) = (&self.spec, self.arch.frames, self.arch.model.patch);
        let (t, c) = (f.t_in, f.channels);
        let per_sample = crate::check_input(x, batch, [t, c, h, w], plan, s.blocks)?;
        // Frames as channels, channels last.
        let inputs: Vec<Vec<f32>> = (0..batch)
            .map(|b| {
                let mut v = map_buffer(per_sample);
                transpose_into(&x[b * per_sample..(b + 1) * per_sample], t * c, h * w, &mut v);
                v
            })
            .collect();
        let (h2, w2) = self.low(h, w);
        // The DataMask and the importance map S per sample (from the input frames alone).
        let mut macs = vec![0; batch];
        let cell = patch / s.stride;
        let wp = w.div_ceil(patch);
        let keep = self.masking.patch_rule();
        let (mut masks, importance) =
            plan_masks(plan, &self.generator, x, (batch, per_sample), (t, h, w), keep, &mut macs);
        let positions: Vec<Option<Vec<u32>>> =
            masks.iter().map(|m| kept_positions(&m.patches, wp, cell, (h2, w2))).collect();
        // Under the network scope (with masks), the encoder and decoder run at the kept
        // positions too.
        let network = s.data_scope == DataScope::Network && !masks.is_empty();
        let outer: Option<Vec<Option<Vec<u32>>>> =
            network.then(|| masks.iter().map(|m| kept_positions(&m.patches, wp, patch, (h, w))).collect());
        let (skip, mut z) = match &outer {
            None => {
                let skip = dense_layer(&self.enc_in, &inputs, h, w, Activation::Gelu);
                let z = dense_layer(&self.enc_down, &skip, h, w, Activation::Gelu);
                macs.iter_mut().for_each(|m| *m += self.fixed_macs(h, w));
                (skip, z)
            }
            Some(full) => {
                let skip = layer_at(&self.enc_in, &inputs, (h, w), full, Activation::Gelu);
                let z = layer_at(&self.enc_down, &skip, (h, w), &positions, Activation::Gelu);
                for (b, m) in macs.iter_mut().enumerate() {
                    *m += self.outer_macs(h, w, full[b].as_ref().map(Vec::len), positions[b].as_ref().map(Vec::len));
                }
                (skip, z)
            }
        };
        inputs.into_iter().for_each(recycle);

        // The unit gates' pooled input per sample, when they run: pooled once here, then kept up
        // to date from each block's updates (they change only the kept positions).
        let unit_keep = self.masking.unit_keep().filter(|_| matches!(plan, MaskPlan::Dynamic));
        let grid = (h2, w2, cell, wp);
        let mut gate_input = unit_keep.map(|_| GateInput::new(&z, s.hidden, &importance, grid, &masks, &positions));
        // Each sample's hidden map of the current block, reused across blocks (see sparse_block).
        let mut hidden_maps = vec![Vec::new(); batch];
        for (l, (conv1, conv2)) in self.blocks.iter().enumerate() {
            if masks.is_empty() {
                // conv2's rows are added straight into the residual stream, as in the sparse
                // blocks (so that all-ones masks give the same floats).
                let hidden = dense_layer(conv1, &z, h2, w2, Activation::Gelu);
                let all = Positions::all(h2, w2);
                let second: Vec<Job<'_>> = (hidden.iter())
                    .map(|input| Job { conv: conv2, input, h: h2, w: w2, positions: all, act: Activation::None })
                    .collect();
                run_jobs_into_maps(&second, &mut z, true);
                drop(second);
                hidden.into_iter().for_each(recycle);
                for m in &mut macs {
                    *m += (h2 * w2) as u64 * (conv1.macs_per_position() + conv2.macs_per_position());
                }
                continue;
            }
            if matches!(plan, MaskPlan::Dynamic) {
                let gate = &self.gates[l];
                let pooled = gate_input.as_ref().map_or(&[][..], |g| &g.pooled[..]);
                let units = gate_units(gate, batch, pooled, h2 * w2, unit_keep);
                for ((m, u), mc) in masks.iter_mut().zip(units).zip(macs.iter_mut()) {
                    if self.masking.mode.model() {
                        *mc += gate.macs(h2 * w2);
                    }
                    m.units.push(u);
                }
            }
            let maps = (&mut z[..], &mut hidden_maps[..], gate_input.as_mut());
            self.sparse_block(l, conv1, conv2, maps, &masks, &positions, (h2, w2), &mut macs);
        }

        hidden_maps.into_iter().for_each(recycle);

        // The decoder map: the skip map plus the upsampled translator output.
        let mut d = skip;
        match (&self.dec_up, &outer) {
            (Some(up), None) => add_upsampled(up, &z, (h2, w2), s.stride, (h, w), Activation::Gelu, &mut d),
            (Some(up), Some(_)) => add_upsampled_at(up, &z, (h2, w2), s.stride, (h, w), &positions, &mut d),
            (None, _) => {
                for (db, zb) in d.iter_mut().zip(&z) {
                    db.iter_mut().zip(zb).for_each(|(a, b)| *a += b);
                }
            }
        }
        z.into_iter().for_each(recycle);
        let delta = match &outer {
            None => dense_layer(&self.dec_out, &d, h, w, Activation::None),
            // The decoder's input is already zero off the kept positions: the skip map and the
            // translator's map are, and the upsampling adds at the kept positions only.
            Some(full) => layer_at(&self.dec_out, &d, (h, w), full, Activation::None),
        };
        d.into_iter().for_each(recycle);
        let out_c = f.t_out * c;
        // Every float is written by the transpose.
        let mut prediction = map_buffer(batch * out_c * h * w);
        for b in 0..batch {
            let last = &x[b * per_sample + (t - 1) * c * h * w..b * per_sample + t * c * h * w];
            let dst = &mut prediction[b * out_c * h * w..(b + 1) * out_c * h * w];
            transpose_into(&delta[b], h * w, out_c, dst);
            dst.par_chunks_mut(c * h * w).for_each(|frame| frame.iter_mut().zip(last).for_each(|(a, l)| *a += l));
        }
        delta.into_iter().for_each(recycle);
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
        (z, hidden_maps, gate_input): (&mut [Vec<f32>], &mut [Vec<f32>], Option<&mut GateInput<'_>>),
        masks: &[SampleMasks],
        positions: &[Option<Vec<u32>>],
        (h2, w2): (usize, usize),
        macs: &mut [u64],
    ) {
        let all_units = self.spec.units;
        let select = |u: &[usize]| -> (Cow<'_, Conv>, Cow<'_, Conv>) {
            if u.len() == all_units {
                (Cow::Borrowed(conv1), Cow::Borrowed(conv2))
            } else {
                (Cow::Owned(conv1.select_outputs(u)), Cow::Owned(conv2.select_inputs(u)))
            }
        };
        // Under `Mask`, the weights of the batch's kept units, shared by every sample.
        let union = (self.unit_execution == UnitExecution::Mask).then(|| kept_by_any(masks, l, all_units));
        let shared = union.as_deref().map(select);
        // Weights restricted to each sample's kept units (borrowed when it keeps them all).
        let selected: Vec<(Cow<'_, Conv>, Cow<'_, Conv>)> = match &shared {
            Some((c1, c2)) => masks.iter().map(|_| (Cow::Borrowed(&**c1), Cow::Borrowed(&**c2))).collect(),
            None => masks.par_iter().map(|m| select(&m.units[l])).collect(),
        };
        let pos_of = |b: usize| match &positions[b] {
            Some(list) => Positions::List(list),
            None => Positions::all(h2, w2),
        };
        // Hidden maps: zero at pruned positions, so conv2 reads no pruned work. The kept
        // positions are the same in every block, so a map is zeroed only when first used (or
        // when its unit count changes) and later blocks overwrite just the kept positions.
        for (map, (conv1, _)) in hidden_maps.iter_mut().zip(&selected) {
            let n = h2 * w2 * conv1.cout;
            if map.len() != n {
                recycle(std::mem::replace(map, map_buffer(n)));
                map.par_chunks_mut(1 << 16).for_each(|part| part.fill(0.0));
            }
        }
        // conv1 writes its rows straight into the hidden maps, conv2 adds its rows straight into
        // the residual stream, at the kept positions only.
        let (h, w) = (h2, w2);
        let first: Vec<Job<'_>> = (0..z.len())
            .map(|b| Job { conv: &selected[b].0, input: &z[b], h, w, positions: pos_of(b), act: Activation::Gelu })
            .collect();
        run_jobs_into_maps(&first, hidden_maps, false);
        drop(first);
        if let Some(columns) = &union {
            zero_pruned_units(hidden_maps, masks, (l, columns, all_units), &pos_of);
        }
        let second: Vec<Job<'_>> = (0..z.len())
            .map(|b| Job {
                conv: &selected[b].1,
                input: &hidden_maps[b],
                h,
                w,
                positions: pos_of(b),
                act: Activation::None,
            })
            .collect();
        run_jobs_into_maps(&second, z, true);
        drop(second);
        for (b, (mc, (conv1, conv2))) in macs.iter_mut().zip(&selected).enumerate() {
            *mc += pos_of(b).len() as u64 * (conv1.macs_per_position() + conv2.macs_per_position());
        }
        if let Some(g) = gate_input {
            g.update(z, positions);
        }
    }

    /// MACs of the encoder and decoder, as the trainer's `Cnn::macs` counts them.
    pub fn fixed_macs(&self, h: usize, w: usize) -> u64 {
        self.outer_macs(h, w, None, None)
    }

    /// MACs of the encoder and decoder computed at `full` full-resolution and `low` translator
    /// positions (all where `None`).
    fn outer_macs(&self, h: usize, w: usize, full: Option<usize>, low: Option<usize>) -> u64 {
        let (h2, w2) = self.low(h, w);
        let (full, low) = (full.unwrap_or(h * w) as u64, low.unwrap_or(h2 * w2) as u64);
        let up = self.dec_up.as_ref().map_or(0, |u| low * u.macs_per_position());
        full * (self.enc_in.macs_per_position() + self.dec_out.macs_per_position())
            + low * self.enc_down.macs_per_position()
            + up
    }
}
