//! The server's resident memory through a soak as SVG: MiB against minutes, one line per run
//! that sampled it (`--rss-every`), on linear axes starting at zero so growth is not
//! exaggerated.

use crate::report::Report;
use svg::node::element::{Line, Polyline, Text};

const W: f64 = 900.0;
const H: f64 = 420.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 220.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 50.0;
const COLOURS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e"];

/// Draws the RSS series of `reports`; `None` when none sampled it.
pub fn svg(reports: &[Report]) -> Option<String> {
    let series: Vec<(&str, &Vec<(f64, f64)>)> = reports
        .iter()
        .filter_map(|r| {
            r.server_rss
                .as_ref()
                .map(|s| (r.label.as_str(), &s.samples))
        })
        .collect();
    if series.is_empty() {
        return None;
    }
    let points = || series.iter().flat_map(|(_, s)| s.iter());
    let t_max = points().map(|p| p.0).fold(1.0, f64::max) / 60.0;
    let m_max = points().map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let x = |minutes: f64| LEFT + minutes / t_max * (W - LEFT - RIGHT);
    let y = |mib: f64| H - BOTTOM - mib / m_max * (H - TOP - BOTTOM);
    let mut doc = crate::plot::canvas(W, H);
    for i in 0..=5 {
        let (minutes, mib) = (t_max * i as f64 / 5.0, m_max * i as f64 / 5.0);
        doc = doc
            .add(grid(x(minutes), TOP, x(minutes), H - BOTTOM))
            .add(grid(LEFT, y(mib), W - RIGHT, y(mib)))
            .add(label(
                format!("{minutes:.1} min"),
                x(minutes),
                H - BOTTOM + 18.0,
                "middle",
            ))
            .add(label(
                format!("{mib:.0} MiB"),
                LEFT - 6.0,
                y(mib) + 4.0,
                "end",
            ));
    }
    for (i, (name, samples)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let line: Vec<String> = samples
            .iter()
            .map(|(t, m)| format!("{:.1},{:.1}", x(t / 60.0), y(*m)))
            .collect();
        doc = doc
            .add(
                Polyline::new()
                    .set("points", line.join(" "))
                    .set("fill", "none")
                    .set("stroke", colour)
                    .set("stroke-width", 2),
            )
            .add(
                label(
                    format!("{name} RSS"),
                    W - RIGHT + 10.0,
                    TOP + 16.0 * (i as f64 + 1.0),
                    "start",
                )
                .set("fill", colour),
            );
    }
    Some(doc.to_string())
}

fn grid(x1: f64, y1: f64, x2: f64, y2: f64) -> Line {
    Line::new()
        .set("x1", x1)
        .set("y1", y1)
        .set("x2", x2)
        .set("y2", y2)
        .set("stroke", "#ddd")
}

fn label(text: String, x: f64, y: f64, anchor: &str) -> Text {
    Text::new(text)
        .set("x", x)
        .set("y", y)
        .set("text-anchor", anchor)
}
