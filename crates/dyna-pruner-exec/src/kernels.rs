//! Plain f32 kernels over channels-last (`[h, w, c]`) feature maps: a safe GEMM wrapper, 3x3
//! (or 1x1) convolution over a list of output positions (windows read in place, see `fma`; the
//! 3x3 stride-1 ones with enough channels through Winograd's F(4x4, 3x3) wherever whole 4x4
//! tiles of outputs are wanted, see `winograd`), scheduled tile by tile over all samples, and
//! the transposed convolution's upsampling.

use std::sync::OnceLock;

use rayon::prelude::*;

use crate::fma::{pack, windows_times_weights, Chunk, Rows, Window};
use crate::pool::{map_buffer, recycle};
use crate::winograd::{TileBand, Winograd, M, NO_ROW};

/// Output positions processed per task (one tile: one window list, one kernel call per chunk).
pub const TILE: usize = 64;

/// Fewest output positions of a 3x3 stride-1 conv (over all jobs of a call) that run through
/// Winograd: the weights' transform costs about as much as several hundred positions'
/// direct convolution, so per-sample weight copies on small maps stay direct.
const WINOGRAD_MIN_POSITIONS: usize = 1024;

/// Fewest whole tiles a band runs through Winograd (the kernel's register blocks hold 4 or 8
/// rows of the products; on 8x4 maps, two tiles per window, the direct path was faster).
const FEWEST_TILES: usize = 4;

