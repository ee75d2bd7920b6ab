//! Sparse execution of the dynamic CNN for GPUs (SBNet/DynConv pattern).
//!
//! The CPU executor (`dyna-pruner-exec`) runs per-sample work on plain kernels; on a GPU the
//! work must stay in a few large batched kernels. Top-k keeps the same *number* of patches and
//! units in every sample, so everything stays dense-batched. Data moves by `select` (one GPU
//! thread per output element): Burn 0.21's CUDA `scatter` and `select_assign` run one thread
//! per element of the *other* axes and loop over the scattered one.
//!
//! Two operations go through [`GatheredBackend`], whose provided methods (framework ops) are
//! the references the CPU backend runs; the CUDA backend runs one CubeCL kernel for each
//! (`cuda.rs`, tested against them):
//! - the ranking of the patch and unit scores (top-k): the framework ops materialise
//!   `[batch, n, n]` comparison tensors;
//! - a 3x3 conv at gathered pixels ([`GatheredBackend::window_conv`]): each pixel's 9 taps are
//!   rows of a channels-last buffer, named by an index table. The framework ops select them as
//!   im2col rows for one batched matmul with each sample's kept units' weights; the kernel
//!   reads the rows and weights in place through shared memory (the im2col rows are hundreds
//!   of MB per conv at batch 32; docs/BENCHMARKS.md has the timings).
//!
//! The translator map is held channels-last, zero-padded by one pixel and up to whole patches,
//! as rows `[batch * rows * cols, C]`. Per masked block:
//!
//! 1. conv1 runs at the kept patches' pixels only, with each sample's kept units' weights,
//!    then GELU;
//! 2. conv2 reads a hidden map that is zero off the kept patches: the same windows read those
//!    hidden rows or zeros (where a window leaves the kept patches or the frame), with the kept
//!    units' input channels, giving the update;
//! 3. every map row selects its update row, or the zero row off the kept patches, and adds it:
//!    pruned patches keep the identity path.
//!
//! Under `DataScope::Network` the map is zero off the kept patches, so it is held as the kept
//! pixels' rows only: conv1's windows read them or zeros, like conv2's, and step 3 is
//! a plain add (no select over the whole map per block).
//!
//! The unit gates read the map's S-weighted sum over all pixels: it is pooled once, then each
//! block adds its update's S-weighted sum over the kept pixels (nothing else changes).
//!
//! Under `DataScope::Translator` the encoder and decoder are the model's own layers (Burn's
//! `conv2d`), as in the dense forward this path is timed against. Under `DataScope::Network`
//! they too run at the kept patches' pixels only: the first conv at the input's kept pixels,
//! the strided conv on the windows of the kept skip rows (zero elsewhere), the transposed conv
//! as one matmul per kept translator pixel, and the last conv at the full-resolution kept
//! pixels; the change is scattered back onto the last frame. The reference is
//! the framework's masked-dense forward (tests here, on the CPU backend; `dyna-pruner bench
//! --device cuda` checks it on the GPU).

use burn::nn::conv::Conv2d;
use burn::prelude::*;
use burn::tensor::activation;
use burn::tensor::ops::PadMode;
use burn::tensor::IndexingUpdateOp;

use crate::backbones::cnn::{Cnn, MaskedBlock};
use crate::backbones::{Backbone, DataScope};
use crate::method::masks::{kept_count, top_k_with_ranks};
use crate::method::Masking;
use crate::model::DynamicModel;

#[cfg(feature = "cuda")]
mod cuda;

/// Kept patches and units of a batch as device index tensors (the same count in every sample).
pub struct IndexMasks<B: Backend> {
    /// `[batch, kept patches]`, indices into the `hp x wp` patch grid.
    pub patches: Tensor<B, 2, Int>,
    /// Per block, `[batch, kept units]`.
    pub units: Vec<Tensor<B, 2, Int>>,
}

impl<B: Backend> IndexMasks<B> {
    /// Index tensors from per-sample lists (which must all have the same lengths).
    pub fn from_lists(masks: &[dyna_pruner_exec::SampleMasks], device: &B::Device) -> Self {
        let b = masks.len();
        let tensor = |rows: Vec<&Vec<usize>>| {
            let k = rows[0].len();
            assert!(rows.iter().all(|r| r.len() == k), "every sample must keep the same count");
            let flat: Vec<i64> = rows.iter().flat_map(|r| r.iter().map(|&i| i as i64)).collect();
            Tensor::<B, 1, Int>::from_ints(flat.as_slice(), device).reshape([b, k])
        };
        let layers = masks[0].units.len();
        IndexMasks {
            patches: tensor(masks.iter().map(|m| &m.patches).collect()),
            units: (0..layers).map(|l| tensor(masks.iter().map(|m| &m.units[l]).collect())).collect(),
        }
    }

