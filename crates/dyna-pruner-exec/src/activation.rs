//! Element-wise activations in f32: the exact GELU of the training framework (through a fast
//! `erf`), the sigmoid, and a fast `tanh` for the ConvLSTM's cell update.

use rayon::prelude::*;

/// `erf(x)` in f32 as a branch-free rational function of x (the approximation Eigen and
/// TensorFlow use for f32): within 5e-7 of `libm::erff` and far cheaper than it, which matters
/// because GELU runs on every feature-map element.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    erf_with(x, |a, b, c| a * b + c)
}

/// `erf`'s rational function: the numerator's coefficients in `x^2` (highest power first),
/// then the denominator's; the vector kernels in `fma` evaluate the same polynomials.
#[allow(clippy::excessive_precision)] // the published coefficients, rounded by the compiler
pub(crate) const ERF_P: [f32; 7] = [
    -2.726_142_2e-10,
    2.770_681_4e-8,
    -2.101_024e-6,
    -5.692_506_4e-5,
    -7.349_906_3e-4,
    -2.954_600_1e-3,
    -1.609_603_3e-2,
];
#[allow(clippy::excessive_precision)]
pub(crate) const ERF_Q: [f32; 5] = [-1.456_607_2e-5, -2.133_740_6e-4, -1.682_827e-3, -7.373_329_3e-3, -1.426_473_9e-2];

/// [`erf`] with its multiply-adds done by `madd(a, b, c) = a * b + c` (fused or not).
#[inline(always)]
fn erf_with(x: f32, madd: impl Fn(f32, f32, f32) -> f32) -> f32 {
    odd_rational(x, 4.0, (&ERF_P, &ERF_Q), &madd)
}

/// `x p(x^2) / q(x^2)` with `x` clamped to `[-bound, bound]`, the polynomials' coefficients
/// highest power first and evaluated by Horner's rule through `madd(a, b, c) = a * b + c`: the
/// form of the branch-free `erf` and `tanh` approximations.
#[inline(always)]
fn odd_rational(x: f32, bound: f32, (p, q): (&[f32], &[f32]), madd: &impl Fn(f32, f32, f32) -> f32) -> f32 {
    let x = x.clamp(-bound, bound);
    let x2 = x * x;
    let horner = |coefficients: &[f32]| coefficients[1..].iter().fold(coefficients[0], |acc, &k| madd(x2, acc, k));
    x * horner(p) / horner(q)
}

/// `0.5 x (1 + erf(x / sqrt 2))`, the exact GELU the training framework uses.
#[inline(always)]
pub fn gelu_in_place(v: &mut f32) {
    *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2));
}

/// GELU over a slice, vectorized with AVX2 and fused multiply-adds where the CPU has them (the
/// default x86-64 target only allows SSE2, and GELU runs on every feature-map element). The
/// fused path rounds the polynomial's steps once instead of twice: within 1e-6 of
/// `gelu_in_place` (tested). The convolutions apply the same GELU in their kernel (`fma`);
/// this one serves the ViT.
pub fn gelu_slice(values: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: `gelu_avx2` only requires AVX2 and FMA, which were just detected on this CPU.
        #[allow(unsafe_code)]
        unsafe {
            gelu_avx2(values)
        };
        return;
    }
    values.iter_mut().for_each(gelu_in_place);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gelu_avx2(values: &mut [f32]) {
    for v in values.iter_mut() {
        *v = 0.5 * *v * (1.0 + erf_with(*v * std::f32::consts::FRAC_1_SQRT_2, f32::mul_add));
    }
}

/// GELU over a whole map, in parallel.
pub fn gelu(values: &mut [f32]) {
    values.par_chunks_mut(16_384).for_each(gelu_slice);
}

