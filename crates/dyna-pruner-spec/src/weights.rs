//! The weights of an architecture: every tensor's name and shape, in the training framework's
//! layouts (conv `[out, in, k, k]`, transposed conv `[in, out, k, k]`, linear `[in, out]`).
//! The trainer's export writes exactly these tensors and the executor's loader reads exactly
//! these (both check against this list), so the two cannot drift apart.

use crate::{stats_per_channel, Architecture, BackboneSpec};

/// One tensor of an exported model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

struct List(Vec<WeightSpec>);

impl List {
    fn tensor(&mut self, name: &str, shape: &[usize]) {
        self.0.push(WeightSpec { name: name.to_string(), shape: shape.to_vec() });
    }

    /// A conv `[out, in, k, k]` with its bias (or without).
    fn conv(&mut self, name: &str, out: usize, inputs: usize, k: usize, bias: bool) {
        self.tensor(&format!("{name}.weight"), &[out, inputs, k, k]);
        if bias {
            self.tensor(&format!("{name}.bias"), &[out]);
        }
    }

    /// A transposed conv `[in, out, k, k]` with its bias.
    fn transposed(&mut self, name: &str, inputs: usize, out: usize, k: usize) {
        self.tensor(&format!("{name}.weight"), &[inputs, out, k, k]);
        self.tensor(&format!("{name}.bias"), &[out]);
    }

    fn linear(&mut self, name: &str, inputs: usize, out: usize) {
        self.tensor(&format!("{name}.weight"), &[inputs, out]);
        self.tensor(&format!("{name}.bias"), &[out]);
    }

    fn norm(&mut self, name: &str, dim: usize) {
        self.tensor(&format!("{name}.gamma"), &[dim]);
        self.tensor(&format!("{name}.beta"), &[dim]);
    }
}

/// Every weight of `arch`: the mask generator's, one unit gate per prunable layer
/// (`gates.{l}`), then the backbone's.
pub fn weights(arch: &Architecture) -> Vec<WeightSpec> {
    let f = arch.frames;
    let (c, patch, g) = (f.channels, arch.model.patch, arch.model.generator);
    let mut w = List(Vec::new());
    w.conv("generator.conv1", g.width, stats_per_channel(g.motion) * c + g.budget_inputs(), 3, true);
    w.conv("generator.conv2", g.width, g.width, 3, true);
    w.conv("generator.head", 1, g.width, 1, true);
    for (l, layer) in arch.prunable_layers().iter().enumerate() {
        w.linear(&format!("gates.{l}"), layer.in_channels + 1 + g.budget_inputs(), layer.units);
    }
    match &arch.model.backbone {
        BackboneSpec::Cnn(s) => {
            w.conv("enc_in", s.hidden, f.t_in * c, 3, true);
            w.conv("enc_down", s.hidden, s.hidden, 3, true);
            for l in 0..s.blocks {
                w.conv(&format!("blocks.{l}.conv1"), s.units, s.hidden, 3, true);
                w.conv(&format!("blocks.{l}.conv2"), s.hidden, s.units, 3, true);
            }
            if s.stride > 1 {
                w.transposed("dec_up", s.hidden, s.hidden, s.stride);
            }
            w.conv("dec_out", f.t_out * c, s.hidden, 3, true);
        }
        BackboneSpec::Vit(s) => {
            let cell = patch * patch;
            w.linear("embed", f.t_in * c * cell, s.dim);
            for l in 0..s.layers {
                let name = |part: &str| format!("layers.{l}.{part}");
                w.norm(&name("norm1"), s.dim);
                w.linear(&name("qkv"), s.dim, 3 * s.dim);
                w.linear(&name("proj"), s.dim, s.dim);
                w.norm(&name("norm2"), s.dim);
                w.linear(&name("fc1"), s.dim, s.mlp);
                w.linear(&name("fc2"), s.mlp, s.dim);
            }
            w.norm("norm", s.dim);
            w.linear("head", s.dim, f.t_out * c * cell);
        }
        BackboneSpec::ConvLstm(s) => {
            w.conv("enc_in", s.hidden, c, 3, true);
            w.conv("enc_down", s.hidden, s.hidden, s.stride, true);
            for l in 0..s.cells {
                let inputs = if l == 0 { s.hidden } else { s.units };
                w.conv(&format!("cells.{l}.input"), 4 * s.units, inputs, 3, true);
                w.conv(&format!("cells.{l}.state"), 4 * s.units, s.units, 3, false);
            }
            w.conv("dec_proj", s.hidden, s.units, 1, true);
            w.transposed("dec_up", s.hidden, s.hidden, s.stride);
            w.conv("dec_out", c, s.hidden, 3, true);
        }
    }
    w.0
}

