//! The scheduler: runs each connector's syncs on its [`SyncSchedule`] (the guide's
//! `SyncScheduler`).
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use connector_core::scheduler::{SchedulerOptions, SyncSchedule, SyncScheduler};
//! # async fn demo(github: Arc<connector_core::SyncEngine>, confluence: Arc<connector_core::SyncEngine>) -> connector_core::Result<()> {
//! let scheduler = SyncScheduler::new(SchedulerOptions::default());
//! let hourly = SyncSchedule::every(std::time::Duration::from_secs(3600))?
//!     .with_window("08:00".parse().unwrap(), "20:00".parse().unwrap())?
//!     .with_timezone_name("America/New_York")?;
//! scheduler.add_connector(github.clone(), hourly).await?;
//! scheduler.add_connector(confluence, SyncSchedule::cron("0 2 * * *")?).await?;
//! scheduler.start().await;
//! for run in scheduler.get_history(github.connector().connector_id(), 10).await? {
//!     println!("{}: {} items, {:?}", run.run.started_at, run.run.items_synced, run.run.status);
//! }
//! scheduler.stop().await;
//! # Ok(()) }
//! ```
//!
//! # Behavior
//! - **One run per connector at a time**, and at most
//!   [`max_concurrent`](SchedulerOptions::max_concurrent) runs over all connectors (runs wait
//!   for a slot; their lateness counts the wait).
//! - **Next run.** After a scheduled run, the next one is due at
//!   [`SyncSchedule::next_run`] of the due time it served (fixed rate: lateness does not
//!   accumulate), plus a random jitter of up to [`SyncSchedule::jitter`] (kept inside the
//!   window).
//! - **Missed runs run once.** When that due time has already passed (the run overran, or the
//!   process was down), one catch-up run ([`RunReason::Missed`]) starts at once, or when the
//!   window next opens, however many due times were missed; the schedule continues from it.
//! - **Restarts.** The first due time of a connector comes from its persisted
//!   [`SyncState::last_sync_at`](crate::state::SyncState::last_sync_at): a run that fell due while
//!   the process was down runs once at start. A connector that never synced runs at once
//!   (interval schedules; inside the window) or at its next cron time (cron schedules).
//! - **Windows.** A run only starts inside its window. A run still going at the window's end is
//!   cancelled at its next checkpoint ([`StopCause::WindowEnd`]); the next run resumes from that
//!   checkpoint.
//! - **Triggers** ([`SyncScheduler::trigger`]: webhooks, NOTIFY) run at once, also outside
//!   the window. A trigger while a run is going queues exactly one follow-up run, however many
//!   triggers arrive; a scheduled run that fell due meanwhile is that follow-up.
//! - **Item hints** ([`SyncScheduler::trigger_items`]) are queued per connector and merged
//!   (duplicates dropped). When the connector is idle they run at once as one
//!   [`RunReason::Items`] run: [`SyncEngine::sync_items`], or an incremental sync when the
//!   engine cannot serve them that way. Items arriving during any run are served right after
//!   it, in one follow-up run however many arrive (before a scheduled run that fell due
//!   meanwhile, and before a queued trigger).
//! - **Triggers only.** [`SyncScheduler::add_triggered_only`] adds a connector without a
//!   schedule: only triggers and item hints run it.
//! - **Gate** ([`SchedulerOptions::gate`], leases of several processes): a scheduled or
//!   catch-up run of a connector the gate refuses is skipped, and its next time computed as
//!   usual. Before a gated run starts, the connector's state is read again: when another
//!   process ran it since this scheduler last looked (the newest run in
//!   [`SyncState::history`](crate::state::SyncState::history) is not one this scheduler saw),
//!   the schedule continues from that run's end, as after a restart; the run is skipped when
//!   that makes it not due yet. So a connector changing hands is not run twice for one due
//!   time. Triggers and item hints are not gated (the caller checks its lease).
//! - **Stop** ([`SyncScheduler::stop`]) launches nothing more, cancels running syncs at their
//!   next checkpoint and waits for them.
//! - **Cost.** One timer task for all connectors, waiting on a min-heap of due times; a run is a
//!   task only while it runs. 10,000 connectors on 1-second intervals: see
//!   `docs/benchmarks.md`.
//! - **History** ([`SyncScheduler::get_history`]) is the engine's persisted run records.
//! - **Events**: [`SyncScheduler::subscribe`] (a broadcast channel) and
//!   [`SyncScheduler::on_event`] (a callback) see every run start and finish.

mod clock;
mod schedule;
#[cfg(all(test, feature = "sqlite"))]
mod tests;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use futures::future::BoxFuture;
use rand::Rng;
use serde::Serialize;
use tokio::runtime::Handle;
use tokio::sync::{Notify, Semaphore, broadcast};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use chrono_tz::Tz;
pub use clock::{Clock, ManualClock, SystemClock};
pub use schedule::{ScheduleConfig, SyncSchedule};

use crate::engine::{SyncEngine, SyncOptions, SyncResult};
use crate::error::{Error, ErrorKind, Result};
use crate::ids::{ConnectorId, TenantId};
use crate::realtime::ItemRef;
use crate::state::RunRecord;

/// Decides whether this process may run a connector's scheduled runs now
/// ([`SchedulerOptions::gate`]): `connectors run` asks its lease manager.
pub type Gate = Arc<dyn Fn(&ConnectorId, &TenantId) -> bool + Send + Sync>;

