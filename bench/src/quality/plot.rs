//! PNG plots of the routing-quality report: the TTFT CDF of each router on
//! one workload, each backend's load over time under each router on one
//! workload, hit rate against load imbalance for every (workload, router)
//! pair, and each router's mean TTFT against the load levels of a workload. Text needs a TrueType font from the system (DejaVu or
//! Liberation Sans); without one the plots are skipped.
use std::{fs, path::Path, sync::OnceLock};

use plotters::{coord::types::RangedCoordf64, prelude::*, style::FontStyle};

use super::load::Samples;

/// Where a sans-serif TrueType font usually is.
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Line colours of backends (Tableau 10), readable on white.
const BACKEND_COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// The font family name the plots use.
const FAMILY: &str = "sans-serif";

/// Registers a system font once; the error says why plots are skipped.
pub fn font() -> Result<(), String> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let bytes = FONTS
            .iter()
            .find_map(|path| fs::read(path).ok())
            .ok_or_else(|| format!("no TrueType font in {}", FONTS.join(", ")))?;
        // plotters keeps registered fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font(FAMILY, FontStyle::Normal, bytes)
            .map_err(|_| "the system font is not a valid TrueType font".to_owned())
    })
    .clone()
}

fn text<E: std::fmt::Display>(err: E) -> String {
    err.to_string()
}

/// A chart of the plots' shape: two f64 axes on a PNG.
type Chart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// Draws the series' legend at `position`, boxed, in the plots' font.
fn legend<'a, 'b: 'a>(
    chart: &mut Chart<'a, 'b>,
    position: SeriesLabelPosition,
) -> Result<(), String> {
    chart
        .configure_series_labels()
        .position(position)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .label_font((FAMILY, 16))
        .draw()
        .map_err(text)
}

/// The TTFT CDF of each `(router, sorted TTFTs in ms)`.
pub fn ttft_cdf(path: &Path, title: &str, series: &[(&str, &[f64])]) -> Result<(), String> {
    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(text)?;
    let max = series
        .iter()
        .filter_map(|(_, v)| v.last().copied())
        .fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, 22))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..max * 1.05, 0.0..1.0)
        .map_err(text)?;
    chart
        .configure_mesh()
        .x_desc("TTFT (ms)")
        .y_desc("fraction of requests")
        .draw()
        .map_err(text)?;
    for (i, (name, values)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let n = values.len() as f64;
        let points = values
            .iter()
            .enumerate()
            .map(move |(k, &v)| (v, (k + 1) as f64 / n));
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(text)?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    root.present().map_err(text)
}

/// One point of [`hit_vs_load`].
#[derive(Clone, Debug)]
pub struct Point {
    /// The router (one colour each).
    pub router: String,
    /// The workload (the point's label).
    pub workload: String,
    /// Busiest backend ÷ mean.
    pub load: f64,
    /// Achieved hit rate.
    pub hit: f64,
}

/// Hit rate against max/mean load, one colour per router.
pub fn hit_vs_load(path: &Path, routers: &[&str], points: &[Point]) -> Result<(), String> {
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(text)?;
    let max_load = points.iter().map(|p| p.load).fold(1.5, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption("hit rate vs load imbalance", (FAMILY, 22))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(0.95..max_load * 1.08, 0.0..1.0)
        .map_err(text)?;
    chart
        .configure_mesh()
        .x_desc("max/mean requests per backend")
        .y_desc("prefix-cache hit rate")
        .draw()
        .map_err(text)?;
    for (i, router) in routers.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let mine = points.iter().filter(|p| p.router == *router);
        chart
            .draw_series(
                mine.clone()
                    .map(|p| Circle::new((p.load, p.hit), 6, color.filled())),
            )
            .map_err(text)?
            .label(*router)
            .legend(move |(x, y)| Circle::new((x + 10, y), 5, color.filled()));
        chart
            .draw_series(mine.map(|p| {
                EmptyElement::at((p.load, p.hit))
                    + Text::new(p.workload.clone(), (8, -14), (FAMILY, 13).into_font())
            }))
            .map_err(text)?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    root.present().map_err(text)
}

/// Mean TTFT (ms) of each `(router, value per level)` against the load
/// levels, in order: one line per router, a gap where a level failed.
pub fn ttft_vs_load(
    path: &Path,
    title: &str,
    levels: &[String],
    series: &[(&str, &[Option<f64>])],
) -> Result<(), String> {
    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(text)?;
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().flatten())
        .copied()
        .fold(1.0, f64::max);
    let n = levels.len().max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, 22))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(-0.2..(n as f64 - 0.8), 0.0..max * 1.1)
        .map_err(text)?;
    chart
        .configure_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 {
                levels
                    .get(i as usize)
                    .map(|l| l.split(' ').next().unwrap_or_default().to_owned())
                    .unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_desc("load level")
        .y_desc("mean TTFT (ms)")
        .draw()
        .map_err(text)?;
    for (i, (name, values)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<(f64, f64)> = values
            .iter()
            .enumerate()
            .filter_map(|(k, v)| v.map(|v| (k as f64, v)))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(text)?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 4, color.filled())),
            )
            .map_err(text)?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    root.present().map_err(text)
}

/// Each backend's running + waiting requests over time, one panel per
/// `(router, samples)`, one line per backend (named by `backends`), two
/// panels a row, all on the same axes.
pub fn load_over_time(
    path: &Path,
    title: &str,
    backends: &[String],
    panels: &[(&str, &Samples)],
) -> Result<(), String> {
    let cols = if panels.len() > 1 { 2 } else { 1 };
    let rows = panels.len().div_ceil(cols).max(1);
    let height = u32::try_from(rows).unwrap_or(8).min(8) * 260 + 50;
    let root = BitMapBackend::new(path, (1100, height)).into_drawing_area();
    root.fill(&WHITE).map_err(text)?;
    let root = root.titled(title, (FAMILY, 22)).map_err(text)?;
    let max_t = panels
        .iter()
        .filter_map(|(_, s)| s.times.last().copied())
        .fold(0.1, f64::max);
    let max_y = panels
        .iter()
        .map(|(_, s)| s.peak())
        .max()
        .unwrap_or(0)
        .max(1);
    for ((name, samples), area) in panels.iter().zip(root.split_evenly((rows, cols))) {
        let mut chart = ChartBuilder::on(&area)
            .caption(*name, (FAMILY, 17))
            .margin(8)
            .x_label_area_size(34)
            .y_label_area_size(44)
            .build_cartesian_2d(0.0..max_t, 0u32..max_y + 1)
            .map_err(text)?;
        chart
            .configure_mesh()
            .x_desc("s")
            .y_desc("running + waiting")
            .label_style((FAMILY, 12))
            .draw()
            .map_err(text)?;
        for (b, series) in samples.per_backend.iter().enumerate() {
            let color = BACKEND_COLORS
                .get(b)
                .map_or_else(|| Palette99::pick(b).to_rgba(), |c| c.to_rgba());
            let points = samples.times.iter().copied().zip(series.iter().copied());
            let label = backends
                .get(b)
                .map_or_else(|| format!("backend {b}"), Clone::clone);
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(1)))
                .map_err(text)?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.85))
            .label_font((FAMILY, 12))
            .draw()
            .map_err(text)?;
    }
    root.present().map_err(text)
}