    /// Per-sample lists (read back from the device), e.g. for [`crate::method::FixedMasks`].
    pub fn to_lists(&self) -> Vec<dyna_pruner_exec::SampleMasks> {
        let rows = |t: &Tensor<B, 2, Int>| -> Vec<Vec<usize>> {
            let [b, k] = t.dims();
            let flat = t.clone().into_data().convert::<i64>().to_vec::<i64>().expect("index data");
            (0..b).map(|i| flat[i * k..(i + 1) * k].iter().map(|&v| v as usize).collect()).collect()
        };
        let units: Vec<Vec<Vec<usize>>> = self.units.iter().map(rows).collect();
        rows(&self.patches)
            .into_iter()
            .enumerate()
            .map(|(i, patches)| dyna_pruner_exec::SampleMasks {
                patches,
                units: units.iter().map(|layer| layer[i].clone()).collect(),
            })
            .collect()
    }
}

/// Where the masks come from.
pub enum GatheredMasks<B: Backend> {
    /// The model's mask generator and gates at these keep ratios (both masks on).
    Method(Masking),
    /// Given index masks.
    Given(IndexMasks<B>),
}

/// The ranking of the gathered path, which a backend may run as its own kernel. The provided
/// method is the framework-ops reference (pairwise comparisons), which the CPU backend runs;
/// the CUDA backend runs one CubeCL kernel (feature `cuda`, `gathered/cuda.rs`), tested
/// against it.
pub trait GatheredBackend: Backend {
    /// Each row's `k` highest scores' indices (highest first, ties to the lower index) and every
    /// score's rank in its row.
    ///
    /// # Shapes
    /// - scores: `[batch, n]`
    /// - output: `[batch, k]`, `[batch, n]`
    fn rank_top_k(scores: Tensor<Self, 2>, k: usize) -> (Tensor<Self, 2, Int>, Tensor<Self, 2, Int>) {
        top_k_with_ranks(scores, k)
    }

    /// A 3x3 convolution at gathered pixels, then GELU if `gelu`: each pixel's 9 taps are rows
    /// of `source` named by `windows` (the index `rows` reads zeros: taps off the kept pixels or
    /// outside the frame), times the layer's weights, plus its bias; with kept units, each
    /// sample's own. Pixels are in sample order, the same count per sample. The provided method
    /// selects each sample's weights and the taps as im2col rows for one (batched) matmul; the
    /// CUDA backend lays the weights out in one kernel and reads them and the taps in place in
    /// a second (`cuda.rs`).
    ///
    /// # Shapes
    /// - source: `[rows, C]`; windows: `[pixels * 9]`
    /// - weight: the layer's `[O, I, 3, 3]`; bias: `[O]`
    /// - output: `[pixels, U]`: `U = O` and `C = I`, or as [`KeptUnits`] says
    fn window_conv(conv: WindowConv<Self>) -> Tensor<Self, 2> {
        let WindowConv { source, windows, weight, bias, units, gelu, cell: _ } = conv;
        let [o, i, _, _] = weight.dims();
        let n = windows.dims()[0] / 9;
        let cols = with_zero_row(source).select(0, windows);
        let out = match units {
            KeptUnits::All => {
                let weight = weight.permute([2, 3, 1, 0]).reshape([9 * i, o]);
                cols.reshape([n, 9 * i]).matmul(weight) + bias.reshape([1, o])
            }
            KeptUnits::Outputs(units) => {
                let [b, k] = units.dims();
                let units = units.reshape([b * k]);
                let weight = weight.permute([0, 2, 3, 1]).reshape([o, 9 * i]).select(0, units.clone());
                let weight = weight.reshape([b, k, 9 * i]).swap_dims(1, 2);
                let bias = bias.select(0, units).reshape([b, 1, k]);
                (cols.reshape([b, n / b, 9 * i]).matmul(weight) + bias).reshape([n, k])
            }
            KeptUnits::Inputs(units) => {
                let [b, k] = units.dims();
                let weight = weight.permute([1, 2, 3, 0]).reshape([i, 9 * o]).select(0, units.reshape([b * k]));
                let weight = weight.reshape([b, k, 9, o]).swap_dims(1, 2).reshape([b, 9 * k, o]);
                (cols.reshape([b, n / b, 9 * k]).matmul(weight) + bias.reshape([1, 1, o])).reshape([n, o])
            }
        };
        if gelu {
            activation::gelu(out)
        } else {
            out
        }
    }
}