/// Options of a [`SyncScheduler`].
#[derive(Clone)]
pub struct SchedulerOptions {
    /// The most syncs running at once, over all connectors (at least 1). Default 4.
    pub max_concurrent: usize,
    /// The options of every scheduled sync.
    pub sync_options: SyncOptions,
    /// Where time comes from: [`SystemClock`], or a [`ManualClock`] in tests.
    pub clock: Arc<dyn Clock>,
    /// Events a slow [`subscribe`](SyncScheduler::subscribe)r may fall behind before it misses
    /// some (it then gets `RecvError::Lagged`). Default 1024.
    pub event_capacity: usize,
    /// When set, scheduled and catch-up runs of a connector run only while it answers true
    /// (see the [module docs](self)); triggers and item hints are not gated. Default `None`.
    pub gate: Option<Gate>,
}

impl std::fmt::Debug for SchedulerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedulerOptions")
            .field("max_concurrent", &self.max_concurrent)
            .field("sync_options", &self.sync_options)
            .field("clock", &self.clock)
            .field("event_capacity", &self.event_capacity)
            .field("gate", &self.gate.is_some())
            .finish()
    }
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        Self {
            max_concurrent: 4,
            sync_options: SyncOptions::default(),
            clock: Arc::new(SystemClock),
            event_capacity: 1024,
            gate: None,
        }
    }
}

/// Why a run ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunReason {
    /// Its due time came.
    Scheduled,
    /// A catch-up for one or more due times that passed without a run (the previous run
    /// overran, or the process was down).
    Missed,
    /// [`SyncScheduler::trigger`].
    Triggered,
    /// [`SyncScheduler::trigger_items`]: named items changed (webhooks, NOTIFY).
    Items,
}

/// What stopped a run before it completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopCause {
    /// Its window ended; the next window resumes from the checkpoint.
    WindowEnd,
    /// [`SyncScheduler::stop`] (or the scheduler was dropped).
    SchedulerStopped,
    /// [`SyncScheduler::remove_connector`].
    Removed,
}

/// A run, as announced when it starts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunInfo {
    /// The connector.
    pub connector_id: ConnectorId,
    /// Its tenant.
    pub tenant_id: TenantId,
    /// Why it runs.
    pub reason: RunReason,
    /// The schedule's time this run serves: its due time without jitter; for
    /// [`RunReason::Missed`], the first due time missed; for a trigger or item hints, when it
    /// was triggered (or when the run it waited for ended).
    pub scheduled_at: DateTime<Utc>,
    /// When the scheduler meant to start it: `scheduled_at` plus jitter; for a catch-up run,
    /// when the miss was noticed (or the window's opening) plus jitter.
    pub due_at: DateTime<Utc>,
    /// When it started (after waiting for a concurrency slot).
    pub started_at: DateTime<Utc>,
}

impl RunInfo {
    /// How late it started: `started_at - due_at` (zero when early, which does not happen).
    pub fn lateness(&self) -> Duration {
        (self.started_at - self.due_at).to_std().unwrap_or(Duration::ZERO)
    }
}

/// A run, as announced when it ends.
#[derive(Debug, Clone)]
pub struct RunFinished {
    /// The run.
    pub run: RunInfo,
    /// When it ended.
    pub finished_at: DateTime<Utc>,
    /// What the sync did.
    pub result: Arc<SyncResult>,
    /// What cancelled it, when it ended cancelled.
    pub stopped_by: Option<StopCause>,
}

/// What [`SyncScheduler::subscribe`] and [`SyncScheduler::on_event`] see.
#[derive(Debug, Clone)]
pub enum SchedulerEvent {
    /// A run started.
    Started(RunInfo),
    /// A run ended (completed, failed or cancelled).
    Finished(RunFinished),
}

impl SchedulerEvent {
    /// The run the event is about.
    pub fn run(&self) -> &RunInfo {
        match self {
            SchedulerEvent::Started(run) => run,
            SchedulerEvent::Finished(finished) => &finished.run,
        }
    }
}

/// One past run of a connector ([`SyncScheduler::get_history`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistoryEntry {
    /// The connector.
    pub connector_id: ConnectorId,
    /// Its tenant.
    pub tenant_id: TenantId,
    /// The run, as the engine recorded it.
    #[serde(flatten)]
    pub run: RunRecord,
}

/// Where a scheduled connector stands ([`SyncScheduler::connectors`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConnectorStatus {
    /// The connector.
    pub connector_id: ConnectorId,
    /// Its tenant.
    pub tenant_id: TenantId,
    /// The schedule, as text (`every 1h between 08:00 and 20:00 America/New_York`).
    pub schedule: String,
    /// When its next scheduled run is due (with jitter); `None` while the scheduler is stopped
    /// or when the schedule has no next run.
    pub next_run: Option<DateTime<Utc>>,
    /// Why that run will run.
    pub next_reason: Option<RunReason>,
    /// Whether a run is going (or waiting for a concurrency slot).
    pub running: bool,
    /// Whether a trigger arrived during the current run (a follow-up run is queued).
    pub trigger_pending: bool,
    /// Items queued by [`SyncScheduler::trigger_items`] for the next item run.
    pub items_pending: usize,
    /// When its last sync ended (from the state store, then from this scheduler's runs).
    pub last_sync_at: Option<DateTime<Utc>>,
}

/// What [`SyncScheduler::trigger`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TriggerOutcome {
    /// A run started (or is waiting for a concurrency slot).
    Started,
    /// A run is going; one follow-up run will run after it.
    Queued,
    /// A run is going and a follow-up was already queued; this trigger joined it.
    Coalesced,
}

