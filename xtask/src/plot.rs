//! The benchmark's charts, drawn with plotters' SVG backend (no fonts or native
//! libraries needed: text is left to the SVG viewer). Line charts with an optional
//! min-max band per series, and a bar chart.

use std::fmt;
use std::ops::Range;

use plotters::coord::Shift;
use plotters::prelude::*;

const SIZE: (u32, u32) = (720, 420);
const COLORS: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x8c, 0x56, 0x4b),
];

/// A drawing failure (plotters reports them as strings of its backend's errors).
#[derive(Debug)]
pub struct PlotError(String);

impl fmt::Display for PlotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "plot: {}", self.0)
    }
}

impl std::error::Error for PlotError {}

fn err<E: fmt::Debug>(e: E) -> PlotError {
    PlotError(format!("{e:?}"))
}

/// A point: the median `y` and the min-max range of the repeats behind it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    /// x.
    pub x: f64,
    /// Median.
    pub y: f64,
    /// Minimum of the repeats.
    pub lo: f64,
    /// Maximum of the repeats.
    pub hi: f64,
}

/// A named line.
#[derive(Clone, Debug)]
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// Points by increasing x.
    pub points: Vec<Point>,
}

/// Labels of a chart.
pub struct Labels<'a> {
    /// Caption.
    pub title: &'a str,
    /// x-axis description.
    pub x: &'a str,
    /// y-axis description.
    pub y: &'a str,
}

