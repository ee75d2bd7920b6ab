//! The dynamic ConvLSTM encoder-forecaster (see the trainer's `backbones/convlstm.rs`) on plain
//! kernels: dense encoder and decoder, run band by band of state rows so that their
//! full-resolution features stay in the cache (only the last input frame's are kept, for the
//! decoder's skip connection); at every step each cell computes its gates only at the kept
//! positions and for the kept hidden channels (one kernel call per tile over `[input, h]`,
//! reading only the channels of kept units: a pruned unit's h stays zero), and updates the
//! state there; elsewhere the state carries over.

use std::borrow::Cow;
use std::cell::RefCell;

use dyna_pruner_spec::{Architecture, ConvLstmSpec, Masking};
use rayon::prelude::*;

use crate::activation::lstm_cell;
use crate::kernels::{run_per_sample, Activation, Conv, Positions};
use crate::masks::{
    gate_units, kept_positions, plan_masks, pool_by_patch, window_rows, MaskGenerator, Pooled, UnitGate,
};
use crate::plan::{MaskPlan, Output};
use crate::pool::{map_buffer, recycle};
use crate::ExecError;

/// State rows per band of the encoder's and decoder's full-resolution work (`stride` rows of
/// full-resolution features each): small enough that a band's features stay in the L2 cache
/// between the two convolutions that read them.
const BAND_ROWS: usize = 4;

thread_local! {
    /// One band's full-resolution features, reused across bands and calls.
    static BAND: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's band buffer, `n` floats of unspecified contents.
fn with_band<R>(n: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    BAND.with_borrow_mut(|band| {
        if band.len() < n {
            band.resize(n, 0.0);
        }
        f(&mut band[..n])
    })
}

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
    /// The transposed conv (kernel = stride) as one 1x1 conv per output row `dy` within a state
    /// pixel, to that row's `stride * hidden` outputs (its `stride` pixels in order).
    pub(crate) dec_up_rows: Vec<Conv>,
    pub(crate) dec_out: Conv,
    pub(crate) generator: MaskGenerator,
    pub(crate) gates: Vec<UnitGate>,
}

/// One cell's gate convolutions for one sample (see `CellConvs`), restricted to its kept
/// units' outputs and its live input channels (the state-only one for the first cell alone,
/// the only one with steps without input), and the MACs per position the model counts for
/// each (`joint`, `state_only`).
struct SelectedCell<'a> {
    joint: Cow<'a, Conv>,
    state_only: Option<Cow<'a, Conv>>,
    macs: (u64, u64),
}

/// `dst = src` at `channels` (all of it for `None`).
fn gather(dst: &mut [f32], src: &[f32], channels: Option<&[usize]>) {
    match channels {
        None => dst.copy_from_slice(src),
        Some(channels) => dst.iter_mut().zip(channels).for_each(|(d, &c)| *d = src[c]),
    }
}

