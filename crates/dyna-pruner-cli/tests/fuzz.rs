//! Mutation fuzzing of every input parser, on stable Rust: each target starts from valid files
//! (shipped or generated), mutates their bytes (bit flips, interesting integers, cut-offs,
//! insertions, duplicated chunks; half of them in the first 4 KiB, where the structure is) and
//! feeds the result to the reader. A reader must return `Ok` or an error: a panic is a crash,
//! an input that takes longer than `HANG` is a hang (an abort, e.g. a huge allocation, ends
//! the process with the input left in the target's work file).
//!
//! - `cargo test -p dyna-pruner-cli --test fuzz`: replays the corpus of past findings
//!   (`tests/fuzz-corpus/<target>/`) and 150 fresh mutations per target (CI).
//! - `FUZZ_SECONDS=600 FUZZ_TARGETS=knmi,npz cargo test --release -p dyna-pruner-cli --test fuzz
//!   -- --ignored --nocapture`: the long run; crashing and hanging inputs are written to
//!   `target/fuzz-crashes/<target>/`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use dyna_pruner::config::{DataConfig, RunConfig};
use dyna_pruner::data::synthetic::crowd_series;
use dyna_pruner::data::{crowd_h5, npz, radar, SlotFormat};

const HANG: Duration = Duration::from_secs(10);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A parser under test: its valid seed files and how to run it on a file.
struct Target {
    name: &'static str,
    /// File name of the work file (some readers look at the extension).
    file: &'static str,
    seeds: fn(&Path) -> Vec<Vec<u8>>,
    parse: fn(&Path) -> bool,
}

fn read(path: impl AsRef<Path>) -> Vec<u8> {
    std::fs::read(path.as_ref()).unwrap_or_else(|e| panic!("{}: {e}", path.as_ref().display()))
}

fn targets() -> Vec<Target> {
    vec![
        Target {
            name: "crowd_h5",
            file: "flows.h5",
            seeds: |dir| {
                let path = dir.join("seed.h5");
                crowd_h5::write(&path, &crowd_series(4, 2, 2, 0, 1)).unwrap();
                vec![read(&path)]
            },
            parse: |p| crowd_h5::read(p, SlotFormat::Auto).is_ok(),
        },
        Target {
            name: "npz",
            file: "dataset.npz",
            seeds: |dir| {
                use std::io::Write;
                let path = dir.join("seed.npz");
                let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
                let opts = zip::write::SimpleFileOptions::default();
                let values: Vec<f32> = (0..32).map(|i| i as f32).collect(); // [2, 2, 1, 4, 2]
                for name in ["X_train", "Y_train", "X_test", "Y_test"] {
                    zip.start_file(format!("{name}.npy"), opts).unwrap();
                    zip.write_all(&npz::npy_bytes(&[2, 2, 1, 4, 2], &values)).unwrap();
                }
                zip.finish().unwrap();
                vec![read(&path)]
            },
            parse: |p| npz::read(p).is_ok(),
        },
        Target {
            name: "netcdf",
            file: "t2m.nc",
            seeds: |_| vec![read(repo().join("data/era5-uk-t2m/era5_t2m_2019-03_uk_0.25deg.nc"))],
            parse: |p| {
                let mut d: DataConfig =
                    toml::from_str("format = \"netcdf\"\nchannels = [{ var = \"t2m\" }]\n").unwrap();
                d.files = vec![p.to_path_buf()];
                dyna_pruner::data::netcdf::read(&d).is_ok()
            },
        },
        Target {
            name: "knmi",
            file: "RAD_NL25_RAP_5min_201008260000.h5",
            seeds: |_| vec![read(repo().join("data/knmi-radar/RAD_NL25_RAP_5min_201008260000.h5"))],
            parse: |p| radar::read_knmi(&[p.to_path_buf()], 1).is_ok(),
        },
        Target {
            name: "sevir_catalog",
            file: "CATALOG.csv",
            seeds: |_| {
                vec![b"id,file_name,file_index,img_type,time_utc,minute_offsets,pct_missing\n\
                       S1,vil/2019/SEVIR_VIL_STORMEVENTS_2019_0101_0630.h5,0,vil,2019-06-01 12:00:00,-120:-115,0\n\
                       S2,vil/2019/SEVIR_VIL_STORMEVENTS_2019_0101_0630.h5,1,vil,2019-06-02 13:05:00,-120:-115,0\n"
                    .to_vec()]
            },
            parse: |p| radar::read_catalog(p).is_ok(),
        },
        Target {
            name: "config_toml",
            file: "run.toml",
            seeds: |_| {
                [
                    "configs/crowd/full_static50.toml",
                    "configs/weather/vit_dynamic80.toml",
                    "configs/radar/knmi_dynamic.toml",
                ]
                .map(|c| read(repo().join(c)))
                .to_vec()
            },
            parse: |p| RunConfig::load(p).is_ok(),
        },
        Target {
            name: "checkpoint_json",
            file: "checkpoint.json",
            seeds: |_| {
                ["models/crowd/full_static50", "models/weather/vit_dynamic", "models/radar/knmi_dynamic"]
                    .map(|m| read(repo().join(m).join("checkpoint.json")))
                    .to_vec()
            },
            parse: |p| dyna_pruner::checkpoint::read_meta(p.parent().unwrap()).is_ok(),
        },
        Target {
            name: "safetensors",
            file: "model.safetensors",
            seeds: |_| {
                ["cnn", "vit", "convlstm"]
                    .map(|m| read(repo().join(format!("crates/dyna-pruner-exec/tests/fixtures/{m}.safetensors"))))
                    .to_vec()
            },
            parse: |p| dyna_pruner_exec::format::load(p).and_then(|m| m.executor()).is_ok(),
        },
    ]
}