impl TriggerOutcome {
    /// The outcome's name (`started`, `queued`, `coalesced`), for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            TriggerOutcome::Started => "started",
            TriggerOutcome::Queued => "queued",
            TriggerOutcome::Coalesced => "coalesced",
        }
    }
}

type Key = (ConnectorId, TenantId);
type Observer = Arc<dyn Fn(&SchedulerEvent) + Send + Sync>;

/// Runs syncs of many connectors on their schedules. See the [module docs](self).
pub struct SyncScheduler {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SyncScheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.shared.lock();
        f.debug_struct("SyncScheduler")
            .field("connectors", &inner.index.len())
            .field("started", &inner.started)
            .field("clock", &self.shared.clock)
            .finish()
    }
}

struct Shared {
    inner: Mutex<Inner>,
    clock: Arc<dyn Clock>,
    semaphore: Arc<Semaphore>,
    sync_options: SyncOptions,
    events: broadcast::Sender<SchedulerEvent>,
    observers: RwLock<Vec<Observer>>,
    /// Wakes the timer: a due time earlier than the one it sleeps until was queued.
    wake: Notify,
    tracker: TaskTracker,
    next_id: AtomicU64,
    gate: Option<Gate>,
}

#[derive(Default)]
struct Inner {
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    index: HashMap<Key, usize>,
    /// (due, slot, generation): an entry is live while its slot's `heap_gen` matches.
    heap: BinaryHeap<Reverse<(DateTime<Utc>, usize, u64)>>,
    started: bool,
    stop: CancellationToken,
    /// What the timer sleeps until (`None`: nothing queued).
    timer_deadline: Option<DateTime<Utc>>,
    runtime: Option<Handle>,
    timer: Option<JoinHandle<()>>,
}

impl Inner {
    /// The slot a trigger of (connector, tenant) goes to, or why there is none.
    fn trigger_target(&self, connector_id: &ConnectorId, tenant: &TenantId) -> Result<usize> {
        if !self.started {
            return Err(Error::config(format!(
                "cannot trigger {connector_id} for tenant {tenant}: the scheduler is not started"
            )));
        }
        self.index.get(&(connector_id.clone(), tenant.clone())).copied().ok_or_else(|| {
            Error::not_found(format!("connector {connector_id} for tenant {tenant} is not scheduled"))
        })
    }
}

struct Slot {
    /// Unique over the scheduler's life (a slot index is reused after a removal).
    id: u64,
    key: Key,
    engine: Arc<SyncEngine>,
    schedule: Arc<SyncSchedule>,
    last_sync_at: Option<DateTime<Utc>>,
    /// The due time the last scheduled run served; the schedule continues from it.
    last_tick: Option<DateTime<Utc>>,
    planned: Option<Planned>,
    heap_gen: u64,
    running: Option<Running>,
    trigger_pending: bool,
    /// Items of [`SyncScheduler::trigger_items`] waiting for the next item run.
    pending_items: std::collections::BTreeSet<ItemRef>,
    /// With a gate: when the newest run in the state store that this scheduler knows of (its
    /// own, or one it saw) started; a newer one was run by another process.
    seen_run: Option<DateTime<Utc>>,
    /// Added by [`SyncScheduler::add_triggered_only`]: never planned.
    triggers_only: bool,
}