/// A tensor axis indexed by the units of one prunable layer: unit `u` is index
/// `g * units + u` of the axis for each of its `groups` blocks (the ConvLSTM's four gates).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitAxis {
    pub tensor: String,
    pub axis: usize,
    pub groups: usize,
}

/// Per prunable layer (in mask order), every tensor axis its units index, unit gate included;
/// `None` for a layer whose units cannot be cut out of the weights (a ViT's heads: the head
/// width is tied to the model width). Static pruning cuts along these axes.
pub fn unit_axes(arch: &Architecture) -> Vec<Option<Vec<UnitAxis>>> {
    let axis = |tensor: String, axis: usize, groups: usize| UnitAxis { tensor, axis, groups };
    let gate = |l: usize| vec![axis(format!("gates.{l}.weight"), 1, 1), axis(format!("gates.{l}.bias"), 0, 1)];
    let with_gate = |l: usize, mut axes: Vec<UnitAxis>| {
        axes.extend(gate(l));
        Some(axes)
    };
    match &arch.model.backbone {
        BackboneSpec::Cnn(s) => (0..s.blocks)
            .map(|l| {
                let block = |part: &str| format!("blocks.{l}.{part}");
                let axes = vec![
                    axis(block("conv1.weight"), 0, 1),
                    axis(block("conv1.bias"), 0, 1),
                    axis(block("conv2.weight"), 1, 1),
                ];
                with_gate(l, axes)
            })
            .collect(),
        BackboneSpec::Vit(s) => (0..s.layers)
            .flat_map(|l| {
                let layer = |part: &str| format!("layers.{l}.{part}");
                let mlp = vec![
                    axis(layer("fc1.weight"), 1, 1),
                    axis(layer("fc1.bias"), 0, 1),
                    axis(layer("fc2.weight"), 0, 1),
                ];
                [None, with_gate(2 * l + 1, mlp)]
            })
            .collect(),
        BackboneSpec::ConvLstm(s) => (0..s.cells)
            .map(|l| {
                let cell = |i: usize, part: &str| format!("cells.{i}.{part}");
                let mut axes = vec![
                    axis(cell(l, "input.weight"), 0, 4),
                    axis(cell(l, "input.bias"), 0, 4),
                    axis(cell(l, "state.weight"), 0, 4),
                    axis(cell(l, "state.weight"), 1, 1),
                ];
                axes.push(match l + 1 < s.cells {
                    true => axis(cell(l + 1, "input.weight"), 1, 1),
                    false => axis("dec_proj.weight".into(), 1, 1),
                });
                with_gate(l, axes)
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BackboneKind, CnnSpec, Frames, GeneratorSpec, ModelSpec};

    /// A small architecture of the backbone `kind` with its default sizes.
    fn arch_of(kind: BackboneKind) -> Architecture {
        Architecture {
            frames: Frames { t_in: 2, t_out: 1, channels: 3 },
            model: ModelSpec { patch: 4, generator: GeneratorSpec::default(), backbone: BackboneSpec::of_kind(kind) },
        }
    }

    #[test]
    fn names_are_unique_and_shapes_non_empty() {
        for kind in BackboneKind::ALL {
            let arch = arch_of(kind);
            let list = weights(&arch);
            let mut names: Vec<&str> = list.iter().map(|w| w.name.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), list.len(), "{kind:?}");
            assert!(list.iter().all(|w| w.shape.iter().all(|&d| d > 0)));
        }
    }

    /// Every unit axis names a listed tensor whose axis holds `groups x units` entries.
    #[test]
    fn unit_axes_index_listed_tensors_by_their_layers_units() {
        for kind in BackboneKind::ALL {
            let arch = arch_of(kind);
            let list = weights(&arch);
            let layers = arch.prunable_layers();
            let axes = unit_axes(&arch);
            assert_eq!(axes.len(), layers.len(), "{kind:?}");
            assert!(axes.iter().any(Option::is_some), "{kind:?}");
            for (layer, axes) in layers.iter().zip(&axes) {
                for a in axes.iter().flatten() {
                    let w = list.iter().find(|w| w.name == a.tensor).unwrap_or_else(|| panic!("{}", a.tensor));
                    assert_eq!(w.shape[a.axis], a.groups * layer.units, "{} axis {}", a.tensor, a.axis);
                }
            }
        }
    }

    #[test]
    fn a_stride_one_cnn_has_no_upsampling() {
        let arch = |stride| Architecture {
            frames: Frames { t_in: 2, t_out: 1, channels: 1 },
            model: ModelSpec {
                backbone: BackboneSpec::Cnn(CnnSpec { stride, blocks: 1, ..CnnSpec::default() }),
                ..ModelSpec::default()
            },
        };
        let has_up = |s| weights(&arch(s)).iter().any(|w| w.name.starts_with("dec_up"));
        assert!(has_up(2) && !has_up(1));
    }
}
