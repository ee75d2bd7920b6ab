//! Radar precipitation frames on SEVIR's 0-255 VIL pixel scale; no-data pixels become NaN (kept
//! out of the loss and the metrics downstream).
//!
//! - KNMI 5-minute composites (`RAD_NL25_RAP_5min_YYYYMMDDHHMM.h5`, one file per frame,
//!   `/image1/image_data` uint16 in 0.01 mm per 5 minutes, 65535 = no data), mapped by
//!   [`knmi_to_vil_scale`].
//! - SEVIR (`CATALOG.csv` + HDF5 files with `vil` `(N, 384, 384, 49)` uint8 and `id`): the
//!   catalog's `vil` events without missing data, each event a run of 49 five-minute frames.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use hdf5_reader::{Datatype, SliceInfo, SliceInfoElem};

use super::hdf5::{dataset, open, read_as_strings, read_typed, write, write_error};
use super::series::{Domain, FrameSeries};
use super::timeslots::{date_of_days, days_from_civil, parse_date, Stamp};
use crate::error::{Error, Result};

/// The KNMI no-data code (missing and outside the radar range).
pub const KNMI_NO_DATA: u16 = 65535;
/// Five-minute slots per day.
const SLOTS_PER_DAY: i64 = 288;
/// Frames of one SEVIR event.
pub const SEVIR_FRAMES: usize = 49;

/// Maps a KNMI value (5-minute accumulation in 0.01 mm) to SEVIR's 0-255 scale: rain rate
/// `R = 12 * 0.01 * pv` mm/h, reflectivity `dBZ = 10 log10(200 R^1.6)` (Marshall-Palmer), pixel
/// `255 * dBZ / 70` clamped to 0..=255; no rain is 0 and no data NaN. The smallest non-zero
/// value (0.12 mm/h) maps to about 30, 1 mm/h to 84, 10 mm/h to 142, 100 mm/h to 200, so the
/// CSI thresholds 16, 74, 133, 160, 181, 219 sit near 0.07, 0.7, 7, 20, 45, 150 mm/h.
pub fn knmi_to_vil_scale(pv: u16) -> f32 {
    if pv == KNMI_NO_DATA {
        return f32::NAN;
    }
    if pv == 0 {
        return 0.0;
    }
    let rate = 0.12 * pv as f32;
    let dbz = 10.0 * (200.0 * rate.powf(1.6)).log10();
    (255.0 * dbz / 70.0).clamp(0.0, 255.0)
}

/// The time stamp in a KNMI file name (`..._YYYYMMDDHHMM.h5`, the end of the 5-minute interval).
fn knmi_stamp(path: &Path) -> Result<Stamp> {
    let bad = || Error::BadField {
        path: path.to_path_buf(),
        field: "file name".into(),
        detail: "does not end in _YYYYMMDDHHMM.h5 with minutes a multiple of 5".into(),
    };
    let stem = path.file_stem().and_then(|s| s.to_str()).ok_or_else(bad)?;
    let digits = stem.rsplit('_').next().ok_or_else(bad)?;
    if digits.len() != 12 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let (y, m, d) = parse_date(&digits[..8]).ok_or_else(bad)?;
    let (hh, mm): (i64, i64) = (digits[8..10].parse().map_err(|_| bad())?, digits[10..].parse().map_err(|_| bad())?);
    if hh > 23 || mm > 59 || mm % 5 != 0 {
        return Err(bad());
    }
    let days = days_from_civil(y, m, d);
    Ok(Stamp { date: date_of_days(days), slot: days * SLOTS_PER_DAY + (hh * 60 + mm) / 5 })
}

/// The `.h5` files of `paths`: files as given, directories expanded to their `.h5` files.
pub fn h5_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let entries = std::fs::read_dir(p).map_err(|e| Error::io(p, e))?;
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "h5"))
                .collect();
            files.sort();
            out.extend(files);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// Mean of `pool x pool` blocks (NaN when any pixel of the block is no data); the frame is
