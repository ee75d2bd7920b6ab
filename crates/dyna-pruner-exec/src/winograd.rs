//! Winograd's minimal filtering F(4x4, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional
//! Neural Networks", CVPR 2016) for the 3x3, stride-1, padding-1 convolutions.
//!
//! Each 4x4 block of outputs (a *tile*) comes from its 6x6 input window with 36 multiplications
//! per input and output channel pair instead of the direct convolution's 144: the windows are
//! transformed (`V = Bᵀ d B`), multiplied by the transformed weights (`U = G g Gᵀ`) as 36
//! independent matrix products over the channels (the `fma` kernel, one row per tile), and the
//! products transformed back (`Y = Aᵀ M A`). Bias, GELU and where the rows go are as in the
//! direct kernel. With the interpolation points 0, ±1, ±2 the transforms' coefficients are small
//! integers and fractions, and on test maps with outputs up to 20 the results stay within 6e-5
//! of the direct convolution in f32 (`kernels`' test allows 1e-4 (1 + |y|)).

use std::cell::Cell;

use crate::activation::gelu_slice;
use crate::fma::{pack, windows_times_weights, Chunk, Rows, Window};

/// Tiles transformed and multiplied together: their transformed windows and products (36 rows
/// of channels each) stay in the L2 cache.
const GROUP: usize = 16;

/// Lanes of the transforms' element-wise arithmetic (fixed-size arrays the compiler vectorizes).
const LANES: usize = 8;
type Lane = [f32; LANES];

/// Outputs per tile side.
pub(crate) const M: usize = 4;
/// Input pixels per window side (`M + 2`).
const ALPHA: usize = M + 2;
/// Transformed values per tile.
const POINTS: usize = ALPHA * ALPHA;

/// A slot of the tile row's positions that no output row takes.
pub(crate) const NO_ROW: u32 = u32::MAX;

/// A 3x3 convolution's weights in the Winograd domain.
#[derive(Debug, Clone)]
pub(crate) struct Winograd {
    /// `U_ξ` for ξ = 6 i + j: 36 matrices `[cin, cout]` (cin padded to whole lanes with zero
    /// rows), each packed for the kernel (zero bias: the bias is added after the output
    /// transform).
    transformed: Vec<Vec<Chunk>>,
    cin: usize,
    cout: usize,
}

/// `G`, the weight transform of F(4x4, 3x3).
const G: [[f32; 3]; ALPHA] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

impl Winograd {
    /// From a 3x3 weight `[(ky, kx, ci), co]` row-major (`kernels::Conv`'s layout). Runs once
    /// per model conv, but once per call for a call's weight selections: so in f32, over
    /// whole rows of output channels.
    pub(crate) fn new(weight: &[f32], cin: usize, cout: usize) -> Self {
        assert_eq!(weight.len(), 9 * cin * cout, "a 3x3 weight [(ky, kx, ci), co]");
        let mut u = vec![vec![0.0f32; cin * cout]; POINTS];
        let mut gg = vec![0.0f32; ALPHA * 3 * cout];
        for ci in 0..cin {
            // G g: gg[i][kx] = sum_ky G[i][ky] g[ky][kx], each a row over the output channels.
            gg.fill(0.0);
            for (i, g_row) in G.iter().enumerate() {
                for kx in 0..3 {
                    let dst = &mut gg[(i * 3 + kx) * cout..(i * 3 + kx + 1) * cout];
                    for (ky, &coefficient) in g_row.iter().enumerate() {
                        let src = &weight[((ky * 3 + kx) * cin + ci) * cout..][..cout];
                        dst.iter_mut().zip(src).for_each(|(d, s)| *d += coefficient * s);
                    }
                }
            }
            // (G g) Gᵀ: u[i][j] = sum_kx gg[i][kx] G[j][kx].
            for (xi, matrix) in u.iter_mut().enumerate() {
                let (i, j) = (xi / ALPHA, xi % ALPHA);
                let dst = &mut matrix[ci * cout..(ci + 1) * cout];
                for (kx, &coefficient) in G[j].iter().enumerate() {
                    let src = &gg[(i * 3 + kx) * cout..(i * 3 + kx + 1) * cout];
                    dst.iter_mut().zip(src).for_each(|(d, s)| *d += coefficient * s);
                }
            }
        }
        // Rows of the padding channels stay zero.
        let padded = cin.next_multiple_of(LANES);
        u.iter_mut().for_each(|m| m.resize(padded * cout, 0.0));
        let zero = vec![0.0; cout];
        Winograd { transformed: u.iter().map(|m| pack(m, &zero, padded, cout)).collect(), cin, cout }
    }
}

