//! The dynamic ConvLSTM encoder-forecaster (see the trainer's `backbones/convlstm.rs`) on plain
//! kernels: dense encoder and decoder; at every step each cell computes its gates only at the
//! kept positions and for the kept hidden channels (one kernel call per tile over
//! `[input, h]`), and updates the state there; elsewhere the state carries over.

use std::borrow::Cow;

use dyna_pruner_spec::{Architecture, ConvLstmSpec, Masking};
use rayon::prelude::*;

use crate::activation::lstm_cell;
use crate::kernels::{add_upsampled, run_per_sample, Activation, Conv, Positions};
use crate::masks::{
    gate_units, kept_positions, plan_masks, pool_by_patch, window_rows, MaskGenerator, Pooled, UnitGate,
};
use crate::plan::{MaskPlan, Output};
use crate::ExecError;

/// One cell's gate convolutions, 3x3, outputs `[i, f, o, g]` x units.
#[derive(Debug, Clone)]
pub struct CellConvs {
    /// Over the channels of `[input, h]` (input bias): steps with an input.
    pub joint: Conv,
    /// Over `h` only (input bias): the first cell's forecast steps, which have no input.
    pub state_only: Conv,
}

/// A ConvLSTM ready to run.
#[derive(Debug, Clone)]
pub struct ConvLstmExec {
    pub arch: Architecture,
    pub masking: Masking,
    /// The backbone part of `arch`.
    pub(crate) spec: ConvLstmSpec,
    pub(crate) enc_in: Conv,
    pub(crate) enc_down: Conv,
    pub(crate) cells: Vec<CellConvs>,
    pub(crate) dec_proj: Conv,
    /// Transposed conv (kernel = stride) as a 1x1 conv to `stride^2 * hidden` outputs.
    pub(crate) dec_up: Conv,
    pub(crate) dec_out: Conv,
    pub(crate) generator: MaskGenerator,
    pub(crate) gates: Vec<UnitGate>,
}

/// The gate columns `[i, f, o, g]` of the kept units, in that order.
fn gate_columns(units: &[usize], all: usize) -> Vec<usize> {
    (0..4).flat_map(|g| units.iter().map(move |u| g * all + u)).collect()
}