impl Slot {
    fn status(&self) -> ConnectorStatus {
        ConnectorStatus {
            connector_id: self.key.0.clone(),
            tenant_id: self.key.1.clone(),
            schedule: if self.triggers_only { "triggers only".into() } else { self.schedule.to_string() },
            next_run: self.planned.map(|p| p.due_at),
            next_reason: self.planned.map(|p| p.reason),
            running: self.running.is_some(),
            trigger_pending: self.trigger_pending,
            items_pending: self.pending_items.len(),
            last_sync_at: self.last_sync_at,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Planned {
    reason: RunReason,
    scheduled_at: DateTime<Utc>,
    due_at: DateTime<Utc>,
    /// Where the schedule continues from after this run.
    anchor: DateTime<Utc>,
}

struct Running {
    cancel: CancellationToken,
    cause: Arc<OnceLock<StopCause>>,
    done: CancellationToken,
}

/// A run handed from the scheduler's state to its task.
struct Launch {
    slot: usize,
    slot_id: u64,
    key: Key,
    engine: Arc<SyncEngine>,
    schedule: Arc<SyncSchedule>,
    reason: RunReason,
    scheduled_at: DateTime<Utc>,
    due_at: DateTime<Utc>,
    /// `Some` for scheduled and catch-up runs: where the schedule continues from.
    anchor: Option<DateTime<Utc>>,
    /// The items of a [`RunReason::Items`] run.
    items: Vec<ItemRef>,
    /// The slot's `seen_run` when the run was launched.
    seen_run: Option<DateTime<Utc>>,
    cancel: CancellationToken,
    cause: Arc<OnceLock<StopCause>>,
    done: CancellationToken,
}

impl SyncScheduler {
    /// A scheduler with no connectors, not started.
    pub fn new(options: SchedulerOptions) -> Self {
        let (events, _) = broadcast::channel(options.event_capacity.max(1));
        Self {
            shared: Arc::new(Shared {
                inner: Mutex::new(Inner::default()),
                clock: options.clock,
                semaphore: Arc::new(Semaphore::new(options.max_concurrent.max(1))),
                sync_options: options.sync_options,
                events,
                observers: RwLock::default(),
                wake: Notify::new(),
                tracker: TaskTracker::new(),
                next_id: AtomicU64::new(1),
                gate: options.gate,
            }),
        }
    }

    /// Schedules `engine`'s connector. Reads its state to learn when it last synced; when the
    /// scheduler is started, the connector is planned at once.
    ///
    /// # Errors
    /// The (connector, tenant) is already scheduled; its state cannot be read.
    pub async fn add_connector(&self, engine: Arc<SyncEngine>, schedule: SyncSchedule) -> Result<()> {
        self.add(engine, Some(schedule)).await
    }

    /// Adds `engine`'s connector without a schedule: it runs only on
    /// [`trigger`](Self::trigger) and [`trigger_items`](Self::trigger_items) (`connectors run`
    /// for a connector without a `schedule` table). Its status shows the schedule
    /// `triggers only` and no next run.
    ///
    /// # Errors
    /// The (connector, tenant) is already added; its state cannot be read.
    pub async fn add_triggered_only(&self, engine: Arc<SyncEngine>) -> Result<()> {
        self.add(engine, None).await
    }

    async fn add(&self, engine: Arc<SyncEngine>, schedule: Option<SyncSchedule>) -> Result<()> {
        let triggers_only = schedule.is_none();
        // Never planned; the value only answers the window questions (no window).
        let schedule = match schedule {
            Some(s) => s,
            None => SyncSchedule::every(Duration::from_secs(365 * 24 * 3600))?,
        };
        let key: Key = (engine.connector().connector_id().clone(), engine.connector().tenant_id().clone());
        let already =
            || Error::config(format!("connector {} for tenant {} is already scheduled", key.0, key.1));
        if self.shared.lock().index.contains_key(&key) {
            return Err(already());
        }
        let last_sync_at = engine.state_store().load(&key.0, &key.1).await?.and_then(|s| s.last_sync_at);
        let wake = {
            let mut inner = self.shared.lock();
            if inner.index.contains_key(&key) {
                return Err(already());
            }
            let idx = match inner.free.pop() {
                Some(i) => i,
                None => {
                    inner.slots.push(None);
                    inner.slots.len() - 1
                }
            };
            let mut slot = Slot {
                id: self.shared.next_id(),
                key: key.clone(),
                engine,
                schedule: Arc::new(schedule),
                last_sync_at,
                last_tick: None,
                planned: None,
                heap_gen: 0,
                running: None,
                trigger_pending: false,
                pending_items: Default::default(),
                // Nothing seen yet: with a gate, the first run checks the state's newest run
                // (another process may run the connector meanwhile).
                seen_run: None,
                triggers_only,
            };
            let started = inner.started;
            if started {
                slot.planned = plan_initial(&slot, self.shared.clock.now());
            }
            inner.slots[idx] = Some(slot);
            inner.index.insert(key, idx);
            started && self.shared.queue(&mut inner, idx)
        };
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(())
    }

    /// Unschedules a connector. A run going is cancelled at its next checkpoint, and this waits
    /// for it to end. Returns whether the connector was scheduled.
    pub async fn remove_connector(&self, connector_id: &ConnectorId, tenant: &TenantId) -> bool {
        let done = {
            let mut inner = self.shared.lock();
            let Some(idx) = inner.index.remove(&(connector_id.clone(), tenant.clone())) else {
                return false;
            };
            let slot = inner.slots[idx].take();
            inner.free.push(idx);
            slot.and_then(|s| s.running).map(|running| {
                let _ = running.cause.set(StopCause::Removed);
                running.cancel.cancel();
                running.done
            })
        };
        if let Some(done) = done {
            done.cancelled().await;
        }
        true
    }

    /// Starts scheduling (a no-op when started): plans every connector from its last sync and
    /// starts the timer task on the current tokio runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub async fn start(&self) {
        let handle = Handle::current();
        let mut inner = self.shared.lock();
        if inner.started {
            return;
        }
        inner.started = true;
        inner.stop = CancellationToken::new();
        inner.runtime = Some(handle.clone());
        inner.heap.clear();
        inner.timer_deadline = None;
        let now = self.shared.clock.now();
        for idx in 0..inner.slots.len() {
            if let Some(slot) = inner.slots[idx].as_mut() {
                slot.trigger_pending = false;
                slot.planned = plan_initial(slot, now);
            }
            self.shared.queue(&mut inner, idx);
        }
        let stop = inner.stop.clone();
        inner.timer = Some(handle.spawn(timer_loop(Arc::clone(&self.shared), stop)));
    }

    /// Stops scheduling: launches nothing more, cancels running syncs at their next checkpoint
    /// (their state keeps the checkpoint; the next run resumes from it) and waits for them to
    /// end. [`start`](Self::start) again to resume.
    pub async fn stop(&self) {
        let timer = {
            let mut inner = self.shared.lock();
            if !inner.started {
                return;
            }
            inner.started = false;
            for slot in inner.slots.iter_mut().flatten() {
                slot.planned = None;
                slot.trigger_pending = false;
                slot.pending_items.clear();
                if let Some(running) = &slot.running {
                    let _ = running.cause.set(StopCause::SchedulerStopped);
                }
            }
            inner.heap.clear();
            inner.timer_deadline = None;
            inner.stop.cancel();
            inner.timer.take()
        };
        if let Some(timer) = timer {
            let _ = timer.await;
        }
        self.shared.tracker.close();
        self.shared.tracker.wait().await;
        self.shared.tracker.reopen();
    }

    /// Whether the scheduler is started.
    pub fn is_started(&self) -> bool {
        self.shared.lock().started
    }

    /// Runs a connector now (webhooks, NOTIFY), even outside its window. While a run is going,
    /// queues one follow-up run instead; further triggers join that follow-up.
    ///
    /// # Errors
    /// The scheduler is not started; the connector is not scheduled.
    pub fn trigger(&self, connector_id: &ConnectorId, tenant: &TenantId) -> Result<TriggerOutcome> {
        let (launch, runtime) = {
            let mut inner = self.shared.lock();
            let idx = inner.trigger_target(connector_id, tenant)?;
            let stop = inner.stop.clone();
            let now = self.shared.clock.now();
            let slot = inner.slots[idx].as_mut().expect("indexed slots exist");
            if slot.running.is_some() {
                if slot.trigger_pending {
                    return Ok(TriggerOutcome::Coalesced);
                }
                slot.trigger_pending = true;
                return Ok(TriggerOutcome::Queued);
            }
            let launch = launch_run(slot, idx, RunReason::Triggered, now, now, None, &stop);
            (launch, inner.runtime.clone())
        };
        self.shared.spawn_all(vec![launch], runtime);
        Ok(TriggerOutcome::Started)
    }

    /// Brings `items` of a connector up to date (webhooks, NOTIFY), even outside its window.
    /// The items join the connector's queue (duplicates merge). When the connector is idle, a
    /// [`RunReason::Items`] run starts at once with everything queued: it runs
    /// [`SyncEngine::sync_items`], or an incremental sync when that returns `None`. While a
    /// run is going, the items wait for it and are served right after it, in one run.
    ///
    /// Returns [`TriggerOutcome::Started`] when a run started, [`TriggerOutcome::Queued`] when
    /// the items started a queue behind a running sync, [`TriggerOutcome::Coalesced`] when they
    /// joined items already queued (or `items` is empty: nothing to do).
    ///
    /// # Errors
    /// The scheduler is not started; the connector is not scheduled.
    pub fn trigger_items(
        &self,
        connector_id: &ConnectorId,
        tenant: &TenantId,
        items: Vec<ItemRef>,
    ) -> Result<TriggerOutcome> {
        let (launch, runtime) = {
            let mut inner = self.shared.lock();
            let idx = inner.trigger_target(connector_id, tenant)?;
            if items.is_empty() {
                return Ok(TriggerOutcome::Coalesced);
            }
            let stop = inner.stop.clone();
            let now = self.shared.clock.now();
            let slot = inner.slots[idx].as_mut().expect("indexed slots exist");
            let was_empty = slot.pending_items.is_empty();
            slot.pending_items.extend(items);
            if slot.running.is_some() {
                return Ok(if was_empty { TriggerOutcome::Queued } else { TriggerOutcome::Coalesced });
            }
            let launch = launch_items(slot, idx, now, &stop);
            (launch, inner.runtime.clone())
        };
        self.shared.spawn_all(vec![launch], runtime);
        Ok(TriggerOutcome::Started)
    }

    /// The last `limit` runs of `connector_id` (all its tenants), newest first, from the state
    /// store (the engine's run records; they survive restarts).
    ///
    /// # Errors
    /// The connector is not scheduled; its state cannot be read.
    pub async fn get_history(&self, connector_id: &ConnectorId, limit: usize) -> Result<Vec<HistoryEntry>> {
        let engines: Vec<(TenantId, Arc<SyncEngine>)> = {
            let inner = self.shared.lock();
            inner
                .slots
                .iter()
                .flatten()
                .filter(|s| &s.key.0 == connector_id)
                .map(|s| (s.key.1.clone(), Arc::clone(&s.engine)))
                .collect()
        };
        if engines.is_empty() {
            return Err(Error::not_found(format!("connector {connector_id} is not scheduled")));
        }
        let mut entries = Vec::new();
        for (tenant, engine) in engines {
            let Some(state) = engine.state_store().load(connector_id, &tenant).await? else { continue };
            entries.extend(state.history.into_iter().map(|run| HistoryEntry {
                connector_id: connector_id.clone(),
                tenant_id: tenant.clone(),
                run,
            }));
        }
        entries.sort_by_key(|e| Reverse(e.run.started_at));
        entries.truncate(limit);
        Ok(entries)
    }

    /// Every scheduled connector, in no particular order.
    pub fn connectors(&self) -> Vec<ConnectorStatus> {
        self.shared.lock().slots.iter().flatten().map(Slot::status).collect()
    }

    /// The status of one connector, when it is scheduled.
    pub fn connector(&self, connector_id: &ConnectorId, tenant: &TenantId) -> Option<ConnectorStatus> {
        let inner = self.shared.lock();
        let idx = *inner.index.get(&(connector_id.clone(), tenant.clone()))?;
        inner.slots[idx].as_ref().map(Slot::status)
    }

    /// A receiver of every run start and finish from now on (a broadcast channel of
    /// [`event_capacity`](SchedulerOptions::event_capacity)).
    pub fn subscribe(&self) -> broadcast::Receiver<SchedulerEvent> {
        self.shared.events.subscribe()
    }

    /// Calls `f` on every run start and finish, on the run's task: keep it quick, and do not
    /// call `on_event` from it.
    pub fn on_event(&self, f: impl Fn(&SchedulerEvent) + Send + Sync + 'static) {
        self.shared.observers.write().expect("poisoned").push(Arc::new(f));
    }
}

impl Drop for SyncScheduler {
    /// Stops the timer and cancels running syncs at their next checkpoint, without waiting
    /// (use [`stop`](Self::stop) to wait).
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        inner.started = false;
        inner.stop.cancel();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("poisoned")
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Puts slot `idx`'s planned run in the heap; returns whether the timer must wake (it is
    /// due before what the timer sleeps until).
    fn queue(&self, inner: &mut Inner, idx: usize) -> bool {
        let generation = self.next_id();
        let Some(slot) = inner.slots[idx].as_mut() else { return false };
        let Some(planned) = slot.planned else { return false };
        slot.heap_gen = generation;
        inner.heap.push(Reverse((planned.due_at, idx, generation)));
        inner.timer_deadline.is_none_or(|d| planned.due_at < d)
    }

    fn spawn_all(self: &Arc<Self>, launches: Vec<Launch>, runtime: Option<Handle>) {
        if launches.is_empty() {
            return;
        }
        let runtime = runtime.unwrap_or_else(Handle::current);
        for launch in launches {
            self.tracker.spawn_on(run_task(Arc::clone(self), launch), &runtime);
        }
    }

    fn emit(&self, event: SchedulerEvent) {
        {
            let observers = self.observers.read().expect("poisoned");
            for f in observers.iter() {
                f(&event);
            }
        }
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(event);
        }
    }

    /// Runs the sync until it ends, cancelling it at its next checkpoint when the scheduler
    /// stops, the connector is removed or the window ends.
    async fn sync_until(
        &self,
        launch: &Launch,
        window_end: Option<DateTime<Utc>>,
    ) -> (SyncResult, Option<StopCause>) {
        let engine = &launch.engine;
        let sync = engine.sync(self.sync_options.clone());
        tokio::pin!(sync);
        let window: BoxFuture<'static, ()> = match window_end {
            Some(end) => self.clock.sleep_until(end),
            None => Box::pin(std::future::pending()),
        };
        let cause = tokio::select! {
            biased;
            result = &mut sync => return (result, None),
            _ = launch.cancel.cancelled() => launch.cause.get().copied().unwrap_or(StopCause::SchedulerStopped),
            _ = window => StopCause::WindowEnd,
        };
        tracing::info!(connector = %launch.key.0, tenant = %launch.key.1, cause = ?cause,
            "stopping the sync at its next checkpoint");
        // The engine installs a fresh cancellation token when a sync starts, so a cancel that
        // comes before that is lost: repeat it until the sync returns.
        let mut every = Duration::from_millis(5);
        loop {
            engine.cancel_sync();
            tokio::select! {
                biased;
                result = &mut sync => {
                    let cancelled = result.error_kind == Some(ErrorKind::Cancelled);
                    return (result, cancelled.then_some(cause));
                }
                _ = tokio::time::sleep(every) => every = (every * 2).min(Duration::from_secs(1)),
            }
        }
    }

