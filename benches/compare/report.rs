//! Results: one row per metric with each server's figure (etcd 3.5, etcd 3.4, ours) and our
//! ratio to each etcd; sanity checks; the table on stdout and the JSON file.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::servers::{Figures, Lineup, Which};

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
    /// ours / etcd 3.5 at least this.
    RatioAtLeast { value: f64 },
    /// ours / etcd 3.5 at most this.
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
            Target::RatioAtLeast { value } => row.ratio35? >= *value,
            Target::RatioAtMost { value } => row.ratio35? <= *value,
            Target::OursAtMost { value } => row.ours? <= *value,
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: String,
    pub metric: String,
    pub unit: String,
    pub etcd35: Option<f64>,
    pub etcd34: Option<f64>,
    pub ours: Option<f64>,
    /// ours / etcd 3.5: the ratio targets are about.
    pub ratio35: Option<f64>,
    /// ours / etcd 3.4.
    pub ratio34: Option<f64>,
    pub better: Better,
    pub target: Option<Target>,
    pub target_met: Option<bool>,
}

impl Row {
    pub fn figure(&self, which: Which) -> Option<f64> {
        match which {
            Which::Etcd35 => self.etcd35,
            Which::Etcd34 => self.etcd34,
            Which::Ours => self.ours,
        }
    }

    /// ours / that etcd.
    pub fn ratio(&self, etcd: Which) -> Option<f64> {
        match etcd {
            Which::Etcd35 => self.ratio35,
            Which::Etcd34 => self.ratio34,
            Which::Ours => None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub scenario: String,
    pub server: String,
    pub what: String,
    pub ok: bool,
}

/// A server the run measured.
#[derive(Debug, Clone, Serialize)]
pub struct ServerInfo {
    pub which: Which,
    pub name: &'static str,
    pub version: String,
    pub binary: PathBuf,
}

impl ServerInfo {
    pub fn of(lineup: &Lineup) -> Vec<ServerInfo> {
        lineup
            .servers()
            .map(|which| ServerInfo {
                which,
                name: which.name(),
                version: lineup.version(which).unwrap_or_default().to_owned(),
                binary: lineup.binary(which).unwrap_or_else(|| "-".as_ref()).to_owned(),
            })
            .collect()
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub quick: bool,
    pub machine: String,
    /// The servers measured, anchor first: a row's figure for any other is null.
    pub servers: Vec<ServerInfo>,
    pub sizes: serde_json::Value,
    pub rows: Vec<Row>,
    pub checks: Vec<Check>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn row(
        &mut self,
        scenario: &str,
        metric: &str,
        unit: &str,
        better: Better,
        figures: Figures,
        target: Option<Target>,
    ) {
        let [etcd35, etcd34, ours] = Which::ALL.map(|which| figures.get(which).copied());
        let ratio = |etcd: Option<f64>| match (etcd, ours) {
            (Some(e), Some(o)) if e != 0.0 => Some(o / e),
            _ => None,
        };
        let mut row = Row {
            scenario: scenario.to_owned(),
            metric: metric.to_owned(),
            unit: unit.to_owned(),
            etcd35,
            etcd34,
            ours,
            ratio35: ratio(etcd35),
            ratio34: ratio(etcd34),
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

    /// The table: a figure column per server measured, then ours/etcd per etcd measured.
    pub fn table(&self) -> String {
        let etcds: Vec<&ServerInfo> = self.servers.iter().filter(|s| s.which.is_etcd()).collect();
        let numeric = 3..3 + self.servers.len() + etcds.len();

        let mut header = vec!["scenario".to_owned(), "metric".into(), "unit".into()];
        header.extend(
            self.servers.iter().map(|s| if s.which.is_etcd() { format!("etcd {}", s.version) } else { "ours".into() }),
        );
        header.extend(etcds.iter().map(|s| format!("ours/{}", s.version)));
        header.extend(["better".into(), "target".into()]);
        let mut lines = vec![header];
        for row in &self.rows {
            let target = match (&row.target, row.target_met) {
                (Some(t), Some(true)) => format!("{} met", t.describe()),
                (Some(t), Some(false)) => format!("{} MISSED", t.describe()),
                (Some(t), None) => t.describe(),
                (None, _) => String::new(),
            };
            let mut line = vec![row.scenario.clone(), row.metric.clone(), row.unit.clone()];
            line.extend(self.servers.iter().map(|s| row.figure(s.which).map_or_else(|| "-".into(), fmt_num)));
            line.extend(etcds.iter().map(|s| row.ratio(s.which).map_or_else(|| "-".into(), |r| format!("{r:.3}"))));
            line.push(
                match row.better {
                    Better::Higher => "higher",
                    Better::Lower => "lower",
                }
                .into(),
            );
            line.push(target);
            lines.push(line);
        }
        let columns = lines[0].len();
        let widths: Vec<usize> =
            (0..columns).map(|i| lines.iter().map(|l| l[i].chars().count()).max().unwrap_or(0)).collect();
        let mut out = String::new();
        for (n, line) in lines.iter().enumerate() {
            let cells: Vec<String> = line
                .iter()
                .enumerate()
                .map(|(i, cell)| {
                    if numeric.contains(&i) {
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
                    .map(
                        |(i, w)| if numeric.contains(&i) { format!("{}:", "-".repeat(*w - 1)) } else { "-".repeat(*w) },
                    )
                    .collect();
                out.push_str(&format!("| {} |\n", rule.join(" | ")));
            }
        }
        out
    }

    /// One row as a progress line: every server's figure.
    pub fn describe_row(&self, row: &Row) -> String {
        let value = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.3}"));
        let mut line = format!("{} | {}", row.scenario, row.metric);
        for server in &self.servers {
            line.push_str(&format!(" | {} {}", server.name, value(row.figure(server.which))));
        }
        line.push_str(&format!(" {}", row.unit));
        line
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
