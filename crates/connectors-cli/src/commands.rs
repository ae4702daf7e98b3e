//! The subcommands.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use connector_core::engine::{SyncEngine, SyncOptions, SyncResult};
use connector_core::{Connector, TenantId};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::CliError;
use crate::config::{self, Loaded};

type Outcome = Result<u8, CliError>;

fn print_json(value: &serde_json::Value) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, value).map_err(|e| CliError::failed(format!("writing output: {e}")))?;
    out.write_all(b"\n").map_err(|e| CliError::failed(format!("writing output: {e}")))
}

fn tenant(value: &str) -> Result<TenantId, CliError> {
    TenantId::new(value).map_err(|e| CliError::usage(format!("--tenant: {e}")))
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    /// Only these connectors (repeatable; default all).
    #[arg(long = "connector", value_name = "ID")]
    connectors: Vec<String>,
    /// Full sync: ignore cursors and delete what the source no longer has.
    #[arg(long)]
    full: bool,
    /// Retries of a failed read, from the last checkpoint.
    #[arg(long, value_name = "N", default_value_t = 3)]
    max_retries: u32,
    /// Seconds before the first retry (doubled each time).
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    retry_delay: f64,
    /// Print one JSON object per connector.
    #[arg(long)]
    json: bool,
}

fn result_json(r: &SyncResult) -> serde_json::Value {
    json!({
        "connector_id": r.connector_id,
        "tenant_id": r.tenant_id,
        "success": r.success,
        "full_sync": r.full_sync,
        "items_synced": r.items_synced,
        "items_failed": r.items_failed,
        "items_deleted": r.items_deleted,
        "items_unchanged": r.items_unchanged,
        "errors": r.errors,
        "duration_ms": r.duration.as_millis() as u64,
        "read_ms": r.timings.read.as_millis() as u64,
        "write_ms": r.timings.write.as_millis() as u64,
        "index_ms": r.timings.index.as_millis() as u64,
        "state_ms": r.timings.state.as_millis() as u64,
    })
}

/// Progress on stderr: a bar on a terminal, a line every few seconds otherwise.
fn attach_progress(engine: &SyncEngine, json: bool) -> Option<ProgressBar> {
    let id = engine.connector().connector_id().to_string();
    if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {bar:30} {human_pos}/{human_len} items, {eta} left",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_prefix(id);
        bar.enable_steady_tick(Duration::from_millis(200));
        let b = bar.clone();
        engine.on_progress(move |done, total| {
            if let Some(t) = total {
                b.set_length(t.max(done));
            }
            b.set_position(done);
        });
        Some(bar)
    } else {
        if !json {
            let last = std::sync::Mutex::new(Instant::now());
            engine.on_progress(move |done, total| {
                let mut last = last.lock().expect("poisoned");
                if last.elapsed() >= Duration::from_secs(5) {
                    *last = Instant::now();
                    match total {
                        Some(t) => eprintln!("{id}: {done}/{t} items"),
                        None => eprintln!("{id}: {done} items"),
                    }
                }
            });
        }
        None
    }
}

pub async fn sync(path: &Path, args: SyncArgs) -> Outcome {
    let loaded = config::load(path)?;
    let selected = loaded.select(&args.connectors)?;
    if selected.is_empty() {
        return Err(CliError::usage(format!("{}: no [[connectors]] configured", path.display())));
    }
    if !args.retry_delay.is_finite() || args.retry_delay < 0.0 {
        return Err(CliError::usage(format!(
            "--retry-delay: {} is not a number of seconds",
            args.retry_delay
        )));
    }
    let store = loaded.store().await?;
    let state = loaded.state().await?;
    let options = SyncOptions {
        full_sync: args.full,
        max_retries: args.max_retries,
        retry_delay: Duration::from_secs_f64(args.retry_delay),
        ..SyncOptions::default()
    };
    let mut failed = false;
    for connector in selected {
        let engine = Arc::new(SyncEngine::new(connector.clone(), store.clone(), state.clone()));
        let bar = attach_progress(&engine, args.json);
        let cancel = engine.clone();
        let ctrl_c = tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("interrupted: stopping at the next checkpoint (Ctrl-C again to abort)");
                cancel.cancel_sync();
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            }
        });
        let result = engine.sync(options.clone()).await;
        ctrl_c.abort();
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        failed |= !result.success;
        if args.json {
            print_json(&result_json(&result))?;
        } else {
            let verdict = if result.success { "ok" } else { "FAILED" };
            println!(
                "{} ({}): {verdict}{} - {} synced, {} unchanged, {} deleted, {} failed in {:.1}s",
                result.connector_id,
                result.tenant_id,
                if result.full_sync { " (full sync)" } else { "" },
                result.items_synced,
                result.items_unchanged,
                result.items_deleted,
                result.items_failed,
                result.duration.as_secs_f64()
            );
            for e in &result.errors {
                eprintln!("  error: {e}");
            }
        }
    }
    Ok(if failed { 1 } else { 0 })
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only this connector.
    #[arg(long = "connector", value_name = "ID")]
    connector: Option<String>,
    /// JSON Lines output.
    #[arg(long)]
    json: bool,
}

