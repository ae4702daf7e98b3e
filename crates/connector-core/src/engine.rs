//! The sync engine: drives a [`Connector`] into a [`KnowledgeStore`], saving checkpoints in a
//! [`StateStore`] only after the data they cover is durable.
//!
//! # Behavior
//! - The first sync of a connector, a `full_sync`, and every sync of a connector without
//!   incremental support are full syncs: every item is read, and when the read completes,
//!   documents the source no longer has are deleted (mark and sweep by generation).
//! - A full sync interrupted (crash, cancel, error) is resumed by the next sync from its last
//!   checkpoint, and still sweeps when it completes.
//! - Reading and writing overlap: the connector reads the next batch while the store writes the
//!   current one; batches that queue up are written in one transaction.
//! - A batch is committed to the store, then its checkpoint is saved. A crash between the two
//!   replays the batch; the store's content hashes make the replay write nothing.
//! - Errors the connector reports as retryable are retried from the last checkpoint, up to
//!   `max_retries` times, waiting `retry_delay` doubled each time (or what the source asked).
//! - `cancel_sync` stops at the next batch boundary, after saving that batch's checkpoint.
//! - One sync per (connector, tenant) at a time, also across processes when the state store
//!   supports locks (the JSON file store does).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::connector::{Batch, Checkpoint, Connector, Cursors, ReadMode, ReadRequest};
use crate::document::{Change, Document, ItemFailure};
use crate::error::{Error, ErrorKind, Result, RetryClass};
use crate::ids::{ConnectorId, TenantId};
use crate::realtime::ItemRef;
use crate::state::{ERRORS_LIMIT, FullSyncProgress, RunRecord, StateStore, SyncState};
use crate::store::{ChangeOutcome, KnowledgeStore, WriteScope};

pub use crate::state::SyncStatus;

/// Options of one sync (the guide's `sync(full_sync=, max_retries=, retry_delay=)`).
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// Ignore cursors, read everything, and delete what the source no longer has.
    pub full_sync: bool,
    /// How many times a retryable failure is retried from the last checkpoint.
    pub max_retries: u32,
    /// The first wait before a retry; doubled on each further retry.
    pub retry_delay: Duration,
    /// The most items a batch holds.
    pub batch_size: usize,
    /// The most content bytes a batch holds (approximately); bounds memory.
    pub batch_bytes: usize,
}

impl Default for SyncOptions {
    fn default() -> Self {
        Self {
            full_sync: false,
            max_retries: 3,
            retry_delay: Duration::from_secs(5),
            batch_size: 1000,
            batch_bytes: 4 << 20,
        }
    }
}

/// Where the time of a sync went.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SyncTimings {
    /// Waiting for the source.
    pub read: Duration,
    /// Writing documents to the store.
    pub write: Duration,
    /// Maintaining the search index. The embedded store indexes on another thread, beside the
    /// writes: this is that thread's busy time during the sync (other syncs of the same store
    /// running at once are counted too), not time added to the sync's duration.
    pub index: Duration,
    /// Saving checkpoints.
    pub state: Duration,
}

/// What a sync did (the guide's `SyncResult`).
#[derive(Debug, Clone, Serialize)]
pub struct SyncResult {
    /// The connector.
    pub connector_id: ConnectorId,
    /// Its tenant.
    pub tenant_id: TenantId,
    /// True when the sync completed and no item failed.
    pub success: bool,
    /// Whether this was a full sync.
    pub full_sync: bool,
    /// Documents written (new or changed).
    pub items_synced: u64,
    /// Items that failed.
    pub items_failed: u64,
    /// Documents deleted.
    pub items_deleted: u64,
    /// Documents read but unchanged (not rewritten).
    pub items_unchanged: u64,
    /// What went wrong, one message per error.
    pub errors: Vec<String>,
    /// The kind of the error that ended the sync, if one did.
    pub error_kind: Option<ErrorKind>,
    /// Wall time.
    pub duration: Duration,
    /// Where the time went.
    pub timings: SyncTimings,
}

