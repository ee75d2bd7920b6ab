//! The convolution kernel: output rows as sums over *windows* read in place, with register-blocked
//! AVX-512 or AVX2 + FMA code where the CPU has it and a plain loop otherwise.
//!
//! A 3x3 convolution's input window at one output position is three runs of `3 * cin`
//! contiguous floats in a channels-last map (one per kernel row, one input row apart), so no
//! im2col copy is needed: the kernel takes, per position, a `Window` (a slice and the stride
//! between its runs) and multiplies run r by kernel row r's weights. Output channels are split
//! into chunks of at most 32 (four 8-lane vectors), each with its weights packed and
//! zero-padded to whole vectors, so a layer keeping 20 of 64 units runs at 20/24 of the lanes
//! instead of falling off a GEMM library's tuned shapes. Several positions share each weight
//! load (the register block); the window values are broadcast. The output rows go where `Rows`
//! says: a compact block, or scattered rows of a map (overwritten or added to), optionally
//! through GELU.

use crate::activation::gelu_in_place;

/// Lanes of one vector (AVX2, f32).
const LANES: usize = 8;
/// Output channels per chunk: four vectors.
const CHUNK: usize = 4 * LANES;
/// Largest packed chunk weight read whole per block of positions: room in a 48 KiB L1 data
/// cache for the windows and outputs too.
const L1_WEIGHT_BYTES: usize = 32 * 1024;

/// Layers with at most this many output channels run as dot products along the window
/// (`dot_chunk`): spread over a vector's lanes, so few outputs would leave most lanes idle.
const DOT_COLS: usize = 4;

/// Output channels `col0..col0 + cols` of a layer: weights `[rows, vectors * LANES]`, zero past
/// `cols`, and the bias the same way; for a layer of at most `DOT_COLS` outputs, the weights
/// as columns `[cols, rows]` too.
#[derive(Debug, Clone)]
pub(crate) struct Chunk {
    col0: usize,
    cols: usize,
    vectors: usize,
    weight: Vec<f32>,
    bias: Vec<f32>,
    columns: Option<Vec<f32>>,
}

/// Splits a row-major `[rows, cout]` weight and its bias into packed chunks.
pub(crate) fn pack(weight: &[f32], bias: &[f32], rows: usize, cout: usize) -> Vec<Chunk> {
    debug_assert!(weight.len() == rows * cout && bias.len() == cout);
    (0..cout)
        .step_by(CHUNK)
        .map(|col0| {
            let cols = (cout - col0).min(CHUNK);
            let vectors = cols.div_ceil(LANES);
            let width = vectors * LANES;
            let mut w = vec![0.0; rows * width];
            for (r, dst) in w.chunks_exact_mut(width).enumerate() {
                dst[..cols].copy_from_slice(&weight[r * cout + col0..r * cout + col0 + cols]);
            }
            let mut b = vec![0.0; width];
            b[..cols].copy_from_slice(&bias[col0..col0 + cols]);
            let columns = (cout <= DOT_COLS)
                .then(|| (0..cols).flat_map(|co| (0..rows).map(move |r| weight[r * cout + co])).collect());
            Chunk { col0, cols, vectors, weight: w, bias: b, columns }
        })
        .collect()
}

/// One output position's input window: `parts` runs of `len` floats (one per kernel row),
/// `stride` floats apart in `data`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window<'a> {
    pub data: &'a [f32],
    pub stride: usize,
}

/// Where the kernel's output rows (`cout` floats each) go: position i's row is row `i` of
/// `data`, or with `at = Some((rows, base))` row `rows[i] - base` (`rows` strictly ascending, so
/// no two positions share a row); it overwrites the row, or with `add` adds to it. With `gelu`
/// (not with `add`) the finished rows go through GELU on the way out.
pub(crate) struct Rows<'a> {
    pub data: &'a mut [f32],
    pub at: Option<(&'a [u32], usize)>,
    pub add: bool,
    pub gelu: bool,
}

impl Rows<'_> {
    /// Offset in `data` of position i's row.
    fn start(&self, i: usize, cout: usize) -> usize {
        self.at.map_or(i, |(rows, base)| rows[i] as usize - base) * cout
    }
}

