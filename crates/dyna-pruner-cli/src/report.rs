//! `demo`'s pictures and `report.html`: four test windows of the dynamic model (the most and
//! the least pruned, two typical), the spread of its per-sample cost over the whole test range,
//! and a page that shows them beside the metrics.

use std::path::{Path, PathBuf};

use anyhow::Context;
use burn::prelude::*;
use plotters::prelude::*;

use dyna_pruner::checkpoint::Checkpoint;
use dyna_pruner::data::WindowSet;
use dyna_pruner::eval::Evaluation;

use crate::pictures::{extent, field_panel, mask_panel, register_font, save_columns, Column, Grid, Image, Palette};

/// How a task's fields are drawn.
#[derive(Debug, Clone, Copy)]
pub struct Style {
    pub palette: Palette,
    /// Unit of the drawn channel, as the colour bar says it.
    pub unit: &'static str,
    /// Subtract the checkpoint's climatology (weather: anomalies).
    pub anomaly: bool,
    /// What one forecast step is, e.g. "h" or "5 min".
    pub step: &'static str,
}

/// Radar in every format: VIL on SEVIR's stepped scale, five-minute steps.
pub const RADAR_STYLE: Style = Style { palette: Palette::Radar, unit: "VIL", anomaly: false, step: "x 5 min" };

/// The windows drawn: the fewest and most MACs, and the two nearest the median; equal costs
/// (a top-k DataMask keeps the same count in every window) are ordered by `signal`.
pub fn chosen_windows(macs: &[f64], signal: &[f64]) -> Vec<(usize, &'static str)> {
    let mut order: Vec<usize> = (0..macs.len()).collect();
    order.sort_by(|&a, &b| macs[a].total_cmp(&macs[b]).then(signal[a].total_cmp(&signal[b])).then(a.cmp(&b)));
    let n = order.len();
    let picks =
        [(0, "most_pruned"), (n - 1, "least_pruned"), (n / 2, "typical_1"), ((n / 2 + 1).min(n - 1), "typical_2")];
    let mut chosen: Vec<(usize, &'static str)> = Vec::new();
    for (rank, label) in picks {
        if !chosen.iter().any(|(w, _)| *w == order[rank]) {
            chosen.push((order[rank], label));
        }
    }
    chosen
}

/// Each window's signal: the sum of its last input frame (physical units, no-data skipped).
pub fn signals(test: &WindowSet) -> Vec<f64> {
    let frame = test.channels * test.height * test.width;
    (0..test.len())
        .map(|i| test.input(i)[(test.t_in - 1) * frame..].iter().filter(|v| v.is_finite()).map(|&v| f64::from(v)).sum())
        .collect()
}

/// Forecast frames shown: all of up to 6, else 4 spread over the horizon.
fn shown_frames(t_out: usize) -> Vec<usize> {
    if t_out <= 6 {
        (0..t_out).collect()
    } else {
        vec![0, t_out / 3, 2 * t_out / 3, t_out - 1]
    }
}

/// One window to draw, in physical units.
pub struct WindowView<'a> {
    pub window: usize,
    pub label: &'static str,
    /// `[t_in, channels, h, w]`.
    pub input: &'a [f32],
    /// `[t_out, channels, h, w]`, as the prediction.
    pub truth: &'a [f32],
    pub prediction: &'a [f32],
    /// S per patch `[hp * wp]`.
    pub importance: Vec<f32>,
    /// The DataMask per patch `[hp * wp]` (all kept when it is off).
    pub kept: Vec<bool>,
    /// MACs as a fraction of the dense model's.
    pub macs_fraction: f64,
}

/// What every window of a run shares: the windows' sizes, the model's patch, how to draw.
pub struct Layout<'a> {
    pub test: &'a WindowSet,
    pub patch: usize,
    pub style: Style,
    /// The training mean frame `[channels, h, w]` (anomalies, when the style asks).
    pub climatology: Option<&'a [f32]>,
}