/// cropped to whole blocks.
fn pool_frame(frame: &[f32], h: usize, w: usize, pool: usize) -> Vec<f32> {
    let (ph, pw) = (h / pool, w / pool);
    let mut out = vec![0.0f32; ph * pw];
    for (i, o) in out.iter_mut().enumerate() {
        let (r, c) = (i / pw * pool, i % pw * pool);
        let mut sum = 0.0;
        for y in r..r + pool {
            sum += frame[y * w + c..y * w + c + pool].iter().sum::<f32>();
        }
        *o = sum / (pool * pool) as f32;
    }
    out
}

/// The image of a KNMI composite file.
const KNMI_IMAGE: &str = "image1/image_data";

/// The raw image of one KNMI composite: rows, columns and the uint16 values (0.01 mm, 65535 =
/// no data).
pub fn read_knmi_image(path: &Path) -> Result<(usize, usize, Vec<u16>)> {
    let file = open(path)?;
    let ds = dataset(&file, path, KNMI_IMAGE, "uint16 (rows, cols) in 0.01 mm, 65535 = no data")?;
    let dims = ds.shape().to_vec();
    if !matches!(ds.dtype(), Datatype::FixedPoint { size: 2, signed: false, .. }) || dims.len() != 2 {
        return Err(Error::BadField {
            path: path.to_path_buf(),
            field: KNMI_IMAGE.into(),
            detail: format!("is {:?} with shape {dims:?}; expected uint16 (rows, cols)", ds.dtype()),
        });
    }
    let raw = read_typed::<u16>(&ds, path, KNMI_IMAGE)?;
    Ok((dims[0] as usize, dims[1] as usize, raw))
}

/// Writes `values` (`rows x cols`, KNMI's uint16 coding) as a KNMI composite file holding
/// only what [`read_knmi`] reads; the time is in the file name (`..._YYYYMMDDHHMM.h5`).
pub fn write_knmi_image(path: &Path, rows: usize, cols: usize, values: &[u16]) -> Result<()> {
    let image = hdf5_writer::DatasetBuilder::typed_data(KNMI_IMAGE, vec![rows as u64, cols as u64], values)
        .map_err(|e| write_error(path, e))?;
    write(path, vec![image])
}

/// Reads KNMI composites (files or directories of them) into one series, ordered by the time
/// in the file names, averaged over `pool x pool` pixel blocks.
pub fn read_knmi(paths: &[PathBuf], pool: usize) -> Result<FrameSeries> {
    let files = h5_files(paths)?;
    if files.is_empty() {
        return Err(Error::Config {
            file: None,
            field: "data.files".into(),
            value: format!("{paths:?}"),
            expected: "KNMI HDF5 files or directories holding them".into(),
        });
    }
    let (mut values, mut stamps) = (Vec::new(), Vec::new());
    let mut shape: Option<(usize, usize, PathBuf)> = None;
    for path in &files {
        let stamp = knmi_stamp(path)?;
        let (h, w, raw) = read_knmi_image(path)?;
        match &shape {
            Some((sh, sw, first)) if (*sh, *sw) != (h, w) => {
                return Err(Error::BadField {
                    path: path.clone(),
                    field: KNMI_IMAGE.into(),
                    detail: format!("is {h}x{w} but {} is {sh}x{sw}", first.display()),
                })
            }
            None => shape = Some((h, w, path.clone())),
            _ => {}
        }
        let frame: Vec<f32> = raw.into_iter().map(knmi_to_vil_scale).collect();
        values.extend(pool_frame(&frame, h, w, pool));
        stamps.push(stamp);
    }
    let (h, w, _) = shape.expect("at least one file");
    let mut series = FrameSeries::from_rows(1, h / pool, w / pool, values, stamps);
    series.domain = Domain::Radar;
    Ok(series)
}

