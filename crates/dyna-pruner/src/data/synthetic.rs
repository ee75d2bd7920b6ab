//! Seeded synthetic crowd-flow series for tests and benchmarks: a few hotspots whose flows follow
//! a daily cycle, plus noise. Never used for accuracy claims.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::series::FrameSeries;
use super::timeslots::{days_from_civil, Stamp};

/// Hourly in/out flows on an `height x width` grid for `days` days from 2010-01-01.
/// `gap_every` > 0 drops one hour every `gap_every` hours to exercise the window logic.
pub fn crowd_series(height: usize, width: usize, days: usize, gap_every: usize, seed: u64) -> FrameSeries {
    let mut rng = StdRng::seed_from_u64(seed);
    let hotspots: Vec<(f32, f32, f32, f32)> = (0..4)
        .map(|_| {
            (
                rng.random_range(0.0..height as f32),
                rng.random_range(0.0..width as f32),
                rng.random_range(20.0..200.0),
                rng.random_range(0.0..24.0),
            )
        })
        .collect();
    let base = days_from_civil(2010, 1, 1);
    let (mut values, mut stamps) = (Vec::new(), Vec::new());
    for hour in 0..days * 24 {
        if gap_every > 0 && hour % gap_every == gap_every - 1 {
            continue;
        }
        let day = (hour / 24) as i64;
        let phase = (hour % 24) as f32 / 24.0 * std::f32::consts::TAU;
        for channel in 0..2 {
            for y in 0..height {
                for x in 0..width {
                    let mut v = 0.0;
                    for &(hy, hx, amp, peak) in &hotspots {
                        let d2 = (y as f32 - hy).powi(2) + (x as f32 - hx).powi(2);
                        let shift = peak / 24.0 * std::f32::consts::TAU + channel as f32;
                        v += amp * (-d2 / 6.0).exp() * (1.0 + (phase - shift).cos());
                    }
                    values.push((v + rng.random_range(0.0..5.0)).round());
                }
            }
        }
        let (y, m, d) = civil_from_days(base + day);
        stamps.push(Stamp { date: (y * 10_000 + m * 100 + d) as u32, slot: (base + day) * 24 + (hour % 24) as i64 });
    }
    FrameSeries::from_rows(2, height, width, values, stamps)
}

/// Inverse of [`days_from_civil`] (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_round_trip() {
        for days in [-1000, 0, 11_017, 14_975, 15_400] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn seeded_and_gapped() {
        let a = crowd_series(4, 4, 2, 10, 7);
        let b = crowd_series(4, 4, 2, 10, 7);
        assert_eq!(a.values, b.values);
        assert_eq!(a.len(), 48 - 4);
        assert!(a.longest_run() < 10);
    }
}