/// Which of a conv's units a sample keeps (the same count in every sample).
pub enum KeptUnits<B: Backend> {
    /// Every input and output channel.
    All,
    /// `[batch, k]`: the output units computed (`U = k`), as in a block's first conv.
    Outputs(Tensor<B, 2, Int>),
    /// `[batch, k]`: the input channels read (`C = k`, the rest are zero), as in its second.
    Inputs(Tensor<B, 2, Int>),
}

/// The arguments of [`GatheredBackend::window_conv`].
pub struct WindowConv<B: Backend> {
    pub source: Tensor<B, 2>,
    pub windows: Tensor<B, 1, Int>,
    pub weight: Tensor<B, 4>,
    pub bias: Tensor<B, 1>,
    pub units: KeptUnits<B>,
    pub gelu: bool,
    /// `Some(c)` when the pixels come in whole `c x c` cells (row-major, each sample's pixels a
    /// whole number of cells) and the taps of a cell's pixels that land on the same pixel name
    /// the same row: a kernel may then read each cell's `(c + 2)^2` rows once. The reference
    /// does not need it.
    pub cell: Option<usize>,
}

impl GatheredBackend for crate::CpuBackend {}

/// The translator map's geometry: `h x w` feature pixels in `cell x cell` patch cells, padded
/// by one pixel and up to whole cells to `rows x cols`.
#[derive(Clone, Copy)]
struct Grid {
    h: usize,
    w: usize,
    cell: usize,
    wp: usize,
    patches: usize,
    rows: usize,
    cols: usize,
}

impl Grid {
    fn new(h: usize, w: usize, cell: usize) -> Self {
        let (hp, wp) = (h.div_ceil(cell), w.div_ceil(cell));
        Grid { h, w, cell, wp, patches: hp * wp, rows: hp * cell + 2, cols: wp * cell + 2 }
    }

    fn pixels(&self) -> usize {
        self.rows * self.cols
    }

    /// Per padded map pixel: its patch, or `patches` (a never-kept sentinel) on the padding;
    /// and its position inside its cell.
    fn pixel_tables<B: Backend>(&self, device: &B::Device) -> (Tensor<B, 1, Int>, Tensor<B, 1, Int>) {
        let (mut patch, mut local) = (Vec::with_capacity(self.pixels()), Vec::with_capacity(self.pixels()));
        for y in 0..self.rows {
            for x in 0..self.cols {
                let inside = (1..=self.h).contains(&y) && (1..=self.w).contains(&x);
                let (fy, fx) = (y.saturating_sub(1), x.saturating_sub(1));
                patch.push(if inside {
                    ((fy / self.cell) * self.wp + fx / self.cell) as i64
                } else {
                    self.patches as i64
                });
                local.push(((fy % self.cell) * self.cell + fx % self.cell) as i64);
            }
        }
        (Tensor::from_ints(patch.as_slice(), device), Tensor::from_ints(local.as_slice(), device))
    }
}

/// Row indices of one batch's kept patches over the padded, channels-last translator map.
struct KeptRows<B: Backend> {
    /// Per kept-patch pixel (in cell order) and 3x3 tap, the map row it reads:
    /// `[batch * kept * cell^2 * 9]`.
    windows: Tensor<B, 1, Int>,
    /// The same taps as rows of a kept-pixel buffer `[batch * kept * cell^2, _]`, or its length
    /// (a zero row: taps off the kept patches or outside the frame).
    buffer_windows: Tensor<B, 1, Int>,
    /// Per map row, its row in that buffer (the zero row off the kept patches): `[batch * rows * cols]`.
    back: Tensor<B, 1, Int>,
    /// Per map row, its patch (the sentinel `patches` on the padding): `[rows * cols]`.
    pixel_patch: Tensor<B, 1, Int>,
    /// The map rows of the kept patches' pixels, in cell order: `[batch * kept * cell^2]`.
    kept_pixels: Tensor<B, 1, Int>,
    grid: Grid,
}

