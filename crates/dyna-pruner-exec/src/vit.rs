//! The dynamic ViT (see the trainer's `backbones/vit.rs`) on plain kernels: per sample, the kept
//! tokens are gathered once; each encoder layer runs attention over them with the kept heads'
//! slices of the weights only, and the MLP with the kept units only; the updates are scattered
//! back, dropped tokens reach the head unchanged. Samples run in parallel, and so do the heads
//! of a sample.

use dyna_pruner_spec::{kept_count, top_k, Architecture, Masking, VitSpec};
use rayon::prelude::*;

use crate::activation::gelu;
use crate::kernels::matmul;
use crate::masks::{MaskGenerator, UnitGate};
use crate::plan::{MaskPlan, Output, SampleMasks};
use crate::ExecError;

/// The fixed 2-D sine-cosine position code `[hp * wp, dim]` of the token grid: feature i of the
/// token at (r, c) is sin/cos of r or c (by `i % 4`) at frequency `10000^(-4 (i / 4) / dim)`.
pub fn position_encoding(hp: usize, wp: usize, dim: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(hp * wp * dim);
    for r in 0..hp {
        for c in 0..wp {
            for i in 0..dim {
                let freq = 10_000f64.powf(-4.0 * (i / 4) as f64 / dim as f64);
                let v = match i % 4 {
                    0 => (r as f64 * freq).sin(),
                    1 => (r as f64 * freq).cos(),
                    2 => (c as f64 * freq).sin(),
                    _ => (c as f64 * freq).cos(),
                };
                out.push(v as f32);
            }
        }
    }
    out
}

/// `y = x W + b` with `W` `[inputs, outputs]` row-major (the framework's layout).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub inputs: usize,
    pub outputs: usize,
}

impl Linear {
    /// `rows x inputs` -> `rows x outputs`, rows split into parallel tasks when many.
    fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut out = vec![0.0; rows * self.outputs];
        linear_into(&mut out, x, &self.weight, &self.bias, rows, self.inputs, self.outputs);
        out
    }

    /// The columns `cols` of the weight and bias (kept outputs).
    fn columns(&self, cols: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let mut w = Vec::with_capacity(self.inputs * cols.len());
        for i in 0..self.inputs {
            w.extend(cols.iter().map(|&c| self.weight[i * self.outputs + c]));
        }
        (w, cols.iter().map(|&c| self.bias[c]).collect())
    }

    /// The rows `rows` of the weight (kept inputs).
    fn rows(&self, rows: &[usize]) -> Vec<f32> {
        rows.iter().flat_map(|&r| self.weight[r * self.outputs..(r + 1) * self.outputs].iter().copied()).collect()
    }
}

/// Rows per parallel GEMM task.
const ROWS: usize = 64;

/// `out[rows x n] = x[rows x k] W[k x n] + b`.
fn linear_into(out: &mut [f32], x: &[f32], w: &[f32], b: &[f32], rows: usize, k: usize, n: usize) {
    out[..rows * n].par_chunks_mut(ROWS * n).enumerate().for_each(|(t, chunk)| {
        let r = chunk.len() / n;
        for row in chunk.chunks_mut(n) {
            row.copy_from_slice(b);
        }
        matmul(chunk, &x[t * ROWS * k..(t * ROWS + r) * k], w, r, k, n, true);
    });
}

/// Layer normalisation over the last dimension (biased variance, epsilon 1e-5, as the framework).
#[derive(Debug, Clone)]
pub struct Norm {
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
}

impl Norm {
    fn forward(&self, x: &[f32]) -> Vec<f32> {
        let d = self.gamma.len();
        let mut out = vec![0.0; x.len()];
        for (row, o) in x.chunks(d).zip(out.chunks_mut(d)) {
            let mean = row.iter().sum::<f32>() / d as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
            let inv = 1.0 / (var + 1e-5).sqrt();
            for i in 0..d {
                o[i] = (row[i] - mean) * inv * self.gamma[i] + self.beta[i];
            }
        }
        out
    }
}

/// One pre-norm encoder layer.
#[derive(Debug, Clone)]
pub struct Layer {
    pub norm1: Norm,
    pub qkv: Linear,
    pub proj: Linear,
    pub norm2: Norm,
    pub fc1: Linear,
    pub fc2: Linear,
}

/// A ViT ready to run.
#[derive(Debug, Clone)]
pub struct VitExec {
    pub arch: Architecture,
    pub masking: Masking,
    /// The backbone part of `arch`.
    pub(crate) spec: VitSpec,
    pub embed: Linear,
    pub layers: Vec<Layer>,
    pub norm: Norm,
    pub head: Linear,
    pub generator: MaskGenerator,
    /// Two per layer: attention (units = heads), MLP (units = hidden units).
    pub gates: Vec<UnitGate>,
}

