//! Seeded synthetic series for tests and benchmarks: crowd flow (a few hotspots whose flows
//! follow a daily cycle, plus noise) and radar (rain cells that advect, grow and decay over
//! mostly clear sky). Crowd flow is never used for accuracy claims; the synthetic radar task is
//! reported as what it is.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::series::{Domain, FrameSeries};
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

/// One synthetic rain cell.
struct RainCell {
    y: f32,
    x: f32,
    /// Own drift on top of the sequence's wind, pixels per frame.
    dy: f32,
    dx: f32,
    /// Peak on the 0-255 scale, Gaussian radius in pixels.
    peak: f32,
    radius: f32,
    /// Frame of birth (may be before the first frame) and lifetime in frames.
    birth: f32,
    life: f32,
}

/// `sequences` independent runs of `frames` five-minute radar frames of `height x width` on the
/// 0-255 VIL scale: per run a wind (0.02-0.05 of the frame width per frame, any direction) and
/// 2-6 Gaussian rain cells (peak 60-250, radius 4-10% of the frame) that drift with it, grow and
/// decay (intensity `sin(pi * age / life)`); some are born during the run. Run `k` is dated
/// 2020-01-01 + k days; runs are separated by a gap in slots, so no window spans two runs.
pub fn radar_series(sequences: usize, frames: usize, height: usize, width: usize, seed: u64) -> FrameSeries {
    let mut rng = StdRng::seed_from_u64(seed);
    let size = height.min(width) as f32;
    let base = days_from_civil(2020, 1, 1);
    let (mut values, mut stamps) = (Vec::with_capacity(sequences * frames * height * width), Vec::new());
    for k in 0..sequences {
        let angle = rng.random_range(0.0..std::f32::consts::TAU);
        let speed = rng.random_range(0.02..0.05) * size;
        let (wy, wx) = (speed * angle.sin(), speed * angle.cos());
        let cells: Vec<RainCell> = (0..rng.random_range(2..=6))
            .map(|_| {
                let life = rng.random_range(0.8..2.5) * frames as f32;
                RainCell {
                    y: rng.random_range(0.0..height as f32),
                    x: rng.random_range(0.0..width as f32),
                    dy: wy + rng.random_range(-0.2..0.2) * speed,
                    dx: wx + rng.random_range(-0.2..0.2) * speed,
                    peak: rng.random_range(60.0..250.0),
                    radius: rng.random_range(0.04..0.10) * size,
                    birth: rng.random_range(-0.5 * life..0.5 * frames as f32),
                    life,
                }
            })
            .collect();
        for t in 0..frames {
            let t = t as f32;
            for y in 0..height {
                for x in 0..width {
                    let mut v = 0.0f32;
                    for c in &cells {
                        let age = t - c.birth;
                        if !(0.0..c.life).contains(&age) {
                            continue;
                        }
                        let intensity = c.peak * (std::f32::consts::PI * age / c.life).sin();
                        let (cy, cx) = (c.y + c.dy * t, c.x + c.dx * t);
                        let d2 = (y as f32 - cy).powi(2) + (x as f32 - cx).powi(2);
                        v += intensity * (-d2 / (2.0 * c.radius * c.radius)).exp();
                    }
                    values.push(if v < 1.0 { 0.0 } else { v.min(255.0).round() });
                }
            }
        }
        let first = (k * (frames + 1)) as i64;
        stamps.extend((0..frames as i64).map(|t| Stamp { date: date_of_days(base + k as i64), slot: first + t }));
    }
    let mut series = FrameSeries::from_rows(1, height, width, values, stamps);
    series.domain = Domain::Radar;
    series
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

    #[test]
    fn synthetic_radar_is_seeded_mostly_clear_and_moves() {
        let a = radar_series(3, 8, 32, 32, 5);
        assert_eq!(a.values, radar_series(3, 8, 32, 32, 5).values);
        assert_eq!((a.len(), a.height, a.width), (24, 32, 32));
        let wet = a.values.iter().filter(|v| **v > 16.0).count() as f32 / a.values.len() as f32;
        assert!(wet > 0.01 && wet < 0.6, "wet fraction {wet}");
        assert!(a.values.iter().all(|v| (0.0..=255.0).contains(v)));
        // runs never join: the longest run of consecutive slots is one run
        assert_eq!(a.longest_run(), 8);
        assert_ne!(a.frame(0), a.frame(7), "cells move");
    }
}
