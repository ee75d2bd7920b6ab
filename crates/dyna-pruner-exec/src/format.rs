//! The exported model file: safetensors with the weights in the training framework's layouts
//! (conv `[out, in, k, k]`, transposed conv `[in, out, k, k]`, linear `[in, out]`) and the
//! [`Spec`] as JSON in the metadata key `spec`.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::cnn::{CnnExec, CnnSpec, MaskSpec};
use crate::convlstm::{CellConvs, ConvLstmExec, ConvLstmSpec};
use crate::kernels::Conv;
use crate::masks::{stats_per_channel, MaskGenerator, UnitGate};
use crate::vit::{Layer, Linear, Norm, VitExec, VitSpec};
use crate::{Exec, ExecError, Spec};

/// Named tensors: shape and row-major values.
pub type Tensors = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// Writes `spec` and `tensors` to `path`.
pub fn save(path: &Path, spec: &Spec, tensors: &Tensors) -> Result<(), ExecError> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
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
    let meta = HashMap::from([("spec".to_string(), serde_json::to_string(spec).expect("spec serializes"))]);
    let data = safetensors::serialize(views, Some(meta))
        .map_err(|e| ExecError::Format { path: path.to_path_buf(), detail: e.to_string() })?;
    std::fs::write(path, data).map_err(|source| ExecError::Io { path: path.to_path_buf(), source })
}

/// Reads an exported model.
pub fn load(path: &Path) -> Result<Exec, ExecError> {
    let bytes = std::fs::read(path).map_err(|source| ExecError::Io { path: path.to_path_buf(), source })?;
    let fmt = |detail: String| ExecError::Format { path: path.to_path_buf(), detail };
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| fmt(e.to_string()))?;
    let spec_text =
        meta.metadata().as_ref().and_then(|m| m.get("spec")).ok_or_else(|| fmt("no `spec` in the metadata".into()))?;
    let spec: Spec = serde_json::from_str(spec_text).map_err(|e| fmt(format!("bad spec: {e}")))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| fmt(e.to_string()))?;
    let mut tensors = Tensors::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(ExecError::Tensor { name, detail: format!("has dtype {:?}; expected F32", view.dtype()) });
        }
        let values = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        tensors.insert(name, (view.shape().to_vec(), values));
    }
    from_tensors(spec, &tensors)
}

fn take<'a>(tensors: &'a Tensors, name: &str, shape: &[usize]) -> Result<&'a [f32], ExecError> {
    let (s, v) =
        tensors.get(name).ok_or_else(|| ExecError::Tensor { name: name.into(), detail: "is missing".into() })?;
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

/// Builds an executor from a spec and framework-layout tensors.
pub fn from_tensors(spec: Spec, t: &Tensors) -> Result<Exec, ExecError> {
    match spec {
        Spec::Cnn(s) => cnn_from_tensors(s, t).map(Exec::Cnn),
        Spec::Vit(s) => vit_from_tensors(s, t).map(Exec::Vit),
        Spec::ConvLstm(s) => convlstm_from_tensors(s, t).map(Exec::ConvLstm),
    }
}

fn generator(t: &Tensors, masks: &MaskSpec, channels: usize, patch: usize) -> Result<MaskGenerator, ExecError> {
    let width = masks.generator_width;
    let stats = stats_per_channel(masks.generator_motion);
    Ok(MaskGenerator {
        conv1: conv(t, "generator.conv1", width, stats * channels, 3, 1)?,
        conv2: conv(t, "generator.conv2", width, width, 3, 1)?,
        head: conv(t, "generator.head", 1, width, 1, 1)?,
        patch,
        channels,
        motion: masks.generator_motion,
    })
}

fn gate(t: &Tensors, l: usize, cin: usize, units: usize) -> Result<UnitGate, ExecError> {
    Ok(UnitGate {
        weight: take(t, &format!("gates.{l}.weight"), &[cin + 1, units])?.to_vec(),
        bias: take(t, &format!("gates.{l}.bias"), &[units])?.to_vec(),
        cin,
        units,
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

fn vit_from_tensors(spec: VitSpec, t: &Tensors) -> Result<VitExec, ExecError> {
    let (d, cell) = (spec.dim, spec.patch * spec.patch);
    if spec.heads == 0 || d % spec.heads != 0 {
        return Err(ExecError::Tensor {
            name: "spec".into(),
            detail: format!("{} heads do not divide dim {d}", spec.heads),
        });
    }
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
    let gates = (0..2 * spec.layers)
        .map(|l| gate(t, l, d, if l % 2 == 0 { spec.heads } else { spec.mlp }))
        .collect::<Result<Vec<_>, ExecError>>()?;
    Ok(VitExec {
        embed: linear(t, "embed", spec.t_in * spec.channels * cell, d)?,
        layers,
        norm: norm(t, "norm", d)?,
        head: linear(t, "head", d, spec.t_out * spec.channels * cell)?,
        generator: generator(t, &spec.masking, spec.channels, spec.patch)?,
        gates,
        spec,
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

fn convlstm_from_tensors(spec: ConvLstmSpec, t: &Tensors) -> Result<ConvLstmExec, ExecError> {
    let (hid, units, c, st) = (spec.hidden, spec.units, spec.channels, spec.stride);
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
    let gates = (0..spec.cells).map(|l| gate(t, l, hid, units)).collect::<Result<Vec<_>, ExecError>>()?;
    Ok(ConvLstmExec {
        enc_in: conv(t, "enc_in", hid, c, 3, 1)?,
        enc_down: Conv::from_oihw(down_w, down_b, hid, hid, st, st, 0),
        cells,
        dec_proj: conv(t, "dec_proj", hid, units, 1, 1)?,
        dec_up: transposed_as_1x1(t, "dec_up", hid, st)?,
        dec_out: conv(t, "dec_out", c, hid, 3, 1)?,
        generator: generator(t, &spec.masking, c, spec.patch)?,
        gates,
        spec,
    })
}

fn cnn_from_tensors(spec: CnnSpec, t: &Tensors) -> Result<CnnExec, ExecError> {
    let (hid, units, c) = (spec.hidden, spec.units, spec.channels);
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
    let gates = (0..spec.blocks).map(|l| gate(t, l, hid, units)).collect::<Result<Vec<_>, ExecError>>()?;
    Ok(CnnExec {
        enc_in: conv(t, "enc_in", hid, spec.t_in * c, 3, 1)?,
        enc_down: conv(t, "enc_down", hid, hid, 3, st)?,
        blocks,
        dec_up,
        dec_out: conv(t, "dec_out", spec.t_out * c, hid, 3, 1)?,
        generator: generator(t, &spec.masking, c, spec.patch)?,
        gates,
        spec,
    })
}
