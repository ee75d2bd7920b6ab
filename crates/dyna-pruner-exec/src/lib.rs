//! Sparse inference executor for dyna-pruner models.
//!
//! Runs the hard-masked sub-network for real: for each prunable layer only the kept output
//! positions and only the kept units are computed, by a register-blocked kernel that reads each
//! position's window in place (`fma`), tiles of all samples in parallel; results are written
//! back and pruned positions take the identity path. The dense forward of the same model through
//! the same kernels is the fair dense baseline. No deep-learning framework: plain f32 slices,
//! AVX2 + FMA intrinsics (plain loops where the CPU lacks them), the `gemm` crate for the ViT's
//! matrix products, rayon. Models come from an exported file (`format`), written by the trainer;
//! their architecture and masking are the shared spec (`dyna-pruner-spec`).
//!
//! Modules, leaves first: `activation` and `pool` (no crate imports), `fma` (the register-blocked
//! kernel), `winograd` (F(4x4, 3x3) tiles on that kernel), `kernels` (convolution scheduling,
//! GEMM, upsampling), `plan` (the types a forward takes and returns), `masks` (mask generator,
//! DataMask, unit gates), one file per backbone, `format` (the exported file), `prune` (static
//! structured pruning of an exported model).

mod activation;
pub mod cnn;
pub mod convlstm;
mod fma;
pub mod format;
pub mod kernels;
pub mod masks;
pub mod plan;
pub mod pool;
pub mod prune;
pub mod vit;
mod winograd;

/// Deterministic test values in [-1, 1).
#[cfg(test)]
pub(crate) fn pseudo(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0).collect()
}

pub use cnn::{CnnExec, UnitExecution};
pub use convlstm::ConvLstmExec;
pub use dyna_pruner_spec as spec;
pub use format::ExportedModel;
pub use plan::{MaskPlan, Output, SampleMasks};
pub use vit::VitExec;

/// Makes glibc keep freed memory for reuse instead of handing it back to the OS: a forward pass
/// allocates and frees several feature maps of tens of MB, which glibc otherwise maps fresh
/// (and the kernel zeroes page by page) on every call. A process-wide policy, so binaries call
/// it once at start; no-op off glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes allocator tuning parameters; it is called with valid
    // parameter names and values, and before any other thread exists in the binaries.
    #[allow(unsafe_code)]
    unsafe {
        // 32 MiB is glibc's largest allowed threshold on 64-bit; setting it also stops the
        // threshold from adapting. -1 turns off trimming the heap top.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
    }
}

/// An exported model of any backbone, ready to run.
#[derive(Debug, Clone)]
pub enum Exec {
    Cnn(CnnExec),
    Vit(VitExec),
    ConvLstm(ConvLstmExec),
}

impl Exec {
    /// Runs a batch `x` (`[batch, t_in, channels, h, w]`, scaled) under `plan`.
    pub fn forward(
        &self,
        x: &[f32],
        batch: usize,
        h: usize,
        w: usize,
        plan: MaskPlan<'_>,
    ) -> Result<Output, ExecError> {
        // On a pool thread, so that each layer's parallel loop is split there instead of being
        // handed from the calling thread to the pool and waited for, once per loop.
        rayon::scope(|_| match self {
            Exec::Cnn(m) => m.forward(x, batch, h, w, plan),
            Exec::Vit(m) => m.forward(x, batch, h, w, plan),
            Exec::ConvLstm(m) => m.forward(x, batch, h, w, plan),
        })
    }

    /// The model's architecture.
    pub fn arch(&self) -> &spec::Architecture {
        match self {
            Exec::Cnn(m) => &m.arch,
            Exec::Vit(m) => &m.arch,
            Exec::ConvLstm(m) => &m.arch,
        }
    }

    /// Sets how a CNN's blocks run the kept units; the other backbones always select them.
    /// Returns whether the model has that choice.
    pub fn set_unit_execution(&mut self, mode: UnitExecution) -> bool {
        match self {
            Exec::Cnn(m) => {
                m.unit_execution = mode;
                true
            }
            Exec::Vit(_) | Exec::ConvLstm(_) => false,
        }
    }

    /// The importance map S `[hp * wp]` of one sample `x` (`[t_in, channels, h, w]`, scaled).
    pub fn importance(&self, x: &[f32], h: usize, w: usize) -> Vec<f32> {
        let t = self.arch().frames.t_in;
        let generator = match self {
            Exec::Cnn(m) => &m.generator,
            Exec::Vit(m) => &m.generator,
            Exec::ConvLstm(m) => &m.generator,
        };
        generator.importance(x, t, h, w).0
    }

    /// The masks the model runs with under [`MaskPlan::Dynamic`].
    pub fn masking(&self) -> spec::Masking {
        match self {
            Exec::Cnn(m) => m.masking,
            Exec::Vit(m) => m.masking,
            Exec::ConvLstm(m) => m.masking,
        }
    }

    /// Runs [`MaskPlan::Dynamic`] with `masking` from now on; a budget-conditioned model's
    /// generator and gates read its keep ratios (check them against the trained range first:
    /// `Masking::with_keep`).
    pub fn set_masking(&mut self, masking: spec::Masking) {
        let (own, generator, gates) = match self {
            Exec::Cnn(m) => (&mut m.masking, &mut m.generator, &mut m.gates),
            Exec::Vit(m) => (&mut m.masking, &mut m.generator, &mut m.gates),
            Exec::ConvLstm(m) => (&mut m.masking, &mut m.generator, &mut m.gates),
        };
        *own = masking;
        let budget = masking.budget_inputs();
        for inputs in std::iter::once(&mut generator.budget).chain(gates.iter_mut().map(|g| &mut g.budget)) {
            if !inputs.is_empty() {
                inputs.copy_from_slice(&budget);
            }
        }
    }
}

/// Checks a batch `x` of `batch` samples `[t, c, h, w]` and, for given masks, that there is one
/// per sample with `layers` unit lists; returns the values per sample.
pub(crate) fn check_input(
    x: &[f32],
    batch: usize,
    [t, c, h, w]: [usize; 4],
    plan: MaskPlan<'_>,
    layers: usize,
) -> Result<usize, ExecError> {
    let per_sample = t * c * h * w;
    if x.len() != batch * per_sample || batch == 0 {
        return Err(ExecError::Input { got: x.len(), expected: format!("[{batch}, {t}, {c}, {h}, {w}]") });
    }
    if let MaskPlan::Given(m) = plan {
        if m.len() != batch || m.iter().any(|m| m.units.len() != layers) {
            return Err(ExecError::Input {
                got: m.len(),
                expected: format!("masks for {batch} samples and {layers} layers"),
            });
        }
    }
    Ok(per_sample)
}

/// Errors of the executor.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not an exported dyna-pruner model: {detail}")]
    Format { path: std::path::PathBuf, detail: String },
    #[error("tensor `{name}`: {detail}")]
    Tensor { name: String, detail: String },
    #[error("input of {got} values does not match {expected}")]
    Input { got: usize, expected: String },
}
