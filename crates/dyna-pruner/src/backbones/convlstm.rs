//! ConvLSTM encoder-forecaster (Shi et al., "Convolutional LSTM Network: A Machine Learning
//! Approach for Precipitation Nowcasting", NeurIPS 2015), as a frame predictor.
//!
//! Each input frame is encoded at full resolution (3x3 conv) and downsampled by a
//! `stride x stride` patch conv; a stack of ConvLSTM cells reads the `t_in` encoded frames, then
//! runs `t_out` more steps without input; after each of those steps a decoder maps the top cell's
//! hidden state (plus the last input frame's features) back to a frame, as a change from the last
//! input frame.
//!
//! Under the method each cell is one prunable layer, asked for its masks once per forward (with
//! the last input frame's features): the same masks hold at every step. The DataMask selects the
//! positions whose state is updated: at a pruned position the gate convolutions are not computed
//! and `h`, `c` carry over unchanged. Hidden channels are the units: a pruned channel's gates are
//! not computed and its state carries over. States start at zero, so with masks fixed for the
//! whole forward a pruned position or channel stays zero; the decoder then sees only the last
//! frame's features there (the CNN's identity path).

use burn::nn::conv::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig};
use burn::nn::PaddingConfig2d;
use burn::prelude::*;
use burn::tensor::activation::{gelu, sigmoid, tanh};

use dyna_pruner_spec::{ConvLstmSpec, Frames};

use super::{BackboneMacs, SpatioTemporal};
use crate::method::MaskSource;

/// One ConvLSTM cell: `gates = input(x) + state(h)`, split into input, forget, output gates and
/// the candidate, each `units` channels.
#[derive(Module, Debug)]
pub(crate) struct Cell<B: Backend> {
    /// 3x3 conv of the cell's input to the 4 gates (with their bias).
    pub(crate) input: Conv2d<B>,
    /// 3x3 conv of the previous hidden state to the 4 gates (no bias).
    pub(crate) state: Conv2d<B>,
}

/// The recurrent state of one cell.
#[derive(Clone)]
struct State<B: Backend> {
    h: Tensor<B, 4>,
    c: Tensor<B, 4>,
}

impl<B: Backend> Cell<B> {
    /// One step; `x` is `None` in the forecast steps (no input). `keep`: 1 where the state is
    /// updated (kept position and kept unit), 0 where it carries over.
    ///
    /// # Shapes
    /// - x: `[batch, in, h, w]`; state: `[batch, units, h, w]` each; keep: `[batch, units, h, w]`
    /// - output: the new state, same shapes
    fn step(&self, x: Option<Tensor<B, 4>>, state: State<B>, keep: Option<&Tensor<B, 4>>) -> State<B> {
        let mut gates = self.state.forward(state.h.clone());
        if let Some(x) = x {
            gates = gates + self.input.forward(x);
        } else if let Some(bias) = &self.input.bias {
            let n = bias.dims()[0];
            gates = gates + bias.val().reshape([1, n, 1, 1]);
        }
        let [i, f, o, g] = gates.chunk(4, 1).try_into().expect("four gates");
        let c = sigmoid(f) * state.c.clone() + sigmoid(i) * tanh(g);
        let h = sigmoid(o) * tanh(c.clone());
        match keep {
            Some(k) => {
                let carry = k.ones_like() - k.clone();
                State { h: h * k.clone() + state.h * carry.clone(), c: c * k.clone() + state.c * carry }
            }
            None => State { h, c },
        }
    }
}

/// The ConvLSTM encoder-forecaster.
#[derive(Module, Debug)]
pub struct ConvLstm<B: Backend> {
    pub(crate) enc_in: Conv2d<B>,
    pub(crate) enc_down: Conv2d<B>,
    pub(crate) cells: Vec<Cell<B>>,
    pub(crate) dec_proj: Conv2d<B>,
    pub(crate) dec_up: ConvTranspose2d<B>,
    pub(crate) dec_out: Conv2d<B>,
    #[module(skip)]
    pub(crate) frames: Frames,
    #[module(skip)]
    pub(crate) spec: ConvLstmSpec,
}

