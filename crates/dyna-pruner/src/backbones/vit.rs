//! ViT over space-time patches (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021),
//! as a frame predictor: each `patch x patch` cell of the `t_in` input frames is one token, a
//! pre-norm Transformer encoder mixes the tokens, and a linear head maps each token back to its
//! cell of the `t_out` output frames (as a change from the last input frame).
//!
//! Under the method (DynamicViT-style token dropping, with heads and MLP units as units): the
//! DataMask keeps a fixed number of tokens per sample; dropped tokens skip every encoder layer
//! (they are neither queries nor keys) and reach the head unchanged. Each encoder layer is two
//! prunable layers: attention (units = heads) and MLP (units = hidden units). Positions are a
//! fixed 2-D sine-cosine encoding, so any grid size works.

use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::{gelu, softmax};

use dyna_pruner_spec::{Frames, VitSpec};

use super::{BackboneMacs, SpatioTemporal};
use crate::method::MaskSource;

/// Pre-norm encoder layer: `x + M_t * Attn(LN x)` then `x + M_t * MLP(LN x)`.
#[derive(Module, Debug)]
pub(crate) struct EncoderLayer<B: Backend> {
    pub(crate) norm1: LayerNorm<B>,
    pub(crate) qkv: Linear<B>,
    pub(crate) proj: Linear<B>,
    pub(crate) norm2: LayerNorm<B>,
    pub(crate) fc1: Linear<B>,
    pub(crate) fc2: Linear<B>,
}

/// Added to the attention logits of dropped keys: their softmax weight is exactly 0 in f32.
const DROPPED_KEY: f32 = -1e9;

impl<B: Backend> EncoderLayer<B> {
    /// Attention over the kept tokens, with kept heads only.
    ///
    /// # Shapes
    /// - x: `[batch, tokens, dim]`; keep: `[batch, tokens]` (0/1); heads: `[batch, heads]`
    /// - output: `[batch, tokens, dim]`
    fn attention(
        &self,
        x: Tensor<B, 3>,
        keep: Option<&Tensor<B, 2>>,
        heads: Option<Tensor<B, 2>>,
        n_heads: usize,
    ) -> Tensor<B, 3> {
        let [b, n, d] = x.dims();
        let dh = d / n_heads;
        let qkv = self.qkv.forward(self.norm1.forward(x)).reshape([b, n, 3, n_heads, dh]).permute([2, 0, 3, 1, 4]);
        let part = |i: usize| qkv.clone().narrow(0, i, 1).reshape([b, n_heads, n, dh]);
        let (q, k, v) = (part(0), part(1), part(2));
        let mut logits = q.matmul(k.swap_dims(2, 3)) / (dh as f64).sqrt();
        if let Some(keep) = keep {
            // The gradient of the token mask flows through the residual gate, not through here;
            // re-binarised because a straight-through 0/1 carries rounding noise that 1e9 would amplify.
            let bias = keep.clone().detach().lower_elem(0.5).float() * DROPPED_KEY;
            logits = logits + bias.reshape([b, 1, 1, n]);
        }
        let mut out = softmax(logits, 3).matmul(v);
        if let Some(h) = heads {
            out = out * h.reshape([b, n_heads, 1, 1]);
        }
        self.proj.forward(out.swap_dims(1, 2).reshape([b, n, d]))
    }

    /// # Shapes
    /// - x: `[batch, tokens, dim]`; units: `[batch, mlp]`
    /// - output: `[batch, tokens, dim]`
    fn mlp(&self, x: Tensor<B, 3>, units: Option<Tensor<B, 2>>) -> Tensor<B, 3> {
        let mut hidden = gelu(self.fc1.forward(self.norm2.forward(x)));
        if let Some(u) = units {
            let [b, k] = u.dims();
            hidden = hidden * u.reshape([b, 1, k]);
        }
        self.fc2.forward(hidden)
    }
}

