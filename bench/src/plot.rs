//! SVG line plots of the benchmark curves, with plotters.

use std::path::Path;

use crate::error::{BenchError, Result};
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;

/// One named curve: `(x, y)` points (x ≥ 1 on a logarithmic x axis).
pub type Series = (String, Vec<(f64, f64)>);

/// The axes and title of a plot.
pub struct Axes<'a> {
    /// Title above the plot.
    pub title: &'a str,
    /// Label of the x axis.
    pub x: &'a str,
    /// Label of the y axis.
    pub y: &'a str,
    /// Whether the x axis is logarithmic (for doubling sweeps) or linear.
    pub log_x: bool,
}

/// Draws `series` as lines on a linear-y chart (log or linear x) and writes it to `path`.
pub fn lines(path: &Path, axes: &Axes<'_>, series: &[Series]) -> Result<()> {
    let points = series.iter().flat_map(|s| s.1.iter());
    let (x_max, y_max) = points.fold((1.0f64, 0.0f64), |(x, y), p| (x.max(p.0), y.max(p.1)));
    let y = 0.0..(y_max * 1.1).max(1e-9);
    let root = SVGBackend::new(path, (720, 440)).into_drawing_area();
    if axes.log_x {
        draw(
            &root,
            path,
            axes,
            series,
            (1.0..x_max * 1.05).log_scale(),
            y,
        )
    } else {
        draw(&root, path, axes, series, 0.0..x_max * 1.05, y)
    }
}

fn draw<X>(
    root: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    path: &Path,
    axes: &Axes<'_>,
    series: &[Series],
    x: X,
    y: std::ops::Range<f64>,
) -> Result<()>
where
    X: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
{
    let err = |e: &dyn std::fmt::Display| BenchError::Plot {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(root)
        .caption(axes.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x, y)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(axes.x)
        .y_desc(axes.y)
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
