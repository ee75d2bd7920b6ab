//! Gridded weather data from netCDF-3 and netCDF-4 files (ERA5, WeatherBench).
//!
//! Each channel is one variable (`t2m`, or `t` at `level = 850`), read either from the files of
//! `data.files` or, in WeatherBench's layout, from `root/<dir>/*_<year>_*.nc` for each year.
//! Values are unpacked (`scale_factor`, `add_offset`); fill values are an error (weather fields
//! have no gaps). Times come from the CF `units` of `time` ("hours since 2019-03-01 00:00:00");
//! the files of a channel are ordered by their first time and must form one regular time axis
//! without gaps. Rows are stored north first: an ascending latitude axis is flipped.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use netcdf_reader::{NcFile, NcSliceInfo, NcSliceInfoElem};

use super::series::{Domain, FrameSeries, LatLonGrid};
use super::timeslots::{civil_from_days, date_of_days, days_from_civil, parse_date, Stamp};
use crate::data::config::{ChannelSpec, DataConfig};
use crate::error::{Error, Result};

const TIME: &[&str] = &["time", "valid_time"];
const LAT: &[&str] = &["lat", "latitude"];
const LON: &[&str] = &["lon", "longitude"];

/// One channel read from one file: `[T, H, W]` values, rows in file order.
struct Part {
    path: PathBuf,
    /// Seconds since 1970-01-01 of each frame.
    times: Vec<i64>,
    lat: Vec<f64>,
    lon: Vec<f64>,
    values: Vec<f32>,
    units: String,
}

/// A channel's frames on one time axis, north first.
struct Channel {
    name: String,
    units: String,
    /// Seconds since 1970-01-01 of the first frame, and the step.
    start: i64,
    step: i64,
    lat: Vec<f64>,
    lon: Vec<f64>,
    values: Vec<f32>,
    first_file: PathBuf,
}

/// Reads every channel of `d` and stacks them into one series `[T, C, H, W]`.
pub fn read(d: &DataConfig) -> Result<FrameSeries> {
    let channels: Vec<Channel> = d.channels.iter().map(|spec| read_channel(d, spec)).collect::<Result<_>>()?;
    let first = &channels[0];
    for c in &channels[1..] {
        if c.lat != first.lat || c.lon != first.lon {
            return Err(Error::BadField {
                path: c.first_file.clone(),
                field: c.name.clone(),
                detail: format!(
                    "is on a {}x{} grid (lat {:?}..{:?}, lon {:?}..{:?}) but `{}` in {} is on {}x{} (lat {:?}..{:?}, \
                     lon {:?}..{:?}); all channels need the same grid",
                    c.lat.len(),
                    c.lon.len(),
                    c.lat.first(),
                    c.lat.last(),
                    c.lon.first(),
                    c.lon.last(),
                    first.name,
                    first.first_file.display(),
                    first.lat.len(),
                    first.lon.len(),
                    first.lat.first(),
                    first.lat.last(),
                    first.lon.first(),
                    first.lon.last()
                ),
            });
        }
    }
    // The common time range of all channels.
    let frames = |c: &Channel| c.values.len() / (c.lat.len() * c.lon.len());
    let step = first.step;
    let start = channels.iter().map(|c| c.start).max().unwrap_or(0);
    let end = channels.iter().map(|c| c.start + frames(c) as i64 * c.step).min().unwrap_or(0);
    for c in &channels {
        if c.step != step || (c.start - first.start).rem_euclid(step) != 0 {
            return Err(Error::BadField {
                path: c.first_file.clone(),
                field: "time".into(),
                detail: format!(
                    "steps {} s from {}, but `{}` steps {} s from {}; channels need one time axis",
                    c.step,
                    iso(c.start),
                    first.name,
                    step,
                    iso(first.start)
                ),
            });
        }
    }
    if end <= start {
        return Err(Error::BadField {
            path: first.first_file.clone(),
            field: "time".into(),
            detail: "the channels' time ranges do not overlap".into(),
        });
    }
    let (h, w) = (first.lat.len(), first.lon.len());
    let n = ((end - start) / step) as usize;
    let mut values = Vec::with_capacity(n * channels.len() * h * w);
    for t in 0..n {
        for c in &channels {
            let i = ((start - c.start) / step) as usize + t;
            values.extend_from_slice(&c.values[i * h * w..(i + 1) * h * w]);
        }
    }
    let stamps = (0..n)
        .map(|t| {
            let secs = start + t as i64 * step;
            Stamp { date: date_of_days(secs.div_euclid(86_400)), slot: secs.div_euclid(step) }
        })
        .collect();
    let mut series = FrameSeries::from_rows(channels.len(), h, w, values, stamps);
    series.domain = Domain::Weather(Arc::new(LatLonGrid {
        latitudes: first.lat.iter().map(|&v| v as f32).collect(),
        longitudes: first.lon.iter().map(|&v| v as f32).collect(),
        channels: channels.iter().map(|c| (c.name.clone(), c.units.clone())).collect(),
    }));
    Ok(series)
}

