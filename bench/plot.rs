//! The figure: round-trip latency distribution and throughput by workers.

use std::path::Path;

use plotters::prelude::*;

use crate::report::Samples;

/// Points of the cumulative distribution of `samples`, in µs.
fn cdf(samples: &Samples) -> Vec<(f64, f64)> {
    let mut us: Vec<f64> = samples.0.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    us.sort_by(f64::total_cmp);
    let n = us.len().max(1) as f64;
    us.iter().enumerate().map(|(i, v)| (*v, (i + 1) as f64 / n)).collect()
}

/// Writes the SVG: latency CDFs on the left, throughput on the right.
pub fn write(
    path: &Path,
    product: &Samples,
    baseline: &Samples,
    throughput: &[(f64, f64)],
    in_process: f64,
) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1100, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(550);

    let (p, b) = (cdf(product), cdf(baseline));
    let xmax = product.quantile(0.99).max(baseline.quantile(0.99)).as_secs_f64() * 1e6 * 1.2;
    let mut chart = ChartBuilder::on(&left)
        .caption("64 B call round trip, same core (CDF)", ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..xmax.max(1.0), 0f64..1f64)?;
    chart.configure_mesh().x_desc("round trip (µs)").y_desc("fraction of calls").draw()?;
    chart
        .draw_series(LineSeries::new(p, RED.stroke_width(2)))?
        .label("wasm-task call")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart
        .draw_series(LineSeries::new(b, BLUE.stroke_width(2)))?
        .label("ping-pong baseline")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart.configure_series_labels().background_style(WHITE).border_style(BLACK).draw()?;

    let ymax = throughput.iter().map(|(_, v)| *v).fold(2.0 * in_process, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&right)
        .caption("~250 µs calls: throughput by workers", ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.5f64..2.5f64, 0f64..ymax.max(1.0))?;
    chart.configure_mesh().x_desc("workers").y_desc("calls/s").x_labels(3).draw()?;
    chart
        .draw_series(LineSeries::new(throughput.iter().copied(), RED.stroke_width(2)))?
        .label("wasm-task pool (held checkouts)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart.draw_series(throughput.iter().map(|&(x, y)| Circle::new((x, y), 4, RED.filled())))?;
    let ideal = [(1.0, in_process), (2.0, 2.0 * in_process)];
    chart
        .draw_series(LineSeries::new(ideal, BLUE.stroke_width(1)))?
        .label("in-process 1 thread x workers")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart.configure_series_labels().background_style(WHITE).border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}
