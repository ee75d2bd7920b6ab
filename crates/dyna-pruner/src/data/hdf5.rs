//! Small helpers over the pure-Rust `hdf5-reader` and `hdf5-writer`: open a file and read numeric
//! or string datasets with errors that name the file and the dataset; write datasets to a file.

use std::path::Path;

use hdf5_reader::{Datatype, Hdf5File};

use crate::error::{Error, Result};

/// Opens an HDF5 file, telling a missing file apart from a file that is not HDF5.
pub fn open(path: &Path) -> Result<Hdf5File> {
    if let Err(source) = std::fs::metadata(path) {
        return Err(Error::io(path, source));
    }
    Hdf5File::open(path).map_err(|e| Error::Format { path: path.to_path_buf(), format: "HDF5", detail: e.to_string() })
}

/// Looks up a dataset, naming what was expected when it is absent.
pub fn dataset(file: &Hdf5File, path: &Path, field: &str, expected: &str) -> Result<hdf5_reader::Dataset> {
    file.dataset(field).map_err(|_| Error::MissingField {
        path: path.to_path_buf(),
        field: field.to_string(),
        expected: expected.to_string(),
    })
}

/// An `hdf5-writer` error as a format error naming the file being written.
pub fn write_error(path: &Path, e: hdf5_writer::Error) -> Error {
    Error::Format { path: path.to_path_buf(), format: "HDF5", detail: e.to_string() }
}

/// Writes `datasets` (paths with `/` make groups) as the HDF5 file `path`.
pub fn write(path: &Path, datasets: Vec<hdf5_writer::DatasetBuilder>) -> Result<()> {
    use hdf5_writer::{Hdf5Builder, Hdf5Writer, WriteOptions};
    let plan = datasets
        .into_iter()
        .fold(Hdf5Builder::new(), Hdf5Builder::dataset)
        .into_plan()
        .map_err(|e| write_error(path, e))?;
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    Hdf5Writer::new(file, WriteOptions::default()).finish(plan).map_err(|e| write_error(path, e))?;
    Ok(())
}

fn bad_read(path: &Path, field: &str, e: impl std::fmt::Display) -> Error {
    Error::BadField { path: path.to_path_buf(), field: field.to_string(), detail: format!("could not be read: {e}") }
}

/// Deflate, the strongest HDF5 filter in use, shrinks data at most about 1032-fold.
const MAX_COMPRESSION: u64 = 1100;

/// The element count `ds` declares, refused when `element_size`-byte elements that many could
/// not come out of the file at `path` (a corrupt header would otherwise make the reader
/// allocate terabytes and abort).
fn element_count(ds: &hdf5_reader::Dataset, path: &Path, field: &str, element_size: usize) -> Result<usize> {
    let n = ds.num_elements().map_err(|e| bad_read(path, field, e))?;
    let file_len = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
    let most = file_len.saturating_mul(MAX_COMPRESSION);
    match n.checked_mul(element_size as u64) {
        Some(bytes) if bytes <= most => Ok(n as usize),
        _ => Err(Error::BadField {
            path: path.to_path_buf(),
            field: field.to_string(),
            detail: format!(
                "declares {n} elements of shape {:?}, more than a file of {file_len} bytes can hold",
                ds.shape()
            ),
        }),
    }
}

/// The values of `ds` as stored (`T` must be its element type), after the size check.
pub(super) fn read_typed<T: hdf5_reader::H5Type + Copy + Default>(
    ds: &hdf5_reader::Dataset,
    path: &Path,
    field: &str,
) -> Result<Vec<T>> {
    let n = element_count(ds, path, field, std::mem::size_of::<T>())?;
    let mut raw = vec![T::default(); n];
    ds.read_into(&mut raw).map_err(|e| bad_read(path, field, e))?;
    Ok(raw)
}

/// Reads any integer or float dataset, converting each element with `as`, in row-major order.
macro_rules! read_numeric_as {
    ($name:ident, $out:ty, $doc:literal) => {
        #[doc = $doc]
        pub fn $name(ds: &hdf5_reader::Dataset, path: &Path, field: &str) -> Result<Vec<$out>> {
            macro_rules! conv {
                ($t:ty) => {
                    read_typed::<$t>(ds, path, field).map(|v| v.into_iter().map(|x| x as $out).collect())
                };
            }
            match ds.dtype() {
                Datatype::FloatingPoint { size: 8, .. } => conv!(f64),
                Datatype::FloatingPoint { size: 4, .. } => conv!(f32),
                Datatype::FixedPoint { size: 1, signed, .. } => {
                    if *signed {
                        conv!(i8)
                    } else {
                        conv!(u8)
                    }
                }
                Datatype::FixedPoint { size: 2, signed, .. } => {
                    if *signed {
                        conv!(i16)
                    } else {
                        conv!(u16)
                    }
                }
                Datatype::FixedPoint { size: 4, signed, .. } => {
                    if *signed {
                        conv!(i32)
                    } else {
                        conv!(u32)
                    }
                }
                Datatype::FixedPoint { size: 8, signed, .. } => {
                    if *signed {
                        conv!(i64)
                    } else {
                        conv!(u64)
                    }
                }
                other => Err(Error::BadField {
                    path: path.to_path_buf(),
                    field: field.to_string(),
                    detail: format!("has type {other:?}; expected a numeric (integer or float) type"),
                }),
            }
        }
    };
}

read_numeric_as!(read_as_f32, f32, "Reads any numeric dataset as `f32` (row-major).");
read_numeric_as!(read_as_f64, f64, "Reads any numeric dataset as `f64` (row-major; exact for integers below 2^53).");

/// Reads a string dataset (fixed or variable length), or an integer dataset rendered as decimal
/// strings (some tools store `YYYYMMDDHH` dates as integers).
pub fn read_as_strings(ds: &hdf5_reader::Dataset, path: &Path, field: &str) -> Result<Vec<String>> {
    match ds.dtype() {
        Datatype::FixedPoint { .. } => Ok(read_as_f64(ds, path, field)?.iter().map(|v| format!("{v:.0}")).collect()),
        _ => ds
            .read_strings()
            .map(|v| v.into_iter().map(|s| s.trim_end_matches('\0').trim().to_string()).collect())
            .map_err(|e| bad_read(path, field, e)),
    }
}