/// Draws one window (channel 0) to `path`; returns its caption.
pub fn draw_window(path: &Path, layout: &Layout<'_>, v: &WindowView<'_>) -> anyhow::Result<String> {
    let test = layout.test;
    let (c, h, w, t_out, patch) = (test.channels, test.height, test.width, test.t_out, layout.patch);
    let (hp, wp) = (h.div_ceil(patch), w.div_ceil(patch));
    let frame = c * h * w;
    let grid = Grid::fit(h, w, 200);
    let style = layout.style;
    let climatology = layout.climatology.filter(|_| style.anomaly);
    let field =
        |values: &[f32]| -> Vec<f32> { (0..h * w).map(|i| values[i] - climatology.map_or(0.0, |m| m[i])).collect() };
    let last = field(&v.input[(test.t_in - 1) * frame..test.t_in * frame]);
    let frames = shown_frames(t_out);
    let preds: Vec<Vec<f32>> = frames.iter().map(|&f| field(&v.prediction[f * frame..])).collect();
    let truths: Vec<Vec<f32>> = frames.iter().map(|&f| field(&v.truth[f * frame..])).collect();
    // The scale of the observed fields (a prediction outside it takes the end colours).
    let all = truths.iter().flatten().chain(&last).copied().filter(|v| v.is_finite());
    let (lo, hi) = extent(all.map(f64::from));
    let (lo, hi) = (lo as f32, hi as f32);
    let range = match style.palette {
        Palette::Radar => (0.0, 255.0),
        Palette::Diverging => (-lo.abs().max(hi.abs()), lo.abs().max(hi.abs())),
        Palette::Sequential => (lo, hi),
    };
    let errors: Vec<Vec<f32>> =
        preds.iter().zip(&truths).map(|(p, t)| p.iter().zip(t).map(|(a, b)| a - b).collect()).collect();
    let e = errors.iter().flatten().filter(|v| v.is_finite()).fold(1e-6f32, |m, v| m.max(v.abs()));
    let importance: Vec<f32> = (0..h * w).map(|i| v.importance[(i / w / patch) * wp + (i % w) / patch]).collect();
    let (s_lo, s_hi) = extent(importance.iter().map(|&v| f64::from(v)));
    let (s_lo, s_hi) = (s_lo as f32, s_hi as f32);
    debug_assert_eq!(v.kept.len(), hp * wp);
    let rows = frames.len();
    let same = |img: Image| vec![img; rows];
    let column = |title, palette, range, unit, panels| Column { title, palette, range, unit, panels };
    let columns = vec![
        column("last input", style.palette, range, style.unit, same(field_panel(&last, grid, style.palette, range))),
        column(
            "importance S",
            Palette::Sequential,
            (s_lo, s_hi),
            "",
            same(field_panel(&importance, grid, Palette::Sequential, (s_lo, s_hi))),
        ),
        column(
            "DataMask (kept outlined)",
            Palette::Sequential,
            range,
            style.unit,
            same(mask_panel(&last, grid, range, &v.kept, patch)),
        ),
        column(
            "dynamic prediction",
            style.palette,
            range,
            style.unit,
            preds.iter().map(|p| field_panel(p, grid, style.palette, range)).collect(),
        ),
        column(
            "truth",
            style.palette,
            range,
            style.unit,
            truths.iter().map(|t| field_panel(t, grid, style.palette, range)).collect(),
        ),
        column(
            "error (prediction - truth)",
            Palette::Diverging,
            (-e, e),
            style.unit,
            errors.iter().map(|d| field_panel(d, grid, Palette::Diverging, (-e, e))).collect(),
        ),
    ];
    let labels: Vec<String> = frames.iter().map(|f| format!("+{} {}", f + 1, style.step)).collect();
    let kept_share = v.kept.iter().filter(|&&k| k).count() as f64 / v.kept.len() as f64;
    let title = format!(
        "test window {} ({}): {:.0}% of the dense MACs, {:.0}% of the patches kept",
        v.window,
        v.label.replace('_', " "),
        100.0 * v.macs_fraction,
        100.0 * kept_share
    );
    save_columns(path, &title, &labels, &columns)?;
    Ok(title)
}

