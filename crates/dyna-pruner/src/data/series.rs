//! A time series of gridded frames with one time stamp each, and the input/output windows cut
//! from it over runs of consecutive slots only.

use std::sync::Arc;

use super::timeslots::{Stamp, Ymd};

/// Gridded frames in physical units, sorted by time with unique stamps.
#[derive(Debug, Clone)]
pub struct FrameSeries {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// Row-major `[T, C, H, W]`.
    pub values: Vec<f32>,
    pub stamps: Vec<Stamp>,
    /// Rows dropped because their time stamp appeared earlier (kept: first occurrence).
    pub duplicates_dropped: usize,
    /// What the frames are: picks the metrics.
    pub domain: Domain,
}

/// What a series' frames measure.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Domain {
    /// Crowd flow counts (or anything without a known grid).
    #[default]
    Crowd,
    /// Weather fields on a lat/lon grid.
    Weather(Arc<LatLonGrid>),
    /// Radar precipitation on SEVIR's 0-255 VIL pixel scale; NaN marks no-data pixels.
    Radar,
}

/// A regular latitude/longitude grid: rows are latitudes (north first), columns longitudes.
#[derive(Debug, Clone, PartialEq)]
pub struct LatLonGrid {
    /// Latitude of each row, degrees north.
    pub latitudes: Vec<f32>,
    /// Longitude of each column, degrees east.
    pub longitudes: Vec<f32>,
    /// Name of each channel (e.g. `t2m`, `t@850`) and its units.
    pub channels: Vec<(String, String)>,
}

/// A half-open date range `[from, to)` of `YYYYMMDD` dates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateRange {
    pub from: Ymd,
    pub to: Ymd,
}

impl DateRange {
    pub fn contains(&self, date: Ymd) -> bool {
        (self.from..self.to).contains(&date)
    }
}

impl FrameSeries {
    /// Builds a series from rows in file order: sorts by stamp and keeps the first row of each
    /// duplicated stamp (the shipped TaxiNYC files repeat some slots with different values).
    pub fn from_rows(channels: usize, height: usize, width: usize, values: Vec<f32>, stamps: Vec<Stamp>) -> Self {
        let frame = channels * height * width;
        debug_assert_eq!(values.len(), frame * stamps.len());
        let mut order: Vec<usize> = (0..stamps.len()).collect();
        order.sort_by_key(|&i| (stamps[i].slot, i));
        order.dedup_by_key(|i| stamps[*i].slot);
        let duplicates_dropped = stamps.len() - order.len();
        let mut sorted = Vec::with_capacity(order.len() * frame);
        for &i in &order {
            sorted.extend_from_slice(&values[i * frame..(i + 1) * frame]);
        }
        FrameSeries {
            channels,
            height,
            width,
            values: sorted,
            stamps: order.iter().map(|&i| stamps[i]).collect(),
            duplicates_dropped,
            domain: Domain::Crowd,
        }
    }

    /// Concatenates series of the same grid (e.g. one file per year), then sorts and de-duplicates.
    /// Returns `None` when the grids differ.
    pub fn merge(parts: Vec<FrameSeries>) -> Option<FrameSeries> {
        let first = parts.first()?;
        let (c, h, w) = (first.channels, first.height, first.width);
        if parts.iter().any(|p| (p.channels, p.height, p.width) != (c, h, w)) {
            return None;
        }
        let dropped: usize = parts.iter().map(|p| p.duplicates_dropped).sum();
        let domain = first.domain.clone();
        let mut values = Vec::new();
        let mut stamps = Vec::new();
        for p in parts {
            values.extend(p.values);
            stamps.extend(p.stamps);
        }
        let mut merged = FrameSeries::from_rows(c, h, w, values, stamps);
        merged.duplicates_dropped += dropped;
        merged.domain = domain;
        Some(merged)
    }

    pub fn len(&self) -> usize {
        self.stamps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.stamps.is_empty()
    }

    pub fn frame_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    pub fn frame(&self, t: usize) -> &[f32] {
        let n = self.frame_len();
        &self.values[t * n..(t + 1) * n]
    }

