//! Minimal SVG charts for the benchmark (line charts and a bar chart). Hand-written
//! rather than a plotting crate: two chart kinds do not justify a dependency tree, and
//! SVG needs no fonts or native libraries on the machines.

use std::fmt::Write;

const W: f64 = 640.0;
const H: f64 = 400.0;
const L: f64 = 70.0;
const R: f64 = 150.0;
const T: f64 = 40.0;
const B: f64 = 50.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];

fn frame(s: &mut String, title: &str, xl: &str, yl: &str, xmax: f64, ymax: f64, log: bool) {
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="20" text-anchor="middle" font-size="14">{title}</text>
<line x1="{L}" y1="{}" x2="{}" y2="{}" stroke="black"/>
<line x1="{L}" y1="{T}" x2="{L}" y2="{}" stroke="black"/>
<text x="{}" y="{}" text-anchor="middle">{xl}</text>
<text x="15" y="{}" text-anchor="middle" transform="rotate(-90 15 {})">{yl}</text>
"#,
        W / 2.0,
        H - B,
        W - R,
        H - B,
        H - B,
        (L + W - R) / 2.0,
        H - 12.0,
        (T + H - B) / 2.0,
        (T + H - B) / 2.0
    );
    for i in 0..=4 {
        let f = i as f64 / 4.0;
        let x = L + f * (W - R - L);
        let y = H - B - f * (H - B - T);
        let _ = writeln!(
            s,
            r#"<text x="{x}" y="{}" text-anchor="middle">{}</text>"#,
            H - B + 16.0,
            fmt_num(f * xmax)
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            L - 6.0,
            y + 4.0,
            if log {
                fmt_num(10f64.powf(f * ymax - 1.0))
            } else {
                fmt_num(f * ymax)
            }
        );
        let _ = writeln!(
            s,
            r##"<line x1="{L}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/>"##,
            W - R
        );
    }
}

fn fmt_num(v: f64) -> String {
    if v >= 100.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// A line chart of `(name, points)` series.
pub fn lines(title: &str, xl: &str, yl: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    chart(title, xl, yl, series, false)
}

/// A line chart with a logarithmic y axis (values below 0.1 are drawn at 0.1): for
/// downtimes, where stop-and-copy is orders of magnitude above pre-copy.
pub fn lines_log(title: &str, xl: &str, yl: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    let logged: Vec<(String, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(n, pts)| {
            (
                n.clone(),
                pts.iter()
                    .map(|&(x, y)| (x, y.max(0.1).log10() + 1.0))
                    .collect(),
            )
        })
        .collect();
    chart(title, xl, &format!("{yl}, log scale"), &logged, true)
}

fn chart(
    title: &str,
    xl: &str,
    yl: &str,
    series: &[(String, Vec<(f64, f64)>)],
    log: bool,
) -> String {
    let xmax = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.0))
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.05;
    let mut ymax = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.1;
    if log {
        ymax = ymax.ceil().max(1.0);
    }
    let mut s = String::new();
    frame(&mut s, title, xl, yl, xmax, ymax, log);
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|(x, y)| {
                format!(
                    "{:.1},{:.1}",
                    L + x / xmax * (W - R - L),
                    H - B - y / ymax * (H - B - T)
                )
            })
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        for p in &path {
            let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(s, r#"<circle cx="{x}" cy="{y}" r="3" fill="{c}"/>"#);
        }
        let ly = T + 16.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<rect x="{}" y="{}" width="12" height="4" fill="{c}"/>"#,
            W - R + 10.0,
            ly
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}">{name}</text>"#,
            W - R + 28.0,
            ly + 6.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// A bar chart of values by index.
pub fn bars(title: &str, xl: &str, yl: &str, values: &[f64]) -> String {
    let ymax = values.iter().copied().fold(0.0, f64::max).max(1e-9) * 1.1;
    let n = values.len().max(1) as f64;
    let mut s = String::new();
    frame(&mut s, title, xl, yl, n, ymax, false);
    let bw = (W - R - L) / n;
    for (i, v) in values.iter().enumerate() {
        let h = v / ymax * (H - B - T);
        let _ = writeln!(
            s,
            r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"/>"#,
            L + i as f64 * bw + 2.0,
            H - B - h,
            (bw - 4.0).max(1.0),
            h,
            COLORS[0]
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_svg() {
        let l = lines("t", "x", "y", &[("a".into(), vec![(0.0, 1.0), (2.0, 3.0)])]);
        assert!(
            l.starts_with("<svg") && l.trim_end().ends_with("</svg>") && l.contains("polyline")
        );
        let b = bars("t", "x", "y", &[1.0, 2.0, 0.5]);
        assert_eq!(b.matches("<rect").count(), 1 + 3);
    }
}