impl<B: Backend> KeptRows<B> {
    /// `ranks`: each patch's top-k rank when `patches` are the top-k in rank order (then a
    /// patch's place among the kept ones is its rank; else it is found by a scatter, which
    /// Burn 0.21's CUDA backend runs in one thread per sample).
    ///
    /// # Shapes
    /// - patches: `[batch, kept]`; ranks: `[batch, patches of the grid]`
    fn new(patches: &Tensor<B, 2, Int>, grid: Grid, ranks: Option<&Tensor<B, 2, Int>>) -> Self {
        let [b, k] = patches.dims();
        let device = patches.device();
        let (cell, cols, pixels) = (grid.cell, grid.cols, grid.pixels());
        let cc = cell * cell;
        let (pixel_patch, pixel_local) = grid.pixel_tables::<B>(&device);
        // The top-left corner of each kept cell's 3x3-window block, as a map row.
        let sample = Tensor::<B, 1, Int>::arange(0..b as i64, &device).reshape([b, 1]);
        let corner = patches.clone().div_scalar(grid.wp as i64).mul_scalar((cell * cols) as i64)
            + patches.clone().remainder_scalar(grid.wp as i64).mul_scalar(cell as i64)
            + sample.clone().mul_scalar(pixels as i64);
        let taps: Vec<i64> = (0..cell)
            .flat_map(|dy| (0..cell).map(move |dx| (dy, dx)))
            .flat_map(|(dy, dx)| (0..3).flat_map(move |ky| (0..3).map(move |kx| ((dy + ky) * cols + dx + kx) as i64)))
            .collect();
        let taps = Tensor::<B, 1, Int>::from_ints(taps.as_slice(), &device).reshape([1, 1, cc * 9]);
        let windows = (corner.reshape([b, k, 1]) + taps).reshape([b * k * cc * 9]);
        // A pixel's own row is its window's centre tap (tap 4 of 9).
        let kept_pixels = windows.clone().reshape([b * k * cc, 9]).narrow(1, 4, 1).reshape([b * k * cc]);
        // Each patch's rank among the sample's kept ones, -1 if pruned (and for the sentinel).
        let rank = match ranks {
            Some(r) => {
                let kept = r.clone().mask_fill(r.clone().greater_equal_elem(k as i64), -1);
                Tensor::cat(vec![kept, Tensor::full([b, 1], -1, &device)], 1)
            }
            None => {
                let ranks = Tensor::<B, 1, Int>::arange(1..k as i64 + 1, &device).reshape([1, k]).repeat_dim(0, b);
                Tensor::<B, 2, Int>::full([b, grid.patches + 1], -1, &device).scatter(
                    1,
                    patches.clone(),
                    ranks,
                    IndexingUpdateOp::Add,
                )
            }
        };
        let rank = rank.select(1, pixel_patch.clone());
        let zero_row = (b * k * cc) as i64;
        let row =
            rank.clone().mul_scalar(cc as i64) + pixel_local.reshape([1, pixels]) + sample.mul_scalar((k * cc) as i64);
        let back = Tensor::full([b, pixels], zero_row, &device).mask_where(rank.greater_equal_elem(0), row);
        let back = back.reshape([b * pixels]);
        KeptRows {
            buffer_windows: back.clone().select(0, windows.clone()),
            windows,
            back,
            pixel_patch,
            kept_pixels,
            grid,
        }
    }
}

/// Per kept pixel of the `low` grid (in [`KeptRows`]' order) and 3x3 tap of a convolution with
/// `stride`, the row of the padded full-resolution map (`full`, of the same patches) it reads:
/// `[batch * kept * cell^2 * 9]`.
fn strided_windows<B: Backend>(patches: &Tensor<B, 2, Int>, full: Grid, low: Grid, stride: usize) -> Tensor<B, 1, Int> {
    let [b, k] = patches.dims();
    let device = patches.device();
    let (cell, cols, patch) = (low.cell, full.cols, full.cell);
    let sample = Tensor::<B, 1, Int>::arange(0..b as i64, &device).reshape([b, 1]);
    let corner = patches.clone().div_scalar(full.wp as i64).mul_scalar((patch * cols) as i64)
        + patches.clone().remainder_scalar(full.wp as i64).mul_scalar(patch as i64)
        + sample.mul_scalar(full.pixels() as i64);
    let taps: Vec<i64> = (0..cell)
        .flat_map(|dy| (0..cell).map(move |dx| (dy, dx)))
        .flat_map(|(dy, dx)| {
            (0..3).flat_map(move |ky| (0..3).map(move |kx| ((stride * dy + ky) * cols + stride * dx + kx) as i64))
        })
        .collect();
    let taps = Tensor::<B, 1, Int>::from_ints(taps.as_slice(), &device).reshape([1, 1, cell * cell * 9]);
    (corner.reshape([b, k, 1]) + taps).reshape([b * k * cell * cell * 9])
}

