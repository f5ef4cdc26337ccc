//! Latency distributions as SVG: one curve per run and kind, latency (log scale) against
//! percentile on a "nines" axis (50, 90, 99, 99.9, 99.99), so the tail is as visible as the
//! median.

use crate::report::Report;
use svg::node::element::{Line, Polyline, Rectangle, Text};
use svg::Document;

const W: f64 = 900.0;
const H: f64 = 520.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 220.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 60.0;
const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// x position of a percentile: -log10(1 - p), capped at 99.999.
fn nines(p: f64) -> f64 {
    -(1.0 - (p / 100.0).min(0.99999)).log10()
}

/// A white `w` × `h` SVG canvas in the plots' font.
pub(crate) fn canvas(w: f64, h: f64) -> Document {
    Document::new()
        .set("viewBox", (0, 0, w, h))
        .set("width", w)
        .set("height", h)
        .set("font-family", "sans-serif")
        .set("font-size", 12)
        .add(
            Rectangle::new()
                .set("width", w)
                .set("height", h)
                .set("fill", "white"),
        )
}

/// Draws every kind of every report.
pub fn svg(reports: &[Report]) -> String {
    let curves: Vec<(String, &Vec<(f64, f64)>)> = reports
        .iter()
        .flat_map(|r| {
            r.results
                .iter()
                .map(move |k| (format!("{} {}", r.label, k.kind), &k.distribution))
        })
        .collect();
    let values = curves
        .iter()
        .flat_map(|(_, d)| d.iter().map(|(_, v)| *v))
        .filter(|v| *v > 0.0);
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if lo > hi {
        (0.001, 1.0)
    } else {
        (
            lo.log10().floor(),
            hi.log10().ceil().max(lo.log10().floor() + 1.0),
        )
    };
    let x = |p: f64| LEFT + nines(p) / nines(99.999) * (W - LEFT - RIGHT);
    let y = |ms: f64| {
        let v = ms.max(10f64.powf(lo)).log10();
        H - BOTTOM - (v - lo) / (hi - lo) * (H - TOP - BOTTOM)
    };
    let mut doc = canvas(W, H);
    for p in [0.0, 50.0, 90.0, 99.0, 99.9, 99.99, 99.999] {
        doc = doc
            .add(
                Line::new()
                    .set("x1", x(p))
                    .set("x2", x(p))
                    .set("y1", TOP)
                    .set("y2", H - BOTTOM)
                    .set("stroke", "#ddd"),
            )
            .add(
                Text::new(format!("{p}%"))
                    .set("x", x(p))
                    .set("y", H - BOTTOM + 18.0)
                    .set("text-anchor", "middle"),
            );
    }
    let mut decade = lo;
    while decade <= hi {
        let ms = 10f64.powf(decade);
        doc = doc
            .add(
                Line::new()
                    .set("x1", LEFT)
                    .set("x2", W - RIGHT)
                    .set("y1", y(ms))
                    .set("y2", y(ms))
                    .set("stroke", "#ddd"),
            )
            .add(
                Text::new(format!("{ms} ms"))
                    .set("x", LEFT - 6.0)
                    .set("y", y(ms) + 4.0)
                    .set("text-anchor", "end"),
            );
        decade += 1.0;
    }
    doc = doc.add(
        Text::new("percentile")
            .set("x", (LEFT + W - RIGHT) / 2.0)
            .set("y", H - 15.0)
            .set("text-anchor", "middle"),
    );
    for (i, (name, dist)) in curves.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let points: Vec<String> = dist
            .iter()
            .filter(|(p, _)| *p <= 99.999)
            .map(|(p, v)| format!("{:.1},{:.1}", x(*p), y(*v)))
            .collect();
        doc = doc
            .add(
                Polyline::new()
                    .set("points", points.join(" "))
                    .set("fill", "none")
                    .set("stroke", colour)
                    .set("stroke-width", 2),
            )
            .add(
                Text::new(name.clone())
                    .set("x", W - RIGHT + 12.0)
                    .set("y", TOP + 16.0 * (i as f64 + 1.0))
                    .set("fill", colour),
            );
    }
    doc.to_string()
}