/// The ViT frame predictor.
#[derive(Module, Debug)]
pub struct Vit<B: Backend> {
    pub(crate) embed: Linear<B>,
    pub(crate) layers: Vec<EncoderLayer<B>>,
    pub(crate) norm: LayerNorm<B>,
    pub(crate) head: Linear<B>,
    #[module(skip)]
    frames: Frames,
    patch: usize,
    #[module(skip)]
    spec: VitSpec,
}

/// Token map `[batch, tokens, dim]` as a feature map `[batch, dim, hp, wp]` (what the unit gates pool).
fn as_map<B: Backend>(x: &Tensor<B, 3>, hp: usize, wp: usize) -> Tensor<B, 4> {
    let [b, _, d] = x.dims();
    x.clone().reshape([b, hp, wp, d]).permute([0, 3, 1, 2])
}

/// Residual update applied at kept tokens only: `x + keep * update`.
fn gated<B: Backend>(x: Tensor<B, 3>, update: Tensor<B, 3>, keep: Option<&Tensor<B, 2>>) -> Tensor<B, 3> {
    match keep {
        Some(k) => {
            let [b, n] = k.dims();
            x + update * k.clone().reshape([b, n, 1])
        }
        None => x + update,
    }
}

impl<B: Backend> Vit<B> {
    /// A freshly initialised ViT for `frames` of the given sizes, one token per `patch x patch` cell.
    pub fn new(frames: Frames, patch: usize, spec: &VitSpec, device: &B::Device) -> Self {
        let cell = patch * patch;
        let linear = |i, o| LinearConfig::new(i, o).init(device);
        let norm = || LayerNormConfig::new(spec.dim).init(device);
        Vit {
            embed: linear(frames.t_in * frames.channels * cell, spec.dim),
            layers: (0..spec.layers)
                .map(|_| EncoderLayer {
                    norm1: norm(),
                    qkv: linear(spec.dim, 3 * spec.dim),
                    proj: linear(spec.dim, spec.dim),
                    norm2: norm(),
                    fc1: linear(spec.dim, spec.mlp),
                    fc2: linear(spec.mlp, spec.dim),
                })
                .collect(),
            norm: norm(),
            head: linear(spec.dim, frames.t_out * frames.channels * cell),
            frames,
            patch,
            spec: spec.clone(),
        }
    }

    fn tokens_per_side(&self, h: usize, w: usize) -> (usize, usize) {
        (h.div_ceil(self.patch), w.div_ceil(self.patch))
    }
}

impl<B: Backend> SpatioTemporal<B> for Vit<B> {
    fn forward(&self, x: Tensor<B, 5>, masks: &mut dyn MaskSource<B>) -> Tensor<B, 5> {
        let [b, t, c, h, w] = x.dims();
        let p = self.patch;
        let (hp, wp) = self.tokens_per_side(h, w);
        let n = hp * wp;
        let last = x.clone().narrow(1, t - 1, 1).reshape([b, 1, c, h, w]);
        // Patchify: zero-pad to whole patches, one token per cell with features (t, c, py, px).
        let padded =
            x.reshape([b, t * c, h, w]).pad((0, wp * p - w, 0, hp * p - h), burn::tensor::ops::PadMode::Constant(0.0));
        let cells = padded.reshape([b, t * c, hp, p, wp, p]).permute([0, 2, 4, 1, 3, 5]).reshape([b, n, t * c * p * p]);
        let positions = dyna_pruner_exec::vit::position_encoding(hp, wp, self.spec.dim);
        let pos = Tensor::<B, 1>::from_floats(positions.as_slice(), &cells.device()).reshape([1, n, self.spec.dim]);
        let mut z = self.embed.forward(cells) + pos;
        for (l, layer) in self.layers.iter().enumerate() {
            let m = masks.layer_masks(2 * l, &as_map(&z, hp, wp), p);
            let keep = m.space.map(|s| s.reshape([b, n]));
            let update = layer.attention(z.clone(), keep.as_ref(), m.units, self.spec.heads);
            z = gated(z, update, keep.as_ref());
            let m = masks.layer_masks(2 * l + 1, &as_map(&z, hp, wp), p);
            let update = layer.mlp(z.clone(), m.units);
            z = gated(z, update, keep.as_ref());
        }
        let out = self.head.forward(self.norm.forward(z));
        let delta = out
            .reshape([b, hp, wp, self.frames.t_out * self.frames.channels, p, p])
            .permute([0, 3, 1, 4, 2, 5])
            .reshape([b, self.frames.t_out, self.frames.channels, hp * p, wp * p])
            .slice([0..b, 0..self.frames.t_out, 0..self.frames.channels, 0..h, 0..w]);
        last.expand([b, self.frames.t_out, c, h, w]) + delta
    }