const INTERESTING: [u32; 8] = [0, 1, 0x7f, 0xff, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, 0x0010_0000];

/// One to four random edits of `data`.
fn mutate(rng: &mut StdRng, mut data: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.random_range(1..=4) {
        if data.is_empty() {
            data.push(rng.random());
            continue;
        }
        let head = data.len().min(4096);
        let at = if rng.random_bool(0.5) { rng.random_range(0..head) } else { rng.random_range(0..data.len()) };
        match rng.random_range(0..6) {
            0 => data[at] ^= 1 << rng.random_range(0..8),
            1 => data[at] = rng.random(),
            2 => {
                let v = INTERESTING[rng.random_range(0..INTERESTING.len())].to_le_bytes();
                let end = (at + 4).min(data.len());
                data[at..end].copy_from_slice(&v[..end - at]);
            }
            3 => data.truncate(at),
            4 => {
                let bytes: Vec<u8> = (0..rng.random_range(1..16)).map(|_| rng.random()).collect();
                data.splice(at..at, bytes);
            }
            _ => {
                let len = rng.random_range(1..=64).min(data.len() - at);
                let chunk = data[at..at + len].to_vec();
                let to = rng.random_range(0..data.len());
                data.splice(to..to, chunk);
            }
        }
    }
    data
}

/// What a run of one target found.
#[derive(Debug, Default)]
struct Findings {
    runs: usize,
    accepted: usize,
    crashes: Vec<(Vec<u8>, String)>,
    hangs: Vec<Vec<u8>>,
}

/// Runs `input` through the target's parser in its work directory.
fn run_one(t: &Target, work: &Path, input: &[u8], findings: &mut Findings) {
    let path = work.join(t.file);
    std::fs::write(&path, input).unwrap();
    let started = Instant::now();
    match catch_unwind(AssertUnwindSafe(|| (t.parse)(&path))) {
        Ok(ok) => findings.accepted += usize::from(ok),
        Err(e) => {
            let msg = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()));
            findings.crashes.push((input.to_vec(), msg.unwrap_or_default()));
        }
    }
    if started.elapsed() > HANG {
        findings.hangs.push(input.to_vec());
    }
    findings.runs += 1;
}

/// The corpus of past findings of a target, then `budget` fresh mutations (count or time).
fn fuzz(t: &Target, seed: u64, budget: Budget) -> Findings {
    let work = std::env::temp_dir().join(format!("dp-fuzz-{}-{}", t.name, std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let seeds = (t.seeds)(&work);
    let mut findings = Findings::default();
    for s in &seeds {
        run_one(t, &work, s, &mut findings);
    }
    assert_eq!(findings.accepted, seeds.len(), "{}: a seed file is refused", t.name);
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-corpus").join(t.name);
    for entry in std::fs::read_dir(&corpus).into_iter().flatten() {
        run_one(t, &work, &read(entry.unwrap().path()), &mut findings);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let mut n = 0;
    while match budget {
        Budget::Runs(r) => n < r,
        Budget::Time(d) => started.elapsed() < d,
    } {
        let base = seeds[rng.random_range(0..seeds.len())].clone();
        run_one(t, &work, &mutate(&mut rng, base), &mut findings);
        n += 1;
    }
    let _ = std::fs::remove_dir_all(&work);
    findings
}

#[derive(Clone, Copy)]
enum Budget {
    Runs(usize),
    Time(Duration),
}

/// Silences the default panic message (a crash is reported with its input instead).
fn quiet_panics() {
    std::panic::set_hook(Box::new(|_| {}));
}

#[test]
fn every_parser_survives_its_corpus_and_fresh_mutations() {
    quiet_panics();
    for t in targets() {
        let f = fuzz(&t, 2025, Budget::Runs(150));
        assert!(f.crashes.is_empty(), "{}: {} crashes, first: {:?}", t.name, f.crashes.len(), f.crashes[0].1);
        assert!(f.hangs.is_empty(), "{}: {} inputs over {HANG:?}", t.name, f.hangs.len());
    }
}

#[test]
#[ignore = "the long fuzzing run: FUZZ_SECONDS per target (default 600)"]
fn fuzz_long() {
    quiet_panics();
    let seconds: u64 = std::env::var("FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(600);
    let only = std::env::var("FUZZ_TARGETS").ok();
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/fuzz-crashes");
    for t in targets().into_iter().filter(|t| only.as_deref().is_none_or(|o| o.split(',').any(|n| n == t.name))) {
        let f = fuzz(&t, std::process::id() as u64, Budget::Time(Duration::from_secs(seconds)));
        let dir = out.join(t.name);
        for (i, (input, msg)) in f.crashes.iter().enumerate().take(20) {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("crash-{i}.bin")), input).unwrap();
            println!("{}: crash {i}: {msg}", t.name);
        }
        for (i, input) in f.hangs.iter().enumerate().take(20) {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("hang-{i}.bin")), input).unwrap();
            println!("{}: hang {i} written", t.name);
        }
        println!(
            "{}: {seconds} s, {} inputs, {} accepted, {} crashes, {} hangs",
            t.name,
            f.runs,
            f.accepted,
            f.crashes.len(),
            f.hangs.len()
        );
    }
}
