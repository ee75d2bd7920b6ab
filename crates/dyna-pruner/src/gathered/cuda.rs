//! The CUDA backend's [`GatheredBackend`]: the ranking and the gathered 3x3 conv, one CubeCL
//! kernel each, registered as custom operations of the fusion stream (so they queue between
//! fused framework ops like any other). Both are tested against the provided (reference)
//! methods (`cargo test --features cuda gathered::cuda` on a GPU machine); `dyna-pruner bench
//! --device cuda` also checks the whole forward against the masked-dense reference before
//! timing it.
//!
//! - Ranking: through framework ops it materialises `[batch, n, n]` comparison tensors (written
//!   as float 0/1 sums so that fusion could merge them, the broadcasting comparisons and casts
//!   still ran as separate kernels). Here one thread per score counts the scores ahead of it
//!   and, if it is in the top k, writes its index at its rank.
//! - Gathered conv: through framework ops each conv writes and reads im2col rows (hundreds of
//!   MB per block conv at batch 32) and selects each sample's weights in several ops. Here
//!   a first kernel lays each sample's kept weights out tap by tap (`[channels, units]`),
//!   then each cube stages its pixels' window rows and the tap's weights in shared memory and
//!   each thread accumulates 4 pixels x 4 units. Earlier kernels without shared memory lost to
//!   the framework ops (docs/EXPERIMENTS.md).

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

use kernels::{kept_weights_kernel, rank_kernel, window_conv_kernel, PIXELS_PER_THREAD, TILE};