/// The files holding `spec`: `root/dir/*_{year}_*.nc` per year, or `data.files`.
fn channel_files(d: &DataConfig, spec: &ChannelSpec) -> Result<Vec<PathBuf>> {
    let Some(dir) = &spec.dir else { return Ok(d.files.clone()) };
    let root = d.root.as_deref().unwrap_or(Path::new("."));
    let dir = root.join(dir);
    let names: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| Error::io(&dir, e))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.ends_with(".nc"))
        .collect();
    d.years
        .iter()
        .map(|year| {
            let tag = format!("_{year}_");
            let mut hits: Vec<&String> = names.iter().filter(|n| n.contains(&tag)).collect();
            hits.sort();
            match hits.as_slice() {
                [one] => Ok(dir.join(one)),
                [] => Err(Error::MissingField {
                    path: dir.clone(),
                    field: format!("*{tag}*.nc"),
                    expected: format!(
                        "the {year} file of `{}` (WeatherBench names files <var>_{year}_<res>.nc)",
                        spec.var
                    ),
                }),
                many => Err(Error::BadField {
                    path: dir.clone(),
                    field: format!("*{tag}*.nc"),
                    detail: format!("matches {} files ({:?}); expected one per year", many.len(), many),
                }),
            }
        })
        .collect()
}

fn channel_name(spec: &ChannelSpec) -> String {
    let mut name = spec.var.clone();
    for (dim, v) in &spec.select {
        name.push_str(&format!("@{dim}={v}"));
    }
    name
}

fn read_channel(d: &DataConfig, spec: &ChannelSpec) -> Result<Channel> {
    let mut parts: Vec<Part> = channel_files(d, spec)?.iter().map(|p| read_part(p, spec)).collect::<Result<_>>()?;
    parts.sort_by_key(|p| p.times.first().copied().unwrap_or(i64::MAX));
    let first = &parts[0];
    for p in &parts[1..] {
        if p.lat != first.lat || p.lon != first.lon {
            return Err(Error::BadField {
                path: p.path.clone(),
                field: spec.var.clone(),
                detail: format!("has a different lat/lon grid than in {}", first.path.display()),
            });
        }
    }
    let times: Vec<(i64, PathBuf)> = parts.iter().flat_map(|p| p.times.iter().map(|&t| (t, p.path.clone()))).collect();
    let step = if times.len() > 1 { times[1].0 - times[0].0 } else { 3600 };
    for pair in times.windows(2) {
        let ((a, _), (b, file)) = (&pair[0], &pair[1]);
        let (a, b) = (*a, *b);
        if b - a != step {
            let what = if b - a <= 0 { "repeats or goes back" } else { "has a gap" };
            return Err(Error::BadValues {
                path: file.clone(),
                field: "time".into(),
                detail: format!(
                    "{what}: {} is followed by {} (expected steps of {} s); windows need a regular time axis",
                    iso(a),
                    iso(b),
                    step
                ),
            });
        }
    }
    let (h, w) = (first.lat.len(), first.lon.len());
    let flip = h > 1 && first.lat[0] < first.lat[h - 1];
    let mut lat = first.lat.clone();
    if flip {
        lat.reverse();
    }
    let lon = first.lon.clone();
    let (units, first_file) = (first.units.clone(), first.path.clone());
    let mut values = Vec::with_capacity(times.len() * h * w);
    for p in parts {
        if flip {
            for frame in p.values.chunks(h * w) {
                for row in frame.chunks(w).rev() {
                    values.extend_from_slice(row);
                }
            }
        } else {
            values.extend(p.values);
        }
    }
    Ok(Channel { name: channel_name(spec), units, start: times[0].0, step, lat, lon, values, first_file })
}

