//! SimVP-style CNN backbone (Gao et al., "SimVP: Simpler yet Better Video Prediction", CVPR 2022),
//! with the translator made of masked residual blocks.
//!
//! Input frames are stacked as channels; a strided conv encoder maps them to a feature map, a
//! translator of residual blocks `x + M * F(x)` evolves it, and a decoder with a skip from the
//! first encoder layer predicts the change from the last input frame. In a masked block, F runs
//! only on kept positions (its hidden map is zero elsewhere, so the second conv reads no halo of
//! pruned work) and only with kept hidden filters; pruned positions take the identity path.
//! Under [`DataScope::Network`] the encoder's maps and the decoder's change are also zero off
//! the kept patches (a convolution reads zeros there), so those layers too compute kept patches
//! only, and pruned patches predict their last input frame.
//! No normalization layers: batch- or group-statistics would couple kept and pruned positions.

use burn::nn::conv::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig};
use burn::nn::PaddingConfig2d;
use burn::prelude::*;
use burn::tensor::activation::gelu;

use dyna_pruner_spec::{CnnSpec, DataScope, Frames};

use super::{BackboneMacs, SpatioTemporal};
use crate::method::MaskSource;

/// `x + M_space * conv2(M_space * (gelu(conv1(x)) * M_units))`.
#[derive(Module, Debug)]
pub(crate) struct MaskedBlock<B: Backend> {
    pub(crate) conv1: Conv2d<B>,
    pub(crate) conv2: Conv2d<B>,
}

impl<B: Backend> MaskedBlock<B> {
    /// # Shapes
    /// - x: `[batch, hidden, h, w]`; space: `[batch, 1, h, w]`; units: `[batch, units]`
    /// - output: `[batch, hidden, h, w]`
    fn forward(&self, x: Tensor<B, 4>, space: Option<Tensor<B, 4>>, units: Option<Tensor<B, 2>>) -> Tensor<B, 4> {
        let mut hidden = gelu(self.conv1.forward(x.clone()));
        if let Some(u) = units {
            let [b, k] = u.dims();
            hidden = hidden * u.reshape([b, k, 1, 1]);
        }
        if let Some(s) = &space {
            hidden = hidden * s.clone();
        }
        let update = self.conv2.forward(hidden);
        match space {
            Some(s) => x + update * s,
            None => x + update,
        }
    }
}

/// The SimVP-style CNN.
#[derive(Module, Debug)]
pub struct Cnn<B: Backend> {
    pub(crate) enc_in: Conv2d<B>,
    pub(crate) enc_down: Conv2d<B>,
    pub(crate) blocks: Vec<MaskedBlock<B>>,
    pub(crate) dec_up: Option<ConvTranspose2d<B>>,
    pub(crate) dec_out: Conv2d<B>,
    #[module(skip)]
    pub(crate) frames: Frames,
    #[module(skip)]
    pub(crate) spec: CnnSpec,
}

/// The DataMask at the encoder's and decoder's resolutions (`DataScope::Network`).
pub(crate) struct OuterMasks<B: Backend> {
    /// `[batch, 1, h, w]`.
    pub(crate) full: Tensor<B, 4>,
    /// `[batch, 1, ceil(h / stride), ceil(w / stride)]`.
    pub(crate) low: Tensor<B, 4>,
}