    /// Length of the longest run of consecutive slots.
    pub fn longest_run(&self) -> usize {
        if self.is_empty() {
            return 0;
        }
        let (mut best, mut run) = (1, 1);
        for pair in self.stamps.windows(2) {
            run = if pair[1].slot == pair[0].slot + 1 { run + 1 } else { 1 };
            best = best.max(run);
        }
        best
    }

    /// The lat/lon grid of a weather series.
    pub fn grid(&self) -> Option<&LatLonGrid> {
        match &self.domain {
            Domain::Weather(g) => Some(g),
            _ => None,
        }
    }

    /// Starts `t` of every window of `len` frames whose slots are consecutive and whose frames
    /// are all `inside`.
    pub fn window_starts(&self, len: usize, inside: impl Fn(usize) -> bool) -> Vec<usize> {
        // run_end[t]: number of consecutive, in-range slots starting at t.
        let mut run = vec![0usize; self.len() + 1];
        for t in (0..self.len()).rev() {
            run[t] = if !inside(t) {
                0
            } else if t + 1 < self.len() && self.stamps[t + 1].slot == self.stamps[t].slot + 1 {
                run[t + 1] + 1
            } else {
                1
            };
        }
        (0..self.len()).filter(|&t| run[t] >= len).collect()
    }
}

/// Frames a window spans: `t_in` inputs, the gap up to the lead, `t_out` targets.
pub fn window_len(t_in: usize, lead: usize, t_out: usize) -> usize {
    t_in - 1 + lead + t_out
}

/// Where the frames of a window set come from.
#[derive(Debug, Clone)]
enum WindowSource {
    /// Windows cut from a series at the given starts.
    Series { series: Arc<FrameSeries>, starts: Vec<usize> },
    /// Pre-cut windows (OpenSTL `dataset.npz`): `x` is `[N, T_in, C, H, W]`, `y` `[N, T_out, C, H, W]`.
    Pairs { x: Vec<f32>, y: Vec<f32>, n: usize },
}

/// Input/output windows in physical units, ready to be scaled and batched.
#[derive(Debug, Clone)]
pub struct WindowSet {
    pub t_in: usize,
    pub t_out: usize,
    /// Slots from the last input frame to the first target frame (1: the next frame).
    pub lead: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    source: WindowSource,
}

impl WindowSet {
    /// Windows of `t_in` inputs and `t_out` targets, the first target `lead` slots after the last
    /// input; `starts` must leave room for `window_len(t_in, lead, t_out)` frames.
    pub fn from_series(series: Arc<FrameSeries>, starts: Vec<usize>, t_in: usize, lead: usize, t_out: usize) -> Self {
        WindowSet {
            t_in,
            t_out,
            lead,
            channels: series.channels,
            height: series.height,
            width: series.width,
            source: WindowSource::Series { series, starts },
        }
    }

    /// Pre-cut windows; `x.len()` must be `n * t_in * frame` and `y.len()` `n * t_out * frame`.
    pub fn from_pairs(x: Vec<f32>, y: Vec<f32>, n: usize, t_in: usize, t_out: usize, chw: [usize; 3]) -> Self {
        let [channels, height, width] = chw;
        debug_assert_eq!(x.len(), n * t_in * channels * height * width);
        debug_assert_eq!(y.len(), n * t_out * channels * height * width);
        WindowSet { t_in, t_out, lead: 1, channels, height, width, source: WindowSource::Pairs { x, y, n } }
    }

