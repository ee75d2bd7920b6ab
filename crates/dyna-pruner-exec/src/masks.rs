//! The method at inference on plain slices: mask generator (importance S), DataMask (top-k or
//! thresholded patches) and unit gates (top-k units), mirroring the trainer's `method` module.

use dyna_pruner_spec::{kept_count, stats_per_channel, top_k, PatchRule};
use rayon::prelude::*;

use crate::activation::sigmoid;
use crate::kernels::{run_jobs, Activation, Conv, Job, Positions};
use crate::plan::{MaskPlan, SampleMasks};

/// The mask generator: per-patch statistics -> 3x3 conv -> GELU -> 3x3 conv -> GELU -> 1x1 -> sigmoid.
#[derive(Debug, Clone)]
pub struct MaskGenerator {
    pub conv1: Conv,
    pub conv2: Conv,
    pub head: Conv,
    pub patch: usize,
    pub channels: usize,
    /// Also the signed mean temporal difference per patch (the trainer's `motion`).
    pub motion: bool,
    /// A budget-conditioned generator's keep-ratio inputs, set from the executor's masking
    /// (`Exec::set_masking`); empty otherwise.
    pub budget: Vec<f32>,
}

impl MaskGenerator {
    /// Importance S `[hp * wp]` of one sample from its input `[t, c, h, w]`.
    pub fn importance(&self, x: &[f32], t: usize, h: usize, w: usize) -> (Vec<f32>, usize, usize) {
        let (c, p) = (self.channels, self.patch);
        let (hp, wp) = (h.div_ceil(p), w.div_ceil(p));
        let frame = c * h * w;
        let last = &x[(t - 1) * frame..t * frame];
        let prev = (t > 1).then(|| &x[(t - 2) * frame..(t - 1) * frame]);
        let per_cell = stats_per_channel(self.motion) * c + self.budget.len();
        let mut stats = vec![0.0f32; hp * wp * per_cell];
        // Rows of patches in parallel (one sample's statistics read its whole last two frames).
        stats.par_chunks_mut(wp * per_cell).enumerate().for_each(|(py, stats_row)| {
            for px in 0..wp {
                let cell = &mut stats_row[px * per_cell..(px + 1) * per_cell];
                for ch in 0..c {
                    let (mut sum, mut max, mut n) = (0.0f32, f32::NEG_INFINITY, 0usize);
                    let (mut abs_diff, mut diff) = (0.0f32, 0.0f32);
                    for y in py * p..((py + 1) * p).min(h) {
                        for xx in px * p..((px + 1) * p).min(w) {
                            let i = (ch * h + y) * w + xx;
                            sum += last[i];
                            max = max.max(last[i]);
                            let d = prev.map_or(0.0, |pr| last[i] - pr[i]);
                            abs_diff += d.abs();
                            diff += d;
                            n += 1;
                        }
                    }
                    cell[ch] = sum / n as f32;
                    cell[c + ch] = max;
                    cell[2 * c + ch] = abs_diff / n as f32;
                    if self.motion {
                        cell[3 * c + ch] = diff / n as f32;
                    }
                }
                cell[per_cell - self.budget.len()..].copy_from_slice(&self.budget);
            }
        });
        let conv = |conv: &Conv, input: &[f32], act: Activation| {
            let mut out = vec![vec![0.0; hp * wp * conv.cout]];
            run_jobs(&[Job { conv, input, h: hp, w: wp, positions: Positions::all(hp, wp), act }], &mut out);
            out.pop().expect("one job")
        };
        let hidden = conv(&self.conv2, &conv(&self.conv1, &stats, Activation::Gelu), Activation::Gelu);
        let logits = conv(&self.head, &hidden, Activation::None);
        (logits.into_iter().map(sigmoid).collect(), hp, wp)
    }

    /// MACs per sample, counted as the trainer's `MaskGenerator::macs`.
    pub fn macs(&self, h: usize, w: usize) -> u64 {
        let cells = (h.div_ceil(self.patch) * w.div_ceil(self.patch)) as u64;
        ((stats_per_channel(self.motion) + 1) * self.channels * h * w) as u64
            + cells * (self.conv1.macs_per_position() + self.conv2.macs_per_position() + self.head.macs_per_position())
    }
}

/// ModelMask gate of one layer: `sigmoid([z; mean S; keep] W + b)` with `z = sum(S f) / sum(S)`
/// and `keep` a budget-conditioned model's keep ratios.
#[derive(Debug, Clone)]
pub struct UnitGate {
    /// `[cin + 1 + budget.len(), units]` row-major.
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub cin: usize,
    pub units: usize,
    /// The keep-ratio inputs, as the generator's `budget`.
    pub budget: Vec<f32>,
}

