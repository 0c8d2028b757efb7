//! The HTML report of `bench --mode calls --report FILE.html`: one
//! self-contained file (inline SVG charts, no script, no outside
//! resource), so it opens anywhere and can be attached to a ticket.

use std::fmt::Write;

use crate::bench_calls::{CallsReport, Step};

const W: f64 = 560.0;
const H: f64 = 250.0;
const LEFT: f64 = 56.0;
const BOTTOM: f64 = 36.0;
const TOP: f64 = 14.0;
const RIGHT: f64 = 16.0;
const COLOURS: [&str; 3] = ["#0969da", "#cf222e", "#1a7f37"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" step for about `n` ticks up to `max`.
fn tick_step(max: f64, n: f64) -> f64 {
    let raw = (max / n).max(1e-9);
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag)
}

struct Series<'a> {
    name: &'a str,
    points: Vec<(f64, f64)>,
}

/// A line chart of `series` against calls, with an optional bound drawn
/// as a dashed line.
fn chart(title: &str, y_label: &str, series: &[Series], bound: Option<(f64, &str)>) -> String {
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let x_max = xs.fold(1.0f64, f64::max);
    let ys = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let y_max = ys.chain(bound.map(|b| b.0)).fold(0.0f64, f64::max).max(1e-3) * 1.1;
    let (xs_step, ys_step) = (tick_step(x_max, 6.0), tick_step(y_max, 5.0));
    let (x_top, y_top) = (
        (x_max / xs_step).ceil() * xs_step,
        (y_max / ys_step).ceil() * ys_step,
    );
    let px = |x: f64| LEFT + x / x_top * (W - LEFT - RIGHT);
    let py = |y: f64| H - BOTTOM - y / y_top * (H - BOTTOM - TOP);
    let mut o = String::new();
    let _ = write!(
        o,
        "<figure><figcaption>{}</figcaption><svg class=\"chart\" viewBox=\"0 0 {W} {H}\" width=\"{W}\" height=\"{H}\" role=\"img\" aria-label=\"{}\">",
        esc(title),
        esc(title)
    );
    let mut y = 0.0;
    while y <= y_top + 1e-9 {
        let (x2, yy, lx, ly, label) = (W - RIGHT, py(y), LEFT - 6.0, py(y) + 4.0, trim(y));
        let _ = write!(
            o,
            "<line x1=\"{LEFT}\" x2=\"{x2}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#d0d7de\"/><text x=\"{lx}\" y=\"{ly:.1}\" text-anchor=\"end\">{label}</text>"
        );
        y += ys_step;
    }
    let mut x = 0.0;
    while x <= x_top + 1e-9 {
        let _ = write!(
            o,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            px(x),
            H - BOTTOM + 16.0,
            trim(x)
        );
        x += xs_step;
    }
    let _ = write!(
        o,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">calls</text><text x=\"12\" y=\"{}\" transform=\"rotate(-90 12 {})\" text-anchor=\"middle\">{}</text>",
        (LEFT + W - RIGHT) / 2.0,
        H - 4.0,
        (H - BOTTOM) / 2.0,
        (H - BOTTOM) / 2.0,
        esc(y_label)
    );
    if let Some((b, label)) = bound {
        let (x2, yy, ly, label) = (W - RIGHT, py(b), py(b) - 4.0, esc(label));
        let _ = write!(
            o,
            "<line class=\"bound\" x1=\"{LEFT}\" x2=\"{x2}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#9a6700\" stroke-dasharray=\"6 4\"/><text x=\"{x2}\" y=\"{ly:.1}\" text-anchor=\"end\" fill=\"#9a6700\">{label}</text>"
        );
    }
    // Legend entries side by side, each as wide as its name.
    let mut legend_x = LEFT + 10.0;
    for (i, s) in series.iter().filter(|s| !s.points.is_empty()).enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let pts: Vec<String> = s
            .points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let _ = write!(
            o,
            "<polyline class=\"series\" fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>",
            pts.join(" ")
        );
        for (x, y) in &s.points {
            let _ = write!(
                o,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{c}\"/>",
                px(*x),
                py(*y)
            );
        }
        let _ = write!(
            o,
            "<rect x=\"{legend_x}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"{c}\"/><text x=\"{}\" y=\"{}\">{}</text>",
            TOP - 10.0,
            legend_x + 14.0,
            TOP,
            esc(s.name)
        );
        legend_x += 34.0 + s.name.len() as f64 * 6.0;
    }
    o.push_str("</svg></figure>");
    o
}

fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

fn ms(s: &Step, f: impl Fn(&crate::bench::Percentiles) -> u64, lat: bool) -> Option<f64> {
    let p = if lat { &s.latency_us } else { &s.jitter_us };
    p.as_ref().map(|p| f(p) as f64 / 1000.0)
}