impl ConvLstmExec {
    /// Frames padded to whole state pixels, and the state grid.
    fn grids(&self, h: usize, w: usize) -> ((usize, usize), (usize, usize)) {
        let st = self.spec.stride;
        let (hp, wp) = (h.div_ceil(st) * st, w.div_ceil(st) * st);
        ((hp, wp), (hp / st, wp / st))
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
        let (s, fr, patch) = (&self.spec, self.arch.frames, self.arch.model.patch);
        let (t_in, c, hid, units) = (fr.t_in, fr.channels, s.hidden, s.units);
        let per_sample = crate::check_input(x, batch, [t_in, c, h, w], plan, s.cells)?;
        let ((hp, wp), (lh, lw)) = self.grids(h, w);
        let low = lh * lw;

        // Encoder, every input frame of every sample: [h, w, c] -> [hp, wp, hid] -> [lh, lw, hid].
        let frames: Vec<Vec<f32>> = (0..batch * t_in)
            .map(|f| {
                let src = &x[f * c * h * w..(f + 1) * c * h * w];
                (0..h * w).flat_map(|p| (0..c).map(move |ch| src[ch * h * w + p])).collect()
            })
            .collect();
        let full: Vec<Vec<f32>> =
            run_per_sample(&frames, (h, w), |_| &self.enc_in, |_| Positions::all(h, w), Activation::Gelu)
                .into_iter()
                .map(|rows| {
                    let mut padded = vec![0.0; hp * wp * hid];
                    for y in 0..h {
                        padded[y * wp * hid..(y * wp + w) * hid].copy_from_slice(&rows[y * w * hid..(y + 1) * w * hid]);
                    }
                    padded
                })
                .collect();
        let encoded = run_per_sample(&full, (hp, wp), |_| &self.enc_down, |_| Positions::all(lh, lw), Activation::Gelu);
        let frame_of = |b: usize, t: usize| b * t_in + t;
        let last_low: Vec<Vec<f32>> = (0..batch).map(|b| encoded[frame_of(b, t_in - 1)].clone()).collect();
        let mut macs = vec![self.fixed_macs(h, w); batch];

        // Masks: kept patches once, kept units of each cell from its gate on the last frame's features.
        let cell_px = patch / s.stride;
        let wpatch = w.div_ceil(patch);
        let keep = self.masking.patch_rule();
        let (mut masks, importance) =
            plan_masks(plan, &self.generator, x, (batch, per_sample), (t_in, h, w), keep, &mut macs);
        if matches!(plan, MaskPlan::Dynamic) {
            let keep = self.masking.unit_keep();
            // Every gate reads the last input frame's encoding: pooled once for all of them.
            let pooled: Vec<Pooled> = match keep {
                Some(_) => last_low
                    .iter()
                    .zip(&importance)
                    .map(|(f, sc)| pool_by_patch(f, s.hidden, (lh, lw, cell_px, wpatch), sc))
                    .collect(),
                None => Vec::new(),
            };
            for gate in &self.gates {
                let kept = gate_units(gate, batch, &pooled, low, keep);
                for ((m, u), mc) in masks.iter_mut().zip(kept).zip(macs.iter_mut()) {
                    if self.masking.mode.model() {
                        *mc += gate.macs(low);
                    }
                    m.units.push(u);
                }
            }
        }
        let positions: Vec<Option<Vec<u32>>> =
            masks.iter().map(|m| kept_positions(&m.patches, wpatch, cell_px, (lh, lw))).collect();
        let pos_of = |b: usize| match positions.get(b) {
            Some(Some(list)) => Positions::List(list),
            _ => Positions::all(lh, lw),
        };
        // The rows the kept positions' windows read: the only rows of the conv input built.
        let read_rows: Vec<Option<Vec<u32>>> =
            positions.iter().map(|p| p.as_ref().map(|list| window_rows(list, (lh, lw)))).collect();
        let all_units: Vec<usize> = (0..units).collect();
        let units_of = |b: usize, l: usize| masks.get(b).map_or(all_units.as_slice(), |m| m.units[l].as_slice());
        // Each sample's gate weights restricted to its kept units (borrowed when all are kept).
        let selected: Vec<Vec<(Cow<'_, Conv>, Cow<'_, Conv>)>> = (0..batch)
            .map(|b| {
                self.cells
                    .iter()
                    .enumerate()
                    .map(|(l, cell)| {
                        let u = units_of(b, l);
                        if u.len() == units {
                            (Cow::Borrowed(&cell.joint), Cow::Borrowed(&cell.state_only))
                        } else {
                            let cols = gate_columns(u, units);
                            (
                                Cow::Owned(cell.joint.select_outputs(&cols)),
                                Cow::Owned(cell.state_only.select_outputs(&cols)),
                            )
                        }
                    })
                    .collect()
            })
            .collect();

        // The recurrence: states [low, units] per sample and cell.
        let mut hs = vec![vec![vec![0.0f32; low * units]; s.cells]; batch];
        let mut cs = hs.clone();
        let mut tops: Vec<Vec<Vec<f32>>> = vec![Vec::with_capacity(fr.t_out); batch];
        for t in 0..t_in + fr.t_out {
            for l in 0..s.cells {
                let with_input = l > 0 || t < t_in;
                let cin = if l == 0 { hid } else { units };
                // The conv input per sample: [input, h] channels last at the rows its windows
                // read (zero elsewhere, never read), or h alone.
                let inputs: Vec<Cow<'_, [f32]>> = (0..batch)
                    .map(|b| {
                        let state = &hs[b][l];
                        if !with_input {
                            return Cow::Borrowed(state.as_slice());
                        }
                        let input = if l == 0 { &encoded[frame_of(b, t)] } else { &hs[b][l - 1] };
                        let input_row = |p: usize| &input[p * cin..(p + 1) * cin];
                        let state_row = |p: usize| &state[p * units..(p + 1) * units];
                        let width = cin + units;
                        let joint = match read_rows.get(b) {
                            Some(Some(rows)) => {
                                let mut joint = vec![0.0f32; low * width];
                                for p in rows.iter().map(|&p| p as usize) {
                                    let row = &mut joint[p * width..(p + 1) * width];
                                    row[..cin].copy_from_slice(input_row(p));
                                    row[cin..].copy_from_slice(state_row(p));
                                }
                                joint
                            }
                            // Every row, in order: no zeroed map to overwrite.
                            _ => {
                                let mut joint = Vec::with_capacity(low * width);
                                for p in 0..low {
                                    joint.extend_from_slice(input_row(p));
                                    joint.extend_from_slice(state_row(p));
                                }
                                joint
                            }
                        };
                        Cow::Owned(joint)
                    })
                    .collect();
                let conv_of = |b: usize| -> &Conv {
                    if with_input {
                        &selected[b][l].0
                    } else {
                        &selected[b][l].1
                    }
                };
                let rows = run_per_sample(&inputs, (lh, lw), conv_of, pos_of, Activation::None);
                for b in 0..batch {
                    let (u, pos) = (units_of(b, l), pos_of(b));
                    let k = u.len();
                    macs[b] += pos.len() as u64 * conv_of(b).macs_per_position();
                    // The gate nonlinearities in parallel over positions (each position's new h
                    // then c, for its kept units), then the state writes.
                    let c_old = &cs[b][l];
                    let mut updated = vec![0.0f32; rows[b].len() / 2];
                    updated
                        .par_chunks_mut(2 * k)
                        .zip(rows[b].par_chunks_exact(4 * k))
                        .enumerate()
                        .with_min_len(64)
                        .for_each_init(
                            || vec![0.0f32; k],
                            |c_prev, (i, (out, pre))| {
                                let p = pos.get(i);
                                for (value, &unit) in c_prev.iter_mut().zip(u) {
                                    *value = c_old[p * units + unit];
                                }
                                let (h_new, c_new) = out.split_at_mut(k);
                                lstm_cell(pre, c_prev, h_new, c_new);
                            },
                        );
                    let (h_map, c_map) = (&mut hs[b][l], &mut cs[b][l]);
                    for (i, chunk) in updated.chunks_exact(2 * k).enumerate() {
                        let p = pos.get(i);
                        let (h_new, c_new) = chunk.split_at(k);
                        for (j, &unit) in u.iter().enumerate() {
                            h_map[p * units + unit] = h_new[j];
                            c_map[p * units + unit] = c_new[j];
                        }
                    }
                }
            }
            if t >= t_in {
                for b in 0..batch {
                    tops[b].push(hs[b][s.cells - 1].clone());
                }
            }
        }

        // Decoder per sample and forecast step.
        let steps: Vec<Vec<f32>> = tops.into_iter().flatten().collect();
        let sample_of = |i: usize| i / fr.t_out;
        let mut base =
            run_per_sample(&steps, (lh, lw), |_| &self.dec_proj, |_| Positions::all(lh, lw), Activation::None);
        for (i, z) in base.iter_mut().enumerate() {
            z.iter_mut().zip(&last_low[sample_of(i)]).for_each(|(a, b)| *a += b);
        }
        let mut maps: Vec<Vec<f32>> = (0..base.len()).map(|i| full[frame_of(sample_of(i), t_in - 1)].clone()).collect();
        add_upsampled(&self.dec_up, &base, (lh, lw), s.stride, (hp, wp), Activation::Gelu, &mut maps);
        let delta = run_per_sample(&maps, (hp, wp), |_| &self.dec_out, |_| Positions::all(hp, wp), Activation::None);
        let mut prediction = vec![0.0; batch * fr.t_out * c * h * w];
        for (i, d) in delta.iter().enumerate() {
            let b = sample_of(i);
            let last = &x[b * per_sample + (t_in - 1) * c * h * w..b * per_sample + t_in * c * h * w];
            let dst = &mut prediction[i * c * h * w..(i + 1) * c * h * w];
            for ch in 0..c {
                for y in 0..h {
                    for xx in 0..w {
                        dst[(ch * h + y) * w + xx] = last[(ch * h + y) * w + xx] + d[(y * wp + xx) * c + ch];
                    }
                }
            }
        }
        Ok(Output { prediction, masks, macs })
    }

    /// MACs of the layers no mask touches, as the trainer's `ConvLstm::macs` counts them.
    pub fn fixed_macs(&self, h: usize, w: usize) -> u64 {
        let ((hp, wp), (lh, lw)) = self.grids(h, w);
        let (full, low) = ((hp * wp) as u64, (lh * lw) as u64);
        let fr = self.arch.frames;
        fr.t_in as u64 * ((h * w) as u64 * self.enc_in.macs_per_position() + low * self.enc_down.macs_per_position())
            + fr.t_out as u64
                * (low * (self.dec_proj.macs_per_position() + self.dec_up.macs_per_position())
                    + full * self.dec_out.macs_per_position())
    }
}
