//! etcd 3.5's command line, parsed as etcd parses it (Go's `flag` package): every flag etcd
//! 3.5.16 defines (read off `etcd --help` and probed one by one against Debian's etcd
//! 3.5.16), each checked the way etcd checks its value, then `ETCD_<FLAG>` environment
//! variables for the flags the command line left unset (etcd's `SetFlagsFromEnv`).
//!
//! Errors carry etcd's own wording (`flag provided but not defined: -bogus`), so scripts and
//! people who know etcd read them as they would read etcd's.

use std::collections::BTreeMap;

/// How etcd reads one flag's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Go's bool flag: bare `--flag`, or `--flag=true|false|1|0|t|f|...`.
    Bool,
    Text,
    Uint,
    Int,
    /// Go's duration: `100ms`, `1h30m`, `0`.
    Duration,
    /// Comma-separated URLs with a scheme etcd knows, a host:port and no path.
    Urls,
    /// Like [`Kind::Urls`], or `*`.
    Cors,
    Choice(&'static [&'static str]),
    /// Flags etcd keeps only so that old command lines still start: bool-like, value dropped.
    Ignored,
}

/// Every flag etcd 3.5 accepts.
pub const FLAGS: &[(&str, Kind)] = {
    use Kind::*;
    &[
        ("advertise-client-urls", Urls),
        ("auth-token", Text),
        ("auth-token-ttl", Uint),
        ("auto-compaction-mode", Text),
        ("auto-compaction-retention", Text),
        ("auto-tls", Bool),
        ("backend-batch-interval", Duration),
        ("backend-batch-limit", Uint),
        ("backend-bbolt-freelist-type", Text),
        ("bcrypt-cost", Uint),
        ("cert-file", Text),
        ("cipher-suites", Text),
        ("client-cert-allowed-hostname", Text),
        ("client-cert-auth", Bool),
        ("client-cert-file", Text),
        ("client-crl-file", Text),
        ("client-key-file", Text),
        ("cluster-active-size", Ignored),
        ("cluster-remove-delay", Ignored),
        ("cluster-sync-interval", Ignored),
        ("config", Ignored),
        ("config-file", Text),
        ("cors", Cors),
        ("data-dir", Text),
        ("discovery", Text),
        ("discovery-fallback", Choice(&["exit", "proxy"])),
        ("discovery-proxy", Text),
        ("discovery-srv", Text),
        ("discovery-srv-name", Text),
        ("election-timeout", Uint),
        ("enable-grpc-gateway", Bool),
        ("enable-log-rotation", Bool),
        ("enable-pprof", Bool),
        ("enable-v2", Bool),
        ("experimental-bootstrap-defrag-threshold-megabytes", Uint),
        ("experimental-compact-hash-check-enabled", Bool),
        ("experimental-compact-hash-check-time", Duration),
        ("experimental-compaction-batch-limit", Uint),
        ("experimental-compaction-sleep-interval", Duration),
        ("experimental-corrupt-check-time", Duration),
        ("experimental-distributed-tracing-address", Text),
        ("experimental-distributed-tracing-instance-id", Text),
        ("experimental-distributed-tracing-sampling-rate", Int),
        ("experimental-distributed-tracing-service-name", Text),
        ("experimental-downgrade-check-time", Duration),
        ("experimental-enable-distributed-tracing", Bool),
        ("experimental-enable-lease-checkpoint", Bool),
        ("experimental-enable-lease-checkpoint-persist", Bool),
        ("experimental-enable-v2v3", Text),
        ("experimental-initial-corrupt-check", Bool),
        ("experimental-memory-mlock", Bool),
        ("experimental-peer-skip-client-san-verification", Bool),
        ("experimental-snapshot-catchup-entries", Uint),
        ("experimental-stop-grpc-service-on-defrag", Bool),
        ("experimental-txn-mode-write-with-shared-buffer", Bool),
        ("experimental-warning-apply-duration", Duration),
        ("experimental-watch-progress-notify-interval", Duration),
        ("force", Ignored),
        ("force-new-cluster", Bool),
        ("grpc-keepalive-interval", Duration),
        ("grpc-keepalive-min-time", Duration),
        ("grpc-keepalive-timeout", Duration),
        ("heartbeat-interval", Uint),
        ("host-whitelist", Text),
        ("initial-advertise-peer-urls", Urls),
        ("initial-cluster", Text),
        ("initial-cluster-state", Choice(&["new", "existing"])),
        ("initial-cluster-token", Text),
        ("initial-election-tick-advance", Bool),
        ("key-file", Text),
        ("listen-client-http-urls", Urls),
        ("listen-client-urls", Urls),
        ("listen-metrics-urls", Urls),
        ("listen-peer-urls", Urls),
        ("log-level", Text),
        ("log-outputs", Text),
        ("log-rotation-config-json", Text),
        ("logger", Text),
        ("max-concurrent-streams", Uint),
        ("max-request-bytes", Uint),
        ("max-result-buffer", Ignored),
        ("max-retry-attempts", Ignored),
        ("max-snapshots", Uint),
        ("max-txn-ops", Uint),
        ("max-wals", Uint),
        ("metrics", Text),
        ("name", Text),
        ("peer-auto-tls", Bool),
        ("peer-cert-allowed-cn", Text),
        ("peer-cert-allowed-hostname", Text),
        ("peer-cert-file", Text),
        ("peer-client-cert-auth", Bool),
        ("peer-client-cert-file", Text),
        ("peer-client-key-file", Text),
        ("peer-crl-file", Text),
        ("peer-election-timeout", Ignored),
        ("peer-heartbeat-interval", Ignored),
        ("peer-key-file", Text),
        ("peer-trusted-ca-file", Text),
        ("pre-vote", Bool),
        ("proxy", Choice(&["off", "readonly", "on"])),
        ("proxy-dial-timeout", Uint),
        ("proxy-failure-wait", Uint),
        ("proxy-read-timeout", Uint),
        ("proxy-refresh-interval", Uint),
        ("proxy-write-timeout", Uint),
        ("quota-backend-bytes", Int),
        ("raft-read-timeout", Duration),
        ("raft-write-timeout", Duration),
        ("retry-interval", Ignored),
        ("self-signed-cert-validity", Uint),
        ("snapshot", Ignored),
        ("snapshot-count", Uint),
        ("socket-reuse-address", Bool),
        ("socket-reuse-port", Bool),
        ("strict-reconfig-check", Bool),
        ("tls-max-version", Text),
        ("tls-min-version", Text),
        ("trusted-ca-file", Text),
        ("unsafe-no-fsync", Bool),
        ("v", Ignored),
        ("v2-deprecation", Choice(&["not-yet", "write-only", "write-only-drop-data", "gone"])),
        ("version", Bool),
        ("vv", Ignored),
        ("wal-dir", Text),
    ]
};

