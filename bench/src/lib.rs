//! `kiln-bench`: a load generator that speaks only standard REAPI, so every number can be
//! taken side by side against Kiln and any other server. See `docs/benchmarking.md`.
//!
//! [`scenarios`] prepare and describe operations, [`load`] runs them (closed or open loop,
//! warm-up excluded), [`stats`] records them, [`report`] prints, saves and compares results,
//! [`plot`] draws latency distributions.

pub mod blobs;
pub mod cli;
pub mod connect;
pub mod cpu;
pub mod load;
pub mod plot;
pub mod report;
pub mod rss_plot;
pub mod scenarios;
pub mod size;
pub mod stats;

pub use cli::{Args, Scenario};
pub use report::Report;

use anyhow::Context;
use load::{drive, LoadPlan};
use scenarios::{Ctx, Prepared};
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

/// Runs what the command line asks for and prints the results; returns the reports involved
/// (the run, or the compared files).
pub async fn run(args: Args) -> anyhow::Result<Vec<Report>> {
    if !args.compare.is_empty() {
        let reports = args
            .compare
            .iter()
            .map(|p| Report::read(p))
            .collect::<anyhow::Result<Vec<_>>>()?;
        print!("{}", report::compare(&reports));
        write_plot(&args, &reports)?;
        return Ok(reports);
    }
    let scenario = args
        .scenario
        .context("name a scenario (write, read, batch, find-missing, action-cache, get-tree, execute, mixed, tcp) or --compare A.json B.json")?;
    let report = measure(&args, scenario).await?;
    print!("{}", report.table());
    if let Some(path) = &args.json {
        report.write(path)?;
    }
    let reports = vec![report];
    write_plot(&args, &reports)?;
    Ok(reports)
}

/// Prepares and runs one scenario.
pub async fn measure(args: &Args, scenario: Scenario) -> anyhow::Result<Report> {
    let plan = LoadPlan {
        concurrency: args.concurrency,
        warmup: Duration::from_secs_f64(args.warmup.unwrap_or(if args.ops.is_some() {
            0.0
        } else {
            1.0
        })),
        duration: match (args.duration, args.ops) {
            (Some(d), _) => Some(Duration::from_secs_f64(d)),
            (None, Some(_)) => None,
            (None, None) => Some(Duration::from_secs(10)),
        },
        ops: args.ops,
        rate: args.rate,
        progress: !args.quiet && std::io::stderr().is_terminal(),
        server_pid: args.server_pid,
        rss_every: args.rss_every.map(|s| Duration::from_secs_f64(s.max(0.1))),
    };
    if let Some(pid) = args.server_pid {
        cpu::read(pid)
            .with_context(|| format!("--server-pid {pid}: cannot read /proc/{pid}/stat"))?;
    }
    let head = Report {
        label: args
            .label
            .clone()
            .unwrap_or_else(|| args.endpoint.clone().unwrap_or_else(|| "loopback".into())),
        scenario: scenario.name().to_string(),
        endpoint: args.endpoint.clone().unwrap_or_else(|| "loopback".into()),
        digest_function: format!("{:?}", args.digest_function).to_lowercase(),
        size: args.size.to_string(),
        connections: args.connections,
        concurrency: args.concurrency,
        rate: args.rate,
        seconds: 0.0,
        results: Vec::new(),
        notes: Vec::new(),
        server_cpu: None,
        server_rss: None,
    };
    if scenario == Scenario::Tcp {
        let workload = scenarios::tcp::prepare(args.connections, args.size).await?;
        let measured = drive(workload, &plan).await;
        return Ok(Report::from_measured(head, &measured));
    }
    let ctx = Arc::new(Ctx::new(args.clone()).await?);
    let workload = match scenarios::prepare(ctx.clone(), scenario).await? {
        Prepared::Run(w) => w,
        Prepared::Skip(why) => {
            eprintln!("kiln-bench: {} skipped: {why}", scenario.name());
            return Ok(Report {
                notes: vec![format!("skipped: {why}")],
                ..head
            });
        }
    };
    let measured = drive(workload, &plan).await;
    let mut report = Report::from_measured(head, &measured);
    report.notes.extend(
        ctx.notes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..),
    );
    let repeats = ctx.repeats.load(std::sync::atomic::Ordering::Relaxed);
    if repeats > 0 {
        report.notes.push(format!(
            "{repeats} operations reused a blob already written in this run (the server may answer those at once); raise --blobs"
        ));
    }
    Ok(report)
}

fn write_plot(args: &Args, reports: &[Report]) -> anyhow::Result<()> {
    if let Some(path) = &args.plot {
        std::fs::write(path, plot::svg(reports))
            .with_context(|| format!("cannot write {}", path.display()))?;
        if let Some(rss) = rss_plot::svg(reports) {
            let rss_path = path.with_extension("rss.svg");
            std::fs::write(&rss_path, rss)
                .with_context(|| format!("cannot write {}", rss_path.display()))?;
        }
    }
    Ok(())
}