    /// Records the end of `launch` and plans what comes next. Returns the runs to start now,
    /// the runtime, and whether the timer must wake.
    fn run_ended(&self, launch: &Launch, ended: Ended) -> (Vec<Launch>, Option<Handle>, bool) {
        let Ended { finished_at, seen_run, foreign_end } = ended;
        let mut inner = self.lock();
        let now = self.clock.now();
        let started = inner.started;
        let stop = inner.stop.clone();
        let runtime = inner.runtime.clone();
        let mut launches = Vec::new();
        let mut requeue = false;
        {
            let Some(slot) = inner.slots.get_mut(launch.slot).and_then(Option::as_mut) else {
                return (launches, runtime, false);
            };
            if slot.id != launch.slot_id {
                return (launches, runtime, false);
            }
            slot.running = None;
            if finished_at.is_some() {
                slot.last_sync_at = finished_at;
            }
            if seen_run.is_some() {
                slot.seen_run = seen_run;
            }
            if !started {
                return (launches, runtime, false);
            }
            if let Some(end) = foreign_end {
                // Another process ran it: continue from that run, as after a restart.
                slot.last_sync_at = Some(end);
                slot.last_tick = None;
                slot.planned = plan_after(&slot.schedule, end, now);
                requeue = true;
            } else if let Some(anchor) = launch.anchor {
                slot.last_tick = Some(anchor);
                slot.planned = plan_after(&slot.schedule, anchor, now);
                requeue = true;
            }
            match slot.planned {
                // Item hints first: they are quick, and waited for this run. A scheduled run
                // that fell due stays planned and starts when they are done.
                _ if !slot.pending_items.is_empty() => {
                    launches.push(launch_items(slot, launch.slot, now, &stop));
                }
                // Due already (missed, or it fell due during a triggered run): it runs now, and
                // it is also the follow-up of a pending trigger.
                Some(p) if p.due_at <= now => {
                    slot.planned = None;
                    slot.trigger_pending = false;
                    requeue = false;
                    launches.push(launch_run(
                        slot,
                        launch.slot,
                        p.reason,
                        p.scheduled_at,
                        p.due_at,
                        Some(p.anchor),
                        &stop,
                    ));
                }
                _ if slot.trigger_pending => {
                    slot.trigger_pending = false;
                    launches.push(launch_run(slot, launch.slot, RunReason::Triggered, now, now, None, &stop));
                }
                _ => {}
            }
        }
        let wake = requeue && self.queue(&mut inner, launch.slot);
        (launches, runtime, wake)
    }
}