impl<B: Backend> ConvLstm<B> {
    /// A freshly initialised ConvLSTM for `frames` of the given sizes.
    pub fn new(frames: Frames, spec: &ConvLstmSpec, device: &B::Device) -> Self {
        let conv = |i, o, k: usize, bias: bool| {
            Conv2dConfig::new([i, o], [k, k])
                .with_padding(PaddingConfig2d::Explicit(k / 2, k / 2, k / 2, k / 2))
                .with_bias(bias)
                .init(device)
        };
        let s = spec.stride;
        ConvLstm {
            enc_in: conv(frames.channels, spec.hidden, 3, true),
            enc_down: Conv2dConfig::new([spec.hidden, spec.hidden], [s, s]).with_stride([s, s]).init(device),
            cells: (0..spec.cells)
                .map(|l| Cell {
                    input: conv(if l == 0 { spec.hidden } else { spec.units }, 4 * spec.units, 3, true),
                    state: conv(spec.units, 4 * spec.units, 3, false),
                })
                .collect(),
            dec_proj: conv(spec.units, spec.hidden, 1, true),
            dec_up: ConvTranspose2dConfig::new([spec.hidden, spec.hidden], [s, s]).with_stride([s, s]).init(device),
            dec_out: conv(spec.hidden, frames.channels, 3, true),
            frames,
            spec: spec.clone(),
        }
    }

    /// Frames padded to whole state pixels.
    fn padded(&self, h: usize, w: usize) -> (usize, usize) {
        (h.div_ceil(self.spec.stride) * self.spec.stride, w.div_ceil(self.spec.stride) * self.spec.stride)
    }
}

impl<B: Backend> SpatioTemporal<B> for ConvLstm<B> {
    fn forward(&self, x: Tensor<B, 5>, masks: &mut dyn MaskSource<B>) -> Tensor<B, 5> {
        let [b, t_in, c, h, w] = x.dims();
        let (hp, wp) = self.padded(h, w);
        let frames = x.clone().reshape([b * t_in, c, h, w]);
        let full = gelu(self.enc_in.forward(frames));
        let full = if (hp, wp) == (h, w) { full } else { full.pad((0, wp - w, 0, hp - h), 0.0) };
        let low = gelu(self.enc_down.forward(full.clone()));
        let [_, hid, lh, lw] = low.dims();
        let low = low.reshape([b, t_in, hid, lh, lw]);
        let last_low = low.clone().narrow(1, t_in - 1, 1).reshape([b, hid, lh, lw]);

        // One set of masks per cell for the whole forward.
        let keep: Vec<Option<Tensor<B, 4>>> = (0..self.cells.len())
            .map(|l| {
                let m = masks.layer_masks(l, &last_low, self.spec.stride);
                let units = m.units.map(|u| u.reshape([b, self.spec.units, 1, 1]).expand([b, self.spec.units, lh, lw]));
                match (m.space, units) {
                    (Some(s), Some(u)) => Some(u * s),
                    (Some(s), None) => Some(s.expand([b, self.spec.units, lh, lw])),
                    (None, u) => u,
                }
            })
            .collect();

        let zeros = Tensor::<B, 4>::zeros([b, self.spec.units, lh, lw], &x.device());
        let mut states = vec![State { h: zeros.clone(), c: zeros }; self.cells.len()];
        let mut outputs = Vec::with_capacity(self.frames.t_out);
        for t in 0..t_in + self.frames.t_out {
            let mut input = (t < t_in).then(|| low.clone().narrow(1, t, 1).reshape([b, hid, lh, lw]));
            for (l, cell) in self.cells.iter().enumerate() {
                states[l] = cell.step(input, states[l].clone(), keep[l].as_ref());
                input = Some(states[l].h.clone());
            }
            if t >= t_in {
                outputs.push(states.last().expect("at least one cell").h.clone());
            }
        }

        // Decoder, all forecast steps at once.
        let n = self.frames.t_out;
        let top = Tensor::stack::<5>(outputs, 1).reshape([b * n, self.spec.units, lh, lw]);
        let base = last_low.unsqueeze_dim::<5>(1).expand([b, n, hid, lh, lw]).reshape([b * n, hid, lh, lw]);
        let up = gelu(self.dec_up.forward(base + self.dec_proj.forward(top)));
        let skip = full.reshape([b, t_in, hid, hp, wp]).narrow(1, t_in - 1, 1);
        let skip = skip.expand([b, n, hid, hp, wp]).reshape([b * n, hid, hp, wp]);
        let delta = self.dec_out.forward(up + skip).slice([0..b * n, 0..c, 0..h, 0..w]).reshape([b, n, c, h, w]);
        let last = x.narrow(1, t_in - 1, 1);
        last.expand([b, n, c, h, w]) + delta
    }

