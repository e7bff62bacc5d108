//! Inline SVG line charts over the last hour: no script, no external files.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use maud::{Markup, html};

use super::history::WINDOW;

/// Drawing area in SVG user units (the chart scales to the page's width).
const WIDTH: f64 = 600.0;
const HEIGHT: f64 = 140.0;
/// Room for the axis labels.
const LEFT: f64 = 56.0;
const BOTTOM: f64 = 18.0;
const TOP: f64 = 8.0;

/// One line: a legend label, a CSS class for its colour, and `(time, value)` points.
pub struct Series<'a> {
    /// Legend label.
    pub label: &'a str,
    /// CSS class (`s1`, `s2`).
    pub class: &'static str,
    /// Points; `None` values are gaps.
    pub points: Vec<(SystemTime, Option<f64>)>,
}

/// A chart of `series` over the hour before `now`, values formatted with `unit`.
pub fn line_chart(
    title: &str,
    now: SystemTime,
    series: &[Series<'_>],
    unit: fn(f64) -> String,
) -> Markup {
    let max = series
        .iter()
        .flat_map(|s| s.points.iter().filter_map(|(_, v)| *v))
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max);
    let top = nice_ceiling(max);
    let start = now.checked_sub(WINDOW).unwrap_or(now);
    let x = |t: SystemTime| -> f64 {
        let from_start = t
            .duration_since(start)
            .unwrap_or(Duration::ZERO)
            .as_secs_f64();
        LEFT + (from_start / WINDOW.as_secs_f64()).clamp(0.0, 1.0) * (WIDTH - LEFT)
    };
    let y = |v: f64| -> f64 {
        let plot = HEIGHT - BOTTOM - TOP;
        TOP + plot - (v / top).clamp(0.0, 1.0) * plot
    };
    let has_data = series
        .iter()
        .any(|s| s.points.iter().any(|(_, v)| v.is_some()));
    let sampled = series.iter().any(|s| !s.points.is_empty());
    html! {
        figure.chart {
            figcaption { (title) }
            svg viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) role="img" aria-label=(title) {
                line.axis x1=(LEFT) y1=(y(0.0)) x2=(WIDTH) y2=(y(0.0)) {}
                line.grid x1=(LEFT) y1=(y(top)) x2=(WIDTH) y2=(y(top)) {}
                line.grid x1=(LEFT) y1=(y(top / 2.0)) x2=(WIDTH) y2=(y(top / 2.0)) {}
                text.label x=(LEFT - 4.0) y=(y(top) + 4.0) text-anchor="end" { (unit(top)) }
                text.label x=(LEFT - 4.0) y=(y(top / 2.0) + 4.0) text-anchor="end" { (unit(top / 2.0)) }
                text.label x=(LEFT - 4.0) y=(y(0.0) + 4.0) text-anchor="end" { "0" }
                text.label x=(LEFT) y=(HEIGHT - 4.0) { "-60 min" }
                text.label x=((LEFT + WIDTH) / 2.0) y=(HEIGHT - 4.0) text-anchor="middle" { "-30 min" }
                text.label x=(WIDTH) y=(HEIGHT - 4.0) text-anchor="end" { "now" }
                @for s in series {
                    @for run in runs(&s.points) {
                        polyline class=(s.class) points=(polyline_points(&run, x, y)) {}
                    }
                }
                @if !has_data {
                    text.label x=((LEFT + WIDTH) / 2.0) y=(HEIGHT / 2.0) text-anchor="middle" {
                        @if sampled { "nothing in the time sampled so far" }
                        @else { "no samples yet: the first appear 20 seconds after start" }
                    }
                }
            }
            ul.legend {
                @for s in series {
                    li class=(s.class) {
                        (s.label)
                        @if let Some(v) = s.points.iter().rev().find_map(|(_, v)| v.filter(|v| v.is_finite())) {
                            ": " (unit(v)) " now"
                        }
                    }
                }
            }
        }
    }
}

/// Consecutive points with values; a gap (`None`) starts a new run.
fn runs(points: &[(SystemTime, Option<f64>)]) -> Vec<Vec<(SystemTime, f64)>> {
    let mut out = vec![Vec::new()];
    for (t, v) in points {
        match (v, out.last_mut()) {
            (Some(v), Some(run)) if v.is_finite() => run.push((*t, *v)),
            _ => out.push(Vec::new()),
        }
    }
    out.retain(|r| !r.is_empty());
    out
}

fn polyline_points(
    run: &[(SystemTime, f64)],
    x: impl Fn(SystemTime) -> f64,
    y: impl Fn(f64) -> f64,
) -> String {
    let mut out = String::with_capacity(run.len() * 14);
    // A single point still shows as a short flat line.
    let run: Vec<(SystemTime, f64)> = if run.len() == 1 {
        let (t, v) = run[0];
        vec![
            (t.checked_sub(Duration::from_secs(5)).unwrap_or(t), v),
            (t, v),
        ]
    } else {
        run.to_vec()
    };
    for (i, (t, v)) in run.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let _ = write!(out, "{:.1},{:.1}", x(*t), y(*v));
    }
    out
}

/// The smallest of 1, 2, 2.5, 5 × 10^k that is at least `v` (a round axis top).
fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    for step in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if step * magnitude >= v {
            return step * magnitude;
        }
    }
    10.0 * magnitude
}

/// Rates like `12/s`, `0.5/s`.
pub fn per_second(v: f64) -> String {
    if v >= 100.0 || v == 0.0 {
        format!("{v:.0}/s")
    } else if v >= 1.0 {
        format!("{v:.1}/s")
    } else {
        format!("{v:.2}/s")
    }
}

/// Seconds like `850 ms`, `2.5 s`.
pub fn seconds(v: f64) -> String {
    if v == 0.0 {
        "0".to_owned()
    } else if v < 1.0 {
        format!("{:.0} ms", v * 1000.0)
    } else {
        format!("{v:.1} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_tops_are_round() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(0.7), 1.0);
        assert_eq!(nice_ceiling(1.2), 2.0);
        assert_eq!(nice_ceiling(2.2), 2.5);
        assert_eq!(nice_ceiling(430.0), 500.0);
        assert_eq!(nice_ceiling(5000.0), 5000.0);
    }

    #[test]
    fn gaps_split_lines_and_points_stay_inside_the_plot() {
        let now = SystemTime::now();
        let at = |s: u64| now - Duration::from_secs(s);
        let series = [Series {
            label: "events",
            class: "s1",
            points: vec![
                (at(120), Some(1.0)),
                (at(110), Some(4.0)),
                (at(100), None),
                (at(90), Some(2.0)),
                (at(7200), Some(f64::NAN)),
            ],
        }];
        let svg = line_chart("Events", now, &series, per_second).into_string();
        assert_eq!(svg.matches("<polyline").count(), 2, "{svg}");
        assert!(svg.contains("events: 2.0/s now"), "{svg}");
        assert!(!svg.contains("NaN"), "{svg}");
    }
}