/// A band of tile rows' work: tile rows `first_row..` (output rows `4 first_row ..`) of a
/// `[h, w, cin]` input, the output row of each of the band's positions (`slots[y * w + x]` for
/// output row `4 first_row + y`, `NO_ROW` where none), and what happens at the rows: overwritten
/// (or added to, with `add`), then GELU.
pub(crate) struct TileBand<'a> {
    pub input: &'a [f32],
    pub size: (usize, usize),
    pub first_row: usize,
    pub slots: &'a [u32],
    pub add: bool,
    pub gelu: bool,
}

impl TileBand<'_> {
    /// Output rows of the band (the last tile row may reach past the map).
    fn rows(&self) -> usize {
        self.slots.len() / self.size.1
    }
}

/// Per thread: a copy of one tile's input window, zero-padded past the map and to whole lanes of
/// channels, then the transformed windows and the products of a group of tiles.
#[derive(Default)]
struct Scratch {
    window_copy: Vec<f32>,
    windows: Vec<f32>,
    products: Vec<f32>,
}

thread_local! {
    static SCRATCH: Cell<Scratch> =
        const { Cell::new(Scratch { window_copy: Vec::new(), windows: Vec::new(), products: Vec::new() }) };
}

impl Winograd {
    /// Computes the tiles `tiles` (tile row, tile column) of `band` into `out` (`cout` floats
    /// per row, at the rows `band.slots` names; every in-bounds position of these tiles must
    /// have one), adding `bias` to each output.
    pub(crate) fn tiles(&self, bias: &[f32], band: &TileBand<'_>, tiles: &[(usize, usize)], out: &mut [f32]) {
        let (h, w) = band.size;
        let rows = band.rows();
        assert!(
            band.input.len() >= h * w * self.cin
                && band.slots.len() == rows * w
                && rows.is_multiple_of(M)
                && tiles
                    .iter()
                    .all(|&(ty, tx)| (band.first_row..band.first_row + rows / M).contains(&ty) && M * tx < w)
                && bias.len() == self.cout,
            "Winograd tile band operands do not match"
        );
        let mut scratch = SCRATCH.take();
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: `tiles_avx2` only requires AVX2 and FMA, which were just detected.
            #[allow(unsafe_code)]
            unsafe {
                self.tiles_avx2(bias, band, tiles, out, &mut scratch)
            };
            SCRATCH.set(scratch);
            return;
        }
        self.tiles_plain(bias, band, tiles, out, &mut scratch);
        SCRATCH.set(scratch);
    }

    /// `tiles_plain` compiled for AVX2 + FMA, so that the transforms' lanes become vectors.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn tiles_avx2(
        &self,
        bias: &[f32],
        band: &TileBand<'_>,
        tiles: &[(usize, usize)],
        out: &mut [f32],
        scratch: &mut Scratch,
    ) {
        self.tiles_plain(bias, band, tiles, out, scratch);
    }

    /// The work of `tiles`, in plain loops without closures (a closure would not inherit the
    /// caller's target features).
    #[inline(always)]
    fn tiles_plain(
        &self,
        bias: &[f32],
        band: &TileBand<'_>,
        tiles: &[(usize, usize)],
        out: &mut [f32],
        scratch: &mut Scratch,
    ) {
        let (cin, cout) = (self.cin, self.cout);
        let padded = cin.next_multiple_of(LANES);
        let (h, w) = band.size;
        scratch.window_copy.resize(POINTS * padded, 0.0);
        for group in tiles.chunks(GROUP) {
            let n = group.len();
            scratch.windows.resize(POINTS * n * padded, 0.0);
            scratch.products.resize(POINTS * n * cout, 0.0);
            for (t, &(ty, tx)) in group.iter().enumerate() {
                // The window's first input pixel, (4 ty - 1, 4 tx - 1), if the window lies inside
                // the map; read in place then (with whole lanes of channels), else from a copy.
                let (y0, x0) = ((M * ty).checked_sub(1), (M * tx).checked_sub(1));
                let inside = match (y0, x0) {
                    (Some(y0), Some(x0)) if cin == padded && y0 + ALPHA <= h && x0 + ALPHA <= w => Some((y0, x0)),
                    _ => None,
                };
                let source = match inside {
                    Some((y0, x0)) => WindowSource { data: band.input, at: (y0 * w + x0) * cin, row: w * cin },
                    None => {
                        copy_window(band, (ty, tx), (cin, padded), &mut scratch.window_copy);
                        WindowSource { data: &scratch.window_copy, at: 0, row: ALPHA * padded }
                    }
                };
                transform_window(&source, padded, (&mut scratch.windows, t));
            }
            // Tile-major: tile t's transformed windows (and products) are rows POINTS t ...
            let mut windows = Vec::with_capacity(n);
            let mut rows_of = Vec::with_capacity(n);
            for xi in 0..POINTS {
                windows.clear();
                rows_of.clear();
                for t in 0..n {
                    let at = (t * POINTS + xi) * padded;
                    windows.push(Window { data: &scratch.windows[at..at + padded], stride: padded });
                    rows_of.push((t * POINTS + xi) as u32);
                }
                let rows = Rows { data: &mut scratch.products, at: Some((&rows_of, 0)), add: false, gelu: false };
                windows_times_weights(&self.transformed[xi], &windows, 1, padded, rows);
            }
            for (t, &tile) in group.iter().enumerate() {
                transform_back(band, tile, bias, (&scratch.products, t), out);
            }
        }
    }
}

