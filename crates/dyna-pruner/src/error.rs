//! The library's error type: every variant names the file, field or op and what was expected.

use std::path::PathBuf;

/// Errors of the dyna-pruner library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened or read at all.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file exists but is not in the expected container format.
    #[error("{path} is not a valid {format} file: {detail}")]
    Format { path: PathBuf, format: &'static str, detail: String },
    /// A dataset/array the format requires is absent.
    #[error("{path} has no dataset `{field}` ({expected})")]
    MissingField { path: PathBuf, field: String, expected: String },
    /// A dataset has the wrong shape or type.
    #[error("{path}: field `{field}` {detail}")]
    BadField { path: PathBuf, field: String, detail: String },
    /// Values that cannot be used (NaN, infinities, negative counts, unparsable dates...).
    #[error("{path}: field `{field}` has invalid values: {detail}")]
    BadValues { path: PathBuf, field: String, detail: String },
    /// No input/output window fits in the data under the requested split.
    #[error("no windows of {window} consecutive slots in {what}: {detail}")]
    NoWindows { what: String, window: usize, detail: String },
    /// An invalid configuration value.
    #[error("invalid config{}: `{field}` = {value}; expected {expected}", file.as_ref().map(|f| format!(" {}", f.display())).unwrap_or_default())]
    Config { file: Option<PathBuf>, field: String, value: String, expected: String },
    /// Tensors of incompatible shapes reached an op.
    #[error("shape mismatch in {op}: {detail}")]
    Shape { op: &'static str, detail: String },
    /// Weights that could not be written to or read from bytes.
    #[error("cannot {op}: {detail}")]
    Weights { op: &'static str, detail: String },
    /// A forward pass gave NaN or infinite predictions.
    #[error("the model's prediction is not finite: {detail}")]
    NonFinitePrediction { detail: String },
    /// The GPU was asked for a float type other than the one its first tensor fixed.
    #[error(
        "the GPU already computes in {have} in this process, not {want}: Burn fixes a device's float type at its first tensor, so run each precision in a process of its own"
    )]
    DeviceFloat { want: String, have: String },
    /// A checkpoint directory is incomplete or inconsistent.
    #[error("checkpoint {path}: {detail}")]
    Checkpoint { path: PathBuf, detail: String },
}

/// Result alias of the library.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

impl From<dyna_pruner_spec::SpecError> for Error {
    fn from(e: dyna_pruner_spec::SpecError) -> Self {
        Error::Config { file: None, field: e.field, value: e.value, expected: e.expected }
    }
}

/// An invalid config value: its field, the value and what was expected.
pub(crate) fn bad_value(field: &str, value: impl ToString, expected: impl Into<String>) -> Error {
    dyna_pruner_spec::SpecError::new(field, value, expected).into()
}

/// `v` in `lo..=hi`.
pub(crate) fn in_range(field: &str, v: usize, lo: usize, hi: usize) -> Result<()> {
    Ok(dyna_pruner_spec::in_range(field, v, lo, hi)?)
}

/// `v` in (0, 1].
pub(crate) fn fraction(field: &str, v: f32) -> Result<()> {
    if v > 0.0 && v <= 1.0 {
        Ok(())
    } else {
        Err(bad_value(field, v, "a fraction in (0, 1]"))
    }
}

/// `v` finite and >= 0.
pub(crate) fn non_negative(field: &str, v: f32) -> Result<()> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(bad_value(field, v, "a finite number >= 0"))
    }
}
