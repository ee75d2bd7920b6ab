//! The exported model file: safetensors with the weights in the training framework's layouts
//! (the names and shapes of [`dyna_pruner_spec::weights`]), the [`Architecture`] and the
//! inference [`Masking`] as JSON in the metadata keys `architecture` and `masking`, and any
//! further metadata the writer adds (the trainer adds the scaler and the data config).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use dyna_pruner_spec::{
    stats_per_channel, weights, Architecture, BackboneSpec, CnnSpec, ConvLstmSpec, Masking, VitSpec,
};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::cnn::CnnExec;
use crate::convlstm::{CellConvs, ConvLstmExec};
use crate::kernels::Conv;
use crate::masks::{MaskGenerator, UnitGate};
use crate::vit::{Layer, Linear, Norm, VitExec};
use crate::{Exec, ExecError};

/// Named tensors: shape and row-major values.
pub type Tensors = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// A model as exported: everything an executor needs, and what the writer noted beside it.
#[derive(Debug, Clone)]
pub struct ExportedModel {
    pub arch: Architecture,
    pub masking: Masking,
    pub tensors: Tensors,
    /// Further metadata entries (not `architecture` or `masking`), e.g. `scaler`, `data`.
    pub metadata: BTreeMap<String, String>,
}

const ARCHITECTURE: &str = "architecture";
const MASKING: &str = "masking";

impl ExportedModel {
    /// The executor of this model (its tensors checked against the architecture first).
    pub fn executor(&self) -> Result<Exec, ExecError> {
        from_tensors(&self.arch, self.masking, &self.tensors)
    }
}

/// Writes `model` to `path`, after checking its tensors against its architecture.
pub fn save(path: &Path, model: &ExportedModel) -> Result<(), ExecError> {
    check_tensors(&model.arch, &model.tensors)?;
    // In name order, so that the same model always lays its tensors out alike.
    let mut names: Vec<&String> = model.tensors.keys().collect();
    names.sort_unstable();
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = names
        .into_iter()
        .map(|n| (n, &model.tensors[n]))
        .map(|(n, (shape, v))| (n.clone(), shape.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views = bytes
        .iter()
        .map(|(n, shape, b)| {
            TensorView::new(Dtype::F32, shape.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| ExecError::Tensor { name: n.clone(), detail: e.to_string() })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut meta: HashMap<String, String> = model.metadata.clone().into_iter().collect();
    meta.insert(ARCHITECTURE.into(), serde_json::to_string(&model.arch).expect("an architecture serializes"));
    meta.insert(MASKING.into(), serde_json::to_string(&model.masking).expect("a masking serializes"));
    let data = safetensors::serialize(views, Some(meta))
        .map_err(|e| ExecError::Format { path: path.to_path_buf(), detail: e.to_string() })?;
    std::fs::write(path, data).map_err(|source| ExecError::Io { path: path.to_path_buf(), source })
}

/// Reads an exported model (its architecture validated, its tensors checked against it).
pub fn load(path: &Path) -> Result<ExportedModel, ExecError> {
    let bytes = std::fs::read(path).map_err(|source| ExecError::Io { path: path.to_path_buf(), source })?;
    let fmt = |detail: String| ExecError::Format { path: path.to_path_buf(), detail };
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| fmt(e.to_string()))?;
    let mut metadata: BTreeMap<String, String> = meta.metadata().clone().unwrap_or_default().into_iter().collect();
    if metadata.contains_key("spec") && !metadata.contains_key(ARCHITECTURE) {
        return Err(fmt(
            "written by an older dyna-pruner (a `spec` entry): export it again with `dyna-pruner predict`".into(),
        ));
    }
    let mut entry = |key: &str| metadata.remove(key).ok_or_else(|| fmt(format!("no `{key}` in the metadata")));
    let arch: Architecture =
        serde_json::from_str(&entry(ARCHITECTURE)?).map_err(|e| fmt(format!("bad `{ARCHITECTURE}`: {e}")))?;
    let masking: Masking = serde_json::from_str(&entry(MASKING)?).map_err(|e| fmt(format!("bad `{MASKING}`: {e}")))?;
    arch.validate().map_err(|e| fmt(format!("bad `{ARCHITECTURE}`: {e}")))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| fmt(e.to_string()))?;
    let mut tensors = Tensors::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(ExecError::Tensor { name, detail: format!("has dtype {:?}; expected F32", view.dtype()) });
        }
        let values: Vec<f32> =
            view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        check_finite(&name, &values)?;
        tensors.insert(name, (view.shape().to_vec(), values));
    }
    check_tensors(&arch, &tensors)?;
    Ok(ExportedModel { arch, masking, tensors, metadata })
}

