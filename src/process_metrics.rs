//! The standard `process_*` metrics (Prometheus' process collector names), read from
//! `/proc/self` at scrape time.
//!
//! A small reader rather than a crate: the maintained process collectors are written for
//! the `prometheus` crate's global-registry model, not prometheus-client's collectors, and
//! six numbers from three files do not justify a dependency (nor `unsafe` for `sysconf`).

use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Linux reports CPU times in `/proc/<pid>/stat` in USER_HZ, fixed at 100 on every
/// architecture's user-space ABI (whatever the kernel's internal HZ).
const USER_HZ: f64 = 100.0;

/// Registered (unprefixed) on every metrics registry of the process.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessCollector;

#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub open_fds: u64,
    pub max_fds: u64,
    pub start_time_seconds: f64,
}

impl ProcessStats {
    /// What `/proc` says about this process now; a file that cannot be read leaves its
    /// numbers at zero rather than failing the scrape.
    pub fn read() -> Self {
        let mut stats = Self::default();
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // The command name may hold spaces and parentheses: fields are counted after the last ')'.
        let fields: Vec<&str> =
            stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        stats.cpu_seconds = (field(14) + field(15)) as f64 / USER_HZ;
        stats.virtual_bytes = field(23);
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse::<u64>().ok())));
        stats.start_time_seconds = match boot {
            Some(boot) => boot as f64 + field(22) as f64 / USER_HZ,
            None => SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0),
        };
        // The resident set from `status` is in kB, which spares knowing the page size.
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        stats.resident_bytes = status_kb(&status, "VmRSS:") * 1024;
        stats.open_fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64).unwrap_or(0);
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        stats.max_fds = limits
            .lines()
            .find_map(|l| l.strip_prefix("Max open files"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|soft| soft.parse().ok())
            .unwrap_or(0);
        stats
    }
}

fn status_kb(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
        .unwrap_or(0)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = ProcessStats::read();
        let cpu = ConstCounter::new(stats.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            MetricType::Counter,
        )?)?;
        let gauges: [(&str, &str, f64); 5] = [
            ("process_resident_memory_bytes", "Resident memory size in bytes", stats.resident_bytes as f64),
            ("process_virtual_memory_bytes", "Virtual memory size in bytes", stats.virtual_bytes as f64),
            ("process_open_fds", "Number of open file descriptors", stats.open_fds as f64),
            ("process_max_fds", "Maximum number of open file descriptors", stats.max_fds as f64),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                stats.start_time_seconds,
            ),
        ];
        for (name, help, value) in gauges {
            ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_memory_descriptors_and_a_start_in_the_past() {
        let stats = ProcessStats::read();
        assert!(stats.resident_bytes > 0);
        assert!(stats.virtual_bytes >= stats.resident_bytes);
        assert!(stats.open_fds > 0 && stats.open_fds <= stats.max_fds);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(stats.start_time_seconds > 0.0 && stats.start_time_seconds <= now + 1.0);
    }
}