/// Marks `slot` running and describes the run for its task.
fn launch_run(
    slot: &mut Slot,
    idx: usize,
    reason: RunReason,
    scheduled_at: DateTime<Utc>,
    due_at: DateTime<Utc>,
    anchor: Option<DateTime<Utc>>,
    stop: &CancellationToken,
) -> Launch {
    let cancel = stop.child_token();
    let cause = Arc::new(OnceLock::new());
    let done = CancellationToken::new();
    slot.running = Some(Running { cancel: cancel.clone(), cause: Arc::clone(&cause), done: done.clone() });
    Launch {
        slot: idx,
        slot_id: slot.id,
        key: slot.key.clone(),
        engine: Arc::clone(&slot.engine),
        schedule: Arc::clone(&slot.schedule),
        reason,
        scheduled_at,
        due_at,
        anchor,
        items: Vec::new(),
        seen_run: slot.seen_run,
        cancel,
        cause,
        done,
    }
}

/// Marks `slot` running an item run with everything it has queued.
fn launch_items(slot: &mut Slot, idx: usize, now: DateTime<Utc>, stop: &CancellationToken) -> Launch {
    let items: Vec<ItemRef> = std::mem::take(&mut slot.pending_items).into_iter().collect();
    let mut launch = launch_run(slot, idx, RunReason::Items, now, now, None, stop);
    launch.items = items;
    launch
}

