//! `kiln-bench`: a REAPI load generator. See `docs/benchmarking.md`.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = kiln_bench::Args::parse();
    kiln_tls::install_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kiln-bench: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(kiln_bench::run(args)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