    fn macs(&self, height: usize, width: usize) -> BackboneMacs {
        let (hp, wp) = self.padded(height, width);
        let (frame, full) = ((height * width) as u64, (hp * wp) as u64);
        let low = full / (self.spec.stride * self.spec.stride) as u64;
        let [hid, units] = [self.spec.hidden as u64, self.spec.units as u64];
        let c = self.enc_in.weight.dims()[1] as u64;
        let t_in = self.frames.t_in as u64;
        let t_out = self.frames.t_out as u64;
        // Encoder per input frame (the first conv on the frame, the patch conv on the padded
        // map); decoder per output frame (the transposed conv's fan-in per padded-map output is
        // `hidden`; the last conv runs on the padded map).
        let encoder = t_in * (frame * 9 * c * hid + full * hid * hid);
        let decoder = t_out * (low * units * hid + full * hid * hid + full * 9 * hid * c);
        let layers = (0..self.cells.len())
            .map(|l| {
                // The first cell reads the encoded frames (input steps only), the others the
                // hidden state below them (every step); every cell reads its own state.
                let input = if l == 0 { t_in * hid } else { (t_in + t_out) * units };
                low * 9 * 4 * units * (input + (t_in + t_out) * units)
            })
            .collect();
        BackboneMacs { fixed: encoder + decoder, spatial: 0, layers, pairwise: vec![0; self.cells.len()] }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuBackend;
    use burn::tensor::Distribution;

    #[test]
    fn pruned_positions_and_units_keep_their_state() {
        let device = Default::default();
        let cell = Cell::<CpuBackend> {
            input: Conv2dConfig::new([3, 8], [3, 3]).with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)).init(&device),
            state: Conv2dConfig::new([2, 8], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .with_bias(false)
                .init(&device),
        };
        let rand =
            |shape: [usize; 4]| Tensor::<CpuBackend, 4>::random(shape, Distribution::Uniform(-1.0, 1.0), &device);
        let state = State { h: rand([1, 2, 4, 4]), c: rand([1, 2, 4, 4]) };
        // Keep unit 1 at position 5 only.
        let mut k = vec![0.0f32; 32];
        k[16 + 5] = 1.0;
        let keep = Tensor::<CpuBackend, 1>::from_floats(k.as_slice(), &device).reshape([1, 2, 4, 4]);
        for x in [Some(rand([1, 3, 4, 4])), None] {
            let next = cell.step(x, state.clone(), Some(&keep));
            for (old, new) in [(&state.h, &next.h), (&state.c, &next.c)] {
                let (o, n): (Vec<f32>, Vec<f32>) =
                    (old.clone().into_data().to_vec().unwrap(), new.clone().into_data().to_vec().unwrap());
                for i in 0..32 {
                    if i == 21 {
                        assert_ne!(o[i], n[i]);
                    } else {
                        assert_eq!(o[i], n[i], "pruned state {i} changed");
                    }
                }
            }
        }
    }
}
