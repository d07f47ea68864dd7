//! The programs Cilium's chart runs from the clustermesh-apiserver image, by path: one
//! executable is both `/usr/bin/clustermesh-apiserver` and `/usr/bin/etcd`, and acts on the
//! name it was started under (argv[0]), as busybox does.

pub mod etcd;
pub mod etcd_flags;
pub mod etcdinit;

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;

use crate::config::{Cli, Command};
use crate::etcd::service::maintenance::ETCD_VERSION;
use etcd_flags::{FlagError, Parsed};

/// Who the executable was started as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persona {
    /// `etcd`, `/usr/bin/etcd` or a link named so: etcd's command line.
    Etcd,
    /// Any other name: our own subcommands.
    Apiserver,
}

pub fn of(argv0: Option<&OsString>) -> Persona {
    let name = argv0.and_then(|a| Path::new(a).file_name()).and_then(|n| n.to_str());
    if name == Some("etcd") { Persona::Etcd } else { Persona::Apiserver }
}

/// What `main` does with an etcd command line.
pub enum Invocation {
    Run {
        cli: Box<Cli>,
        /// Logged once tracing is set up: ignored flags, settings not applied as etcd would.
        notes: Vec<String>,
    },
    Exit(ExitCode),
}

/// etcd's exit status for a command line Go's flag package refuses.
const USAGE_ERROR: u8 = 2;

/// Reads an etcd command line and environment; prints and exits for `--version`, `--help`
/// and refused command lines, as etcd does.
pub fn etcd_invocation(args: &[OsString], env: &[(String, String)]) -> Invocation {
    let args: Vec<String> = args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    let flags = match etcd_flags::parse(&args, env) {
        Ok(Parsed::Serve(flags)) => flags,
        Ok(Parsed::Version) => {
            print!("{}", etcd_version());
            return Invocation::Exit(ExitCode::SUCCESS);
        }
        Ok(Parsed::Help) => {
            println!("{}", etcd_usage());
            return Invocation::Exit(ExitCode::SUCCESS);
        }
        Ok(Parsed::Subcommand(name)) => {
            eprintln!("etcd {name}: not provided by this etcd-compatible store (only the server runs)");
            return Invocation::Exit(ExitCode::from(USAGE_ERROR));
        }
        Err(error) => return refuse(&error),
    };
    let legacy_chart = env.iter().any(|(k, v)| k == etcd::LEGACY_CHART_ENV && !v.is_empty());
    match etcd::serve_args(&flags, legacy_chart) {
        Ok(serve) => {
            let mut notes = flags.env_warnings.clone();
            if !serve.ignored.is_empty() {
                notes
                    .push(format!("flags without meaning for a single in-memory member, ignored: {:?}", serve.ignored));
            }
            notes.extend(serve.notes);
            let cli = Box::new(Cli { log: serve.log, command: Command::Kvstore(Box::new(serve.kvstore)) });
            Invocation::Run { cli, notes }
        }
        Err(error) => {
            eprintln!("etcd: {error}");
            Invocation::Exit(ExitCode::FAILURE)
        }
    }
}

fn refuse(error: &FlagError) -> Invocation {
    eprintln!("{error}");
    if error.shows_usage() {
        eprintln!("{}", etcd_usage());
    }
    Invocation::Exit(ExitCode::from(USAGE_ERROR))
}

fn etcd_version() -> String {
    format!(
        "etcd Version: {ETCD_VERSION}\nGit SHA: clustermesh-apiserver {}\nGo Version: none (Rust)\nGo OS/Arch: {}/{}\n",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::OS,
        if std::env::consts::ARCH == "x86_64" { "amd64" } else { std::env::consts::ARCH },
    )
}

fn etcd_usage() -> String {
    let mut text = String::from(
        "Usage:\n\n  etcd [flags]\n    Start the clustermesh-apiserver's etcd-v3-compatible store with etcd 3.5's flags.\n\n  \
         etcd --version\n  etcd -h | --help\n\nFlags (each also as ETCD_<FLAG>):\n",
    );
    for (name, _) in etcd_flags::FLAGS {
        text.push_str("  --");
        text.push_str(name);
        text.push('\n');
    }
    text
}

/// `clustermesh-apiserver version`.
pub fn version() -> String {
    format!(
        "clustermesh-apiserver {} (a Cilium ClusterMesh API server for Cilium 1.16 to 1.20; etcd API {ETCD_VERSION})\n",
        env!("CARGO_PKG_VERSION")
    )
}
