//! Hard top-k and threshold masks and the straight-through estimator shared by the DataMask and
//! the ModelMask.

use burn::prelude::*;
use burn::tensor::IndexingUpdateOp;
pub use dyna_pruner_spec::kept_count;

/// A 0/1 mask keeping the `k` highest scores of each row (exactly `k` ones per row, ties broken
/// by the sort).
///
/// # Shapes
/// - scores: `[batch, n]`
/// - output: `[batch, n]`
pub fn top_k_hard<B: Backend>(scores: Tensor<B, 2>, k: usize) -> Tensor<B, 2> {
    let [batch, n] = scores.dims();
    let device = scores.device();
    if k >= n {
        return Tensor::ones([batch, n], &device);
    }
    let (_, indices) = scores.detach().topk_with_indices(k, 1);
    Tensor::zeros([batch, n], &device).scatter(1, indices, Tensor::ones([batch, k], &device), IndexingUpdateOp::Add)
}

/// Indices of the `k` highest scores of each row, highest first, ties to the lower index; and
/// each score's rank in its row (0 for the highest): the kept ones are those ranked below k, at
/// their rank in the index list. Computed from pairwise comparisons alone. Burn 0.21's GPU
/// backends have no device sort: their `topk` reads the tensor back to the host and sorts
/// there, a device sync per call. This costs `O(n^2)` work per row. (Writing each index at its
/// rank with `scatter` instead of the `[batch, k, n]` comparison is slower on a GPU: Burn 0.21's
/// CUDA scatter loops over the scattered axis in one thread per row.) The reference for
/// `gathered::GatheredBackend::rank_top_k`.
///
/// # Shapes
/// - scores: `[batch, n]`
/// - output: `[batch, k]`, `[batch, n]`
pub fn top_k_with_ranks<B: Backend>(scores: Tensor<B, 2>, k: usize) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
    let [b, n] = scores.dims();
    let device = scores.device();
    let index = Tensor::<B, 1, Int>::arange(0..n as i64, &device);
    // rank_i = #{j : s_j > s_i} + #{j < i : s_j == s_i}, a permutation of 0..n in every row.
    let (others, own) =
        (scores.clone().reshape([b, 1, n]).expand([b, n, n]), scores.reshape([b, n, 1]).expand([b, n, n]));
    let before = index.clone().reshape([1, 1, n]).lower(index.clone().reshape([1, n, 1])).expand([b, n, n]);
    let ahead = others.clone().greater(own.clone()).bool_or(others.equal(own).bool_and(before));
    let rank = ahead.int().sum_dim(2).reshape([b, n]);
    let wanted = Tensor::<B, 1, Int>::arange(0..k as i64, &device).reshape([1, k, 1]).expand([b, k, n]);
    let owner = rank.clone().reshape([b, 1, n]).expand([b, k, n]).equal(wanted).int()
        * index.reshape([1, 1, n]).expand([b, k, n]);
    (owner.sum_dim(2).reshape([b, k]), rank)
}

/// Straight-through estimator: the forward value is exactly `hard`, the gradient flows to `soft`.
pub fn straight_through<B: Backend, const D: usize>(hard: Tensor<B, D>, soft: Tensor<B, D>) -> Tensor<B, D> {
    // (soft - soft) is exactly zero in floating point, so the sum is exactly `hard`.
    soft.clone() - soft.detach() + hard.detach()
}

/// Hard top-k over `scores` with straight-through gradients to `scores`.
///
/// # Shapes
/// - scores: `[batch, n]` in [0, 1]
/// - output: `[batch, n]`, each row holding exactly `kept_count(ratio, n)` ones
pub fn top_k_ste<B: Backend>(scores: Tensor<B, 2>, ratio: f32) -> Tensor<B, 2> {
    let k = kept_count(ratio, scores.dims()[1]);
    let hard = top_k_hard(scores.clone(), k);
    straight_through(hard, scores)
}

/// Hard `scores >= tau` with straight-through gradients to `scores`: a count that varies per row.
///
/// # Shapes
/// - scores: any, in [0, 1]
/// - output: the same, 0/1 in the forward pass
pub fn threshold_ste<B: Backend, const D: usize>(scores: Tensor<B, D>, tau: f32) -> Tensor<B, D> {
    let hard = scores.clone().detach().greater_equal_elem(tau).float();
    straight_through(hard, scores)
}

