//! Static structured pruning of an exported model: each prunable layer keeps the units it is
//! given, the same for every sample, and the result is an ordinary smaller model of the same
//! backbone (the "prune once, then fine-tune" baseline of Torch-Pruning). The axes a unit
//! indexes come from the shared spec ([`dyna_pruner_spec::unit_axes`]).

use dyna_pruner_spec::{unit_axes, Architecture, UnitAxis};

use crate::format::{check_tensors, lookup, ExportedModel, Tensors};
use crate::ExecError;

/// The L1 norm of each unit of each prunable layer: the sum of `|w|` over every weight the unit
/// indexes (all its axes, gate included). `None` for a layer whose units cannot be cut out.
pub fn unit_l1_norms(model: &ExportedModel) -> Result<Vec<Option<Vec<f64>>>, ExecError> {
    let units = model.arch.layer_units();
    unit_axes(&model.arch)
        .iter()
        .zip(units)
        .map(|(axes, n)| {
            let Some(axes) = axes else { return Ok(None) };
            let mut norms = vec![0.0f64; n];
            for a in axes {
                let (shape, values) = lookup(&model.tensors, &a.tensor)?;
                let (outer, size, inner) = split_at_axis(shape, a.axis);
                for (i, v) in values.iter().enumerate() {
                    norms[(i / inner) % size % n] += f64::from(v.abs());
                }
                debug_assert_eq!(outer * size * inner, values.len());
            }
            Ok(Some(norms))
        })
        .collect()
}

/// The `k` indices of the largest `norms`, ascending (ties to the lower index).
pub fn largest(norms: &[f64], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..norms.len()).collect();
    order.sort_by(|&a, &b| norms[b].total_cmp(&norms[a]).then(a.cmp(&b)));
    let mut kept = order[..k.min(norms.len())].to_vec();
    kept.sort_unstable();
    kept
}

/// Units to keep per layer by the L1 criterion: `target`'s unit count of each prunable layer.
pub fn l1_selection(model: &ExportedModel, target: &Architecture) -> Result<Vec<Vec<usize>>, ExecError> {
    let norms = unit_l1_norms(model)?;
    let (from, to) = (model.arch.layer_units(), target.layer_units());
    if from.len() != to.len() {
        return Err(not_a_cut(&model.arch, target));
    }
    Ok(norms
        .iter()
        .zip(from.iter().zip(&to))
        .map(|(n, (&f, &t))| match n {
            Some(n) => largest(n, t),
            None => (0..f).collect(),
        })
        .collect())
}

/// `model` cut down to the units `kept[l]` of each prunable layer: a model of `target`, which
/// must be `model`'s architecture with `kept[l].len()` units in layer `l`.
pub fn keep_units(
    model: &ExportedModel,
    target: &Architecture,
    kept: &[Vec<usize>],
) -> Result<ExportedModel, ExecError> {
    let units = model.arch.layer_units();
    let axes = unit_axes(&model.arch);
    if kept.len() != units.len() || target.layer_units() != kept.iter().map(Vec::len).collect::<Vec<_>>() {
        return Err(not_a_cut(&model.arch, target));
    }
    let mut tensors = model.tensors.clone();
    for (l, ((layer_axes, keep), &n)) in axes.iter().zip(kept).zip(&units).enumerate() {
        if keep.windows(2).any(|w| w[0] >= w[1]) || keep.last().is_some_and(|&u| u >= n) {
            return Err(ExecError::Input { got: keep.len(), expected: format!("ascending units < {n} of layer {l}") });
        }
        match layer_axes {
            Some(layer_axes) => {
                for a in layer_axes {
                    cut(&mut tensors, a, keep, n)?;
                }
            }
            None if keep.len() == n => {}
            None => {
                return Err(ExecError::Input {
                    got: keep.len(),
                    expected: format!("all {n} units of layer {l} (its units cannot be cut out)"),
                })
            }
        }
    }
    check_tensors(target, &tensors).map_err(|e| match e {
        ExecError::Tensor { .. } => not_a_cut(&model.arch, target),
        other => other,
    })?;
    Ok(ExportedModel { arch: target.clone(), masking: model.masking, tensors, metadata: model.metadata.clone() })
}

fn not_a_cut(from: &Architecture, to: &Architecture) -> ExecError {
    ExecError::Tensor {
        name: "architecture".into(),
        detail: format!(
            "{to:?} is not {from:?} with fewer units per prunable layer ({:?} -> {:?})",
            from.layer_units(),
            to.layer_units()
        ),
    }
}

/// `(entries before, size of, entries after)` axis `axis` of a row-major `shape`.
fn split_at_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (shape[..axis].iter().product(), shape[axis], shape[axis + 1..].iter().product())
}

/// Keeps, along `a`, the entries of units `keep` (of `units`) in each of its groups.
fn cut(tensors: &mut Tensors, a: &UnitAxis, keep: &[usize], units: usize) -> Result<(), ExecError> {
    let (shape, values) = lookup(tensors, &a.tensor)?;
    if shape.get(a.axis) != Some(&(a.groups * units)) {
        return Err(ExecError::Tensor {
            name: a.tensor.clone(),
            detail: format!("has shape {shape:?}; axis {} should hold {} x {units} units", a.axis, a.groups),
        });
    }
    let (outer, size, inner) = split_at_axis(shape, a.axis);
    let rows: Vec<usize> = (0..a.groups).flat_map(|g| keep.iter().map(move |&u| g * units + u)).collect();
    let mut out = Vec::with_capacity(outer * rows.len() * inner);
    for o in 0..outer {
        for &r in &rows {
            let start = (o * size + r) * inner;
            out.extend_from_slice(&values[start..start + inner]);
        }
    }
    let mut shape = shape.to_vec();
    shape[a.axis] = rows.len();
    tensors.insert(a.tensor.clone(), (shape, out));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn largest_keeps_the_top_norms_in_index_order() {
        assert_eq!(largest(&[0.5, 3.0, 1.0, 3.0, 0.1], 3), vec![1, 2, 3]);
        assert_eq!(largest(&[1.0, 1.0, 1.0], 2), vec![0, 1]);
    }

    #[test]
    fn a_cut_keeps_the_named_rows_of_each_group() {
        let mut t = Tensors::new();
        // [2 groups x 3 units, 2]: row r holds (10r, 10r + 1).
        t.insert("w".into(), (vec![6, 2], (0..6).flat_map(|r| [10.0 * r as f32, 10.0 * r as f32 + 1.0]).collect()));
        cut(&mut t, &UnitAxis { tensor: "w".into(), axis: 0, groups: 2 }, &[0, 2], 3).unwrap();
        assert_eq!(t["w"], (vec![4, 2], vec![0.0, 1.0, 20.0, 21.0, 30.0, 31.0, 50.0, 51.0]));
        // Along the last axis.
        t.insert("v".into(), (vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
        cut(&mut t, &UnitAxis { tensor: "v".into(), axis: 1, groups: 1 }, &[1], 3).unwrap();
        assert_eq!(t["v"], (vec![2, 1], vec![2.0, 5.0]));
    }
}
