//! Writes large KNMI-layout radar frames for memory tests: each output frame tiles one of the
//! source composites (in time order, cycling) over `rows x cols` pixels; the files are named
//! five minutes apart from the first source file's time.
//!
//! `cargo run --release -p dyna-pruner --example knmi_tiles -- data/knmi-radar OUT_DIR 80 1226 760`

use std::path::{Path, PathBuf};

use dyna_pruner::data::radar::{h5_files, read_knmi_image, write_knmi_image};
use dyna_pruner::data::timeslots::{civil_from_days, days_from_civil};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [src, out, count, rows, cols] = args.as_slice() else {
        return Err("usage: knmi_tiles SRC_DIR OUT_DIR FRAMES ROWS COLS".into());
    };
    let (count, rows, cols): (usize, usize, usize) = (count.parse()?, rows.parse()?, cols.parse()?);
    let sources = h5_files(&[PathBuf::from(src)])?;
    let first = sources.first().ok_or("no .h5 files in SRC_DIR")?;
    let start = start_minutes(first)?;
    std::fs::create_dir_all(out)?;
    for i in 0..count {
        let (h, w, raw) = read_knmi_image(&sources[i % sources.len()])?;
        let tiled: Vec<u16> = (0..rows * cols).map(|p| raw[(p / cols % h) * w + p % cols % w]).collect();
        let path = Path::new(out).join(format!("RAD_NL25_RAP_5min_{}.h5", stamp(start + 5 * i as i64)));
        write_knmi_image(&path, rows, cols, &tiled)?;
    }
    eprintln!("wrote {count} frames of {rows}x{cols} to {out}");
    Ok(())
}

/// Minutes since 1970-01-01 of a `..._YYYYMMDDHHMM.h5` name.
fn start_minutes(path: &Path) -> Result<i64, Box<dyn std::error::Error>> {
    let stem = path.file_stem().and_then(|s| s.to_str()).ok_or("file name is not UTF-8")?;
    let d = stem.rsplit('_').next().filter(|d| d.len() == 12).ok_or("no _YYYYMMDDHHMM time stamp")?;
    let n = |a: usize, b: usize| d[a..b].parse::<i64>();
    let days = days_from_civil(n(0, 4)?, n(4, 6)?, n(6, 8)?);
    Ok(days * 1440 + n(8, 10)? * 60 + n(10, 12)?)
}

/// `YYYYMMDDHHMM` of minutes since 1970-01-01.
fn stamp(minutes: i64) -> String {
    let (y, m, d) = civil_from_days(minutes.div_euclid(1440));
    let rest = minutes.rem_euclid(1440);
    format!("{y:04}{m:02}{d:02}{:02}{:02}", rest / 60, rest % 60)
}