/// One row of SEVIR's catalog that the reader uses.
#[derive(Debug, Clone, PartialEq)]
pub struct SevirEvent {
    pub id: String,
    /// Relative to the data directory, as in the catalog.
    pub file_name: String,
    pub file_index: usize,
    /// Start of the event: days since 1970-01-01 and minutes of the day.
    pub days: i64,
    pub minute: i64,
}

/// The `vil` events of a SEVIR `CATALOG.csv` with `pct_missing == 0`, in catalog order.
pub fn read_catalog(path: &Path) -> Result<Vec<SevirEvent>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split(',').map(str::trim).collect();
    let column = |name: &str| {
        header.iter().position(|h| *h == name).ok_or_else(|| Error::MissingField {
            path: path.to_path_buf(),
            field: name.to_string(),
            expected: "a column of SEVIR's CATALOG.csv".into(),
        })
    };
    let [id, file_name, file_index, img_type, time_utc, pct_missing] =
        ["id", "file_name", "file_index", "img_type", "time_utc", "pct_missing"].map(column);
    let (id, file_name, file_index, img_type, time_utc, pct_missing) =
        (id?, file_name?, file_index?, img_type?, time_utc?, pct_missing?);
    let mut events = Vec::new();
    for (row, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        let bad = |what: &str| Error::BadValues {
            path: path.to_path_buf(),
            field: format!("row {}", row + 2),
            detail: format!("{what}: `{line}`"),
        };
        let cell = |c: usize| cells.get(c).copied().ok_or_else(|| bad("too few columns"));
        if cell(img_type)? != "vil" || cell(pct_missing)?.parse::<f64>().map_err(|_| bad("pct_missing"))? != 0.0 {
            continue;
        }
        let time = cell(time_utc)?;
        let (date, clock) = time.split_once(' ').ok_or_else(|| bad("time_utc is not `YYYY-MM-DD HH:MM:SS`"))?;
        let (y, m, d) = parse_date(date).ok_or_else(|| bad("time_utc has no valid date"))?;
        let hm: Vec<i64> = clock.split(':').map(|p| p.parse().unwrap_or(-1)).collect();
        if hm.len() < 2 || !(0..24).contains(&hm[0]) || !(0..60).contains(&hm[1]) {
            return Err(bad("time_utc has no valid time"));
        }
        events.push(SevirEvent {
            id: cell(id)?.to_string(),
            file_name: cell(file_name)?.to_string(),
            file_index: cell(file_index)?.parse().map_err(|_| bad("file_index is not an index"))?,
            days: days_from_civil(y, m, d),
            minute: hm[0] * 60 + hm[1],
        });
    }
    if events.is_empty() {
        return Err(Error::BadValues {
            path: path.to_path_buf(),
            field: "img_type/pct_missing".into(),
            detail: "no `vil` event without missing data".into(),
        });
    }
    Ok(events)
}

/// One SEVIR HDF5 file, checked once: its `vil` dataset (uint8 `(N, H, W, 49)`) and event ids.
struct SevirFile {
    vil: hdf5_reader::Dataset,
    events: usize,
    grid: (usize, usize),
    ids: Vec<String>,
}

fn open_sevir_file(path: &Path) -> Result<SevirFile> {
    let file = open(path)?;
    let ids = read_as_strings(&dataset(&file, path, "id", "event ids")?, path, "id")?;
    let vil = dataset(&file, path, "vil", "uint8 (N, 384, 384, 49)")?;
    let dims = vil.shape().to_vec();
    if !matches!(vil.dtype(), Datatype::FixedPoint { size: 1, signed: false, .. })
        || dims.len() != 4
        || dims[3] as usize != SEVIR_FRAMES
    {
        return Err(Error::BadField {
            path: path.to_path_buf(),
            field: "vil".into(),
            detail: format!("is {:?} with shape {dims:?}; expected uint8 (N, H, W, 49)", vil.dtype()),
        });
    }
    Ok(SevirFile { vil, events: dims[0] as usize, grid: (dims[1] as usize, dims[2] as usize), ids })
}