/// `layer` (a 3x3 conv) at gathered pixels: [`GatheredBackend::window_conv`].
fn conv_at<B: GatheredBackend>(
    layer: &Conv2d<B>,
    (source, windows): (Tensor<B, 2>, Tensor<B, 1, Int>),
    units: KeptUnits<B>,
    gelu: bool,
    cell: Option<usize>,
) -> Tensor<B, 2> {
    let bias = layer.bias.as_ref().expect("convs have a bias").val();
    B::window_conv(WindowConv { source, windows, weight: layer.weight.val(), bias, units, gelu, cell })
}

/// Per sample, the sum of its rows weighted by `s`: rows `[batch * n, C]`, s `[batch, n, 1]` ->
/// `[batch, C]`.
fn weighted_sum<B: Backend>(rows: Tensor<B, 2>, s: Tensor<B, 3>) -> Tensor<B, 2> {
    let [b, n, _] = s.dims();
    let [_, c] = rows.dims();
    (rows.reshape([b, n, c]) * s).sum_dim(1).reshape([b, c])
}

/// Appends a zero row: `[n, c]` -> `[n + 1, c]`.
fn with_zero_row<B: Backend>(rows: Tensor<B, 2>) -> Tensor<B, 2> {
    let [_, c] = rows.dims();
    let zero = Tensor::zeros([1, c], &rows.device());
    Tensor::cat(vec![rows, zero], 0)
}

impl<B: GatheredBackend> MaskedBlock<B> {
    /// The block's update at the kept pixels, on kept units only.
    ///
    /// # Shapes
    /// - source, windows: the map's rows and each kept pixel's 9 rows of it, `[batch * kept * cell^2 * 9]`
    /// - units: `[batch, kept units]`
    /// - output: `[batch * kept * cell^2, C]`
    fn update_gathered(
        &self,
        (source, windows): (Tensor<B, 2>, Tensor<B, 1, Int>),
        kept: &KeptRows<B>,
        units: &Tensor<B, 2, Int>,
    ) -> Tensor<B, 2> {
        let cell = Some(kept.grid.cell);
        let hidden = conv_at(&self.conv1, (source, windows), KeptUnits::Outputs(units.clone()), true, cell);
        let windows = kept.buffer_windows.clone();
        conv_at(&self.conv2, (hidden, windows), KeptUnits::Inputs(units.clone()), false, cell)
    }
}

/// The encoder's output, which fixes how the translator map is held between blocks.
enum Encoded<B: Backend> {
    /// `DataScope::Translator`: the skip map `[batch, hidden, h, w]`; the translator map holds
    /// every padded pixel's row, `[batch * rows * cols, hidden]` (pruned patches keep the
    /// encoder's values, which kept pixels' windows read).
    Dense(Tensor<B, 4>),
    /// `DataScope::Network`: the full-resolution kept rows and the skip map at them,
    /// `[batch * kept * patch^2, hidden]`; the translator map holds the kept pixels' rows only,
    /// `[batch * kept * cell^2, hidden]`, as it is zero elsewhere (no scatter back per block).
    Kept(KeptRows<B>, Tensor<B, 2>),
}

impl<B: GatheredBackend> Encoded<B> {
    /// The rows the kept pixels' 3x3 windows read and, per pixel and tap, which row.
    fn windows(&self, map: &Tensor<B, 2>, kept: &KeptRows<B>) -> (Tensor<B, 2>, Tensor<B, 1, Int>) {
        match self {
            Encoded::Dense(_) => (map.clone(), kept.windows.clone()),
            Encoded::Kept(..) => (map.clone(), kept.buffer_windows.clone()),
        }
    }

