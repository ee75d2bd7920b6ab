//! Sparse execution of the dynamic CNN through framework ops, for GPUs (SBNet/DynConv pattern).
//!
//! The CPU executor (`dyna-pruner-exec`) runs per-sample work on plain kernels; on a GPU the
//! work must stay in a few large batched kernels. Top-k keeps the same *number* of patches and
//! units in every sample, so everything stays dense-batched:
//!
//! 1. the kept patches' tiles (each `cell x cell` feature pixels plus a 2-pixel halo for the two
//!    3x3 convs) are gathered from the zero-padded translator map: `[batch, kept, C, S, S]`;
//! 2. conv1 is an unfold (im2col) and one batched matmul with each sample's kept units' rows of
//!    the weight (gathered per sample), then GELU, then the DataMask at the hidden positions
//!    (zero where the reference's hidden map is zero: pruned patches and outside the frame);
//! 3. conv2 likewise, with the kept units' columns; the `cell x cell` cores are added back into
//!    the map with one scatter. Pruned patches keep the identity path.
//!
//! Every convolution here, dense ones included, is an im2col built from `k x k` shifted slices
//! plus one (batched) matmul: Burn 0.21's CUDA `conv2d` was 14x slower than PyTorch on this CNN
//! and its `unfold4d` slower still, while slices, concatenation and matmul are fast. The dense
//! forward through the same ops ([`DynamicModel::forward_dense_im2col`]) is the dense GPU
//! baseline it is compared with. The same code runs on every backend; its reference is the framework's masked-dense
//! forward (tests here, on the CPU backend; `dyna-pruner bench --device cuda` times it on the GPU).

use burn::prelude::*;
use burn::tensor::activation::gelu;
use burn::tensor::ops::PadMode;
use burn::tensor::IndexingUpdateOp;

use crate::backbones::cnn::Cnn;
use crate::backbones::Backbone;
use crate::method::masks::kept_count;
use crate::method::{patches_to_pixels, Masking};
use crate::model::DynamicModel;
use burn::nn::conv::{Conv2d, ConvTranspose2d};

/// Pixels of halo around a patch's cell: one per stacked 3x3 conv.
const HALO: usize = 2;

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
}

/// Where the masks come from.
pub enum GatheredMasks<B: Backend> {
    /// The model's mask generator and gates at these keep ratios (both masks on).
    Method(Masking),
    /// Given index masks.
    Given(IndexMasks<B>),
}

/// Flat indices into a `[rows, cols]` map of the `side x side` windows whose top-left corners
/// sit at the kept patches' cell origins shifted by `shift`.
///
/// # Shapes
/// - patches: `[batch, kept]`
/// - output: `[batch, kept * side * side]`
fn window_indices<B: Backend>(
    patches: &Tensor<B, 2, Int>,
    wp: usize,
    cell: usize,
    cols: usize,
    shift: usize,
    side: usize,
) -> Tensor<B, 2, Int> {
    let [b, k] = patches.dims();
    let device = patches.device();
    let py = patches.clone().div_scalar(wp as i64);
    let px = patches.clone().remainder_scalar(wp as i64);
    let base = py.mul_scalar((cell * cols) as i64) + px.mul_scalar(cell as i64);
    let offsets: Vec<i64> =
        (0..side).flat_map(|dy| (0..side).map(move |dx| ((dy + shift) * cols + dx + shift) as i64)).collect();
    let offsets = Tensor::<B, 1, Int>::from_ints(offsets.as_slice(), &device).reshape([1, 1, side * side]);
    (base.reshape([b, k, 1]) + offsets).reshape([b, k * side * side])
}

/// Gathers rows `index[b]` of a per-sample copy of `table` `[rows, cols]`: `[batch, k, cols]`.
fn rows_per_sample<B: Backend>(table: Tensor<B, 2>, index: &Tensor<B, 2, Int>) -> Tensor<B, 3> {
    let [rows, cols] = table.dims();
    let [b, k] = index.dims();
    table
        .reshape([1, rows, cols])
        .expand([b, rows, cols])
        .gather(1, index.clone().reshape([b, k, 1]).expand([b, k, cols]))
}

