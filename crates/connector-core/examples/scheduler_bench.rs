//! The scheduler under load (`cargo xtask bench scheduler`): N connectors (default 10,000) on
//! 1-second intervals against a no-op source (one empty batch a sync), the embedded store in a
//! temporary directory and states in memory, for `--seconds` (default 60). Prints the runs done,
//! CPU use, peak RSS and how late runs started (actual start minus due time).
//!
//! ```text
//! cargo run --release -p connector-core --example scheduler_bench -- --seconds 60
//!     [--connectors 10000] [--interval-ms 1000] [--concurrency 64] [--jitter-ms 0]
//! ```

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use connector_core::scheduler::{RunReason, SchedulerEvent, SchedulerOptions, SyncSchedule, SyncScheduler};
use connector_core::store::SqliteKnowledgeStore;
use connector_core::{
    Batch, Capabilities, Connector, ConnectorId, MemoryStateStore, ReadRequest, SyncEngine, SyncOptions,
    TenantId,
};
use futures::StreamExt;
use futures::stream::BoxStream;

mod common;
use common::{cpu_time, peak_rss_mib, percentile};

/// A source with nothing new: one empty batch.
struct Noop {
    id: ConnectorId,
    tenant: TenantId,
}

#[async_trait]
impl Connector for Noop {
    fn connector_id(&self) -> &ConnectorId {
        &self.id
    }
    fn tenant_id(&self) -> &TenantId {
        &self.tenant
    }
    fn kind(&self) -> &'static str {
        "noop"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities { incremental: true, ..Default::default() }
    }
    async fn check(&self) -> connector_core::Result<()> {
        Ok(())
    }
    fn read(&self, _request: ReadRequest) -> BoxStream<'_, connector_core::Result<Batch>> {
        futures::stream::iter([Ok(Batch::default())]).boxed()
    }
}

struct Args {
    connectors: usize,
    seconds: u64,
    interval_ms: u64,
    concurrency: usize,
    jitter_ms: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args { connectors: 10_000, seconds: 60, interval_ms: 1000, concurrency: 64, jitter_ms: 0 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let n: u64 = value
            .replace(['_', ','], "")
            .parse()
            .map_err(|_| format!("{flag}: {value:?} is not a number"))?;
        match flag.as_str() {
            "--connectors" => args.connectors = n as usize,
            "--seconds" => args.seconds = n,
            "--interval-ms" => args.interval_ms = n,
            "--concurrency" => args.concurrency = n as usize,
            "--jitter-ms" => args.jitter_ms = n,
            other => return Err(format!("unknown option {other}")),
        }
    }
    if args.connectors == 0 || args.seconds == 0 || args.interval_ms == 0 {
        return Err("--connectors, --seconds and --interval-ms must be at least 1".into());
    }
    Ok(args)
}

#[derive(Default)]
struct Stats {
    /// Lateness in microseconds: of runs that started in the first interval (every connector's
    /// first run, all due at start), and of the others.
    first: Vec<u64>,
    steady: Vec<u64>,
    missed: u64,
    finished: u64,
    failed: u64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let interval = Duration::from_millis(args.interval_ms);
    let store = Arc::new(SqliteKnowledgeStore::in_memory().await?);
    let state = Arc::new(MemoryStateStore::new());
    let scheduler = SyncScheduler::new(SchedulerOptions {
        max_concurrent: args.concurrency,
        sync_options: SyncOptions::default(),
        ..Default::default()
    });
    let stats = Arc::new(Mutex::new(Stats::default()));
    let started = Arc::new(Mutex::new(None::<chrono::DateTime<chrono::Utc>>));
    {
        let (stats, started) = (stats.clone(), started.clone());
        scheduler.on_event(move |event| {
            let mut stats = stats.lock().unwrap();
            match event {
                SchedulerEvent::Started(run) => {
                    // A catch-up run is as late as the first due time it missed.
                    let due = if run.reason == RunReason::Missed { run.scheduled_at } else { run.due_at };
                    let late = (run.started_at - due).num_microseconds().unwrap_or(0).max(0) as u64;
                    stats.missed += u64::from(run.reason == RunReason::Missed);
                    let t0 = started.lock().unwrap().unwrap_or(run.due_at);
                    if run.scheduled_at < t0 + interval {
                        stats.first.push(late);
                    } else {
                        stats.steady.push(late);
                    }
                }
                SchedulerEvent::Finished(done) => {
                    stats.finished += 1;
                    stats.failed += u64::from(!done.result.success);
                }
            }
        });
    }
    let tenant = TenantId::new("bench")?;
    let setup = Instant::now();
    for i in 0..args.connectors {
        let source = Arc::new(Noop { id: ConnectorId::new(format!("c{i:05}"))?, tenant: tenant.clone() });
        let engine = Arc::new(SyncEngine::new(source, store.clone(), state.clone()));
        let schedule = SyncSchedule::every(interval)?.with_jitter(Duration::from_millis(args.jitter_ms))?;
        scheduler.add_connector(engine, schedule).await?;
    }
    println!(
        "{} connectors every {} ms (jitter up to {} ms), at most {} syncs at once; set up in {:.2} s",
        args.connectors,
        args.interval_ms,
        args.jitter_ms,
        args.concurrency,
        setup.elapsed().as_secs_f64()
    );
    let cpu_before = cpu_time();
    let wall = Instant::now();
    *started.lock().unwrap() = Some(chrono::Utc::now());
    scheduler.start().await;
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    scheduler.stop().await;
    let elapsed = wall.elapsed().as_secs_f64();
    let cpu = match (cpu_before, cpu_time()) {
        (Some(a), Some(b)) => Some((b - a).as_secs_f64()),
        _ => None,
    };

    let mut stats = stats.lock().unwrap();
    stats.first.sort_unstable();
    stats.steady.sort_unstable();
    let mut all: Vec<u64> = stats.first.iter().chain(&stats.steady).copied().collect();
    all.sort_unstable();
    let expected = args.connectors as f64 * elapsed * 1000.0 / args.interval_ms as f64;
    println!(
        "ran for {elapsed:.1} s: {} runs finished ({:.0}/s; {:.1}% of the {:.0} due), {} failed, {} catch-up runs",
        stats.finished,
        stats.finished as f64 / elapsed,
        100.0 * stats.finished as f64 / expected,
        expected,
        stats.failed,
        stats.missed
    );
    if let Some(cpu) = cpu {
        println!(
            "CPU: {cpu:.1} s user+system = {:.0}% of one core ({:.0}% of {} cores)",
            100.0 * cpu / elapsed,
            100.0 * cpu / elapsed / num_cores() as f64,
            num_cores()
        );
    }
    if let Some(rss) = peak_rss_mib() {
        println!("peak RSS: {rss:.1} MiB");
    }
    for (label, v) in
        [("all runs", &all), ("first runs (all due at start)", &stats.first), ("later runs", &stats.steady)]
    {
        println!(
            "lateness, {label} ({}): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            v.len(),
            percentile(v, 0.50),
            percentile(v, 0.99),
            v.last().copied().unwrap_or(0) as f64 / 1000.0
        );
    }
    Ok(())
}

fn num_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