fn kind_of(name: &str) -> Option<Kind> {
    FLAGS.iter().find(|(n, _)| *n == name).map(|(_, kind)| *kind)
}

/// Where an explicitly set flag came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    CommandLine,
    Environment,
}

/// The flags set on the command line or through `ETCD_*`, by name; unset flags are absent
/// (their etcd default applies).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Flags {
    set: BTreeMap<&'static str, (String, Source)>,
    /// `ETCD_*` variables that name no flag, or that a command-line flag shadows: etcd warns
    /// about both and goes on.
    pub env_warnings: Vec<String>,
}

impl Flags {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.set.get(name).map(|(value, _)| value.as_str())
    }

    /// A bool flag's value (etcd's default when unset).
    pub fn bool(&self, name: &str, default: bool) -> bool {
        self.get(name).map_or(default, |v| parse_bool(v).expect("checked when parsed"))
    }

    /// Comma-separated values of a list flag, empty when unset.
    pub fn list(&self, name: &str) -> Vec<String> {
        self.get(name).map(|v| v.split(',').map(str::to_owned).collect()).unwrap_or_default()
    }

    pub fn names(&self) -> impl Iterator<Item = (&'static str, Source)> + '_ {
        self.set.iter().map(|(name, (_, source))| (*name, *source))
    }
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Serve(Flags),
    /// `--version`.
    Version,
    /// `-h`/`--help` (etcd prints its usage and exits 0).
    Help,
    /// `etcd gateway` or `etcd grpc-proxy`.
    Subcommand(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlagError {
    #[error("flag provided but not defined: -{0}")]
    Undefined(String),
    #[error("flag needs an argument: -{0}")]
    NeedsArgument(String),
    #[error("bad flag syntax: {0}")]
    BadSyntax(String),
    #[error("invalid boolean value {value:?} for -{flag}: parse error")]
    InvalidBool { flag: String, value: String },
    #[error("invalid value {value:?} for flag -{flag}: {reason}")]
    InvalidValue { flag: String, value: String, reason: String },
    #[error("invalid value {value:?} for {var}: {reason}")]
    InvalidEnv { var: String, value: String, reason: String },
    #[error("{0:?} is not a valid flag")]
    Positional(String),
}

impl FlagError {
    /// etcd prints its usage after the command-line errors Go's flag package reports.
    pub fn shows_usage(&self) -> bool {
        !matches!(self, Self::InvalidEnv { .. } | Self::Positional(_))
    }
}

/// The environment variable etcd reads for a flag: `ETCD_` and the name in upper case with
/// `_` for `-`.
pub fn env_var(flag: &str) -> String {
    format!("ETCD_{}", flag.to_ascii_uppercase().replace('-', "_"))
}

/// Parses `args` (without the program name); `env` yields the process environment.
pub fn parse(args: &[String], env: &[(String, String)]) -> Result<Parsed, FlagError> {
    if let Some(first) = args.first()
        && matches!(first.as_str(), "gateway" | "grpc-proxy")
    {
        return Ok(Parsed::Subcommand(first.clone()));
    }
    let mut flags = Flags::default();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        if arg == "--" {
            if let Some(positional) = rest.next() {
                return Err(FlagError::Positional(positional.clone()));
            }
            break;
        }
        let Some(body) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')).filter(|_| arg.len() > 1) else {
            return Err(FlagError::Positional(arg.clone()));
        };
        if body.is_empty() || body.starts_with('-') || body.starts_with('=') {
            return Err(FlagError::BadSyntax(arg.clone()));
        }
        let (name, inline) = match body.split_once('=') {
            Some((name, value)) => (name, Some(value.to_owned())),
            None => (body, None),
        };
        let Some(kind) = kind_of(name) else {
            if matches!(name, "h" | "help") {
                return Ok(Parsed::Help);
            }
            return Err(FlagError::Undefined(name.to_owned()));
        };
        let value = match (kind, inline) {
            (Kind::Bool | Kind::Ignored, None) => "true".to_owned(),
            (_, Some(value)) => value,
            (_, None) => rest.next().cloned().ok_or_else(|| FlagError::NeedsArgument(name.to_owned()))?,
        };
        check(kind, &value).map_err(|reason| match reason {
            None => FlagError::InvalidBool { flag: name.to_owned(), value: value.clone() },
            Some(reason) => FlagError::InvalidValue { flag: name.to_owned(), value: value.clone(), reason },
        })?;
        let name = FLAGS.iter().find(|(n, _)| *n == name).map(|(n, _)| *n).expect("found above");
        flags.set.insert(name, (value, Source::CommandLine));
    }
    if flags.get("version").is_some_and(|v| parse_bool(v) == Some(true)) {
        return Ok(Parsed::Version);
    }
    apply_env(&mut flags, env)?;
    Ok(Parsed::Serve(flags))
}