/// The report as one HTML document.
pub(crate) fn html(r: &CallsReport) -> String {
    let cpu_name = if r.steps.iter().any(|s| s.server_core_pct.is_some()) {
        "server core busy (softirq included)"
    } else {
        "server process CPU"
    };
    let series = |name, f: &dyn Fn(&Step) -> Option<f64>| Series {
        name,
        points: r
            .steps
            .iter()
            .filter_map(|s| f(s).map(|v| (s.calls as f64, v)))
            .collect(),
    };
    let cpu = chart(
        "Server CPU against calls",
        "% of one core",
        &[
            series(cpu_name, &|s: &Step| s.server_core_pct.or(s.server_cpu_pct)),
            series("server process (user + system)", &|s: &Step| {
                s.server_core_pct.and(s.server_cpu_pct)
            }),
        ],
        Some((100.0, "one core")),
    );
    let loss = chart(
        "Packet loss against calls",
        "% lost",
        &[series("loss", &|s: &Step| Some(s.loss_pct))],
        Some((r.max_loss_pct, "bound")),
    );
    let latency = chart(
        "One-way latency and jitter against calls",
        "ms",
        &[
            series("latency p50", &|s: &Step| ms(s, |p| p.p50, true)),
            series("latency p99", &|s: &Step| ms(s, |p| p.p99, true)),
            series("jitter p99", &|s: &Step| ms(s, |p| p.p99, false)),
        ],
        Some((r.max_p99_ms, "p99 bound")),
    );
    let headline = headline(r);
    let rows = step_rows(&r.steps);
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>turnpike bench: calls against {server}</title>
<style>
body {{ font: 15px/1.45 system-ui, "DejaVu Sans", sans-serif; margin: 24px; color: #1f2328; max-width: 1200px; }}
h1 {{ font-size: 20px; }} .muted {{ color: #57606a; }} .figure {{ font-size: 18px; }}
table {{ border-collapse: collapse; font-size: 14px; }} th, td {{ padding: 4px 8px; border-bottom: 1px solid #d0d7de; text-align: left; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }} th {{ background: #f6f8fa; }}
.charts {{ display: flex; flex-wrap: wrap; gap: 12px; }} figure {{ margin: 0; }} figcaption {{ font-weight: 600; margin: 8px 0 2px; }}
svg.chart text {{ font-size: 11px; fill: #57606a; }}
</style></head><body>
<h1>turnpike bench: calls against {name}</h1>
<p id="run">Server: <b>{name}</b> at {server_addr}{software}. Load from turnpike bench {version} on {host}: {cpu_model}, {cores} cores.</p>
<p class="muted">Each call is two legs, each an allocation, sending {pps} packets/s of {size} B to the other's relayed address
over {transport:?} via {via:?} ({preset:?}), with up to {jitter} ms of send jitter; every packet crosses the server twice.
Run stopped: {stopped}.</p>
{headline}
<div class="charts">{cpu}{loss}{latency}</div>
<h2>Steps</h2>
<table id="steps"><thead><tr><th>calls</th><th>target pkt/s</th><th>sent pkt/s</th><th>loss %</th><th>latency p50 ms</th><th>latency p99 ms</th><th>jitter p99 ms</th><th>server core %</th><th>server CPU %</th><th></th></tr></thead>
<tbody>{rows}</tbody></table>
<p class="muted">Made by <code>turnpike bench --mode calls</code>. Server CPU is the server's own time (user and system) from /proc;
the core's busy time, with <code>--server-core</code>, also counts the softirq and kernel threads that carry its packets.</p>
</body></html>
"#,
        server = esc(&match &r.run.server_name {
            Some(n) => format!("{n} ({})", r.server),
            None => r.server.to_string(),
        }),
        name = esc(r
            .run
            .server_name
            .as_deref()
            .unwrap_or("a server that sends no SOFTWARE (name it with --label)")),
        server_addr = esc(&r.server.to_string()),
        software = match (&r.run.server_software, &r.run.server_name) {
            (Some(s), Some(n)) if s != n => format!(", SOFTWARE \"{}\"", esc(s)),
            _ => String::new(),
        },
        version = esc(&r.run.bench_version),
        host = esc(&r.run.host),
        cpu_model = esc(&r.run.cpu_model),
        cores = r.run.cores,
        pps = r.pps,
        size = r.size,
        transport = r.transport,
        via = r.via,
        preset = r.preset,
        jitter = r.jitter_ms,
        stopped = esc(&r.stopped),
    )
}

/// The capacity figure at the top of the report.
fn headline(r: &CallsReport) -> String {
    match &r.capacity {
    Some(c) => format!(
        "<p class=\"figure\" id=\"capacity\" data-calls=\"{}\"><strong>{} calls</strong> carried within {}% loss and {} ms p99 latency{}{}.</p>",
        c.calls,
        c.calls,
        r.max_loss_pct,
        r.max_p99_ms,
        c.cpu_pct.map(|p| format!(", the server at {p:.1}% of a core")).unwrap_or_default(),
        c.calls_per_core
            .map(|n| format!(": about <strong>{n:.0} calls per core</strong>"))
            .unwrap_or_default()
    ),
    None => "<p class=\"figure\" id=\"capacity\" data-calls=\"0\">No step stayed within the bounds.</p>".to_owned(),
}
}

/// One table row per step.
fn step_rows(steps: &[Step]) -> String {
    let mut rows = String::new();
    for s in steps {
        let f = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
        let _ = write!(
        rows,
        "<tr><td class=\"num\">{}</td><td class=\"num\">{:.0}</td><td class=\"num\">{:.0}</td><td class=\"num\">{:.2}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
        s.calls,
        s.target_pps,
        s.sent_pps,
        s.loss_pct,
        f(ms(s, |p| p.p50, true)),
        f(ms(s, |p| p.p99, true)),
        f(ms(s, |p| p.p99, false)),
        f(s.server_core_pct),
        f(s.server_cpu_pct),
        match (s.within_bounds, s.generator_kept_up) {
            (true, true) => "within bounds",
            (true, false) => "within bounds; generator behind schedule",
            (false, true) => "out of bounds",
            (false, false) => "out of bounds; generator behind schedule",
        }
    );
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        assert_eq!(tick_step(100.0, 5.0), 20.0);
        assert_eq!(tick_step(7.0, 5.0), 2.0);
        assert_eq!(tick_step(0.9, 5.0), 0.2);
        assert_eq!(tick_step(1234.0, 6.0), 250.0);
    }
}