/// im2col of a `k x k` convolution with padding `pad` and `stride`, from `k^2` shifted slices:
/// columns `[batch, c * k * k, ho * wo]` in (c, ky, kx) order (the weight's), and `(ho, wo)`.
fn im2col<B: Backend>(x: Tensor<B, 4>, k: usize, pad: usize, stride: usize) -> (Tensor<B, 3>, usize, usize) {
    let [b, c, h, w] = x.dims();
    let (ho, wo) = ((h + 2 * pad - k) / stride + 1, (w + 2 * pad - k) / stride + 1);
    // Room for `stride * ho` rows after the last shift (reshaped away below).
    let (hn, wn) = (k - 1 + stride * ho, k - 1 + stride * wo);
    let xp = x.pad((pad, wn.max(w + 2 * pad) - w - pad, pad, hn.max(h + 2 * pad) - h - pad), PadMode::Constant(0.0));
    let mut shifts = Vec::with_capacity(k * k);
    for ky in 0..k {
        for kx in 0..k {
            let v = xp.clone().slice([0..b, 0..c, ky..ky + stride * ho, kx..kx + stride * wo]);
            let v = if stride == 1 {
                v
            } else {
                v.reshape([b, c, ho, stride, wo, stride]).narrow(3, 0, 1).narrow(5, 0, 1).reshape([b, c, ho, wo])
            };
            shifts.push(v);
        }
    }
    (Tensor::stack::<5>(shifts, 2).reshape([b, c * k * k, ho * wo]), ho, wo)
}

/// im2col of 3x3 windows of `[n, c, s, s]` tiles as rows: `[n * (s-2)^2, c * 9]`, grouped per sample.
fn unfold_rows<B: Backend>(tiles: Tensor<B, 4>, batch: usize) -> Tensor<B, 3> {
    let [n, c, s, _] = tiles.dims();
    let l = (s - 2) * (s - 2);
    let (cols, _, _) = im2col(tiles, 3, 0, 1);
    cols.reshape([batch, n / batch, c * 9, l]).swap_dims(2, 3).reshape([batch, n / batch * l, c * 9])
}

/// A `k x k` convolution (padding `k / 2`) as [`im2col`] + one matmul.
///
/// # Shapes
/// - x: `[batch, in, h, w]`
/// - output: `[batch, out, ceil(h / stride), ceil(w / stride)]` (for k = 3)
fn conv<B: Backend>(layer: &Conv2d<B>, x: Tensor<B, 4>, stride: usize) -> Tensor<B, 4> {
    let b = x.dims()[0];
    let [out, inp, k, _] = layer.weight.dims();
    let (cols, ho, wo) = im2col(x, k, k / 2, stride);
    let weight = layer.weight.val().reshape([1, out, inp * k * k]);
    let y = weight.matmul(cols) + layer.bias.as_ref().expect("convs have a bias").val().reshape([1, out, 1]);
    y.reshape([b, out, ho, wo])
}

/// A transposed convolution with kernel = stride (no overlap) as one matmul and a pixel shuffle.
///
/// # Shapes
/// - x: `[batch, in, h, w]`
/// - output: `[batch, out, h * s, w * s]`
fn conv_transpose<B: Backend>(layer: &ConvTranspose2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, inp, h, w] = x.dims();
    let [_, out, s, _] = layer.weight.dims();
    let weight = layer.weight.val().reshape([inp, out * s * s]).swap_dims(0, 1).reshape([1, out * s * s, inp]);
    let y = weight.matmul(x.reshape([b, inp, h * w])).reshape([b, out, s, s, h, w]);
    let y = y.permute([0, 1, 4, 2, 5, 3]).reshape([b, out, h * s, w * s]);
    y + layer.bias.as_ref().expect("bias").val().reshape([1, out, 1, 1])
}

fn cnn_of<B: Backend>(model: &DynamicModel<B>) -> &Cnn<B> {
    match &model.backbone {
        Backbone::Cnn(cnn) => cnn,
        _ => panic!("the gathered GPU path runs the CNN backbone"),
    }
}

impl<B: Backend> DynamicModel<B> {
    /// The dense CNN with every convolution as unfold + matmul: the dense baseline of
    /// [`Self::forward_gathered`] (same ops, all positions and units).
    ///
    /// # Shapes
    /// - x: `[batch, t_in, channels, height, width]`
    /// - output: `[batch, t_out, channels, height, width]`
    ///
    /// # Panics
    /// If the backbone is not the CNN.
    pub fn forward_dense_im2col(&self, x: Tensor<B, 5>) -> Tensor<B, 5> {
        let cnn = cnn_of(self);
        let (skip, mut z) = cnn.encode(x.clone(), &conv);
        for block in &cnn.blocks {
            let update = conv(&block.conv2, gelu(conv(&block.conv1, z.clone(), 1)), 1);
            z = z + update;
        }
        cnn.decode(z, skip, x, (&conv, &conv_transpose))
    }

