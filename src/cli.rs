//! The command line.

use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Kiln: a remote cache and remote execution server for Bazel and other REAPI v2 clients.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (with no config file: the embedded default on 127.0.0.1:50051).
    Serve(ServeArgs),
}

/// Options of `kiln serve`; flags override the config file.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration file (TOML); see docs/configuration.md.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on (overrides server.listen).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Data directory (overrides storage.data_dir).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Number of data-plane shards; default one per core (overrides server.shards).
    #[arg(long, value_name = "N")]
    pub shards: Option<usize>,
    /// Data-plane backend: glommio, monoio-uring or monoio-legacy (overrides server.runtime).
    #[arg(long, value_name = "NAME")]
    pub runtime: Option<kiln_config::RuntimeKind>,
    /// Address of the admin listener: metrics, health, status page (overrides admin.listen).
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,
}
