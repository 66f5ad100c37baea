//! A PNG of the engine's RSS and disk use against the backlog's size
//! (messages accepted), one pair of lines per backlog report, with each
//! run's `memory_limit_bytes` as a dotted line.

use std::path::Path;

use anyhow::{bail, Context as _};
use plotters::prelude::*;

use crate::plot::{load_font, COLORS};
use crate::report::Report;

const MIB: f64 = 1048576.0;

/// The plot's title unless told otherwise.
pub const TITLE: &str = "esh3ar backlog: engine RSS and data dir on disk";

/// Draws the samples of every backlog report in `reports` into `out`.
pub fn plot(reports: &[Report], title: &str, out: &Path) -> anyhow::Result<()> {
    let runs: Vec<(&Report, &super::Profile)> =
        reports.iter().filter_map(|r| r.backlog.as_ref().map(|p| (r, p))).collect();
    if runs.is_empty() {
        bail!("no backlog report to plot");
    }
    load_font()?;
    let x_max = runs.iter().flat_map(|(_, p)| &p.samples).map(|s| s.accepted).max().unwrap_or(0).max(1) as f64;
    let y_max = runs
        .iter()
        .flat_map(|(_, p)| p.samples.iter().flat_map(|s| [s.rss_bytes, s.disk_bytes]).chain([p.memory_limit_bytes]))
        .max()
        .unwrap_or(0) as f64
        / MIB;
    let root = BitMapBackend::new(out, (1000, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .margin_right(30)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max * 1.02, 0f64..(y_max * 1.1).max(1.0))?;
    chart
        .configure_mesh()
        .x_desc("backlog: messages accepted")
        .y_desc("MiB")
        .x_label_formatter(&|x| if x_max >= 1e6 { format!("{:.1}M", x / 1e6) } else { format!("{:.0}k", x / 1e3) })
        .draw()?;
    for (i, (r, p)) in runs.iter().enumerate() {
        let name = if r.label.is_empty() {
            format!("{:.0} MiB limit", p.memory_limit_bytes as f64 / MIB)
        } else {
            r.label.clone()
        };
        let rss = COLORS[(2 * i) % COLORS.len()];
        let disk = COLORS[(2 * i + 1) % COLORS.len()];
        let line = |f: fn(&super::samples::Sample) -> u64| -> Vec<(f64, f64)> {
            p.samples.iter().map(|s| (s.accepted as f64, f(s) as f64 / MIB)).collect()
        };
        chart
            .draw_series(LineSeries::new(line(|s| s.rss_bytes), rss.stroke_width(2)))?
            .label(format!("{name}: engine RSS"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], rss.stroke_width(2)));
        chart
            .draw_series(LineSeries::new(line(|s| s.disk_bytes), disk.stroke_width(2)))?
            .label(format!("{name}: data dir on disk"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], disk.stroke_width(2)));
        let limit = p.memory_limit_bytes as f64 / MIB;
        let dots = (0..=100).map(|k| (x_max * k as f64 / 100.0, limit)).map(|c| Circle::new(c, 1, rss.filled()));
        chart
            .draw_series(dots)?
            .label(format!("{name}: memory_limit_bytes"))
            .legend(move |(x, y)| Circle::new((x + 10, y), 2, rss.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present().with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
}
