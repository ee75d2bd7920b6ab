//! dyna-pruner: input-dependent co-pruning of data and model for spatio-temporal prediction.
//!
//! The path of the data: [`data`] (file -> windows -> batch) -> [`method`] (mask generator ->
//! importance S -> DataMask + ModelMask) -> [`backbones`] -> [`metrics`]. [`model`] wraps a
//! backbone with the method, [`train`] fits it, [`eval`] scores it, [`macs`] counts its cost.
//! See docs/ARCHITECTURE.md.

pub mod backbones;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod error;
pub mod eval;
pub mod export;
pub mod gathered;
pub mod macs;
pub mod method;
pub mod metrics;
pub mod model;
pub mod train;

pub use error::{Error, Result};

/// The CPU backend (pure-Rust `flex`).
pub type CpuBackend = burn::backend::Flex;
/// The CPU backend with autodiff, for training.
pub type TrainBackend = burn::backend::Autodiff<CpuBackend>;

/// The CUDA backend (feature `cuda`): operations queue in Burn's fusion layer, which merges
/// element-wise chains into one kernel. `F` is the float element: `f32`, or `bf16` (weights,
/// activations and kernel operands in bf16; the gathered kernels accumulate in f32).
#[cfg(feature = "cuda")]
pub type CudaBackend<F = f32> = burn::backend::Cuda<F>;
/// The CUDA backend without the fusion layer (feature `cuda`): each operation launches its
/// kernel when called (less host work per operation, no merged kernels).
#[cfg(feature = "cuda")]
pub type CudaDirectBackend<F = f32> = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, F, i32, u8>;
/// The GPU's device (feature `cuda`), with every float tensor created on it in `F`. Burn fixes
/// a device's float type at its first tensor, whatever the element type of the backend that
/// creates it (a `CudaBackend<bf16>` tensor made after a `CudaBackend<f32>` one is f32), so a
/// process computes in one precision per device: another is an [`Error::DeviceFloat`].
#[cfg(feature = "cuda")]
pub fn cuda_device<F: burn_cubecl::FloatElement>() -> Result<burn::backend::cuda::CudaDevice> {
    use burn::tensor::DType;
    let device = Default::default();
    let have: DType = burn::tensor::get_device_settings::<CudaBackend<F>>(&device).float_dtype.into();
    let want = F::dtype();
    if have != want {
        return Err(Error::DeviceFloat { want: format!("{want:?}"), have: format!("{have:?}") });
    }
    Ok(device)
}
/// The CUDA backend with autodiff, for training (feature `cuda`).
#[cfg(feature = "cuda")]
pub type CudaTrainBackend = burn::backend::Autodiff<CudaBackend>;
