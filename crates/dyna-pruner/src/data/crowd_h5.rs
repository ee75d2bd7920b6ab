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

/// Writes a series in the same layout (`data` as f64 `(T, C, H, W)`, `date` as `YYYYMMDDHH`),
/// e.g. to turn synthetic data into a file the readers and the CLI accept.
pub fn write(path: &Path, series: &FrameSeries) -> Result<()> {
    use hdf5_writer::DatasetBuilder;
    let fail = |e| super::hdf5::write_error(path, e);
    let t = series.len() as u64;
    let values: Vec<f64> = series.values.iter().map(|&v| v as f64).collect();
    let dates: Vec<String> = series.stamps.iter().map(|s| format!("{}{:02}", s.date, s.slot.rem_euclid(24))).collect();
    let shape = vec![t, series.channels as u64, series.height as u64, series.width as u64];
    super::hdf5::write(
        path,
        vec![
            DatasetBuilder::typed_data("data", shape, &values).map_err(fail)?,
            DatasetBuilder::fixed_string_data("date", vec![t], &dates).map_err(fail)?,
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic::crowd_series;

    fn temp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("dyna-pruner-crowd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    #[test]
    fn round_trips_through_the_file_layout() {
        let s = crowd_series(4, 3, 2, 0, 1);
        let path = temp("roundtrip.h5");
        write(&path, &s).unwrap();
        let back = read(&path, SlotFormat::Auto).unwrap();
        assert_eq!(back.values, s.values);
        assert_eq!(back.stamps, s.stamps);
    }

    #[test]
    fn missing_file_is_an_io_error_naming_it() {
        let err = read(Path::new("/nonexistent/taxi.h5"), SlotFormat::Auto).unwrap_err();
        assert!(matches!(err, Error::Io { .. }));
        assert!(err.to_string().contains("/nonexistent/taxi.h5"));
    }

    #[test]
    fn a_file_that_is_not_hdf5_is_a_format_error() {
        let path = temp("not.h5");
        std::fs::write(&path, b"time,value\n1,2\n").unwrap();
        let err = read(&path, SlotFormat::Auto).unwrap_err();
        assert!(matches!(err, Error::Format { .. }), "{err}");
        assert!(err.to_string().contains("not a valid HDF5"));
    }

    #[test]
    fn hdf5_without_data_names_the_missing_dataset() {
        let path = temp("nodata.h5");
        let date = hdf5_writer::DatasetBuilder::fixed_string_data("date", vec![1], &["2010010100"]).unwrap();
        crate::data::hdf5::write(&path, vec![date]).unwrap();
        let err = read(&path, SlotFormat::Auto).unwrap_err();
        assert!(matches!(&err, Error::MissingField { field, .. } if field == "data"), "{err}");
    }

    #[test]
    fn nan_in_data_is_reported_with_its_position() {
        let mut s = crowd_series(4, 3, 1, 0, 2);
        let frame = s.frame_len();
        s.values[5 * frame + 7] = f32::NAN;
        let path = temp("nan.h5");
        write(&path, &s).unwrap();
        let err = read(&path, SlotFormat::Auto).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::BadValues { .. }) && msg.contains("[5, 0, 2, 1]"), "{msg}");
    }

    #[test]
    fn negative_no_data_codes_are_rejected() {
        let mut s = crowd_series(4, 3, 1, 0, 2);
        s.values[3] = -1.0;
        let path = temp("neg.h5");
        write(&path, &s).unwrap();
        assert!(read(&path, SlotFormat::Auto).unwrap_err().to_string().contains("no-data"));
    }

    #[test]
    fn window_longer_than_any_run_is_a_clear_error() {
        // a gap every 6 hours: runs of 5 consecutive slots, windows need 8
        let s = crowd_series(4, 3, 3, 6, 3);
        let path = temp("gaps.h5");
        write(&path, &s).unwrap();
        let source = crate::data::load_crowd(std::slice::from_ref(&path), SlotFormat::Auto).unwrap();
        let horizon = crate::data::Horizon { t_in: 4, lead: 1, t_out: 4 };
        let err = source.all_windows(horizon, std::slice::from_ref(&path)).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, Error::NoWindows { .. }) && msg.contains("longest run of consecutive slots is 5"),
            "{msg}"
        );
    }
}
