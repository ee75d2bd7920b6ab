//! The CUDA backend's [`GatheredBackend`]: the ranking as one CubeCL kernel.
//!
//! Through framework ops the ranking materialises `[batch, n, n]` comparison tensors: 1.5 ms at
//! batch 32 on an H200 for 2304 patches; written as float 0/1 sums so that fusion could merge
//! them, 3.8 ms on an H100 (the broadcasting comparisons and casts ran as separate kernels,
//! docs/BENCHMARKS.md). Here one thread per score counts the scores ahead of it and, if it is in
//! the top k, writes its index at its rank. The kernel is registered as a custom operation of
//! the fusion stream, so it queues between fused framework ops like any other. It is tested
//! against the provided (reference) method (`cargo test --features cuda gathered::cuda` on a GPU
//! machine); `dyna-pruner bench --device cuda` also checks the whole forward against the
//! masked-dense reference before timing it.

use burn::prelude::*;
use burn::tensor::DType;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};
use cubecl::cuda::CudaRuntime;
use cubecl::prelude::{ComputeClient, CubeCount};
use cubecl::{calculate_cube_count_elemwise, CubeDim};

use kernels::rank_kernel;

use super::GatheredBackend;
use crate::CudaBackend;

/// The backend under the fusion layer.
type Cube = CubeBackend<CudaRuntime, f32, i32, u8>;
type Runtime = <Cube as burn_fusion::FusionBackend>::FusionRuntime;
type Handles = HandleContainer<<Runtime as FusionRuntime>::FusionHandle>;

/// The kernels (in their own module: CubeCL's prelude names `Tensor`, `Float` and `Int` too).
mod kernels {
    use cubecl::prelude::*;

    /// One thread per score: its rank in its row (the scores ahead of it: higher, or equal at a
    /// lower index) and, for the top `k`, its index written at its rank. Every access goes
    /// through the strides: CubeCL may pitch the rows of a 2-D buffer.
    #[cube(launch)]
    pub(super) fn rank_kernel<F: Float, I: Int>(
        scores: &Tensor<F>,
        ranks: &mut Tensor<I>,
        top: &mut Tensor<I>,
        #[define(F, I)] _dtypes: [StorageType; 2],
    ) {
        let n = scores.shape(1);
        if ABSOLUTE_POS >= scores.shape(0) * n {
            terminate!();
        }
        let row = ABSOLUTE_POS / n;
        let i = ABSOLUTE_POS % n;
        let start = row * scores.stride(0);
        let step = scores.stride(1);
        let own = scores[start + i * step];
        let mut rank = 0usize;
        for j in 0..n {
            let other = scores[start + j * step];
            if other > own || (other == own && j < i) {
                rank += 1;
            }
        }
        ranks[row * ranks.stride(0) + i * ranks.stride(1)] = I::cast_from(rank);
        if rank < top.shape(1) {
            top[row * top.stride(0) + rank * top.stride(1)] = I::cast_from(i);
        }
    }
}

/// An uninitialised contiguous output on `like`'s device.
fn empty(like: &CubeTensor<CudaRuntime>, shape: [usize; 2], dtype: DType) -> CubeTensor<CudaRuntime> {
    empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), Shape::new(shape), dtype)
}

/// Launch geometry for one thread per element.
fn elementwise(client: &ComputeClient<CudaRuntime>, units: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new(client, units);
    (calculate_cube_count_elemwise(client, units, dim), dim)
}

fn rank_cube(scores: CubeTensor<CudaRuntime>, k: usize) -> (CubeTensor<CudaRuntime>, CubeTensor<CudaRuntime>) {
    let [b, n] = [scores.meta.shape()[0], scores.meta.shape()[1]];
    let (ranks, top) = (empty(&scores, [b, n], DType::I32), empty(&scores, [b, k], DType::I32));
    let (count, dim) = elementwise(&scores.client, b * n);
    let dtypes = [scores.dtype.into(), ranks.dtype.into()];
    let client = scores.client.clone();
    rank_kernel::launch(
        &client,
        count,
        dim,
        scores.into_tensor_arg(),
        ranks.clone().into_tensor_arg(),
        top.clone().into_tensor_arg(),
        dtypes,
    );
    (ranks, top)
}

#[derive(Debug)]
struct RankOp {
    desc: CustomOpIr,
}

impl Operation<Runtime> for RankOp {
    fn execute(&self, handles: &mut Handles) {
        let ([scores], [ranks, top]) = self.desc.as_fixed();
        let scores = handles.get_float_tensor::<Cube>(scores);
        let (rank_values, top_values) = rank_cube(scores, top.shape[1]);
        handles.register_int_tensor::<Cube>(&ranks.id, rank_values);
        handles.register_int_tensor::<Cube>(&top.id, top_values);
    }
}

impl GatheredBackend for CudaBackend {
    fn rank_top_k(scores: Tensor<Self, 2>, k: usize) -> (Tensor<Self, 2, Int>, Tensor<Self, 2, Int>) {
        let [b, n] = scores.dims();
        let scores: FusionTensor<Runtime> = scores.into_primitive().tensor();
        let client = scores.client.clone();
        let streams = OperationStreams::with_inputs([&scores]);
        let output = |shape: [usize; 2]| TensorIr::uninit(client.create_empty_handle(), Shape::new(shape), DType::I32);
        let desc = CustomOpIr::new("dyna_pruner_rank", &[scores.into_ir()], &[output([b, n]), output([b, k])]);
        let mut out = client.register(streams, OperationIr::Custom(desc.clone()), RankOp { desc });
        let top = Tensor::from_primitive(out.pop().expect("two outputs"));
        let ranks = Tensor::from_primitive(out.pop().expect("two outputs"));
        (top, ranks)
    }
}

/// These need a CUDA GPU: `cargo test --release --features cuda gathered::cuda` on one.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuBackend;
    use burn::tensor::TensorData;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn ints<B: Backend, const D: usize>(t: Tensor<B, D, Int>) -> Vec<i64> {
        t.into_data().convert::<i64>().to_vec().unwrap()
    }

    #[test]
    fn cuda_ranking_matches_the_reference_with_ties() {
        let mut rng = StdRng::seed_from_u64(3);
        for (b, n, k) in [(3usize, 2304usize, 691usize), (2, 64, 20), (4, 7, 7), (1, 5, 1)] {
            // Few distinct values, so that many scores tie.
            let values: Vec<f32> = (0..b * n).map(|_| rng.random_range(0..9) as f32 / 8.0).collect();
            let scores = Tensor::<CpuBackend, 2>::from_data(TensorData::new(values, [b, n]), &Default::default());
            let (top, ranks) = CpuBackend::rank_top_k(scores.clone(), k);
            let (cuda_top, cuda_ranks) =
                CudaBackend::rank_top_k(Tensor::from_data(scores.into_data(), &Default::default()), k);
            assert_eq!(ints(cuda_top), ints(top), "top-{k} of [{b}, {n}]");
            assert_eq!(ints(cuda_ranks), ints(ranks), "ranks of [{b}, {n}]");
        }
    }
}
