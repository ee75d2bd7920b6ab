//! `--device`: which backend runs the work.

use clap::ValueEnum;

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
                let $dev = Default::default();
                $body
            }
            #[cfg(not(feature = "cuda"))]
            $crate::device::DeviceArg::Cuda => {
                anyhow::bail!("this binary was built without CUDA support; rebuild with `--features cuda`")
            }
        }
    }};
}