fn iso(secs: i64) -> String {
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}", s / 3600, s % 3600 / 60)
}

fn find_dim(names: &[String], candidates: &[&str]) -> Option<usize> {
    names.iter().position(|n| candidates.contains(&n.as_str()))
}

fn read_f64(file: &NcFile, path: &Path, name: &str) -> Result<Vec<f64>> {
    let data = file.read_variable_as_f64(name).map_err(|e| Error::BadField {
        path: path.to_path_buf(),
        field: name.into(),
        detail: format!("cannot be read: {e}"),
    })?;
    Ok(data.iter().copied().collect())
}

fn read_part(path: &Path, spec: &ChannelSpec) -> Result<Part> {
    if !path.is_file() {
        return Err(Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file")));
    }
    let file = NcFile::open(path).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        format: "netCDF",
        detail: e.to_string(),
    })?;
    let var = file.variable(&spec.var).map_err(|_| {
        let have: Vec<String> =
            file.variables().map(|v| v.iter().map(|v| v.name().to_string()).collect()).unwrap_or_default();
        Error::MissingField {
            path: path.to_path_buf(),
            field: spec.var.clone(),
            expected: format!("variable of channel `{}`; the file has {}", channel_name(spec), have.join(", ")),
        }
    })?;
    let dims: Vec<String> = var.dimensions().iter().map(|d| d.name.clone()).collect();
    let sizes: Vec<u64> = var.shape();
    let bad = |detail: String| Error::BadField { path: path.to_path_buf(), field: spec.var.clone(), detail };
    let (Some(ti), Some(yi), Some(xi)) = (find_dim(&dims, TIME), find_dim(&dims, LAT), find_dim(&dims, LON)) else {
        return Err(bad(format!("has dimensions {dims:?}; expected time, lat/latitude and lon/longitude")));
    };
    if !(ti < yi && yi < xi) {
        return Err(bad(format!("has dimensions {dims:?}; expected time before latitude before longitude")));
    }
    let mut selection = Vec::with_capacity(dims.len());
    for (i, dim) in dims.iter().enumerate() {
        if [ti, yi, xi].contains(&i) {
            selection.push(NcSliceInfoElem::Slice { start: 0, end: sizes[i], step: 1 });
            continue;
        }
        let coords = file.variable(dim).ok().and_then(|_| read_f64(&file, path, dim).ok());
        let index = match (spec.select.get(dim), &coords) {
            (Some(want), Some(coords)) => coords.iter().position(|c| (c - want).abs() <= 1e-6 * want.abs().max(1.0)),
            (None, _) if sizes[i] == 1 => Some(0),
            _ => None,
        };
        let Some(index) = index else {
            return Err(bad(format!(
                "has dimension `{dim}` with values {:?}; choose one in the channel's `select` (e.g. select = {{ {dim} = \
                 {} }})",
                coords.as_deref().unwrap_or(&[]),
                coords.as_ref().and_then(|c| c.first()).copied().unwrap_or(0.0)
            )));
        };
        selection.push(NcSliceInfoElem::Index(index as u64));
    }
    for key in spec.select.keys() {
        if !dims.contains(key) {
            return Err(bad(format!("has no dimension `{key}` (dimensions {dims:?}) to select on")));
        }
    }
    let data = file
        .read_variable_slice_unpacked_masked(&spec.var, &NcSliceInfo { selections: selection })
        .map_err(|e| bad(format!("cannot be read: {e}")))?;
    let (t, h, w) = (sizes[ti] as usize, sizes[yi] as usize, sizes[xi] as usize);
    let raw: Vec<f64> = data.iter().copied().collect();
    if raw.len() != t * h * w {
        return Err(bad(format!("read {} values, expected {t}x{h}x{w}", raw.len())));
    }
    if let Some(i) = raw.iter().position(|v| !v.is_finite()) {
        let count = raw.iter().filter(|v| !v.is_finite()).count();
        return Err(Error::BadValues {
            path: path.to_path_buf(),
            field: spec.var.clone(),
            detail: format!(
                "{count} missing or non-finite values (fill value, NaN), the first at time index {}, row {}, column {}",
                i / (h * w),
                i / w % h,
                i % w
            ),
        });
    }
    let units = var.attribute("units").and_then(|a| a.value.as_string()).unwrap_or_default();
    let time_name = &dims[ti];
    let time_units =
        file.variable(time_name).ok().and_then(|v| v.attribute("units")).and_then(|a| a.value.as_string()).ok_or_else(
            || Error::MissingField {
                path: path.to_path_buf(),
                field: format!("{time_name}:units"),
                expected: "CF time units such as \"hours since 1979-01-01\"".into(),
            },
        )?;
    let (scale, epoch) = parse_time_units(&time_units).ok_or_else(|| Error::BadValues {
        path: path.to_path_buf(),
        field: format!("{time_name}:units"),
        detail: format!("{time_units:?} is not \"<seconds|minutes|hours|days> since YYYY-MM-DD[ HH:MM[:SS]]\""),
    })?;
    let times: Vec<i64> =
        read_f64(&file, path, time_name)?.iter().map(|&v| epoch + (v * scale as f64).round() as i64).collect();
    if times.len() != t {
        return Err(bad(format!("has {t} time steps but `{time_name}` has {}", times.len())));
    }
    let lat = read_f64(&file, path, &dims[yi])?;
    let lon = read_f64(&file, path, &dims[xi])?;
    if lat.len() != h || lon.len() != w {
        return Err(bad(format!(
            "coordinates have {} latitudes and {} longitudes, expected {h} and {w}",
            lat.len(),
            lon.len()
        )));
    }
    Ok(Part { path: path.to_path_buf(), times, lat, lon, values: raw.iter().map(|&v| v as f32).collect(), units })
}

