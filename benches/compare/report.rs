//! Results: one row per metric with etcd's figure, ours and the ratio; sanity checks; the
//! table on stdout and the JSON file.

use std::time::Duration;

use serde::Serialize;

/// Which way a metric is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    Higher,
    Lower,
}

/// What the issue asks of a row.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// ours / etcd at least this.
    RatioAtLeast { value: f64 },
    /// ours / etcd at most this.
    RatioAtMost { value: f64 },
    /// Our own figure at most this (absolute, in the row's unit).
    OursAtMost { value: f64 },
}

impl Target {
    fn describe(&self) -> String {
        match self {
            Target::RatioAtLeast { value } => format!("ratio >= {}", trim(*value)),
            Target::RatioAtMost { value } => format!("ratio <= {}", trim(*value)),
            Target::OursAtMost { value } => format!("ours <= {}", trim(*value)),
        }
    }

    fn met(&self, row: &Row) -> Option<bool> {
        Some(match self {
            Target::RatioAtLeast { value } => row.ratio? >= *value,
            Target::RatioAtMost { value } => row.ratio? <= *value,
            Target::OursAtMost { value } => row.ours? <= *value,
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: String,
    pub metric: String,
    pub unit: String,
    pub etcd: Option<f64>,
    pub ours: Option<f64>,
    /// ours / etcd.
    pub ratio: Option<f64>,
    pub better: Better,
    pub target: Option<Target>,
    pub target_met: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub scenario: String,
    pub server: String,
    pub what: String,
    pub ok: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub quick: bool,
    pub machine: String,
    pub sizes: serde_json::Value,
    pub rows: Vec<Row>,
    pub checks: Vec<Check>,
    pub notes: Vec<String>,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    pub fn row(
        &mut self,
        scenario: &str,
        metric: &str,
        unit: &str,
        better: Better,
        etcd: Option<f64>,
        ours: Option<f64>,
        target: Option<Target>,
    ) {
        let ratio = match (etcd, ours) {
            (Some(e), Some(o)) if e != 0.0 => Some(o / e),
            _ => None,
        };
        let mut row = Row {
            scenario: scenario.to_owned(),
            metric: metric.to_owned(),
            unit: unit.to_owned(),
            etcd,
            ours,
            ratio,
            better,
            target,
            target_met: None,
        };
        row.target_met = target.and_then(|t| t.met(&row));
        self.rows.push(row);
    }

    /// Records a sanity check; a failed one fails the run (after the table is printed).
    pub fn check(&mut self, scenario: &str, server: &str, what: impl Into<String>, ok: bool) {
        let what = what.into();
        if !ok {
            eprintln!("CHECK FAILED [{scenario}/{server}]: {what}");
        }
        self.checks.push(Check { scenario: scenario.to_owned(), server: server.to_owned(), what, ok });
    }

    pub fn failed_checks(&self) -> Vec<&Check> {
        self.checks.iter().filter(|c| !c.ok).collect()
    }

    pub fn table(&self) -> String {
        let header = ["scenario", "metric", "unit", "etcd", "ours", "ours/etcd", "better", "target"];
        let mut lines: Vec<[String; 8]> = vec![header.map(str::to_owned)];
        for row in &self.rows {
            let target = match (&row.target, row.target_met) {
                (Some(t), Some(true)) => format!("{} met", t.describe()),
                (Some(t), Some(false)) => format!("{} MISSED", t.describe()),
                (Some(t), None) => t.describe(),
                (None, _) => String::new(),
            };
            lines.push([
                row.scenario.clone(),
                row.metric.clone(),
                row.unit.clone(),
                row.etcd.map(fmt_num).unwrap_or_else(|| "-".into()),
                row.ours.map(fmt_num).unwrap_or_else(|| "-".into()),
                row.ratio.map(|r| format!("{r:.3}")).unwrap_or_else(|| "-".into()),
                match row.better {
                    Better::Higher => "higher".into(),
                    Better::Lower => "lower".into(),
                },
                target,
            ]);
        }
        let widths: Vec<usize> =
            (0..8).map(|i| lines.iter().map(|l| l[i].chars().count()).max().unwrap_or(0)).collect();
        let mut out = String::new();
        for (n, line) in lines.iter().enumerate() {
            let cells: Vec<String> = line
                .iter()
                .enumerate()
                .map(|(i, cell)| {
                    if (3..6).contains(&i) {
                        format!("{cell:>w$}", w = widths[i])
                    } else {
                        format!("{cell:<w$}", w = widths[i])
                    }
                })
                .collect();
            out.push_str(&format!("| {} |\n", cells.join(" | ")));
            if n == 0 {
                let rule: Vec<String> = widths
                    .iter()
                    .enumerate()
                    .map(|(i, w)| if (3..6).contains(&i) { format!("{}:", "-".repeat(*w - 1)) } else { "-".repeat(*w) })
                    .collect();
                out.push_str(&format!("| {} |\n", rule.join(" | ")));
            }
        }
        out
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

/// Percentiles of latencies, by sorting (nearest rank).
#[derive(Debug, Clone, Copy, Default)]
pub struct Percentiles {
    pub count: usize,
    pub p50: Duration,
    pub p99: Duration,
}

impl Percentiles {
    pub fn of_micros(mut samples: Vec<u32>) -> Percentiles {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            Duration::from_micros(u64::from(samples[rank - 1]))
        };
        Percentiles { count: samples.len(), p50: at(0.50), p99: at(0.99) }
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
