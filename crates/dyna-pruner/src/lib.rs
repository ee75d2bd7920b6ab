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

/// The CUDA backend (feature `cuda`).
#[cfg(feature = "cuda")]
pub type CudaBackend = burn::backend::Cuda;
/// The CUDA backend with autodiff, for training (feature `cuda`).
#[cfg(feature = "cuda")]
pub type CudaTrainBackend = burn::backend::Autodiff<CudaBackend>;