impl VitExec {
    /// Runs a batch `x` (`[batch, t_in, channels, h, w]`, scaled) under `plan`. Masks list the
    /// kept tokens and, per prunable layer (attention, MLP of each encoder layer), the kept heads
    /// or units.
    pub fn forward(
        &self,
        x: &[f32],
        batch: usize,
        h: usize,
        w: usize,
        plan: MaskPlan<'_>,
    ) -> Result<Output, ExecError> {
        let (s, fr, patch) = (&self.spec, self.arch.frames, self.arch.model.patch);
        let per_sample = crate::check_input(x, batch, [fr.t_in, fr.channels, h, w], plan, 2 * s.layers)?;
        let out_cells = fr.t_out * fr.channels * h * w;
        let positions = position_encoding(h.div_ceil(patch), w.div_ceil(patch), s.dim);
        let results: Vec<(Vec<f32>, Option<SampleMasks>, u64)> = (0..batch)
            .into_par_iter()
            .map(|b| {
                let given = match plan {
                    MaskPlan::Given(m) => Some(&m[b]),
                    _ => None,
                };
                self.sample(&x[b * per_sample..(b + 1) * per_sample], h, w, plan, given, &positions)
            })
            .collect();
        let mut prediction = Vec::with_capacity(batch * out_cells);
        let (mut masks, mut macs) = (Vec::new(), Vec::new());
        for (p, m, c) in results {
            prediction.extend(p);
            masks.extend(m);
            macs.push(c);
        }
        Ok(Output { prediction, masks, macs })
    }

    /// One sample: prediction `[t_out, c, h, w]`, its masks (none when dense) and MACs.
    /// `positions`: the token grid's [`position_encoding`].
    fn sample(
        &self,
        x: &[f32],
        h: usize,
        w: usize,
        plan: MaskPlan<'_>,
        given: Option<&SampleMasks>,
        positions: &[f32],
    ) -> (Vec<f32>, Option<SampleMasks>, u64) {
        let (s, fr, patch) = (&self.spec, self.arch.frames, self.arch.model.patch);
        let (p, tc, d) = (patch, fr.t_in * fr.channels, s.dim);
        let (hp, wp) = (h.div_ceil(p), w.div_ceil(p));
        let n = hp * wp;
        // Patchify (zero padding), embed, add positions.
        let cell_in = tc * p * p;
        let mut cells = vec![0.0f32; n * cell_in];
        for (i, v) in x.iter().enumerate() {
            let (ch, y, xx) = (i / (h * w), i / w % h, i % w);
            let token = (y / p) * wp + xx / p;
            cells[token * cell_in + (ch * p + y % p) * p + xx % p] = *v;
        }
        let mut z = self.embed.forward(&cells, n);
        z.iter_mut().zip(positions).for_each(|(a, b)| *a += b);
        let mut macs = (n * cell_in * d + n * d * self.head.outputs) as u64;

        let importance = matches!(plan, MaskPlan::Dynamic).then(|| {
            macs += self.generator.macs(h, w);
            self.generator.importance(x, fr.t_in, h, w).0
        });
        let mut masks = match (plan, given) {
            (MaskPlan::Dense, _) => None,
            (MaskPlan::Given(_), Some(m)) => Some(m.clone()),
            _ => {
                let sc = importance.as_ref().expect("dynamic");
                let patches = match self.masking.patch_rule() {
                    Some(rule) => rule.select(sc),
                    None => (0..n).collect(),
                };
                Some(SampleMasks { patches, units: Vec::new() })
            }
        };
        let kept: Vec<usize> = masks.as_ref().map_or_else(|| (0..n).collect(), |m| m.patches.clone());
        let k = kept.len();
        let dh = d / s.heads;
        for (l, layer) in self.layers.iter().enumerate() {
            // Attention over the kept tokens with the kept heads.
            let heads = self.units_of(2 * l, s.heads, &z, n, importance.as_deref(), &mut masks, &mut macs);
            let xk: Vec<f32> = kept.iter().flat_map(|&t| z[t * d..(t + 1) * d].iter().copied()).collect();
            let normed = layer.norm1.forward(&xk);
            let per_head: Vec<Vec<f32>> =
                heads.par_iter().map(|&hd| attention_head(layer, &normed, k, d, dh, hd)).collect();
            let mut concat = vec![0.0f32; k * heads.len() * dh];
            for (j, o) in per_head.iter().enumerate() {
                for r in 0..k {
                    concat[(r * heads.len() + j) * dh..(r * heads.len() + j + 1) * dh]
                        .copy_from_slice(&o[r * dh..(r + 1) * dh]);
                }
            }
            let proj_rows: Vec<usize> = heads.iter().flat_map(|&hd| hd * dh..(hd + 1) * dh).collect();
            let mut update = vec![0.0f32; k * d];
            linear_into(&mut update, &concat, &layer.proj.rows(&proj_rows), &layer.proj.bias, k, proj_rows.len(), d);
            scatter_add(&mut z, &update, &kept, d);
            macs += (k * heads.len() * (4 * d * dh) + 2 * k * k * dh * heads.len()) as u64;

            // MLP with the kept units.
            let units = self.units_of(2 * l + 1, s.mlp, &z, n, importance.as_deref(), &mut masks, &mut macs);
            let xk: Vec<f32> = kept.iter().flat_map(|&t| z[t * d..(t + 1) * d].iter().copied()).collect();
            let normed = layer.norm2.forward(&xk);
            let (w1, b1) = layer.fc1.columns(&units);
            let mut hidden = vec![0.0f32; k * units.len()];
            linear_into(&mut hidden, &normed, &w1, &b1, k, d, units.len());
            gelu(&mut hidden);
            let mut update = vec![0.0f32; k * d];
            linear_into(&mut update, &hidden, &layer.fc2.rows(&units), &layer.fc2.bias, k, units.len(), d);
            scatter_add(&mut z, &update, &kept, d);
            macs += (k * 2 * d * units.len()) as u64;
        }
        // Head on every token, unpatchify, add to the last input frame.
        let out = self.head.forward(&self.norm.forward(&z), n);
        let (t_out, c) = (fr.t_out, fr.channels);
        let last = &x[(fr.t_in - 1) * c * h * w..];
        let cell_out = t_out * c * p * p;
        let mut prediction = vec![0.0f32; t_out * c * h * w];
        for (i, v) in prediction.iter_mut().enumerate() {
            let (tch, y, xx) = (i / (h * w), i / w % h, i % w);
            let token = (y / p) * wp + xx / p;
            *v = last[(tch % c) * h * w + y * w + xx] + out[token * cell_out + (tch * p + y % p) * p + xx % p];
        }
        (prediction, masks, macs)
    }

