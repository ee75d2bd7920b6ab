//! The convolution kernel: output rows as sums over *windows* read in place, with register-blocked
//! AVX2 + FMA code where the CPU has it and a plain loop otherwise.
//!
//! A 3x3 convolution's input window at one output position is three runs of `3 * cin`
//! contiguous floats in a channels-last map (one per kernel row), so no im2col copy is needed:
//! the kernel takes, per position, one slice per kernel row and multiplies it by that row's
//! weights. Output channels are split into chunks of at most 32 (four 8-lane vectors), each
//! with its weights packed and zero-padded to whole vectors, so a layer keeping 20 of 64 units
//! runs at 20/24 of the lanes instead of falling off a GEMM library's tuned shapes. Several
//! positions share each weight load (the register block); the packed weights are read once per
//! block, the window values are broadcast.

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

/// `out[p] = bias + sum_r (part r of windows[p]) . weight rows r * len .. (r + 1) * len` for every
/// position p; `out` is `[positions, cout]` row-major.
pub(crate) fn windows_times_weights(
    chunks: &[Chunk],
    windows: &[Window<'_>],
    parts: usize,
    len: usize,
    out: &mut [f32],
) {
    let cout: usize = chunks.iter().map(|c| c.cols).sum();
    assert!(
        parts > 0
            && windows.iter().all(|w| w.data.len() >= (parts - 1) * w.stride + len)
            && out.len() == windows.len() * cout,
        "conv kernel operands do not match"
    );
    for chunk in chunks {
        assert_eq!(chunk.weight.len(), parts * len * chunk.vectors * LANES, "packed weight does not match");
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            avx2::chunk(chunk, windows, parts, len, cout, out);
            continue;
        }
        plain_chunk(chunk, windows, parts, len, cout, out);
    }
}

