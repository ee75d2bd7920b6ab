//! `--device`: which backend runs the work.

use clap::ValueEnum;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// The pure-Rust `flex` CPU backend.
    Cpu,
    /// NVIDIA GPU through Burn's CUDA backend (needs the `cuda` feature).
    Cuda,
}

/// Runs `$body` with `$B` bound to the inference backend and `$T` to the training backend of
/// `$device`, and `$dev` to its device value.
#[macro_export]
macro_rules! with_backend {
    ($device:expr, |$B:ident, $T:ident, $dev:ident| $body:expr) => {{
        match $device {
            $crate::device::DeviceArg::Cpu => {
                type $B = dyna_pruner::CpuBackend;
                #[allow(dead_code)]
                type $T = dyna_pruner::TrainBackend;
                let $dev = Default::default();
                $body
            }
            #[cfg(feature = "cuda")]
            $crate::device::DeviceArg::Cuda => {
                type $B = dyna_pruner::CudaBackend;
                #[allow(dead_code)]
                type $T = dyna_pruner::CudaTrainBackend;
                let $dev = dyna_pruner::cuda_device::<f32>()?;
                $body
            }
            #[cfg(not(feature = "cuda"))]
            $crate::device::DeviceArg::Cuda => {
                anyhow::bail!("this binary was built without CUDA support; rebuild with `--features cuda`")
            }
        }
    }};
    // With a float element: bf16 runs on the GPU only.
    ($device:expr, $precision:expr, |$B:ident, $T:ident, $dev:ident| $body:expr) => {{
        match ($device, $precision) {
            (_, $crate::device::Precision::F32) => $crate::with_backend!($device, |$B, $T, $dev| $body),
            #[cfg(feature = "cuda")]
            ($crate::device::DeviceArg::Cuda, $crate::device::Precision::Bf16) => {
                type $B = dyna_pruner::CudaBackend<burn::tensor::bf16>;
                #[allow(dead_code)]
                type $T = burn::backend::Autodiff<$B>;
                let $dev = dyna_pruner::cuda_device::<burn::tensor::bf16>()?;
                $body
            }
            (_, $crate::device::Precision::Bf16) => {
                anyhow::bail!("--precision bf16 runs on the GPU (`--device cuda` in a build with `--features cuda`); the CPU backend computes in f32")
            }
        }
    }};
}

/// The float element of Burn's backend (`--precision`; bf16 on the GPU only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 storage and arithmetic.
    F32,
    /// bf16 weights and activations; the gathered kernels accumulate in f32.
    Bf16,
}

/// How the GPU backend launches its kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Launch {
    /// Through Burn's fusion layer (element-wise chains merged into one kernel).
    Fused,
    /// Each operation's kernel launched when called (no fusion layer).
    Direct,
}

#[cfg(feature = "cuda")]
impl Precision {
    /// The largest difference from the f32 masked-dense reference accepted, relative to the
    /// reference's largest value: f32 rounding, or bf16's 8-bit mantissa through the network.
    pub fn tolerance(self) -> f64 {
        match self {
            Precision::F32 => 1e-3,
            Precision::Bf16 => 5e-2,
        }
    }
}