use super::{GatheredBackend, KeptUnits, WindowConv};
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

    /// Pixels per cube of [`window_conv_kernel`]; each thread holds `PIXELS_PER_THREAD` of them
    /// for 4 units.
    pub(super) const TILE: usize = 64;
    pub(super) const PIXELS_PER_THREAD: usize = 4;

    /// A 3x3 convolution at gathered pixels, read in place (implicit GEMM): one cube per `TILE`
    /// pixels of one sample (`CUBE_POS_X` tile, `CUBE_POS_Y` sample), `TILE / 4` x
    /// `units / 4` threads, each accumulating 4 pixels x 4 units in registers. Per tap, the
    /// cube stages its pixels' source rows (zeros for the row index `source.shape(0)`) and the
    /// tap's weights (`weight`: its sample's row of [`kept_weights_kernel`]'s layout) in shared
    /// memory; the output tile goes through shared memory too, so that it is written row by row
    /// (coalesced). The bias is the kept output units' (`kept[sample, _]`) when
    /// `select_outputs`.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn window_conv_kernel<F: Float, I: Int>(
        source: &Tensor<F>,
        windows: &Tensor<I>,
        weight: &Tensor<F>,
        bias: &Tensor<F>,
        kept: &Tensor<I>,
        out: &mut Tensor<F>,
        per_sample: u32,
        #[comptime] channels: usize,
        #[comptime] units: usize,
        #[comptime] select_outputs: bool,
        #[comptime] gelu: bool,
        #[define(F, I)] _dtypes: [StorageType; 2],
    ) {
        // An odd row pitch: the 16 pixels a warp reads at once fall in different banks.
        let pitch = comptime!(channels | 1);
        let units4 = comptime!(units.div_ceil(4) * 4);
        let lanes = comptime!(TILE / PIXELS_PER_THREAD);
        let outputs = comptime!(PIXELS_PER_THREAD * 4);
        let (tile_taps, tile_values) = comptime!((TILE * 9, TILE * channels));
        let sample = CUBE_POS_Y as usize;
        let first = CUBE_POS_X as usize * TILE;
        let per_sample = per_sample as usize;
        let base = sample * per_sample + first;
        let mut count = per_sample - first;
        if count > TILE {
            count = TILE;
        }
        let threads = (CUBE_DIM_X * CUBE_DIM_Y) as usize;
        let lid = UNIT_POS as usize;
        let tx = UNIT_POS_X as usize;
        let ty = UNIT_POS_Y as usize;
        let kept_row = sample * kept.stride(0);
        let source_rows = source.shape(0);
        let weight_row = sample * weight.stride(0);

        let mut rows = SharedMemory::<u32>::new(tile_taps);
        let mut xs = SharedMemory::<F>::new(comptime!(TILE * pitch));
        let mut ws = SharedMemory::<F>::new(comptime!(channels * units4));
        let mut acc = Array::<F>::new(outputs);
        #[unroll]
        for i in 0..outputs {
            acc[i] = F::new(0.0);
        }
        // The tile's windows (pixels past the sample's last read row 0; their outputs are dropped).
        let mut e = lid;
        while e < tile_taps {
            let mut row = 0u32;
            if e < count * 9usize {
                row = u32::cast_from(windows[(base * 9usize + e) * windows.stride(0)]);
            }
            rows[e] = row;
            e += threads;
        }
        for t in 0..9usize {
            sync_cube();
            let mut e = lid;
            while e < tile_values {
                let p = e / channels;
                let c = e % channels;
                let row = rows[p * 9usize + t] as usize;
                let mut v = F::new(0.0);
                if row < source_rows {
                    v = source[row * source.stride(0) + c * source.stride(1)];
                }
                xs[p * pitch + c] = v;
                e += threads;
            }
            let mut e = lid;
            while e < comptime!(channels * units4) {
                ws[e] = weight[weight_row + t * comptime!(channels * units4) + e];
                e += threads;
            }
            sync_cube();
            #[unroll]
            for c in 0..channels {
                let mut a = Array::<F>::new(PIXELS_PER_THREAD);
                let mut w = Array::<F>::new(4usize);
                #[unroll]
                for i in 0..PIXELS_PER_THREAD {
                    a[i] = xs[(tx + i * lanes) * pitch + c];
                }
                #[unroll]
                for j in 0..4usize {
                    w[j] = ws[c * units4 + ty * 4usize + j];
                }
                #[unroll]
                for i in 0..PIXELS_PER_THREAD {
                    #[unroll]
                    for j in 0..4usize {
                        acc[i * 4usize + j] += a[i] * w[j];
                    }
                }
            }
        }
        // Bias and GELU, then the tile through shared memory, written row by row.
        let mut os = SharedMemory::<F>::new(comptime!(TILE * units4));
        #[unroll]
        for j in 0..4usize {
            let u = ty * 4usize + j;
            let mut b = F::new(0.0);
            if u < units {
                let mut o = u;
                if select_outputs {
                    o = u32::cast_from(kept[kept_row + u * kept.stride(1)]) as usize;
                }
                b = bias[o * bias.stride(0)];
            }
            #[unroll]
            for i in 0..PIXELS_PER_THREAD {
                let mut v = acc[i * 4usize + j] + b;
                if gelu {
                    v = v * F::new(0.5) * (F::new(1.0) + F::erf(v * F::new(core::f32::consts::FRAC_1_SQRT_2)));
                }
                os[(tx + i * lanes) * units4 + u] = v;
            }
        }
        sync_cube();
        let mut e = lid;
        while e < count * units {
            let p = e / units;
            let u = e % units;
            out[(base + p) * out.stride(0) + u * out.stride(1)] = os[p * units4 + u];
            e += threads;
        }
    }

    /// A conv's weights `[O, I, 3, 3]` laid out for [`window_conv_kernel`]: per row of `kept`
    /// (a sample; one placeholder row if neither side is selected), tap by tap, `[channels, units]` rows padded with zeros to
    /// whole groups of 4 units, with the sample's kept units (`kept[sample, _]`) as the outputs
    /// when `select_outputs` or the input channels when `select_inputs`. One thread per value.
    #[cube(launch)]
    pub(super) fn kept_weights_kernel<F: Float, I: Int>(
        weight: &Tensor<F>,
        kept: &Tensor<I>,
        out: &mut Tensor<F>,
        #[comptime] channels: usize,
        #[comptime] units: usize,
        #[comptime] select_outputs: bool,
        #[comptime] select_inputs: bool,
        #[define(F, I)] _dtypes: [StorageType; 2],
    ) {
        let units4 = comptime!(units.div_ceil(4) * 4);
        let per_sample = comptime!(9 * channels * units4);
        if ABSOLUTE_POS >= out.shape(0) * per_sample {
            terminate!();
        }
        let sample = ABSOLUTE_POS / per_sample;
        let r = ABSOLUTE_POS % per_sample;
        let t = r / comptime!(channels * units4);
        let c = (r / units4) % channels;
        let u = r % units4;
        let mut v = F::new(0.0);
        if u < units {
            let kept_row = sample * kept.stride(0);
            let mut o = u;
            if select_outputs {
                o = u32::cast_from(kept[kept_row + u * kept.stride(1)]) as usize;
            }
            let mut i = c;
            if select_inputs {
                i = u32::cast_from(kept[kept_row + c * kept.stride(1)]) as usize;
            }
            let (ky, kx) = (t / 3, t % 3);
            v = weight[o * weight.stride(0) + i * weight.stride(1) + ky * weight.stride(2) + kx * weight.stride(3)];
        }
        out[sample * out.stride(0) + r * out.stride(1)] = v;
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

/// [`GatheredBackend::window_conv`] on the GPU: one [`window_conv_kernel`] launch. `kept`
/// selects per `selects` (`[outputs, inputs]`), unread if neither.
fn window_conv_cube(
    [source, windows, weight, bias, kept]: [CubeTensor<CudaRuntime>; 5],
    selects: [bool; 2],
    gelu: bool,
) -> CubeTensor<CudaRuntime> {
    let n = windows.meta.shape()[0] / 9;
    let (channels, kept_units) = (source.meta.shape()[1], kept.meta.shape()[1]);
    let units = if selects[0] { kept_units } else { weight.meta.shape()[0] };
    // Without kept units no value depends on the sample: the pixels run as one.
    let batch = kept.meta.shape()[0];
    let per_sample = n / batch;
    let out = empty(&source, [n, units], source.dtype);
    let client = source.client.clone();
    let dtypes = [source.dtype.into(), windows.dtype.into()];
    let laid_out = empty(&source, [batch, 9 * channels * units.div_ceil(4) * 4], source.dtype);
    let (count, dim) = elementwise(&client, laid_out.meta.shape().iter().product());
    kept_weights_kernel::launch(
        &client,
        count,
        dim,
        weight.into_tensor_arg(),
        kept.clone().into_tensor_arg(),
        laid_out.clone().into_tensor_arg(),
        channels,
        units,
        selects[0],
        selects[1],
        dtypes,
    );
    let weight = laid_out;
    window_conv_kernel::launch(
        &client,
        CubeCount::Static(per_sample.div_ceil(TILE) as u32, batch as u32, 1),
        CubeDim::new_2d((TILE / PIXELS_PER_THREAD) as u32, units.div_ceil(4) as u32),
        source.into_tensor_arg(),
        windows.into_tensor_arg(),
        weight.into_tensor_arg(),
        bias.into_tensor_arg(),
        kept.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        per_sample as u32,
        channels,
        units,
        selects[0],
        gelu,
        dtypes,
    );
    out
}

#[derive(Debug)]
struct WindowConvOp {
    desc: CustomOpIr,
    selects: [bool; 2],
    gelu: bool,
}

impl Operation<Runtime> for WindowConvOp {
    fn execute(&self, handles: &mut Handles) {
        let ([source, windows, weight, bias, kept], [out]) = self.desc.as_fixed();
        let inputs = [
            handles.get_float_tensor::<Cube>(source),
            handles.get_int_tensor::<Cube>(windows),
            handles.get_float_tensor::<Cube>(weight),
            handles.get_float_tensor::<Cube>(bias),
            handles.get_int_tensor::<Cube>(kept),
        ];
        let output = window_conv_cube(inputs, self.selects, self.gelu);
        handles.register_float_tensor::<Cube>(&out.id, output);
    }
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

    fn window_conv(conv: WindowConv<Self>) -> Tensor<Self, 2> {
        let WindowConv { source, windows, weight, bias, units, gelu } = conv;
        let (n, [o, ..]) = (windows.dims()[0] / 9, weight.dims());
        let (kept, selects, units) = match units {
            // A placeholder of one row (one sample) that the kernels do not read.
            KeptUnits::All => (windows.clone().reshape([1, -1]), [false, false], o),
            KeptUnits::Outputs(kept) => {
                let k = kept.dims()[1];
                (kept, [true, false], k)
            }
            KeptUnits::Inputs(kept) => (kept, [false, true], o),
        };
        let source: FusionTensor<Runtime> = source.into_primitive().tensor();
        let client = source.client.clone();
        let output = TensorIr::uninit(client.create_empty_handle(), Shape::new([n, units]), source.dtype);
        let (windows, kept) = (windows.into_primitive(), kept.into_primitive());
        let (weight, bias) = (weight.into_primitive().tensor(), bias.into_primitive().tensor());
        let streams = OperationStreams::with_inputs([&source, &windows, &weight, &bias, &kept]);
        let inputs = [source.into_ir(), windows.into_ir(), weight.into_ir(), bias.into_ir(), kept.into_ir()];
        let desc = CustomOpIr::new("dyna_pruner_window_conv", &inputs, &[output]);
        let op = WindowConvOp { desc: desc.clone(), selects, gelu };
        let mut out = client.register(streams, OperationIr::Custom(desc), op);
        Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(out.pop().expect("one output")))
    }
}