/// A connector's status (the guide's `get_sync_status()`).
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    /// The connector.
    pub connector_id: ConnectorId,
    /// Its tenant.
    pub tenant_id: TenantId,
    /// `idle`, `running`, `success`, `partial`, `failed` or `cancelled`.
    pub status: SyncStatus,
    /// When the last sync ended.
    pub last_sync_at: Option<DateTime<Utc>>,
    /// Items written over the connector's life.
    pub items_synced: u64,
    /// Errors of the last sync.
    pub errors: Vec<String>,
    /// Items processed so far by a running sync in this process.
    pub progress: Option<u64>,
}

/// Batches read ahead of the store.
const QUEUED_BATCHES: usize = 4;

type ProgressFn = Arc<dyn Fn(u64, Option<u64>) + Send + Sync>;
type ItemFn = Arc<dyn Fn(&Document) + Send + Sync>;

/// Runs syncs of one connector. Cheap to share (`Arc`); one sync at a time.
pub struct SyncEngine {
    connector: Arc<dyn Connector>,
    store: Arc<dyn KnowledgeStore>,
    state: Arc<dyn StateStore>,
    on_progress: Mutex<Vec<ProgressFn>>,
    on_item: Mutex<Vec<ItemFn>>,
    cancel: Mutex<CancellationToken>,
    running: AtomicBool,
    progress: AtomicU64,
}

impl std::fmt::Debug for SyncEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncEngine")
            .field("connector", self.connector.connector_id())
            .field("tenant", self.connector.tenant_id())
            .field("store", &self.store.describe())
            .field("state", &self.state.describe())
            .finish()
    }
}

/// Clears the running flag however the sync ends.
struct RunningGuard<'a>(&'a AtomicBool);
impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

#[derive(Default)]
struct Counters {
    synced: u64,
    failed: u64,
    deleted: u64,
    unchanged: u64,
    errors: Vec<String>,
    timings: SyncTimings,
}

impl Counters {
    fn error(&mut self, message: String) {
        if self.errors.len() < ERRORS_LIMIT {
            self.errors.push(message);
        }
    }
}

/// Work queued for one store transaction.
#[derive(Default)]
struct Pending {
    changes: Vec<Change>,
    failures: Vec<ItemFailure>,
    checkpoints: Vec<Checkpoint>,
    bytes: usize,
}

impl Pending {
    fn add(&mut self, batch: Batch) {
        self.bytes += batch
            .changes
            .iter()
            .map(|c| match c {
                Change::Upsert(d) => d.approx_size(),
                Change::Delete { id } => id.len() + 16,
            })
            .sum::<usize>();
        self.changes.extend(batch.changes);
        self.failures.extend(batch.failures);
        self.checkpoints.extend(batch.checkpoint);
    }
}

impl SyncEngine {
    /// An engine for `connector`, writing to `store` and keeping state in `state`.
    pub fn new(
        connector: Arc<dyn Connector>,
        store: Arc<dyn KnowledgeStore>,
        state: Arc<dyn StateStore>,
    ) -> Self {
        Self {
            connector,
            store,
            state,
            on_progress: Mutex::default(),
            on_item: Mutex::default(),
            cancel: Mutex::new(CancellationToken::new()),
            running: AtomicBool::new(false),
            progress: AtomicU64::new(0),
        }
    }

    /// An engine with the defaults: the embedded store at `$ARAGORA_HOME/knowledge.db` and JSON
    /// state files in `state_dir` (default `$ARAGORA_HOME/sync_state`).
    #[cfg(feature = "sqlite")]
    pub async fn with_defaults(
        connector: Arc<dyn Connector>,
        state_dir: Option<std::path::PathBuf>,
    ) -> Result<Self> {
        let store = crate::store::SqliteKnowledgeStore::open(crate::home::default_store_path()).await?;
        let state =
            crate::state::JsonFileStateStore::new(state_dir.unwrap_or_else(crate::home::default_state_dir));
        Ok(Self::new(connector, Arc::new(store), Arc::new(state)))
    }

