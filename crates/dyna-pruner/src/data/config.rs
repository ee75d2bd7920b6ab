//! The `[data]` section of a run config: where the data comes from and how it is cut.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::data::timeslots::parse_date;
use crate::data::{DateRange, SlotFormat, Split};
use crate::error::{bad_value, fraction, in_range, Result};

/// What kind of files `data.files` are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// Crowd flow: ST-ResNet HDF5 files (`data` + `date`) or one OpenSTL `dataset.npz`.
    #[default]
    Crowd,
    /// Gridded netCDF-3/4 variables on a lat/lon grid (ERA5, WeatherBench), one channel each.
    Netcdf,
    /// KNMI 5-minute radar composites, one HDF5 file per frame (`data.files`: files or directories).
    Knmi,
    /// SEVIR `vil` events: `data.catalog` (CATALOG.csv) and the HDF5 files it names under `data.root`.
    Sevir,
    /// Seeded synthetic radar (`data.synthetic`), for tests and benchmarks at any size.
    SyntheticRadar,
}

/// The synthetic radar data set (`data.format = "synthetic_radar"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyntheticRadarConfig {
    /// Independent runs, one per day from 2020-01-01.
    pub sequences: usize,
    /// Frames per run.
    pub frames: usize,
    /// Frame side in pixels.
    pub size: usize,
    pub seed: u64,
}

impl Default for SyntheticRadarConfig {
    fn default() -> Self {
        SyntheticRadarConfig { sequences: 200, frames: 12, size: 64, seed: 7 }
    }
}

/// One channel of netCDF data: a variable, at one value of each dimension other than time,
/// latitude and longitude (e.g. `level = 850`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelSpec {
    /// Variable name inside the files (`t2m`, `z`, `t`).
    pub var: String,
    /// WeatherBench directory of the variable under `data.root` (`2m_temperature`,
    /// `temperature_850`); without it the variable is read from `data.files`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    /// Coordinate value to take on each extra dimension, e.g. `{ level = 850 }`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub select: std::collections::BTreeMap<String, f64>,
}

/// Where the data comes from and how it is cut.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    pub format: DataFormat,
    /// Crowd: HDF5 files (merged) or one OpenSTL `dataset.npz`. netCDF: files holding every
    /// channel without a `dir`, concatenated in time. Relative to the working directory.
    pub files: Vec<PathBuf>,
    pub slot_format: SlotFormat,
    /// netCDF: the channels, stacked in this order.
    pub channels: Vec<ChannelSpec>,
    /// netCDF, WeatherBench layout: the directory holding one directory per variable, each with
    /// yearly files `*_{year}_*.nc`.
    pub root: Option<PathBuf>,
    /// netCDF, WeatherBench layout: the years to read.
    pub years: Vec<i32>,
    /// SEVIR: the catalog (CATALOG.csv); the files it names are under `data.root` (default: the
    /// catalog's directory joined with `data`).
    pub catalog: Option<PathBuf>,
    /// KNMI: average `pool x pool` pixel blocks (1: full 1 km resolution).
    pub pool: usize,
    /// Synthetic radar: the generated data set.
    pub synthetic: SyntheticRadarConfig,
    pub t_in: usize,
    pub t_out: usize,
    /// Time steps from the last input frame to the first target (1: the next frame; 72 with
    /// hourly data and `t_out = 1`: WeatherBench's 3-day forecast).
    pub lead: usize,
    /// `[from, to)` as `YYYY-MM-DD`.
    pub train: [String; 2],
    pub val: [String; 2],
    pub test: [String; 2],
    /// npz only: the last fraction of the training windows used for validation.
    pub val_fraction: f32,
    /// When > 0: split by position in time instead of dates; the last `test_frames` frames are
    /// the test set and the `val_frames` before them validation.
    pub val_frames: usize,
    pub test_frames: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        let taxi = |y: u32| PathBuf::from(format!("data/taxinyc/NYC{y}_Taxi_M16x8_T60_InOut.h5"));
        DataConfig {
            format: DataFormat::Crowd,
            files: vec![taxi(10), taxi(11), taxi(12), taxi(13)],
            slot_format: SlotFormat::Auto,
            channels: Vec::new(),
            root: None,
            years: Vec::new(),
            catalog: None,
            pool: 1,
            synthetic: SyntheticRadarConfig::default(),
            t_in: 4,
            t_out: 4,
            lead: 1,
            train: ["2010-01-01".into(), "2013-01-01".into()],
            val: ["2013-01-01".into(), "2013-07-01".into()],
            test: ["2013-07-01".into(), "2014-01-01".into()],
            val_fraction: 0.1,
            val_frames: 0,
            test_frames: 0,
        }
    }
}