/// These need a CUDA GPU: `cargo test --release --features cuda gathered::cuda` on one.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuBackend;
    use burn::tensor::TensorData;
    use rand::rngs::StdRng;
    use rand::seq::index::sample;
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

    /// The kernel against the provided method for `KeptUnits` `mode` (0 all, 1 outputs, 2 inputs).
    fn check_window_conv(rng: &mut StdRng, [b, per_sample, o, i, k]: [usize; 5], mode: usize, gelu: bool) {
        let n = per_sample * b;
        let c = [i, i, k][mode];
        let rows = 3 * n;
        // Every index up to `rows`, which reads zeros.
        let windows: Vec<i64> = (0..n * 9).map(|t| ((t * 7919 + 13) % (rows + 1)) as i64).collect();
        let kept: Vec<i64> =
            (0..b).flat_map(|_| sample(rng, [o, o, i][mode], k).into_vec()).map(|u| u as i64).collect();
        let mut uniform = |shape: Vec<usize>| {
            let values: Vec<f32> = (0..shape.iter().product()).map(|_| rng.random_range(-1.0..1.0)).collect();
            TensorData::new(values, shape)
        };
        let data = [uniform(vec![rows, c]), uniform(vec![o, i, 3, 3]), uniform(vec![o])];
        fn run<B: GatheredBackend>(
            data: &[TensorData; 3],
            windows: &[i64],
            kept: &[i64],
            setup: [usize; 3],
        ) -> Vec<f32> {
            let [b, mode, gelu] = setup;
            let device = Default::default();
            let kept = Tensor::<B, 1, Int>::from_ints(kept, &device).reshape([b as i32, -1]);
            let units = [KeptUnits::All, KeptUnits::Outputs(kept.clone()), KeptUnits::Inputs(kept)];
            let out = B::window_conv(WindowConv {
                source: Tensor::from_data(data[0].clone(), &device),
                windows: Tensor::from_ints(windows, &device),
                weight: Tensor::from_data(data[1].clone(), &device),
                bias: Tensor::from_data(data[2].clone(), &device),
                units: units.into_iter().nth(mode).expect("three modes"),
                gelu: gelu == 1,
            });
            out.into_data().to_vec().unwrap()
        }
        let setup = [b, mode, gelu as usize];
        let want = run::<CpuBackend>(&data, &windows, &kept, setup);
        let got = run::<CudaBackend>(&data, &windows, &kept, setup);
        assert_eq!(got.len(), want.len());
        let worst = got.iter().zip(&want).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
        let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        assert!(worst < 1e-5 * scale, "{setup:?}, {o}x{i} conv, {k} kept: max |diff| {worst}");
    }

    #[test]
    fn cuda_window_conv_matches_the_reference() {
        let mut rng = StdRng::seed_from_u64(4);
        // [batch, pixels per sample, outputs, inputs, kept]: tiles cut short, counts off
        // multiples of 4, the blocks', encoder's and decoder's shapes.
        for (shape, mode) in [
            ([3, 100, 64, 32, 19], 1),
            ([2, 64, 32, 64, 19], 2),
            ([2, 130, 32, 6, 1], 0),
            ([2, 70, 8, 32, 1], 0),
            ([1, 7, 5, 3, 2], 1),
            ([1, 7, 5, 3, 2], 2),
        ] {
            for gelu in [false, true] {
                check_window_conv(&mut rng, shape, mode, gelu);
            }
        }
    }
}