/// The plain reference of the vector kernel (same sums, without fused multiply-adds).
fn plain_chunk(chunk: &Chunk, windows: &[Window<'_>], parts: usize, len: usize, cout: usize, out: &mut [f32]) {
    let width = chunk.vectors * LANES;
    for (window, row) in windows.iter().zip(out.chunks_exact_mut(cout)) {
        let acc = &mut row[chunk.col0..chunk.col0 + chunk.cols];
        acc.copy_from_slice(&chunk.bias[..chunk.cols]);
        for r in 0..parts {
            for (j, &x) in window.data[r * window.stride..][..len].iter().enumerate() {
                let w = &chunk.weight[(r * len + j) * width..][..chunk.cols];
                acc.iter_mut().zip(w).for_each(|(a, &w)| *a += x * w);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use std::arch::x86_64::{
        __m256, __m256i, _mm256_broadcast_ss, _mm256_cmpgt_epi32, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_maskload_ps,
        _mm256_maskstore_ps, _mm256_set1_epi32, _mm256_setr_epi32, _mm256_storeu_ps,
    };

    use super::{Chunk, Window, L1_WEIGHT_BYTES, LANES};

    /// One chunk over all positions: blocks of `P` positions, the rest one at a time.
    pub(super) fn chunk(chunk: &Chunk, windows: &[Window<'_>], parts: usize, len: usize, cout: usize, out: &mut [f32]) {
        // SAFETY (all calls below): the caller detected AVX2 and FMA on this CPU.
        unsafe {
            match chunk.vectors {
                1 => blocks::<6, 1>(chunk, windows, parts, len, cout, out),
                2 => blocks::<6, 2>(chunk, windows, parts, len, cout, out),
                3 => blocks::<3, 3>(chunk, windows, parts, len, cout, out),
                _ => blocks::<2, 4>(chunk, windows, parts, len, cout, out),
            }
        }
    }

    /// The positions in blocks of `P`, summing into `out` in place: all parts of a window in
    /// one pass when the chunk's packed weight fits the L1 cache with room to spare, else part
    /// by part (one kernel row of weights at a time, so that that slice stays in L1 for all
    /// positions, with the accumulators going through `out` between parts).
    #[target_feature(enable = "avx2,fma")]
    fn blocks<const P: usize, const V: usize>(
        chunk: &Chunk,
        windows: &[Window<'_>],
        parts: usize,
        len: usize,
        cout: usize,
        out: &mut [f32],
    ) {
        let width = V * LANES;
        let positions = out.len() / cout;
        // Lanes of the last vector that belong to this chunk.
        let tail = chunk.cols - (V - 1) * LANES;
        let mask = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(tail as i32), mask);
        let together = parts * len * width * std::mem::size_of::<f32>() <= L1_WEIGHT_BYTES;
        let (step, passes) = if together { (parts, 1) } else { (1, parts) };
        for pass in 0..passes {
            let r0 = pass * step;
            let weight = &chunk.weight[r0 * len * width..(r0 + step) * len * width];
            let mut p = 0;
            while p < positions {
                let n = if p + P <= positions { P } else { 1 };
                // Parts r0.. of each window: checked in bounds by `windows_times_weights`.
                let w: [Window<'_>; P] = std::array::from_fn(|i| windows[p + i.min(n - 1)]);
                let x: [*const f32; P] = std::array::from_fn(|i| w[i].data[r0 * w[i].stride..].as_ptr());
                let strides: [usize; P] = std::array::from_fn(|i| w[i].stride);
                let rows = &mut out[p * cout + chunk.col0..(p + n - 1) * cout + chunk.col0 + chunk.cols];
                // SAFETY: every pointer in `x` starts `step` runs of `len` readable floats
                // `strides` apart (see above).
                unsafe {
                    if n == P {
                        block::<P, V>(weight, &chunk.bias, (x, strides, step, len), r0 > 0, (rows, cout, mask));
                    } else {
                        let one = ([x[0]], [strides[0]], step, len);
                        block::<1, V>(weight, &chunk.bias, one, r0 > 0, (rows, cout, mask));
                    }
                }
                p += n;
            }
        }
    }

    /// `rows[p] (+)= sum_r x[p][r * strides[p]..][..len] . weight rows r * len.. ` for `P`
    /// positions, `parts` runs each, and `V` vectors of outputs, accumulated in registers;
    /// starts from the bias unless `accumulate`. `rows` starts at the chunk's first column of
    /// the first position, rows `stride` apart; the last vector's lanes outside `mask` are
    /// neither read nor written (they belong to the next chunk or row).
    ///
    /// # Safety
    /// Every `x[p]` must start `parts` runs of `len` readable floats, `strides[p]` apart.
    #[target_feature(enable = "avx2,fma")]
    #[inline(never)]
    unsafe fn block<const P: usize, const V: usize>(
        weight: &[f32],
        bias: &[f32],
        (xp, strides, parts, len): ([*const f32; P], [usize; P], usize, usize),
        accumulate: bool,
        (rows, stride, mask): (&mut [f32], usize, __m256i),
    ) {
        let width = V * LANES;
        assert!(weight.len() >= parts * len * width && bias.len() >= width);
        assert!(rows.len() > (P - 1) * stride + (V - 1) * LANES);
        let out = rows.as_mut_ptr();
        // SAFETY: the assertions above bound every weight and bias offset read below (rows
        // `r * len + j` of `width` floats), the caller every window read; the output vectors
        // are full ones inside `rows` except the last of each row, which is masked to the
        // lanes `rows` holds (the caller cuts `rows` to end at the last position's last column
        // of the chunk).
        unsafe {
            let mut acc: [[__m256; V]; P] = std::array::from_fn(|p| {
                std::array::from_fn(|v| match (accumulate, v + 1 == V) {
                    (false, _) => _mm256_loadu_ps(bias.as_ptr().add(v * LANES)),
                    (true, false) => _mm256_loadu_ps(out.add(p * stride + v * LANES)),
                    (true, true) => _mm256_maskload_ps(out.add(p * stride + v * LANES), mask),
                })
            });
            for r in 0..parts {
                let xp: [*const f32; P] = std::array::from_fn(|p| xp[p].add(r * strides[p]));
                let w = weight.as_ptr().add(r * len * width);
                for j in 0..len {
                    let wj = w.add(j * width);
                    let wv: [__m256; V] = std::array::from_fn(|v| _mm256_loadu_ps(wj.add(v * LANES)));
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
                    let dst = out.add(p * stride + v * LANES);
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
                windows_times_weights(&chunks, &windows, parts, len, &mut fast);
                let mut plain = vec![0.0; positions * cout];
                for c in &chunks {
                    plain_chunk(c, &windows, parts, len, cout, &mut plain);
                }
                for (p, (a, b)) in fast.iter().zip(&plain).enumerate() {
                    assert!((a - b).abs() < 1e-4, "cout {cout}, positions {positions}, element {p}: {a} vs {b}");
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