/// The output positions of all `jobs` that run `conv`.
fn positions_of(conv: &Conv, jobs: &[Job<'_>]) -> usize {
    jobs.iter().filter(|j| std::ptr::eq(j.conv, conv)).map(|j| j.positions.len()).sum()
}

/// `dst[m x n] = a[m x k] * b[k x n] (+ dst when accumulate)`, all row-major.
pub fn matmul(dst: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize, accumulate: bool) {
    assert!(dst.len() >= m * n && a.len() >= m * k && b.len() >= k * n, "matmul operand too short");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    // SAFETY: the assertion above guarantees that every element addressed through the row-major
    // strides (rows m/k, columns k/n) lies inside the three slices; `dst` is borrowed mutably and
    // cannot alias `a` or `b`.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// A convolution with square kernel `k`, stride and symmetric zero padding.
#[derive(Debug, Clone)]
pub struct Conv {
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    pub cin: usize,
    pub cout: usize,
    /// `[(ky, kx, ci), co]` row-major: one output pixel is its window (ky outer, kx, then
    /// channels) times this.
    weight: Vec<f32>,
    bias: Vec<f32>,
    /// The same weights in the kernel's packed chunks.
    packed: Vec<Chunk>,
    /// The same weights in the Winograd domain (3x3, stride 1, padding 1), built on first use.
    winograd: OnceLock<Winograd>,
}

impl Conv {
    /// From a weight `[(ky, kx, ci), co]` row-major and a bias `[co]`.
    pub fn new(k: usize, stride: usize, pad: usize, cin: usize, cout: usize, weight: Vec<f32>, bias: Vec<f32>) -> Self {
        assert!(weight.len() == k * k * cin * cout && bias.len() == cout, "conv weight or bias has the wrong size");
        let packed = pack(&weight, &bias, k * k * cin, cout);
        Conv { k, stride, pad, cin, cout, weight, bias, packed, winograd: OnceLock::new() }
    }

    /// The Winograd form of a conv that suits it (built on first use).
    fn winograd(&self) -> Option<&Winograd> {
        self.suits_winograd().then(|| self.winograd.get_or_init(|| Winograd::new(&self.weight, self.cin, self.cout)))
    }

    /// Whether this conv runs through Winograd where whole tiles are wanted: 3x3 stride 1 with
    /// enough channels that the matrix products outweigh the transforms (with 8 or 16 on a
    /// side it was no faster, docs/EXPERIMENTS.md).
    fn suits_winograd(&self) -> bool {
        self.k == 3 && self.stride == 1 && self.pad == 1 && self.cin.min(self.cout) >= 16 && self.cin * self.cout >= 512
    }

    /// Whether a job of this conv at `positions` runs band by band through Winograd: it suits
    /// it, the positions ascend, and its weights are transformed already (a model's own convs,
    /// see `from_oihw`) or enough positions (`shared`: of all the jobs of this conv) pay for it.
    fn takes_winograd(&self, positions: Positions<'_>, shared: usize) -> bool {
        self.suits_winograd()
            && (self.winograd.get().is_some() || shared >= WINOGRAD_MIN_POSITIONS)
            && match positions {
                Positions::Range(..) => true,
                Positions::List(list) => list.windows(2).all(|p| p[0] < p[1]),
            }
    }

    /// Tile rows `tile_rows`' share of a job: the listed `positions` in their output rows
    /// (ascending), whose rows go to `data` at row `p - first` for position p (a map), or with
    /// `first = None` at their index among `positions` (compact rows). Whole 4x4 tiles run
    /// through Winograd, the other positions through the direct kernel.
    fn tile_band(
        &self,
        job: &Job<'_>,
        tile_rows: std::ops::Range<usize>,
        positions: Positions<'_>,
        data: &mut [f32],
        (first, add): (Option<usize>, bool),
    ) {
        let (h, w) = (job.h, job.w);
        let base = M * tile_rows.start * w;
        let mut slots = vec![NO_ROW; M * tile_rows.len() * w];
        for i in 0..positions.len() {
            let p = positions.get(i);
            slots[p - base] = first.map_or(i, |f| p - f) as u32;
        }
        // Whether every in-bounds position of tile (ty, tx) is listed, per tile of the band.
        let per_row = w.div_ceil(M);
        let mut whole: Vec<bool> = (0..tile_rows.len() * per_row)
            .map(|t| {
                let (band_row, tx) = (t / per_row, t % per_row);
                let rows = M * band_row..M * band_row + (h - M * (tile_rows.start + band_row)).min(M);
                rows.into_iter().all(|y| (M * tx..(M * tx + M).min(w)).all(|x| slots[y * w + x] != NO_ROW))
            })
            .collect();
        // Fewer whole tiles than a register block of the products: all through the direct path.
        if whole.iter().filter(|&&t| t).count() < FEWEST_TILES {
            whole.fill(false);
        }
        let tiles: Vec<(usize, usize)> =
            (0..whole.len()).filter(|&t| whole[t]).map(|t| (tile_rows.start + t / per_row, t % per_row)).collect();
        let gelu = job.act == Activation::Gelu;
        if let (false, Some(winograd)) = (tiles.is_empty(), self.winograd()) {
            let band =
                TileBand { input: job.input, size: (h, w), first_row: tile_rows.start, slots: &slots, add, gelu };
            winograd.tiles(&self.bias, &band, &tiles, data);
        }
        let (mut rest, mut rest_rows) = (Vec::new(), Vec::new());
        for (offset, &slot) in slots.iter().enumerate() {
            if slot != NO_ROW && !whole[offset / w / M * per_row + (offset % w) / M] {
                rest.push((base + offset) as u32);
                rest_rows.push(slot);
            }
        }
        if !rest.is_empty() {
            self.tile(job.input, h, w, Positions::List(&rest), Rows { data, at: Some((&rest_rows, 0)), add, gelu });
        }
    }

    /// From a model's framework weight `[co, ci, ky, kx]` and bias `[co]`. A model's convs serve
    /// every call, so their Winograd form, where they suit it, is built here once; the weight
    /// selections of a call (`select_outputs`, `select_inputs`) build theirs only when the
    /// call has positions enough to pay for it.
    pub fn from_oihw(
        weight: &[f32],
        bias: &[f32],
        cout: usize,
        cin: usize,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> Self {
        let mut w = vec![0.0; k * k * cin * cout];
        for co in 0..cout {
            for ci in 0..cin {
                for ky in 0..k {
                    for kx in 0..k {
                        w[((ky * k + kx) * cin + ci) * cout + co] = weight[((co * cin + ci) * k + ky) * k + kx];
                    }
                }
            }
        }
        let conv = Conv::new(k, stride, pad, cin, cout, w, bias.to_vec());
        conv.winograd();
        conv
    }

    pub fn out_size(&self, h: usize, w: usize) -> (usize, usize) {
        ((h + 2 * self.pad - self.k) / self.stride + 1, (w + 2 * self.pad - self.k) / self.stride + 1)
    }

    /// Keeps only the output units `units` (columns of the weight).
    pub fn select_outputs(&self, units: &[usize]) -> Conv {
        let rows = self.k * self.k * self.cin;
        let mut weight = Vec::with_capacity(rows * units.len());
        for r in 0..rows {
            weight.extend(units.iter().map(|&u| self.weight[r * self.cout + u]));
        }
        let bias = units.iter().map(|&u| self.bias[u]).collect();
        Conv::new(self.k, self.stride, self.pad, self.cin, units.len(), weight, bias)
    }

    /// Keeps only the input channels `channels` (rows of the weight); the input then holds only those.
    pub fn select_inputs(&self, channels: &[usize]) -> Conv {
        let mut weight = Vec::with_capacity(self.k * self.k * channels.len() * self.cout);
        for tap in 0..self.k * self.k {
            for &c in channels {
                let row = (tap * self.cin + c) * self.cout;
                weight.extend_from_slice(&self.weight[row..row + self.cout]);
            }
        }
        let (k, stride, pad, cout) = (self.k, self.stride, self.pad, self.cout);
        Conv::new(k, stride, pad, channels.len(), cout, weight, self.bias.clone())
    }

    /// Multiply-accumulates per output position.
    pub fn macs_per_position(&self) -> u64 {
        (self.k * self.k * self.cin * self.cout) as u64
    }

    /// Output rows `[positions.len(), cout]` for one sample's input `[h, w, cin]` into `out`,
    /// tile after tile on the calling thread (for work that is one of many parallel tasks
    /// already), through GELU with `act`.
    pub(crate) fn rows_into(
        &self,
        input: &[f32],
        (h, w): (usize, usize),
        positions: Positions<'_>,
        out: &mut [f32],
        act: Activation,
    ) {
        assert_eq!(out.len(), positions.len() * self.cout, "conv output rows do not match the positions");
        for (t, chunk) in out.chunks_mut(TILE * self.cout).enumerate() {
            let start = t * TILE;
            let positions = positions.slice(start, start + chunk.len() / self.cout);
            self.tile(
                input,
                h,
                w,
                positions,
                Rows { data: chunk, at: None, add: false, gelu: act == Activation::Gelu },
            );
        }
    }

    /// Output rows `[positions.len(), cout]` for one sample's input `[h, w, cin]`, one tile: each
    /// position's window is read in place, `k` runs of `k * cin` contiguous floats one input row
    /// apart (see `fma`); only windows that reach past the map's edge are copied, zero-filled,
    /// into a per-thread buffer. `out` says where the rows go and whether GELU follows.
    fn tile(&self, input: &[f32], h: usize, w: usize, positions: Positions<'_>, out: Rows<'_>) {
        let (_, wo) = self.out_size(h, w);
        let (k, cin, pad) = (self.k, self.cin, self.pad);
        let (len, row) = (k * cin, w * cin);
        // The window of an output position whose taps all lie inside the map starts here.
        let inside = |oy: usize, ox: usize| -> Option<usize> {
            let (y0, x0) = ((oy * self.stride).checked_sub(pad)?, (ox * self.stride).checked_sub(pad)?);
            (y0 + k <= h && x0 + k <= w).then_some((y0 * w + x0) * cin)
        };
        EDGE_WINDOWS.with_borrow_mut(|edge| {
            // Room for one full window per position; every float used is written below.
            let room = positions.len() * k * len;
            if edge.len() < room {
                edge.resize(room, 0.0);
            }
            let mut free = &mut edge[..];
            let mut windows = Vec::with_capacity(positions.len());
            let mut last: Option<(usize, usize, usize)> = None;
            for p in 0..positions.len() {
                let pos = positions.get(p);
                // Dense tiles are runs of positions: step to the next one without dividing.
                let (oy, ox) = match last {
                    Some((prev, y, x)) if pos == prev + 1 && x + 1 < wo => (y, x + 1),
                    _ => (pos / wo, pos % wo),
                };
                last = Some((pos, oy, ox));
                if let Some(at) = inside(oy, ox) {
                    windows.push(Window { data: &input[at..at + (k - 1) * row + len], stride: row });
                    continue;
                }
                let (copy, rest) = std::mem::take(&mut free).split_at_mut(k * len);
                free = rest;
                for (ky, copy_row) in copy.chunks_exact_mut(len).enumerate() {
                    let iy = (oy * self.stride + ky).checked_sub(pad).filter(|&iy| iy < h);
                    for (kx, tap) in copy_row.chunks_exact_mut(cin).enumerate() {
                        let ix = (ox * self.stride + kx).checked_sub(pad).filter(|&ix| ix < w);
                        match (iy, ix) {
                            (Some(iy), Some(ix)) => tap.copy_from_slice(&input[(iy * w + ix) * cin..][..cin]),
                            _ => tap.fill(0.0),
                        }
                    }
                }
                windows.push(Window { data: copy, stride: len });
            }
            windows_times_weights(&self.packed, &windows, k, len, out);
        });
    }
}

thread_local! {
    /// Zero-filled copies of the current tile's edge windows, reused across tiles and calls.
    static EDGE_WINDOWS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// What follows a convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    None,
    Gelu,
}

/// Output positions of a convolution: a range of flat `y * wo + x` indices, or a list of them.
#[derive(Debug, Clone, Copy)]
pub enum Positions<'a> {
    Range(usize, usize),
    List(&'a [u32]),
}

impl Positions<'_> {
    /// Every output position of an `h x w` output, in order.
    pub fn all(h: usize, w: usize) -> Positions<'static> {
        Positions::Range(0, h * w)
    }

    pub fn len(&self) -> usize {
        match self {
            Positions::Range(a, b) => b - a,
            Positions::List(l) => l.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `i`-th position.
    pub fn get(&self, i: usize) -> usize {
        match self {
            Positions::Range(a, _) => a + i,
            Positions::List(l) => l[i] as usize,
        }
    }

    fn slice(&self, start: usize, end: usize) -> Positions<'_> {
        match self {
            Positions::Range(a, _) => Positions::Range(a + start, a + end),
            Positions::List(l) => Positions::List(&l[start..end]),
        }
    }

    /// The indices `i0..i1` of the positions in `lo..hi` (the positions ascending).
    fn indices_within(&self, lo: usize, hi: usize) -> (usize, usize) {
        match self {
            Positions::Range(a, b) => (lo.clamp(*a, *b) - a, hi.clamp(*a, *b) - a),
            Positions::List(l) => {
                (l.partition_point(|&p| (p as usize) < lo), l.partition_point(|&p| (p as usize) < hi))
            }
        }
    }
}

/// One sample's convolution: its input `[h, w, cin]`, the output positions to compute and the
/// activation applied to the results.
pub struct Job<'a> {
    pub conv: &'a Conv,
    pub input: &'a [f32],
    pub h: usize,
    pub w: usize,
    pub positions: Positions<'a>,
    pub act: Activation,
}

/// One parallel task of a set of jobs.
enum Task<'a> {
    /// `positions` of `job` through the direct kernel into `rows` (see `Conv::tile`).
    Direct { job: &'a Job<'a>, positions: Positions<'a>, rows: Rows<'a> },
    /// Tile rows `tile_rows` of `job` (see `Conv::tile_band`).
    TileBand {
        job: &'a Job<'a>,
        tile_rows: std::ops::Range<usize>,
        positions: Positions<'a>,
        data: &'a mut [f32],
        first: Option<usize>,
        add: bool,
    },
}

