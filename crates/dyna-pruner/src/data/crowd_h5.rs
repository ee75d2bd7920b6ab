//! Reader for the ST-ResNet / DeepST crowd-flow HDF5 layout (TaxiBJ, BikeNYC, TaxiNYC):
//! `data` of shape `(T, C, H, W)` (C = 2: in-flow, out-flow) and `date` with one
//! `YYYYMMDDHH` / `YYYYMMDDSS` stamp per row.

use std::path::Path;

use super::hdf5;
use super::series::FrameSeries;
use super::timeslots::{parse_stamps, SlotFormat};
use crate::error::{Error, Result};

/// Reads one crowd-flow HDF5 file into a sorted, de-duplicated series.
pub fn read(path: &Path, format: SlotFormat) -> Result<FrameSeries> {
    let file = hdf5::open(path)?;
    let data = hdf5::dataset(&file, path, "data", "crowd flows of shape (T, C, H, W)")?;
    let shape: Vec<usize> = data.shape().iter().map(|&d| d as usize).collect();
    let [t, c, h, w] = shape[..] else {
        return Err(Error::BadField {
            path: path.to_path_buf(),
            field: "data".into(),
            detail: format!("has shape {shape:?}; expected 4 dimensions (T, C, H, W)"),
        });
    };
    if t == 0 || c == 0 || h == 0 || w == 0 {
        return Err(Error::BadField {
            path: path.to_path_buf(),
            field: "data".into(),
            detail: format!("has an empty dimension: shape {shape:?}"),
        });
    }
    let values = hdf5::read_as_f32(&data, path, "data")?;
    check_counts(&values, path, "data", [c, h, w])?;

    let date = hdf5::dataset(&file, path, "date", "one YYYYMMDDHH or YYYYMMDDSS stamp per row of `data`")?;
    let raw = hdf5::read_as_strings(&date, path, "date")?;
    if raw.len() != t {
        return Err(Error::BadField {
            path: path.to_path_buf(),
            field: "date".into(),
            detail: format!("has {} stamps; `data` has {t} rows", raw.len()),
        });
    }
    let (stamps, _) = parse_stamps(&raw, format).map_err(|detail| Error::BadValues {
        path: path.to_path_buf(),
        field: "date".into(),
        detail,
    })?;
    Ok(FrameSeries::from_rows(c, h, w, values, stamps))
}

/// Flow counts must be finite and non-negative; anything else (NaN, a -1 no-data code) is named
/// with its position `[t, c, y, x]` instead of silently entering training.
pub(crate) fn check_counts(values: &[f32], path: &Path, field: &str, [c, h, w]: [usize; 3]) -> Result<()> {
    if let Some(i) = values.iter().position(|v| !v.is_finite() || *v < 0.0) {
        let frame = c * h * w;
        let (t, r) = (i / frame, i % frame);
        let what = if values[i].is_finite() { "a negative value (no-data code?)" } else { "a non-finite value" };
        return Err(Error::BadValues {
            path: path.to_path_buf(),
            field: field.into(),
            detail: format!(
                "{what} {} at [{t}, {}, {}, {}]; expected finite counts >= 0",
                values[i],
                r / (h * w),
                (r / w) % h,
                r % w
            ),
        });
    }
    Ok(())
}
