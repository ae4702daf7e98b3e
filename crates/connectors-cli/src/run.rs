//! `connectors run`: the long-running service. The scheduler runs each connector on its
//! `schedule`; an HTTP server takes webhooks (and serves `/healthz` and `/metrics`); each
//! connector's real-time change feed (PostgreSQL LISTEN/NOTIFY) turns into targeted syncs.
//! Several processes sharing a PostgreSQL state store split the connectors with leases.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use connector_core::engine::SyncEngine;
use connector_core::lease::{LeaseKey, LeaseManager, LeaseStore, PgLeaseStore};
use connector_core::metrics::{self, Metrics, RunningSync};
use connector_core::reexports::async_trait;
use connector_core::reexports::tokio_util::sync::CancellationToken;
use connector_core::scheduler::{SchedulerEvent, SchedulerOptions, SyncScheduler};
use connector_core::webhook::{self, ServerState, WebhookEvent, WebhookSink};
use connector_core::{ChangeHint, Connector, ConnectorId, ItemRef, TenantId};
use tokio::sync::mpsc;

use crate::CliError;
use crate::config;

type Outcome = Result<u8, CliError>;

#[derive(Debug, Args)]
pub struct RunArgs {}

/// Which connectors this process serves: all of them, or those whose lease it holds.
#[derive(Clone)]
struct Leases(Option<Arc<LeaseManager>>);

impl Leases {
    fn holds(&self, connector: &ConnectorId, tenant: &TenantId) -> bool {
        match &self.0 {
            None => true,
            Some(manager) => manager.holds(&(connector.clone(), tenant.clone())),
        }
    }
}

/// Hands webhook hints to the scheduler: each hint goes to the connectors of its source's type.
struct Sink {
    scheduler: Arc<SyncScheduler>,
    /// (connector, tenant) by connector type.
    by_kind: HashMap<String, Vec<LeaseKey>>,
    leases: Leases,
}

#[async_trait]
impl WebhookSink for Sink {
    async fn deliver(&self, events: Vec<WebhookEvent>) {
        for event in events {
            let Some(targets) = self.by_kind.get(&event.source) else {
                tracing::debug!(source = %event.source, event = %event.event_type,
                    "webhook hint for a connector type that is not configured; ignored");
                continue;
            };
            let items: Vec<ItemRef> = match &event.stream {
                Some(stream) => event
                    .ids
                    .iter()
                    .chain(&event.removed_ids)
                    .map(|id| ItemRef::new(stream.clone(), id.clone()))
                    .collect(),
                None => Vec::new(),
            };
            for (connector, tenant) in targets {
                hint(&self.scheduler, &self.leases, connector, tenant, items.clone(), "webhook");
            }
        }
    }
}

/// Serves one hint: item hints become an item run, the rest a triggered sync. A process that
/// does not hold the connector's lease ignores it (the holder gets the same hint).
fn hint(
    scheduler: &SyncScheduler,
    leases: &Leases,
    connector: &ConnectorId,
    tenant: &TenantId,
    items: Vec<ItemRef>,
    from: &str,
) {
    if !leases.holds(connector, tenant) {
        tracing::debug!(%connector, %tenant, from, "hint ignored: another process holds the lease");
        return;
    }
    let n = items.len();
    let outcome = if items.is_empty() {
        scheduler.trigger(connector, tenant)
    } else {
        scheduler.trigger_items(connector, tenant, items)
    };
    match outcome {
        Ok(outcome) => {
            tracing::debug!(%connector, %tenant, from, items = n, outcome = outcome.as_str(), "hint")
        }
        Err(e) => tracing::warn!(%connector, %tenant, from, error = %e, "hint not served"),
    }
}