impl UnitGate {
    /// Unit scores from a layer input `[pixels, cin]` and S resized to it (`s_at(pixel)`).
    pub fn scores(&self, features: &[f32], pixels: usize, s_at: impl Fn(usize) -> f32) -> Vec<f32> {
        let mut z = vec![0.0f32; self.cin];
        let mut mass = 0.0f32;
        for p in 0..pixels {
            let s = s_at(p);
            mass += s;
            for (zc, f) in z.iter_mut().zip(&features[p * self.cin..(p + 1) * self.cin]) {
                *zc += s * f;
            }
        }
        self.scores_pooled(&Pooled { weighted: z, mass }, pixels)
    }

    /// Unit scores from a layer input pooled over its `pixels`.
    pub fn scores_pooled(&self, pooled: &Pooled, pixels: usize) -> Vec<f32> {
        let mut z: Vec<f32> = pooled.weighted.iter().map(|v| v / (pooled.mass + 1e-6)).collect();
        z.push(pooled.mass / pixels as f32);
        z.extend(&self.budget);
        let mut logits = self.bias.clone();
        for (i, zi) in z.iter().enumerate() {
            for (l, wv) in logits.iter_mut().zip(&self.weight[i * self.units..(i + 1) * self.units]) {
                *l += zi * wv;
            }
        }
        logits.into_iter().map(sigmoid).collect()
    }

    pub fn macs(&self, pixels: usize) -> u64 {
        (pixels * self.cin + (self.cin + 1 + self.budget.len()) * self.units) as u64
    }
}

/// A gate's input pooled over a layer input's pixels: `sum(S f)` per channel and `sum(S)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Pooled {
    pub weighted: Vec<f32>,
    pub mass: f32,
}

/// Pools a layer input `[h, w, cin]` whose S is constant on `cell x cell` squares
/// (`importance`, `wp` squares per row): each square's features are summed first and weighted
/// once, rows of squares in parallel.
pub fn pool_by_patch(
    features: &[f32],
    cin: usize,
    (h, w, cell, wp): (usize, usize, usize, usize),
    importance: &[f32],
) -> Pooled {
    let weighted = (0..h.div_ceil(cell))
        .into_par_iter()
        .map(|py| {
            let mut z = vec![0.0f32; cin];
            let mut square = vec![0.0f32; cin];
            for px in 0..w.div_ceil(cell) {
                square.fill(0.0);
                let xs = px * cell..((px + 1) * cell).min(w);
                for y in py * cell..((py + 1) * cell).min(h) {
                    for f in features[(y * w + xs.start) * cin..(y * w + xs.end) * cin].chunks_exact(cin) {
                        square.iter_mut().zip(f).for_each(|(a, f)| *a += f);
                    }
                }
                let s = importance[py * wp + px];
                z.iter_mut().zip(&square).for_each(|(z, q)| *z += s * q);
            }
            z
        })
        .reduce(|| vec![0.0f32; cin], sum_vectors);
    Pooled { weighted, mass: importance_mass((h, w, cell, wp), importance) }
}

/// Element-wise sum, for reducing partial pooled sums.
pub(crate) fn sum_vectors(mut a: Vec<f32>, b: Vec<f32>) -> Vec<f32> {
    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
    a
}

/// `sum(S)` over the pixels of an `h x w` map whose S is constant on `cell x cell` squares
/// (`importance`, `wp` squares per row; the last row and column of squares may be cut short).
pub fn importance_mass((h, w, cell, wp): (usize, usize, usize, usize), importance: &[f32]) -> f32 {
    let side = |i: usize, n: usize| (((i + 1) * cell).min(n) - i * cell) as f32;
    let mut mass = 0.0f32;
    for py in 0..h.div_ceil(cell) {
        for px in 0..w.div_ceil(cell) {
            mass += importance[py * wp + px] * side(py, h) * side(px, w);
        }
    }
    mass
}

/// The masks a plan starts from, before any layer: none (`Dense`), the given ones, or the model's
/// own DataMask (`Dynamic`: kept patches by `data_rule`, all when `None`; unit lists are added
/// layer by layer) with each sample's importance map, adding the generator's MACs to `macs`.
pub fn plan_masks(
    plan: MaskPlan<'_>,
    generator: &MaskGenerator,
    x: &[f32],
    (batch, per_sample): (usize, usize),
    (t, h, w): (usize, usize, usize),
    data_rule: Option<PatchRule>,
    macs: &mut [u64],
) -> (Vec<SampleMasks>, Vec<Vec<f32>>) {
    match plan {
        MaskPlan::Dense => (Vec::new(), Vec::new()),
        MaskPlan::Given(m) => (m.to_vec(), Vec::new()),
        MaskPlan::Dynamic => {
            macs.iter_mut().for_each(|m| *m += generator.macs(h, w));
            sample_patches(generator, x, (batch, per_sample), (t, h, w), data_rule)
                .into_iter()
                .map(|(sc, patches)| (SampleMasks { patches, units: Vec::new() }, sc))
                .unzip()
        }
    }
}

