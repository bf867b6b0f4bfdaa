//! PNG charts next to `docs/BENCHMARKS.md`, drawn with plotters' bitmap
//! backend. Text goes through ab_glyph with a TrueType font read at run time,
//! so the build needs no fontconfig or freetype.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::{
    prelude::*,
    style::{
        register_font,
        text_anchor::{HPos, Pos, VPos},
        FontStyle,
    },
};

/// Fonts tried in order (Debian: fonts-dejavu-core, fonts-liberation).
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

/// Registers a sans-serif font for the charts; `Err` says why there is none.
pub fn init_font() -> Result<String> {
    for path in FONT_PATHS {
        if let Ok(bytes) = std::fs::read(path) {
            // plotters keeps registered fonts for the process's lifetime.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| anyhow!("{path} is not a usable TrueType font"))?;
            return Ok(path.to_string());
        }
    }
    Err(anyhow!(
        "no TrueType font found (tried {}); install fonts-dejavu-core",
        FONT_PATHS.join(", ")
    ))
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing a chart: {e:?}")
}

/// A value as printed on a chart: two decimals below 10, none above.
fn figure(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.0}")
    }
}

/// One horizontal bar.
pub struct Bar {
    pub label: String,
    pub value: f64,
    pub color: RGBColor,
}

pub const XDPLB: RGBColor = RGBColor(31, 119, 180);
pub const XDPLB_TC: RGBColor = RGBColor(255, 127, 14);
pub const BASELINE: RGBColor = RGBColor(127, 127, 127);

/// Horizontal bars, one per row, top to bottom, with optional vertical
/// reference lines (value, label).
pub fn bars(
    path: &Path,
    title: &str,
    x_label: &str,
    bars: &[Bar],
    refs: &[(f64, &str)],
) -> Result<()> {
    let height = 120 + 28 * bars.len() as u32;
    let root = BitMapBackend::new(path, (1000, height)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let max = bars
        .iter()
        .map(|b| b.value)
        .chain(refs.iter().map(|r| r.0))
        .fold(0.0, f64::max)
        * 1.15;
    let n = bars.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(260)
        .build_cartesian_2d(0.0..max.max(1.0), (0..n).into_segmented())
        .map_err(err)?;
    let labels: Vec<String> = bars.iter().map(|b| b.label.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n)
        .y_label_formatter(&|v| match v {
            // The segmented axis has one spare segment at the top: no label.
            SegmentValue::CenterOf(i) if *i < n => labels[n - 1 - *i].clone(),
            _ => String::new(),
        })
        .x_desc(x_label)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            let row = n - 1 - i;
            let mut r = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(row)),
                    (b.value, SegmentValue::Exact(row + 1)),
                ],
                b.color.filled(),
            );
            r.set_margin(4, 4, 0, 0);
            r
        }))
        .map_err(err)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            let row = n - 1 - i;
            Text::new(
                figure(b.value),
                (b.value + max * 0.005, SegmentValue::CenterOf(row)),
                TextStyle::from(("sans-serif", 13).into_font())
                    .pos(Pos::new(HPos::Left, VPos::Center)),
            )
        }))
        .map_err(err)?;
    for (value, label) in refs {
        let style = BLACK.stroke_width(1);
        chart
            .draw_series(LineSeries::new(
                [
                    (*value, SegmentValue::Exact(0)),
                    (*value, SegmentValue::Exact(n)),
                ],
                style,
            ))
            .map_err(err)?
            .label(format!("{label}: {}", figure(*value)))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
    }
    if !refs.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// One line of a scaling chart: (x, y) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub color: RGBColor,
}

/// Lines over a logarithmic x axis, in side-by-side panels.
pub fn log_lines(
    path: &Path,
    title: &str,
    panels: &[(&str, &str, Vec<Series>)],
    y_label: &str,
) -> Result<()> {
    let root = BitMapBackend::new(path, (500 * panels.len() as u32, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(title, ("sans-serif", 22)).map_err(err)?;
    let areas = root.split_evenly((1, panels.len()));
    for (area, (caption, x_label, series)) in areas.iter().zip(panels) {
        let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
        let (xmin, xmax) = xs.fold((f64::MAX, 0.0f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
        let ymax = series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .fold(0.0, f64::max)
            * 1.6;
        let mut chart = ChartBuilder::on(area)
            .caption(*caption, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(
                ((xmin / 2.0).max(1.0)..xmax * 2.0).log_scale(),
                0.0..ymax.max(1.0),
            )
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(*x_label)
            .y_desc(y_label)
            .x_label_formatter(&|v| {
                if *v >= 1e6 {
                    format!("{:.0}M", v / 1e6)
                } else if *v >= 1e3 {
                    format!("{:.0}k", v / 1e3)
                } else {
                    format!("{v:.0}")
                }
            })
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(err)?;
        for s in series {
            let color = s.color;
            chart
                .draw_series(LineSeries::new(s.points.clone(), color.stroke_width(2)))
                .map_err(err)?
                .label(s.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(s.points.iter().map(|p| Circle::new(*p, 4, color.filled())))
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}