/// Feeds scheduler events into the metrics and logs one line per finished run.
fn observe(scheduler: &SyncScheduler, metrics: Metrics) {
    let running: Mutex<HashMap<LeaseKey, RunningSync>> = Mutex::default();
    scheduler.on_event(move |event| match event {
        SchedulerEvent::Started(run) => {
            let guard = metrics.sync_started(&run.connector_id, &run.tenant_id);
            running
                .lock()
                .expect("poisoned")
                .insert((run.connector_id.clone(), run.tenant_id.clone()), guard);
        }
        SchedulerEvent::Finished(done) => {
            let key = (done.run.connector_id.clone(), done.run.tenant_id.clone());
            drop(running.lock().expect("poisoned").remove(&key));
            let r = &done.result;
            metrics.record_sync(r);
            let reason = serde_json::to_value(done.run.reason).ok();
            let reason = reason.as_ref().and_then(|v| v.as_str()).unwrap_or("?");
            tracing::info!(
                connector = %done.run.connector_id,
                tenant = %done.run.tenant_id,
                reason = %reason,
                outcome = %metrics::sync_status(r),
                items = r.items_synced,
                deleted = r.items_deleted,
                failed = r.items_failed,
                full_sync = r.full_sync,
                duration_ms = r.duration.as_millis() as u64,
                "run"
            );
            for e in &r.errors {
                tracing::warn!(connector = %done.run.connector_id, tenant = %done.run.tenant_id, error = %e,
                    "run error");
            }
        }
    });
}

/// Runs a connector's change feed, forwarding its hints, until `shutdown`.
fn start_feed(
    connector: &Arc<dyn Connector>,
    scheduler: Arc<SyncScheduler>,
    leases: Leases,
    shutdown: CancellationToken,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) {
    let Some(feed) = connector.change_feed() else { return };
    let (id, tenant) = (connector.connector_id().clone(), connector.tenant_id().clone());
    let (tx, mut rx) = mpsc::channel::<ChangeHint>(1024);
    let feed_id = id.clone();
    let stop = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        if let Err(e) = feed.run(tx, stop).await {
            tracing::error!(connector = %feed_id, error = %e,
                "the change feed stopped; the connector still runs on its schedule");
        }
    }));
    tasks.push(tokio::spawn(async move {
        loop {
            let hint_in = tokio::select! {
                _ = shutdown.cancelled() => return,
                h = rx.recv() => h,
            };
            let Some(first) = hint_in else { return };
            // A burst: take everything already queued, merged into one call.
            let mut items = Vec::new();
            let mut catch_up = false;
            let mut take = |h: ChangeHint| match h {
                ChangeHint::Items(i) => items.extend(i),
                ChangeHint::CatchUp => catch_up = true,
            };
            take(first);
            while let Ok(h) = rx.try_recv() {
                take(h);
            }
            if catch_up {
                hint(&scheduler, &leases, &id, &tenant, Vec::new(), "feed");
            }
            if !items.is_empty() {
                hint(&scheduler, &leases, &id, &tenant, items, "feed");
            }
        }
    }));
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

