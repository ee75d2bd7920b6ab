//! Data: files -> frame series -> input/output windows -> scaled batches.
//!
//! One file per format (`crowd_h5`, `npz`), the shared series and window logic (`series`),
//! time stamps (`timeslots`), scaling fitted on training data only (`scaling`) and seeded
//! generators for tests and benches (`synthetic`).

pub mod batch;
pub mod config;
pub mod crowd_h5;
pub mod hdf5;
pub mod netcdf;
pub mod npz;
pub mod radar;
pub mod scaling;
pub mod series;
pub mod synthetic;
pub mod timeslots;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use scaling::{MinMaxScaler, Scaler, ZScoreScaler};
pub use series::{window_len, DateRange, Domain, FrameSeries, LatLonGrid, WindowSet};
pub use timeslots::SlotFormat;

use crate::error::{Error, Result};
use config::{DataConfig, DataFormat};

/// What a set of data files holds: a time series (HDF5) or pre-cut windows (npz).
pub enum Source {
    Series(Arc<FrameSeries>),
    Npz(npz::NpzWindows),
}

/// How a series is split into train / validation / test windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// By the date of every frame of a window: `[train, val, test]` ranges.
    Dates([DateRange; 3]),
    /// By position in time: windows within the last `test` frames are the test set, those
    /// within the `val` frames before them validation, those before that training.
    LastFrames { val: usize, test: usize },
}

/// Train / validation / test windows.
pub struct Splits {
    pub train: WindowSet,
    pub val: WindowSet,
    pub test: WindowSet,
}

fn is_zip(path: &Path) -> Result<bool> {
    let mut magic = [0u8; 4];
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let n = file.read(&mut magic).map_err(|e| Error::io(path, e))?;
    Ok(n == 4 && &magic == b"PK\x03\x04")
}

/// Reads the data of a config: crowd-flow files or netCDF weather variables.
pub fn load(d: &DataConfig) -> Result<Source> {
    match d.format {
        DataFormat::Crowd => load_crowd(&d.files, d.slot_format),
        DataFormat::Netcdf => Ok(Source::Series(Arc::new(netcdf::read(d)?))),
        DataFormat::Knmi => Ok(Source::Series(Arc::new(radar::read_knmi(&d.files, d.pool)?))),
        DataFormat::Sevir => {
            let catalog = d.catalog.as_ref().expect("validated: SEVIR has a catalog");
            let root = match &d.root {
                Some(r) => r.clone(),
                None => catalog.parent().unwrap_or(Path::new(".")).join("data"),
            };
            Ok(Source::Series(Arc::new(radar::read_sevir(catalog, &root)?)))
        }
        DataFormat::SyntheticRadar => {
            let g = &d.synthetic;
            Ok(Source::Series(Arc::new(synthetic::radar_series(g.sequences, g.frames, g.size, g.size, g.seed))))
        }
    }
}

/// Reads crowd-flow files: several HDF5 files (e.g. one per year) are merged into one series;
/// an OpenSTL `dataset.npz` must come alone.
pub fn load_crowd(paths: &[PathBuf], format: SlotFormat) -> Result<Source> {
    let Some(first) = paths.first() else {
        return Err(Error::Config {
            file: None,
            field: "data.files".into(),
            value: "[]".into(),
            expected: "at least one HDF5 or npz file".into(),
        });
    };
    let mut kinds = Vec::with_capacity(paths.len());
    for p in paths {
        kinds.push(is_zip(p)?);
    }
    if kinds[0] {
        if paths.len() > 1 {
            return Err(Error::Config {
                file: None,
                field: "data.files".into(),
                value: format!("{} files", paths.len()),
                expected: "a single OpenSTL dataset.npz (it already holds train and test)".into(),
            });
        }
        return Ok(Source::Npz(npz::read(first)?));
    }
    let mut parts = Vec::with_capacity(paths.len());
    for p in paths {
        if is_zip(p)? {
            return Err(Error::Config {
                file: None,
                field: "data.files".into(),
                value: p.display().to_string(),
                expected: "HDF5 files only once the first file is HDF5".into(),
            });
        }
        parts.push(crowd_h5::read(p, format)?);
    }
    let grids: Vec<String> = parts.iter().map(|p| format!("{}x{}x{}", p.channels, p.height, p.width)).collect();
    let series = FrameSeries::merge(parts).ok_or_else(|| Error::BadField {
        path: first.clone(),
        field: "data".into(),
        detail: format!("grids differ between files: {}", grids.join(", ")),
    })?;
    Ok(Source::Series(Arc::new(series)))
}