/// When the newest run recorded in `state` started.
fn newest_run(state: &crate::state::SyncState) -> Option<DateTime<Utc>> {
    state.history.iter().map(|r| r.started_at).max()
}

/// How a run ended, for [`Shared::run_ended`].
#[derive(Debug, Default)]
struct Ended {
    /// When a sync ran: when it ended.
    finished_at: Option<DateTime<Utc>>,
    /// The newest run in the state store after it (gated schedulers).
    seen_run: Option<DateTime<Utc>>,
    /// The run was skipped because another process ran the connector, which ended then.
    foreign_end: Option<DateTime<Utc>>,
}

/// What a gated scheduled run does.
enum GateCheck {
    Run,
    /// Skipped: the gate refused it.
    Refused,
    /// Skipped: another process ran the connector recently (the run it saw, and its end).
    RanElsewhere {
        started_at: DateTime<Utc>,
        finished_at: DateTime<Utc>,
    },
    /// Run, having seen another process's older run (when it started).
    RunAfterForeign {
        started_at: DateTime<Utc>,
    },
}

/// The gate, and the state store's view of who ran the connector, before a scheduled run.
async fn gate_check(shared: &Shared, gate: &Gate, launch: &Launch) -> GateCheck {
    if !gate(&launch.key.0, &launch.key.1) {
        return GateCheck::Refused;
    }
    let state = match launch.engine.state_store().load(&launch.key.0, &launch.key.1).await {
        Ok(state) => state,
        Err(e) => {
            tracing::warn!(connector = %launch.key.0, tenant = %launch.key.1, error = %e,
                "cannot read the state before a scheduled run; running it");
            return GateCheck::Run;
        }
    };
    let Some(state) = state else { return GateCheck::Run };
    let Some(newest) = newest_run(&state) else { return GateCheck::Run };
    if launch.seen_run.is_some_and(|seen| seen >= newest) {
        return GateCheck::Run;
    }
    let finished_at = state
        .history
        .iter()
        .filter(|r| r.started_at == newest)
        .map(|r| r.finished_at)
        .max()
        .into_iter()
        .chain(state.last_sync_at)
        .max()
        .unwrap_or(newest);
    let now = shared.clock.now();
    match plan_after(&launch.schedule, finished_at, now) {
        Some(next) if next.reason == RunReason::Scheduled && next.scheduled_at > now => {
            GateCheck::RanElsewhere { started_at: newest, finished_at }
        }
        _ => GateCheck::RunAfterForeign { started_at: newest },
    }
}

/// `at` plus a random delay of up to the schedule's jitter, kept inside the window.
fn jittered(schedule: &SyncSchedule, at: DateTime<Utc>) -> DateTime<Utc> {
    let Ok(mut max) = TimeDelta::from_std(schedule.jitter()) else { return at };
    if let Some(end) = schedule.window_end(at) {
        max = max.min(end - at - TimeDelta::milliseconds(1));
    }
    let max = max.num_microseconds().unwrap_or(i64::MAX);
    if max <= 0 {
        return at;
    }
    at + TimeDelta::microseconds(rand::rng().random_range(0..=max))
}

/// The run after one that served `anchor`: its next due time, or a catch-up run now (or at
/// the window's opening) when that has passed already.
fn plan_after(schedule: &SyncSchedule, anchor: DateTime<Utc>, now: DateTime<Utc>) -> Option<Planned> {
    let next = schedule.next_run(anchor)?;
    if next > now {
        return Some(Planned {
            reason: RunReason::Scheduled,
            scheduled_at: next,
            due_at: jittered(schedule, next),
            anchor: next,
        });
    }
    let release = schedule.next_allowed(now)?;
    Some(Planned {
        reason: RunReason::Missed,
        scheduled_at: next,
        due_at: jittered(schedule, release),
        anchor: release,
    })
}

/// The first run of a connector when the scheduler starts.
fn plan_initial(slot: &Slot, now: DateTime<Utc>) -> Option<Planned> {
    if slot.triggers_only {
        return None;
    }
    let schedule = &slot.schedule;
    if let Some(last) = slot.last_tick.or(slot.last_sync_at) {
        return plan_after(schedule, last, now);
    }
    // Never synced: an interval schedule runs at once (or when the window opens); a cron
    // schedule keeps to its times.
    let first = if schedule.cron_expression().is_some() {
        schedule.next_run(now)?
    } else {
        schedule.next_allowed(now)?
    };
    Some(Planned {
        reason: RunReason::Scheduled,
        scheduled_at: first,
        due_at: jittered(schedule, first),
        anchor: first,
    })
}