#[inline(always)]
fn add(a: Lane, b: Lane) -> Lane {
    let mut c = a;
    for k in 0..LANES {
        c[k] += b[k];
    }
    c
}

#[inline(always)]
fn sub(a: Lane, b: Lane) -> Lane {
    let mut c = a;
    for k in 0..LANES {
        c[k] -= b[k];
    }
    c
}

#[inline(always)]
fn scale(a: Lane, k: f32) -> Lane {
    let mut c = a;
    for v in &mut c {
        *v *= k;
    }
    c
}

/// Up to `LANES` floats from `s`, zero past its end.
#[inline(always)]
fn load(s: &[f32]) -> Lane {
    let mut lane = [0.0; LANES];
    if s.len() >= LANES {
        lane.copy_from_slice(&s[..LANES]);
    } else {
        for (l, v) in lane.iter_mut().zip(s) {
            *l = *v;
        }
    }
    lane
}

/// Writes the first `dst.len()` (at most `LANES`) floats of `v` into `dst`.
#[inline(always)]
fn store(dst: &mut [f32], v: &Lane) {
    if dst.len() == LANES {
        dst.copy_from_slice(v);
    } else {
        for (d, v) in dst.iter_mut().zip(v) {
            *d = *v;
        }
    }
}

/// `Bᵀ d` along one axis.
#[inline(always)]
fn forward_1d(d: [Lane; ALPHA]) -> [Lane; ALPHA] {
    // d4 - 4 d2, d3 - 4 d1, d4 - d2, 2 (d3 - d1)
    let (a, b) = (sub(d[4], scale(d[2], 4.0)), sub(d[3], scale(d[1], 4.0)));
    let (c, e) = (sub(d[4], d[2]), scale(sub(d[3], d[1]), 2.0));
    [
        add(sub(scale(d[0], 4.0), scale(d[2], 5.0)), d[4]),
        add(a, b),
        sub(a, b),
        add(c, e),
        sub(c, e),
        add(sub(scale(d[1], 4.0), scale(d[3], 5.0)), d[5]),
    ]
}

/// `Aᵀ m` along one axis.
#[inline(always)]
fn back_1d(m: [Lane; ALPHA]) -> [Lane; M] {
    let (a, b) = (add(m[1], m[2]), sub(m[1], m[2]));
    let (c, d) = (add(m[3], m[4]), sub(m[3], m[4]));
    [add(add(m[0], a), c), add(b, scale(d, 2.0)), add(a, scale(c, 4.0)), add(add(b, scale(d, 8.0)), m[5])]
}

/// A tile's 6x6 input window: pixel (r, c) is `padded` floats at `data[at + r * row + c * padded..]`.
struct WindowSource<'a> {
    data: &'a [f32],
    at: usize,
    row: usize,
}

/// Copies tile `(ty, tx)`'s input window into `copy` (`[ALPHA, ALPHA, padded]`), zero past the
/// map's edges and in the padding channels.
#[inline(always)]
fn copy_window(band: &TileBand<'_>, (ty, tx): (usize, usize), (cin, padded): (usize, usize), copy: &mut [f32]) {
    let (h, w) = band.size;
    for (r, copy_row) in copy.chunks_exact_mut(ALPHA * padded).enumerate() {
        let y = (M * ty + r).checked_sub(1).filter(|&y| y < h);
        for (c, pixel) in copy_row.chunks_exact_mut(padded).enumerate() {
            match (y, (M * tx + c).checked_sub(1).filter(|&x| x < w)) {
                (Some(y), Some(x)) => {
                    pixel[..cin].copy_from_slice(&band.input[(y * w + x) * cin..(y * w + x + 1) * cin]);
                    pixel[cin..].fill(0.0);
                }
                _ => pixel.fill(0.0),
            }
        }
    }
}