    /// The map with a block's update `[batch * kept * cell^2, hidden]` added at the kept pixels.
    fn add(&self, map: Tensor<B, 2>, update: Tensor<B, 2>, kept: &KeptRows<B>) -> Tensor<B, 2> {
        match self {
            Encoded::Dense(_) => map + with_zero_row(update).select(0, kept.back.clone()),
            Encoded::Kept(..) => map + update,
        }
    }
}

impl<B: GatheredBackend> Cnn<B> {
    /// The encoder at the kept pixels only (`DataScope::Network`): the skip map's rows at the
    /// full-resolution kept pixels and the translator input's at the low-resolution ones.
    ///
    /// # Shapes
    /// - x: `[batch, t_in, channels, h, w]`
    /// - output: `[batch * kept * patch^2, hidden]`, `[batch * kept * cell^2, hidden]`
    fn encode_kept(
        &self,
        x: Tensor<B, 5>,
        full: &KeptRows<B>,
        low: Grid,
        patches: &Tensor<B, 2, Int>,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let [b, t, c, h, w] = x.dims();
        let fg = full.grid;
        let input = x
            .reshape([b, t * c, h, w])
            .pad((1, fg.cols - 1 - w, 1, fg.rows - 1 - h), PadMode::Constant(0.0))
            .permute([0, 2, 3, 1])
            .reshape([b * fg.pixels(), t * c]);
        let skip = conv_at(&self.enc_in, (input, full.windows.clone()), KeptUnits::All, true, Some(fg.cell));
        let reads = full.back.clone().select(0, strided_windows(patches, fg, low, self.spec.stride));
        let z = conv_at(&self.enc_down, (skip.clone(), reads), KeptUnits::All, true, None);
        (skip, z)
    }

    /// The decoder at the kept pixels only (`DataScope::Network`): the change there, added to
    /// the last input frame (which pruned pixels keep).
    ///
    /// # Shapes
    /// - z: the translator output at the low-resolution kept pixels `[batch * kept * cell^2, hidden]`
    /// - skip: `[batch * kept * patch^2, hidden]`; x: the input `[batch, t_in, channels, h, w]`
    /// - output: `[batch, t_out, channels, h, w]`
    fn decode_kept(&self, z: Tensor<B, 2>, skip: Tensor<B, 2>, x: Tensor<B, 5>, full: &KeptRows<B>) -> Tensor<B, 5> {
        let [b, t, c, h, w] = x.dims();
        let [n, hid] = skip.dims();
        let s = self.spec.stride;
        let up = match &self.dec_up {
            // Each kept translator pixel becomes its stride x stride block of full-resolution
            // pixels, reordered into the full-resolution kept pixels' order (patch, row, column).
            Some(up) => {
                let weight = up.weight.val().permute([0, 2, 3, 1]).reshape([hid, s * s * hid]);
                let bias = up.bias.as_ref().expect("convs have a bias").val().reshape([1, 1, hid]);
                let blocks = activation::gelu(z.matmul(weight).reshape([n / (s * s), s * s, hid]) + bias);
                let cell = full.grid.cell / s;
                blocks.reshape([n / (cell * cell * s * s), cell, cell, s, s, hid]).swap_dims(2, 3).reshape([n, hid])
            }
            None => z,
        };
        let out_c = self.frames.t_out * self.frames.channels;
        let windows = (up + skip, full.buffer_windows.clone());
        let delta = conv_at(&self.dec_out, windows, KeptUnits::All, false, Some(full.grid.cell));
        let delta = with_zero_row(delta).select(0, full.back.clone());
        let delta = delta
            .reshape([b, full.grid.rows, full.grid.cols, out_c])
            .slice([0..b, 1..1 + h, 1..1 + w, 0..out_c])
            .permute([0, 3, 1, 2])
            .reshape([b, self.frames.t_out, self.frames.channels, h, w]);
        let last = x.narrow(1, t - 1, 1).reshape([b, 1, c, h, w]);
        last.expand([b, self.frames.t_out, self.frames.channels, h, w]) + delta
    }
}

fn cnn_of<B: Backend>(model: &DynamicModel<B>) -> &Cnn<B> {
    match &model.backbone {
        Backbone::Cnn(cnn) => cnn,
        _ => panic!("the gathered GPU path runs the CNN backbone"),
    }
}