fn apply_env(flags: &mut Flags, env: &[(String, String)]) -> Result<(), FlagError> {
    for (var, value) in env {
        // etcd refuses to take its version from the environment, and reads ETCD_CONFIG_FILE
        // before the other variables; neither is a plain flag variable.
        if !var.starts_with("ETCD_") || var == "ETCD_VERSION" {
            continue;
        }
        let Some((name, kind)) = FLAGS.iter().find(|(name, _)| env_var(name) == *var) else {
            flags.env_warnings.push(format!("unrecognized environment variable {var}={value}"));
            continue;
        };
        if flags.set.contains_key(name) {
            flags
                .env_warnings
                .push(format!("recognized environment variable {var}, but unused: shadowed by corresponding flag"));
            continue;
        }
        check(*kind, value).map_err(|reason| FlagError::InvalidEnv {
            var: var.clone(),
            value: value.clone(),
            reason: reason.unwrap_or_else(|| "parse error".to_owned()),
        })?;
        flags.set.insert(name, (value.clone(), Source::Environment));
    }
    Ok(())
}

/// `Err(None)`: not a boolean; `Err(Some(reason))`: any other invalid value.
fn check(kind: Kind, value: &str) -> Result<(), Option<String>> {
    let parse_error = || Some("parse error".to_owned());
    match kind {
        Kind::Bool => parse_bool(value).map(drop).ok_or(None),
        Kind::Text | Kind::Ignored => Ok(()),
        Kind::Uint => value.parse::<u64>().map(drop).map_err(|_| parse_error()),
        Kind::Int => value.parse::<i64>().map(drop).map_err(|_| parse_error()),
        Kind::Duration => go_duration(value).map(drop).ok_or_else(parse_error),
        Kind::Urls => value.split(',').try_for_each(check_url).map_err(Some),
        Kind::Cors => value.split(',').filter(|v| *v != "*").try_for_each(check_url).map_err(Some),
        Kind::Choice(choices) => {
            if choices.contains(&value) {
                Ok(())
            } else {
                Err(Some("invalid value".to_owned()))
            }
        }
    }
}