/// The DataMask of a batch `x` (`per_sample` values each, `[t, c, h, w]`): per sample the
/// importance S and the kept patches by `data_rule` (all patches when `None`).
fn sample_patches(
    generator: &MaskGenerator,
    x: &[f32],
    (batch, per_sample): (usize, usize),
    (t, h, w): (usize, usize, usize),
    data_rule: Option<PatchRule>,
) -> Vec<(Vec<f32>, Vec<usize>)> {
    (0..batch)
        .into_par_iter()
        .map(|b| {
            let (sc, hp, wp) = generator.importance(&x[b * per_sample..(b + 1) * per_sample], t, h, w);
            let patches = match data_rule {
                Some(rule) => rule.select(&sc),
                None => (0..hp * wp).collect(),
            };
            (sc, patches)
        })
        .collect()
}

/// The positions of an `h2 x w2` feature map covered by `patches` (of a grid `wp` patches wide,
/// each `cell x cell` feature pixels), ascending; `None` when they cover the whole map.
pub fn kept_positions(patches: &[usize], wp: usize, cell: usize, (h2, w2): (usize, usize)) -> Option<Vec<u32>> {
    let mut pos = Vec::new();
    for &patch in patches {
        let (py, px) = (patch / wp, patch % wp);
        for y in py * cell..((py + 1) * cell).min(h2) {
            for x in px * cell..((px + 1) * cell).min(w2) {
                pos.push((y * w2 + x) as u32);
            }
        }
    }
    pos.sort_unstable();
    (pos.len() < h2 * w2).then_some(pos)
}

/// Whether the 3x3 windows at `positions` read each row of an `h x w` map (the positions and
/// their neighbours inside the map).
pub fn window_rows(positions: &[u32], (h, w): (usize, usize)) -> Vec<bool> {
    let mut read = vec![false; h * w];
    for &p in positions {
        let (y, x) = (p as usize / w, p as usize % w);
        for ny in y.saturating_sub(1)..(y + 2).min(h) {
            read[ny * w + x.saturating_sub(1)..ny * w + (x + 2).min(w)].fill(true);
        }
    }
    read
}

/// The kept units of one layer for each of `batch` samples: top-k at `unit_keep` of the gate's
/// scores on each sample's pooled layer input (`pooled[b]`, over `pixels`); all units when
/// `None` (then `pooled` is not read).
pub fn gate_units(
    gate: &UnitGate,
    batch: usize,
    pooled: &[Pooled],
    pixels: usize,
    unit_keep: Option<f32>,
) -> Vec<Vec<usize>> {
    (0..batch)
        .into_par_iter()
        .map(|b| match unit_keep {
            None => (0..gate.units).collect(),
            Some(keep) => top_k(&gate.scores_pooled(&pooled[b], pixels), kept_count(keep, gate.units)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pseudo;

    #[test]
    fn window_rows_are_the_positions_and_their_neighbours_inside_the_map() {
        // A 4 x 5 map: a corner, an inner position and an edge one.
        let read = window_rows(&[0, 12, 19], (4, 5));
        let rows: Vec<usize> = (0..20).filter(|&p| read[p]).collect();
        assert_eq!(rows, [0, 1, 5, 6, 7, 8, 11, 12, 13, 14, 16, 17, 18, 19]);
        assert!(!window_rows(&[], (4, 5)).contains(&true));
    }

    #[test]
    fn gate_pooled_by_patch_matches_the_per_pixel_pooling() {
        // 7 x 10 map, 3 x 3 squares (the last row and column of squares cut short), 5 channels.
        let (h, w, cell, cin, units): (usize, usize, usize, usize, usize) = (7, 10, 3, 5, 4);
        let wp = w.div_ceil(cell) + 1; // a patch grid wider than the map's squares, as at stride 2
        let gate =
            UnitGate { weight: pseudo((cin + 1) * units, 1), bias: pseudo(units, 2), cin, units, budget: Vec::new() };
        let features = pseudo(h * w * cin, 3);
        let importance: Vec<f32> = pseudo(h.div_ceil(cell) * wp, 4).iter().map(|v| v.abs()).collect();
        let fast = gate.scores_pooled(&pool_by_patch(&features, cin, (h, w, cell, wp), &importance), h * w);
        let plain = gate.scores(&features, h * w, |p| importance[(p / w / cell) * wp + (p % w) / cell]);
        for (a, b) in fast.iter().zip(&plain) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