    /// The CNN's prediction with its translator computed only on kept patches and units,
    /// through gathers, batched matmuls and one scatter per block.
    ///
    /// # Shapes
    /// - x: `[batch, t_in, channels, height, width]`
    /// - output: `[batch, t_out, channels, height, width]`
    ///
    /// # Panics
    /// If the backbone is not the CNN.
    pub fn forward_gathered(&self, x: Tensor<B, 5>, masks: GatheredMasks<B>) -> Tensor<B, 5> {
        let cnn = cnn_of(self);
        let [b, _, _, h, w] = x.dims();
        let device = x.device();
        let (skip, z) = cnn.encode(x.clone(), &conv);
        let [_, c, h2, w2] = z.dims();
        let cell = self.patch / cnn.stride;
        let (hp, wp) = (h.div_ceil(self.patch), w.div_ceil(self.patch));
        let (importance, masks) = match masks {
            GatheredMasks::Given(m) => (None, Some(m)),
            GatheredMasks::Method(masking) => {
                let s = self.mask_generator.forward(x.clone());
                let k = kept_count(masking.data_keep, hp * wp);
                let (_, patches) = s.clone().reshape([b, hp * wp]).topk_with_indices(k, 1);
                (Some((s, masking)), Some(IndexMasks { patches, units: Vec::new() }))
            }
        };
        let IndexMasks { patches, mut units } = masks.expect("masks are set");
        // The translator map, zero-padded by the halo and up to whole patches.
        let (rows, cols) = (hp * cell + 2 * HALO, wp * cell + 2 * HALO);
        let pad = |m: Tensor<B, 4>| m.pad((HALO, cols - HALO - w2, HALO, rows - HALO - h2), PadMode::Constant(0.0));
        let kept = patches.dims()[1];
        // The DataMask at feature pixels inside the frame, padded alike: `[batch, rows * cols]`.
        let patch_mask = Tensor::<B, 2>::zeros([b, hp * wp], &device).scatter(
            1,
            patches.clone(),
            Tensor::ones([b, kept], &device),
            IndexingUpdateOp::Add,
        );
        let pixel_mask =
            pad(patches_to_pixels(patch_mask.reshape([b, hp, wp]), cell, h2, w2)).reshape([b, rows * cols]);
        let side = cell + 2 * HALO;
        let tile_index = window_indices(&patches, wp, cell, cols, 0, side);
        let hidden_index = window_indices(&patches, wp, cell, cols, 1, cell + 2);
        let core_index = window_indices(&patches, wp, cell, cols, HALO, cell);
        let hidden_mask = pixel_mask.clone().gather(1, hidden_index).reshape([b, kept * (cell + 2) * (cell + 2), 1]);
        let core_mask = pixel_mask.gather(1, core_index.clone()).reshape([b, 1, kept * cell * cell]);
        let spread = |index: &Tensor<B, 2, Int>| {
            let [_, n] = index.dims();
            index.clone().reshape([b, 1, n]).expand([b, c, n])
        };
        let (tile_index, core_index) = (spread(&tile_index), spread(&core_index));

        let mut zp = pad(z).reshape([b, c, rows * cols]);
        for (l, block) in cnn.blocks.iter().enumerate() {
            if let Some((s, masking)) = &importance {
                let map = zp.clone().reshape([b, c, rows, cols]).slice([0..b, 0..c, HALO..HALO + h2, HALO..HALO + w2]);
                let scores = self.unit_gates[l].forward(map, patches_to_pixels(s.clone(), cell, h2, w2));
                let all = scores.dims()[1];
                units.push(scores.topk_with_indices(kept_count(masking.unit_keep, all), 1).1);
            }
            let u = &units[l];
            let ku = u.dims()[1];
            let tiles = zp.clone().gather(2, tile_index.clone()).reshape([b, c, kept, side, side]).swap_dims(1, 2);
            let cols1 = unfold_rows(tiles.reshape([b * kept, c, side, side]), b);
            let [units_all, _, _, _] = block.conv1.weight.dims();
            let w1 = rows_per_sample(block.conv1.weight.val().reshape([units_all, c * 9]), u).swap_dims(1, 2);
            let b1 = rows_per_sample(block.conv1.bias.as_ref().expect("bias").val().reshape([units_all, 1]), u);
            let hidden = gelu(cols1.matmul(w1) + b1.swap_dims(1, 2)) * hidden_mask.clone();
            let hs = cell + 2;
            let hidden_tiles = hidden.reshape([b * kept, hs, hs, ku]).permute([0, 3, 1, 2]);
            let cols2 = unfold_rows(hidden_tiles, b);
            // conv2's weight `[C, U, 3, 3]` as `[U, C * 9]` rows per unit, in (c, ky, kx) order per unit.
            let w2 = block.conv2.weight.val().reshape([c, units_all, 9]).swap_dims(0, 1).reshape([units_all, c * 9]);
            let w2 = rows_per_sample(w2, u).reshape([b, ku, c, 9]).swap_dims(1, 2).reshape([b, c, ku * 9]);
            let update = w2.matmul(cols2.swap_dims(1, 2));
            let bias2 = block.conv2.bias.as_ref().expect("bias").val().reshape([1, c, 1]);
            let update = (update + bias2) * core_mask.clone();
            zp = zp.scatter(2, core_index.clone(), update, IndexingUpdateOp::Add);
        }
        let z = zp.reshape([b, c, rows, cols]).slice([0..b, 0..cnn.hidden, HALO..HALO + h2, HALO..HALO + w2]);
        cnn.decode(z, skip, x, (&conv, &conv_transpose))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbones::BackboneKind;
    use crate::method::{FixedMasks, MaskMode};
    use crate::model::Architecture;
    use crate::CpuBackend;
    use burn::tensor::Distribution;
    use dyna_pruner_exec::SampleMasks;
    use rand::rngs::StdRng;
    use rand::seq::index::sample;
    use rand::{Rng, SeedableRng};

    type B = CpuBackend;

    fn arch(stride: usize, patch: usize) -> Architecture {
        Architecture {
            backbone: BackboneKind::Cnn,
            t_in: 3,
            t_out: 2,
            channels: 2,
            hidden: 6,
            units: 7,
            blocks: 2,
            heads: 1,
            stride,
            patch,
            generator_width: 4,
            generator_motion: false,
        }
    }

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
        for (case, (stride, patch, h, w)) in
            [(2usize, 4usize, 13usize, 10usize), (2, 2, 9, 9), (1, 3, 8, 11), (2, 8, 17, 12)].into_iter().enumerate()
        {
            let a = arch(stride, patch);
            let model = a.init::<B>(&device);
            let batch = 3;
            let x = Tensor::<B, 5>::random([batch, 3, 2, h, w], Distribution::Uniform(0.0, 1.0), &device);
            let n = h.div_ceil(patch) * w.div_ceil(patch);
            let (kp, ku) = (rng.random_range(1..=n), rng.random_range(1..=a.units));
            let masks: Vec<SampleMasks> = (0..batch)
                .map(|_| SampleMasks {
                    patches: sample(&mut rng, n, kp).into_vec(),
                    units: (0..a.blocks).map(|_| sample(&mut rng, a.units, ku).into_vec()).collect(),
                })
                .collect();
            let got = model.forward_gathered(x.clone(), GatheredMasks::Given(IndexMasks::from_lists(&masks, &device)));
            let units = vec![a.units; a.blocks];
            let mut sorted = masks.clone();
            sorted.iter_mut().for_each(|m| m.patches.sort_unstable());
            let mut fixed = FixedMasks::new(&sorted, (h.div_ceil(patch), w.div_ceil(patch)), &units, patch, &device);
            close(got, model.forward_masked(x.clone(), &mut fixed), &format!("case {case}: given masks"));
            // The method's own masks: the same as the trainer's forward at these keep ratios.
            let masking = Masking { mode: MaskMode::Both, data_keep: 0.4, unit_keep: 0.6 };
            let got = model.forward_gathered(x.clone(), GatheredMasks::Method(masking));
            close(got, model.forward(x.clone(), masking).prediction, &format!("case {case}: method masks"));
            // Everything kept: the dense forward.
            let all = Masking { mode: MaskMode::Both, data_keep: 1.0, unit_keep: 1.0 };
            close(
                model.forward_gathered(x.clone(), GatheredMasks::Method(all)),
                model.forward(x, Masking::DENSE).prediction,
                "all kept",
            );
        }
    }
}