/// The one timer task: starts what is due, then sleeps until the earliest due time or a wake.
async fn timer_loop(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let (launches, runtime, deadline) = {
            let mut inner = shared.lock();
            if stop.is_cancelled() {
                return;
            }
            let now = shared.clock.now();
            let mut launches = Vec::new();
            while let Some(&Reverse((due, idx, generation))) = inner.heap.peek() {
                if due > now {
                    break;
                }
                inner.heap.pop();
                let stop = inner.stop.clone();
                let Some(slot) = inner.slots.get_mut(idx).and_then(Option::as_mut) else { continue };
                // A stale entry, or a triggered run is going: the planned run stays, and
                // starts when that run ends.
                if slot.heap_gen != generation || slot.running.is_some() {
                    continue;
                }
                let Some(p) = slot.planned.take() else { continue };
                slot.trigger_pending = false;
                launches.push(launch_run(
                    slot,
                    idx,
                    p.reason,
                    p.scheduled_at,
                    p.due_at,
                    Some(p.anchor),
                    &stop,
                ));
            }
            let deadline = inner.heap.peek().map(|Reverse((due, _, _))| *due);
            inner.timer_deadline = deadline;
            (launches, inner.runtime.clone(), deadline)
        };
        shared.spawn_all(launches, runtime);
        let sleep: BoxFuture<'static, ()> = match deadline {
            Some(deadline) => shared.clock.sleep_until(deadline),
            None => Box::pin(std::future::pending()),
        };
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = shared.wake.notified() => {}
            _ = sleep => {}
        }
    }
}

/// One run: waits for a concurrency slot, syncs, then plans the connector's next run.
async fn run_task(shared: Arc<Shared>, launch: Launch) {
    let mut ended = Ended::default();
    if let Some(gate) = &shared.gate
        && launch.anchor.is_some()
    {
        match gate_check(&shared, gate, &launch).await {
            GateCheck::Run => {}
            GateCheck::Refused => {
                tracing::debug!(connector = %launch.key.0, tenant = %launch.key.1,
                    "scheduled run skipped: the gate refused it (another process holds the lease)");
                return finish(&shared, &launch, ended, None);
            }
            GateCheck::RanElsewhere { started_at, finished_at } => {
                tracing::debug!(connector = %launch.key.0, tenant = %launch.key.1, %started_at,
                    "scheduled run skipped: another process already ran it");
                ended.seen_run = Some(started_at);
                ended.foreign_end = Some(finished_at);
                return finish(&shared, &launch, ended, None);
            }
            GateCheck::RunAfterForeign { started_at } => ended.seen_run = Some(started_at),
        }
    }
    let permit = tokio::select! {
        biased;
        _ = launch.cancel.cancelled() => None,
        permit = Arc::clone(&shared.semaphore).acquire_owned() => permit.ok(),
    };
    let mut outcome = None;
    if let Some(permit) = permit
        && !launch.cancel.is_cancelled()
    {
        let started_at = shared.clock.now();
        let window_end = launch.schedule.window_end(started_at);
        let unwindowed = matches!(launch.reason, RunReason::Triggered | RunReason::Items);
        if !unwindowed && launch.schedule.window().is_some() && window_end.is_none() {
            // It waited past its window (for a concurrency slot): it counts as missed.
            tracing::info!(connector = %launch.key.0, tenant = %launch.key.1,
                "the run waited past its window; it runs when the window opens again");
        } else {
            let run = RunInfo {
                connector_id: launch.key.0.clone(),
                tenant_id: launch.key.1.clone(),
                reason: launch.reason,
                scheduled_at: launch.scheduled_at,
                due_at: launch.due_at,
                started_at,
            };
            tracing::debug!(connector = %run.connector_id, tenant = %run.tenant_id, reason = ?run.reason, "sync starting");
            shared.emit(SchedulerEvent::Started(run.clone()));
            let served = match launch.reason {
                RunReason::Items => launch.engine.sync_items(&launch.items).await.map(|r| (r, None)),
                _ => None,
            };
            let (result, stopped_by) = match served {
                Some(served) => served,
                // Item hints the engine cannot serve one by one become an incremental sync.
                None => shared.sync_until(&launch, window_end).await,
            };
            drop(permit);
            if shared.gate.is_some()
                && let Ok(Some(state)) = launch.engine.state_store().load(&launch.key.0, &launch.key.1).await
            {
                ended.seen_run = newest_run(&state).max(ended.seen_run);
            }
            outcome = Some(RunFinished {
                run,
                finished_at: shared.clock.now(),
                result: Arc::new(result),
                stopped_by,
            });
        }
    }
    ended.finished_at = outcome.as_ref().map(|o| o.finished_at);
    finish(&shared, &launch, ended, outcome);
}

/// Ends a run (or a skipped one): plans what comes next, announces it, starts what is due.
fn finish(shared: &Arc<Shared>, launch: &Launch, ended: Ended, outcome: Option<RunFinished>) {
    let (launches, runtime, wake) = shared.run_ended(launch, ended);
    if let Some(finished) = outcome {
        tracing::debug!(connector = %finished.run.connector_id, tenant = %finished.run.tenant_id,
            success = finished.result.success, "sync finished");
        shared.emit(SchedulerEvent::Finished(finished));
    }
    shared.spawn_all(launches, runtime);
    if wake {
        shared.wake.notify_one();
    }
    launch.done.cancel();
}