/// An error naming the tensor `name` if one of its `values` is NaN or infinite.
pub fn check_finite(name: &str, values: &[f32]) -> Result<(), ExecError> {
    match values.iter().find(|v| !v.is_finite()) {
        Some(bad) => Err(ExecError::Tensor { name: name.into(), detail: format!("holds a non-finite value ({bad})") }),
        None => Ok(()),
    }
}

/// Checks that `tensors` are exactly the weights of `arch`: each with its shape, none missing,
/// none extra.
pub fn check_tensors(arch: &Architecture, tensors: &Tensors) -> Result<(), ExecError> {
    let expected = weights(arch);
    for w in &expected {
        take(tensors, &w.name, &w.shape)?;
    }
    if tensors.len() != expected.len() {
        let mut extra: Vec<&String> = tensors.keys().filter(|n| !expected.iter().any(|w| &w.name == *n)).collect();
        extra.sort_unstable();
        return Err(ExecError::Tensor {
            name: extra.first().map_or_else(String::new, |n| n.to_string()),
            detail: format!("is not a weight of this {} ({} unexpected tensors)", arch.kind().name(), extra.len()),
        });
    }
    Ok(())
}

/// The shape and values of the tensor `name`, or an error naming it as missing.
pub(crate) fn lookup<'a>(tensors: &'a Tensors, name: &str) -> Result<(&'a [usize], &'a [f32]), ExecError> {
    let (s, v) =
        tensors.get(name).ok_or_else(|| ExecError::Tensor { name: name.into(), detail: "is missing".into() })?;
    Ok((s, v))
}

fn take<'a>(tensors: &'a Tensors, name: &str, shape: &[usize]) -> Result<&'a [f32], ExecError> {
    let (s, v) = lookup(tensors, name)?;
    if s != shape {
        return Err(ExecError::Tensor { name: name.into(), detail: format!("has shape {s:?}; expected {shape:?}") });
    }
    Ok(v)
}

fn conv(t: &Tensors, name: &str, cout: usize, cin: usize, k: usize, stride: usize) -> Result<Conv, ExecError> {
    let w = take(t, &format!("{name}.weight"), &[cout, cin, k, k])?;
    let b = take(t, &format!("{name}.bias"), &[cout])?;
    Ok(Conv::from_oihw(w, b, cout, cin, k, stride, k / 2))
}

/// Builds an executor from an architecture, its masking and framework-layout tensors.
pub fn from_tensors(arch: &Architecture, masking: Masking, t: &Tensors) -> Result<Exec, ExecError> {
    check_tensors(arch, t)?;
    let generator = generator(t, arch)?;
    let gates = arch
        .prunable_layers()
        .iter()
        .enumerate()
        .map(|(l, layer)| gate(t, l, layer.in_channels, layer.units, arch.model.generator.budget_inputs()))
        .collect::<Result<Vec<_>, ExecError>>()?;
    let parts = Parts { arch: arch.clone(), masking, generator, gates };
    let mut exec = match &arch.model.backbone {
        BackboneSpec::Cnn(s) => Exec::Cnn(cnn_from_tensors(s, t, parts)?),
        BackboneSpec::Vit(s) => Exec::Vit(vit_from_tensors(s, t, parts)?),
        BackboneSpec::ConvLstm(s) => Exec::ConvLstm(convlstm_from_tensors(s, t, parts)?),
    };
    exec.set_masking(masking);
    Ok(exec)
}