impl Task<'_> {
    fn run(self) {
        match self {
            Task::Direct { job, positions, rows } => job.conv.tile(job.input, job.h, job.w, positions, rows),
            Task::TileBand { job, tile_rows, positions, data, first, add } => {
                job.conv.tile_band(job, tile_rows, positions, data, (first, add))
            }
        }
    }
}

/// Positions per band task at least, in whole tiles' worth (a band is one tile row of a wide
/// dense map, several of a narrow or sparse one: enough rows per matrix product to fill the
/// kernel's register blocks).
const BAND_TILES: usize = 32;

/// A Winograd job's tasks, one per band of tile rows with positions: `out` holds the job's rows
/// as a map (`map`: one row per output position) or compactly (one row per position of the
/// job).
fn tile_band_tasks<'a>(job: &'a Job<'a>, out: &'a mut [f32], map: bool, add: bool, tasks: &mut Vec<Task<'a>>) {
    let (cout, w) = (job.conv.cout, job.w);
    let tile_rows = job.h.div_ceil(M);
    let output_row = |ty: usize| (M * ty).min(job.h) * w;
    let mut rest = out;
    let mut taken = 0;
    let mut band_start = 0;
    while band_start < tile_rows {
        // Tile rows until the band holds enough positions.
        let mut band_end = band_start + 1;
        while band_end < tile_rows {
            let (i0, i1) = job.positions.indices_within(output_row(band_start), output_row(band_end));
            if i1 - i0 >= BAND_TILES * M * M {
                break;
            }
            band_end += 1;
        }
        let (lo, hi) = (output_row(band_start), output_row(band_end));
        let (i0, i1) = job.positions.indices_within(lo, hi);
        let (start, end) = if map { (lo, hi) } else { (i0, i1) };
        let (_, tail) = std::mem::take(&mut rest).split_at_mut((start - taken) * cout);
        let (data, tail) = tail.split_at_mut((end - start) * cout);
        rest = tail;
        taken = end;
        if i1 > i0 {
            let positions = job.positions.slice(i0, i1);
            let tile_rows = band_start..band_end;
            tasks.push(Task::TileBand { job, tile_rows, positions, data, first: map.then_some(lo), add });
        }
        band_start = band_end;
    }
}