/// The logistic sigmoid through `exp`, as the trainer computes it: the mask generator's scores
/// go through it, and their ranking must match the trainer's.
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `tanh(x)` in f32 as a branch-free rational function, odd in `x` (the approximation Eigen
/// uses for f32), its multiply-adds done by `madd(a, b, c) = a * b + c` (fused or not): within
/// 1e-6 of libm's `tanhf` and far cheaper than it, which matters because a ConvLSTM cell takes
/// five sigmoids and tanhs per hidden unit and pixel (libm's took a third of a KNMI forward).
#[inline(always)]
fn tanh_with(x: f32, madd: impl Fn(f32, f32, f32) -> f32) -> f32 {
    odd_rational(x, TANH_CLAMP, (&TANH_P, &TANH_Q), &madd)
}

/// Past this the rational function's f32 value is 1 (tanh is 1 in f32 from about 9).
#[allow(clippy::excessive_precision)]
const TANH_CLAMP: f32 = 7.905_311_107_635_498;
/// [`tanh_with`]'s numerator's coefficients in `x^2` (highest power first), then the denominator's.
#[allow(clippy::excessive_precision)] // the published coefficients, rounded by the compiler
const TANH_P: [f32; 7] = [
    -2.760_768_477_423_55e-16,
    2.000_187_904_824_77e-13,
    -8.604_671_522_137_35e-11,
    5.122_297_090_371_14e-8,
    1.485_722_357_179_79e-5,
    6.372_619_288_754_36e-4,
    4.893_524_558_917_86e-3,
];
#[allow(clippy::excessive_precision)]
const TANH_Q: [f32; 4] =
    [1.198_258_394_667_02e-6, 1.185_347_056_866_54e-4, 2.268_434_632_439e-3, 4.893_525_185_543_85e-3];

/// One position's LSTM cell update over its `k` kept units: `pre` holds the input, forget,
/// output and candidate pre-activations (`[4k]`, in that order), `c_prev` the previous cell
/// state (`[k]`); writes the new hidden state to `h` and cell state to `c`. Vectorized with
/// AVX2 and fused multiply-adds where the CPU has them (within 2e-6, relative, of the formula
/// through libm's `tanh` and `exp`; tested).
/// (The sigmoid inside is `(1 + tanh(x / 2)) / 2` through [`tanh_with`].)
pub fn lstm_cell(pre: &[f32], c_prev: &[f32], h: &mut [f32], c: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: `lstm_cell_avx2` only requires AVX2 and FMA, which were just detected.
        #[allow(unsafe_code)]
        unsafe {
            lstm_cell_avx2(pre, c_prev, h, c)
        };
        return;
    }
    lstm_cell_with(pre, c_prev, h, c, |a, b, c| a * b + c);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn lstm_cell_avx2(pre: &[f32], c_prev: &[f32], h: &mut [f32], c: &mut [f32]) {
    lstm_cell_with(pre, c_prev, h, c, f32::mul_add);
}

/// [`lstm_cell`] with its multiply-adds done by `madd`; the slices are split up front so that
/// the loop has no bounds checks and vectorizes.
#[inline(always)]
fn lstm_cell_with(
    pre: &[f32],
    c_prev: &[f32],
    h: &mut [f32],
    c: &mut [f32],
    madd: impl Fn(f32, f32, f32) -> f32 + Copy,
) {
    let k = c_prev.len();
    let (input, rest) = pre[..4 * k].split_at(k);
    let (forget, rest) = rest.split_at(k);
    let (output, candidate) = rest.split_at(k);
    let (h, c) = (&mut h[..k], &mut c[..k]);
    // The sigmoid as `(1 + tanh(x / 2)) / 2`.
    let sigmoid = |x: f32| madd(0.5, tanh_with(0.5 * x, madd), 0.5);
    for j in 0..k {
        let cell = madd(sigmoid(forget[j]), c_prev[j], sigmoid(input[j]) * tanh_with(candidate[j], madd));
        c[j] = cell;
        h[j] = sigmoid(output[j]) * tanh_with(cell, madd);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_erf_matches_libm() {
        let worst =
            (-6000..=6000).map(|i| i as f32 / 1000.0).map(|x| (erf(x) - libm::erff(x)).abs()).fold(0.0, f32::max);
        assert!(worst < 1e-6, "{worst}");
    }

    #[test]
    fn fast_tanh_matches_libm() {
        let tanh = |x: f32| tanh_with(x, |a, b, c| a * b + c);
        let xs = (-20_000..=20_000).map(|i| i as f32 / 1000.0).chain([1e-30, -1e-30, 0.0, 50.0, -50.0]);
        let worst = xs.clone().map(|x| (tanh(x) - x.tanh()).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-6, "{worst:e}");
        assert!(xs.into_iter().all(|x| tanh(x).abs() <= 1.0));
        assert_eq!(tanh(0.0), 0.0);
        assert_eq!(tanh(-3.0), -tanh(3.0));
    }

    #[test]
    fn the_vectorized_lstm_cell_matches_the_plain_formula() {
        for k in [1usize, 7, 8, 19, 64] {
            let pre: Vec<f32> = (0..4 * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 6.0).collect();
            let c_prev: Vec<f32> = (0..k).map(|j| ((j * 13 % 29) as f32 - 14.0) / 5.0).collect();
            let (mut h, mut c) = (vec![0.0; k], vec![0.0; k]);
            lstm_cell(&pre, &c_prev, &mut h, &mut c);
            for j in 0..k {
                let want_c = sigmoid(pre[k + j]) * c_prev[j] + sigmoid(pre[j]) * pre[3 * k + j].tanh();
                let want_h = sigmoid(pre[2 * k + j]) * want_c.tanh();
                let close = |a: f32, b: f32| (a - b).abs() <= 2e-6 * (1.0 + b.abs());
                assert!(
                    close(c[j], want_c) && close(h[j], want_h),
                    "k {k}, unit {j}: ({}, {}) vs ({want_h}, {want_c})",
                    h[j],
                    c[j]
                );
            }
        }
    }

    #[test]
    fn vectorized_gelu_matches_the_scalar_one() {
        let xs: Vec<f32> = (-5000..5000).map(|i| i as f32 / 700.0).chain([0.0, -0.0, 1e-30, 9.0]).collect();
        let mut fast = xs.clone();
        gelu_slice(&mut fast);
        for (x, y) in xs.iter().zip(&fast) {
            let mut reference = *x;
            gelu_in_place(&mut reference);
            assert!((reference - y).abs() <= 1e-6 * (1.0 + reference.abs()), "gelu({x}): {y} vs {reference}");
        }
    }
}
