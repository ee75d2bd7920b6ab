//! The lightweight mask generator `g_mask(X; phi)`: input frames -> one importance map S over
//! spatial patches, and the unit gates that turn S-weighted layer features into unit scores.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::{gelu, sigmoid};
use burn::tensor::module::{avg_pool2d, max_pool2d};
use dyna_pruner_spec::{stats_per_channel, GeneratorSpec, Masking};

/// Scores each patch from per-patch statistics of the last frame and of the last temporal
/// difference, with two 3x3 convolutions at patch resolution so neighbours inform each other.
#[derive(Module, Debug)]
pub struct MaskGenerator<B: Backend> {
    pub(crate) conv1: Conv2d<B>,
    pub(crate) conv2: Conv2d<B>,
    pub(crate) head: Conv2d<B>,
    channels: usize,
    patch: usize,
    #[module(skip)]
    spec: GeneratorSpec,
}

impl<B: Backend> MaskGenerator<B> {
    /// A freshly initialised generator for frames of `channels` channels and patches of
    /// `patch x patch` pixels. With `spec.motion` it also reads the signed mean of the last
    /// temporal difference per patch: positive where values arrive, so S can follow motion.
    pub fn new(channels: usize, patch: usize, spec: GeneratorSpec, device: &B::Device) -> Self {
        let conv = |i, o, k| {
            Conv2dConfig::new([i, o], [k, k])
                .with_padding(if k == 3 { PaddingConfig2d::Explicit(1, 1, 1, 1) } else { PaddingConfig2d::Valid })
                .init(device)
        };
        MaskGenerator {
            conv1: conv(stats_per_channel(spec.motion) * channels + spec.budget_inputs(), spec.width, 3),
            conv2: conv(spec.width, spec.width, 3),
            head: conv(spec.width, 1, 1),
            channels,
            patch,
            spec,
        }
    }
}

/// Patch-grid side for a frame side: `ceil(side / patch)`.
pub fn patch_grid(side: usize, patch: usize) -> usize {
    side.div_ceil(patch)
}

impl<B: Backend> MaskGenerator<B> {
    /// Importance map S in [0, 1]. A budget-conditioned generator also reads `masking`'s keep
    /// ratios (as constant input maps); the others ignore it.
    ///
    /// # Shapes
    /// - x: `[batch, t_in, channels, height, width]`
    /// - output: `[batch, ceil(height / patch), ceil(width / patch)]`
    pub fn forward(&self, x: Tensor<B, 5>, masking: &Masking) -> Tensor<B, 3> {
        let [b, t, c, h, w] = x.dims();
        let last = x.clone().narrow(1, t - 1, 1).reshape([b, c, h, w]);
        let diff = if t > 1 { last.clone() - x.narrow(1, t - 2, 1).reshape([b, c, h, w]) } else { last.zeros_like() };
        let p = [self.patch, self.patch];
        let mean = |v: Tensor<B, 4>| avg_pool2d(v, p, p, [0, 0], false, true);
        let mut stats =
            vec![mean(last.clone()), max_pool2d(last, p, p, [0, 0], [1, 1], true), mean(diff.clone().abs())];
        if self.spec.motion {
            stats.push(mean(diff));
        }
        if self.spec.keep_range.is_some() {
            let [_, _, hp, wp] = stats[0].dims();
            let device = stats[0].device();
            stats.extend(masking.budget_inputs().map(|keep| Tensor::full([b, 1, hp, wp], keep, &device)));
        }
        let stats = Tensor::cat(stats, 1);
        let hidden = gelu(self.conv2.forward(gelu(self.conv1.forward(stats))));
        let logits = self.head.forward(hidden);
        let [_, _, hp, wp] = logits.dims();
        sigmoid(logits).reshape([b, hp, wp])
    }

    /// MACs per sample: pooling reads (counted as one MAC per element) plus the convolutions.
    pub fn macs(&self, height: usize, width: usize) -> u64 {
        let channels = self.channels;
        let (hp, wp) = (patch_grid(height, self.patch), patch_grid(width, self.patch));
        let cells = (hp * wp) as u64;
        let stats = stats_per_channel(self.spec.motion);
        let pooling = ((stats + 1) * channels * height * width) as u64;
        let w = self.spec.width as u64;
        let inputs = (stats * channels + self.spec.budget_inputs()) as u64;
        pooling + cells * (9 * inputs * w + 9 * w * w + w)
    }
}