    /// The connector.
    pub fn connector(&self) -> &Arc<dyn Connector> {
        &self.connector
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn KnowledgeStore> {
        &self.store
    }

    /// The state store.
    pub fn state_store(&self) -> &Arc<dyn StateStore> {
        &self.state
    }

    /// Calls `f(synced, total)` after each batch; `total` is the connector's estimate.
    pub fn on_progress(&self, f: impl Fn(u64, Option<u64>) + Send + Sync + 'static) {
        self.on_progress.lock().expect("poisoned").push(Arc::new(f));
    }

    /// Calls `f(document)` for each document written (new or changed).
    pub fn on_item_synced(&self, f: impl Fn(&Document) + Send + Sync + 'static) {
        self.on_item.lock().expect("poisoned").push(Arc::new(f));
    }

    /// Asks a running sync to stop at the next batch boundary.
    pub fn cancel_sync(&self) {
        self.cancel.lock().expect("poisoned").cancel();
    }

    /// The saved state (a fresh one if the connector never synced).
    pub async fn load_state(&self) -> Result<SyncState> {
        let (c, t) = (self.connector.connector_id(), self.connector.tenant_id());
        Ok(self.state.load(c, t).await?.unwrap_or_else(|| SyncState::new(c.clone(), t.clone())))
    }

    /// The connector's status.
    pub async fn get_sync_status(&self) -> Result<StatusReport> {
        let state = self.load_state().await?;
        let running = self.running.load(Ordering::SeqCst);
        Ok(StatusReport {
            connector_id: state.connector_id,
            tenant_id: state.tenant_id,
            status: if running { SyncStatus::Running } else { state.status },
            last_sync_at: state.last_sync_at,
            items_synced: state.items_synced,
            errors: state.errors,
            progress: running.then(|| self.progress.load(Ordering::Relaxed)),
        })
    }

    /// Runs one sync. Failures are reported in the result (`success: false`, `errors`), not
    /// as `Err`.
    pub async fn sync(&self, options: SyncOptions) -> SyncResult {
        let started = Instant::now();
        let mut counters = Counters::default();
        let mut full_sync = false;
        let outcome = self.sync_inner(&options, &mut counters, &mut full_sync).await;
        self.result(outcome, counters, full_sync, started)
    }

    /// The result of a run, from what it counted and how it ended.
    fn result(
        &self,
        outcome: Result<()>,
        mut counters: Counters,
        full_sync: bool,
        started: Instant,
    ) -> SyncResult {
        let error_kind = outcome.err().map(|e| {
            counters.error(e.to_string());
            e.kind()
        });
        SyncResult {
            connector_id: self.connector.connector_id().clone(),
            tenant_id: self.connector.tenant_id().clone(),
            success: error_kind.is_none() && counters.failed == 0,
            full_sync,
            items_synced: counters.synced,
            items_failed: counters.failed,
            items_deleted: counters.deleted,
            items_unchanged: counters.unchanged,
            errors: counters.errors,
            error_kind,
            duration: started.elapsed(),
            timings: counters.timings,
        }
    }

    /// Brings specific items up to date after a real-time hint: fetches their current state
    /// from the source ([`Connector::fetch`]) and writes it, upserts and deletes, without
    /// touching any cursor (scheduled syncs stay the source of completeness).
    ///
    /// Returns `None` when the hint cannot be served this way: the connector cannot fetch
    /// single items, or it never completed a first sync. The caller then runs an incremental
    /// [`sync`](Self::sync). Like `sync`, it never runs beside another sync of the connector:
    /// it fails with "already running" instead, and the caller retries after that sync.
    pub async fn sync_items(&self, items: &[ItemRef]) -> Option<SyncResult> {
        let started = Instant::now();
        let mut counters = Counters::default();
        let outcome = match self.sync_items_inner(items, &mut counters).await {
            Ok(false) => return None,
            Ok(true) => Ok(()),
            Err(e) => Err(e),
        };
        Some(self.result(outcome, counters, false, started))
    }

    /// Takes the engine's one-sync-at-a-time slot, or fails naming the connector.
    fn claim(&self) -> Result<RunningGuard<'_>> {
        if self.running.swap(true, Ordering::SeqCst) {
            return Err(Error::new(
                ErrorKind::Config,
                format!("a sync of {} is already running", self.connector.connector_id()),
            ));
        }
        Ok(RunningGuard(&self.running))
    }

