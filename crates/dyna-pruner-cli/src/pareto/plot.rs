//! `pareto.png`: the main metric against MACs per sample (left) and against the measured CPU
//! latency per sample (right); one marker per kind of model, the dynamic points joined,
//! persistence as a dashed line. Text in the shipped font (`pictures::FONT`; no system fonts).

use std::path::Path;

use anyhow::anyhow;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::{Front, Point, PointKind};

const SIZE: (u32, u32) = (1400, 560);

fn colour(kind: PointKind) -> RGBColor {
    match kind {
        PointKind::Dense => RGBColor(0, 0, 0),
        PointKind::DenseSmall => RGBColor(31, 119, 180),
        PointKind::StaticPruned => RGBColor(255, 127, 14),
        PointKind::Control => RGBColor(127, 127, 127),
        PointKind::Dynamic => RGBColor(214, 39, 40),
        PointKind::Persistence => RGBColor(44, 160, 44),
        PointKind::AnyBudget => RGBColor(148, 103, 189),
    }
}

/// The marker of a kind at `at` (pixel coordinates for the legend, data ones in a chart).
fn marker<DB: DrawingBackend, C: Clone + 'static>(kind: PointKind, at: C) -> DynElement<'static, DB, C> {
    let style = colour(kind).filled();
    match kind {
        PointKind::DenseSmall => TriangleMarker::new(at, 8, style).into_dyn(),
        PointKind::StaticPruned => Cross::new(at, 6, colour(kind).stroke_width(3)).into_dyn(),
        PointKind::Control => Circle::new(at, 6, colour(kind).stroke_width(2)).into_dyn(),
        _ => Circle::new(at, 6, style).into_dyn(),
    }
}

/// Draws the two panels of `front` to `path`.
pub fn draw(front: &Front, path: &Path) -> anyhow::Result<()> {
    crate::pictures::register_font();
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    let fail = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let (left, right) = root.split_horizontally(SIZE.0 / 2);
    let title = format!("{}: test {} ({} windows)", front.dataset, front.main_metric, front.test_samples);
    panel(front, &left, &title, "MACs per sample (millions)", |p| p.macs_per_sample / 1e6).map_err(|e| fail(&e))?;
    let latency = format!("CPU executor latency per sample, batch 1, {} threads (ms)", front.threads);
    panel(front, &right, "the same models, timed", &latency, |p| p.latency_ms).map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))
}

/// One panel: `x(point)` against the metric.
fn panel<'a>(
    front: &Front,
    area: &DrawingArea<BitMapBackend<'a>, Shift>,
    title: &str,
    x_label: &str,
    x: impl Fn(&Point) -> f64,
) -> Result<(), DrawingAreaErrorKind<<BitMapBackend<'a> as DrawingBackend>::ErrorType>> {
    let models: Vec<&Point> = front.points.iter().filter(|p| p.kind != PointKind::Persistence).collect();
    let persistence = front.points.iter().find(|p| p.kind == PointKind::Persistence);
    let xs = models.iter().map(|p| x(p));
    let x_max = xs.fold(0.0f64, f64::max) * 1.08 + 1e-9;
    // The models set the vertical range; persistence is drawn only when it falls inside it.
    let ys: Vec<f64> = models.iter().map(|p| p.metric).collect();
    let (lo, hi) = crate::pictures::extent(ys);
    let pad = ((hi - lo) * 0.1).max(hi.abs() * 0.02).max(1e-9);
    let (y0, y1) = (lo - pad, hi + 2.0 * pad);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, y0..y1)?;
    let better = if front.higher_is_better { "higher is better" } else { "lower is better" };
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(format!("{} ({better})", front.main_metric))
        .label_style(("sans-serif", 14))
        .draw()?;
    if let Some(p) = persistence {
        let style = colour(p.kind).stroke_width(2);
        let at = p.metric.clamp(y0, y1);
        let where_ = if p.metric > y1 {
            " (above)"
        } else if p.metric < y0 {
            " (below)"
        } else {
            ""
        };
        let line = DashedLineSeries::new(vec![(0.0, at), (x_max, at)], 8, 6, style);
        chart
            .draw_series(line.into_iter().filter(|_| where_.is_empty()))?
            .label(format!("persistence {:.4}{where_}", p.metric))
            .legend(move |(a, b)| PathElement::new(vec![(a, b), (a + 18, b)], style));
    }
    // The dynamic models joined, and the budget-conditioned model's points as its own line.
    for kind in [PointKind::Dynamic, PointKind::AnyBudget] {
        let mut line: Vec<(f64, f64)> = models.iter().filter(|p| p.kind == kind).map(|p| (x(p), p.metric)).collect();
        line.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart.draw_series(LineSeries::new(line, colour(kind).stroke_width(2)))?;
    }
    for kind in PointKind::ALL.into_iter().filter(|&k| k != PointKind::Persistence) {
        let of_kind: Vec<(f64, f64)> = models.iter().filter(|p| p.kind == kind).map(|p| (x(p), p.metric)).collect();
        if of_kind.is_empty() {
            continue;
        }
        chart
            .draw_series(of_kind.into_iter().map(|at| marker(kind, at)))?
            .label(kind.name())
            .legend(move |at| marker(kind, at));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
}