impl DataConfig {
    /// Checks every field of the section; returns the split it describes.
    pub fn validate(&self) -> Result<Split> {
        let d = self;
        match d.format {
            DataFormat::Crowd if d.files.is_empty() => {
                return Err(bad_value("data.files", "[]", "at least one HDF5 or npz file"));
            }
            DataFormat::Netcdf => {
                if d.channels.is_empty() {
                    return Err(bad_value("data.channels", "[]", "at least one { var = \"...\" }"));
                }
                let in_dirs = d.channels.iter().filter(|c| c.dir.is_some()).count();
                if in_dirs > 0 && (d.root.is_none() || d.years.is_empty()) {
                    return Err(bad_value(
                        "data.root/data.years",
                        format!("root {:?}, years {:?}", d.root, d.years),
                        "a root directory and at least one year when a channel names a `dir`",
                    ));
                }
                if in_dirs < d.channels.len() && d.files.is_empty() {
                    return Err(bad_value("data.files", "[]", "netCDF files holding the channels without a `dir`"));
                }
            }
            DataFormat::Knmi if d.files.is_empty() => {
                return Err(bad_value("data.files", "[]", "KNMI HDF5 files or directories holding them"));
            }
            DataFormat::Sevir if d.catalog.is_none() => {
                return Err(bad_value("data.catalog", "none", "the path of SEVIR's CATALOG.csv"));
            }
            DataFormat::SyntheticRadar => {
                let g = &d.synthetic;
                in_range("data.synthetic.sequences", g.sequences, 3, 100_000)?;
                in_range("data.synthetic.frames", g.frames, 2, 1000)?;
                in_range("data.synthetic.size", g.size, 8, 384)?;
            }
            DataFormat::Crowd | DataFormat::Knmi | DataFormat::Sevir => {}
        }
        in_range("data.pool", d.pool, 1, 64)?;
        in_range("data.t_in", d.t_in, 2, 64)?;
        in_range("data.t_out", d.t_out, 1, 64)?;
        in_range("data.lead", d.lead, 1, 10_000)?;
        fraction("data.val_fraction", d.val_fraction)?;
        if d.test_frames > 0 {
            if d.val_frames == 0 {
                return Err(bad_value("data.val_frames", "0", "> 0 when data.test_frames is set"));
            }
            return Ok(Split::LastFrames { val: d.val_frames, test: d.test_frames });
        }
        Ok(Split::Dates([
            date_range("data.train", &d.train)?,
            date_range("data.val", &d.val)?,
            date_range("data.test", &d.test)?,
        ]))
    }
}

/// `[from, to)` of two dates `YYYY-MM-DD`, from before to.
fn date_range(field: &str, [from, to]: &[String; 2]) -> Result<DateRange> {
    let bad = || bad_value(field, format!("{from:?}..{to:?}"), "two dates YYYY-MM-DD, from before to");
    let date = |s: &str| parse_date(s).map(|(y, mo, da)| (y * 10_000 + mo * 100 + da) as u32).ok_or_else(bad);
    let r = DateRange { from: date(from)?, to: date(to)? };
    if r.from < r.to {
        Ok(r)
    } else {
        Err(bad())
    }
}