    async fn sync_items_inner(&self, items: &[ItemRef], counters: &mut Counters) -> Result<bool> {
        let _running = self.claim()?;
        let (cid, tid) = (self.connector.connector_id().clone(), self.connector.tenant_id().clone());
        let _lock = self.state.lock(&cid, &tid).await?;
        let Some(mut state) = self.state.load(&cid, &tid).await? else { return Ok(false) };
        if state.last_sync_at.is_none() {
            return Ok(false);
        }
        let started = Instant::now();
        let Some(batch) = self.connector.fetch(items).await? else { return Ok(false) };
        counters.timings.read += started.elapsed();
        // The current generation: a later full sync stamps a newer one, and an interrupted
        // full sync (an older one) keeps these documents when it sweeps.
        let scope = WriteScope {
            tenant_id: tid,
            connector_id: cid,
            generation: state.generation,
            touch_unchanged: false,
        };
        let pending =
            Pending { changes: batch.changes, failures: batch.failures, checkpoints: Vec::new(), bytes: 0 };
        self.commit(pending, &scope, &mut state, counters, None).await?;
        let busy_before = self.store.index_busy();
        self.store.flush_index().await?;
        counters.timings.index += self.store.index_busy().saturating_sub(busy_before);
        Ok(true)
    }

    async fn sync_inner(
        &self,
        options: &SyncOptions,
        counters: &mut Counters,
        full_sync: &mut bool,
    ) -> Result<()> {
        let _running = self.claim()?;
        let (cid, tid) = (self.connector.connector_id().clone(), self.connector.tenant_id().clone());
        let _lock = self.state.lock(&cid, &tid).await?;
        let cancel = {
            let mut guard = self.cancel.lock().expect("poisoned");
            *guard = CancellationToken::new();
            guard.clone()
        };
        self.progress.store(0, Ordering::Relaxed);
        let run_started_at = Utc::now();
        let index_busy_before = self.store.index_busy();

        let mut state =
            self.state.load(&cid, &tid).await?.unwrap_or_else(|| SyncState::new(cid.clone(), tid.clone()));
        let incremental = self.connector.capabilities().incremental;
        state.generation += 1;
        if options.full_sync || !incremental || (state.last_sync_at.is_none() && state.full_sync.is_none()) {
            state.full_sync = Some(FullSyncProgress {
                generation: state.generation,
                started_at: run_started_at,
                cursors: Cursors::new(),
            });
        } else if let Some(full) = &state.full_sync {
            tracing::info!(connector = %cid, tenant = %tid, generation = full.generation, "resuming an interrupted full sync");
        }
        *full_sync = state.full_sync.is_some();
        let generation = state.full_sync.as_ref().map_or(state.generation, |f| f.generation);
        state.status = SyncStatus::Running;
        state.errors.clear();
        self.save_state(&mut state, counters).await?;

        let scope = WriteScope {
            tenant_id: tid.clone(),
            connector_id: cid.clone(),
            generation,
            touch_unchanged: *full_sync,
        };
        let mode = if *full_sync { ReadMode::Full } else { ReadMode::Incremental };
        let total = {
            let request = self.request(options, mode, &state);
            self.connector.estimate_total(&request).await.unwrap_or_else(|e| {
                tracing::debug!(error = %e, "no total estimate");
                None
            })
        };

        let mut attempt = 0u32;
        let result = loop {
            let request = self.request(options, mode, &state);
            match self.run_pass(request, &scope, &mut state, counters, total, &cancel).await {
                Ok(()) => break Ok(()),
                Err(e) if e.kind() == ErrorKind::Cancelled => break Err(e),
                Err(e) if attempt < options.max_retries && e.is_retryable() => {
                    attempt += 1;
                    let wait = match e.retry_class() {
                        RetryClass::After(d) => d,
                        _ => options.retry_delay.saturating_mul(1 << (attempt - 1).min(16)),
                    };
                    tracing::warn!(connector = %cid, attempt, wait_ms = wait.as_millis() as u64, error = %e,
                        "retrying from the last checkpoint");
                    counters.error(format!("attempt {attempt}: {e} (retrying)"));
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = cancel.cancelled() => break Err(Error::cancelled()),
                    }
                }
                Err(e) => break Err(e),
            }
        };