/// Writes the transformed window of `source` into `windows[t]` (`windows` is
/// `[n, POINTS, padded]`).
#[inline(always)]
fn transform_window(source: &WindowSource<'_>, padded: usize, (windows, t): (&mut [f32], usize)) {
    for c0 in (0..padded).step_by(LANES) {
        let mut e = [[[0.0; LANES]; ALPHA]; ALPHA];
        for (r, e) in e.iter_mut().enumerate() {
            let mut d = [[0.0; LANES]; ALPHA];
            for (c, d) in d.iter_mut().enumerate() {
                let at = source.at + r * source.row + c * padded + c0;
                *d = load(&source.data[at..at + LANES]);
            }
            // Along the columns first.
            *e = forward_1d(d);
        }
        // Then along the rows: column j of every row's result.
        #[allow(clippy::needless_range_loop)]
        for j in 0..ALPHA {
            let v = forward_1d([e[0][j], e[1][j], e[2][j], e[3][j], e[4][j], e[5][j]]);
            for (i, v) in v.iter().enumerate() {
                let at = ((t * POINTS + i * ALPHA + j) * padded) + c0;
                windows[at..at + LANES].copy_from_slice(v);
            }
        }
    }
}

/// Transforms the products of tile `(ty, tx)` (`products` is `[n, POINTS, cout]`) back to its
/// 4x4 outputs, adds the bias and places them as `band` says.
#[inline(always)]
fn transform_back(
    band: &TileBand<'_>,
    (ty, tx): (usize, usize),
    bias: &[f32],
    (products, t): (&[f32], usize),
    out: &mut [f32],
) {
    let (h, w) = band.size;
    let cout = bias.len();
    // The output row offset of each of the tile's positions (dy, dx), if it has one.
    let mut slots = [[None; M]; M];
    for (dy, slot_row) in slots.iter_mut().enumerate() {
        for (dx, slot) in slot_row.iter_mut().enumerate() {
            let (y, x) = (M * ty + dy, M * tx + dx);
            let at = (y - M * band.first_row) * w + x;
            if y < h && x < w && band.slots[at] != NO_ROW {
                *slot = Some(band.slots[at] as usize * cout);
            }
        }
    }
    let whole = cout - cout % LANES;
    for c0 in (0..whole).step_by(LANES) {
        back_lanes(c0, LANES, (products, t), bias, &slots, out, band.add);
    }
    if whole < cout {
        back_lanes(whole, cout - whole, (products, t), bias, &slots, out, band.add);
    }
    if band.gelu {
        for at in slots.iter().flatten().flatten() {
            gelu_slice(&mut out[*at..*at + cout]);
        }
    }
}

/// Channels `c0..c0 + lanes` (at most `LANES`) of `transform_back`: a constant `lanes` of
/// `LANES` compiles to whole vectors.
#[inline(always)]
fn back_lanes(
    c0: usize,
    lanes: usize,
    (products, t): (&[f32], usize),
    bias: &[f32],
    slots: &[[Option<usize>; M]; M],
    out: &mut [f32],
    add_to: bool,
) {
    let cout = bias.len();
    let mut s = [[[0.0; LANES]; M]; ALPHA];
    for (i, s) in s.iter_mut().enumerate() {
        let mut m = [[0.0; LANES]; ALPHA];
        for (j, m) in m.iter_mut().enumerate() {
            let at = (t * POINTS + i * ALPHA + j) * cout + c0;
            *m = load(&products[at..at + lanes]);
        }
        // Along the columns first.
        *s = back_1d(m);
    }
    let b = load(&bias[c0..c0 + lanes]);
    for dx in 0..M {
        let y = back_1d([s[0][dx], s[1][dx], s[2][dx], s[3][dx], s[4][dx], s[5][dx]]);
        for (dy, y) in y.iter().enumerate() {
            let Some(at) = slots[dy][dx] else { continue };
            let dst = &mut out[at + c0..at + c0 + lanes];
            let y = add(*y, b);
            if add_to {
                let sum = add(load(dst), y);
                store(dst, &sum);
            } else {
                store(dst, &y);
            }
        }
    }
}