    pub fn len(&self) -> usize {
        match &self.source {
            WindowSource::Series { starts, .. } => starts.len(),
            WindowSource::Pairs { n, .. } => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn frame_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// What the frames measure (crowd flow for pre-cut windows).
    pub fn domain(&self) -> &Domain {
        match &self.source {
            WindowSource::Series { series, .. } => &series.domain,
            WindowSource::Pairs { .. } => &Domain::Crowd,
        }
    }

    /// The lat/lon grid of the frames, when known.
    pub fn grid(&self) -> Option<&LatLonGrid> {
        match self.domain() {
            Domain::Weather(g) => Some(g),
            _ => None,
        }
    }

    /// Keeps only the windows at `keep` (indices into this set), in that order.
    pub fn subset(&self, keep: &[usize]) -> WindowSet {
        let f = self.frame_len();
        let source = match &self.source {
            WindowSource::Series { series, starts } => {
                WindowSource::Series { series: series.clone(), starts: keep.iter().map(|&i| starts[i]).collect() }
            }
            WindowSource::Pairs { x, y, .. } => {
                let (xi, yi) = (self.t_in * f, self.t_out * f);
                WindowSource::Pairs {
                    x: keep.iter().flat_map(|&i| x[i * xi..(i + 1) * xi].iter().copied()).collect(),
                    y: keep.iter().flat_map(|&i| y[i * yi..(i + 1) * yi].iter().copied()).collect(),
                    n: keep.len(),
                }
            }
        };
        WindowSet {
            t_in: self.t_in,
            t_out: self.t_out,
            lead: self.lead,
            channels: self.channels,
            height: self.height,
            width: self.width,
            source,
        }
    }

    /// Input frames of window `i`, `[T_in, C, H, W]` row-major.
    pub fn input(&self, i: usize) -> &[f32] {
        let f = self.frame_len();
        match &self.source {
            WindowSource::Series { series, starts } => &series.values[starts[i] * f..(starts[i] + self.t_in) * f],
            WindowSource::Pairs { x, .. } => &x[i * self.t_in * f..(i + 1) * self.t_in * f],
        }
    }

    /// Target frames of window `i`, `[T_out, C, H, W]` row-major.
    pub fn target(&self, i: usize) -> &[f32] {
        let f = self.frame_len();
        match &self.source {
            WindowSource::Series { series, starts } => {
                let s = starts[i] + self.t_in - 1 + self.lead;
                &series.values[s * f..(s + self.t_out) * f]
            }
            WindowSource::Pairs { y, .. } => &y[i * self.t_out * f..(i + 1) * self.t_out * f],
        }
    }

    /// The date of the first target frame of window `i`, when known.
    pub fn target_date(&self, i: usize) -> Option<Ymd> {
        match &self.source {
            WindowSource::Series { series, starts } => Some(series.stamps[starts[i] + self.t_in - 1 + self.lead].date),
            WindowSource::Pairs { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(slots: &[i64]) -> FrameSeries {
        let stamps = slots.iter().map(|&s| Stamp { date: 20100101 + (s / 24) as u32, slot: s }).collect();
        let values = slots.iter().map(|&s| s as f32).collect();
        FrameSeries::from_rows(1, 1, 1, values, stamps)
    }

    #[test]
    fn sorts_and_keeps_first_duplicate() {
        let s = series(&[3, 1, 2, 1]);
        assert_eq!(s.stamps.iter().map(|s| s.slot).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(s.duplicates_dropped, 1);
    }

    #[test]
    fn lead_time_windows_target_the_frame_lead_slots_after_the_last_input() {
        let s = Arc::new(series(&(0..10).collect::<Vec<_>>()));
        // 2 inputs, target 3 slots after the last input: frames t, t+1 -> t+4.
        let len = window_len(2, 3, 1);
        assert_eq!(len, 5);
        let starts = s.window_starts(len, |_| true);
        assert_eq!(starts, vec![0, 1, 2, 3, 4, 5]);
        let w = WindowSet::from_series(s, starts, 2, 3, 1);
        assert_eq!(w.input(1), &[1.0, 2.0]);
        assert_eq!(w.target(1), &[5.0]);
    }

    #[test]
    fn windows_only_over_consecutive_slots() {
        let s = series(&[0, 1, 2, 3, 5, 6, 7, 8, 9]);
        assert_eq!(s.window_starts(4, |_| true), vec![0, 4, 5]);
        assert_eq!(s.longest_run(), 5);
        assert!(s.window_starts(6, |_| true).is_empty());
    }
}