        let finished_at = Utc::now();
        if result.is_ok()
            && let Some(full) = state.full_sync.take()
        {
            let swept = self.store.sweep(&tid, &cid, full.generation).await?;
            counters.deleted += swept;
            state.cursors = full.cursors;
            state.last_full_sync_at = Some(finished_at);
        }
        // A finished sync is searchable. The index runs beside the writes; what it still has
        // to do is waited for here (a failure is the store's: the documents and checkpoints
        // are committed, and the next write retries the indexing).
        let result = match self.store.flush_index().await {
            Ok(()) => result,
            Err(e) => result.and(Err(e)),
        };
        counters.timings.index += self.store.index_busy().saturating_sub(index_busy_before);
        state.status = match &result {
            Ok(()) if counters.failed == 0 => SyncStatus::Success,
            Ok(()) => SyncStatus::Partial,
            Err(e) if e.kind() == ErrorKind::Cancelled => SyncStatus::Cancelled,
            Err(_) => SyncStatus::Failed,
        };
        state.last_sync_at = Some(finished_at);
        let mut errors = counters.errors.clone();
        if let Err(e) = &result {
            errors.push(e.to_string());
        }
        state.errors = errors.clone();
        state.push_history(RunRecord {
            started_at: run_started_at,
            finished_at,
            status: state.status,
            full_sync: *full_sync,
            items_synced: counters.synced,
            items_failed: counters.failed,
            items_deleted: counters.deleted,
            items_unchanged: counters.unchanged,
            errors,
        });
        self.save_state(&mut state, counters).await?;
        result
    }

    fn request(&self, options: &SyncOptions, mode: ReadMode, state: &SyncState) -> ReadRequest {
        ReadRequest {
            mode,
            cursors: state.full_sync.as_ref().map_or_else(|| state.cursors.clone(), |f| f.cursors.clone()),
            batch_size: options.batch_size.max(1),
            batch_bytes: options.batch_bytes.max(1024),
        }
    }

    async fn save_state(&self, state: &mut SyncState, counters: &mut Counters) -> Result<()> {
        let started = Instant::now();
        state.revision += 1;
        let result = self.state.save(state).await;
        counters.timings.state += started.elapsed();
        result
    }

    /// Reads from the connector and writes what it reads until the stream ends, fails or the
    /// sync is cancelled.
    async fn run_pass(
        &self,
        request: ReadRequest,
        scope: &WriteScope,
        state: &mut SyncState,
        counters: &mut Counters,
        total: Option<u64>,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(Result<Batch>, Duration)>(QUEUED_BATCHES);
        // Fewer, larger transactions when the store is the bottleneck: each commit costs an
        // fsync and a search-index flush. Bounded, so memory stays bounded.
        let max_items = request.batch_size.saturating_mul(QUEUED_BATCHES * 2);
        let max_bytes = request.batch_bytes.saturating_mul(QUEUED_BATCHES);
        let connector = &self.connector;
        let reader = async move {
            let mut stream = connector.read(request);
            loop {
                let started = Instant::now();
                let Some(item) = stream.next().await else { break };
                let is_err = item.is_err();
                if tx.send((item, started.elapsed())).await.is_err() || is_err {
                    break;
                }
            }
        };
        let writer = async {
            loop {
                if cancel.is_cancelled() {
                    return Err(Error::cancelled());
                }
                let first = tokio::select! {
                    next = rx.recv() => next,
                    _ = cancel.cancelled() => return Err(Error::cancelled()),
                };
                let Some((first, took)) = first else { return Ok(()) };
                counters.timings.read += took;
                let mut pending = Pending::default();
                let mut failure = None;
                match first {
                    Ok(b) => pending.add(b),
                    Err(e) => failure = Some(e),
                }
                // Coalesce what is already queued into one transaction.
                while failure.is_none() && pending.changes.len() < max_items && pending.bytes < max_bytes {
                    match rx.try_recv() {
                        Ok((Ok(b), took)) => {
                            counters.timings.read += took;
                            pending.add(b)
                        }
                        Ok((Err(e), took)) => {
                            counters.timings.read += took;
                            failure = Some(e)
                        }
                        Err(_) => break,
                    }
                }
                self.commit(pending, scope, state, counters, total).await?;
                if let Some(e) = failure {
                    return Err(e);
                }
            }
        };
        tokio::pin!(reader);
        tokio::pin!(writer);
        let mut reader_done = false;
        loop {
            tokio::select! {
                result = &mut writer => break result,
                _ = &mut reader, if !reader_done => reader_done = true,
            }
        }
    }

    async fn commit(
        &self,
        pending: Pending,
        scope: &WriteScope,
        state: &mut SyncState,
        counters: &mut Counters,
        total: Option<u64>,
    ) -> Result<()> {
        if !pending.changes.is_empty() {
            let applied = self.store.apply(scope, &pending.changes).await?;
            counters.timings.write += applied.write_time;
            counters.timings.index += applied.index_time;
            let callbacks: Vec<ItemFn> = self.on_item.lock().expect("poisoned").clone();
            for (change, outcome) in pending.changes.iter().zip(&applied.outcomes) {
                match outcome {
                    ChangeOutcome::Inserted | ChangeOutcome::Updated => {
                        counters.synced += 1;
                        if let Change::Upsert(doc) = change {
                            for f in &callbacks {
                                f(doc);
                            }
                        }
                    }
                    ChangeOutcome::Unchanged | ChangeOutcome::Superseded => counters.unchanged += 1,
                    ChangeOutcome::Deleted => counters.deleted += 1,
                    ChangeOutcome::DeleteMissing => {}
                }
            }
            state.items_synced +=
                applied.count(ChangeOutcome::Inserted) + applied.count(ChangeOutcome::Updated);
            if let Some(last) = pending.changes.last() {
                state.last_item_id = Some(last.id().to_owned());
            }
        }
        for f in &pending.failures {
            counters.failed += 1;
            counters.error(format!("{}: {}", f.id, f.error));
            tracing::warn!(item = %f.id, error = %f.error, "item failed");
        }
        if pending.checkpoints.is_empty() && pending.changes.is_empty() && pending.failures.is_empty() {
            return Ok(());
        }
        let cursors = match state.full_sync.as_mut() {
            Some(full) => &mut full.cursors,
            None => &mut state.cursors,
        };
        for cp in pending.checkpoints {
            cursors.insert(cp.stream, cp.cursor);
        }
        self.save_state(state, counters).await?;
        let processed = counters.synced + counters.unchanged + counters.deleted + counters.failed;
        self.progress.store(processed, Ordering::Relaxed);
        let callbacks: Vec<ProgressFn> = self.on_progress.lock().expect("poisoned").clone();
        for f in &callbacks {
            f(processed, total);
        }
        Ok(())
    }
}

#[cfg(all(test, feature = "sqlite"))]
#[path = "engine_tests.rs"]
mod tests;