    fn macs(&self, height: usize, width: usize) -> BackboneMacs {
        let (hp, wp) = self.tokens_per_side(height, width);
        let n = (hp * wp) as u64;
        let [d, mlp] = [self.spec.dim as u64, self.spec.mlp as u64];
        let [cells_in, _] = self.embed.weight.dims();
        let [_, cells_out] = self.head.weight.dims();
        let mut layers = Vec::new();
        let mut pairwise = Vec::new();
        for _ in &self.layers {
            // attention: q, k, v and the output projection per token; logits and weighted sum per pair
            layers.extend([n * 4 * d * d, n * 2 * d * mlp]);
            pairwise.extend([n * n * 2 * d, 0]);
        }
        BackboneMacs { fixed: n * (cells_in as u64 * d + d * cells_out as u64), spatial: 0, layers, pairwise }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::{LayerMasks, NoMasks};
    use crate::CpuBackend;
    use burn::tensor::Distribution;

    /// Keeps the given tokens in every layer.
    struct KeepTokens(Tensor<CpuBackend, 4>);

    impl MaskSource<CpuBackend> for KeepTokens {
        fn layer_masks(&mut self, _: usize, _: &Tensor<CpuBackend, 4>, _: usize) -> LayerMasks<CpuBackend> {
            LayerMasks { space: Some(self.0.clone()), units: None }
        }

        fn space_mask(&mut self, _: usize, _: usize, _: usize) -> Option<Tensor<CpuBackend, 4>> {
            Some(self.0.clone())
        }
    }

    #[test]
    fn dropped_tokens_neither_change_nor_influence() {
        let device = Default::default();
        let frames = Frames { t_in: 3, t_out: 2, channels: 1 };
        let vit = Vit::<CpuBackend>::new(frames, 2, &VitSpec { dim: 8, heads: 2, mlp: 6, layers: 2 }, &device);
        let x: Tensor<CpuBackend, 5> = Tensor::random([1, 3, 1, 6, 5], Distribution::Uniform(-1.0, 1.0), &device);
        // 3x3 tokens; keep tokens 0 and 4
        let mut keep = vec![0.0f32; 9];
        keep[0] = 1.0;
        keep[4] = 1.0;
        let keep = Tensor::<CpuBackend, 1>::from_floats(keep.as_slice(), &device).reshape([1, 1, 3, 3]);
        let y = vit.forward(x.clone(), &mut KeepTokens(keep.clone()));
        // Changing the input inside a dropped token changes only that token's own output cell.
        let mut x2: Vec<f32> = x.clone().into_data().to_vec().unwrap();
        x2[2 * 30 + 4 * 5 + 4] += 1.0; // last frame, row 4, column 4: token (2, 2)
        let x2 = Tensor::<CpuBackend, 1>::from_floats(x2.as_slice(), &device).reshape([1, 3, 1, 6, 5]);
        let y2 = vit.forward(x2, &mut KeepTokens(keep));
        let (a, b): (Vec<f32>, Vec<f32>) = (y.into_data().to_vec().unwrap(), y2.into_data().to_vec().unwrap());
        for (i, (u, v)) in a.iter().zip(&b).enumerate() {
            let (r, c) = (i % 30 / 5, i % 5);
            if r / 2 != 2 || c / 2 != 2 {
                assert_eq!(u, v, "output {i} (row {r}, col {c}) outside the dropped token changed");
            }
        }
        let dense = vit.forward(x, &mut NoMasks);
        assert_eq!(dense.dims(), [1, 2, 1, 6, 5]);
    }
}
