//! Scraping a metrics listener in either format, reading its families, and judging it with
//! Prometheus' own tools.
//!
//! `promtool check metrics` (2.42, Debian bookworm's) lints the text format 0.0.4 only: fed an
//! OpenMetrics answer it refuses the `unknown` type and reads every counter apart from its
//! `# HELP`, whoever wrote it. So an OpenMetrics answer is judged by Prometheus' OpenMetrics
//! parser (`promtool tsdb create-blocks-from openmetrics`, the scrape parser) and must describe
//! the same families as the text answer that `check metrics` passed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What Prometheus sends when it prefers OpenMetrics.
pub const OPENMETRICS: &str = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// Where `.ci/run` unpacks promtool (Debian's `prometheus` package, server not installed).
const PROMTOOL_DIR: &str = "target/promtool/usr/bin";

/// `GET /metrics` with `accept`; returns the answer's content type and body.
pub async fn scrape(port: u16, accept: &str) -> anyhow::Result<(String, String)> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.context("connect")?;
    let request = format!("GET /metrics HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nAccept: {accept}\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let response = String::from_utf8(response).context("UTF-8 answer")?;
    let (head, body) = response.split_once("\r\n\r\n").context("malformed HTTP answer")?;
    anyhow::ensure!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{head}");
    let content_type = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(name, _)| name.eq_ignore_ascii_case("content-type")))
        .map(|(_, value)| value.trim().to_owned())
        .context("no content type")?;
    Ok((content_type, body.to_owned()))
}

/// The families of an exposition, by name, with their `# TYPE`.
pub fn families(body: &str) -> BTreeMap<String, String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_owned(), kind.to_owned()))
        .collect()
}

/// The label names of a family's samples (of its `_bucket` and other suffixed samples too,
/// `le` and `quantile` aside).
pub fn label_names(body: &str, family: &str) -> Vec<String> {
    let mut names: Vec<String> = body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.strip_prefix(family).is_some_and(|rest| rest.starts_with(['{', ' ', '_'])))
        .filter_map(|l| {
            l.split_once('{').and_then(|(_, rest)| rest.split_once('}')).map(|(labels, _)| labels.to_owned())
        })
        .flat_map(|labels| {
            labels
                .split("\",")
                .filter_map(|pair| pair.split_once('='))
                .map(|(k, _)| k.trim().to_owned())
                .collect::<Vec<_>>()
        })
        .filter(|name| name != "le" && name != "quantile")
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The first sample whose name and labels start with `series`.
pub fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find(|l| l.starts_with(series))?.rsplit(' ').next()?.parse().ok()
}

/// promtool: `$PROMTOOL`, else where `.ci/run` unpacks it.
///
/// # Panics
/// If it is not there: a missing tool fails the test rather than skipping it.
pub fn promtool() -> PathBuf {
    if let Some(path) = std::env::var_os("PROMTOOL").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "$PROMTOOL is {}, which is not a file", path.display());
        return path;
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(PROMTOOL_DIR).join("promtool");
    assert!(
        path.is_file(),
        "{} missing: run .ci/run, or `apt-get download prometheus && dpkg-deb -x prometheus_*.deb target/promtool`, \
         or set PROMTOOL",
        path.display()
    );
    path
}

/// `promtool check metrics` on a text answer: nothing to say, and success.
pub fn assert_promtool_passes(body: &str, what: &str) {
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    {
        use std::io::Write;
        child.stdin.take().expect("stdin").write_all(body.as_bytes()).expect("feed promtool");
    }
    let output = child.wait_with_output().expect("promtool output");
    let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success() && said.trim().is_empty(), "promtool check metrics on {what}:\n{said}");
}

/// Prometheus' OpenMetrics parser accepts the answer. The backfill it drives wants a
/// timestamp on every sample: one is appended, which the format allows.
pub fn assert_openmetrics_parses(body: &str, what: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let stamped: String = body
        .lines()
        .map(|l| if l.starts_with('#') || l.is_empty() { format!("{l}\n") } else { format!("{l} 1700000000\n") })
        .collect();
    let input = dir.path().join("scrape.om");
    std::fs::write(&input, stamped).expect("write scrape");
    let output = Command::new(promtool())
        .args(["tsdb", "create-blocks-from", "openmetrics", "--quiet"])
        .arg(&input)
        .arg(dir.path().join("blocks"))
        .output()
        .expect("run promtool");
    assert!(
        output.status.success(),
        "Prometheus' OpenMetrics parser refused {what}:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// An OpenMetrics family as the text format names and types it.
fn as_text_family((name, kind): (&String, &String)) -> (String, String) {
    match kind.as_str() {
        "counter" => (format!("{name}_total"), kind.clone()),
        "unknown" => (name.clone(), "untyped".into()),
        "info" => (format!("{name}_info"), "gauge".into()),
        _ => (name.clone(), kind.clone()),
    }
}

/// Scrapes `port` in both formats and judges each: text linted clean by promtool, OpenMetrics
/// parsed by Prometheus and holding the same families. Returns the text answer.
pub async fn assert_both_formats_pass(port: u16, what: &str) -> String {
    let (text_type, text) = scrape(port, "*/*").await.expect("scrape as text");
    assert_eq!(text_type, "text/plain; version=0.0.4; charset=utf-8", "{what}: the default answer");
    assert_promtool_passes(&text, &format!("{what} (text 0.0.4)"));
    let (om_type, openmetrics) = scrape(port, OPENMETRICS).await.expect("scrape as OpenMetrics");
    assert!(om_type.starts_with("application/openmetrics-text; version=1.0.0"), "{what}: {om_type}");
    assert_openmetrics_parses(&openmetrics, &format!("{what} (OpenMetrics)"));
    let from_openmetrics: BTreeMap<String, String> = families(&openmetrics).iter().map(as_text_family).collect();
    assert_eq!(from_openmetrics, families(&text), "{what}: both formats describe the same families");
    text
}