/// Configuration of [`UnitGate`].
#[derive(Config, Debug)]
pub struct UnitGateConfig {
    /// Channels of the gated layer's input.
    pub in_channels: usize,
    /// Prunable units of the layer.
    pub units: usize,
    /// Extra inputs: the keep ratios of a budget-conditioned model
    /// ([`GeneratorSpec::budget_inputs`]).
    #[config(default = 0)]
    pub budget_inputs: usize,
}

/// ModelMask scores of one prunable layer: `g = sigmoid(W [z; mean(S); keep] + b)` with
/// `z = sum(S * f) / sum(S)`, the S-weighted pooled features of the layer input, and `keep`
/// the forward's keep ratios for a budget-conditioned model (nothing otherwise).
#[derive(Module, Debug)]
pub struct UnitGate<B: Backend> {
    pub(crate) linear: Linear<B>,
    #[module(skip)]
    in_channels: usize,
}

impl UnitGateConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> UnitGate<B> {
        let inputs = self.in_channels + 1 + self.budget_inputs;
        UnitGate { linear: LinearConfig::new(inputs, self.units).init(device), in_channels: self.in_channels }
    }
}

impl<B: Backend> UnitGate<B> {
    /// Unit scores in [0, 1] (a budget-conditioned gate also reads `masking`'s keep ratios).
    ///
    /// # Shapes
    /// - features: `[batch, in_channels, h, w]`
    /// - importance: `[batch, 1, h, w]` (S resized to the layer's resolution)
    /// - output: `[batch, units]`
    pub fn forward(&self, features: Tensor<B, 4>, importance: Tensor<B, 4>, masking: &Masking) -> Tensor<B, 2> {
        let [b, c, h, w] = features.dims();
        let weighted = (features * importance.clone()).sum_dims(&[2, 3]).reshape([b, c]);
        let mass = importance.sum_dims(&[2, 3]).reshape([b, 1]);
        self.forward_pooled(weighted, mass, h * w, masking)
    }

    /// Unit scores from the pooled sums, for callers that pool their own layout.
    ///
    /// # Shapes
    /// - weighted: `[batch, in_channels]`, the sum of `S * f` over the layer's `pixels`
    /// - mass: `[batch, 1]`, the sum of S over them
    /// - output: `[batch, units]`
    pub fn forward_pooled(
        &self,
        weighted: Tensor<B, 2>,
        mass: Tensor<B, 2>,
        pixels: usize,
        masking: &Masking,
    ) -> Tensor<B, 2> {
        let [b, _] = weighted.dims();
        let z = weighted / (mass.clone() + 1e-6);
        let density = mass / pixels as f64;
        let mut inputs = vec![z, density];
        if self.linear.weight.dims()[0] > self.in_channels + 1 {
            let keep = masking.budget_inputs();
            inputs.push(Tensor::<B, 1>::from_floats(keep, &inputs[0].device()).reshape([1, 2]).expand([b, 2]));
        }
        sigmoid(self.linear.forward(Tensor::cat(inputs, 1)))
    }

    /// MACs per sample at a layer resolution of `pixels`.
    pub fn macs(&self, pixels: usize) -> u64 {
        let [inputs, units] = self.linear.weight.dims();
        (pixels * self.in_channels + inputs * units) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuBackend;

    /// Two inputs whose last frames and |differences| agree but whose differences have opposite
    /// signs (something arriving vs leaving): only the motion-aware generator tells them apart.
    #[test]
    fn only_the_motion_generator_sees_the_direction_of_change() {
        let device = Default::default();
        let frames = |prev: f32| {
            let mut v = vec![prev; 16];
            v.extend([0.5f32; 16]);
            Tensor::<CpuBackend, 1>::from_floats(v.as_slice(), &device).reshape([1, 2, 1, 4, 4])
        };
        let (arriving, leaving) = (frames(0.25), frames(0.75));
        for motion in [false, true] {
            let spec = GeneratorSpec { width: 16, motion, ..GeneratorSpec::default() };
            let generator = MaskGenerator::<CpuBackend>::new(1, 2, spec, &device);
            let s =
                |x: Tensor<CpuBackend, 5>| generator.forward(x, &Masking::DENSE).into_data().to_vec::<f32>().unwrap();
            let (a, l) = (s(arriving.clone()), s(leaving.clone()));
            assert_eq!(a != l, motion, "motion {motion}: {a:?} vs {l:?}");
        }
    }
}