fn describe(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

impl Source {
    /// All windows of the source: every consecutive window of a series, or the test part of an npz.
    pub fn all_windows(&self, t: Horizon, paths: &[PathBuf]) -> Result<WindowSet> {
        match self {
            Source::Series(s) => windows_in(s, t, &|_| true, "all frames", paths),
            Source::Npz(n) => check_lengths(&n.test, t, paths),
        }
    }

    /// Splits a series by date or by position in time ([`Split`]), or takes the last
    /// `val_fraction` of the npz training windows as validation (npz windows carry no dates).
    pub fn split(&self, t: Horizon, split: Split, val_fraction: f32, paths: &[PathBuf]) -> Result<Splits> {
        match self {
            Source::Series(s) => match split {
                Split::Dates([train, val, test]) => {
                    let range = |r: DateRange, name: &str| {
                        let inside = move |i: usize| r.contains(s.stamps[i].date);
                        let what = format!("{name} {}..{}", r.from, r.to);
                        windows_in(s, t, &inside, &what, paths)
                    };
                    Ok(Splits {
                        train: range(train, "the train range")?,
                        val: range(val, "the validation range")?,
                        test: range(test, "the test range")?,
                    })
                }
                Split::LastFrames { val, test } => {
                    let n = s.len();
                    let (v0, t0) = (n.saturating_sub(val + test), n.saturating_sub(test));
                    let part = |lo: usize, hi: usize, name: &str| {
                        let what = format!("{name} (frames {lo}..{hi} of {n})");
                        windows_in(s, t, &|i| (lo..hi).contains(&i), &what, paths)
                    };
                    Ok(Splits {
                        train: part(0, v0, "the training frames")?,
                        val: part(v0, t0, "the validation frames")?,
                        test: part(t0, n, "the test frames")?,
                    })
                }
            },
            Source::Npz(n) => {
                let train = check_lengths(&n.train, t, paths)?;
                let n_val = ((train.len() as f32 * val_fraction).ceil() as usize).clamp(1, train.len().max(1));
                let cut = train.len().saturating_sub(n_val);
                if cut == 0 {
                    return Err(Error::NoWindows {
                        what: describe(paths),
                        window: t.t_in + t.t_out,
                        detail: format!("X_train has {} windows, too few to keep some for validation", train.len()),
                    });
                }
                let idx: Vec<usize> = (0..train.len()).collect();
                Ok(Splits {
                    val: train.subset(&idx[cut..]),
                    train: train.subset(&idx[..cut]),
                    test: check_lengths(&n.test, t, paths)?,
                })
            }
        }
    }
}

/// Input frames, lead (slots from the last input to the first target) and target frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Horizon {
    pub t_in: usize,
    pub lead: usize,
    pub t_out: usize,
}

impl Horizon {
    pub fn of(d: &DataConfig) -> Self {
        Horizon { t_in: d.t_in, lead: d.lead, t_out: d.t_out }
    }
}

fn windows_in(
    s: &Arc<FrameSeries>,
    t: Horizon,
    inside: &dyn Fn(usize) -> bool,
    what: &str,
    paths: &[PathBuf],
) -> Result<WindowSet> {
    let len = window_len(t.t_in, t.lead, t.t_out);
    let starts = s.window_starts(len, inside);
    if starts.is_empty() {
        let frames = (0..s.len()).filter(|&i| inside(i)).count();
        return Err(Error::NoWindows {
            what: format!("{what} of {}", describe(paths)),
            window: len,
            detail: format!("{frames} frames fall inside; the longest run of consecutive slots is {}", s.longest_run()),
        });
    }
    Ok(WindowSet::from_series(s.clone(), starts, t.t_in, t.lead, t.t_out))
}

fn check_lengths(w: &WindowSet, t: Horizon, paths: &[PathBuf]) -> Result<WindowSet> {
    let (t_in, t_out) = (t.t_in, t.t_out);
    if t.lead != 1 {
        return Err(Error::Config {
            file: None,
            field: "data.lead".into(),
            value: t.lead.to_string(),
            expected: "1 for pre-cut npz windows (their targets follow the inputs)".into(),
        });
    }
    if (w.t_in, w.t_out) != (t_in, t_out) {
        return Err(Error::BadField {
            path: paths[0].clone(),
            field: "X_train/Y_train".into(),
            detail: format!("hold {} -> {} frame windows; the config asks for {t_in} -> {t_out}", w.t_in, w.t_out),
        });
    }
    Ok(w.clone())
}
