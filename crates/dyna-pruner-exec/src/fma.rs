//! The convolution kernel: output rows as sums over *windows* read in place, with register-blocked
//! AVX2 + FMA code where the CPU has it and a plain loop otherwise.
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

/// Output channels `col0..col0 + cols` of a layer: weights `[rows, vectors * LANES]`, zero past
/// `cols`, and the bias the same way.
#[derive(Debug, Clone)]
pub(crate) struct Chunk {
    col0: usize,
    cols: usize,
    vectors: usize,
    weight: Vec<f32>,
    bias: Vec<f32>,
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
            Chunk { col0, cols, vectors, weight: w, bias: b }
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
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            avx2::chunk(chunk, windows, parts, len, cout, &mut rows);
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

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use std::arch::x86_64::{
        __m256, __m256i, _mm256_add_ps, _mm256_broadcast_ss, _mm256_cmpgt_epi32, _mm256_div_ps, _mm256_fmadd_ps,
        _mm256_loadu_ps, _mm256_maskload_ps, _mm256_maskstore_ps, _mm256_max_ps, _mm256_min_ps, _mm256_mul_ps,
        _mm256_set1_epi32, _mm256_set1_ps, _mm256_setr_epi32, _mm256_setzero_ps, _mm256_storeu_ps,
    };

    use super::{Chunk, Rows, Window, L1_WEIGHT_BYTES, LANES};