impl<B: GatheredBackend> DynamicModel<B> {
    /// The CNN's prediction with its translator computed only on kept patches and units,
    /// through selects and batched matmuls; and the masks it used.
    ///
    /// # Shapes
    /// - x: `[batch, t_in, channels, height, width]`
    /// - output: `[batch, t_out, channels, height, width]`
    ///
    /// # Panics
    /// If the backbone is not the CNN, or if `masks` asks for a thresholded DataMask (its count
    /// varies per sample; this path gathers the same count from every sample).
    pub fn forward_gathered(&self, x: Tensor<B, 5>, masks: GatheredMasks<B>) -> (Tensor<B, 5>, IndexMasks<B>) {
        let cnn = cnn_of(self);
        let [b, _, _, h, w] = x.dims();
        let (c, h2, w2) = (cnn.spec.hidden, h.div_ceil(cnn.spec.stride), w.div_ceil(cnn.spec.stride));
        let grid = Grid::new(h2, w2, self.arch.model.patch / cnn.spec.stride);
        // The dense encoder first: queued after the patch ranking, the same forward ran much
        // slower on the GPU (docs/EXPERIMENTS.md).
        let dense = (cnn.spec.data_scope == DataScope::Translator).then(|| cnn.encode(x.clone(), None));
        let (importance, ranks, IndexMasks { patches, mut units }) = match masks {
            GatheredMasks::Given(m) => (None, None, m),
            GatheredMasks::Method(masking) => {
                assert!(masking.data_threshold.is_none(), "the gathered GPU path runs top-k DataMasks only");
                let s = self.mask_generator.forward(x.clone(), &masking).reshape([b, grid.patches]);
                let k = kept_count(masking.data_keep, grid.patches);
                let (patches, ranks) = B::rank_top_k(s.clone(), k);
                (Some((s, masking)), Some(ranks), IndexMasks { patches, units: Vec::new() })
            }
        };
        let kept = KeptRows::new(&patches, grid, ranks.as_ref());
        let (encoded, mut map) = match dense {
            Some((skip, z)) => {
                let pad = (1, grid.cols - 1 - w2, 1, grid.rows - 1 - h2);
                (
                    Encoded::Dense(skip),
                    z.pad(pad, PadMode::Constant(0.0)).permute([0, 2, 3, 1]).reshape([b * grid.pixels(), c]),
                )
            }
            None => {
                let full = KeptRows::new(&patches, Grid::new(h, w, self.arch.model.patch), ranks.as_ref());
                let (skip, z) = cnn.encode_kept(x.clone(), &full, grid, &patches);
                (Encoded::Kept(full, skip), z)
            }
        };
        // The unit gates' input: the S-weighted sum of the map over its pixels and S's mass. The
        // blocks change the map only at the kept pixels, so it is pooled in full once and then
        // kept up to date from each block's update there (a full pooling per block was a third
        // of the block's time).
        let mut gates = importance.map(|(s, masking)| {
            let sentinel = Tensor::zeros([b, 1], &s.device());
            let s = Tensor::cat(vec![s, sentinel], 1).select(1, kept.pixel_patch.clone()).reshape([b * grid.pixels()]);
            let s_kept = s.clone().select(0, kept.kept_pixels.clone()).reshape([b, kept.kept_pixels.dims()[0] / b, 1]);
            let s = s.reshape([b, grid.pixels(), 1]);
            let mass = s.clone().sum_dim(1).reshape([b, 1]);
            // Under the network scope the map holds the kept pixels only (it is zero elsewhere).
            let weighted = match encoded {
                Encoded::Dense(_) => weighted_sum(map.clone(), s),
                Encoded::Kept(..) => weighted_sum(map.clone(), s_kept.clone()),
            };
            (weighted, s_kept, mass, masking)
        });
        for (l, block) in cnn.blocks.iter().enumerate() {
            if let Some((weighted, _, mass, masking)) = &gates {
                let scores = self.unit_gates[l].forward_pooled(weighted.clone(), mass.clone(), h2 * w2, masking);
                let all = scores.dims()[1];
                units.push(B::rank_top_k(scores, kept_count(masking.unit_keep, all)).0);
            }
            let update = block.update_gathered(encoded.windows(&map, &kept), &kept, &units[l]);
            if let Some((weighted, s_kept, _, _)) = gates.as_mut().filter(|_| l + 1 < cnn.blocks.len()) {
                *weighted = weighted.clone() + weighted_sum(update.clone(), s_kept.clone());
            }
            map = encoded.add(map, update, &kept);
        }
        let prediction = match encoded {
            Encoded::Dense(skip) => {
                let z = map.reshape([b, grid.rows, grid.cols, c]).slice([0..b, 1..1 + h2, 1..1 + w2, 0..c]);
                cnn.decode(z.permute([0, 3, 1, 2]), skip, x, None)
            }
            Encoded::Kept(full, skip) => cnn.decode_kept(map, skip, x, &full),
        };
        (prediction, IndexMasks { patches, units })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::{FixedMasks, MaskMode};
    use crate::model::{Architecture, DynamicModel};
    use crate::CpuBackend;
    use burn::tensor::Distribution;
    use dyna_pruner_exec::SampleMasks;
    use dyna_pruner_spec::{BackboneSpec, CnnSpec, DataScope, Frames, GeneratorSpec};
    use rand::rngs::StdRng;
    use rand::seq::index::sample;
    use rand::{Rng, SeedableRng};

    type B = CpuBackend;

    fn arch(stride: usize, patch: usize, data_scope: DataScope) -> Architecture {
        let cnn = CnnSpec { hidden: 6, units: UNITS, blocks: BLOCKS, stride, data_scope };
        Architecture::new(Frames { t_in: 3, t_out: 2, channels: 2 }, patch, BackboneSpec::Cnn(cnn))
            .with_generator(GeneratorSpec { width: 4, ..GeneratorSpec::default() })
    }

    const UNITS: usize = 7;
    const BLOCKS: usize = 2;

    fn close(a: Tensor<B, 5>, b: Tensor<B, 5>, what: &str) {
        let (a, b): (Vec<f32>, Vec<f32>) = (a.into_data().to_vec().unwrap(), b.into_data().to_vec().unwrap());
        let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-3);
        let worst = a.iter().zip(&b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(worst <= 1e-4 * scale, "{what}: max |diff| {worst} > 1e-4 x {scale}");
    }

    #[test]
    fn gathered_forward_matches_the_masked_dense_reference() {
        let mut rng = StdRng::seed_from_u64(5);
        let device = Default::default();
        let shapes = [(2usize, 4usize, 13usize, 10usize), (2, 2, 9, 9), (1, 3, 8, 11), (2, 8, 17, 12)];
        let scopes = [DataScope::Translator, DataScope::Network];
        for (case, ((stride, patch, h, w), data_scope)) in
            shapes.into_iter().flat_map(|shape| scopes.map(|scope| (shape, scope))).enumerate()
        {
            let model = DynamicModel::<B>::new(&arch(stride, patch, data_scope), &device);
            let batch = 3;
            let x = Tensor::<B, 5>::random([batch, 3, 2, h, w], Distribution::Uniform(0.0, 1.0), &device);
            let n = h.div_ceil(patch) * w.div_ceil(patch);
            let (kp, ku) = (rng.random_range(1..=n), rng.random_range(1..=UNITS));
            let masks: Vec<SampleMasks> = (0..batch)
                .map(|_| SampleMasks {
                    patches: sample(&mut rng, n, kp).into_vec(),
                    units: (0..BLOCKS).map(|_| sample(&mut rng, UNITS, ku).into_vec()).collect(),
                })
                .collect();
            let (got, used) =
                model.forward_gathered(x.clone(), GatheredMasks::Given(IndexMasks::from_lists(&masks, &device)));
            assert_eq!(used.to_lists(), masks, "case {case}: the masks used are the ones given");
            let units = vec![UNITS; BLOCKS];
            let mut fixed = FixedMasks::new(&masks, (h.div_ceil(patch), w.div_ceil(patch)), &units, patch, &device);
            close(got, model.forward_masked(x.clone(), &mut fixed), &format!("case {case}: given masks"));
            // The method's own masks: the same as the trainer's forward at these keep ratios.
            let masking = Masking::top_k(MaskMode::Both, 0.4, 0.6);
            let (got, _) = model.forward_gathered(x.clone(), GatheredMasks::Method(masking));
            close(got, model.forward(x.clone(), masking).prediction, &format!("case {case}: method masks"));
            // Everything kept: the dense forward.
            let all = Masking::top_k(MaskMode::Both, 1.0, 1.0);
            close(
                model.forward_gathered(x.clone(), GatheredMasks::Method(all)).0,
                model.forward(x, Masking::DENSE).prediction,
                "all kept",
            );
        }
    }
}