/// etcd's `types.NewURLs` rules for one URL.
fn check_url(url: &str) -> Result<(), String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!("URL scheme must be http, https, unix, or unixs: {url}"));
    };
    if !matches!(scheme, "http" | "https" | "unix" | "unixs") {
        return Err(format!("URL scheme must be http, https, unix, or unixs: {url}"));
    }
    let (host, path) = rest.split_once('/').map_or((rest, ""), |(h, p)| (h, p));
    let has_port = host.rsplit_once(':').is_some_and(|(h, _)| !h.is_empty() || host.starts_with(':'));
    if !has_port || (host.contains('[') && !host.contains("]:")) {
        return Err(format!("URL address does not have the form \"host:port\": {url}"));
    }
    if !path.is_empty() {
        return Err(format!("URL must not contain a path: {url}"));
    }
    Ok(())
}

/// Go's `strconv.ParseBool`.
pub fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Go's `time.ParseDuration`: a signed sequence of decimal numbers with units (`ns`, `us`,
/// `µs`, `ms`, `s`, `m`, `h`), or a bare `0`. Negative durations are `None` here: no etcd
/// flag has a meaning for one.
pub fn go_duration(text: &str) -> Option<std::time::Duration> {
    let text = text.strip_prefix('+').unwrap_or(text);
    if text == "0" {
        return Some(std::time::Duration::ZERO);
    }
    if text.is_empty() || text.starts_with('-') {
        return None;
    }
    let mut rest = text;
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (number, tail) = rest.split_at(number_end);
        if number.is_empty() || number == "." {
            return None;
        }
        let number: f64 = number.parse().ok()?;
        let unit_end = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let nanos = match unit {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        total += number * nanos;
        rest = tail;
    }
    Some(std::time::Duration::from_nanos(total as u64))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn parse_args(args: &[&str]) -> Result<Parsed, FlagError> {
        parse(&args.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>(), &[])
    }

    fn served(args: &[&str]) -> Flags {
        match parse_args(args) {
            Ok(Parsed::Serve(flags)) => flags,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    /// The etcd container's arguments common to every chart release, as kubelet passes them.
    pub(crate) const CHART_ETCD_ARGS: [&str; 6] = [
        "--data-dir=/var/run/etcd",
        "--name=clustermesh-apiserver",
        "--client-cert-auth",
        "--trusted-ca-file=/var/lib/etcd-secrets/ca.crt",
        "--cert-file=/var/lib/etcd-secrets/tls.crt",
        "--key-file=/var/lib/etcd-secrets/tls.key",
    ];

    #[test]
    fn ciliums_etcd_container_command_lines_parse() {
        // 1.16.19 (IPv4 in brackets, pod IP expanded) and 1.20.0.
        let v116 = served(
            &[
                &CHART_ETCD_ARGS[..],
                &[
                    "--listen-client-urls=https://127.0.0.1:2379,https://[10.0.0.7]:2379",
                    "--advertise-client-urls=https://[10.0.0.7]:2379",
                    "--initial-cluster-token=3f2a1c9e-0000-4000-8000-000000000001",
                    "--auto-compaction-retention=1",
                    "--listen-metrics-urls=http://[10.0.0.7]:9963",
                    "--metrics=basic",
                ],
            ]
            .concat(),
        );
        assert!(v116.bool("client-cert-auth", false));
        assert_eq!(v116.list("listen-client-urls").len(), 2);
        let v120 = served(&["--listen-client-urls=https://0.0.0.0:2379", "--enable-grpc-gateway=false"]);
        assert!(!v120.bool("enable-grpc-gateway", true));
    }

    #[test]
    fn go_flag_syntax_is_accepted_in_all_its_spellings() {
        let flags = served(&["-name", "m1", "--data-dir", "/d", "-client-cert-auth=false", "--max-txn-ops=64"]);
        assert_eq!(flags.get("name"), Some("m1"));
        assert_eq!(flags.get("data-dir"), Some("/d"));
        assert!(!flags.bool("client-cert-auth", true));
        // A value flag takes the next argument even when it looks like a flag, as Go's does.
        assert_eq!(served(&["--name", "--data-dir"]).get("name"), Some("--data-dir"));
        assert_eq!(parse_args(&["--version"]), Ok(Parsed::Version));
        assert_eq!(parse_args(&["-h"]), Ok(Parsed::Help));
        assert_eq!(parse_args(&["grpc-proxy", "start"]), Ok(Parsed::Subcommand("grpc-proxy".to_owned())));
    }

    #[test]
    fn what_etcd_rejects_is_rejected_with_etcds_words() {
        let error = |args: &[&str]| parse_args(args).unwrap_err().to_string();
        assert_eq!(error(&["--bogus-flag"]), "flag provided but not defined: -bogus-flag");
        assert_eq!(error(&["--data-dir"]), "flag needs an argument: -data-dir");
        assert_eq!(
            error(&["--client-cert-auth=zz"]),
            r#"invalid boolean value "zz" for -client-cert-auth: parse error"#
        );
        assert_eq!(error(&["--max-txn-ops=zzz"]), r#"invalid value "zzz" for flag -max-txn-ops: parse error"#);
        assert_eq!(
            error(&["--listen-client-urls=zzz"]),
            r#"invalid value "zzz" for flag -listen-client-urls: URL scheme must be http, https, unix, or unixs: zzz"#
        );
        assert_eq!(
            error(&["--initial-cluster-state=zzz"]),
            r#"invalid value "zzz" for flag -initial-cluster-state: invalid value"#
        );
        assert_eq!(
            error(&["--grpc-keepalive-timeout=5"]),
            r#"invalid value "5" for flag -grpc-keepalive-timeout: parse error"#
        );
        assert_eq!(error(&["serve"]), r#""serve" is not a valid flag"#);
    }

    #[test]
    fn environment_variables_fill_what_the_command_line_left_unset() {
        let env =
            |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<Vec<_>>();
        let args = vec!["--name=from-flag".to_owned()];
        let Ok(Parsed::Serve(flags)) = parse(
            &args,
            &env(&[("ETCD_NAME", "from-env"), ("ETCD_DATA_DIR", "/env"), ("ETCDCTL_API", "3"), ("ETCD_BOGUS", "1")]),
        ) else {
            panic!("parses")
        };
        assert_eq!(flags.get("name"), Some("from-flag"));
        assert_eq!(flags.get("data-dir"), Some("/env"));
        assert_eq!(flags.env_warnings.len(), 2, "{:?}", flags.env_warnings);
        let bad = parse(&[], &env(&[("ETCD_MAX_TXN_OPS", "many")])).unwrap_err();
        assert_eq!(bad.to_string(), r#"invalid value "many" for ETCD_MAX_TXN_OPS: parse error"#);
    }

    #[test]
    fn go_durations_parse_as_go_parses_them() {
        use std::time::Duration;
        assert_eq!(go_duration("10m"), Some(Duration::from_secs(600)));
        assert_eq!(go_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(go_duration("0"), Some(Duration::ZERO));
        assert_eq!(go_duration("5"), None);
        assert_eq!(go_duration("5x"), None);
    }
}
