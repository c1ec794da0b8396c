//! CSV, markdown and SVG output of the outage replay.

use plotters::prelude::*;
use std::fmt::Write as _;
use std::path::Path;

/// One finished step, ready to print.
#[derive(Debug, Clone)]
pub struct Row {
    pub target: String,
    pub multiplier: f64,
    pub offered_rps: f64,
    pub arrivals: u64,
    pub goodput_rps: f64,
    pub success: u64,
    pub failed: u64,
    pub retries: u64,
    pub overflow: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub active_mean: f64,
    pub active_max: i64,
    /// `code:count` pairs joined by spaces, per failed attempt.
    pub errors: String,
}

fn opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into())
}

pub const CSV_HEADER: &str = "target,multiplier,offered_rps,arrivals,goodput_rps,success,failed,retries,overflow,p50_ms,p99_ms,active_backends_mean,active_backends_max,errors";

pub fn csv_line(r: &Row) -> String {
    format!(
        "{},{},{:.1},{},{:.1},{},{},{},{},{},{},{:.1},{},{}",
        r.target,
        r.multiplier,
        r.offered_rps,
        r.arrivals,
        r.goodput_rps,
        r.success,
        r.failed,
        r.retries,
        r.overflow,
        opt(r.p50_ms),
        opt(r.p99_ms),
        r.active_mean,
        r.active_max,
        r.errors
    )
}

pub fn write_csv(path: &Path, rows: &[Row]) -> std::io::Result<()> {
    let mut s = String::from(CSV_HEADER);
    s.push('\n');
    for r in rows {
        s.push_str(&csv_line(r));
        s.push('\n');
    }
    std::fs::write(path, s)
}

/// Reads rows back from a file written by [`write_csv`].
pub fn read_csv(path: &Path) -> anyhow::Result<Vec<Row>> {
    use anyhow::Context;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut rows = Vec::new();
    for (n, line) in text.lines().enumerate().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != 14 {
            anyhow::bail!("{}:{}: expected 14 fields", path.display(), n + 1);
        }
        let num = |i: usize| -> anyhow::Result<f64> {
            f[i].parse::<f64>()
                .with_context(|| format!("{}:{}: field {}", path.display(), n + 1, i + 1))
        };
        let ms = |i: usize| f[i].parse::<f64>().ok();
        rows.push(Row {
            target: f[0].to_string(),
            multiplier: num(1)?,
            offered_rps: num(2)?,
            arrivals: num(3)? as u64,
            goodput_rps: num(4)?,
            success: num(5)? as u64,
            failed: num(6)? as u64,
            retries: num(7)? as u64,
            overflow: num(8)? as u64,
            p50_ms: ms(9),
            p99_ms: ms(10),
            active_mean: num(11)?,
            active_max: num(12)? as i64,
            errors: f[13].to_string(),
        });
    }
    Ok(rows)
}

pub fn markdown(rows: &[Row]) -> String {
    let mut s = String::from(
        "| target | load | offered rps | goodput rps | ok | failed | retried | p50 ms | p99 ms | active backends mean/max | errors (per attempt) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {}x | {:.1} | {:.1} | {} | {} | {} | {} | {} | {:.1} / {} | {} |",
            r.target,
            r.multiplier,
            r.offered_rps,
            r.goodput_rps,
            r.success,
            r.failed,
            r.retries,
            opt(r.p50_ms),
            opt(r.p99_ms),
            r.active_mean,
            r.active_max,
            if r.errors.is_empty() { "-" } else { &r.errors }
        );
    }
    s
}

/// Goodput against offered load, one line per target.
pub fn plot(path: &Path, rows: &[Row], saturation_rps: f64) -> anyhow::Result<()> {
    let mut targets: Vec<&str> = Vec::new();
    for r in rows {
        if !targets.contains(&r.target.as_str()) {
            targets.push(&r.target);
        }
    }
    let xmax = rows.iter().map(|r| r.offered_rps).fold(1.0, f64::max) * 1.05;
    let ymax = rows
        .iter()
        .map(|r| r.goodput_rps)
        .fold(saturation_rps, f64::max)
        * 1.15;
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Goodput vs offered load (saturation {saturation_rps:.0} req/s direct)"),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)?;
    chart
        .configure_mesh()
        .x_desc("offered load (requests/s)")
        .y_desc("goodput (requests/s completed within deadline)")
        .draw()?;
    let palette = [RED, BLUE, RGBColor(0, 140, 0), MAGENTA, CYAN, BLACK];
    for (i, t) in targets.iter().enumerate() {
        let color = palette[i % palette.len()];
        let pts: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r.target == *t)
            .map(|r| (r.offered_rps, r.goodput_rps))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(*t)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