    /// One chunk over all positions: blocks of `P` positions, the rest one at a time.
    pub(super) fn chunk(
        chunk: &Chunk,
        windows: &[Window<'_>],
        parts: usize,
        len: usize,
        cout: usize,
        out: &mut Rows<'_>,
    ) {
        let input = (windows, parts, len);
        // SAFETY (all calls below): the caller detected AVX2 and FMA on this CPU.
        unsafe {
            match chunk.vectors {
                1 => blocks::<8, 1>(chunk, input, cout, out),
                2 => blocks::<6, 2>(chunk, input, cout, out),
                3 => blocks::<3, 3>(chunk, input, cout, out),
                _ => blocks::<2, 4>(chunk, input, cout, out),
            }
        }
    }

    /// The positions in blocks of `P`, summing in registers: all parts of a window in one pass
    /// when the chunk's packed weight fits the L1 cache with room to spare, else part by part
    /// (one kernel row of weights at a time, so that that slice stays in L1 for all positions,
    /// with the accumulators going through the output rows between parts).
    #[target_feature(enable = "avx2,fma")]
    fn blocks<const P: usize, const V: usize>(
        chunk: &Chunk,
        (windows, parts, len): (&[Window<'_>], usize, usize),
        cout: usize,
        out: &mut Rows<'_>,
    ) {
        let width = V * LANES;
        let positions = windows.len();
        // Lanes of the last vector that belong to this chunk.
        let tail = chunk.cols - (V - 1) * LANES;
        let mask = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(tail as i32), mask);
        let together = parts * len * width * std::mem::size_of::<f32>() <= L1_WEIGHT_BYTES;
        let (step, passes) = if together { (parts, 1) } else { (1, parts) };
        for pass in 0..passes {
            let r0 = pass * step;
            let weight = &chunk.weight[r0 * len * width..(r0 + step) * len * width];
            // The first pass starts from the bias (plus the row with `add`), later ones from
            // the row.
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
                let dst = out.data.as_mut_ptr();
                // SAFETY: every pointer in `x` starts `step` runs of `len` readable floats
                // `strides` apart, and every `dst + at[i]` starts the chunk's columns of a
                // distinct row inside `out.data` (see above).
                unsafe {
                    if n == P {
                        block::<P, V>(weight, &chunk.bias, (x, strides, step, len), (start, gelu), (dst, at, mask));
                    } else {
                        let one = ([x[0]], [strides[0]], step, len);
                        block::<1, V>(weight, &chunk.bias, one, (start, gelu), (dst, [at[0]], mask));
                    }
                }
                p += n;
            }
        }
    }

    /// `activation::gelu_in_place` on eight lanes, with the same operations in the same order as
    /// its fused-multiply-add form (`activation::gelu_slice`'s AVX2 path).
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::excessive_precision)] // the published coefficients, as in `activation::erf`
    fn gelu_vector(v: __m256) -> __m256 {
        let c = _mm256_set1_ps;
        let x = _mm256_mul_ps(v, c(std::f32::consts::FRAC_1_SQRT_2));
        let x = _mm256_min_ps(_mm256_max_ps(x, c(-4.0)), c(4.0));
        let x2 = _mm256_mul_ps(x, x);
        let mut p = _mm256_fmadd_ps(x2, c(-2.726_142_2e-10), c(2.770_681_4e-8));
        for k in [-2.101_024e-6, -5.692_506_4e-5, -7.349_906_3e-4, -2.954_600_1e-3, -1.609_603_3e-2] {
            p = _mm256_fmadd_ps(x2, p, c(k));
        }
        let mut q = _mm256_fmadd_ps(x2, c(-1.456_607_2e-5), c(-2.133_740_6e-4));
        for k in [-1.682_827e-3, -7.373_329_3e-3, -1.426_473_9e-2] {
            q = _mm256_fmadd_ps(x2, q, c(k));
        }
        let erf = _mm256_div_ps(_mm256_mul_ps(x, p), q);
        _mm256_mul_ps(_mm256_mul_ps(c(0.5), v), _mm256_add_ps(c(1.0), erf))
    }

    /// What a block's accumulators start from.
    #[derive(Clone, Copy)]
    enum Start {
        Bias,
        Row,
        RowPlusBias,
    }

    /// `out[at[p]..] = start + sum_r x[p][r * strides[p]..][..len] . weight rows r * len..` for
    /// `P` positions, `parts` runs each, and `V` vectors of outputs, accumulated in registers
    /// (then through GELU with `gelu`); the last vector's lanes outside `mask` are neither read
    /// nor written (they belong to the next chunk or row).
    ///
    /// # Safety
    /// Every `x[p]` must start `parts` runs of `len` readable floats, `strides[p]` apart, and
    /// every `out + at[p]` the chunk's `(V - 1) * LANES` + `mask` floats of a distinct row that
    /// nothing else accesses meanwhile.
    #[target_feature(enable = "avx2,fma")]
    #[inline(never)]
    unsafe fn block<const P: usize, const V: usize>(
        weight: &[f32],
        bias: &[f32],
        (xp, strides, parts, len): ([*const f32; P], [usize; P], usize, usize),
        (start, gelu): (Start, bool),
        (out, at, mask): (*mut f32, [usize; P], __m256i),
    ) {
        let width = V * LANES;
        assert!(weight.len() >= parts * len * width && bias.len() >= width);
        // SAFETY: the assertion above bounds every weight and bias offset read below (rows
        // `r * len + j` of `width` floats), the caller every window and output access; the
        // last output vector of each row is masked to the chunk's lanes.
        unsafe {
            // Plain loops, not closures around the intrinsics: a closure does not inherit the
            // target features, so its intrinsics may become calls.
            let mut acc = [[_mm256_setzero_ps(); V]; P];
            for (p, acc) in acc.iter_mut().enumerate() {
                for (v, a) in acc.iter_mut().enumerate() {
                    let src = out.add(at[p] + v * LANES);
                    if !matches!(start, Start::Bias) {
                        *a = if v + 1 == V { _mm256_maskload_ps(src, mask) } else { _mm256_loadu_ps(src) };
                    }
                    if !matches!(start, Start::Row) {
                        *a = _mm256_add_ps(*a, _mm256_loadu_ps(bias.as_ptr().add(v * LANES)));
                    }
                }
            }
            for r in 0..parts {
                let xp: [*const f32; P] = std::array::from_fn(|p| xp[p].add(r * strides[p]));
                let w = weight.as_ptr().add(r * len * width);
                for j in 0..len {
                    let wj = w.add(j * width);
                    let mut wv = [_mm256_setzero_ps(); V];
                    for (v, wv) in wv.iter_mut().enumerate() {
                        *wv = _mm256_loadu_ps(wj.add(v * LANES));
                    }
                    for p in 0..P {
                        let xv = _mm256_broadcast_ss(&*xp[p].add(j));
                        for v in 0..V {
                            acc[p][v] = _mm256_fmadd_ps(xv, wv[v], acc[p][v]);
                        }
                    }
                }
            }
            for (p, a) in acc.iter().enumerate() {
                for (v, a) in a.iter().enumerate() {
                    let a = if gelu { &gelu_vector(*a) } else { a };
                    let dst = out.add(at[p] + v * LANES);
                    if v + 1 == V {
                        _mm256_maskstore_ps(dst, mask, *a);
                    } else {
                        _mm256_storeu_ps(dst, *a);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pseudo;

    #[test]
    fn vector_kernel_matches_the_plain_one_for_every_chunk_width() {
        // Output widths covering 1-4 vectors, partial vectors and several chunks; position
        // counts that leave remainders after the register blocks; short windows (all parts in
        // one pass) and long ones (weights past `L1_WEIGHT_BYTES`: part by part).
        let shapes = [1, 8, 13, 20, 32, 33, 64, 70].into_iter().flat_map(|c| [(c, 7), (c, 130)]);
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
