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
    /// Run a worker that executes actions for a scheduler (or `kiln worker revoke NAME`).
    Worker(Box<WorkerCli>),
    /// The farm CA (`[tls] mode = "auto"`).
    #[command(subcommand)]
    Ca(CaCommand),
    /// One-time join tokens that enrol a worker (`kiln worker --join`).
    #[command(subcommand, name = "join-token")]
    JoinToken(JoinTokenCommand),
    /// Bearer tokens (`[auth]`).
    #[command(subcommand)]
    Token(TokenCommand),
}

/// `kiln token …`: bearer tokens, stored hashed in the server's token file.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token and print its secret once.
    Create {
        #[command(flatten)]
        args: TokenArgs,
        /// Who it is for.
        #[arg(long)]
        name: String,
        /// Roles, comma-separated or repeated: cache-read, cache-write, ac-write, execute,
        /// worker, admin.
        #[arg(long, required = true)]
        role: Vec<String>,
        /// Instances the roles apply to (repeat for more; none: all instances).
        #[arg(long)]
        instance: Vec<String>,
    },
    /// List tokens (names, roles, instances; secrets are not stored).
    List {
        #[command(flatten)]
        args: TokenArgs,
    },
    /// Revoke a token by name.
    Revoke {
        #[command(flatten)]
        args: TokenArgs,
        /// The token's name.
        name: String,
    },
}

/// Where the token file is: the server's own configuration and data directory.
pub type TokenArgs = CaArgs;

/// `kiln worker [OPTIONS]` runs a worker; `kiln worker revoke NAME` cuts one off.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct WorkerCli {
    /// A worker administration command.
    #[command(subcommand)]
    pub command: Option<WorkerCommand>,
    /// Running a worker.
    #[command(flatten)]
    pub args: WorkerArgs,
}

/// Worker administration, on the server.
#[derive(Debug, Subcommand)]
pub enum WorkerCommand {
    /// Revoke an enrolled worker's certificate: its calls are refused and its session closed
    /// within a second.
    Revoke {
        #[command(flatten)]
        server: CaArgs,
        /// The worker's name.
        name: String,
    },
}

/// `kiln join-token …`.
#[derive(Debug, Subcommand)]
pub enum JoinTokenCommand {
    /// Make a one-time join token and print it (`kiln worker --join TOKEN`).
    Create {
        #[command(flatten)]
        server: CaArgs,
        /// Roles the worker gets (on every instance), comma-separated or repeated.
        #[arg(long, default_value = "worker,cache-read,cache-write")]
        role: Vec<String>,
        /// How long the token may be used: seconds, or with a unit (`90s`, `30m`, `1h`, `7d`).
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// The address workers reach the server at (default: the listen address, or this
        /// host's name when listening on all addresses).
        #[arg(long, value_name = "HOST:PORT")]
        server_address: Option<String>,
    },
}

/// Options of `kiln worker`; flags override the config file.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Configuration file (TOML): `[worker]`, plus `[storage]` for the local CAS.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The scheduler, `grpc://HOST:PORT` (overrides worker.scheduler); repeat it to serve
    /// several servers of a farm at once (the others override worker.schedulers).
    #[arg(long, value_name = "URL")]
    pub scheduler: Vec<String>,
    /// Where actions run (overrides worker.work_dir).
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// The local CAS's directory (overrides storage.data_dir).
    #[arg(long, value_name = "DIR")]
    pub cas_dir: Option<PathBuf>,
    /// A platform property offered, NAME=VALUE (repeat for more; replaces worker.properties).
    #[arg(long, value_name = "NAME=VALUE")]
    pub property: Vec<String>,
    /// Actions run at once (overrides worker.max_inflight).
    #[arg(long, value_name = "N")]
    pub max_inflight: Option<usize>,
    /// Where the local CAS is served (overrides server.listen; default a free loopback port).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Data-plane shards of the local CAS.
    #[arg(long, value_name = "N")]
    pub shards: Option<usize>,
    /// Data-plane backend: glommio, monoio-uring or monoio-legacy.
    #[arg(long, value_name = "NAME")]
    pub runtime: Option<kiln_config::RuntimeKind>,
    /// This worker's name (default: host name and process id).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// The CA that signs a grpcs:// scheduler's certificate, PEM (overrides worker.tls_ca).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This worker's client certificate, PEM (overrides worker.tls_cert).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// Its private key, PEM (overrides worker.tls_key).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// A file holding a bearer token to present (overrides worker.token_file).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Enrol with a join token (from `kiln join-token create` on the server): the worker gets
    /// a client certificate, keeps it in its CAS directory and uses it from then on.
    #[arg(long, value_name = "TOKEN")]
    pub join: Option<String>,
    /// Serve the worker's own metrics (`/metrics`: its local CAS and directory cache) and
    /// `/healthz` on this address, plain HTTP (off by default).
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,
    /// Serve the local CAS, or the admin listener, on a non-loopback address anyway (neither
    /// has TLS or authorization yet: anyone who can reach the local CAS can read it, as its
    /// peers do, and anyone can read the metrics).
    #[arg(long)]
    pub insecure: bool,
}

/// `kiln ca …`: the farm CA of `[tls] mode = "auto"`.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Print the farm CA certificate (PEM), for clients' `--tls_certificate`.
    Export(CaArgs),
}

/// Which server: its configuration file and data directory (where the farm CA and the token
/// file live).
#[derive(Debug, Args)]
pub struct CaArgs {
    /// The server's configuration file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The server's data directory (overrides storage.data_dir).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
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
    /// Serve the main port or the admin listener on a non-loopback address without TLS and
    /// authentication anyway: anyone who can reach the port can use the server. Logged as a
    /// warning on every start.
    #[arg(long)]
    pub insecure: bool,
}