/// `(seconds per unit, epoch in seconds since 1970-01-01)` of CF time units.
fn parse_time_units(units: &str) -> Option<(i64, i64)> {
    let (unit, since) = units.trim().split_once(" since ")?;
    let scale = match unit.trim() {
        "seconds" | "second" | "s" => 1,
        "minutes" | "minute" | "min" => 60,
        "hours" | "hour" | "h" => 3600,
        "days" | "day" | "d" => 86_400,
        _ => return None,
    };
    let since = since.trim().trim_end_matches('Z').replace('T', " ");
    let mut it = since.split_whitespace();
    let (y, m, d) = parse_date(it.next()?)?;
    let mut secs = days_from_civil(y, m, d) * 86_400;
    if let Some(clock) = it.next() {
        let f: Vec<f64> = clock.split(':').map(|p| p.parse().ok()).collect::<Option<_>>()?;
        let part = |i: usize| f.get(i).copied().unwrap_or(0.0);
        secs += (part(0) * 3600.0 + part(1) * 60.0 + part(2)).round() as i64;
    }
    Some((scale, secs))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use netcdf_writer::{NcAttrValue, NcFileBuilder, NcWriteOptions};

    /// Writes a netCDF-3 file with `var (time, [level,] lat, lon)`, hourly from `start_hour`
    /// hours since 2019-03-01, values `f(t, y, x)` (+ 1000 * level index).
    pub(crate) fn write_fixture(
        path: &Path,
        var: &str,
        hours: &[i32],
        lat: &[f32],
        lon: &[f32],
        levels: Option<&[f32]>,
        f: &dyn Fn(usize, usize, usize) -> f32,
    ) {
        let mut b = NcFileBuilder::new();
        let dt = b.add_dimension("time", hours.len() as u64).unwrap();
        let dy = b.add_dimension("lat", lat.len() as u64).unwrap();
        let dx = b.add_dimension("lon", lon.len() as u64).unwrap();
        let tv = b.add_variable::<i32>("time", &[dt]).unwrap();
        b.add_variable_attribute(tv, "units", NcAttrValue::Chars("hours since 2019-03-01 00:00:00".into())).unwrap();
        b.write_variable(tv, hours).unwrap();
        let yv = b.add_variable::<f32>("lat", &[dy]).unwrap();
        b.write_variable(yv, lat).unwrap();
        let xv = b.add_variable::<f32>("lon", &[dx]).unwrap();
        b.write_variable(xv, lon).unwrap();
        let nl = levels.map_or(1, |l| l.len());
        let mut values = Vec::new();
        for t in 0..hours.len() {
            for l in 0..nl {
                for y in 0..lat.len() {
                    for x in 0..lon.len() {
                        values.push(f(t, y, x) + 1000.0 * l as f32);
                    }
                }
            }
        }
        let v = match levels {
            Some(levels) => {
                let dl = b.add_dimension("level", levels.len() as u64).unwrap();
                let lv = b.add_variable::<f32>("level", &[dl]).unwrap();
                b.write_variable(lv, levels).unwrap();
                b.add_variable::<f32>(var, &[dt, dl, dy, dx]).unwrap()
            }
            None => b.add_variable::<f32>(var, &[dt, dy, dx]).unwrap(),
        };
        b.add_variable_attribute(v, "units", NcAttrValue::Chars("K".into())).unwrap();
        b.write_variable(v, &values).unwrap();
        std::fs::write(path, b.to_vec(NcWriteOptions::default()).unwrap().1).unwrap();
    }

    fn spec(var: &str, dir: Option<&str>, select: &[(&str, f64)]) -> ChannelSpec {
        ChannelSpec {
            var: var.into(),
            dir: dir.map(Into::into),
            select: select.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    fn config(files: Vec<PathBuf>, channels: Vec<ChannelSpec>) -> DataConfig {
        DataConfig { format: crate::data::config::DataFormat::Netcdf, files, channels, ..DataConfig::default() }
    }

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dyna-pruner-nc-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn weatherbench_layout_stacks_channels_across_years_and_flips_latitude() {
        let root = tmp("wb");
        let hours: Vec<i32> = (0..6).collect();
        let next: Vec<i32> = (6..10).collect();
        let asc = [-10.0f32, 0.0, 10.0];
        let lon = [0.0f32, 5.0];
        std::fs::create_dir_all(root.join("2m_temperature")).unwrap();
        std::fs::create_dir_all(root.join("temperature")).unwrap();
        let t2m = |t: usize, y: usize, x: usize| (t * 100 + y * 10 + x) as f32;
        write_fixture(
            &root.join("2m_temperature/2m_temperature_2017_5.625deg.nc"),
            "t2m",
            &hours,
            &asc,
            &lon,
            None,
            &t2m,
        );
        let later = |t: usize, y: usize, x: usize| ((t + 6) * 100 + y * 10 + x) as f32;
        write_fixture(
            &root.join("2m_temperature/2m_temperature_2018_5.625deg.nc"),
            "t2m",
            &next,
            &asc,
            &lon,
            None,
            &later,
        );
        let levels = [500.0f32, 850.0];
        write_fixture(
            &root.join("temperature/temperature_2017_5.625deg.nc"),
            "t",
            &hours,
            &asc,
            &lon,
            Some(&levels),
            &t2m,
        );
        write_fixture(
            &root.join("temperature/temperature_2018_5.625deg.nc"),
            "t",
            &next,
            &asc,
            &lon,
            Some(&levels),
            &later,
        );
        let mut d = config(
            vec![],
            vec![spec("t2m", Some("2m_temperature"), &[]), spec("t", Some("temperature"), &[("level", 850.0)])],
        );
        d.root = Some(root.clone());
        d.years = vec![2017, 2018];
        let s = read(&d).unwrap();
        assert_eq!((s.len(), s.channels, s.height, s.width), (10, 2, 3, 2));
        let grid = s.grid().unwrap();
        assert_eq!(grid.latitudes, vec![10.0, 0.0, -10.0], "north first");
        assert_eq!(grid.channels[1].0, "t@level=850");
        // frame 7, channel 0, row 0 (lat 10 = file row 2), column 1
        assert_eq!(s.frame(7)[1], (7 * 100 + 2 * 10 + 1) as f32);
        // channel 1 is level index 1: + 1000
        assert_eq!(s.frame(7)[6 + 1], (7 * 100 + 2 * 10 + 1) as f32 + 1000.0);
        assert_eq!(s.stamps[0].date, 20190301);
        assert_eq!(s.stamps[9].slot - s.stamps[0].slot, 9);
    }

    #[test]
    fn reader_errors_name_the_problem() {
        let dir = tmp("errors");
        let hours: Vec<i32> = (0..4).collect();
        let (lat, lon) = ([1.0f32, 0.0], [0.0f32, 1.0, 2.0]);
        let f = |t: usize, _: usize, _: usize| t as f32;
        let a = dir.join("a.nc");
        write_fixture(&a, "t2m", &hours, &lat, &lon, None, &f);
        // missing variable
        let err = read(&config(vec![a.clone()], vec![spec("z", None, &[])])).unwrap_err().to_string();
        assert!(err.contains("`z`") && err.contains("t2m"), "{err}");
        // missing year file
        let mut d = config(vec![], vec![spec("t2m", Some("2m_temperature"), &[])]);
        std::fs::create_dir_all(dir.join("2m_temperature")).unwrap();
        std::fs::copy(&a, dir.join("2m_temperature/2m_temperature_2017_5.625deg.nc")).unwrap();
        d.root = Some(dir.clone());
        d.years = vec![2017, 2018];
        let err = read(&d).unwrap_err().to_string();
        assert!(err.contains("2018") && err.contains("2m_temperature"), "{err}");
        // mismatched grids between variables
        let b = dir.join("b.nc");
        write_fixture(&b, "z", &hours, &[1.0, 0.0, -1.0], &lon, None, &f);
        let mut d = config(vec![a.clone()], vec![spec("t2m", None, &[])]);
        d.channels.push(spec("z", Some("z"), &[]));
        std::fs::create_dir_all(dir.join("z")).unwrap();
        std::fs::copy(&b, dir.join("z/z_2017_x.nc")).unwrap();
        d.root = Some(dir.clone());
        d.years = vec![2017];
        let err = read(&d).unwrap_err().to_string();
        assert!(err.contains("same grid") && err.contains("3x3"), "{err}");
        // a time axis with gaps
        let g = dir.join("gap.nc");
        write_fixture(&g, "t2m", &[0, 1, 3, 4], &lat, &lon, None, &f);
        let err = read(&config(vec![g], vec![spec("t2m", None, &[])])).unwrap_err().to_string();
        assert!(err.contains("gap") && err.contains("2019-03-01T01:00") && err.contains("2019-03-01T03:00"), "{err}");
        // channels on interleaved time axes (same step, offset by half of it)
        let even = dir.join("even.nc");
        write_fixture(&even, "t2m", &[0, 2, 4, 6], &lat, &lon, None, &f);
        let odd = dir.join("odd.nc");
        write_fixture(&odd, "z", &[1, 3, 5, 7], &lat, &lon, None, &f);
        let mut d = config(vec![even], vec![spec("t2m", None, &[])]);
        d.channels.push(spec("z", Some("odd"), &[]));
        std::fs::create_dir_all(dir.join("odd")).unwrap();
        std::fs::copy(&odd, dir.join("odd/z_2017_x.nc")).unwrap();
        d.root = Some(dir.clone());
        d.years = vec![2017];
        let err = read(&d).unwrap_err().to_string();
        assert!(err.contains("one time axis") && err.contains("2019-03-01T01:00"), "{err}");
        // an extra dimension without a selection
        let l = dir.join("levels.nc");
        write_fixture(&l, "t", &hours, &lat, &lon, Some(&[500.0, 850.0]), &f);
        let err = read(&config(vec![l], vec![spec("t", None, &[])])).unwrap_err().to_string();
        assert!(err.contains("`level`") && err.contains("500"), "{err}");
        // not a netCDF file, and a missing one
        let junk = dir.join("junk.nc");
        std::fs::write(&junk, b"not netcdf").unwrap();
        let err = read(&config(vec![junk], vec![spec("t2m", None, &[])])).unwrap_err().to_string();
        assert!(err.contains("junk.nc") && err.contains("netCDF"), "{err}");
        let err = read(&config(vec![dir.join("none.nc")], vec![spec("t2m", None, &[])])).unwrap_err().to_string();
        assert!(err.contains("none.nc"), "{err}");
    }

    fn repo_file(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(rel)
    }

    #[test]
    fn reads_the_shipped_era5_files() {
        // netCDF-4, hourly, descending latitude (kept), 33 x 49.
        let d =
            config(vec![repo_file("data/era5-uk-t2m/era5_t2m_2019-03_uk_0.25deg.nc")], vec![spec("t2m", None, &[])]);
        let s = read(&d).unwrap();
        assert_eq!((s.len(), s.channels, s.height, s.width), (744, 1, 33, 49));
        let grid = s.grid().unwrap();
        assert_eq!((grid.latitudes[0], grid.latitudes[32]), (58.0, 50.0));
        assert_eq!(grid.channels[0], ("t2m".to_string(), "K".to_string()));
        let (lo, hi) = s.values.iter().fold((f32::MAX, f32::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
        assert!((lo - 265.68).abs() < 0.01 && (hi - 291.56).abs() < 0.01, "{lo} .. {hi}");
        assert_eq!((s.stamps[0].date, s.stamps[743].date), (20190301, 20190331));
        // z and t at 500 hPa of ensemble member 0: float64, extra dimensions, 12-hourly.
        let at = |var: &str| spec(var, None, &[("number", 0.0), ("isobaricInhPa", 500.0)]);
        let d = config(vec![repo_file("data/era5-levels-members/era5-levels-members.nc")], vec![at("z"), at("t")]);
        let s = read(&d).unwrap();
        assert_eq!((s.len(), s.channels, s.height, s.width), (4, 2, 61, 120));
        assert_eq!(s.stamps[1].slot - s.stamps[0].slot, 1, "one 12-hour step per slot");
        let t500 = &s.frame(0)[61 * 120..];
        assert!(t500.iter().all(|v| (200.0..290.0).contains(v)), "t at 500 hPa in K");
    }

    #[test]
    fn packed_values_are_unpacked() {
        // int16 with scale_factor 0.01 and add_offset 273.15, as ERA5 downloads often are.
        let dir = tmp("packed");
        let mut b = NcFileBuilder::new();
        let dt = b.add_dimension("time", 3).unwrap();
        let dy = b.add_dimension("latitude", 1).unwrap();
        let dx = b.add_dimension("longitude", 2).unwrap();
        let tv = b.add_variable::<f64>("time", &[dt]).unwrap();
        b.add_variable_attribute(tv, "units", NcAttrValue::Chars("days since 2019-03-01".into())).unwrap();
        b.write_variable(tv, &[0.0, 1.0, 2.0]).unwrap();
        let yv = b.add_variable::<f32>("latitude", &[dy]).unwrap();
        b.write_variable(yv, &[45.0f32]).unwrap();
        let xv = b.add_variable::<f32>("longitude", &[dx]).unwrap();
        b.write_variable(xv, &[0.0f32, 1.0]).unwrap();
        let v = b.add_variable::<i16>("t2m", &[dt, dy, dx]).unwrap();
        b.add_variable_attribute(v, "scale_factor", NcAttrValue::Doubles(vec![0.01])).unwrap();
        b.add_variable_attribute(v, "add_offset", NcAttrValue::Doubles(vec![273.15])).unwrap();
        b.write_variable(v, &[0i16, 100, -100, 250, 5, -5]).unwrap();
        let path = dir.join("packed.nc");
        std::fs::write(&path, b.to_vec(NcWriteOptions::default()).unwrap().1).unwrap();
        let s = read(&config(vec![path], vec![spec("t2m", None, &[])])).unwrap();
        let want = [273.15f32, 274.15, 272.15, 275.65, 273.2, 273.1];
        for (got, want) in s.values.iter().zip(want) {
            assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        }
        assert_eq!(s.stamps[2].slot - s.stamps[0].slot, 2, "one daily step per slot");
    }

    #[test]
    fn cf_time_units() {
        assert_eq!(parse_time_units("hours since 1970-01-01"), Some((3600, 0)));
        assert_eq!(parse_time_units("days since 1970-01-02 06:00:00"), Some((86_400, 86_400 + 6 * 3600)));
        assert_eq!(parse_time_units("seconds since 1970-01-01T00:00:00Z"), Some((1, 0)));
        assert_eq!(parse_time_units("fortnights since 1970-01-01"), None);
    }
}