/// What every executor holds besides its backbone's weights.
struct Parts {
    arch: Architecture,
    masking: Masking,
    generator: MaskGenerator,
    gates: Vec<UnitGate>,
}

fn generator(t: &Tensors, arch: &Architecture) -> Result<MaskGenerator, ExecError> {
    let (g, channels) = (arch.model.generator, arch.frames.channels);
    Ok(MaskGenerator {
        conv1: conv(t, "generator.conv1", g.width, stats_per_channel(g.motion) * channels + g.budget_inputs(), 3, 1)?,
        conv2: conv(t, "generator.conv2", g.width, g.width, 3, 1)?,
        head: conv(t, "generator.head", 1, g.width, 1, 1)?,
        patch: arch.model.patch,
        channels,
        motion: g.motion,
        budget: vec![0.0; g.budget_inputs()],
    })
}

fn gate(t: &Tensors, l: usize, cin: usize, units: usize, budget_inputs: usize) -> Result<UnitGate, ExecError> {
    Ok(UnitGate {
        weight: take(t, &format!("gates.{l}.weight"), &[cin + 1 + budget_inputs, units])?.to_vec(),
        bias: take(t, &format!("gates.{l}.bias"), &[units])?.to_vec(),
        cin,
        units,
        budget: vec![0.0; budget_inputs],
    })
}

fn linear(t: &Tensors, name: &str, inputs: usize, outputs: usize) -> Result<Linear, ExecError> {
    Ok(Linear {
        weight: take(t, &format!("{name}.weight"), &[inputs, outputs])?.to_vec(),
        bias: take(t, &format!("{name}.bias"), &[outputs])?.to_vec(),
        inputs,
        outputs,
    })
}

fn norm(t: &Tensors, name: &str, dim: usize) -> Result<Norm, ExecError> {
    Ok(Norm {
        gamma: take(t, &format!("{name}.gamma"), &[dim])?.to_vec(),
        beta: take(t, &format!("{name}.beta"), &[dim])?.to_vec(),
    })
}

fn vit_from_tensors(spec: &VitSpec, t: &Tensors, p: Parts) -> Result<VitExec, ExecError> {
    let (d, f, patch) = (spec.dim, p.arch.frames, p.arch.model.patch);
    let cell = patch * patch;
    let layers = (0..spec.layers)
        .map(|l| {
            let name = |part: &str| format!("layers.{l}.{part}");
            Ok(Layer {
                norm1: norm(t, &name("norm1"), d)?,
                qkv: linear(t, &name("qkv"), d, 3 * d)?,
                proj: linear(t, &name("proj"), d, d)?,
                norm2: norm(t, &name("norm2"), d)?,
                fc1: linear(t, &name("fc1"), d, spec.mlp)?,
                fc2: linear(t, &name("fc2"), spec.mlp, d)?,
            })
        })
        .collect::<Result<Vec<_>, ExecError>>()?;
    Ok(VitExec {
        embed: linear(t, "embed", f.t_in * f.channels * cell, d)?,
        layers,
        norm: norm(t, "norm", d)?,
        head: linear(t, "head", d, f.t_out * f.channels * cell)?,
        generator: p.generator,
        gates: p.gates,
        spec: spec.clone(),
        arch: p.arch,
        masking: p.masking,
    })
}

/// A transposed conv `[cin = c, cout = c, st, st]` with kernel = stride as a 1x1 conv to
/// `st * st * c` outputs (taps outer, channels inner; see `kernels::depth_to_space_add`).
fn transposed_as_1x1(t: &Tensors, name: &str, c: usize, st: usize) -> Result<Conv, ExecError> {
    let w = take(t, &format!("{name}.weight"), &[c, c, st, st])?;
    let b = take(t, &format!("{name}.bias"), &[c])?;
    let cout = st * st * c;
    let mut weight = vec![0.0; c * cout];
    for ci in 0..c {
        for co in 0..c {
            for ky in 0..st {
                for kx in 0..st {
                    weight[ci * cout + (ky * st + kx) * c + co] = w[((ci * c + co) * st + ky) * st + kx];
                }
            }
        }
    }
    let bias = (0..st * st).flat_map(|_| b.iter().copied()).collect();
    Ok(Conv::new(1, 1, 0, c, cout, weight, bias))
}