/// Draws the pictures of `dynamic` on `test` into `out/pictures/`; `eval` is its evaluation on
/// the same windows (per-sample costs), `dense_macs` the dense model's MACs per sample.
pub fn draw_pictures<B: Backend>(
    out: &Path,
    test: &WindowSet,
    dynamic: &Checkpoint<B>,
    eval: &Evaluation,
    dense_macs: f64,
    style: Style,
    device: &B::Device,
) -> anyhow::Result<Vec<(PathBuf, String)>> {
    let dir = out.join("pictures");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let fractions: Vec<f64> = eval.per_sample.iter().map(|c| c.macs / dense_macs).collect();
    anyhow::ensure!(fractions.len() == test.len() && !fractions.is_empty(), "no per-window costs to draw");
    let signal = signals(test);
    let chosen = chosen_windows(&fractions, &signal);
    let indices: Vec<usize> = chosen.iter().map(|c| c.0).collect();
    let scaler = &dynamic.meta.scaler;
    let (x, _) = test.batch::<B>(&indices, scaler, device);
    let fwd = dynamic.model.forward(x, dynamic.meta.masking);
    let pred: Vec<f32> = fwd.prediction.into_data().to_vec().context("prediction")?;
    let s: Option<Vec<f32>> = fwd.importance.map(|t| t.into_data().to_vec().expect("f32 S"));
    let kept: Option<Vec<f32>> = fwd.data_mask.map(|t| t.into_data().to_vec().expect("f32 mask"));
    let layout = Layout {
        test,
        patch: dynamic.meta.architecture.patch(),
        style,
        climatology: dynamic.meta.climatology.as_deref(),
    };
    let (hp, wp) = dynamic.meta.architecture.patch_grid(test.height, test.width);
    let per = test.t_out * test.channels * test.height * test.width;
    let mut written = Vec::new();
    for (k, &(window, label)) in chosen.iter().enumerate() {
        let physical: Vec<f32> =
            pred[k * per..(k + 1) * per].iter().enumerate().map(|(i, &v)| scaler.unscale(i, v)).collect();
        let n = hp * wp;
        let view = WindowView {
            window,
            label,
            input: test.input(window),
            truth: test.target(window),
            prediction: &physical,
            importance: s.as_ref().map_or(vec![0.0; n], |s| s[k * n..(k + 1) * n].to_vec()),
            kept: (0..n).map(|p| kept.as_ref().is_none_or(|m| m[k * n + p] > 0.5)).collect(),
            macs_fraction: fractions[window],
        };
        let path = dir.join(format!("window_{}_{label}.png", k + 1));
        let caption = draw_window(&path, &layout, &view)?;
        written.push((path, caption));
    }
    let path = dir.join("adaptivity.png");
    let patches: Vec<f64> = eval.per_sample.iter().map(|c| f64::from(c.kept_patch_fraction)).collect();
    let caption = adaptivity(&path, &signal, &fractions, &patches)?;
    written.push((path, caption));
    Ok(written)
}

/// Left: a histogram of each test window's MACs as a fraction of the dense model's and of its
/// kept patch fraction; right: that MACs fraction against the window's signal (sum of its last
/// input frame).
pub fn adaptivity(path: &Path, signal: &[f64], fraction: &[f64], patches: &[f64]) -> anyhow::Result<String> {
    register_font();
    let fail = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", path.display());
    let root = BitMapBackend::new(path, (1200, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let (left, right) = root.split_horizontally(600);
    let bins = 20;
    let count = |v: &[f64]| {
        let mut n = vec![0usize; bins];
        v.iter().for_each(|&x| n[((x * bins as f64) as usize).min(bins - 1)] += 1);
        n
    };
    let (cf, cp) = (count(fraction), count(patches));
    let top = cf.iter().chain(&cp).copied().max().unwrap_or(1) as f64 * 1.1;
    let mut chart = ChartBuilder::on(&left)
        .caption(format!("{} test windows", fraction.len()), ("sans-serif", 18))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..1.0f64, 0.0..top)
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc("fraction kept (MACs of the dense model; patches)")
        .y_desc("windows")
        .draw()
        .map_err(|e| fail(&e))?;
    for (counts, colour, name, shift) in [(&cf, RED, "MACs fraction", 0.0), (&cp, BLUE, "kept patch fraction", 0.5)] {
        let w = 1.0 / bins as f64;
        chart
            .draw_series(counts.iter().enumerate().map(|(i, &n)| {
                let x0 = i as f64 * w + shift * w * 0.5;
                Rectangle::new([(x0, 0.0), (x0 + w * 0.5, n as f64)], colour.mix(0.7).filled())
            }))
            .map_err(|e| fail(&e))?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| fail(&e))?;
    let (s_lo, s_hi) = extent(signal.iter().copied());
    let (f_lo, f_hi) = extent(fraction.iter().copied());
    let pad = ((f_hi - f_lo) * 0.1).max(0.01);
    let mut chart = ChartBuilder::on(&right)
        .caption("cost against signal", ("sans-serif", 18))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(s_lo..s_hi.max(s_lo + 1e-9), (f_lo - pad)..(f_hi + pad))
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc("signal: sum of the last input frame (physical units)")
        .y_desc("MACs fraction")
        .draw()
        .map_err(|e| fail(&e))?;
    chart
        .draw_series(signal.iter().zip(fraction).map(|(&s, &f)| Circle::new((s, f), 2, RED.mix(0.5).filled())))
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))?;
    Ok(format!(
        "Per test window: MACs as a fraction of the dense model's (mean {:.3}, range {f_lo:.3}..{f_hi:.3}) and kept patch fraction; right: MACs fraction against the sum of the last input frame.",
        fraction.iter().sum::<f64>() / fraction.len().max(1) as f64
    ))
}