/// `row[p] (+)= bias + sum_r (part r of windows[p]) . weight rows r * len .. (r + 1) * len` for
/// every position p, the rows placed as `rows` says.
pub(crate) fn windows_times_weights(
    chunks: &[Chunk],
    windows: &[Window<'_>],
    parts: usize,
    len: usize,
    mut rows: Rows<'_>,
) {
    let cout: usize = chunks.iter().map(|c| c.cols).sum();
    let n = windows.len();
    let rows_fit = match rows.at {
        None => rows.data.len() == n * cout,
        Some((at, base)) => {
            at.len() == n
                && at.first().is_none_or(|&first| first as usize >= base)
                && at.windows(2).all(|p| p[0] < p[1])
                && at.last().is_none_or(|&last| (last as usize - base + 1) * cout <= rows.data.len())
        }
    };
    assert!(
        parts > 0 && rows_fit && windows.iter().all(|w| w.data.len() >= (parts - 1) * w.stride + len),
        "conv kernel operands do not match"
    );
    assert!(!(rows.add && rows.gelu), "GELU applies to a layer's output, not to a sum with it");
    for chunk in chunks {
        assert_eq!(chunk.weight.len(), parts * len * chunk.vectors * LANES, "packed weight does not match");
        if let Some(columns) = &chunk.columns {
            dot_chunk(chunk, columns, (windows, parts, len), cout, &mut rows);
            continue;
        }
        #[cfg(target_arch = "x86_64")]
        if vector_chunk(chunk, (windows, parts, len), cout, &mut rows) {
            continue;
        }
        plain_chunk(chunk, windows, parts, len, cout, &mut rows);
    }
}

/// The plain reference of the vector kernel (same sums, without fused multiply-adds).
fn plain_chunk(chunk: &Chunk, windows: &[Window<'_>], parts: usize, len: usize, cout: usize, rows: &mut Rows<'_>) {
    let width = chunk.vectors * LANES;
    for (i, window) in windows.iter().enumerate() {
        let start = rows.start(i, cout) + chunk.col0;
        let acc = &mut rows.data[start..start + chunk.cols];
        if rows.add {
            acc.iter_mut().zip(&chunk.bias).for_each(|(a, b)| *a += b);
        } else {
            acc.copy_from_slice(&chunk.bias[..chunk.cols]);
        }
        for r in 0..parts {
            for (j, &x) in window.data[r * window.stride..][..len].iter().enumerate() {
                let w = &chunk.weight[(r * len + j) * width..][..chunk.cols];
                acc.iter_mut().zip(w).for_each(|(a, &w)| *a += x * w);
            }
        }
        if rows.gelu {
            acc.iter_mut().for_each(gelu_in_place);
        }
    }
}

/// Positions per block of the dot-product kernel: each weight load serves them all.
const DOT_POSITIONS: usize = 4;

/// The kernel for layers of few outputs: each output the dot product of the window's runs
/// with its column of weights (`columns`, `[cols, parts * len]`), the window's floats spread
/// over vector lanes. Blocks of `DOT_POSITIONS` positions, then the rest one by one; with AVX2
/// and fused multiply-adds where the CPU has them.
fn dot_chunk(
    chunk: &Chunk,
    columns: &[f32],
    (windows, parts, len): (&[Window<'_>], usize, usize),
    cout: usize,
    rows: &mut Rows<'_>,
) {
    #[cfg(target_arch = "x86_64")]
    let vector = std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    let vector = false;
    let mut p = 0;
    while p < windows.len() {
        let n = if p + DOT_POSITIONS <= windows.len() { DOT_POSITIONS } else { 1 };
        for co in 0..chunk.cols {
            let column = &columns[co * parts * len..(co + 1) * parts * len];
            let sums: [f32; DOT_POSITIONS] = match (n, vector) {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX2 and FMA were detected above.
                #[allow(unsafe_code)]
                (DOT_POSITIONS, true) => unsafe { dot_block_avx2(&windows[p..p + n], column, len) },
                #[cfg(target_arch = "x86_64")]
                #[allow(unsafe_code)]
                (_, true) => [unsafe { dot_block_avx2::<1>(&windows[p..p + 1], column, len) }[0]; DOT_POSITIONS],
                (DOT_POSITIONS, _) => dot_block_plain(&windows[p..p + n], column, len),
                _ => [dot_block_plain::<1>(&windows[p..p + 1], column, len)[0]; DOT_POSITIONS],
            };
            for (i, &sum) in sums.iter().take(n).enumerate() {
                let at = rows.start(p + i, cout) + chunk.col0 + co;
                let value = sum + chunk.bias[co];
                let out = &mut rows.data[at];
                *out = if rows.add { *out + value } else { value };
                if rows.gelu {
                    gelu_in_place(out);
                }
            }
        }
        p += n;
    }
}

/// The dot products of `P` windows (`column.len() / len` runs each) with `column`: the plain
/// reference of `dot_block_avx2`.
fn dot_block_plain<const P: usize>(windows: &[Window<'_>], column: &[f32], len: usize) -> [f32; P] {
    std::array::from_fn(|i| {
        let window = &windows[i];
        column
            .chunks_exact(len)
            .enumerate()
            .map(|(r, weights)| {
                window.data[r * window.stride..][..len].iter().zip(weights).map(|(x, w)| x * w).sum::<f32>()
            })
            .sum()
    })
}

/// [`dot_block_plain`] in 8-lane vectors, two accumulators per window (independent chains of
/// fused multiply-adds), the floats past whole vectors one by one.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(unsafe_code)]
fn dot_block_avx2<const P: usize>(windows: &[Window<'_>], column: &[f32], len: usize) -> [f32; P] {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; P];
    let mut tail = [0.0f32; P];
    for (r, weights) in column.chunks_exact(len).enumerate() {
        let mut runs = [weights; P];
        for (run, window) in runs.iter_mut().zip(windows) {
            *run = &window.data[r * window.stride..][..len];
        }
        let mut j = 0;
        // SAFETY: every load reads 8 floats at j or j + 8 with j + 16 <= len (then j + 8 <=
        // len), inside `weights` and every run, which hold `len` floats.
        unsafe {
            while j + 16 <= len {
                let (w0, w1) = (_mm256_loadu_ps(weights.as_ptr().add(j)), _mm256_loadu_ps(weights.as_ptr().add(j + 8)));
                for (acc, run) in acc.iter_mut().zip(&runs) {
                    acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(run.as_ptr().add(j)), w0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(_mm256_loadu_ps(run.as_ptr().add(j + 8)), w1, acc[1]);
                }
                j += 16;
            }
            if j + 8 <= len {
                let w0 = _mm256_loadu_ps(weights.as_ptr().add(j));
                for (acc, run) in acc.iter_mut().zip(&runs) {
                    acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(run.as_ptr().add(j)), w0, acc[0]);
                }
                j += 8;
            }
        }
        for (tail, run) in tail.iter_mut().zip(&runs) {
            for (x, w) in run[j..].iter().zip(&weights[j..]) {
                *tail = x.mul_add(*w, *tail);
            }
        }
    }
    let mut sums = [0.0f32; P];
    for ((sum, acc), tail) in sums.iter_mut().zip(&acc).zip(tail) {
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds the 8 floats stored.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(acc[0], acc[1])) };
        *sum = lanes.iter().sum::<f32>() + tail;
    }
    sums
}

/// What a block's accumulators start from.
#[derive(Clone, Copy)]
enum Start {
    Bias,
    Row,
    RowPlusBias,
}

/// One register block: `P` positions (the first `n` real, the others repeating the last), their
/// window pointers at part `r0` and strides, `step` parts of `len` floats each, their output
/// offsets, what the sums start from and whether GELU follows.
#[derive(Clone, Copy)]
struct Block<const P: usize> {
    x: [*const f32; P],
    strides: [usize; P],
    step: usize,
    len: usize,
    at: [usize; P],
    n: usize,
    start: Start,
    gelu: bool,
}

impl<const P: usize> Block<P> {
    /// The block's first position alone (for the positions left after the full blocks).
    fn first(&self) -> Block<1> {
        Block {
            x: [self.x[0]],
            strides: [self.strides[0]],
            step: self.step,
            len: self.len,
            at: [self.at[0]],
            n: 1,
            start: self.start,
            gelu: self.gelu,
        }
    }
}

/// Walks a chunk's positions in blocks of `P` (the rest one at a time), all parts of a window in
/// one pass when the chunk's packed weight (`width` floats per row) fits the L1 cache with room
/// to spare, else part by part (one kernel row of weights at a time, so that that slice stays in
/// L1 for all positions, with the sums going through the output rows between parts); `run` gets
/// each block with its slice of the weight and the output's base pointer.
fn drive<const P: usize>(
    chunk: &Chunk,
    (windows, parts, len): (&[Window<'_>], usize, usize),
    cout: usize,
    out: &mut Rows<'_>,
    width: usize,
    mut run: impl FnMut(&[f32], Block<P>, *mut f32),
) {
    let positions = windows.len();
    let together = parts * len * width * std::mem::size_of::<f32>() <= L1_WEIGHT_BYTES;
    let (step, passes) = if together { (parts, 1) } else { (1, parts) };
    for pass in 0..passes {
        let r0 = pass * step;
        let weight = &chunk.weight[r0 * len * width..(r0 + step) * len * width];
        // The first pass starts from the bias (plus the row with `add`), later ones from the row.
        let start = match (r0 > 0, out.add) {
            (false, false) => Start::Bias,
            (false, true) => Start::RowPlusBias,
            (true, _) => Start::Row,
        };
        let gelu = out.gelu && pass + 1 == passes;
        let mut p = 0;
        while p < positions {
            let n = if p + P <= positions { P } else { 1 };
            // Parts r0.. of each window: checked in bounds by `windows_times_weights`.
            let w: [Window<'_>; P] = std::array::from_fn(|i| windows[p + i.min(n - 1)]);
            let x: [*const f32; P] = std::array::from_fn(|i| w[i].data[r0 * w[i].stride..].as_ptr());
            let strides: [usize; P] = std::array::from_fn(|i| w[i].stride);
            // Rows checked distinct and inside `out.data` by `windows_times_weights`.
            let at: [usize; P] = std::array::from_fn(|i| out.start(p + i.min(n - 1), cout) + chunk.col0);
            run(weight, Block { x, strides, step, len, at, n, start, gelu }, out.data.as_mut_ptr());
            p += n;
        }
    }
}

/// The register-blocked kernel for one vector width: `$vec` holds `$lanes` f32 under
/// `$feature`; `$mask`/`$load_masked`/`$store_masked` restrict the last vector of a row to the
/// chunk's lanes. Written once as a macro so the AVX2 and AVX-512 kernels cannot drift apart.
macro_rules! vector_kernel {
    ($name:ident, $feature:literal, $lanes:expr, $vec:ty, $mask_ty:ty,
     mask = |$tail:ident| $mask:expr,
     zero = $zero:path, set1 = $set1:path, load = $load:path, store = $store:path,
     fmadd = $fmadd:path, add = $add:path, mul = $mul:path, div = $div:path, min = $min:path, max = $max:path,
     load_masked = |$lp:ident, $lm:ident| $load_masked:expr,
     store_masked = |$sp:ident, $sm:ident, $sv:ident| $store_masked:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)]
        mod $name {
            #[allow(unused_imports)]
            use std::arch::x86_64::*;

            use super::{drive, Block, Chunk, Rows, Start, Window};
            use crate::activation::{ERF_P, ERF_Q};

            /// f32 lanes of one vector.
            const LANES: usize = $lanes;

            /// One chunk over all positions, `V` vectors of `LANES` per row, blocks of `P`.
            pub(super) fn chunk<const P: usize, const V: usize>(
                chunk: &Chunk,
                input: (&[Window<'_>], usize, usize),
                cout: usize,
                out: &mut Rows<'_>,
            ) {
                let tail = chunk.cols - (V - 1) * LANES;
                drive::<P>(chunk, input, cout, out, V * LANES, |weight, b, dst| {
                    // SAFETY: the caller detected this kernel's CPU features; `drive` hands
                    // over pointers to `step` runs of `len` readable floats per window and
                    // offsets of distinct rows inside the output (see `block`).
                    unsafe {
                        if b.n == P {
                            block::<P, V>(weight, &chunk.bias, b, dst, tail)
                        } else {
                            block::<1, V>(weight, &chunk.bias, b.first(), dst, tail)
                        }
                    }
                });
            }

            /// `activation::gelu_in_place` on one vector, with the same operations in the same
            /// order as its fused-multiply-add form (`activation::gelu_slice`'s AVX2 path).
            #[target_feature(enable = $feature)]
            fn gelu_vector(v: $vec) -> $vec {
                let x = $mul(v, $set1(std::f32::consts::FRAC_1_SQRT_2));
                let x = $min($max(x, $set1(-4.0)), $set1(4.0));
                let x2 = $mul(x, x);
                let mut p = $fmadd(x2, $set1(ERF_P[0]), $set1(ERF_P[1]));
                for k in &ERF_P[2..] {
                    p = $fmadd(x2, p, $set1(*k));
                }
                let mut q = $fmadd(x2, $set1(ERF_Q[0]), $set1(ERF_Q[1]));
                for k in &ERF_Q[2..] {
                    q = $fmadd(x2, q, $set1(*k));
                }
                let erf = $div($mul(x, p), q);
                $mul($mul($set1(0.5), v), $add($set1(1.0), erf))
            }

            /// `out[at[p]..] = start + sum_r x[p][r * strides[p]..][..len] . weight rows r * len..`
            /// for `P` positions, `step` runs each, and `V` vectors of outputs, accumulated in
            /// registers (then through GELU with `gelu`); the last vector's lanes past `tail`
            /// are neither read nor written (they belong to the next chunk or row).
            ///
            /// # Safety
            /// The CPU must have this kernel's features. Every `x[p]` must start `step` runs of
            /// `len` readable floats, `strides[p]` apart, and every `out + at[p]` the chunk's
            /// `(V - 1) * LANES + tail` floats of a distinct row that nothing else accesses
            /// meanwhile.
            #[target_feature(enable = $feature)]
            #[inline(never)]
            unsafe fn block<const P: usize, const V: usize>(
                weight: &[f32],
                bias: &[f32],
                b: Block<P>,
                out: *mut f32,
                $tail: usize,
            ) {
                let width = V * LANES;
                let (parts, len) = (b.step, b.len);
                assert!(weight.len() >= parts * len * width && bias.len() >= width);
                let mask: $mask_ty = $mask;
                // SAFETY: the assertion above bounds every weight and bias offset read below
                // (rows `r * len + j` of `width` floats), the caller every window and output
                // access; the last output vector of each row is masked to the chunk's lanes.
                unsafe {
                    // Plain loops, not closures around the intrinsics: a closure does not
                    // inherit the target features, so its intrinsics may become calls.
                    let mut acc = [[$zero(); V]; P];
                    for (p, acc) in acc.iter_mut().enumerate() {
                        for (v, a) in acc.iter_mut().enumerate() {
                            let $lp = out.add(b.at[p] + v * LANES);
                            if !matches!(b.start, Start::Bias) {
                                let $lm = mask;
                                *a = if v + 1 == V { $load_masked } else { $load($lp) };
                            }
                            if !matches!(b.start, Start::Row) {
                                *a = $add(*a, $load(bias.as_ptr().add(v * LANES)));
                            }
                        }
                    }
                    for r in 0..parts {
                        let xp: [*const f32; P] = std::array::from_fn(|p| b.x[p].add(r * b.strides[p]));
                        let w = weight.as_ptr().add(r * len * width);
                        for j in 0..len {
                            let wj = w.add(j * width);
                            let mut wv = [$zero(); V];
                            for (v, wv) in wv.iter_mut().enumerate() {
                                *wv = $load(wj.add(v * LANES));
                            }
                            for p in 0..P {
                                let xv = $set1(*xp[p].add(j));
                                for v in 0..V {
                                    acc[p][v] = $fmadd(xv, wv[v], acc[p][v]);
                                }
                            }
                        }
                    }
                    for (p, a) in acc.iter().enumerate() {
                        for (v, a) in a.iter().enumerate() {
                            let $sv = if b.gelu { gelu_vector(*a) } else { *a };
                            let $sp = out.add(b.at[p] + v * LANES);
                            if v + 1 == V {
                                let $sm = mask;
                                $store_masked;
                            } else {
                                $store($sp, $sv);
                            }
                        }
                    }
                }
            }
        }
    };
}

vector_kernel!(
    avx2,
    "avx2,fma",
    8,
    __m256,
    __m256i,
    mask = |tail| _mm256_cmpgt_epi32(_mm256_set1_epi32(tail as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
    zero = _mm256_setzero_ps,
    set1 = _mm256_set1_ps,
    load = _mm256_loadu_ps,
    store = _mm256_storeu_ps,
    fmadd = _mm256_fmadd_ps,
    add = _mm256_add_ps,
    mul = _mm256_mul_ps,
    div = _mm256_div_ps,
    min = _mm256_min_ps,
    max = _mm256_max_ps,
    load_masked = |ptr, mask| _mm256_maskload_ps(ptr, mask),
    store_masked = |ptr, mask, value| _mm256_maskstore_ps(ptr, mask, value)
);

vector_kernel!(
    avx512,
    "avx512f",
    16,
    __m512,
    __mmask16,
    mask = |tail| ((1u32 << tail) - 1) as __mmask16,
    zero = _mm512_setzero_ps,
    set1 = _mm512_set1_ps,
    load = _mm512_loadu_ps,
    store = _mm512_storeu_ps,
    fmadd = _mm512_fmadd_ps,
    add = _mm512_add_ps,
    mul = _mm512_mul_ps,
    div = _mm512_div_ps,
    min = _mm512_min_ps,
    max = _mm512_max_ps,
    load_masked = |ptr, mask| _mm512_maskz_loadu_ps(mask, ptr),
    store_masked = |ptr, mask, value| _mm512_mask_storeu_ps(ptr, mask, value)
);

/// The vector kernel for `chunk` on this CPU, if it has one: AVX-512 for chunks of an even
/// number of 8-lane vectors (whole 16-lane vectors), AVX2 + FMA otherwise. Returns whether it ran.
#[cfg(target_arch = "x86_64")]
fn vector_chunk(chunk: &Chunk, input: (&[Window<'_>], usize, usize), cout: usize, out: &mut Rows<'_>) -> bool {
    avx512_chunk(chunk, input, cout, out) || avx2_chunk(chunk, input, cout, out)
}

/// The AVX-512 kernel, where the CPU has it and the chunk is whole 16-lane vectors. Its blocks
/// are small (4 positions of 32 outputs): 12 positions spilled registers and ran slower than
/// AVX2 (docs/EXPERIMENTS.md).
#[cfg(target_arch = "x86_64")]
fn avx512_chunk(chunk: &Chunk, input: (&[Window<'_>], usize, usize), cout: usize, out: &mut Rows<'_>) -> bool {
    if !(std::arch::is_x86_feature_detected!("avx512f") && chunk.vectors.is_multiple_of(2)) {
        return false;
    }
    match chunk.vectors {
        2 => avx512::chunk::<8, 1>(chunk, input, cout, out),
        _ => avx512::chunk::<4, 2>(chunk, input, cout, out),
    }
    true
}

/// The AVX2 + FMA kernel, where the CPU has it.
#[cfg(target_arch = "x86_64")]
fn avx2_chunk(chunk: &Chunk, input: (&[Window<'_>], usize, usize), cout: usize, out: &mut Rows<'_>) -> bool {
    if !(std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")) {
        return false;
    }
    match chunk.vectors {
        1 => avx2::chunk::<8, 1>(chunk, input, cout, out),
        2 => avx2::chunk::<6, 2>(chunk, input, cout, out),
        3 => avx2::chunk::<3, 3>(chunk, input, cout, out),
        _ => avx2::chunk::<2, 4>(chunk, input, cout, out),
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pseudo;

    #[test]
    fn dot_kernel_matches_its_plain_reference() {
        // Runs of whole 16-float steps, an 8-float step, and floats past both.
        for len in [3, 8, 16, 29, 96] {
            let parts = 3;
            let column = pseudo(parts * len, 3);
            let data = pseudo(DOT_POSITIONS * 2 + (parts - 1) * 3 + len, 9);
            let windows: Vec<Window<'_>> = (0..DOT_POSITIONS)
                .map(|i| Window { data: &data[i * 2..i * 2 + (parts - 1) * 3 + len], stride: 3 })
                .collect();
            let plain = dot_block_plain::<DOT_POSITIONS>(&windows, &column, len);
            for (i, window) in windows.iter().enumerate() {
                let sum: f32 = (0..parts * len).map(|q| window.data[q / len * 3 + q % len] * column[q]).sum();
                assert!((plain[i] - sum).abs() < 1e-4, "len {len}, window {i}: {} vs {sum}", plain[i]);
            }
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: AVX2 and FMA were just detected.
                #[allow(unsafe_code)]
                let vector = unsafe { dot_block_avx2::<DOT_POSITIONS>(&windows, &column, len) };
                for (a, b) in vector.iter().zip(&plain) {
                    assert!((a - b).abs() < 1e-4, "len {len}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn vector_kernel_matches_the_plain_one_for_every_chunk_width() {
        // Output widths covering 1-4 vectors, partial vectors and several chunks; position
        // counts that leave remainders after the register blocks; short windows (all parts in
        // one pass) and long ones (weights past `L1_WEIGHT_BYTES`: part by part).
        let shapes = [1, 3, 8, 13, 20, 32, 33, 64, 70].into_iter().flat_map(|c| [(c, 7), (c, 130)]);
        for (cout, len) in shapes {
            for positions in [1, 5, 13] {
                let parts = 3;
                let weight = pseudo(parts * len * cout, 3);
                let bias = pseudo(cout, 5);
                let chunks = pack(&weight, &bias, parts * len, cout);
                let data = pseudo(positions * parts * len + 11, 9);
                // Overlapping windows, as a convolution reads them.
                let windows: Vec<Window<'_>> = (0..positions)
                    .map(|i| Window { data: &data[i * 2..i * 2 + (parts - 1) * 3 + len], stride: 3 })
                    .collect();
                let mut fast = vec![0.0; positions * cout];
                windows_times_weights(
                    &chunks,
                    &windows,
                    parts,
                    len,
                    Rows { data: &mut fast, at: None, add: false, gelu: false },
                );
                let mut plain = vec![0.0; positions * cout];
                for c in &chunks {
                    let mut rows = Rows { data: &mut plain, at: None, add: false, gelu: false };
                    plain_chunk(c, &windows, parts, len, cout, &mut rows);
                }
                for (p, (a, b)) in fast.iter().zip(&plain).enumerate() {
                    assert!((a - b).abs() < 1e-4, "cout {cout}, positions {positions}, element {p}: {a} vs {b}");
                }
                // The AVX2 kernel too where the CPU would pick AVX-512 for some chunks.
                #[cfg(target_arch = "x86_64")]
                {
                    let mut avx2 = vec![0.0; positions * cout];
                    let ran = chunks.iter().all(|c| {
                        let mut rows = Rows { data: &mut avx2, at: None, add: false, gelu: false };
                        avx2_chunk(c, (&windows, parts, len), cout, &mut rows)
                    });
                    if ran {
                        for (a, b) in avx2.iter().zip(&plain) {
                            assert!((a - b).abs() < 1e-4, "avx2, cout {cout}, positions {positions}: {a} vs {b}");
                        }
                    }
                }
                // GELU on the way out, as the plain kernel then `gelu_in_place` give it.
                let mut fused = vec![0.0; positions * cout];
                windows_times_weights(
                    &chunks,
                    &windows,
                    parts,
                    len,
                    Rows { data: &mut fused, at: None, add: false, gelu: true },
                );
                for (a, b) in fused.iter().zip(&plain) {
                    let mut b = *b;
                    gelu_in_place(&mut b);
                    assert!((a - b).abs() < 1e-4, "gelu: {a} vs {b}");
                }
                // Rows scattered over a larger map (every third row, from row 4 of the map
                // starting at row 1) and added to what is there: the rows in between untouched.
                let at: Vec<u32> = (0..positions as u32).map(|i| 4 + 3 * i).collect();
                let map_rows = 4 + 3 * positions;
                let mut map = pseudo(map_rows * cout, 13);
                let before = map.clone();
                let rows = Rows { data: &mut map, at: Some((&at, 1)), add: true, gelu: false };
                windows_times_weights(&chunks, &windows, parts, len, rows);
                for r in 0..map_rows {
                    for co in 0..cout {
                        let (got, was) = (map[r * cout + co], before[r * cout + co]);
                        match at.iter().position(|&a| a as usize - 1 == r) {
                            Some(p) => assert!((got - was - plain[p * cout + co]).abs() < 1e-4, "row {r}"),
                            None => assert_eq!(got, was, "row {r} must stay"),
                        }
                    }
                }
                // And the plain kernel is the definition.
                for p in 0..positions {
                    for co in 0..cout {
                        let mut acc = bias[co];
                        for r in 0..parts {
                            for j in 0..len {
                                acc += windows[p].data[r * 3 + j] * weight[(r * len + j) * cout + co];
                            }
                        }
                        assert!((plain[p * cout + co] - acc).abs() < 1e-5);
                    }
                }
            }
        }
    }
}
