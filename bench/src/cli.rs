//! The command line.

use crate::size::SizeSpec;
use clap::{Parser, ValueEnum};
use std::path::PathBuf;

/// A REAPI load generator: throughput and latency percentiles against any REAPI endpoint.
#[derive(Debug, Clone, Parser)]
#[command(name = "kiln-bench", version, about)]
pub struct Args {
    /// Scenario to run (omit with --compare).
    #[arg(value_enum)]
    pub scenario: Option<Scenario>,
    /// The server, `grpc://HOST:PORT`, or `grpcs://HOST:PORT` for TLS.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// CA certificate(s) that sign a grpcs:// endpoint's certificate, PEM.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate for mutual TLS, PEM.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Its private key, PEM.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// REAPI instance name.
    #[arg(long, default_value = "")]
    pub instance: String,
    /// Digest function of the blobs and actions.
    #[arg(long, value_enum, default_value = "sha256")]
    pub digest_function: DigestFunction,
    /// HTTP/2 connections.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Operations in flight at once (spread over the connections).
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Measure for this many seconds (default 10 unless --ops).
    #[arg(long, conflicts_with = "ops")]
    pub duration: Option<f64>,
    /// Measure this many operations.
    #[arg(long)]
    pub ops: Option<u64>,
    /// Seconds of load before measuring (default 1 with --duration, 0 with --ops).
    #[arg(long)]
    pub warmup: Option<f64>,
    /// Open loop: start this many operations per second whatever the latency (default:
    /// closed loop, each slot starts its next operation when the last one finishes).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Blob sizes: `4KiB`, `1GiB`, a range `4KiB-4MiB` (log-uniform), or `mix` (many under
    /// 16 KiB, some MiB, a few of 100 MiB and more).
    #[arg(long, default_value = "4KiB")]
    pub size: SizeSpec,
    /// Distinct blobs (or actions) to prepare (default: enough for the run).
    #[arg(long)]
    pub blobs: Option<usize>,
    /// What blobs hold: random bytes (incompressible) or source-like text (compressible, as
    /// build outputs and sources often are).
    #[arg(long, value_enum, default_value = "random")]
    pub content: Content,
    /// `write` and `read`: send blobs zstd-compressed (`compressed-blobs/zstd/…`). Uploads are
    /// compressed at --zstd-level before the measured phase; reads are decompressed and
    /// verified as they arrive (whole, not in --ranges). Bytes are counted uncompressed.
    #[arg(long)]
    pub compressed: bool,
    /// zstd level of --compressed uploads (Bazel's is 3).
    #[arg(long, default_value_t = 3)]
    pub zstd_level: i32,
    /// `read`: upload the blobs zstd-compressed at --zstd-level before the measured phase, as
    /// a client with compression on does (the server may then keep the client's frames for
    /// compressed reads); without it they are uploaded uncompressed.
    #[arg(long)]
    pub upload_compressed: bool,
    /// ByteStream write chunk size in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub chunk: usize,
    /// Read each blob of at least this many MiB per range as this many ByteStream reads of
    /// its ranges at once (`read_offset`/`read_limit`), spread over the connections, then
    /// verify the whole (the bytes of all ranges are held until hashed in order).
    #[arg(long, default_value_t = 1)]
    pub ranges: usize,
    /// Blobs per BatchUpdateBlobs/BatchReadBlobs call (`batch`), or input files per build
    /// step (`mixed`).
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Chunks each `splice` blob is spliced from.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub chunks: u64,
    /// Digests per FindMissingBlobs call.
    #[arg(long, default_value_t = 1000)]
    pub digests_per_call: usize,
    /// Fraction of FindMissingBlobs digests that are present.
    #[arg(long, default_value_t = 0.5)]
    pub present_fraction: f64,
    /// Fraction of GetActionResult calls that should hit (`action-cache`, `mixed`).
    #[arg(long, default_value_t = 0.8)]
    pub hit_fraction: f64,
    /// Fraction of `action-cache` operations that are UpdateActionResult (the rest are
    /// GetActionResult; `--update-fraction 0 --hit-fraction 1` measures hits alone).
    #[arg(long, default_value_t = 0.1)]
    pub update_fraction: f64,
    /// Synthetic tree depth (`get-tree`).
    #[arg(long, default_value_t = 4)]
    pub depth: u32,
    /// Subdirectories per directory (`get-tree`).
    #[arg(long, default_value_t = 4)]
    pub fanout: u32,
    /// Files per directory (`get-tree`).
    #[arg(long, default_value_t = 8)]
    pub files: u32,
    /// GetTree page size (0: the server's choice).
    #[arg(long, default_value_t = 0)]
    pub page_size: i32,
    /// `execute`: give each action an input file of this size, new for every action, so the
    /// worker must fetch it; the time the worker took is reported as `input-fetch`.
    #[arg(long)]
    pub input_size: Option<SizeSpec>,
    /// `execute` with --input-size: this many input files per action, each of that size (the
    /// worker's fetch of many small inputs; `input-fetch` counts them all).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub input_files: u64,
    /// `execute` with --input-size: every action gets the same input files (under a new salt,
    /// like a rebuild with new salts), so a worker's directory cache can serve them.
    #[arg(long)]
    pub shared_inputs: bool,
    /// `execute` with --shared-inputs: the shared files go in a subdirectory `shared/` of
    /// each action's input root, beside a small file of the action's own, so that every
    /// action has a root of its own sharing one large directory (placement by the input
    /// tree's bytes a worker holds, not by a cached root).
    #[arg(long, requires = "shared_inputs")]
    pub own_root: bool,
    /// `execute` with --input-size: spread the input files over subdirectories of at most
    /// this many files each (0: all in the input root).
    #[arg(long, default_value_t = 0)]
    pub files_per_dir: u64,
    /// `execute`: the same input blobs in every run given this seed (else new ones per run),
    /// so that a second run finds them on the worker that ran the first.
    #[arg(long)]
    pub seed: Option<u64>,
    /// `execute`: a platform property every action asks for, `NAME=VALUE` (repeatable), to
    /// send actions to particular workers.
    #[arg(long = "platform", value_name = "NAME=VALUE")]
    pub platform: Vec<String>,
    /// `execute`: each action writes an output file `out` of this size (random bytes, new
    /// for every action), which its worker uploads; the upload's time is reported as
    /// `output-upload`.
    #[arg(long)]
    pub output_size: Option<SizeSpec>,
    /// Milliseconds each `execute` action sleeps (0: a no-op).
    #[arg(long, default_value_t = 0)]
    pub sleep_ms: u64,
    /// The server's process id: its CPU time over the measured phase (from
    /// `/proc/PID/stat`) is reported as user and system seconds and microseconds per
    /// operation. Linux only.
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,
    /// With --server-pid: sample the server's resident memory every this many seconds and
    /// report its peak and its growth over the last two thirds of the run (a soak: e.g.
    /// `mixed --duration 1800 --rss-every 10 --plot rss.svg`).
    #[arg(long, value_name = "SECS", requires = "server_pid")]
    pub rss_every: Option<f64>,
    /// Name of this run in reports (default: the endpoint).
    #[arg(long)]
    pub label: Option<String>,
    /// Write the results as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Compare result files side by side (ratios against the first).
    #[arg(long, num_args = 2.., value_name = "FILE.json")]
    pub compare: Vec<PathBuf>,
    /// Draw the latency distributions of this run (or of the compared runs) as SVG.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// No progress bar, even on a terminal.
    #[arg(long)]
    pub quiet: bool,
}

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// ByteStream uploads of new blobs.
    Write,
    /// ByteStream downloads (of blobs uploaded first), verified against their digests.
    Read,
    /// BatchUpdateBlobs then BatchReadBlobs of small blobs.
    Batch,
    /// FindMissingBlobs with a chosen fraction present.
    FindMissing,
    /// GetActionResult hits and misses, and UpdateActionResult.
    ActionCache,
    /// GetTree over a synthetic tree.
    GetTree,
    /// SpliceBlob of a blob of --size from --chunks chunks uploaded before (one unique to each
    /// blob, the rest shared).
    Splice,
    /// Execute of no-op or sleeping actions.
    Execute,
    /// A Bazel-like build step: FindMissing, upload, GetActionResult, Execute or update, read.
    Mixed,
    /// Raw loopback TCP (no server needed): the machine's ceiling, for scale.
    Tcp,
}

impl Scenario {
    /// The scenario's name as typed.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Write => "write",
            Scenario::Read => "read",
            Scenario::Batch => "batch",
            Scenario::FindMissing => "find-missing",
            Scenario::ActionCache => "action-cache",
            Scenario::GetTree => "get-tree",
            Scenario::Splice => "splice",
            Scenario::Execute => "execute",
            Scenario::Mixed => "mixed",
            Scenario::Tcp => "tcp",
        }
    }
}

/// What test blobs hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Content {
    /// Random bytes: nothing to compress.
    Random,
    /// Source-like text: lines of code with varying names and numbers.
    Text,
}

/// The digest function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DigestFunction {
    /// SHA-256.
    Sha256,
    /// BLAKE3.
    Blake3,
}

impl From<DigestFunction> for kiln_reapi::digest::DigestFunction {
    fn from(function: DigestFunction) -> Self {
        match function {
            DigestFunction::Sha256 => kiln_reapi::digest::DigestFunction::Sha256,
            DigestFunction::Blake3 => kiln_reapi::digest::DigestFunction::Blake3,
        }
    }
}
