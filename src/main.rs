//! `kiln`: the remote cache and execution server. Subcommands live in their own modules; this
//! file only parses the command line and sets up logging.

mod allocator;
mod auth;
mod cli;
mod enrol;
mod serve;
mod signals;
mod tls;
mod worker;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    init_logging();
    abort_on_panic();
    kiln_tls::install_provider();
    let result = match cli.command {
        cli::Command::Serve(args) => {
            kiln_worker::limits::raise_open_files();
            serve::run(args)
        }
        cli::Command::Worker(w) => match *w {
            cli::WorkerCli {
                command: Some(cli::WorkerCommand::Revoke { server, name }),
                ..
            } => enrol::revoke(&server, &name),
            w => {
                kiln_worker::limits::raise_open_files();
                worker::run(w.args)
            }
        },
        cli::Command::JoinToken(command) => enrol::join_token(command),
        cli::Command::Ca(cli::CaCommand::Export(args)) => serve::export_ca(args),
        cli::Command::Token(command) => auth::token(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("kiln: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr; `RUST_LOG` filters (default `info`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

/// A panic is a bug, and it would kill only the thread it happens on: a data-plane shard
/// would be gone while its peers keep queueing requests for it, and the server would hang
/// half-alive. Log it and stop the whole process instead, so that the supervisor (systemd,
/// launchd) restarts a whole server.
fn abort_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // The one thread whose panic is expected to be survivable: trying direct I/O (its
        // caller turns the panic into "no direct I/O").
        if std::thread::current().name() == Some(kiln_dataplane::runtime::DIRECT_PROBE_THREAD) {
            tracing::warn!("{info}");
            return;
        }
        tracing::error!("{info}; stopping the process");
        default(info);
        std::process::abort();
    }));
}