/// Reads the `vil` events of a SEVIR catalog from the HDF5 files under `data_dir` into one series:
/// each event is a run of 49 consecutive slots (dated by its start), events separated by a gap so
/// that no window spans two events. Values stay on the 0-255 scale.
pub fn read_sevir(catalog: &Path, data_dir: &Path) -> Result<FrameSeries> {
    let events = read_catalog(catalog)?;
    // Each file opened and checked once.
    let mut by_file: HashMap<&str, SevirFile> = HashMap::new();
    let (mut values, mut stamps) = (Vec::new(), Vec::new());
    let mut grid: Option<(usize, usize)> = None;
    for (k, ev) in events.iter().enumerate() {
        let path = data_dir.join(&ev.file_name);
        if !by_file.contains_key(ev.file_name.as_str()) {
            if !path.exists() {
                return Err(Error::BadValues {
                    path: catalog.to_path_buf(),
                    field: "file_name".into(),
                    detail: format!("event {} points at {}, which does not exist", ev.id, path.display()),
                });
            }
            by_file.insert(&ev.file_name, open_sevir_file(&path)?);
        }
        let SevirFile { vil, events: in_file, grid: (h, w), ids } = &by_file[ev.file_name.as_str()];
        if ev.file_index >= *in_file {
            return Err(Error::BadValues {
                path: catalog.to_path_buf(),
                field: "file_index".into(),
                detail: format!(
                    "event {} has index {} but {} holds {} events",
                    ev.id,
                    ev.file_index,
                    path.display(),
                    in_file
                ),
            });
        }
        if ids.get(ev.file_index).is_some_and(|id| *id != ev.id) {
            return Err(Error::BadValues {
                path: path.clone(),
                field: "id".into(),
                detail: format!("index {} holds {}, the catalog says {}", ev.file_index, ids[ev.file_index], ev.id),
            });
        }
        let (h, w) = (*h, *w);
        if grid.is_some_and(|g| g != (h, w)) {
            return Err(Error::BadField {
                path: path.clone(),
                field: "vil".into(),
                detail: format!("frames are {h}x{w}, other files' {grid:?}"),
            });
        }
        grid = Some((h, w));
        let all = SliceInfoElem::Slice { start: 0, end: u64::MAX, step: 1 };
        let selection =
            SliceInfo { selections: vec![SliceInfoElem::Index(ev.file_index as u64), all.clone(), all.clone(), all] };
        let block = vil.read_slice::<u8>(&selection).map_err(|e| Error::BadField {
            path: path.clone(),
            field: "vil".into(),
            detail: format!("event {} could not be read: {e}", ev.id),
        })?;
        // (H, W, T) -> (T, H, W)
        let raw: Vec<u8> = block.iter().copied().collect();
        let start = values.len();
        values.resize(start + raw.len(), 0.0);
        for (i, v) in raw.iter().enumerate() {
            let (p, t) = (i / SEVIR_FRAMES, i % SEVIR_FRAMES);
            values[start + t * h * w + p] = *v as f32;
        }
        let base = (k as i64) * (SEVIR_FRAMES as i64 + 1);
        stamps.extend((0..SEVIR_FRAMES as i64).map(|t| {
            let minutes = ev.minute + 5 * t;
            Stamp { date: date_of_days(ev.days + minutes / 1440), slot: base + t }
        }));
    }
    let (h, w) = grid.expect("at least one event");
    let mut series = FrameSeries::from_rows(1, h, w, values, stamps);
    series.domain = Domain::Radar;
    Ok(series)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hdf5_writer::DatasetBuilder;

    fn shipped() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/knmi-radar")
    }

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dyna-pruner-radar-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    fn write_h5(path: &Path, datasets: Vec<DatasetBuilder>) {
        write(path, datasets).unwrap();
    }

    #[test]
    fn vil_scale_mapping() {
        assert!(knmi_to_vil_scale(KNMI_NO_DATA).is_nan());
        assert_eq!(knmi_to_vil_scale(0), 0.0);
        // 1 mm/h = pv 8.33; 10 mm/h: dBZ 39, pixel 142
        let ten = knmi_to_vil_scale(83);
        assert!((ten - 142.0).abs() < 2.0, "{ten}");
        assert!(knmi_to_vil_scale(1) > 16.0 && knmi_to_vil_scale(1) < 74.0);
        assert_eq!(knmi_to_vil_scale(60_000), 255.0);
    }

    #[test]
    fn reads_the_shipped_knmi_frames_in_time_order() {
        let s = read_knmi(&[shipped()], 2).unwrap();
        assert_eq!((s.len(), s.channels, s.height, s.width), (92, 1, 382, 350));
        assert_eq!(s.longest_run(), 92, "5-minute frames without gaps");
        assert_eq!(s.stamps[0].date, 20100826);
        let f = s.frame(40);
        let missing = f.iter().filter(|v| v.is_nan()).count() as f32 / f.len() as f32;
        let wet = f.iter().filter(|v| **v >= 16.0).count();
        assert!(missing > 0.05 && missing < 0.9, "no-data fraction {missing}");
        assert!(wet > 100, "rain in the frame");
        assert!(f.iter().filter(|v| v.is_finite()).all(|v| (0.0..=255.0).contains(v)));
    }

    #[test]
    fn knmi_errors_name_the_file() {
        // truncated file
        let src = shipped().join("RAD_NL25_RAP_5min_201008260000.h5");
        let bytes = std::fs::read(&src).unwrap();
        let cut = temp("RAD_NL25_RAP_5min_201008260000.h5");
        std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
        let err = read_knmi(std::slice::from_ref(&cut), 1).unwrap_err().to_string();
        assert!(err.contains("RAD_NL25_RAP_5min_201008260000.h5"), "{err}");
        // wrong dtype
        let f32s = temp("RAD_NL25_RAP_5min_201008260005.h5");
        write_h5(&f32s, vec![DatasetBuilder::typed_data("image1/image_data", vec![2, 2], &[0.0f32; 4]).unwrap()]);
        let err = read_knmi(std::slice::from_ref(&f32s), 1).unwrap_err().to_string();
        assert!(err.contains("expected uint16"), "{err}");
        // missing dataset
        let other = temp("RAD_NL25_RAP_5min_201008260010.h5");
        write_h5(&other, vec![DatasetBuilder::typed_data("image2/image_data", vec![2, 2], &[0u16; 4]).unwrap()]);
        let err = read_knmi(std::slice::from_ref(&other), 1).unwrap_err();
        assert!(matches!(&err, Error::MissingField { field, .. } if field == "image1/image_data"), "{err}");
        // a name without a time stamp
        let unnamed = temp("radar.h5");
        std::fs::copy(&src, &unnamed).unwrap();
        assert!(read_knmi(&[unnamed], 1).unwrap_err().to_string().contains("_YYYYMMDDHHMM.h5"));
        // missing file
        let err = read_knmi(&[temp("RAD_NL25_RAP_5min_201008269995.h5")], 1).unwrap_err();
        assert!(matches!(err, Error::Io { .. } | Error::BadField { .. }), "{err}");
    }

    #[test]
    fn a_written_knmi_image_reads_back_as_the_shipped_one() {
        let src = shipped().join("RAD_NL25_RAP_5min_201008260000.h5");
        let (h, w, raw) = read_knmi_image(&src).unwrap();
        let copy = temp("RAD_NL25_RAP_5min_201008261200.h5");
        write_knmi_image(&copy, h, w, &raw).unwrap();
        assert_eq!(read_knmi_image(&copy).unwrap(), (h, w, raw));
        let (a, b) = (read_knmi(&[src], 2).unwrap(), read_knmi(&[copy], 2).unwrap());
        assert_eq!((a.height, a.width), (b.height, b.width));
        assert!(a.values.iter().zip(&b.values).all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    /// Issue 25 (fuzzing): a 55 KB KNMI file whose header declared 800000x700 pixels passed
    /// the size check (then floored at 1 MB of file) and took 21 s and 3.3 GB to read.
    #[test]
    fn issue_25_a_header_declaring_more_pixels_than_the_file_can_hold_is_refused() {
        let bytes = std::fs::read(shipped().join("RAD_NL25_RAP_5min_201008260000.h5")).unwrap();
        let dims = [765u64, 700, 765, 700].map(u64::to_le_bytes).concat();
        let at = bytes.windows(dims.len()).position(|w| w == dims).expect("dims and max dims of the image");
        let mut bad = bytes.clone();
        bad[at..at + 32].copy_from_slice(&[800_000u64, 700, 800_000, 700].map(u64::to_le_bytes).concat());
        let path = temp("RAD_NL25_RAP_5min_201008261300.h5");
        std::fs::write(&path, &bad).unwrap();
        let started = std::time::Instant::now();
        let err = read_knmi(std::slice::from_ref(&path), 1).unwrap_err().to_string();
        assert!(err.contains("image1/image_data") && err.contains("more than a file of"), "{err}");
        assert!(started.elapsed().as_secs() < 5);
    }

    /// A SEVIR-layout data set built from the real KNMI frames: two 49-frame events cut from a
    /// 384x384 window of the composite (uint8 VIL scale, no data as 0, as SEVIR has no gaps).
    fn sevir_fixture(dir: &Path) -> PathBuf {
        let s = read_knmi(&[shipped()], 1).unwrap();
        let (h, w, n) = (384usize, 384usize, SEVIR_FRAMES);
        let (top, left) = (200, 150);
        let mut vil = vec![0u8; 2 * h * w * n];
        for (e, first) in [0usize, 43].into_iter().enumerate() {
            for t in 0..n {
                let f = s.frame(first + t);
                for y in 0..h {
                    for x in 0..w {
                        let v = f[(top + y) * s.width + left + x];
                        vil[((e * h + y) * w + x) * n + t] = if v.is_nan() { 0 } else { v.round() as u8 };
                    }
                }
            }
        }
        std::fs::create_dir_all(dir.join("data/vil/2019")).unwrap();
        write_h5(
            &dir.join("data/vil/2019/SEVIR_VIL_TEST.h5"),
            vec![
                DatasetBuilder::typed_data("vil", vec![2, h as u64, w as u64, n as u64], &vil).unwrap(),
                DatasetBuilder::fixed_string_data("id", vec![2], &["S001", "S002"]).unwrap(),
            ],
        );
        let catalog = dir.join("CATALOG.csv");
        std::fs::write(
            &catalog,
            "id,file_name,file_index,img_type,time_utc,minute_offsets,pct_missing\n\
             S001,vil/2019/SEVIR_VIL_TEST.h5,0,vil,2018-12-31 22:00:00,-120:-115,0.0\n\
             S000,vil/2019/SEVIR_IR069_TEST.h5,0,ir069,2019-01-01 00:00:00,-120:-115,0.0\n\
             S009,vil/2019/SEVIR_VIL_TEST.h5,1,vil,2019-03-01 00:00:00,-120:-115,12.5\n\
             S002,vil/2019/SEVIR_VIL_TEST.h5,1,vil,2019-07-01 03:35:00,-120:-115,0.0\n",
        )
        .unwrap();
        catalog
    }

    #[test]
    fn sevir_layout_reads_vil_events_as_runs() {
        let dir = temp("sevir");
        let catalog = sevir_fixture(&dir);
        let s = read_sevir(&catalog, &dir.join("data")).unwrap();
        assert_eq!((s.len(), s.height, s.width), (2 * SEVIR_FRAMES, 384, 384));
        assert_eq!(s.longest_run(), SEVIR_FRAMES, "events do not join");
        // the first event starts 2018-12-31 22:00 and crosses midnight after 24 frames
        assert_eq!((s.stamps[0].date, s.stamps[24].date), (20181231, 20190101));
        assert_eq!(s.stamps[SEVIR_FRAMES].date, 20190701);
        // (H, W, T) was transposed to (T, H, W): frame 5 of event 1 is KNMI frame 48
        let knmi = read_knmi(&[shipped()], 1).unwrap();
        let v = knmi.frame(48)[(200 + 10) * knmi.width + 150 + 20];
        let expect = if v.is_nan() { 0.0 } else { v.round() };
        assert_eq!(s.frame(SEVIR_FRAMES + 5)[10 * 384 + 20], expect);
        // Earthformer's split: 13 -> 12 windows, the first event trains, the second tests
        let w = s.window_starts(25, |i| s.stamps[i].date < 20190101);
        assert!(w.is_empty(), "the first event crosses into 2019");
    }

    #[test]
    fn sevir_errors() {
        let dir = temp("sevir-bad");
        let catalog = sevir_fixture(&dir);
        // a catalog row pointing at a missing file
        let text =
            std::fs::read_to_string(&catalog).unwrap().replace("S002,vil/2019/SEVIR_VIL_TEST", "S002,vil/2019/GONE");
        let bad = dir.join("CATALOG_missing.csv");
        std::fs::write(&bad, text).unwrap();
        let err = read_sevir(&bad, &dir.join("data")).unwrap_err().to_string();
        assert!(err.contains("S002") && err.contains("GONE") && err.contains("does not exist"), "{err}");
        // a missing column
        let nocol = dir.join("CATALOG_nocol.csv");
        std::fs::write(&nocol, "id,file_name,file_index,time_utc\nS1,a.h5,0,2019-01-01 00:00:00\n").unwrap();
        assert!(read_sevir(&nocol, &dir).unwrap_err().to_string().contains("img_type"));
        // wrong dtype of vil
        std::fs::create_dir_all(dir.join("f32/vil")).unwrap();
        write_h5(
            &dir.join("f32/vil/x.h5"),
            vec![
                DatasetBuilder::typed_data("vil", vec![1, 2, 2, 49], &[0.5f32; 196]).unwrap(),
                DatasetBuilder::fixed_string_data("id", vec![1], &["S1"]).unwrap(),
            ],
        );
        let cat = dir.join("CATALOG_f32.csv");
        std::fs::write(
            &cat,
            "id,file_name,file_index,img_type,time_utc,pct_missing\nS1,vil/x.h5,0,vil,2019-01-01 00:00:00,0\n",
        )
        .unwrap();
        let err = read_sevir(&cat, &dir.join("f32")).unwrap_err().to_string();
        assert!(err.contains("expected uint8"), "{err}");
        // a file without `vil`
        write_h5(&dir.join("f32/vil/x.h5"), vec![DatasetBuilder::fixed_string_data("id", vec![1], &["S1"]).unwrap()]);
        let err = read_sevir(&cat, &dir.join("f32")).unwrap_err();
        assert!(matches!(&err, Error::MissingField { field, .. } if field == "vil"), "{err}");
        // an index past the file's events
        let cat2 = dir.join("CATALOG_index.csv");
        std::fs::write(
            &cat2,
            std::fs::read_to_string(&catalog).unwrap().replace("TEST.h5,1,vil,2019-07", "TEST.h5,7,vil,2019-07"),
        )
        .unwrap();
        assert!(read_sevir(&cat2, &dir.join("data")).unwrap_err().to_string().contains("holds 2 events"));
    }
}