/// The threshold that keeps `kept_count(ratio, n)` of the `n` scores: the value of that rank,
/// highest first (ties at it are all kept by `>=`). `None` when `scores` is empty or not finite.
pub fn quantile_threshold(mut scores: Vec<f32>, ratio: f32) -> Option<f32> {
    if scores.is_empty() || scores.iter().any(|s| !s.is_finite()) {
        return None;
    }
    let k = kept_count(ratio, scores.len());
    let (_, value, _) = scores.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    Some(*value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TrainBackend;
    use burn::tensor::Distribution;

    type B = TrainBackend;

    #[test]
    fn top_k_keeps_exactly_k_per_sample_even_with_ties() {
        let device = Default::default();
        let mut scores: Tensor<B, 2> = Tensor::random([5, 37], Distribution::Uniform(0.0, 1.0), &device);
        // Saturated scores tie exactly; the count must still be exact.
        scores = scores.slice_assign([0..1, 0..37], Tensor::ones([1, 37], &device));
        for ratio in [0.1f32, 0.3, 0.5, 0.99] {
            let mask = top_k_ste(scores.clone(), ratio);
            let counts: Vec<f32> = mask.clone().sum_dim(1).into_data().to_vec().unwrap();
            let k = kept_count(ratio, 37) as f32;
            assert!(counts.iter().all(|&c| c == k), "{counts:?} != {k}");
            let values: Vec<f32> = mask.into_data().to_vec().unwrap();
            assert!(values.iter().all(|&v| v == 0.0 || v == 1.0));
        }
    }

    #[test]
    fn top_k_indices_agree_with_the_sorting_top_k_and_break_ties_by_index() {
        let device = Default::default();
        let ints = |t: Tensor<B, 2, Int>| t.into_data().convert::<i64>().to_vec::<i64>().unwrap();
        let scores: Tensor<B, 2> = Tensor::random([4, 53], Distribution::Uniform(0.0, 1.0), &device);
        for k in [1, 7, 53] {
            let (_, want) = scores.clone().topk_with_indices(k, 1);
            let got = top_k_with_ranks(scores.clone(), k).0;
            assert_eq!(ints(got), ints(want), "k {k}");
        }
        let tied = Tensor::<B, 2>::from_floats([[0.5, 1.0, 0.5, 1.0, 0.2]], &device);
        assert_eq!(ints(top_k_with_ranks(tied, 3).0), vec![1, 3, 0]);
    }

    #[test]
    fn quantile_threshold_keeps_the_ratio_and_all_ties() {
        let scores = vec![0.1, 0.9, 0.5, 0.7, 0.3, 0.5, 0.2, 0.8, 0.6, 0.4];
        assert_eq!(quantile_threshold(scores.clone(), 0.3), Some(0.7));
        assert_eq!(quantile_threshold(scores.clone(), 1.0), Some(0.1));
        assert_eq!(quantile_threshold(scores.clone(), 0.0), Some(0.9));
        // Rank 6 is one of two tied 0.5s: both pass `>=`.
        assert_eq!(quantile_threshold(scores, 0.6), Some(0.5));
        assert_eq!(quantile_threshold(Vec::new(), 0.5), None);
        assert_eq!(quantile_threshold(vec![0.2, f32::NAN], 0.5), None);
        let device = Default::default();
        let s = Tensor::<B, 2>::from_floats([[0.9, 0.2, 0.6], [0.1, 0.65, 0.7]], &device).require_grad();
        let m = threshold_ste(s.clone(), 0.6);
        assert_eq!(m.clone().into_data().to_vec::<f32>().unwrap(), vec![1.0, 0.0, 1.0, 0.0, 1.0, 1.0]);
        let grads = m.sum().backward();
        assert_eq!(s.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap(), vec![1.0; 6]);
    }

    #[test]
    fn ste_forward_is_hard_and_gradient_reaches_scores() {
        let device = Default::default();
        let scores: Tensor<B, 2> = Tensor::<B, 2>::from_floats([[0.9, 0.2, 0.6, 0.1]], &device).require_grad();
        let mask = top_k_ste(scores.clone(), 0.5);
        let values: Vec<f32> = mask.clone().into_data().to_vec().unwrap();
        assert_eq!(values, vec![1.0, 0.0, 1.0, 0.0]);
        let weights = Tensor::<B, 2>::from_floats([[1.0, 2.0, 3.0, 4.0]], &device);
        let grads = (mask * weights).sum().backward();
        let g: Vec<f32> = scores.grad(&grads).unwrap().into_data().to_vec().unwrap();
        assert_eq!(g, vec![1.0, 2.0, 3.0, 4.0]);
    }
}