/// [`transposed_as_1x1`]'s conv split by output row: conv `dy` makes output row `st y + dy` from
/// input row y, its `st * c` outputs per input pixel being that row's `st` pixels in order.
fn transposed_rows(up: &Conv, c: usize, st: usize) -> Vec<Conv> {
    (0..st).map(|dy| up.select_outputs(&(dy * st * c..(dy + 1) * st * c).collect::<Vec<_>>())).collect()
}

fn convlstm_from_tensors(spec: &ConvLstmSpec, t: &Tensors, p: Parts) -> Result<ConvLstmExec, ExecError> {
    let (hid, units, c, st) = (spec.hidden, spec.units, p.arch.frames.channels, spec.stride);
    let cells = (0..spec.cells)
        .map(|l| {
            let cin = if l == 0 { hid } else { units };
            let input = take(t, &format!("cells.{l}.input.weight"), &[4 * units, cin, 3, 3])?;
            let bias = take(t, &format!("cells.{l}.input.bias"), &[4 * units])?;
            let state = take(t, &format!("cells.{l}.state.weight"), &[4 * units, units, 3, 3])?;
            // [4u, cin + u, 3, 3]: the input's filters, then the state's, per output.
            let joint: Vec<f32> = (0..4 * units)
                .flat_map(|o| {
                    input[o * cin * 9..(o + 1) * cin * 9].iter().chain(&state[o * units * 9..(o + 1) * units * 9])
                })
                .copied()
                .collect();
            Ok(CellConvs {
                joint: Conv::from_oihw(&joint, bias, 4 * units, cin + units, 3, 1, 1),
                state_only: Conv::from_oihw(state, bias, 4 * units, units, 3, 1, 1),
            })
        })
        .collect::<Result<Vec<_>, ExecError>>()?;
    let down_w = take(t, "enc_down.weight", &[hid, hid, st, st])?;
    let down_b = take(t, "enc_down.bias", &[hid])?;
    Ok(ConvLstmExec {
        enc_in: conv(t, "enc_in", hid, c, 3, 1)?,
        enc_down: Conv::from_oihw(down_w, down_b, hid, hid, st, st, 0),
        cells,
        dec_proj: conv(t, "dec_proj", hid, units, 1, 1)?,
        dec_up_rows: transposed_rows(&transposed_as_1x1(t, "dec_up", hid, st)?, hid, st),
        dec_out: conv(t, "dec_out", c, hid, 3, 1)?,
        generator: p.generator,
        gates: p.gates,
        spec: spec.clone(),
        arch: p.arch,
        masking: p.masking,
    })
}

fn cnn_from_tensors(spec: &CnnSpec, t: &Tensors, p: Parts) -> Result<CnnExec, ExecError> {
    let (hid, units, f) = (spec.hidden, spec.units, p.arch.frames);
    let blocks = (0..spec.blocks)
        .map(|l| {
            Ok((
                conv(t, &format!("blocks.{l}.conv1"), units, hid, 3, 1)?,
                conv(t, &format!("blocks.{l}.conv2"), hid, units, 3, 1)?,
            ))
        })
        .collect::<Result<Vec<_>, ExecError>>()?;
    let st = spec.stride;
    let dec_up = if st > 1 { Some(transposed_as_1x1(t, "dec_up", hid, st)?) } else { None };
    Ok(CnnExec {
        unit_execution: Default::default(),
        enc_in: conv(t, "enc_in", hid, f.t_in * f.channels, 3, 1)?,
        enc_down: conv(t, "enc_down", hid, hid, 3, st)?,
        blocks,
        dec_up,
        dec_out: conv(t, "dec_out", f.t_out * f.channels, hid, 3, 1)?,
        generator: p.generator,
        gates: p.gates,
        spec: spec.clone(),
        arch: p.arch,
        masking: p.masking,
    })
}
