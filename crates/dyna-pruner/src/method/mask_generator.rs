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

/// `w` with `extra` zero slices appended along `dim`, as a trainable leaf if `w` was one.
fn with_zero_slices<B: Backend, const D: usize>(w: Tensor<B, D>, dim: usize, extra: usize) -> Tensor<B, D> {
    let trainable = w.is_require_grad();
    let mut shape = w.dims();
    shape[dim] = extra;
    let zeros = Tensor::zeros(shape, &w.device());
    Tensor::cat(vec![w, zeros], dim).detach().set_require_grad(trainable)
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

    /// This generator as a budget-conditioned one of `spec` (same width and motion input): its
    /// first convolution also reads the keep ratios, with zero weights, so S is unchanged until
    /// training moves them.
    pub fn conditioned_on_budget(mut self, spec: GeneratorSpec) -> Self {
        debug_assert_eq!((spec.width, spec.motion), (self.spec.width, self.spec.motion));
        let extra = spec.budget_inputs() - self.spec.budget_inputs();
        self.conv1.weight = self.conv1.weight.map(|w| with_zero_slices(w, 1, extra));
        self.spec = spec;
        self
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

    /// This gate also reading the keep ratios (`budget_inputs` of them, none before), with zero
    /// weights: its scores are unchanged until training moves them.
    pub fn conditioned_on_budget(mut self, budget_inputs: usize) -> Self {
        debug_assert_eq!(self.linear.weight.dims()[0], self.in_channels + 1);
        self.linear.weight = self.linear.weight.map(|w| with_zero_slices(w, 0, budget_inputs));
        self
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

    /// A trained generator and gate taken over by a budget-conditioned model score as before at
    /// every keep ratio, until training moves the new weights.
    #[test]
    fn conditioning_on_the_budget_leaves_the_scores_unchanged() {
        let device = Default::default();
        let x = Tensor::<CpuBackend, 5>::random([2, 3, 2, 8, 8], burn::tensor::Distribution::Default, &device);
        let spec = GeneratorSpec { width: 8, ..GeneratorSpec::default() };
        let conditioned_spec = GeneratorSpec { keep_range: Some([0.2, 0.9].into()), ..spec };
        let generator = MaskGenerator::<CpuBackend>::new(2, 2, spec, &device);
        let gate = UnitGateConfig::new(2, 5).init::<CpuBackend>(&device);
        let features = x.clone().narrow(1, 2, 1).reshape([2, 2, 8, 8]);
        let importance = Tensor::<CpuBackend, 4>::random([2, 1, 8, 8], burn::tensor::Distribution::Default, &device);
        let plain = Masking::top_k(crate::method::MaskMode::Both, 0.5, 0.5);
        let values = |t: Tensor<CpuBackend, 3>| t.into_data().to_vec::<f32>().unwrap();
        let s = values(generator.forward(x.clone(), &plain));
        let g = values(gate.forward(features.clone(), importance.clone(), &plain).unsqueeze());
        let (generator, gate) = (generator.conditioned_on_budget(conditioned_spec), gate.conditioned_on_budget(2));
        for keep in [0.2, 0.5, 0.9] {
            let masking = Masking::top_k(crate::method::MaskMode::Both, keep, 1.0 - keep);
            // Equal up to f32 rounding: the convolution sums more (zero) terms.
            let close = |a: Vec<f32>, b: &[f32]| a.iter().zip(b).all(|(a, b)| (a - b).abs() < 1e-6);
            assert!(close(values(generator.forward(x.clone(), &masking)), &s), "keep {keep}");
            let scores = gate.forward(features.clone(), importance.clone(), &masking);
            assert!(close(values(scores.unsqueeze()), &g), "keep {keep}");
        }
        assert_eq!(generator.conv1.weight.dims()[1], 3 * 2 + 2);
        assert_eq!(gate.linear.weight.dims()[0], 2 + 1 + 2);
    }

    /// The widened weights stay trainable parameters (the trainer takes a model over this way).
    #[test]
    fn the_budget_weights_of_a_conditioned_gate_get_gradients() {
        type T = crate::TrainBackend;
        let device = Default::default();
        let gate = UnitGateConfig::new(3, 4).init::<T>(&device).conditioned_on_budget(2);
        let features = Tensor::<T, 4>::random([2, 3, 4, 4], burn::tensor::Distribution::Default, &device);
        let importance = Tensor::<T, 4>::ones([2, 1, 4, 4], &device);
        let masking = Masking::top_k(crate::method::MaskMode::Both, 0.5, 0.5);
        let grads = gate.forward(features, importance, &masking).sum().backward();
        let grad = gate.linear.weight.grad(&grads).expect("a gradient for the gate's weights");
        assert_eq!(grad.dims(), [3 + 1 + 2, 4]);
        let budget_rows: Vec<f32> = grad.narrow(0, 4, 2).into_data().to_vec().unwrap();
        assert!(budget_rows.iter().any(|g| *g != 0.0), "{budget_rows:?}");
    }
}