pub async fn status(path: &Path, args: StatusArgs) -> Outcome {
    let loaded = config::load(path)?;
    let selected = loaded.select(args.connector.as_slice())?;
    let store = loaded.store().await?;
    let state = loaded.state().await?;
    for c in selected {
        let engine = SyncEngine::new(c.clone(), store.clone(), state.clone());
        let s = engine.load_state().await.map_err(|e| CliError::from_core("state", e))?;
        let documents = store
            .count(c.tenant_id(), Some(c.connector_id()))
            .await
            .map_err(|e| CliError::from_core("store", e))?;
        if args.json {
            print_json(&json!({
                "connector_id": s.connector_id,
                "tenant_id": s.tenant_id,
                "type": c.kind(),
                "status": s.status,
                "last_sync_at": s.last_sync_at,
                "last_full_sync_at": s.last_full_sync_at,
                "items_synced": s.items_synced,
                "documents": documents,
                "full_sync_pending": s.full_sync.is_some(),
                "errors": s.errors,
            }))?;
        } else {
            let last = s.last_sync_at.map_or_else(
                || "never".to_string(),
                |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            );
            println!(
                "{} ({}, {}): {} - last sync {last}, {} items synced, {documents} documents in store{}",
                s.connector_id,
                s.tenant_id,
                c.kind(),
                s.status.as_str(),
                s.items_synced,
                if s.full_sync.is_some() { ", interrupted full sync pending" } else { "" }
            );
            for e in &s.errors {
                println!("  error: {e}");
            }
        }
    }
    Ok(0)
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// Only this connector.
    #[arg(long = "connector", value_name = "ID")]
    connector: Option<String>,
    /// How many runs per connector.
    #[arg(long, default_value_t = 10)]
    limit: usize,
    /// JSON Lines output.
    #[arg(long)]
    json: bool,
}

pub async fn history(path: &Path, args: HistoryArgs) -> Outcome {
    let loaded = config::load(path)?;
    let selected = loaded.select(args.connector.as_slice())?;
    let state = loaded.state().await?;
    for c in selected {
        let s =
            state.load(c.connector_id(), c.tenant_id()).await.map_err(|e| CliError::from_core("state", e))?;
        let Some(s) = s else { continue };
        for run in s.history.iter().rev().take(args.limit) {
            if args.json {
                print_json(&json!({
                    "connector_id": s.connector_id,
                    "tenant_id": s.tenant_id,
                    "started_at": run.started_at,
                    "finished_at": run.finished_at,
                    "status": run.status,
                    "full_sync": run.full_sync,
                    "items_synced": run.items_synced,
                    "items_failed": run.items_failed,
                    "items_deleted": run.items_deleted,
                    "items_unchanged": run.items_unchanged,
                    "errors": run.errors,
                }))?;
            } else {
                println!(
                    "{} {}: {} items, {}{}",
                    s.connector_id,
                    run.started_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    run.items_synced,
                    run.status.as_str(),
                    if run.full_sync { " (full)" } else { "" }
                );
            }
        }
    }
    Ok(0)
}

#[derive(Debug, Args)]
pub struct SearchArgs {
    /// Words to search for (all must match).
    query: String,
    /// Tenant to search in.
    #[arg(long)]
    tenant: String,
    /// Most hits to show.
    #[arg(long, default_value_t = 10)]
    limit: usize,
    /// JSON Lines output.
    #[arg(long)]
    json: bool,
}

pub async fn search(path: &Path, args: SearchArgs) -> Outcome {
    let tenant = tenant(&args.tenant)?;
    let loaded = load_or_defaults(path)?;
    let store = loaded.store().await?;
    let hits =
        store.search(&tenant, &args.query, args.limit).await.map_err(|e| CliError::from_core("search", e))?;
    for h in &hits {
        if args.json {
            print_json(&json!({
                "id": h.id, "connector_id": h.connector_id, "title": h.title, "url": h.url,
                "snippet": h.snippet, "score": h.score,
            }))?;
        } else {
            // BM25 gives words that most documents contain a tiny weight; keep it readable.
            let score = if h.score >= 0.01 { format!("{:.3}", h.score) } else { format!("{:.1e}", h.score) };
            println!("{score:>8}  {} / {}  {}", h.connector_id, h.id, h.title);
            println!("          {}", h.snippet.replace('\n', " "));
        }
    }
    if hits.is_empty() && !args.json {
        eprintln!("no documents match {:?} in tenant {tenant}", args.query);
    }
    Ok(0)
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Tenant to export.
    #[arg(long)]
    tenant: String,
    /// Only this connector's documents.
    #[arg(long = "connector", value_name = "ID")]
    connector: Option<String>,
}