    /// Kept units of prunable layer `layer` (of `total`): all when dense, the given ones, or
    /// the gate's top-k on the tokens `z` weighted by S (recorded into `masks`).
    #[allow(clippy::too_many_arguments)]
    fn units_of(
        &self,
        layer: usize,
        total: usize,
        z: &[f32],
        n: usize,
        importance: Option<&[f32]>,
        masks: &mut Option<SampleMasks>,
        macs: &mut u64,
    ) -> Vec<usize> {
        let Some(m) = masks else { return (0..total).collect() };
        if let Some(sc) = importance {
            let units = match self.masking.unit_keep() {
                Some(keep) => {
                    let gate = &self.gates[layer];
                    *macs += gate.macs(n);
                    top_k(&gate.scores(z, n, |t| sc[t]), kept_count(keep, total))
                }
                None => (0..total).collect(),
            };
            m.units.push(units);
        }
        m.units[layer].clone()
    }

    /// Fixed MACs (embedding and head) for frames of `h x w`, as the trainer counts them.
    pub fn fixed_macs(&self, h: usize, w: usize) -> u64 {
        let n = (h.div_ceil(self.arch.model.patch) * w.div_ceil(self.arch.model.patch)) as u64;
        n * (self.embed.inputs * self.embed.outputs + self.head.inputs * self.head.outputs) as u64
    }
}

/// One head's attention output `[k, dh]` for the normalised kept tokens `[k, d]`.
fn attention_head(layer: &Layer, normed: &[f32], k: usize, d: usize, dh: usize, head: usize) -> Vec<f32> {
    let cols: Vec<usize> = (0..3).flat_map(|part| (0..dh).map(move |j| part * d + head * dh + j)).collect();
    let (wq, bq) = layer.qkv.columns(&cols);
    let mut qkv = vec![0.0f32; k * 3 * dh];
    for row in qkv.chunks_mut(3 * dh) {
        row.copy_from_slice(&bq);
    }
    matmul(&mut qkv, normed, &wq, k, d, 3 * dh, true);
    let scale = 1.0 / (dh as f32).sqrt();
    let mut q = vec![0.0f32; k * dh];
    let mut kt = vec![0.0f32; dh * k];
    let mut v = vec![0.0f32; k * dh];
    for r in 0..k {
        let row = &qkv[r * 3 * dh..(r + 1) * 3 * dh];
        for j in 0..dh {
            q[r * dh + j] = row[j] * scale;
            kt[j * k + r] = row[dh + j];
            v[r * dh + j] = row[2 * dh + j];
        }
    }
    let mut logits = vec![0.0f32; k * k];
    matmul(&mut logits, &q, &kt, k, dh, k, false);
    // `max(1)`: a thresholded DataMask may keep no token at all (then there are no rows).
    for row in logits.chunks_mut(k.max(1)) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
        let mut sum = 0.0;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        row.iter_mut().for_each(|v| *v /= sum);
    }
    let mut out = vec![0.0f32; k * dh];
    matmul(&mut out, &logits, &v, k, k, dh, false);
    out
}

/// `z[kept[i]] += update[i]` for rows of width `d`.
fn scatter_add(z: &mut [f32], update: &[f32], kept: &[usize], d: usize) {
    for (i, &t) in kept.iter().enumerate() {
        z[t * d..(t + 1) * d].iter_mut().zip(&update[i * d..(i + 1) * d]).for_each(|(a, u)| *a += u);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_code_is_distinct_per_token() {
        let p = position_encoding(3, 4, 8);
        assert_eq!(p.len(), 12 * 8);
        for a in 0..12 {
            for b in a + 1..12 {
                assert_ne!(p[a * 8..(a + 1) * 8], p[b * 8..(b + 1) * 8], "tokens {a} and {b}");
            }
        }
        assert_eq!(p[1], 1.0, "cos(0) at row 0");
    }
}