pub async fn run(path: &Path, _args: RunArgs) -> Outcome {
    let loaded = config::load(path)?;
    if loaded.connectors.is_empty() {
        return Err(CliError::usage(format!("{}: no [[connectors]] configured", path.display())));
    }
    let addr = loaded.file.server.listen_addr();
    let store = loaded.store().await?;
    let (state, pg_pool) = loaded.state_and_pool().await?;
    let keys: Vec<LeaseKey> =
        loaded.connectors.iter().map(|c| (c.connector_id().clone(), c.tenant_id().clone())).collect();

    // Leases, when the state is shared through PostgreSQL.
    let leases = match pg_pool {
        Some(pool) => {
            let lease_store: Arc<dyn LeaseStore> =
                Arc::new(PgLeaseStore::new(pool).await.map_err(|e| CliError::from_core("leases", e))?);
            let manager = LeaseManager::new(
                lease_store,
                LeaseManager::process_holder(),
                loaded.file.server.lease_ttl(),
                keys.clone(),
            );
            tracing::info!(
                holder = manager.holder(),
                ttl_s = loaded.file.server.lease_ttl().as_secs_f64(),
                "sharing connectors with other processes through leases in PostgreSQL"
            );
            Leases(Some(Arc::new(manager)))
        }
        None => Leases(None),
    };

    let gate = leases.0.as_ref().map(|manager| {
        let manager = Arc::clone(manager);
        Arc::new(move |c: &ConnectorId, t: &TenantId| manager.holds(&(c.clone(), t.clone())))
            as connector_core::scheduler::Gate
    });
    let scheduler = Arc::new(SyncScheduler::new(SchedulerOptions {
        gate,
        max_concurrent: loaded.file.server.max_concurrent_syncs(),
        ..SchedulerOptions::default()
    }));
    let metrics = Metrics::new();
    observe(&scheduler, metrics.clone());
    let mut by_kind: HashMap<String, Vec<LeaseKey>> = HashMap::new();
    for (connector, schedule) in loaded.connectors.iter().zip(&loaded.schedules) {
        let engine = Arc::new(SyncEngine::new(connector.clone(), store.clone(), state.clone()));
        metrics.register_connector(connector.connector_id(), connector.tenant_id());
        let added = match schedule {
            Some(schedule) => scheduler.add_connector(engine, schedule.clone()).await,
            None => scheduler.add_triggered_only(engine).await,
        };
        added.map_err(|e| CliError::from_core(&format!("connector {}", connector.connector_id()), e))?;
        by_kind
            .entry(connector.kind().to_owned())
            .or_default()
            .push((connector.connector_id().clone(), connector.tenant_id().clone()));
    }

    // The first lease cycle comes before the scheduler starts, so this process runs its share
    // at once; then a task renews and rebalances every period.
    let stop_leases = CancellationToken::new();
    let mut lease_task = None;
    if let Some(manager) = &leases.0 {
        let busy_of = {
            let scheduler = Arc::clone(&scheduler);
            move |k: &LeaseKey| scheduler.connector(&k.0, &k.1).is_some_and(|s| s.running)
        };
        match manager.cycle(&busy_of).await {
            Ok(held) => tracing::info!(held = held.len(), of = keys.len(), "leases taken"),
            Err(e) => tracing::warn!(error = %e, "the first lease cycle failed; retrying"),
        }
        let manager = Arc::clone(manager);
        let stop = stop_leases.clone();
        lease_task = Some(tokio::spawn(async move {
            let mut last = manager.held();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(manager.period()) => {}
                }
                match manager.cycle(&busy_of).await {
                    Ok(held) => {
                        if held != last {
                            tracing::info!(held = held.len(), "leases changed");
                            last = held;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "lease cycle failed"),
                }
            }
        }));
    }

    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| CliError::failed(format!("server.listen {addr}: cannot listen: {e}")))?;
    let verifiers = webhook::verifiers_from_credentials(
        loaded.credentials.provider.as_ref(),
        webhook::DEFAULT_SLACK_REPLAY_WINDOW,
    )
    .await
    .map_err(|e| CliError::from_core("webhook secrets", e))?;
    let sink = Arc::new(Sink { scheduler: Arc::clone(&scheduler), by_kind, leases: leases.clone() });
    let health = Arc::clone(&scheduler);
    let server_state = ServerState::new(sink, metrics.clone())
        .with_verifiers(verifiers)
        .with_health_check(move || health.is_started());
    let sources: Vec<String> = server_state.sources().map(str::to_owned).collect();

    scheduler.start().await;
    let stop_server = CancellationToken::new();
    let server = tokio::spawn(webhook::serve(listener, server_state, stop_server.clone()));
    let stop_feeds = CancellationToken::new();
    let mut feed_tasks = Vec::new();
    for connector in &loaded.connectors {
        start_feed(connector, Arc::clone(&scheduler), leases.clone(), stop_feeds.clone(), &mut feed_tasks);
    }
    tracing::info!(%addr, connectors = loaded.connectors.len(), webhook_sources = ?sources,
        feeds = feed_tasks.len() / 2, "connectors run: started");
    eprintln!("connectors run: listening on http://{addr} ({} connectors)", loaded.connectors.len());

    shutdown_signal().await;
    tracing::info!("shutting down: no more webhooks, feeds stopped, running syncs stop at a checkpoint");
    stop_server.cancel();
    stop_feeds.cancel();
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "the server failed"),
        Err(e) => tracing::warn!(error = %e, "the server task failed"),
    }
    for task in feed_tasks {
        if tokio::time::timeout(Duration::from_secs(5), task).await.is_err() {
            tracing::warn!("a change feed did not stop within 5 s");
        }
    }
    scheduler.stop().await;
    stop_leases.cancel();
    if let Some(task) = lease_task {
        let _ = task.await;
    }
    if let Some(manager) = &leases.0
        && let Err(e) = manager.release_all().await
    {
        tracing::warn!(error = %e, "releasing the leases failed; they expire after the TTL");
    }
    eprintln!("connectors run: stopped");
    Ok(0)
}