/// Escapes text for HTML.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// `out/report.html`: one self-contained page: `body` (HTML: tables, text), then the pictures
/// with their captions (links relative to `out`), then `made_by`. The page counts the images
/// the browser could read (`data-loaded` on its body, for `scripts/check-report.sh`).
pub fn write_page(
    out: &Path,
    title: &str,
    body: &str,
    pictures: &[(PathBuf, String)],
    made_by: &str,
) -> anyhow::Result<PathBuf> {
    let mut html = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title>\n\
         <style>body{{font-family:sans-serif;max-width:1500px;margin:1em auto}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #999;padding:3px 8px;text-align:right}}img{{max-width:100%}}</style></head>\n\
         <body onload=\"document.body.dataset.loaded=[...document.images].filter(i=>i.naturalWidth>0).length\">\n\
         <h1>{t}</h1>\n{body}",
        t = esc(title)
    );
    for (path, caption) in pictures {
        let rel = path.strip_prefix(out).unwrap_or(path);
        html += &format!(
            "<figure><img src=\"{}\" alt=\"{c}\"><figcaption>{c}</figcaption></figure>\n",
            esc(&rel.display().to_string()),
            c = esc(caption)
        );
    }
    html += &format!("<p>{}</p>\n</body></html>\n", esc(made_by));
    let path = out.join("report.html");
    std::fs::write(&path, html).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The body of `demo`'s page: the metrics table of its `report` JSON and a line on the test range.
pub fn demo_table(report: &serde_json::Value) -> String {
    let names: Vec<String> =
        report["dense"]["metrics"].as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default();
    let mut html = String::from("<table><tr><th>model</th>");
    for n in &names {
        html += &format!("<th>{}</th>", esc(n));
    }
    html += "<th>MACs per sample</th></tr>\n";
    for m in ["dense", "dynamic", "persistence"] {
        html += &format!("<tr><th>{m}</th>");
        for n in &names {
            html += &format!("<td>{:.4}</td>", report[m]["metrics"][n].as_f64().unwrap_or(f64::NAN));
        }
        let macs = report[m]["macs_per_sample"].as_f64().map_or("-".into(), |v| format!("{:.2} M", v / 1e6));
        html += &format!("<td>{macs}</td></tr>\n");
    }
    html + &format!(
        "</table>\n<p>Test range: {} windows of {}. MAC reduction {:.1}%, relative change of {} {:+.2}% (worse is positive).</p>\n",
        report["test_samples"],
        esc(report["dataset"].as_str().unwrap_or("")),
        100.0 * report["mac_reduction"].as_f64().unwrap_or(f64::NAN),
        esc(report["main_metric"].as_str().unwrap_or("")),
        100.0 * report["relative_error_change"].as_f64().unwrap_or(f64::NAN)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chosen_windows_are_the_extremes_and_two_typical_ones() {
        let macs = [5.0, 1.0, 9.0, 3.0, 7.0];
        assert_eq!(
            chosen_windows(&macs, &[0.0; 5]),
            vec![(1, "most_pruned"), (2, "least_pruned"), (0, "typical_1"), (4, "typical_2")]
        );
        assert_eq!(chosen_windows(&[2.0], &[1.0]), vec![(0, "most_pruned")]);
        // Equal costs: the quietest window first.
        assert_eq!(chosen_windows(&[1.0, 1.0, 1.0], &[5.0, 1.0, 3.0])[..2], [(1, "most_pruned"), (0, "least_pruned")]);
    }
}
