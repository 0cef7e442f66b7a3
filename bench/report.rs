//! Figures, their baselines, and the table and JSON they are reported as.

use std::time::Duration;

use serde::Serialize;

/// Repeated measurements of one thing.
#[derive(Debug, Clone, Default)]
pub struct Samples(pub Vec<Duration>);

impl Samples {
    /// The sample at quantile `q` (0.0 to 1.0).
    pub fn quantile(&self, q: f64) -> Duration {
        let mut sorted = self.0.clone();
        sorted.sort_unstable();
        if sorted.is_empty() {
            return Duration::ZERO;
        }
        let at = ((sorted.len() - 1) as f64 * q).round() as usize;
        sorted[at]
    }

    /// The median, in microseconds.
    pub fn median_us(&self) -> f64 {
        self.quantile(0.5).as_secs_f64() * 1e6
    }

    /// The 99th percentile, in microseconds.
    pub fn p99_us(&self) -> f64 {
        self.quantile(0.99).as_secs_f64() * 1e6
    }
}

/// Whether a bigger ratio is better (throughput) or worse (latency, memory).
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Better {
    /// A ratio at most the target meets it.
    Lower,
    /// A ratio at least the target meets it.
    Higher,
}

/// One line of the report: a figure of the product beside its baseline.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub section: &'static str,
    pub name: String,
    pub unit: &'static str,
    pub value: f64,
    pub value_p99: Option<f64>,
    pub baseline_name: String,
    pub baseline: f64,
    pub baseline_p99: Option<f64>,
    pub ratio: f64,
    pub better: Better,
    pub target: Option<f64>,
    pub met: Option<bool>,
}

impl Row {
    /// A row comparing `value` with `baseline` against an optional target ratio.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        section: &'static str,
        name: impl Into<String>,
        unit: &'static str,
        (value, value_p99): (f64, Option<f64>),
        baseline_name: impl Into<String>,
        (baseline, baseline_p99): (f64, Option<f64>),
        better: Better,
        target: Option<f64>,
    ) -> Row {
        let ratio = if baseline > 0.0 { value / baseline } else { f64::NAN };
        let met = target.map(|t| match better {
            Better::Lower => ratio <= t,
            Better::Higher => ratio >= t,
        });
        Row {
            section,
            name: name.into(),
            unit,
            value,
            value_p99,
            baseline_name: baseline_name.into(),
            baseline,
            baseline_p99,
            ratio,
            better,
            target,
            met,
        }
    }

    /// A latency row from two sets of samples (median and p99 in µs).
    pub fn latency(
        section: &'static str,
        name: impl Into<String>,
        product: &Samples,
        baseline_name: impl Into<String>,
        baseline: &Samples,
        target: Option<f64>,
    ) -> Row {
        Row::new(
            section,
            name,
            "us",
            (product.median_us(), Some(product.p99_us())),
            baseline_name,
            (baseline.median_us(), Some(baseline.p99_us())),
            Better::Lower,
            target,
        )
    }
}

fn fmt_value(v: f64, p99: Option<f64>) -> String {
    match p99 {
        Some(p) => format!("{v:.1} (p99 {p:.1})"),
        None => format!("{v:.2}"),
    }
}

/// The report as a fixed-width table; with `judged` false (quick mode,
/// whose figures mean nothing) targets are shown without saying whether
/// they were met.
pub fn table(rows: &[Row], judged: bool) -> String {
    let mut out = String::new();
    let header =
        ["section", "figure", "unit", "value", "baseline", "baseline value", "ratio", "target"];
    let mut lines: Vec<[String; 8]> = vec![header.map(str::to_owned)];
    for r in rows {
        let target = match (r.target, r.met, r.better) {
            (Some(t), Some(met), b) => {
                let op = if matches!(b, Better::Lower) { "<=" } else { ">=" };
                let verdict = match (judged, met) {
                    (false, _) => "(not judged)",
                    (true, true) => "met",
                    (true, false) => "MISSED",
                };
                format!("{op} {t:.2} {verdict}")
            }
            _ => "-".to_owned(),
        };
        lines.push([
            r.section.to_owned(),
            r.name.clone(),
            r.unit.to_owned(),
            fmt_value(r.value, r.value_p99),
            r.baseline_name.clone(),
            fmt_value(r.baseline, r.baseline_p99),
            if r.ratio < 0.1 { format!("{:.3}", r.ratio) } else { format!("{:.2}", r.ratio) },
            target,
        ]);
    }
    let widths: Vec<usize> =
        (0..8).map(|i| lines.iter().map(|l| l[i].chars().count()).max().unwrap_or(0)).collect();
    for (n, line) in lines.iter().enumerate() {
        let cells: Vec<String> =
            line.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}", w = *w)).collect();
        out.push_str(&format!("| {} |\n", cells.join(" | ")));
        if n == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            out.push_str(&format!("| {} |\n", rule.join(" | ")));
        }
    }
    out
}