/// Runs every job tile by tile, all tiles of all jobs in parallel; `outputs[j]` (sized
/// `positions x cout`) receives job j's rows.
pub fn run_jobs(jobs: &[Job<'_>], outputs: &mut [Vec<f32>]) {
    let mut tasks = Vec::new();
    for (job, out) in jobs.iter().zip(outputs.iter_mut()) {
        debug_assert_eq!(out.len(), job.positions.len() * job.conv.cout);
        if job.conv.takes_winograd(job.positions, positions_of(job.conv, jobs)) {
            tile_band_tasks(job, out, false, false, &mut tasks);
            continue;
        }
        let gelu = job.act == Activation::Gelu;
        for (t, data) in out.chunks_mut(TILE * job.conv.cout).enumerate() {
            let start = t * TILE;
            let positions = job.positions.slice(start, start + data.len() / job.conv.cout);
            tasks.push(Task::Direct { job, positions, rows: Rows { data, at: None, add: false, gelu } });
        }
    }
    tasks.into_par_iter().for_each(Task::run);
}

/// Runs every job tile by tile, all tiles of all jobs in parallel, writing job j's row of each
/// position straight into the map `maps[j]` (`[positions of the output, cout]`) at that
/// position, or adding it there with `add`; the map's other rows are left as they are. Job
/// positions must be ascending (a list, or a range).
pub fn run_jobs_into_maps(jobs: &[Job<'_>], maps: &mut [Vec<f32>], add: bool) {
    let mut tasks = Vec::new();
    for (job, map) in jobs.iter().zip(maps.iter_mut()) {
        if job.conv.takes_winograd(job.positions, positions_of(job.conv, jobs)) {
            tile_band_tasks(job, map, true, add, &mut tasks);
            continue;
        }
        let cout = job.conv.cout;
        let gelu = job.act == Activation::Gelu;
        // Tiles of ascending positions own disjoint, ascending ranges of map rows.
        let mut rest = &mut map[..];
        let mut first_free = 0;
        for start in (0..job.positions.len()).step_by(TILE) {
            let positions = job.positions.slice(start, (start + TILE).min(job.positions.len()));
            let (first, last) = (positions.get(0), positions.get(positions.len() - 1));
            let (_, tail) = std::mem::take(&mut rest).split_at_mut((first - first_free) * cout);
            let (data, tail) = tail.split_at_mut((last + 1 - first) * cout);
            rest = tail;
            first_free = last + 1;
            let at = match positions {
                Positions::Range(..) => None,
                Positions::List(list) => Some((list, first)),
            };
            tasks.push(Task::Direct { job, positions, rows: Rows { data, at, add, gelu } });
        }
    }
    tasks.into_par_iter().for_each(Task::run);
}

/// Runs one convolution per sample (`conv(b)` at `positions(b)` of `inputs[b]`, each `[h, w, cin]`)
/// and returns each sample's rows `[positions, cout]`.
pub fn run_per_sample<'c, 'p>(
    inputs: &[impl AsRef<[f32]>],
    (h, w): (usize, usize),
    conv: impl Fn(usize) -> &'c Conv,
    positions: impl Fn(usize) -> Positions<'p>,
    act: Activation,
) -> Vec<Vec<f32>> {
    let jobs: Vec<Job<'_>> = inputs
        .iter()
        .enumerate()
        .map(|(b, input)| Job { conv: conv(b), input: input.as_ref(), h, w, positions: positions(b), act })
        .collect();
    // Every output float is written by its tile, so stale buffer contents never show.
    let mut outputs: Vec<Vec<f32>> = jobs.iter().map(|j| map_buffer(j.positions.len() * j.conv.cout)).collect();
    run_jobs(&jobs, &mut outputs);
    outputs
}

/// Adds the rows of a transposed convolution with kernel = stride `st` computed as a 1x1 conv
/// (`[h2 * w2, st * st * c]`, taps `(ky, kx)` outer, channels inner) into the `[h, w, c]` map
/// `out` at the pixels they produce, cropped to `h x w`. Adding in place (the decoders add a
/// skip map there anyway) spares a full-resolution intermediate map.
pub fn depth_to_space_add(rows: &[f32], (h2, w2): (usize, usize), st: usize, (h, w): (usize, usize), out: &mut [f32]) {
    let c = rows.len() / (h2 * w2 * st * st);
    debug_assert_eq!(out.len(), h * w * c);
    for p in 0..h2 * w2 {
        let (y, x) = (p / w2, p % w2);
        for ky in 0..st {
            for kx in 0..st {
                let (oy, ox) = (y * st + ky, x * st + kx);
                if oy < h && ox < w {
                    let src = &rows[(p * st * st + ky * st + kx) * c..][..c];
                    let dst = &mut out[(oy * w + ox) * c..][..c];
                    dst.iter_mut().zip(src).for_each(|(a, b)| *a += b);
                }
            }
        }
    }
}

/// `maps[i] += depth_to_space(act(up(inputs[i])))` for a transposed convolution whose kernel
/// equals its stride `st`, held as the 1x1 conv `up` (see `depth_to_space_add`): one
/// low-resolution row at a time, rows of all maps in parallel, so the upsampled rows never exist
/// as a whole map (at 384x384 that map is 19 MB, written and read back once per forward).
pub fn add_upsampled(
    up: &Conv,
    inputs: &[Vec<f32>],
    (h2, w2): (usize, usize),
    st: usize,
    (h, w): (usize, usize),
    act: Activation,
    maps: &mut [Vec<f32>],
) {
    let c = up.cout / (st * st);
    debug_assert!(maps.iter().all(|m| m.len() == h * w * c) && h.div_ceil(st) <= h2);
    let rows: Vec<(&Vec<f32>, usize, &mut [f32])> = inputs
        .iter()
        .zip(maps.iter_mut())
        .flat_map(|(input, map)| map.chunks_mut(st * w * c).enumerate().map(move |(y, dst)| (input, y, dst)))
        .collect();
    rows.into_par_iter().filter(|(_, y, _)| *y < h2).for_each(|(input, y, dst)| {
        // One row's tiles run here in turn: the rows already keep every thread busy.
        let mut out = map_buffer(w2 * up.cout);
        up.rows_into(input, (h2, w2), Positions::Range(y * w2, (y + 1) * w2), &mut out, act);
        depth_to_space_add(&out, (1, w2), st, (dst.len() / (w * c), w), dst);
        recycle(out);
    });
}

/// `dst[j * rows + i] = src[i * cols + j]`: the row-major `rows x cols` matrix `src` transposed,
/// in parallel blocks that keep reads and writes in cache (a plain loop over one side strides
/// through megabytes on the other at 384x384): blocks of 64 columns, or with fewer columns
/// (a prediction's few output channels), blocks of rows across all of them.
pub fn transpose_into(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    const BLOCK: usize = 64;
    const ROW_BLOCK: usize = 4096;
    assert!(src.len() >= rows * cols && dst.len() >= rows * cols, "transpose operand too short");
    if rows == 0 || cols == 0 {
        return;
    }
    if cols < BLOCK {
        // Per block of rows, its segment of every column's output row.
        let mut blocks: Vec<Vec<&mut [f32]>> = (0..rows.div_ceil(ROW_BLOCK)).map(|_| Vec::new()).collect();
        for plane in dst[..rows * cols].chunks_mut(rows) {
            for (block, segment) in blocks.iter_mut().zip(plane.chunks_mut(ROW_BLOCK)) {
                block.push(segment);
            }
        }
        blocks.into_par_iter().enumerate().for_each(|(b, mut segments)| {
            let i0 = b * ROW_BLOCK;
            let n = segments[0].len();
            for (k, row) in src[i0 * cols..(i0 + n) * cols].chunks_exact(cols).enumerate() {
                for (segment, &v) in segments.iter_mut().zip(row) {
                    segment[k] = v;
                }
            }
        });
        return;
    }
    dst[..rows * cols].par_chunks_mut(BLOCK * rows).enumerate().for_each(|(b, block)| {
        let j0 = b * BLOCK;
        let j1 = j0 + block.len() / rows;
        for i in 0..rows {
            for (j, &v) in (j0..j1).zip(&src[i * cols + j0..i * cols + j1]) {
                block[(j - j0) * rows + i] = v;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pseudo;

    /// Direct convolution, the plain reference for the tiled kernel path.
    fn direct(conv: &Conv, input: &[f32], h: usize, w: usize) -> Vec<f32> {
        let (ho, wo) = conv.out_size(h, w);
        let mut out = vec![0.0; ho * wo * conv.cout];
        for oy in 0..ho {
            for ox in 0..wo {
                for co in 0..conv.cout {
                    let mut acc = conv.bias[co];
                    for ky in 0..conv.k {
                        for kx in 0..conv.k {
                            let iy = (oy * conv.stride + ky) as isize - conv.pad as isize;
                            let ix = (ox * conv.stride + kx) as isize - conv.pad as isize;
                            if iy < 0 || ix < 0 || iy as usize >= h || ix as usize >= w {
                                continue;
                            }
                            for ci in 0..conv.cin {
                                acc += input[(iy as usize * w + ix as usize) * conv.cin + ci]
                                    * conv.weight[((ky * conv.k + kx) * conv.cin + ci) * conv.cout + co];
                            }
                        }
                    }
                    out[(oy * wo + ox) * conv.cout + co] = acc;
                }
            }
        }
        out
    }

    #[test]
    fn tiled_conv_matches_direct_conv() {
        // Output widths of one partial vector, three vectors less four lanes (20 kept units of
        // 64) and two chunks; windows crossing every edge; stride 2; 1x1.
        let shapes = [(3, 1, 1, 9, 7), (3, 2, 1, 9, 7), (1, 1, 0, 5, 3)];
        for ((k, stride, pad, h, w), cout) in shapes.into_iter().flat_map(|s| [6, 20, 40].map(|c| (s, c))) {
            let cin = 5;
            let oihw = pseudo(cout * cin * k * k, 3);
            let conv = Conv::from_oihw(&oihw, &pseudo(cout, 9), cout, cin, k, stride, pad);
            let input = pseudo(h * w * cin, 7);
            let (ho, wo) = conv.out_size(h, w);
            let mut out = vec![vec![0.0; ho * wo * cout]];
            let job =
                Job { conv: &conv, input: &input, h, w, positions: Positions::all(ho, wo), act: Activation::None };
            run_jobs(&[job], &mut out);
            let reference = direct(&conv, &input, h, w);
            for (a, b) in out[0].iter().zip(&reference) {
                assert!((a - b).abs() < 1e-4, "{a} vs {b}");
            }
            // A list of positions gives the same rows.
            let list: Vec<u32> = (0..(ho * wo) as u32).rev().step_by(3).collect();
            let mut rows = vec![vec![0.0; list.len() * cout]];
            run_jobs(
                &[Job { conv: &conv, input: &input, h, w, positions: Positions::List(&list), act: Activation::None }],
                &mut rows,
            );
            for (i, &p) in list.iter().enumerate() {
                let p = p as usize;
                assert_eq!(&rows[0][i * cout..(i + 1) * cout], &out[0][p * cout..(p + 1) * cout]);
            }
        }
    }

    #[test]
    fn winograd_tiles_match_the_direct_convolution() {
        use crate::activation::gelu_in_place;
        // Odd and even map sides (partial edge tiles), channel counts off the 8-lane transforms
        // and the 32-output chunks, dense maps and lists of kept positions with whole and
        // partial tiles.
        for ((h, w), cin, cout) in [((65, 45), 20, 36), ((64, 40), 16, 40), ((58, 47), 24, 23)] {
            let conv = Conv::from_oihw(&pseudo(cout * cin * 9, 3), &pseudo(cout, 4), cout, cin, 3, 1, 1);
            let input = pseudo(h * w * cin, 8);
            let reference = direct(&conv, &input, h, w);
            let close = |got: &[f32], want: &[f32], what: &str| {
                for (i, (a, b)) in got.iter().zip(want).enumerate() {
                    assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{h}x{w} {cin}->{cout} {what}, {i}: {a} vs {b}");
                }
            };
            // Every position, through GELU.
            assert!(conv.takes_winograd(Positions::all(h, w), h * w));
            for act in [Activation::None, Activation::Gelu] {
                let mut out = vec![vec![f32::NAN; h * w * cout]];
                run_jobs(&[Job { conv: &conv, input: &input, h, w, positions: Positions::all(h, w), act }], &mut out);
                let mut want = reference.clone();
                if act == Activation::Gelu {
                    want.iter_mut().for_each(gelu_in_place);
                }
                close(&out[0], &want, "all positions");
            }
            // 4x4 patches in a checkerboard plus single positions off it: whole and partial tiles.
            let list: Vec<u32> =
                (0..h * w).filter(|&p| ((p / w) / 4 + (p % w) / 4) % 2 == 0 || p % 7 == 3).map(|p| p as u32).collect();
            let kept = Positions::List(&list);
            assert!(conv.takes_winograd(kept, list.len()));
            let mut rows = vec![vec![f32::NAN; list.len() * cout]];
            run_jobs(&[Job { conv: &conv, input: &input, h, w, positions: kept, act: Activation::None }], &mut rows);
            let want: Vec<f32> =
                list.iter().flat_map(|&p| reference[p as usize * cout..(p as usize + 1) * cout].to_vec()).collect();
            close(&rows[0], &want, "listed rows");
            // The same list added into a map: the other rows untouched.
            let mut maps = vec![pseudo(h * w * cout, 12)];
            let before = maps[0].clone();
            run_jobs_into_maps(
                &[Job { conv: &conv, input: &input, h, w, positions: kept, act: Activation::None }],
                &mut maps,
                true,
            );
            let mut want = before.clone();
            for &p in &list {
                let p = p as usize;
                want[p * cout..(p + 1) * cout].iter_mut().zip(&reference[p * cout..]).for_each(|(a, r)| *a += r);
            }
            close(&maps[0], &want, "rows added into a map");
        }
    }

    #[test]
    fn depth_to_space_adds_each_tap_at_its_pixel() {
        // 2x2 input cells, stride 2, 1 channel, cropped to 3x4.
        let rows: Vec<f32> = (0..16).map(|v| v as f32).collect();
        let mut out = vec![100.0; 3 * 4];
        depth_to_space_add(&rows, (2, 2), 2, (3, 4), &mut out);
        // cell p = (y, x) holds taps (ky, kx) at rows[p * 4 + ky * 2 + kx] -> pixel (2y + ky, 2x + kx).
        let expected = [100., 101., 104., 105., 102., 103., 106., 107., 108., 109., 112., 113.];
        assert_eq!(out, expected);
    }

    #[test]
    fn blocked_transpose_matches_the_definition() {
        for (rows, cols) in [(1, 1), (3, 130), (130, 3), (8, 64), (65, 129), (9000, 8), (8192, 1)] {
            let src = pseudo(rows * cols, 11);
            let mut dst = vec![0.0; rows * cols];
            transpose_into(&src, rows, cols, &mut dst);
            for i in 0..rows {
                for j in 0..cols {
                    assert_eq!(dst[j * rows + i], src[i * cols + j]);
                }
            }
        }
    }

    #[test]
    fn selecting_units_and_inputs_matches_the_full_conv() {
        let (cin, cout, h, w) = (4, 5, 6, 6);
        let conv = Conv::from_oihw(&pseudo(cout * cin * 9, 1), &pseudo(cout, 2), cout, cin, 3, 1, 1);
        let input = pseudo(h * w * cin, 5);
        let full = direct(&conv, &input, h, w);
        let outs = [1usize, 3];
        let sub = direct(&conv.select_outputs(&outs), &input, h, w);
        for p in 0..h * w {
            for (j, &u) in outs.iter().enumerate() {
                assert_eq!(sub[p * 2 + j], full[p * cout + u]);
            }
        }
        // Zeroing input channels 0 and 2 equals dropping them.
        let keep = [1usize, 3];
        let mut zeroed = input.clone();
        let mut compact = Vec::new();
        for p in 0..h * w {
            for c in 0..cin {
                if !keep.contains(&c) {
                    zeroed[p * cin + c] = 0.0;
                }
            }
            compact.extend(keep.iter().map(|&c| input[p * cin + c]));
        }
        let a = direct(&conv, &zeroed, h, w);
        let b = direct(&conv.select_inputs(&keep), &compact, h, w);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5);
        }
    }
}
