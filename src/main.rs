use clap::Parser;
use clustermesh_apiserver::persona::{self, Invocation, Persona};
use clustermesh_apiserver::{app, config};
use tracing_subscriber::EnvFilter;

/// See Cargo.toml: freed memory goes back to the kernel within jemalloc's decay time (10 s).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // One executable, two programs of Cilium's pod: started as `etcd`, it is the store.
    let (cli, notes) = match persona::of(args.first()) {
        Persona::Etcd => {
            let env: Vec<(String, String)> = std::env::vars().collect();
            match persona::etcd_invocation(args.get(1..).unwrap_or_default(), &env) {
                Invocation::Run { cli, notes } => (*cli, notes),
                Invocation::Exit(code) => return code,
            }
        }
        Persona::Apiserver => (config::Cli::parse_from(args), Vec::new()),
    };
    init_tracing(&cli.log);
    for note in notes {
        tracing::info!("{note}");
    }
    // Cilium's etcdinit exits with -1 (255) on any error; the chart's pod only looks at zero.
    let failure = match cli.command {
        config::Command::Etcdinit(_) => std::process::ExitCode::from(255),
        _ => std::process::ExitCode::FAILURE,
    };
    // Only ring is compiled in; installing it explicitly keeps rustls from guessing.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the async runtime: {error}");
            return failure;
        }
    };
    match runtime.block_on(app::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("error: {error:#}");
            failure
        }
    }
}

fn init_tracing(log: &config::LogArgs) {
    // rustls warns on every handshake of a client sending an IP address as SNI (grpc-js and
    // others do); that is the client's quirk, not news for the operator.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{},rustls::msgs::handshake=error", log.filter())));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    match log.log_format {
        config::LogFormat::Text => builder.init(),
        config::LogFormat::Json => builder.json().init(),
    }
}