/// A tick label: no decimals for large values, up to two for small ones.
fn tick(v: f64) -> String {
    if v.abs() >= 10.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A line chart; `log_y` for downtimes, where stop-and-copy is orders of magnitude above
/// pre-copy. A series whose repeats differ gets a translucent min-max band.
pub fn lines(labels: &Labels, series: &[Series], log_y: bool) -> Result<String, PlotError> {
    let pts = || series.iter().flat_map(|s| s.points.iter());
    let xmax = pts().map(|p| p.x).fold(0.0, f64::max).max(1e-9) * 1.05;
    let ymax = pts().map(|p| p.hi.max(p.y)).fold(0.0, f64::max).max(1e-9);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        if log_y {
            // Log axes cannot show 0: the floor is a tenth of the smallest positive value.
            let ymin = pts()
                .flat_map(|p| [p.y, p.lo])
                .filter(|v| *v > 0.0)
                .fold(f64::MAX, f64::min)
                .min(ymax)
                / 10.0;
            let clamp = move |v: f64| v.max(ymin);
            // Two decades of headroom keep the legend (upper left) off the lines.
            draw_lines(
                &root,
                labels,
                series,
                0.0..xmax,
                (ymin..ymax * 100.0).log_scale(),
                clamp,
            )?;
        } else {
            draw_lines(&root, labels, series, 0.0..xmax, 0.0..ymax * 1.15, |v| v)?;
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}

fn draw_lines<Y>(
    root: &DrawingArea<SVGBackend, Shift>,
    labels: &Labels,
    series: &[Series],
    xr: Range<f64>,
    yr: Y,
    clamp: impl Fn(f64) -> f64,
) -> Result<(), PlotError>
where
    Y: plotters::coord::ranged1d::AsRangedCoord<Value = f64>,
    Y::CoordDescType: plotters::coord::ranged1d::ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(root)
        .caption(labels.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(xr, yr)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(labels.x)
        .y_desc(labels.y)
        .axis_desc_style(("sans-serif", 15))
        .label_style(("sans-serif", 13))
        .y_label_formatter(&|v| tick(*v))
        .x_label_formatter(&|v| tick(*v))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(err)?;
    for (i, s) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        if s.points.iter().any(|p| p.hi > p.lo) {
            // Band: along the maxima, back along the minima.
            let band: Vec<(f64, f64)> = s
                .points
                .iter()
                .map(|p| (p.x, clamp(p.hi)))
                .chain(s.points.iter().rev().map(|p| (p.x, clamp(p.lo))))
                .collect();
            chart
                .draw_series(std::iter::once(Polygon::new(band, c.mix(0.18).filled())))
                .map_err(err)?;
        }
        let line = s.points.iter().map(|p| (p.x, clamp(p.y)));
        chart
            .draw_series(LineSeries::new(line, c.stroke_width(2)))
            .map_err(err)?
            .label(s.name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        chart
            .draw_series(
                s.points
                    .iter()
                    .map(|p| Circle::new((p.x, clamp(p.y)), 3, c.filled())),
            )
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(err)?;
    Ok(())
}

/// A bar chart of values by 1-based index (rounds).
pub fn bars(labels: &Labels, values: &[f64]) -> Result<String, PlotError> {
    let n = values.len().max(1) as f64;
    let ymax = values.iter().copied().fold(0.0, f64::max).max(1e-9) * 1.1;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(labels.title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(0.5..n + 0.5, 0.0..ymax)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(labels.x)
            .y_desc(labels.y)
            .axis_desc_style(("sans-serif", 15))
            .label_style(("sans-serif", 13))
            .y_label_formatter(&|v| tick(*v))
            .x_labels(values.len().min(25))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .disable_x_mesh()
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(err)?;
        chart
            .draw_series(values.iter().enumerate().map(|(i, &v)| {
                let x = i as f64 + 1.0;
                Rectangle::new([(x - 0.4, 0.0), (x + 0.4, v)], COLORS[0].filled())
            }))
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// Checks that `svg` is well-formed XML with an `<svg>` root (the benchmark's self-check).
pub fn check_svg(svg: &str) -> Result<(), String> {
    let doc = roxmltree::Document::parse(svg).map_err(|e| e.to_string())?;
    if doc.root_element().tag_name().name() == "svg" {
        Ok(())
    } else {
        Err("root element is not <svg>".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(doc: &roxmltree::Document) -> Vec<String> {
        doc.descendants()
            .filter(|n| n.has_tag_name("text"))
            .map(|n| n.text().unwrap_or_default().trim().to_string())
            .collect()
    }

    fn pt(x: f64, y: f64, lo: f64, hi: f64) -> Point {
        Point { x, y, lo, hi }
    }

    #[test]
    fn line_chart_has_each_series_and_bands_only_with_spread() {
        let series = vec![
            Series {
                name: "pml".into(),
                points: vec![pt(0.0, 2.0, 1.0, 3.0), pt(1.0, 5.0, 4.0, 9.0)],
            },
            Series {
                name: "stop-and-copy".into(),
                points: vec![pt(0.0, 1e4, 1e4, 1e4), pt(1.0, 2e4, 2e4, 2e4)],
            },
        ];
        let labels = Labels {
            title: "Downtime <vs> rate",
            x: "x",
            y: "downtime (ms)",
        };
        for log in [false, true] {
            let svg = lines(&labels, &series, log).unwrap();
            check_svg(&svg).unwrap();
            let doc = roxmltree::Document::parse(&svg).unwrap();
            let t = texts(&doc);
            for want in [
                "pml",
                "stop-and-copy",
                "Downtime <vs> rate",
                "downtime (ms)",
            ] {
                assert!(t.iter().any(|s| s == want), "{want} missing in {t:?}");
            }
            // One band: only "pml" has repeats that differ.
            let polygons = doc
                .descendants()
                .filter(|n| n.has_tag_name("polygon"))
                .count();
            assert_eq!(polygons, 1, "log={log}");
            // Two lines plus two legend marks.
            let polylines = doc
                .descendants()
                .filter(|n| n.has_tag_name("polyline"))
                .count();
            assert!(polylines >= 2, "log={log}: {polylines}");
            let circles = doc
                .descendants()
                .filter(|n| n.has_tag_name("circle"))
                .count();
            assert_eq!(circles, 4);
        }
    }

    #[test]
    fn bar_chart_has_a_bar_per_value() {
        let svg = bars(
            &Labels {
                title: "rounds",
                x: "round",
                y: "pages sent",
            },
            &[4096.0, 600.0, 30.0],
        )
        .unwrap();
        check_svg(&svg).unwrap();
        let doc = roxmltree::Document::parse(&svg).unwrap();
        let bars = doc
            .descendants()
            .filter(|n| n.has_tag_name("rect") && n.attribute("fill") == Some("#1F77B4"))
            .count();
        assert_eq!(bars, 3);
    }

    #[test]
    fn empty_inputs_still_give_svg() {
        let l = Labels {
            title: "t",
            x: "x",
            y: "y",
        };
        for log in [false, true] {
            check_svg(&lines(&l, &[], log).unwrap()).unwrap();
        }
        check_svg(&bars(&l, &[]).unwrap()).unwrap();
    }

    #[test]
    fn tick_labels() {
        assert_eq!(tick(20000.0), "20000");
        assert_eq!(tick(3.0), "3");
        assert_eq!(tick(2.5), "2.5");
        assert_eq!(tick(0.25), "0.25");
    }

    #[test]
    fn rejects_non_svg() {
        assert!(check_svg("<html/>").is_err());
        assert!(check_svg("<svg>").is_err());
    }
}