pub async fn export(path: &Path, args: ExportArgs) -> Outcome {
    let tenant = tenant(&args.tenant)?;
    let connector = args
        .connector
        .as_deref()
        .map(connector_core::ConnectorId::new)
        .transpose()
        .map_err(|e| CliError::usage(format!("--connector: {e}")))?;
    let loaded = load_or_defaults(path)?;
    let store = loaded.store().await?;
    let mut docs = store.export(&tenant, connector.as_ref());
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    while let Some(doc) = docs.next().await {
        let d = doc.map_err(|e| CliError::from_core("export", e))?;
        let line = json!({
            "id": d.document.id,
            "tenant_id": d.tenant_id,
            "connector_id": d.connector_id,
            "kind": d.document.kind,
            "title": d.document.title,
            "content": d.document.content,
            "url": d.document.url,
            "author": d.document.author,
            "created_at": d.document.created_at,
            "updated_at": d.document.updated_at,
            "metadata": d.document.metadata,
        });
        serde_json::to_writer(&mut out, &line)
            .map_err(|e| CliError::failed(format!("writing output: {e}")))?;
        out.write_all(b"\n").map_err(|e| CliError::failed(format!("writing output: {e}")))?;
    }
    out.flush().map_err(|e| CliError::failed(format!("writing output: {e}")))?;
    Ok(0)
}

/// Search, export and auth can run without a file: a missing default file means the defaults.
pub(crate) fn load_or_defaults(path: &Path) -> Result<Loaded, CliError> {
    if !path.exists() && std::env::var_os("ARAGORA_CONFIG").is_none() && path == Path::new("connectors.toml")
    {
        return config::defaults(path);
    }
    config::load(path)
}

#[derive(Debug, Subcommand)]
pub enum StateAction {
    /// Print the saved state as JSON.
    Show {
        /// The connector.
        #[arg(long = "connector", value_name = "ID")]
        connector: String,
    },
    /// Delete the saved state: the next sync is a full sync.
    Reset {
        /// The connector.
        #[arg(long = "connector", value_name = "ID")]
        connector: String,
    },
}

pub async fn state(path: &Path, action: StateAction) -> Outcome {
    let loaded = config::load(path)?;
    let state = loaded.state().await?;
    match action {
        StateAction::Show { connector } => {
            for c in loaded.select(std::slice::from_ref(&connector))? {
                let s = state
                    .load(c.connector_id(), c.tenant_id())
                    .await
                    .map_err(|e| CliError::from_core("state", e))?;
                match s {
                    Some(s) => {
                        let text =
                            serde_json::to_string_pretty(&s).map_err(|e| CliError::failed(e.to_string()))?;
                        println!("{text}");
                    }
                    None => {
                        eprintln!("{} ({}): no saved state (never synced)", c.connector_id(), c.tenant_id())
                    }
                }
            }
        }
        StateAction::Reset { connector } => {
            for c in loaded.select(std::slice::from_ref(&connector))? {
                let existed = state
                    .reset(c.connector_id(), c.tenant_id())
                    .await
                    .map_err(|e| CliError::from_core("state", e))?;
                println!(
                    "{} ({}): {}",
                    c.connector_id(),
                    c.tenant_id(),
                    if existed { "state reset; the next sync is a full sync" } else { "no saved state" }
                );
            }
        }
    }
    Ok(0)
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Only this connector.
    #[arg(long = "connector", value_name = "ID")]
    connector: Option<String>,
}

pub async fn check(path: &Path, args: CheckArgs) -> Outcome {
    let loaded = config::load(path)?;
    println!("{}: configuration ok ({} connectors)", path.display(), loaded.connectors.len());
    println!("credentials: {}", loaded.credentials.provider.describe());
    let selected = loaded.select(args.connector.as_slice())?;
    let mut failed = false;
    match loaded.store().await {
        Ok(store) => println!("store: ok ({})", store.describe()),
        Err(e) => {
            failed = true;
            println!("store: FAILED: {}", e.message);
        }
    }
    let connector_checks = selected.iter().map(|c| async move { (c.clone(), c.check().await) });
    for (c, result) in futures::future::join_all(connector_checks).await {
        let c: Arc<dyn Connector> = c;
        match result {
            Ok(()) => println!("{} ({}, {}): ok", c.connector_id(), c.tenant_id(), c.kind()),
            Err(e) => {
                failed = true;
                println!("{} ({}, {}): FAILED: {e}", c.connector_id(), c.tenant_id(), c.kind());
            }
        }
    }
    Ok(if failed { 1 } else { 0 })
}
