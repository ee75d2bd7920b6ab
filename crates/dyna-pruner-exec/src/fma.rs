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

/// `out[p] = bias + sum_r windows[p * parts + r] . weight rows r * len .. (r + 1) * len` for every
/// position p: `windows` holds `parts` slices of `len` floats per position (a kernel row each),
/// `out` is `[positions, cout]` row-major.
pub(crate) fn windows_times_weights(chunks: &[Chunk], windows: &[&[f32]], parts: usize, len: usize, out: &mut [f32]) {
    let cout: usize = chunks.iter().map(|c| c.cols).sum();
    let positions = windows.len() / parts;
    assert!(
        windows.len() == positions * parts && windows.iter().all(|w| w.len() >= len) && out.len() == positions * cout,
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
fn plain_chunk(chunk: &Chunk, windows: &[&[f32]], parts: usize, len: usize, cout: usize, out: &mut [f32]) {
    let width = chunk.vectors * LANES;
    for (p, row) in out.chunks_exact_mut(cout).enumerate() {
        let acc = &mut row[chunk.col0..chunk.col0 + chunk.cols];
        acc.copy_from_slice(&chunk.bias[..chunk.cols]);
        for (r, window) in windows[p * parts..(p + 1) * parts].iter().enumerate() {
            for (j, &x) in window[..len].iter().enumerate() {
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

    use super::{Chunk, LANES};

    /// One chunk over all positions: blocks of `P` positions, the rest one at a time.
    pub(super) fn chunk(chunk: &Chunk, windows: &[&[f32]], parts: usize, len: usize, cout: usize, out: &mut [f32]) {
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

    /// Part by part (one kernel row of weights at a time, so that slice of the packed weight
    /// stays in the L1 cache for all positions), the positions in blocks of `P`, summing into
    /// `out` in place.
    #[target_feature(enable = "avx2,fma")]
    fn blocks<const P: usize, const V: usize>(
        chunk: &Chunk,
        windows: &[&[f32]],
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
        for r in 0..parts {
            let weight = &chunk.weight[r * len * width..(r + 1) * len * width];
            let mut p = 0;
            while p < positions {
                let n = if p + P <= positions { P } else { 1 };
                let x: [&[f32]; P] = std::array::from_fn(|i| windows[(p + i.min(n - 1)) * parts + r]);
                let rows = &mut out[p * cout + chunk.col0..(p + n - 1) * cout + chunk.col0 + chunk.cols];
                if n == P {
                    block::<P, V>(weight, &chunk.bias, &x, len, r > 0, (rows, cout, mask));
                } else {
                    block::<1, V>(weight, &chunk.bias, &[x[0]], len, r > 0, (rows, cout, mask));
                }
                p += n;
            }
        }
    }

    /// `rows[p] (+)= x[p][..len] . weight` for `P` positions and `V` vectors of outputs,
    /// accumulated in registers; starts from the bias unless `accumulate`. `rows` starts at the
    /// chunk's first column of the first position, rows `stride` apart; the last vector's lanes
    /// outside `mask` are neither read nor written (they belong to the next chunk or row).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn block<const P: usize, const V: usize>(
        weight: &[f32],
        bias: &[f32],
        x: &[&[f32]; P],
        len: usize,
        accumulate: bool,
        (rows, stride, mask): (&mut [f32], usize, __m256i),
    ) {
        let width = V * LANES;
        assert!(weight.len() >= len * width && bias.len() >= width && x.iter().all(|x| x.len() >= len));
        assert!(rows.len() > (P - 1) * stride + (V - 1) * LANES);
        let w = weight.as_ptr();
        let out = rows.as_mut_ptr();
        // SAFETY: the assertions above bound every offset read below (weight rows `j < len` of
        // `width` floats, `len` floats of each window); the output vectors are full ones inside
        // `rows` except the last of each row, which is masked to the lanes `rows` holds (the
        // caller cuts `rows` to end at the last position's last column of the chunk).
        unsafe {
            let mut acc: [[__m256; V]; P] = std::array::from_fn(|p| {
                std::array::from_fn(|v| match (accumulate, v + 1 == V) {
                    (false, _) => _mm256_loadu_ps(bias.as_ptr().add(v * LANES)),
                    (true, false) => _mm256_loadu_ps(out.add(p * stride + v * LANES)),
                    (true, true) => _mm256_maskload_ps(out.add(p * stride + v * LANES), mask),
                })
            });
            let xp: [*const f32; P] = std::array::from_fn(|p| x[p].as_ptr());
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
        // counts that leave remainders after the register blocks.
        for cout in [1, 8, 13, 20, 32, 33, 64, 70] {
            for positions in [1, 5, 13] {
                let (parts, len) = (3, 7);
                let weight = pseudo(parts * len * cout, 3);
                let bias = pseudo(cout, 5);
                let chunks = pack(&weight, &bias, parts * len, cout);
                let data = pseudo(positions * parts * len + 11, 9);
                // Overlapping windows, as a convolution reads them.
                let windows: Vec<&[f32]> = (0..positions * parts).map(|i| &data[i * 2..i * 2 + len]).collect();
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
                                acc += windows[p * parts + r][j] * weight[(r * len + j) * cout + co];
                            }
                        }
                        assert!((plain[p * cout + co] - acc).abs() < 1e-5);
                    }
                }
            }
        }
    }
}
