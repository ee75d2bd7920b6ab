//! Seeded synthetic crowd-flow series for tests and benchmarks: a few hotspots whose flows follow
//! a daily cycle, plus noise. Never used for accuracy claims.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::series::FrameSeries;
use super::timeslots::{date_of_days, days_from_civil, Stamp};

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
        stamps.push(Stamp { date: date_of_days(base + day), slot: (base + day) * 24 + (hour % 24) as i64 });
    }
    FrameSeries::from_rows(2, height, width, values, stamps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_and_gapped() {
        let a = crowd_series(4, 4, 2, 10, 7);
        let b = crowd_series(4, 4, 2, 10, 7);
        assert_eq!(a.values, b.values);
        assert_eq!(a.len(), 48 - 4);
        assert!(a.longest_run() < 10);
    }
}