/// The rows (`width` floats each) of `map` at `positions` (ascending).
fn rows_at<'m>(map: &'m mut [f32], width: usize, positions: Positions<'_>) -> Vec<&'m mut [f32]> {
    let mut rows = map.chunks_exact_mut(width).enumerate();
    (0..positions.len())
        .map(|i| {
            let p = positions.get(i);
            rows.find_map(|(at, row)| (at == p).then_some(row)).expect("positions ascend inside the map")
        })
        .collect()
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

    /// Encodes each input frame (`frames[f]`, `[h, w, c]`): its state-resolution features
    /// `[lh, lw, hidden]`, and for the frames `keep_full` names, its full-resolution features
    /// `[hp, wp, hidden]` (zero past `h x w`). Band by band of state rows, all bands of all frames in
    /// parallel; the other frames' full-resolution features live in a band buffer only.
    fn encode(
        &self,
        frames: &[Cow<'_, [f32]>],
        (h, w): (usize, usize),
        keep_full: impl Fn(usize) -> bool,
    ) -> (Vec<Vec<f32>>, Vec<Option<Vec<f32>>>) {
        let ((hp, wp), (lh, lw)) = self.grids(h, w);
        let (st, hid) = (self.spec.stride, self.spec.hidden);
        let mut low: Vec<Vec<f32>> = frames.iter().map(|_| map_buffer(lh * lw * hid)).collect();
        let mut full: Vec<Option<Vec<f32>>> =
            (0..frames.len()).map(|f| keep_full(f).then(|| map_buffer(hp * wp * hid))).collect();
        let mut tasks = Vec::new();
        for (f, (low, full)) in low.iter_mut().zip(full.iter_mut()).enumerate() {
            let mut full_bands = full.as_mut().map(|map| map.chunks_mut(BAND_ROWS * st * wp * hid));
            for (band, low_band) in low.chunks_mut(BAND_ROWS * lw * hid).enumerate() {
                tasks.push((f, band, low_band, full_bands.as_mut().and_then(Iterator::next)));
            }
        }
        tasks.into_par_iter().for_each(|(f, band, low_band, full_band)| {
            let rows = low_band.len() / (lw * hid) * st;
            let mut encode_band = |features: &mut [f32]| {
                for (r, row) in features.chunks_exact_mut(wp * hid).enumerate() {
                    let y = band * BAND_ROWS * st + r;
                    let inside = if y < h {
                        let positions = Positions::Range(y * w, (y + 1) * w);
                        self.enc_in.rows_into(&frames[f], (h, w), positions, &mut row[..w * hid], Activation::Gelu);
                        w * hid
                    } else {
                        0
                    };
                    row[inside..].fill(0.0);
                }
                let positions = Positions::all(rows / st, lw);
                self.enc_down.rows_into(features, (rows, wp), positions, low_band, Activation::Gelu);
            };
            match full_band {
                Some(features) => encode_band(features),
                None => with_band(rows * wp * hid, encode_band),
            }
        });
        (low, full)
    }

    /// The forecast steps' predictions `[c, h, w]` into `prediction` (steps in order): step i's
    /// last input frame `last_frame(i)` plus the decoder's output from the last cell's state
    /// `tops[i]` (`[lh, lw, units]`), given its sample's last-frame features `features(i)`
    /// (state resolution, full resolution). Band by band of output rows, all bands of all steps
    /// in parallel: each band's full-resolution features, with the row above and below it, live
    /// in a band buffer only.
    fn decode<'a>(
        &self,
        tops: &[Vec<f32>],
        (h, w): (usize, usize),
        features: impl Fn(usize) -> (&'a [f32], &'a [f32]) + Sync,
        prediction: &mut [f32],
        last_frame: impl Fn(usize) -> &'a [f32] + Sync,
    ) {
        let ((hp, wp), (lh, lw)) = self.grids(h, w);
        let (st, hid, c) = (self.spec.stride, self.spec.hidden, self.arch.frames.channels);
        let mut base = run_per_sample(tops, (lh, lw), |_| &self.dec_proj, |_| Positions::all(lh, lw), Activation::None);
        for (i, z) in base.iter_mut().enumerate() {
            z.iter_mut().zip(features(i).0).for_each(|(a, b)| *a += b);
        }
        let band_rows = BAND_ROWS * st;
        let mut tasks = Vec::new();
        for (i, step) in prediction.chunks_mut(c * h * w).enumerate() {
            // Each channel's plane, cut into the bands' rows.
            let mut planes: Vec<_> = step.chunks_mut(h * w).map(|plane| plane.chunks_mut(band_rows * w)).collect();
            for band in 0..h.div_ceil(band_rows) {
                let pieces: Vec<&mut [f32]> = planes.iter_mut().filter_map(Iterator::next).collect();
                tasks.push((i, band, pieces));
            }
        }
        tasks.into_par_iter().for_each(|(i, band, mut pieces)| {
            let (y0, y1) = (band * band_rows, ((band + 1) * band_rows).min(h));
            // The output rows' 3x3 windows read the full-resolution rows ya..yb.
            let (ya, yb) = (y0.saturating_sub(1), (y1 + 1).min(hp));
            let (skip, last) = (features(i).1, last_frame(i));
            with_band((yb - ya) * wp * hid, |map| {
                for (r, row) in map.chunks_exact_mut(wp * hid).enumerate() {
                    let (y, positions) = (ya + r, Positions::Range((ya + r) / st * lw, ((ya + r) / st + 1) * lw));
                    self.dec_up_rows[y % st].rows_into(&base[i], (lh, lw), positions, row, Activation::Gelu);
                    row.iter_mut().zip(&skip[y * wp * hid..(y + 1) * wp * hid]).for_each(|(a, s)| *a += s);
                }
                let mut delta = vec![0.0; w * c];
                for y in y0..y1 {
                    let positions = Positions::Range((y - ya) * wp, (y - ya) * wp + w);
                    self.dec_out.rows_into(map, (yb - ya, wp), positions, &mut delta, Activation::None);
                    for (ch, piece) in pieces.iter_mut().enumerate() {
                        let (dst, last) = (&mut piece[(y - y0) * w..][..w], &last[(ch * h + y) * w..][..w]);
                        for (x, (d, l)) in dst.iter_mut().zip(last).enumerate() {
                            *d = l + delta[x * c + ch];
                        }
                    }
                }
            });
        });
        base.into_iter().for_each(recycle);
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
        let (_, (lh, lw)) = self.grids(h, w);
        let low = lh * lw;

        // Encoder, every input frame of every sample, channels last ([c, h, w] is [h, w, c]
        // for one channel); the last input frame's full-resolution features are kept.
        let frames: Vec<Cow<'_, [f32]>> = x
            .chunks_exact(c * h * w)
            .map(|src| match c {
                1 => Cow::Borrowed(src),
                _ => Cow::Owned((0..h * w).flat_map(|p| (0..c).map(move |ch| src[ch * h * w + p])).collect()),
            })
            .collect();
        let frame_of = |b: usize, t: usize| b * t_in + t;
        let (encoded, skips) = self.encode(&frames, (h, w), |f| f % t_in == t_in - 1);
        let skip_of = |b: usize| skips[frame_of(b, t_in - 1)].as_deref().expect("the last input frame's features");
        let last_low = |b: usize| encoded[frame_of(b, t_in - 1)].as_slice();
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
                Some(_) => importance
                    .iter()
                    .enumerate()
                    .map(|(b, sc)| pool_by_patch(last_low(b), s.hidden, (lh, lw, cell_px, wpatch), sc))
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
        // Whether the kept positions' windows read each row: the only rows of the conv input built.
        let read_rows: Vec<Option<Vec<bool>>> =
            positions.iter().map(|p| p.as_ref().map(|list| window_rows(list, (lh, lw)))).collect();
        let all_units: Vec<usize> = (0..units).collect();
        let units_of = |b: usize, l: usize| masks.get(b).map_or(all_units.as_slice(), |m| m.units[l].as_slice());
        // The units of a cell whose h can be nonzero, `None` for all: a pruned unit's h and c
        // are never written in a forward, so they stay zero and its channels can be skipped.
        let live = |b: usize, l: usize| Some(units_of(b, l)).filter(|u| u.len() < units);
        // Each sample's gate weights restricted to its kept units' outputs and to the input
        // channels that can be nonzero (borrowed when all are kept), and the MACs the model
        // counts for them per position (every input channel).
        let selected: Vec<Vec<SelectedCell<'_>>> = (0..batch)
            .map(|b| {
                self.cells
                    .iter()
                    .enumerate()
                    .map(|(l, cell)| {
                        let u = units_of(b, l);
                        let counted = |conv: &Conv| conv.macs_per_position() / units as u64 * u.len() as u64;
                        let macs = (counted(&cell.joint), counted(&cell.state_only));
                        let below = if l == 0 { None } else { live(b, l - 1) };
                        let cols = gate_columns(u, units);
                        let joint = if u.len() == units && below.is_none() {
                            Cow::Borrowed(&cell.joint)
                        } else {
                            let cin = cell.joint.cin - units;
                            let inputs: Vec<usize> = below
                                .map_or_else(|| (0..cin).collect(), <[usize]>::to_vec)
                                .into_iter()
                                .chain(u.iter().map(|&j| cin + j))
                                .collect();
                            Cow::Owned(cell.joint.select_outputs(&cols).select_inputs(&inputs))
                        };
                        let state_only = (l == 0).then(|| {
                            if u.len() == units {
                                Cow::Borrowed(&cell.state_only)
                            } else {
                                Cow::Owned(cell.state_only.select_outputs(&cols).select_inputs(u))
                            }
                        });
                        SelectedCell { joint, state_only, macs }
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
                // The conv input per sample, channels last: the live channels of [input, h] (or
                // of h alone) at the rows its windows read (zero elsewhere, never read); h
                // itself when all its channels are live and there is no input.
                let inputs: Vec<Cow<'_, [f32]>> = (0..batch)
                    .map(|b| {
                        let (state, own) = (&hs[b][l], live(b, l));
                        let input = match (with_input, l) {
                            (false, _) if own.is_none() => return Cow::Borrowed(state.as_slice()),
                            (false, _) => None,
                            (true, 0) => Some((encoded[frame_of(b, t)].as_slice(), hid, None)),
                            (true, _) => Some((hs[b][l - 1].as_slice(), units, live(b, l - 1))),
                        };
                        let input_width = input.map_or(0, |(_, cin, channels)| channels.map_or(cin, <[usize]>::len));
                        let width = input_width + own.map_or(units, <[usize]>::len);
                        let mut joint = map_buffer(low * width);
                        let read = read_rows.get(b).and_then(Option::as_deref);
                        joint.par_chunks_mut(width).enumerate().with_min_len(256).for_each(|(p, row)| {
                            if read.is_none_or(|read| read[p]) {
                                let (input_part, state_part) = row.split_at_mut(input_width);
                                if let Some((map, cin, channels)) = input {
                                    gather(input_part, &map[p * cin..(p + 1) * cin], channels);
                                }
                                gather(state_part, &state[p * units..(p + 1) * units], own);
                            } else {
                                row.fill(0.0);
                            }
                        });
                        Cow::Owned(joint)
                    })
                    .collect();
                let conv_of = |b: usize| -> &Conv {
                    if with_input {
                        &selected[b][l].joint
                    } else {
                        selected[b][l].state_only.as_deref().expect("only the first cell has steps without input")
                    }
                };
                let rows = run_per_sample(&inputs, (lh, lw), conv_of, pos_of, Activation::None);
                for input in inputs {
                    if let Cow::Owned(joint) = input {
                        recycle(joint);
                    }
                }
                for b in 0..batch {
                    let (u, pos) = (units_of(b, l), pos_of(b));
                    let k = u.len();
                    let (joint_macs, state_macs) = selected[b][l].macs;
                    macs[b] += pos.len() as u64 * if with_input { joint_macs } else { state_macs };
                    // The kept positions' state rows, each updated in place, in parallel: its
                    // kept units' c read, the cell update, their new h and c written back.
                    let h_rows = rows_at(&mut hs[b][l], units, pos);
                    let c_rows = rows_at(&mut cs[b][l], units, pos);
                    h_rows
                        .into_par_iter()
                        .zip(c_rows)
                        .zip(rows[b].par_chunks_exact(4 * k))
                        .with_min_len(64)
                        .for_each_init(
                            || vec![0.0f32; 3 * k],
                            |scratch, ((h_row, c_row), pre)| {
                                let (c_prev, new) = scratch.split_at_mut(k);
                                let (h_new, c_new) = new.split_at_mut(k);
                                for (value, &unit) in c_prev.iter_mut().zip(u) {
                                    *value = c_row[unit];
                                }
                                lstm_cell(pre, c_prev, h_new, c_new);
                                for ((&unit, h), c) in u.iter().zip(h_new.iter()).zip(c_new.iter()) {
                                    h_row[unit] = *h;
                                    c_row[unit] = *c;
                                }
                            },
                        );
                }
                rows.into_iter().for_each(recycle);
            }
            if t >= t_in {
                for b in 0..batch {
                    let mut top = map_buffer(low * units);
                    top.copy_from_slice(&hs[b][s.cells - 1]);
                    tops[b].push(top);
                }
            }
        }

        // Decoder per sample and forecast step.
        let steps: Vec<Vec<f32>> = tops.into_iter().flatten().collect();
        let mut prediction = vec![0.0; batch * fr.t_out * c * h * w];
        self.decode(
            &steps,
            (h, w),
            |i| (last_low(i / fr.t_out), skip_of(i / fr.t_out)),
            &mut prediction,
            |i| {
                let b = i / fr.t_out;
                &x[b * per_sample + (t_in - 1) * c * h * w..b * per_sample + t_in * c * h * w]
            },
        );
        steps.into_iter().chain(encoded).chain(skips.into_iter().flatten()).for_each(recycle);
        for states in hs.into_iter().chain(cs) {
            states.into_iter().for_each(recycle);
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
                * (low
                    * (self.dec_proj.macs_per_position()
                        + self.dec_up_rows.iter().map(Conv::macs_per_position).sum::<u64>())
                    + full * self.dec_out.macs_per_position())
    }
}
