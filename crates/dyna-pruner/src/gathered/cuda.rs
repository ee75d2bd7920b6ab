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
//!   the framework ops (docs/EXPERIMENTS.md). Where the pixels come in whole patch cells (every
//!   conv but the strided one), a cube reads each cell's `(cell + 2)^2` window rows once
//!   instead of 9 rows per pixel; each thread keeps several global loads in flight while
//!   staging.

use burn::prelude::*;
use burn::tensor::DType;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, FloatElement};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};
use cubecl::cuda::CudaRuntime;
use cubecl::prelude::{ComputeClient, CubeCount};
use cubecl::{calculate_cube_count_elemwise, CubeDim};

use kernels::{
    halo_rows, kept_weights_kernel, rank_kernel, shifted_rows, window_conv_cells_mma_kernel, window_conv_kernel,
    window_conv_mma_kernel, FRAGMENT, PIXELS_PER_THREAD, TILE,
};

use std::marker::PhantomData;

use super::{GatheredBackend, KeptUnits, WindowConv};

/// The backend under the fusion layer, with float element `F`.
type Cube<F> = CubeBackend<CudaRuntime, F, i32, u8>;
/// The fusion runtime (the same for every float element).
type Runtime = <Cube<f32> as burn_fusion::FusionBackend>::FusionRuntime;
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

    /// Pixels per cube of the window-conv kernels; each thread of [`window_conv_kernel`] holds
    /// `PIXELS_PER_THREAD` of them for 4 units.
    pub(super) const TILE: usize = 64;
    pub(super) const PIXELS_PER_THREAD: usize = 4;
    /// The tensor cores' fragment side (bf16: m16 n16 k16).
    pub(super) const FRAGMENT: usize = 16;

    /// How many of the sample's pixels the cube's tile (`CUBE_POS_X`) holds: `TILE` but for
    /// the last tile.
    #[cube]
    fn tile_count(per_sample: usize) -> usize {
        let mut count = per_sample - CUBE_POS_X as usize * TILE;
        if count > TILE {
            count = TILE;
        }
        count
    }

    /// Global loads each thread has in flight while staging: a loop that stores each value
    /// before loading the next waits out the memory latency once per value.
    const LOADS: usize = 8;

    /// The element that thread `UNIT_POS` stages as load `i` of `chunk` (of a cube of `threads`).
    #[cube]
    fn staged_element(chunk: usize, i: usize, #[comptime] threads: usize) -> usize {
        UNIT_POS as usize + (chunk * LOADS + i) * threads
    }

    /// A chunk's loaded `values` into `dest`: element `e < len` at `(e / padded) * stride + e %
    /// padded` (rows of `padded` values, `stride` apart).
    #[cube]
    fn store_chunk<T: CubePrimitive>(
        values: &Array<T>,
        dest: &mut SharedMemory<T>,
        chunk: usize,
        #[comptime] len: usize,
        #[comptime] padded: usize,
        #[comptime] stride: usize,
        #[comptime] threads: usize,
    ) {
        #[unroll]
        for i in 0..LOADS {
            let e = staged_element(chunk, i, threads);
            if e < len {
                dest[(e / padded) * stride + e % padded] = values[i];
            }
        }
    }

    /// The tile's windows into `rows`: its pixels' 9 source rows each (pixels past the
    /// sample's last read row 0; their outputs are dropped). `threads`: the cube's.
    #[cube]
    fn stage_windows<I: Int>(
        windows: &Tensor<I>,
        rows: &mut SharedMemory<u32>,
        base: usize,
        count: usize,
        #[comptime] threads: usize,
    ) {
        let len = comptime!(TILE * 9);
        for chunk in 0..comptime!(len.div_ceil(threads * LOADS)) {
            let mut values = Array::<u32>::new(LOADS);
            #[unroll]
            for i in 0..LOADS {
                let e = staged_element(chunk, i, threads);
                let mut row = 0u32;
                if e < count * 9usize {
                    row = u32::cast_from(windows[(base * 9usize + e) * windows.stride(0)]);
                }
                values[i] = row;
            }
            store_chunk(&values, rows, chunk, len, 1usize, 1usize, threads);
        }
    }

    /// Channel `c` of `source`'s row `row`: zero past its `channels` and for the row index
    /// `source.shape(0)` (taps off the kept pixels or outside the frame).
    #[cube]
    fn source_value<F: Float>(source: &Tensor<F>, row: usize, c: usize, #[comptime] channels: usize) -> F {
        let mut v = F::new(0.0);
        if row < source.shape(0) && c < channels {
            v = source[row * source.stride(0) + c * source.stride(1)];
        }
        v
    }

    /// Tap `t`'s source rows of the tile's pixels into `xs`, `stride` apart, `padded` values each:
    /// the `channels` of the row, zeros past them and for the row index `source.shape(0)`.
    #[cube]
    fn stage_pixels<F: Float>(
        source: &Tensor<F>,
        rows: &SharedMemory<u32>,
        xs: &mut SharedMemory<F>,
        t: usize,
        #[comptime] channels: usize,
        #[comptime] padded: usize,
        #[comptime] stride: usize,
        #[comptime] threads: usize,
    ) {
        let len = comptime!(TILE * padded);
        for chunk in 0..comptime!(len.div_ceil(threads * LOADS)) {
            let mut values = Array::<F>::new(LOADS);
            #[unroll]
            for i in 0..LOADS {
                let e = staged_element(chunk, i, threads);
                let (p, c) = (e / padded, e % padded);
                let mut v = F::new(0.0);
                if e < len {
                    v = source_value(source, rows[p * 9usize + t] as usize, c, channels);
                }
                values[i] = v;
            }
            store_chunk(&values, xs, chunk, len, padded, stride, threads);
        }
    }

    /// The distinct source rows of a tile whose pixels come in whole `cell x cell` cells: each
    /// cell's `(cell + 2)^2` window rows. (With one `TILE` of pixels per cube, a cell of side 4
    /// reads 144 rows instead of 576.)
    pub(super) const fn halo_rows(cell: usize) -> usize {
        TILE / (cell * cell) * (cell + 2) * (cell + 2)
    }

    /// The row indices a tile stages ([`stage_tile`]).
    pub(super) const fn tile_rows(cell: usize) -> usize {
        if cell > 0 {
            halo_rows(cell)
        } else {
            TILE * 9
        }
    }

    /// The values a tile stages before its taps, `padded` per row (one placeholder without cells).
    pub(super) const fn halo_values(cell: usize, padded: usize) -> usize {
        if cell > 0 {
            halo_rows(cell) * padded
        } else {
            1
        }
    }

    /// The row indices of the tile's cells' halos into `rows` ([`halo_rows`]: each cell's
    /// `(cell + 2)^2` window rows, row-major), each read from the window of the cell's pixel
    /// nearest to it (rows of cells past the sample's last pixel: 0).
    #[cube]
    fn stage_halo_rows<I: Int>(
        windows: &Tensor<I>,
        rows: &mut SharedMemory<u32>,
        base: usize,
        count: usize,
        #[comptime] cell: usize,
        #[comptime] threads: usize,
    ) {
        let side = comptime!(cell + 2);
        let per_cell = comptime!((cell + 2) * (cell + 2));
        let len = comptime!(halo_rows(cell));
        for chunk in 0..comptime!(len.div_ceil(threads * LOADS)) {
            let mut values = Array::<u32>::new(LOADS);
            #[unroll]
            for i in 0..LOADS {
                let e = staged_element(chunk, i, threads);
                let (q, h) = (e / per_cell, e % per_cell);
                let (hy, hx) = (h / side, h % side);
                let mut dy = hy;
                if dy >= cell {
                    dy = cell - 1;
                }
                let mut dx = hx;
                if dx >= cell {
                    dx = cell - 1;
                }
                let p = q * comptime!(cell * cell) + dy * cell + dx;
                let t = (hy - dy) * 3usize + hx - dx;
                let mut row = 0u32;
                if e < len && p < count {
                    row = u32::cast_from(windows[((base + p) * 9usize + t) * windows.stride(0)]);
                }
                values[i] = row;
            }
            store_chunk(&values, rows, chunk, len, 1usize, 1usize, threads);
        }
    }

    /// The tile's source rows before its taps, into `rows` (and their values into `halo`,
    /// `padded` per row, when `cell > 0`): each pixel's 9 row indices; or, when its pixels come
    /// in whole `cell x cell` cells, each cell's [`halo_rows`], each read from the window of the
    /// cell's pixel nearest to it.
    #[cube]
    #[allow(clippy::too_many_arguments)]
    fn stage_tile<F: Float, I: Int>(
        source: &Tensor<F>,
        windows: &Tensor<I>,
        rows: &mut SharedMemory<u32>,
        halo: &mut SharedMemory<F>,
        base: usize,
        count: usize,
        #[comptime] cell: usize,
        #[comptime] channels: usize,
        #[comptime] padded: usize,
        #[comptime] threads: usize,
    ) {
        if comptime![cell > 0] {
            stage_halo_rows(windows, rows, base, count, cell, threads);
            sync_cube();
            let len = comptime!(halo_rows(cell) * padded);
            for chunk in 0..comptime!(len.div_ceil(threads * LOADS)) {
                let mut values = Array::<F>::new(LOADS);
                #[unroll]
                for i in 0..LOADS {
                    let e = staged_element(chunk, i, threads);
                    let mut v = F::new(0.0);
                    if e < len {
                        v = source_value(source, rows[e / padded] as usize, e % padded, channels);
                    }
                    values[i] = v;
                }
                store_chunk(&values, halo, chunk, len, 1usize, 1usize, threads);
            }
        } else {
            stage_windows(windows, rows, base, count, threads);
        }
    }

    /// Tap `t`'s values of the tile's pixels into `xs`, `stride` apart, `padded` each: from
    /// `halo` when `cell > 0` (see [`stage_tile`]), else read through `rows` by [`stage_pixels`].
    #[cube]
    #[allow(clippy::too_many_arguments)]
    fn stage_tap<F: Float>(
        source: &Tensor<F>,
        rows: &SharedMemory<u32>,
        halo: &SharedMemory<F>,
        xs: &mut SharedMemory<F>,
        t: usize,
        #[comptime] cell: usize,
        #[comptime] channels: usize,
        #[comptime] padded: usize,
        #[comptime] stride: usize,
        #[comptime] threads: usize,
    ) {
        if comptime![cell > 0] {
            let side = comptime!(cell + 2);
            let per_cell = comptime!((cell + 2) * (cell + 2));
            let cc = comptime!(cell * cell);
            let (ky, kx) = (t / 3usize, t % 3usize);
            let mut e = UNIT_POS as usize;
            while e < comptime!(TILE * padded) {
                let (p, c) = (e / padded, e % padded);
                let (q, l) = (p / cc, p % cc);
                let h = q * per_cell + (l / cell + ky) * side + l % cell + kx;
                xs[p * stride + c] = halo[h * padded + c];
                e += threads;
            }
        } else {
            stage_pixels(source, rows, xs, t, channels, padded, stride, threads);
        }
    }

    /// `len` laid-out weights from `start` of `weight`'s flat buffer into `ws`.
    #[cube]
    fn stage_weights<F: Float>(
        weight: &Tensor<F>,
        ws: &mut SharedMemory<F>,
        start: usize,
        #[comptime] len: usize,
        #[comptime] threads: usize,
    ) {
        for chunk in 0..comptime!(len.div_ceil(threads * LOADS)) {
            let mut values = Array::<F>::new(LOADS);
            #[unroll]
            for i in 0..LOADS {
                let e = staged_element(chunk, i, threads);
                let mut v = F::new(0.0);
                if e < len {
                    v = weight[start + e];
                }
                values[i] = v;
            }
            store_chunk(&values, ws, chunk, len, 1usize, 1usize, threads);
        }
    }

    /// The tile's sums (`sums`, `stride` per pixel) plus the bias of the sample's units (the
    /// kept ones, `kept[sample, _]`, when `select_outputs`), then GELU if `gelu`, written to
    /// `out` row by row (coalesced).
    #[cube]
    #[allow(clippy::too_many_arguments)]
    fn write_tile<F: Float, I: Int>(
        sums: &SharedMemory<f32>,
        bias: &Tensor<F>,
        kept: &Tensor<I>,
        out: &mut Tensor<F>,
        base: usize,
        count: usize,
        #[comptime] units: usize,
        #[comptime] stride: usize,
        #[comptime] select_outputs: bool,
        #[comptime] gelu: bool,
    ) {
        let threads = (CUBE_DIM_X * CUBE_DIM_Y) as usize;
        let kept_row = CUBE_POS_Y as usize * kept.stride(0);
        let mut e = UNIT_POS as usize;
        while e < count * units {
            let p = e / units;
            let u = e % units;
            let mut o = u;
            if select_outputs {
                o = u32::cast_from(kept[kept_row + u * kept.stride(1)]) as usize;
            }
            let mut v = sums[p * stride + u] + f32::cast_from(bias[o * bias.stride(0)]);
            if gelu {
                v = v * 0.5 * (1.0 + cubecl::frontend::Erf::erf(v * core::f32::consts::FRAC_1_SQRT_2));
            }
            out[(base + p) * out.stride(0) + u * out.stride(1)] = F::cast_from(v);
            e += threads;
        }
    }

    /// A 3x3 convolution at gathered pixels, read in place (implicit GEMM): one cube per `TILE`
    /// pixels of one sample (`CUBE_POS_X` tile, `CUBE_POS_Y` sample), `TILE / 4` x
    /// `units / 4` threads, each accumulating 4 pixels x 4 units in f32 registers. Per tap, the
    /// cube stages its pixels' source rows (zeros for the row index `source.shape(0)`) and the
    /// tap's weights (`weight`: its sample's row of [`kept_weights_kernel`]'s layout) in shared
    /// memory; the sums go through shared memory too, so that the tile is written row by row.
    /// The bias is the kept output units' (`kept[sample, _]`) when `select_outputs`.
    #[cube(launch_unchecked)]
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
        #[comptime] cell: usize,
        #[comptime] select_outputs: bool,
        #[comptime] gelu: bool,
        #[define(F, I)] _dtypes: [StorageType; 2],
    ) {
        // An odd row pitch: the 16 pixels a warp reads at once fall in different banks.
        let pitch = comptime!(channels | 1);
        let units4 = comptime!(units.div_ceil(4) * 4);
        let lanes = comptime!(TILE / PIXELS_PER_THREAD);
        let outputs = comptime!(PIXELS_PER_THREAD * 4);
        let per_sample = per_sample as usize;
        let (base, count) = (CUBE_POS_Y as usize * per_sample + CUBE_POS_X as usize * TILE, tile_count(per_sample));
        let tx = UNIT_POS_X as usize;
        let ty = UNIT_POS_Y as usize;
        let weight_row = CUBE_POS_Y as usize * weight.stride(0);

        let mut rows = SharedMemory::<u32>::new(comptime!(tile_rows(cell)));
        let mut halo = SharedMemory::<F>::new(comptime!(halo_values(cell, channels)));
        let mut xs = SharedMemory::<F>::new(comptime!(TILE * pitch));
        let mut ws = SharedMemory::<F>::new(comptime!(channels * units4));
        // f32 accumulators whatever the storage type (bf16 keeps only 8 bits of mantissa).
        let mut acc = Array::<f32>::new(outputs);
        #[unroll]
        for i in 0..outputs {
            acc[i] = 0.0;
        }
        let threads = comptime!(lanes * units4 / 4);
        stage_tile(source, windows, &mut rows, &mut halo, base, count, cell, channels, channels, threads);
        for t in 0..9usize {
            sync_cube();
            stage_tap(source, &rows, &halo, &mut xs, t, cell, channels, channels, pitch, threads);
            let len = comptime!(channels * units4);
            stage_weights(weight, &mut ws, weight_row + t * len, len, threads);
            sync_cube();
            #[unroll]
            for c in 0..channels {
                let mut a = Array::<f32>::new(PIXELS_PER_THREAD);
                let mut w = Array::<f32>::new(4usize);
                #[unroll]
                for i in 0..PIXELS_PER_THREAD {
                    a[i] = f32::cast_from(xs[(tx + i * lanes) * pitch + c]);
                }
                #[unroll]
                for j in 0..4usize {
                    w[j] = f32::cast_from(ws[c * units4 + ty * 4usize + j]);
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
        let mut sums = SharedMemory::<f32>::new(comptime!(TILE * units4));
        #[unroll]
        for j in 0..4usize {
            #[unroll]
            for i in 0..PIXELS_PER_THREAD {
                sums[(tx + i * lanes) * units4 + ty * 4usize + j] = acc[i * 4usize + j];
            }
        }
        sync_cube();
        write_tile(&sums, bias, kept, out, base, count, units, units4, select_outputs, gelu);
    }

    /// A zero f32 accumulator fragment.
    #[cube]
    fn zero_fragment() -> cmma::Matrix<f32> {
        cmma::Matrix::<f32>::from_value(
            cmma::MatrixIdent::Accumulator,
            FRAGMENT,
            FRAGMENT,
            FRAGMENT,
            cmma::MatrixLayout::Undefined,
            0.0,
        )
    }

    /// `acc += a b` for the row-major fragments at the starts of `a` and `b` (rows `stride`
    /// values apart, 32-byte aligned).
    #[cube]
    fn multiply_add<F: Float>(a: &Slice<F>, a_stride: u32, b: &Slice<F>, b_stride: u32, acc: &cmma::Matrix<f32>) {
        let layout = cmma::MatrixLayout::RowMajor;
        let a = cmma::Matrix::<F>::from_slice(cmma::MatrixIdent::A, FRAGMENT, FRAGMENT, FRAGMENT, layout, a, a_stride);
        let b = cmma::Matrix::<F>::from_slice(cmma::MatrixIdent::B, FRAGMENT, FRAGMENT, FRAGMENT, layout, b, b_stride);
        cmma::execute::<F, F, f32, f32>(&a, &b, acc, acc);
    }

    /// Each warp's accumulator, the outputs of the tile's fragment `(warp / n, warp % n)` (`n`
    /// fragments across the units, padded to whole fragments), through shared memory to
    /// [`write_tile`].
    #[cube]
    #[allow(clippy::too_many_arguments)]
    fn write_fragments<F: Float, I: Int>(
        acc: &cmma::Matrix<f32>,
        warp: usize,
        bias: &Tensor<F>,
        kept: &Tensor<I>,
        out: &mut Tensor<F>,
        base: usize,
        count: usize,
        #[comptime] units: usize,
        #[comptime] select_outputs: bool,
        #[comptime] gelu: bool,
    ) {
        let u_pad = comptime!(units.div_ceil(FRAGMENT) * FRAGMENT);
        let fragments_n = comptime!(u_pad / FRAGMENT);
        let mut sums = SharedMemory::<f32>::new_aligned(comptime!(TILE * u_pad), 32usize);
        let o_start = (warp / fragments_n) * comptime!(FRAGMENT * u_pad) + (warp % fragments_n) * FRAGMENT;
        cmma::store(
            &mut sums.slice_mut(o_start, comptime!(TILE * u_pad)),
            acc,
            u_pad as u32,
            cmma::MatrixLayout::RowMajor,
        );
        sync_cube();
        write_tile(&sums, bias, kept, out, base, count, units, u_pad, select_outputs, gelu);
    }

    /// [`window_conv_kernel`] on the tensor cores, for bf16 operands: one cube per `TILE` pixels
    /// of one sample, one warp per 16 x 16 block of outputs (`CUBE_DIM_Y` warps of 32),
    /// accumulating in f32 through the matrix multiply-accumulate instructions. Per tap the cube
    /// stages its pixels' source rows (channels zero-padded to whole fragments) and the tap's
    /// weights (`weight`: its sample's row of [`kept_weights_kernel`]'s layout, padded to whole
    /// fragments on both sides) in shared memory.
    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn window_conv_mma_kernel<F: Float, I: Int>(
        source: &Tensor<F>,
        windows: &Tensor<I>,
        weight: &Tensor<F>,
        bias: &Tensor<F>,
        kept: &Tensor<I>,
        out: &mut Tensor<F>,
        per_sample: u32,
        #[comptime] channels: usize,
        #[comptime] units: usize,
        #[comptime] cell: usize,
        #[comptime] select_outputs: bool,
        #[comptime] gelu: bool,
        #[define(F, I)] _dtypes: [StorageType; 2],
    ) {
        let k_pad = comptime!(channels.div_ceil(FRAGMENT) * FRAGMENT);
        let u_pad = comptime!(units.div_ceil(FRAGMENT) * FRAGMENT);
        let fragments_n = comptime!(u_pad / FRAGMENT);
        let tile_values = comptime!(TILE * k_pad);
        let per_sample = per_sample as usize;
        let (base, count) = (CUBE_POS_Y as usize * per_sample + CUBE_POS_X as usize * TILE, tile_count(per_sample));
        let warp = UNIT_POS_Y as usize;
        let (fm, fn_) = (warp / fragments_n, warp % fragments_n);
        let weight_row = CUBE_POS_Y as usize * weight.stride(0);

        let mut rows = SharedMemory::<u32>::new(comptime!(tile_rows(cell)));
        let mut halo = SharedMemory::<F>::new(comptime!(halo_values(cell, k_pad)));
        // Fragments load from 32-byte aligned addresses.
        let mut xs = SharedMemory::<F>::new_aligned(tile_values, 32usize);
        let mut ws = SharedMemory::<F>::new_aligned(comptime!(k_pad * u_pad), 32usize);
        let acc = zero_fragment();
        let threads = comptime!(32 * (TILE / FRAGMENT) * fragments_n);
        stage_tile(source, windows, &mut rows, &mut halo, base, count, cell, channels, k_pad, threads);
        for t in 0..9usize {
            sync_cube();
            stage_tap(source, &rows, &halo, &mut xs, t, cell, channels, k_pad, k_pad, threads);
            let len = comptime!(k_pad * u_pad);
            stage_weights(weight, &mut ws, weight_row + t * len, len, threads);
            sync_cube();
            #[unroll]
            for kk in 0..comptime!(k_pad / FRAGMENT) {
                let a_start = fm * comptime!(FRAGMENT * k_pad) + kk * FRAGMENT;
                let b_start = kk * comptime!(FRAGMENT * u_pad) + fn_ * FRAGMENT;
                let b = ws.slice(b_start, comptime!(k_pad * u_pad));
                multiply_add(&xs.slice(a_start, tile_values), k_pad as u32, &b, u_pad as u32, &acc);
            }
        }
        write_fragments(&acc, warp, bias, kept, out, base, count, units, select_outputs, gelu);
    }

    /// Rows of each column-shifted copy that [`window_conv_cells_mma_kernel`] stages: per cell
    /// of a tile, `cell + 2` rows of `cell` pixels.
    pub(super) const fn shifted_rows(cell: usize) -> usize {
        TILE / (cell * cell) * (cell + 2) * cell
    }

    /// [`window_conv_mma_kernel`] where the pixels come in whole cells of side 4 or 8, so that a
    /// fragment's 16 pixels are whole rows of one cell. The cube stages its cells' window rows
    /// once, as three copies shifted by 0, 1 and 2 columns (`[kx][cell][cell + 2][cell]` rows,
    /// channels padded to whole fragments): tap `(ky, kx)` of a fragment's pixels is then 16
    /// consecutive rows of copy `kx`, `ky` cell rows down. The weights' fragments load straight
    /// from `weight` (its sample's row of [`kept_weights_kernel`]'s layout): nothing is staged
    /// per tap, and the cube syncs three times in all.
    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn window_conv_cells_mma_kernel<F: Float, I: Int>(
        source: &Tensor<F>,
        windows: &Tensor<I>,
        weight: &Tensor<F>,
        bias: &Tensor<F>,
        kept: &Tensor<I>,
        out: &mut Tensor<F>,
        per_sample: u32,
        #[comptime] channels: usize,
        #[comptime] units: usize,
        #[comptime] cell: usize,
        #[comptime] select_outputs: bool,
        #[comptime] gelu: bool,
        #[define(F, I)] _dtypes: [StorageType; 2],
    ) {
        let k_pad = comptime!(channels.div_ceil(FRAGMENT) * FRAGMENT);
        let u_pad = comptime!(units.div_ceil(FRAGMENT) * FRAGMENT);
        let fragments_n = comptime!(u_pad / FRAGMENT);
        let copy_rows = comptime!(shifted_rows(cell));
        let cell_rows = comptime!((cell + 2) * cell);
        let side = comptime!(cell + 2);
        let len = comptime!(3 * shifted_rows(cell) * k_pad);
        let per_sample = per_sample as usize;
        let (base, count) = (CUBE_POS_Y as usize * per_sample + CUBE_POS_X as usize * TILE, tile_count(per_sample));
        let warp = UNIT_POS_Y as usize;
        let (fm, fn_) = (warp / fragments_n, warp % fragments_n);
        let threads = comptime!(32 * (TILE / FRAGMENT) * fragments_n);

        let mut rows = SharedMemory::<u32>::new(comptime!(halo_rows(cell)));
        stage_halo_rows(windows, &mut rows, base, count, cell, threads);
        sync_cube();
        // Fragments load from 32-byte aligned addresses.
        let mut shifted = SharedMemory::<F>::new_aligned(len, 32usize);
        for chunk in 0..comptime!(len.div_ceil(threads * LOADS)) {
            let mut values = Array::<F>::new(LOADS);
            #[unroll]
            for i in 0..LOADS {
                let e = staged_element(chunk, i, threads);
                let mut v = F::new(0.0);
                if e < len {
                    let (r, c) = (e / k_pad, e % k_pad);
                    let (kx, q, l) = (r / copy_rows, (r % copy_rows) / cell_rows, r % cell_rows);
                    let h = q * comptime!(side * side) + (l / cell) * side + l % cell + kx;
                    v = source_value(source, rows[h] as usize, c, channels);
                }
                values[i] = v;
            }
            store_chunk(&values, &mut shifted, chunk, len, 1usize, 1usize, threads);
        }
        sync_cube();
        let acc = zero_fragment();
        // The warp's 16 pixels: from cell row `py` of cell `q`.
        let first = fm * FRAGMENT;
        let (q, py) = (first / comptime!(cell * cell), (first % comptime!(cell * cell)) / cell);
        let weight_row = CUBE_POS_Y as usize * weight.stride(0);
        for t in 0..9usize {
            let (ky, kx) = (t / 3usize, t % 3usize);
            let a_row = kx * copy_rows + q * cell_rows + (py + ky) * cell;
            #[unroll]
            for kk in 0..comptime!(k_pad / FRAGMENT) {
                let a = shifted.slice(a_row * k_pad + kk * FRAGMENT, len);
                let b_start = weight_row + (t * k_pad + kk * FRAGMENT) * u_pad + fn_ * FRAGMENT;
                let b = weight.slice(b_start, b_start + comptime!(FRAGMENT * u_pad));
                multiply_add(&a, k_pad as u32, &b, u_pad as u32, &acc);
            }
        }
        write_fragments(&acc, warp, bias, kept, out, base, count, units, select_outputs, gelu);
    }

    /// A conv's weights `[O, I, 3, 3]` laid out for the window-conv kernels: per row of `kept`
    /// (a sample; one placeholder row if neither side is selected), tap by tap, `[channels,
    /// units]` rows zero-padded to `channels_pad` x `units_pad` (whole groups of 4 units for
    /// [`window_conv_kernel`], whole fragments for [`window_conv_mma_kernel`]), with the
    /// sample's kept units (`kept[sample, _]`) as the outputs when `select_outputs` or the input
    /// channels when `select_inputs`. One thread per value.
    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn kept_weights_kernel<F: Float, I: Int>(
        weight: &Tensor<F>,
        kept: &Tensor<I>,
        out: &mut Tensor<F>,
        #[comptime] channels: usize,
        #[comptime] units: usize,
        #[comptime] channels_pad: usize,
        #[comptime] units_pad: usize,
        #[comptime] select_outputs: bool,
        #[comptime] select_inputs: bool,
        #[define(F, I)] _dtypes: [StorageType; 2],
    ) {
        let per_sample = comptime!(9 * channels_pad * units_pad);
        if ABSOLUTE_POS >= out.shape(0) * per_sample {
            terminate!();
        }
        let sample = ABSOLUTE_POS / per_sample;
        let r = ABSOLUTE_POS % per_sample;
        let t = r / comptime!(channels_pad * units_pad);
        let c = (r / units_pad) % channels_pad;
        let u = r % units_pad;
        let mut v = F::new(0.0);
        if u < units && c < channels {
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

/// Shared memory a cube may use without opting in to more.
const SHARED_BYTES: usize = 48 * 1024;

/// The cell side the window-conv kernels stage whole cells of ([`WindowConv::cell`]), or 0 (each
/// tap's rows read from global memory): cells that tile a `TILE` and whose staging fits in
/// shared memory next to the kernel's other buffers. `(c_pad, u_pad)`: the kernel's channels
/// and units as padded (the channels themselves in [`window_conv_kernel`], whose pixel rows
/// are an odd pitch apart).
fn staged_cell(hint: Option<usize>, (c_pad, u_pad): (usize, usize), mma: bool, bytes: usize) -> usize {
    let Some(cell) = hint.filter(|&c| c >= 2 && TILE.is_multiple_of(c * c)) else {
        return 0;
    };
    let pitch = if mma { c_pad } else { c_pad | 1 };
    let staged = halo_rows(cell) * (4 + c_pad * bytes);
    let others = TILE * pitch * bytes + c_pad * u_pad * bytes + TILE * u_pad * 4;
    if staged + others <= SHARED_BYTES {
        cell
    } else {
        0
    }
}

/// The cell side [`window_conv_cells_mma_kernel`] runs at: 4 or 8 (a fragment's 16 pixels are
/// then whole rows of one cell), where its shifted copies fit in shared memory.
fn shifted_cell(hint: Option<usize>, (k_pad, u_pad): (usize, usize), bytes: usize) -> Option<usize> {
    hint.filter(|&c| {
        (c == 4 || c == 8) && halo_rows(c) * 4 + 3 * shifted_rows(c) * k_pad * bytes + TILE * u_pad * 4 <= SHARED_BYTES
    })
}

/// [`GatheredBackend::window_conv`] on the GPU: the sample's weights laid out, then on the
/// tensor cores (bf16 within their bounds) [`window_conv_cells_mma_kernel`] where the pixels
/// come in cells it takes, else [`window_conv_mma_kernel`]; otherwise [`window_conv_kernel`].
/// `kept` selects per `selects` (`[outputs, inputs]`), unread if neither.
#[allow(unsafe_code)]
fn window_conv_cube(
    [source, windows, weight, bias, kept]: [CubeTensor<CudaRuntime>; 5],
    selects: [bool; 2],
    gelu: bool,
    hint: Option<usize>,
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
    let bytes = source.dtype.size();
    // The tensor cores take bf16 operands and a tile that fits shared memory: at most 64
    // output and 128 input units, padded to whole fragments.
    let fragments = (channels.div_ceil(FRAGMENT) * FRAGMENT, units.div_ceil(FRAGMENT) * FRAGMENT);
    let mma = source.dtype == DType::BF16 && fragments.1 <= 64 && fragments.0 <= 128;
    let pads = if mma { fragments } else { (channels, units.div_ceil(4) * 4) };
    let laid_out = empty(&source, [batch, 9 * pads.0 * pads.1], source.dtype);
    let (count, dim) = elementwise(&client, laid_out.meta.shape().iter().product());
    // SAFETY (these launches): each kernel bounds its own reads and writes: by the element
    // count, and by the tile's pixel count, the source's rows and the staged lengths.
    unsafe {
        kept_weights_kernel::launch_unchecked(
            &client,
            count,
            dim,
            weight.into_tensor_arg(),
            kept.clone().into_tensor_arg(),
            laid_out.clone().into_tensor_arg(),
            channels,
            units,
            pads.0,
            pads.1,
            selects[0],
            selects[1],
            dtypes,
        );
    }
    let weight = laid_out;
    let tiles = CubeCount::Static(per_sample.div_ceil(TILE) as u32, batch as u32, 1);
    // The window-conv kernels take the same arguments.
    macro_rules! launch_window_conv {
        ($kernel:ident, $dim:expr, $cell:expr) => {
            unsafe {
                $kernel::launch_unchecked(
                    &client,
                    tiles,
                    $dim,
                    source.into_tensor_arg(),
                    windows.into_tensor_arg(),
                    weight.into_tensor_arg(),
                    bias.into_tensor_arg(),
                    kept.into_tensor_arg(),
                    out.clone().into_tensor_arg(),
                    per_sample as u32,
                    channels,
                    units,
                    $cell,
                    selects[0],
                    gelu,
                    dtypes,
                )
            }
        };
    }
    if mma {
        let warps = CubeDim::new_2d(32, ((TILE / FRAGMENT) * (pads.1 / FRAGMENT)) as u32);
        match shifted_cell(hint, pads, bytes) {
            Some(cell) => launch_window_conv!(window_conv_cells_mma_kernel, warps, cell),
            None => launch_window_conv!(window_conv_mma_kernel, warps, staged_cell(hint, pads, true, bytes)),
        }
    } else {
        let dim = CubeDim::new_2d((TILE / PIXELS_PER_THREAD) as u32, units.div_ceil(4) as u32);
        launch_window_conv!(window_conv_kernel, dim, staged_cell(hint, pads, false, bytes));
    }
    out
}

/// A [`WindowConv`]'s operands with its kept units resolved: `kept` (a placeholder row when
/// neither side is selected), which side it selects (`[outputs, inputs]`) and the output units.
struct ResolvedConv<B: Backend> {
    source: Tensor<B, 2>,
    windows: Tensor<B, 1, Int>,
    weight: Tensor<B, 4>,
    bias: Tensor<B, 1>,
    kept: Tensor<B, 2, Int>,
    selects: [bool; 2],
    units: usize,
    gelu: bool,
    cell: Option<usize>,
}

impl<B: Backend> ResolvedConv<B> {
    fn new(conv: WindowConv<B>) -> Self {
        let WindowConv { source, windows, weight, bias, units, gelu, cell } = conv;
        let [o, ..] = weight.dims();
        let (kept, selects, units) = match units {
            // A placeholder of one row (one sample) that the kernels do not read.
            KeptUnits::All => (windows.clone().reshape([1, -1]), [false, false], o),
            KeptUnits::Outputs(kept) => {
                let k = kept.dims()[1];
                (kept, [true, false], k)
            }
            KeptUnits::Inputs(kept) => (kept, [false, true], o),
        };
        ResolvedConv { source, windows, weight, bias, kept, selects, units, gelu, cell }
    }
}

/// The kernels launched directly (`--launch direct`: no fusion layer, each op runs when called).
impl<F: FloatElement> GatheredBackend for Cube<F> {
    fn rank_top_k(scores: Tensor<Self, 2>, k: usize) -> (Tensor<Self, 2, Int>, Tensor<Self, 2, Int>) {
        let (ranks, top) = rank_cube(scores.into_primitive().tensor(), k);
        (Tensor::from_primitive(top), Tensor::from_primitive(ranks))
    }

    fn window_conv(conv: WindowConv<Self>) -> Tensor<Self, 2> {
        let c = ResolvedConv::new(conv);
        let inputs = [
            c.source.into_primitive().tensor(),
            c.windows.into_primitive(),
            c.weight.into_primitive().tensor(),
            c.bias.into_primitive().tensor(),
            c.kept.into_primitive(),
        ];
        let out = window_conv_cube(inputs, c.selects, c.gelu, c.cell);
        Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(out))
    }
}

#[derive(Debug)]
struct WindowConvOp<F> {
    desc: CustomOpIr,
    selects: [bool; 2],
    gelu: bool,
    cell: Option<usize>,
    float: PhantomData<F>,
}

impl<F: FloatElement> Operation<Runtime> for WindowConvOp<F> {
    fn execute(&self, handles: &mut Handles) {
        let ([source, windows, weight, bias, kept], [out]) = self.desc.as_fixed();
        let inputs = [
            handles.get_float_tensor::<Cube<F>>(source),
            handles.get_int_tensor::<Cube<F>>(windows),
            handles.get_float_tensor::<Cube<F>>(weight),
            handles.get_float_tensor::<Cube<F>>(bias),
            handles.get_int_tensor::<Cube<F>>(kept),
        ];
        let output = window_conv_cube(inputs, self.selects, self.gelu, self.cell);
        handles.register_float_tensor::<Cube<F>>(&out.id, output);
    }
}

#[derive(Debug)]
struct RankOp<F> {
    desc: CustomOpIr,
    float: PhantomData<F>,
}

impl<F: FloatElement> Operation<Runtime> for RankOp<F> {
    fn execute(&self, handles: &mut Handles) {
        let ([scores], [ranks, top]) = self.desc.as_fixed();
        let scores = handles.get_float_tensor::<Cube<F>>(scores);
        let (rank_values, top_values) = rank_cube(scores, top.shape[1]);
        handles.register_int_tensor::<Cube<F>>(&ranks.id, rank_values);
        handles.register_int_tensor::<Cube<F>>(&top.id, top_values);
    }
}

/// The kernels as custom operations of the fusion stream (`--launch fused`, the default).
impl<F: FloatElement> GatheredBackend for Fusion<Cube<F>> {
    fn rank_top_k(scores: Tensor<Self, 2>, k: usize) -> (Tensor<Self, 2, Int>, Tensor<Self, 2, Int>) {
        let [b, n] = scores.dims();
        let scores: FusionTensor<Runtime> = scores.into_primitive().tensor();
        let client = scores.client.clone();
        let streams = OperationStreams::with_inputs([&scores]);
        let output = |shape: [usize; 2]| TensorIr::uninit(client.create_empty_handle(), Shape::new(shape), DType::I32);
        let desc = CustomOpIr::new("dyna_pruner_rank", &[scores.into_ir()], &[output([b, n]), output([b, k])]);
        let op = RankOp::<F> { desc: desc.clone(), float: PhantomData };
        let mut out = client.register(streams, OperationIr::Custom(desc), op);
        let top = Tensor::from_primitive(out.pop().expect("two outputs"));
        let ranks = Tensor::from_primitive(out.pop().expect("two outputs"));
        (top, ranks)
    }

    fn window_conv(conv: WindowConv<Self>) -> Tensor<Self, 2> {
        let c = ResolvedConv::new(conv);
        let n = c.windows.dims()[0] / 9;
        let source: FusionTensor<Runtime> = c.source.into_primitive().tensor();
        let client = source.client.clone();
        let output = TensorIr::uninit(client.create_empty_handle(), Shape::new([n, c.units]), source.dtype);
        let (windows, kept) = (c.windows.into_primitive(), c.kept.into_primitive());
        let (weight, bias) = (c.weight.into_primitive().tensor(), c.bias.into_primitive().tensor());
        let streams = OperationStreams::with_inputs([&source, &windows, &weight, &bias, &kept]);
        let inputs = [source.into_ir(), windows.into_ir(), weight.into_ir(), bias.into_ir(), kept.into_ir()];
        let desc = CustomOpIr::new("dyna_pruner_window_conv", &inputs, &[output]);
        let (selects, gelu, cell) = (c.selects, c.gelu, c.cell);
        let op = WindowConvOp::<F> { desc: desc.clone(), selects, gelu, cell, float: PhantomData };
        let mut out = client.register(streams, OperationIr::Custom(desc), op);
        Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(out.pop().expect("one output")))
    }
}

/// These need a CUDA GPU: `cargo test --release --features cuda gathered::cuda` on one.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CpuBackend, CudaBackend};
    use burn::tensor::bf16;
    use burn::tensor::TensorData;
    use dyna_pruner_exec::SampleMasks;
    use dyna_pruner_spec::{BackboneSpec, CnnSpec, DataScope, Frames};

    use crate::gathered::{GatheredMasks, IndexMasks};
    use crate::method::masks::kept_count;
    use crate::method::FixedMasks;
    use crate::model::{Architecture, DynamicModel};
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
            let (top, ranks) = (ints(top), ints(ranks));
            fn on<B: GatheredBackend>(scores: TensorData, k: usize) -> [Vec<i64>; 2] {
                // The scores are multiples of 1/8: exact in bf16 too.
                let dtype = <B::FloatElem as burn::tensor::Element>::dtype();
                let scores = Tensor::<B, 2>::from_data(scores, (&Default::default(), dtype));
                let (top, ranks) = B::rank_top_k(scores, k);
                [ints(top), ints(ranks)]
            }
            let data = scores.into_data();
            for (name, [cuda_top, cuda_ranks]) in [
                ("fused f32", on::<CudaBackend>(data.clone(), k)),
                ("direct f32", on::<crate::CudaDirectBackend>(data.clone(), k)),
                ("fused bf16", on::<CudaBackend<bf16>>(data.clone(), k)),
                ("direct bf16", on::<crate::CudaDirectBackend<bf16>>(data.clone(), k)),
            ] {
                assert_eq!(cuda_top, top, "{name}: top-{k} of [{b}, {n}]");
                assert_eq!(cuda_ranks, ranks, "{name}: ranks of [{b}, {n}]");
            }
        }
    }

    /// Windows of `n` pixels into `rows` rows (and the index `rows`, which reads zeros): any
    /// rows; or, with `cell`, whole cells whose pixels' taps on the same pixel name the same row.
    fn test_windows(rng: &mut StdRng, n: usize, rows: usize, cell: Option<usize>) -> Vec<i64> {
        let Some(cell) = cell else {
            return (0..n * 9).map(|t| ((t * 7919 + 13) % (rows + 1)) as i64).collect();
        };
        let side = cell + 2;
        let mut windows = Vec::with_capacity(n * 9);
        for _ in 0..n / (cell * cell) {
            let halo: Vec<i64> = (0..side * side).map(|_| rng.random_range(0..=rows) as i64).collect();
            for (dy, dx) in (0..cell).flat_map(|dy| (0..cell).map(move |dx| (dy, dx))) {
                windows.extend((0..9).map(|t| halo[(dy + t / 3) * side + dx + t % 3]));
            }
        }
        windows
    }

    /// The kernel against the provided method for `KeptUnits` `mode` (0 all, 1 outputs, 2 inputs).
    fn check_window_conv(
        rng: &mut StdRng,
        [b, per_sample, o, i, k]: [usize; 5],
        mode: usize,
        gelu: bool,
        cell: Option<usize>,
    ) {
        let n = per_sample * b;
        let c = [i, i, k][mode];
        let rows = 3 * n;
        let windows = test_windows(rng, n, rows, cell);
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
            setup: [usize; 4],
        ) -> Vec<f32> {
            let [b, mode, gelu, cell] = setup;
            let device = Default::default();
            // The backend's own float type: a tensor's default is the device's, which the
            // first test to reach the GPU fixes for the whole process.
            let dtype = <B::FloatElem as burn::tensor::Element>::dtype();
            let kept = Tensor::<B, 1, Int>::from_ints(kept, &device).reshape([b as i32, -1]);
            let units = [KeptUnits::All, KeptUnits::Outputs(kept.clone()), KeptUnits::Inputs(kept)];
            let out = B::window_conv(WindowConv {
                source: Tensor::from_data(data[0].clone(), (&device, dtype)),
                windows: Tensor::from_ints(windows, &device),
                weight: Tensor::from_data(data[1].clone(), (&device, dtype)),
                bias: Tensor::from_data(data[2].clone(), (&device, dtype)),
                units: units.into_iter().nth(mode).expect("three modes"),
                gelu: gelu == 1,
                cell: (cell > 0).then_some(cell),
            });
            out.into_data().convert::<f32>().to_vec().unwrap()
        }
        let setup = [b, mode, gelu as usize, cell.unwrap_or(0)];
        let want = run::<CpuBackend>(&data, &windows, &kept, setup);
        let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        // bf16 rounds the operands and the output to 8 bits of mantissa (2^-8 = 3.9e-3), f32
        // accumulation.
        type Run = fn(&[TensorData; 3], &[i64], &[i64], [usize; 4]) -> Vec<f32>;
        let backends: [(&str, Run, f32); 4] = [
            ("fused f32", run::<CudaBackend>, 1e-5),
            ("direct f32", run::<crate::CudaDirectBackend>, 1e-5),
            ("fused bf16", run::<CudaBackend<bf16>>, 2e-2),
            ("direct bf16", run::<crate::CudaDirectBackend<bf16>>, 2e-2),
        ];
        for (name, run_on, tolerance) in backends {
            let got = run_on(&data, &windows, &kept, setup);
            assert_eq!(got.len(), want.len());
            let worst = got.iter().zip(&want).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                worst < tolerance * scale,
                "{name}, {setup:?} (batch, mode, gelu, cell), {o}x{i} conv, {k} kept: max |diff| {worst} (scale {scale})"
            );
        }
    }

    #[test]
    fn cuda_window_conv_matches_the_reference() {
        let mut rng = StdRng::seed_from_u64(4);
        // [batch, pixels per sample, outputs, inputs, kept]: tiles cut short, counts off
        // multiples of 4 and of the fragments, the blocks', encoder's and decoder's shapes;
        // more than 64 kept units (bf16 then runs the plain kernel). Then whole cells staged
        // once: tiles of several cells, of one, cut short; a cell side whose staging does not
        // fit or does not tile (the kernels then read each tap).
        for (shape, mode, cell) in [
            ([2, 50, 96, 16, 70], 1, None),
            ([3, 100, 64, 32, 19], 1, None),
            ([2, 64, 32, 64, 19], 2, None),
            ([2, 130, 32, 6, 1], 0, None),
            ([2, 70, 8, 32, 1], 0, None),
            ([1, 7, 5, 3, 2], 1, None),
            ([1, 7, 5, 3, 2], 2, None),
            ([3, 112, 64, 32, 19], 1, Some(4)),
            ([2, 48, 32, 64, 19], 2, Some(4)),
            ([2, 192, 32, 8, 1], 0, Some(8)),
            ([2, 20, 5, 3, 2], 1, Some(2)),
            ([2, 48, 96, 16, 70], 1, Some(4)),
            ([1, 18, 6, 4, 1], 0, Some(3)),
            ([2, 32, 32, 96, 19], 1, Some(4)),
        ] {
            for gelu in [false, true] {
                check_window_conv(&mut rng, shape, mode, gelu, cell);
            }
        }
    }

    type Forwards = fn(&[u8], &Architecture, &TensorData, &[SampleMasks]) -> [Vec<f32>; 2];

    /// The model recorded in `weights`, on backend `B`'s default device, and the input on it.
    fn loaded<B: Backend>(weights: &[u8], arch: &Architecture, x: &TensorData) -> (DynamicModel<B>, Tensor<B, 5>) {
        let device = Default::default();
        let x = Tensor::<B, 5>::from_data(x.clone().convert::<B::FloatElem>(), &device);
        (DynamicModel::<B>::from_weight_bytes(arch, weights, &device).unwrap(), x)
    }

    /// `model`'s masked-dense forward under the given masks.
    fn masked_dense<B: Backend>(model: &DynamicModel<B>, x: Tensor<B, 5>, masks: &[SampleMasks]) -> Vec<f32> {
        let [_, _, _, h, w] = x.dims();
        let patch = model.arch.patch();
        let grid = (h.div_ceil(patch), w.div_ceil(patch));
        let mut fixed = FixedMasks::new(masks, grid, &model.arch.layer_units(), patch, &x.device());
        model.forward_masked(x, &mut fixed).into_data().convert::<f32>().to_vec().unwrap()
    }

    /// The masked-dense and the gathered forward of the model recorded in `weights` on backend
    /// `B`, under the given masks.
    fn forwards<B: GatheredBackend>(
        weights: &[u8],
        arch: &Architecture,
        x: &TensorData,
        masks: &[SampleMasks],
    ) -> [Vec<f32>; 2] {
        let (model, x) = loaded::<B>(weights, arch, x);
        let given = GatheredMasks::Given(IndexMasks::from_lists(masks, &x.device()));
        let gathered = model.forward_gathered(x.clone(), given).0;
        [masked_dense(&model, x, masks), gathered.into_data().convert::<f32>().to_vec().unwrap()]
    }

    /// The bench's CNN (`dyna-pruner bench --device cuda`) at its sizes, on the f32 CUDA
    /// backends, against the CPU's masked-dense forward: the kernel tests above run small
    /// shapes only. (In bf16 the model must be the process's first GPU tensors, see
    /// [`crate::cuda_device`]: `bench --device cuda --precision bf16` checks that forward.)
    #[test]
    fn cuda_gathered_forward_matches_the_cpu_at_bench_sizes() {
        let mut rng = StdRng::seed_from_u64(6);
        let mut failures = Vec::new();
        for scope in [DataScope::Network, DataScope::Translator] {
            let cnn = CnnSpec { hidden: 32, units: 64, blocks: 8, stride: 2, data_scope: scope };
            let arch = Architecture::new(Frames { t_in: 4, t_out: 4, channels: 2 }, 8, BackboneSpec::Cnn(cnn));
            let model = DynamicModel::<CpuBackend>::new(&arch, &Default::default());
            let weights = model.into_weight_bytes().unwrap();
            for (size, batch) in [(64usize, 2usize), (384, 2), (384, 32)] {
                let shape = [batch, 4, 2, size, size];
                let values: Vec<f32> = (0..shape.iter().product()).map(|_| rng.random_range(0.0..1.0)).collect();
                let x = TensorData::new(values, shape);
                let n = size.div_ceil(8).pow(2);
                let masks: Vec<SampleMasks> = (0..batch)
                    .map(|_| SampleMasks {
                        patches: sample(&mut rng, n, kept_count(0.3, n)).into_vec(),
                        units: (0..8).map(|_| sample(&mut rng, 64, 19).into_vec()).collect(),
                    })
                    .collect();
                let (cpu_model, cpu_x) = loaded::<CpuBackend>(&weights, &arch, &x);
                let want = masked_dense(&cpu_model, cpu_x, &masks);
                let scale = want.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
                let backends: [(&str, Forwards, f32); 2] = [
                    ("fused f32", forwards::<CudaBackend>, 1e-3),
                    ("direct f32", forwards::<crate::CudaDirectBackend>, 1e-3),
                ];
                for (name, run_on, tolerance) in backends {
                    for (path, got) in ["masked-dense", "gathered"].iter().zip(run_on(&weights, &arch, &x, &masks)) {
                        let worst = got.iter().zip(&want).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
                        let line = format!(
                            "{scope:?} {size}x{size} batch {batch}, {name} {path}: max |diff| {worst:.3e} (scale {scale:.3})"
                        );
                        eprintln!("{line}");
                        if worst.is_nan() || worst > tolerance * scale {
                            failures.push(line);
                        }
                    }
                }
            }
        }
        assert!(failures.is_empty(), "beyond tolerance:\n{}", failures.join("\n"));
    }
}