impl<B: Backend> Cnn<B> {
    /// A freshly initialised CNN for `frames` of the given sizes.
    pub fn new(frames: Frames, spec: &CnnSpec, device: &B::Device) -> Self {
        let s = spec;
        let conv3 = |i, o, stride| {
            Conv2dConfig::new([i, o], [3, 3])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device)
        };
        let up = (s.stride > 1).then(|| {
            ConvTranspose2dConfig::new([s.hidden, s.hidden], [s.stride, s.stride])
                .with_stride([s.stride, s.stride])
                .init(device)
        });
        Cnn {
            enc_in: conv3(frames.t_in * frames.channels, s.hidden, 1),
            enc_down: conv3(s.hidden, s.hidden, s.stride),
            blocks: (0..s.blocks)
                .map(|_| MaskedBlock { conv1: conv3(s.hidden, s.units, 1), conv2: conv3(s.units, s.hidden, 1) })
                .collect(),
            dec_up: up,
            dec_out: conv3(s.hidden, frames.t_out * frames.channels, 1),
            frames,
            spec: spec.clone(),
        }
    }

    /// The DataMask at the encoder's and decoder's resolutions, when it prunes them.
    pub(crate) fn outer_masks(&self, masks: &mut dyn MaskSource<B>, h: usize, w: usize) -> Option<OuterMasks<B>> {
        if self.spec.data_scope != DataScope::Network {
            return None;
        }
        let s = self.spec.stride;
        Some(OuterMasks { full: masks.space_mask(h, w, 1)?, low: masks.space_mask(h.div_ceil(s), w.div_ceil(s), s)? })
    }

    /// The encoder: the skip map at full resolution and the translator's input.
    ///
    /// # Shapes
    /// - x: `[batch, t_in, channels, h, w]`
    /// - output: skip `[batch, hidden, h, w]`, z `[batch, hidden, ceil(h / stride), ceil(w / stride)]`
    pub(crate) fn encode(&self, x: Tensor<B, 5>, outer: Option<&OuterMasks<B>>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [b, t, c, h, w] = x.dims();
        let mut skip = gelu(self.enc_in.forward(x.reshape([b, t * c, h, w])));
        if let Some(m) = outer {
            skip = skip * m.full.clone();
        }
        let mut z = gelu(self.enc_down.forward(skip.clone()));
        if let Some(m) = outer {
            z = z * m.low.clone();
        }
        (skip, z)
    }

    /// The decoder: the change from the last input frame, added to it.
    ///
    /// # Shapes
    /// - z: `[batch, hidden, h2, w2]`; skip: `[batch, hidden, h, w]`; x: the input `[batch, t_in, c, h, w]`
    /// - output: `[batch, t_out, channels, h, w]`
    pub(crate) fn decode(
        &self,
        mut z: Tensor<B, 4>,
        skip: Tensor<B, 4>,
        x: Tensor<B, 5>,
        outer: Option<&OuterMasks<B>>,
    ) -> Tensor<B, 5> {
        let [b, t, c, h, w] = x.dims();
        if let Some(up) = &self.dec_up {
            z = gelu(up.forward(z));
            let [_, _, zh, zw] = z.dims();
            if (zh, zw) != (h, w) {
                z = z.slice([0..b, 0..self.spec.hidden, 0..h, 0..w]);
            }
        }
        let mut features = z + skip;
        if let Some(m) = outer {
            features = features * m.full.clone();
        }
        let mut delta = self.dec_out.forward(features);
        if let Some(m) = outer {
            delta = delta * m.full.clone();
        }
        let delta = delta.reshape([b, self.frames.t_out, self.frames.channels, h, w]);
        let last = x.narrow(1, t - 1, 1).reshape([b, 1, c, h, w]);
        last.expand([b, self.frames.t_out, self.frames.channels, h, w]) + delta
    }
}

impl<B: Backend> SpatioTemporal<B> for Cnn<B> {
    fn forward(&self, x: Tensor<B, 5>, masks: &mut dyn MaskSource<B>) -> Tensor<B, 5> {
        let [_, _, _, h, w] = x.dims();
        let outer = self.outer_masks(masks, h, w);
        let (skip, mut z) = self.encode(x.clone(), outer.as_ref());
        for (l, block) in self.blocks.iter().enumerate() {
            let m = masks.layer_masks(l, &z, self.spec.stride);
            z = block.forward(z, m.space, m.units);
        }
        self.decode(z, skip, x, outer.as_ref())
    }

    fn macs(&self, height: usize, width: usize) -> BackboneMacs {
        let full = (height * width) as u64;
        let low = (height.div_ceil(self.spec.stride) * width.div_ceil(self.spec.stride)) as u64;
        let [hid, units] = [self.spec.hidden as u64, self.spec.units as u64];
        let t_in_c = self.enc_in.weight.dims()[1] as u64;
        let out_c = (self.frames.t_out * self.frames.channels) as u64;
        let s2 = (self.spec.stride * self.spec.stride) as u64;
        let up = if self.dec_up.is_some() { low * s2 * hid * hid } else { 0 };
        let outer = full * 9 * t_in_c * hid + low * 9 * hid * hid + up + full * 9 * hid * out_c;
        let network = self.spec.data_scope == DataScope::Network;
        BackboneMacs {
            fixed: if network { 0 } else { outer },
            spatial: if network { outer } else { 0 },
            layers: vec![low * 9 * 2 * hid * units; self.blocks.len()],
            pairwise: vec![0; self.blocks.len()],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuBackend;
    use burn::tensor::Distribution;

    #[test]
    fn pruned_positions_take_the_identity_path() {
        let device = Default::default();
        let block = MaskedBlock::<CpuBackend> {
            conv1: Conv2dConfig::new([4, 6], [3, 3]).with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)).init(&device),
            conv2: Conv2dConfig::new([6, 4], [3, 3]).with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)).init(&device),
        };
        let x: Tensor<CpuBackend, 4> = Tensor::random([1, 4, 5, 5], Distribution::Uniform(-1.0, 1.0), &device);
        let mut m = vec![0.0f32; 25];
        m[12] = 1.0; // keep only the centre
        let space = Tensor::<CpuBackend, 1>::from_floats(m.as_slice(), &device).reshape([1, 1, 5, 5]);
        let y = block.forward(x.clone(), Some(space), None);
        let (xv, yv): (Vec<f32>, Vec<f32>) = (x.into_data().to_vec().unwrap(), y.into_data().to_vec().unwrap());
        for c in 0..4 {
            for p in 0..25 {
                let i = c * 25 + p;
                if p == 12 {
                    assert_ne!(xv[i], yv[i]);
                } else {
                    assert_eq!(xv[i], yv[i], "pruned position {p} of channel {c} changed");
                }
            }
        }
    }
}
