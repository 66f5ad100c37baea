//! A PNG of latency percentiles per system (HdrHistogram-style: the x axis
//! spreads the tail, 90% / 99% / 99.9% ... equally apart), one panel for
//! acceptance and one for delivery when any report has it.

use std::path::Path;

use anyhow::{bail, Context as _};
use plotters::prelude::*;

use crate::report::Report;

/// Fonts tried in order; `ESH3AR_PERF_FONT` overrides.
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

pub(crate) const COLORS: &[RGBColor] = &[
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// The x coordinate of a percentile: -log10(1 - p), capped at 5 nines.
fn nines(percentile: f64) -> f64 {
    let rest = (1.0 - percentile / 100.0).max(1e-5);
    -rest.log10()
}

pub(crate) fn load_font() -> anyhow::Result<()> {
    let env = std::env::var("ESH3AR_PERF_FONT").ok();
    let candidates = env.iter().map(String::as_str).chain(FONT_PATHS.iter().copied());
    for path in candidates {
        if let Ok(bytes) = std::fs::read(path) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| anyhow::anyhow!("{path} is not a usable font"))?;
            return Ok(());
        }
    }
    bail!("no TrueType font found (install fonts-dejavu-core or set ESH3AR_PERF_FONT)")
}

/// Draws `reports` into `out` (PNG).
pub fn plot(reports: &[Report], title: &str, out: &Path) -> anyhow::Result<()> {
    if reports.is_empty() {
        bail!("nothing to plot");
    }
    load_font()?;
    let with_delivery = reports.iter().any(|r| r.delivery.as_ref().is_some_and(|d| d.count > 0));
    let height = if with_delivery { 1000 } else { 560 };
    let root = BitMapBackend::new(out, (1100, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, rest) = root.split_vertically(50);
    top.titled(title, ("sans-serif", 24))?;
    let panels = if with_delivery { rest.split_evenly((2, 1)) } else { vec![rest] };
    panel(&panels[0], reports, "acceptance latency (send → 202 / durable ack)", |r| Some(&r.acceptance.curve))?;
    if with_delivery {
        panel(&panels[1], reports, "end-to-end latency (send → receiver got it)", |r| {
            r.delivery.as_ref().filter(|d| d.count > 0).map(|d| &d.curve)
        })?;
    }
    root.present().with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    reports: &[Report],
    caption: &str,
    curve: impl Fn(&Report) -> Option<&Vec<(f64, f64)>>,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let values = reports.iter().filter_map(&curve).flatten().map(|&(_, ms)| ms);
    let max_ms = values.fold(0.01f64, f64::max);
    let y_top = 10f64.powf(max_ms.log10().ceil() + 0.01);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 20))
        .margin(15)
        .margin_right(45)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..5f64, (0.01f64..y_top).log_scale())?;
    chart
        .configure_mesh()
        .x_labels(6)
        .x_label_formatter(&|x| match x.round() as i64 {
            0 => "0%".into(),
            1 => "90%".into(),
            2 => "99%".into(),
            3 => "99.9%".into(),
            4 => "99.99%".into(),
            _ => "99.999%".into(),
        })
        .x_desc("percentile")
        .y_desc("latency, ms (log)")
        .y_label_formatter(&|y| if *y >= 1.0 { format!("{y:.0}") } else { format!("{y}") })
        .draw()?;
    for (i, r) in reports.iter().enumerate() {
        let Some(points) = curve(r) else { continue };
        let color = COLORS[i % COLORS.len()];
        let name = if r.label.is_empty() { r.system.clone() } else { r.label.clone() };
        let line: Vec<(f64, f64)> = points.iter().map(|&(p, ms)| (nines(p), ms.max(0.01))).collect();
        chart
            .draw_series(LineSeries::new(line, color.stroke_width(2)))?
            .label(format!("{name} ({:.0} msg/s)", r.throughput_per_s))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nines_spread_the_tail() {
        assert!((nines(90.0) - 1.0).abs() < 1e-9);
        assert!((nines(99.9) - 3.0).abs() < 1e-9);
        assert_eq!(nines(100.0), 5.0);
    }
}
