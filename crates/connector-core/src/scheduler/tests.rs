//! Scheduler tests on a [`ManualClock`]: schedules across New York's DST changes, and the
//! scheduler's rules (no overlap, missed runs, windows, stop, triggers, the concurrency limit)
//! against a test source whose batches wait for the clock.

use std::sync::atomic::AtomicUsize;

use async_trait::async_trait;
use chrono::{NaiveTime, TimeZone};
use futures::StreamExt;
use futures::stream::BoxStream;
use serde_json::json;
use tokio::sync::broadcast::Receiver;
use tokio::sync::broadcast::error::TryRecvError;

use super::*;
use crate::connector::{Batch, Capabilities, Checkpoint, Connector, ReadRequest};
use crate::document::{Change, Document};
use crate::state::{MemoryStateStore, StateStore, SyncState, SyncStatus};
use crate::store::SqliteKnowledgeStore;

const NY: Tz = Tz::America__New_York;

fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
}

fn time(text: &str) -> NaiveTime {
    NaiveTime::parse_from_str(text, "%H:%M").unwrap()
}

fn minutes(n: u64) -> Duration {
    Duration::from_secs(60 * n)
}

fn td(d: Duration) -> TimeDelta {
    TimeDelta::from_std(d).unwrap()
}

/// The next `n` due times after `from`.
fn runs(schedule: &SyncSchedule, from: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
    std::iter::successors(schedule.next_run(from), |t| schedule.next_run(*t)).take(n).collect()
}

fn parse(value: serde_json::Value) -> std::result::Result<SyncSchedule, String> {
    serde_json::from_value::<SyncSchedule>(value).map_err(|e| e.to_string())
}

// ---- schedules ----

#[test]
fn configuration_is_validated_with_clear_errors() {
    let ok = parse(json!({"interval_hours": 1, "start_time": "08:00", "end_time": "20:00",
        "timezone": "America/New_York"}))
    .unwrap();
    assert_eq!(ok.interval(), Some(Duration::from_secs(3600)));
    assert_eq!(ok.window(), Some((time("08:00"), time("20:00"))));
    assert_eq!(ok.timezone(), NY);
    assert_eq!(ok.to_string(), "every 1h between 08:00 and 20:00 America/New_York");
    let cron = parse(json!({"cron": "0 2 * * *", "timezone": "UTC"})).unwrap();
    assert_eq!(cron.cron_expression(), Some("0 2 * * *"));
    assert_eq!(
        parse(json!({"interval_minutes": 5, "jitter_seconds": 30})).unwrap().jitter(),
        Duration::from_secs(30)
    );

    let cases = [
        (json!({}), "needs one of interval_seconds, interval_minutes, interval_hours or cron"),
        (json!({"interval_minutes": 5, "cron": "* * * * *"}), "only one of"),
        (json!({"interval_minutes": 5, "interval_hours": 1}), "interval_minutes and interval_hours"),
        (json!({"interval_seconds": 0}), "interval_seconds must be at least 1"),
        (json!({"interval_minutes": 5, "every": 3}), "unknown field `every`"),
        (json!({"cron": "0 2 * * * *"}), "cron \"0 2 * * * *\" has 6 fields; expected 5"),
        (json!({"cron": "61 2 * * *"}), "cron \"61 2 * * *\" is not valid"),
        (json!({"cron": "0 2 * * FUNDAY"}), "cron \"0 2 * * FUNDAY\" is not valid"),
        (json!({"cron": "  "}), "cron is empty"),
        (
            json!({"interval_hours": 1, "timezone": "America/New_Yrok"}),
            "timezone \"America/New_Yrok\" is not a known",
        ),
        (
            json!({"interval_hours": 1, "start_time": "8am", "end_time": "20:00"}),
            "start_time \"8am\" is not a time",
        ),
        (json!({"interval_hours": 1, "start_time": "08:00"}), "start_time needs an end_time"),
        (json!({"interval_hours": 1, "end_time": "08:00"}), "end_time needs a start_time"),
        (
            json!({"interval_hours": 1, "start_time": "08:00", "end_time": "08:00"}),
            "the window would be empty",
        ),
        (json!({"interval_seconds": 30, "jitter_seconds": 30}), "must be shorter than the interval"),
        (
            json!({"cron": "0 3 * * *", "start_time": "08:00", "end_time": "20:00"}),
            "never falls inside the window",
        ),
    ];
    for (config, expected) in cases {
        let err = parse(config.clone()).unwrap_err();
        assert!(err.contains(expected), "{config}: {err:?} should say {expected:?}");
    }
}

#[test]
fn intervals_are_real_time_across_dst() {
    let hourly = SyncSchedule::every(Duration::from_secs(3600)).unwrap().with_timezone(NY);
    // 01:30 EST on the spring-forward day: the next due time is one real hour later (03:30 EDT).
    let from = utc(2026, 3, 8, 6, 30);
    assert_eq!(runs(&hourly, from, 2), [utc(2026, 3, 8, 7, 30), utc(2026, 3, 8, 8, 30)]);
    // And on the fall-back day the repeated hour gets its run too.
    let from = utc(2026, 11, 1, 5, 30);
    assert_eq!(runs(&hourly, from, 2), [utc(2026, 11, 1, 6, 30), utc(2026, 11, 1, 7, 30)]);
}

#[test]
fn the_guides_cron_example() {
    let daily = SyncSchedule::cron("0 2 * * *").unwrap().with_timezone_name("UTC").unwrap();
    assert_eq!(runs(&daily, utc(2026, 3, 7, 12, 0), 2), [utc(2026, 3, 8, 2, 0), utc(2026, 3, 9, 2, 0)]);
    // Strictly after: from a due time, the next one.
    assert_eq!(daily.next_run(utc(2026, 3, 8, 2, 0)), Some(utc(2026, 3, 9, 2, 0)));
}

#[test]
fn a_cron_time_skipped_by_spring_forward_runs_once_at_the_jump() {
    // New York, 2026-03-08: clocks go from 02:00 EST to 03:00 EDT; 02:30 does not exist.
    let daily = SyncSchedule::cron("30 2 * * *").unwrap().with_timezone(NY);
    assert_eq!(
        runs(&daily, utc(2026, 3, 6, 12, 0), 3),
        [
            utc(2026, 3, 7, 7, 30), // 02:30 EST
            utc(2026, 3, 8, 7, 0),  // 03:00 EDT: the moment the clock jumps past 02:30, once
            utc(2026, 3, 9, 6, 30), // 02:30 EDT
        ]
    );
    // Several missing times collapse into that one run, which is also 03:00's own.
    let quarterly = SyncSchedule::cron("*/30 * * * *").unwrap().with_timezone(NY);
    assert_eq!(
        runs(&quarterly, utc(2026, 3, 8, 6, 15), 3),
        [utc(2026, 3, 8, 6, 30), utc(2026, 3, 8, 7, 0), utc(2026, 3, 8, 7, 30)]
    );
}

#[test]
fn a_cron_time_repeated_by_fall_back_runs_once_at_its_first_occurrence() {
    // New York, 2026-11-01: clocks go from 02:00 EDT back to 01:00 EST; 01:30 happens twice.
    let daily = SyncSchedule::cron("30 1 * * *").unwrap().with_timezone(NY);
    assert_eq!(
        runs(&daily, utc(2026, 10, 31, 12, 0), 2),
        [utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)] // 01:30 EDT, then 01:30 EST the next day
    );
    // Asked from inside the repeated hour (01:10 EST): the second 01:30 is not a new run.
    assert_eq!(daily.next_run(utc(2026, 11, 1, 6, 10)), Some(utc(2026, 11, 2, 6, 30)));
    // A repeating expression runs each wall time once too: it pauses for the repeated hour.
    let half_hourly = SyncSchedule::cron("*/30 * * * *").unwrap().with_timezone(NY);
    assert_eq!(
        runs(&half_hourly, utc(2026, 11, 1, 4, 45), 4),
        [utc(2026, 11, 1, 5, 0), utc(2026, 11, 1, 5, 30), utc(2026, 11, 1, 7, 0), utc(2026, 11, 1, 7, 30)]
    );
}

#[test]
fn windows_are_local_wall_time_in_winter_and_summer() {
    let s = SyncSchedule::every(Duration::from_secs(3600))
        .unwrap()
        .with_window(time("08:00"), time("20:00"))
        .unwrap()
        .with_timezone(NY);
    // Winter: 08:00 EST = 13:00Z. Summer: 08:00 EDT = 12:00Z.
    assert!(s.is_within_window(utc(2026, 3, 7, 13, 0)));
    assert!(!s.is_within_window(utc(2026, 3, 7, 12, 59)));
    assert!(s.is_within_window(utc(2026, 3, 9, 12, 0)));
    assert!(!s.is_within_window(utc(2026, 3, 9, 11, 59)));
    assert_eq!(s.window_end(utc(2026, 3, 9, 12, 0)), Some(utc(2026, 3, 10, 0, 0)));
    assert_eq!(s.window_end(utc(2026, 3, 9, 11, 0)), None);
    // A due time past the window's end moves to the next opening.
    assert_eq!(s.next_run(utc(2026, 3, 7, 0, 30)), Some(utc(2026, 3, 7, 13, 0)));
    assert_eq!(s.next_run(utc(2026, 3, 9, 23, 30)), Some(utc(2026, 3, 10, 12, 0)));
    // No window: always inside, no end.
    let plain = SyncSchedule::every(Duration::from_secs(60)).unwrap();
    assert!(plain.is_within_window(utc(2026, 1, 1, 0, 0)));
    assert_eq!(plain.window_end(utc(2026, 1, 1, 0, 0)), None);
}

#[test]
fn windows_across_midnight_on_dst_nights() {
    let s = SyncSchedule::every(Duration::from_secs(1800))
        .unwrap()
        .with_window(time("22:00"), time("02:00"))
        .unwrap()
        .with_timezone(NY);
    // Spring forward: 22:00 EST (03:00Z) to 02:00, which does not exist: 03:00 EDT (07:00Z). 4 hours.
    assert_eq!(s.next_allowed(utc(2026, 3, 7, 20, 0)), Some(utc(2026, 3, 8, 3, 0)));
    assert_eq!(s.window_end(utc(2026, 3, 8, 4, 0)), Some(utc(2026, 3, 8, 7, 0)));
    assert!(!s.is_within_window(utc(2026, 3, 8, 7, 0)));
    // Fall back: 22:00 EDT (02:00Z) to 02:00 EST (07:00Z). 5 hours, the repeated hour inside.
    assert_eq!(s.window_end(utc(2026, 11, 1, 3, 0)), Some(utc(2026, 11, 1, 7, 0)));
    assert!(s.is_within_window(utc(2026, 11, 1, 6, 30))); // 01:30 EST
    assert_eq!(s.next_run(utc(2026, 11, 1, 6, 30)), Some(utc(2026, 11, 2, 3, 0))); // 22:00 EST
}

#[test]
fn window_bounds_in_a_gap_or_a_repeated_hour() {
    // A start that does not exist opens the window when the clock jumps past it.
    let s = SyncSchedule::every(minutes(30))
        .unwrap()
        .with_window(time("02:30"), time("04:00"))
        .unwrap()
        .with_timezone(NY);
    assert_eq!(s.next_allowed(utc(2026, 3, 8, 6, 0)), Some(utc(2026, 3, 8, 7, 0))); // 03:00 EDT
    assert_eq!(s.window_end(utc(2026, 3, 8, 7, 0)), Some(utc(2026, 3, 8, 8, 0))); // 04:00 EDT
    // An end that happens twice closes the window at its first occurrence, for good.
    let s = SyncSchedule::every(minutes(30))
        .unwrap()
        .with_window(time("00:00"), time("01:30"))
        .unwrap()
        .with_timezone(NY);
    assert_eq!(s.window_end(utc(2026, 11, 1, 4, 30)), Some(utc(2026, 11, 1, 5, 30))); // 01:30 EDT
    assert!(!s.is_within_window(utc(2026, 11, 1, 6, 10))); // 01:10 EST: not reopened
    assert_eq!(s.next_allowed(utc(2026, 11, 1, 6, 10)), Some(utc(2026, 11, 2, 5, 0))); // 00:00 EST
}

// ---- the scheduler ----

/// Rows `1..=rows` in one stream, one row a batch with its checkpoint. With `step`, batch k of
/// a read waits until the clock reaches the read's start plus k steps; with `release_at`, every
/// batch waits for that time.
struct ClockedSource {
    id: ConnectorId,
    tenant: TenantId,
    rows: u64,
    step: Option<Duration>,
    release_at: Option<DateTime<Utc>>,
    clock: Arc<ManualClock>,
    yielded: AtomicU64,
    reads: AtomicU64,
    last_from: AtomicU64,
    /// Whether `fetch` serves single items.
    can_fetch: bool,
    /// The items of each `fetch`.
    fetches: std::sync::Mutex<Vec<Vec<ItemRef>>>,
}

impl ClockedSource {
    fn new(id: &str, rows: u64, clock: &Arc<ManualClock>) -> Self {
        Self {
            id: ConnectorId::new(id).unwrap(),
            tenant: TenantId::new("t1").unwrap(),
            rows,
            step: None,
            release_at: None,
            clock: Arc::clone(clock),
            yielded: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            last_from: AtomicU64::new(0),
            can_fetch: true,
            fetches: Default::default(),
        }
    }

    fn step(mut self, step: Duration) -> Arc<Self> {
        self.step = Some(step);
        Arc::new(self)
    }
}

#[async_trait]
impl Connector for ClockedSource {
    fn connector_id(&self) -> &ConnectorId {
        &self.id
    }
    fn tenant_id(&self) -> &TenantId {
        &self.tenant
    }
    fn kind(&self) -> &'static str {
        "clocked"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities { incremental: true, ..Default::default() }
    }
    async fn check(&self) -> crate::Result<()> {
        Ok(())
    }
    async fn fetch(&self, items: &[ItemRef]) -> crate::Result<Option<Batch>> {
        if !self.can_fetch {
            return Ok(None);
        }
        self.fetches.lock().unwrap().push(items.to_vec());
        let changes = items
            .iter()
            .map(|i| Change::Upsert(Document::new(i.key.clone(), "row", i.key.clone(), "fetched")))
            .collect();
        Ok(Some(Batch { changes, failures: vec![], checkpoint: None }))
    }
    fn read(&self, request: ReadRequest) -> BoxStream<'_, crate::Result<Batch>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let from = request.cursors.get("rows").and_then(|c| c.as_u64()).unwrap_or(0);
        self.last_from.store(from, Ordering::SeqCst);
        let start = self.clock.now();
        futures::stream::unfold(from, move |row| async move {
            if row >= self.rows {
                return None;
            }
            if let Some(step) = self.step {
                self.clock.sleep_until(start + td(step) * (row - from + 1) as i32).await;
            }
            if let Some(at) = self.release_at {
                self.clock.sleep_until(at).await;
            }
            self.yielded.fetch_add(1, Ordering::SeqCst);
            let id = format!("r{}", row + 1);
            let batch = Batch {
                changes: vec![Change::Upsert(Document::new(id.clone(), "row", id, "text"))],
                failures: vec![],
                checkpoint: Some(Checkpoint { stream: "rows".into(), cursor: json!(row + 1) }),
            };
            Some((Ok(batch), row + 1))
        })
        .boxed()
    }
}

struct Env {
    clock: Arc<ManualClock>,
    store: Arc<SqliteKnowledgeStore>,
    state: Arc<MemoryStateStore>,
}

impl Env {
    async fn new(start: DateTime<Utc>) -> Self {
        Self {
            clock: Arc::new(ManualClock::new(start)),
            store: Arc::new(SqliteKnowledgeStore::in_memory().await.unwrap()),
            state: Arc::new(MemoryStateStore::new()),
        }
    }

    fn scheduler(&self, max_concurrent: usize) -> SyncScheduler {
        SyncScheduler::new(SchedulerOptions {
            max_concurrent,
            clock: self.clock.clone(),
            sync_options: SyncOptions { retry_delay: Duration::from_millis(1), ..Default::default() },
            ..Default::default()
        })
    }

    /// An engine for `source`, and the count of items it has committed in its current sync.
    fn engine(&self, source: &Arc<ClockedSource>) -> (Arc<SyncEngine>, Arc<AtomicU64>) {
        let engine = Arc::new(SyncEngine::new(source.clone(), self.store.clone(), self.state.clone()));
        let committed = Arc::new(AtomicU64::new(0));
        let c = committed.clone();
        engine.on_progress(move |done, _| c.store(done, Ordering::SeqCst));
        (engine, committed)
    }

    async fn state_of(&self, source: &ClockedSource) -> SyncState {
        self.state.load(&source.id, &source.tenant).await.unwrap().unwrap()
    }
}

/// The saved cursor: of the interrupted full sync (the first sync is one), else incremental.
fn saved_cursor(state: &SyncState) -> serde_json::Value {
    state.full_sync.as_ref().map_or(&state.cursors, |full| &full.cursors)["rows"].clone()
}

async fn next_event(rx: &mut Receiver<SchedulerEvent>) -> SchedulerEvent {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("an event within 20 s")
        .expect("the channel stays open and keeps up")
}

async fn expect_started(rx: &mut Receiver<SchedulerEvent>) -> RunInfo {
    match next_event(rx).await {
        SchedulerEvent::Started(run) => run,
        other => panic!("expected a run to start, got {other:?}"),
    }
}

async fn expect_finished(rx: &mut Receiver<SchedulerEvent>) -> RunFinished {
    match next_event(rx).await {
        SchedulerEvent::Finished(finished) => finished,
        other => panic!("expected a run to finish, got {other:?}"),
    }
}

fn expect_quiet(rx: &mut Receiver<SchedulerEvent>) {
    match rx.try_recv() {
        Err(TryRecvError::Empty) => {}
        other => panic!("expected no event, got {other:?}"),
    }
}

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    for _ in 0..20_000 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Waits until `source` has been read `n` times: its batches are timed from the read's start,
/// so the clock must not move before.
async fn wait_reads(source: &ClockedSource, n: u64) {
    wait_until("the source to be read", || source.reads.load(Ordering::SeqCst) == n).await;
}

/// Moves the clock to each next due time up to `until`, letting each run finish; returns the
/// runs.
async fn run_through(
    scheduler: &SyncScheduler,
    env: &Env,
    rx: &mut Receiver<SchedulerEvent>,
    source: &ClockedSource,
    until: DateTime<Utc>,
) -> Vec<RunInfo> {
    let mut out = Vec::new();
    loop {
        let status = scheduler.connector(&source.id, &source.tenant).unwrap();
        let next = status.next_run.expect("a next run");
        if next > until {
            return out;
        }
        env.clock.set(next);
        let run = expect_started(rx).await;
        assert_eq!(run.started_at, next, "{run:?}");
        let finished = expect_finished(rx).await;
        assert!(finished.result.success, "{finished:?}");
        out.push(run);
    }
}

#[tokio::test]
async fn interval_runs_on_time_and_history_comes_from_the_state_store() {
    let t0 = utc(2026, 6, 1, 12, 0);
    let env = Env::new(t0).await;
    let source = Arc::new(ClockedSource::new("docs", 3, &env.clock));
    let (engine, _) = env.engine(&source);
    let scheduler = env.scheduler(4);
    let mut rx = scheduler.subscribe();
    scheduler.add_connector(engine.clone(), SyncSchedule::every(minutes(10)).unwrap()).await.unwrap();
    let err = scheduler.add_connector(engine, SyncSchedule::every(minutes(10)).unwrap()).await.unwrap_err();
    assert!(err.to_string().contains("already scheduled"), "{err}");
    scheduler.start().await;

    let runs = run_through(&scheduler, &env, &mut rx, &source, t0 + TimeDelta::minutes(30)).await;
    let at: Vec<_> = runs.iter().map(|r| r.scheduled_at).collect();
    let expected: Vec<_> = (0..4).map(|i| t0 + TimeDelta::minutes(10 * i)).collect();
    assert_eq!(at, expected, "never synced: at once, then every 10 minutes");
    assert!(runs.iter().all(|r| r.reason == RunReason::Scheduled && r.lateness().is_zero()));

    let history = scheduler.get_history(&source.id, 3).await.unwrap();
    assert_eq!(history.len(), 3);
    assert_eq!(history[0].tenant_id.as_str(), "t1");
    assert!(history.windows(2).all(|w| w[0].run.started_at >= w[1].run.started_at), "newest first");
    assert!(history.iter().all(|h| h.run.status == SyncStatus::Success));
    assert_eq!(
        history.last().unwrap().run.items_synced,
        0,
        "the first run synced the 3 rows; later ones nothing"
    );
    assert!(scheduler.get_history(&ConnectorId::new("nope").unwrap(), 3).await.is_err());
    scheduler.stop().await;
    assert_eq!(scheduler.connector(&source.id, &source.tenant).unwrap().next_run, None);
}

#[tokio::test]
async fn cron_runs_in_its_time_zone_across_spring_forward() {
    let env = Env::new(utc(2026, 3, 7, 12, 0)).await;
    let source = Arc::new(ClockedSource::new("nightly", 0, &env.clock));
    let (engine, _) = env.engine(&source);
    let scheduler = env.scheduler(4);
    let mut rx = scheduler.subscribe();
    scheduler
        .add_connector(engine, SyncSchedule::cron("0 2 * * *").unwrap().with_timezone(NY))
        .await
        .unwrap();
    scheduler.start().await;
    let runs = run_through(&scheduler, &env, &mut rx, &source, utc(2026, 3, 10, 12, 0)).await;
    let at: Vec<_> = runs.iter().map(|r| r.scheduled_at).collect();
    assert_eq!(
        at,
        [utc(2026, 3, 8, 7, 0), utc(2026, 3, 9, 6, 0), utc(2026, 3, 10, 6, 0)],
        "never synced, a cron schedule waits for its time; 02:00 on Mar 8 does not exist: 03:00 EDT"
    );
    scheduler.stop().await;
}

#[tokio::test]
async fn windows_across_both_dst_changes() {
    for (start, until, expected) in [
        (
            utc(2026, 3, 7, 12, 0),
            utc(2026, 3, 9, 12, 0),
            // Mar 8: 01:00 EST-03:00 EDT is one real hour; Mar 9: 01:00-03:00 EDT, two.
            vec![
                utc(2026, 3, 8, 6, 0),
                utc(2026, 3, 8, 6, 30),
                utc(2026, 3, 9, 5, 0),
                utc(2026, 3, 9, 5, 30),
                utc(2026, 3, 9, 6, 0),
                utc(2026, 3, 9, 6, 30),
            ],
        ),
        (
            utc(2026, 10, 31, 12, 0),
            utc(2026, 11, 2, 12, 0),
            // Nov 1: 01:00 EDT-03:00 EST is three real hours; Nov 2: 01:00-03:00 EST, two.
            vec![
                utc(2026, 11, 1, 5, 0),
                utc(2026, 11, 1, 5, 30),
                utc(2026, 11, 1, 6, 0),
                utc(2026, 11, 1, 6, 30),
                utc(2026, 11, 1, 7, 0),
                utc(2026, 11, 1, 7, 30),
                utc(2026, 11, 2, 6, 0),
                utc(2026, 11, 2, 6, 30),
                utc(2026, 11, 2, 7, 0),
                utc(2026, 11, 2, 7, 30),
            ],
        ),
    ] {
        let env = Env::new(start).await;
        let source = Arc::new(ClockedSource::new("windowed", 0, &env.clock));
        let (engine, _) = env.engine(&source);
        let scheduler = env.scheduler(4);
        let mut rx = scheduler.subscribe();
        let schedule = SyncSchedule::every(minutes(30))
            .unwrap()
            .with_window(time("01:00"), time("03:00"))
            .unwrap()
            .with_timezone(NY);
        scheduler.add_connector(engine, schedule).await.unwrap();
        scheduler.start().await;
        let runs = run_through(&scheduler, &env, &mut rx, &source, until).await;
        let at: Vec<_> = runs.iter().map(|r| r.scheduled_at).collect();
        assert_eq!(at, expected);
        scheduler.stop().await;
    }
}

#[tokio::test]
async fn jitter_delays_each_run_but_not_the_schedule() {
    let t0 = utc(2026, 6, 1, 12, 0);
    let env = Env::new(t0).await;
    let source = Arc::new(ClockedSource::new("jittery", 0, &env.clock));
    let (engine, _) = env.engine(&source);
    let scheduler = env.scheduler(4);
    let mut rx = scheduler.subscribe();
    let schedule = SyncSchedule::every(minutes(1)).unwrap().with_jitter(Duration::from_secs(30)).unwrap();
    scheduler.add_connector(engine, schedule).await.unwrap();
    scheduler.start().await;
    let runs = run_through(&scheduler, &env, &mut rx, &source, t0 + TimeDelta::minutes(20)).await;
    assert!(runs.len() >= 20, "{}", runs.len());
    for (i, run) in runs.iter().enumerate() {
        assert_eq!(run.scheduled_at, t0 + TimeDelta::minutes(i as i64), "fixed rate: {run:?}");
        let delay = run.due_at - run.scheduled_at;
        assert!(delay >= TimeDelta::zero() && delay <= TimeDelta::seconds(30), "{run:?}");
    }
    assert!(runs.iter().any(|r| r.due_at != r.scheduled_at), "some jitter over 20 runs");
    scheduler.stop().await;
}

#[tokio::test]
async fn a_long_run_never_overlaps_and_the_ticks_it_missed_run_once() {
    let t0 = utc(2026, 6, 1, 12, 0);
    let env = Env::new(t0).await;
    // Five rows, one a minute: the first run takes five minutes on a one-minute schedule.
    let source = ClockedSource::new("slow", 5, &env.clock).step(minutes(1));
    let (engine, committed) = env.engine(&source);
    let scheduler = env.scheduler(4);
    let mut rx = scheduler.subscribe();
    scheduler.add_connector(engine, SyncSchedule::every(minutes(1)).unwrap()).await.unwrap();
    scheduler.start().await;
    let first = expect_started(&mut rx).await;
    assert_eq!((first.reason, first.scheduled_at), (RunReason::Scheduled, t0));
    wait_reads(&source, 1).await;
    for k in 1..5u64 {
        env.clock.set(t0 + TimeDelta::minutes(k as i64));
        wait_until("the next batch", || committed.load(Ordering::SeqCst) == k).await;
        expect_quiet(&mut rx);
        let status = scheduler.connector(&source.id, &source.tenant).unwrap();
        assert!(status.running && status.next_run.is_none(), "{status:?}");
    }
    env.clock.set(t0 + TimeDelta::minutes(5));
    let finished = expect_finished(&mut rx).await;
    assert_eq!(finished.result.items_synced, 5);
    // Four due times passed during the run: one catch-up run, at once.
    let catch_up = expect_started(&mut rx).await;
    assert_eq!(catch_up.reason, RunReason::Missed);
    assert_eq!(catch_up.scheduled_at, t0 + TimeDelta::minutes(1), "the first due time missed");
    assert_eq!(catch_up.due_at, t0 + TimeDelta::minutes(5));
    assert!(expect_finished(&mut rx).await.result.success);
    let status = scheduler.connector(&source.id, &source.tenant).unwrap();
    assert_eq!(status.next_run, Some(t0 + TimeDelta::minutes(6)), "the schedule continues from the catch-up");
    assert_eq!(status.next_reason, Some(RunReason::Scheduled));
    expect_quiet(&mut rx);
    scheduler.stop().await;
}

#[tokio::test]
async fn a_run_missed_while_the_process_was_down_runs_once_at_start() {
    let t0 = utc(2026, 6, 1, 12, 0);
    let env = Env::new(t0).await;
    let down = ClockedSource::new("down", 0, &env.clock);
    let recent = ClockedSource::new("recent", 0, &env.clock);
    // Persisted by an earlier process: "down" last synced 5 hours ago, "recent" 30 minutes ago.
    for (source, ago) in [(&down, 300), (&recent, 30)] {
        let mut state = SyncState::new(source.id.clone(), source.tenant.clone());
        state.last_sync_at = Some(t0 - TimeDelta::minutes(ago));
        env.state.save(&state).await.unwrap();
    }
    let (down, recent) = (Arc::new(down), Arc::new(recent));
    let scheduler = env.scheduler(4);
    let mut rx = scheduler.subscribe();
    let hourly = SyncSchedule::every(Duration::from_secs(3600)).unwrap();
    scheduler.add_connector(env.engine(&down).0, hourly.clone()).await.unwrap();
    scheduler.add_connector(env.engine(&recent).0, hourly).await.unwrap();
    scheduler.start().await;

    let run = expect_started(&mut rx).await;
    assert_eq!(run.connector_id, down.id);
    assert_eq!(run.reason, RunReason::Missed);
    assert_eq!(run.scheduled_at, t0 - TimeDelta::hours(4), "the first due time missed");
    assert_eq!(run.due_at, t0);
    expect_finished(&mut rx).await;
    let status = scheduler.connector(&down.id, &down.tenant).unwrap();
    assert_eq!(status.next_run, Some(t0 + TimeDelta::hours(1)), "one run for five missed due times");
    let status = scheduler.connector(&recent.id, &recent.tenant).unwrap();
    assert_eq!(
        status.next_run,
        Some(t0 + TimeDelta::minutes(30)),
        "nothing missed: one hour after the last sync"
    );
    expect_quiet(&mut rx);
    scheduler.stop().await;
}

#[tokio::test]
async fn the_window_end_stops_a_long_sync_at_a_checkpoint_and_the_next_window_resumes_it() {
    let t0 = utc(2026, 6, 1, 8, 0);
    let env = Env::new(t0).await;
    // Ten rows, one every 7 minutes: 70 minutes of work in a one-hour window.
    let source = ClockedSource::new("big", 10, &env.clock).step(minutes(7));
    let (engine, committed) = env.engine(&source);
    let scheduler = env.scheduler(4);
    let mut rx = scheduler.subscribe();
    let schedule = SyncSchedule::every(Duration::from_secs(3600))
        .unwrap()
        .with_window(time("08:00"), time("09:00"))
        .unwrap();
    scheduler.add_connector(engine, schedule).await.unwrap();
    scheduler.start().await;
    assert_eq!(expect_started(&mut rx).await.scheduled_at, t0);
    wait_reads(&source, 1).await;
    for k in 1..=8u64 {
        env.clock.set(t0 + TimeDelta::minutes(7 * k as i64));
        wait_until("the next batch", || committed.load(Ordering::SeqCst) == k).await;
    }
    env.clock.set(utc(2026, 6, 1, 9, 0));
    let finished = expect_finished(&mut rx).await;
    assert_eq!(finished.stopped_by, Some(StopCause::WindowEnd));
    assert_eq!(finished.result.error_kind, Some(ErrorKind::Cancelled));
    assert_eq!(finished.result.items_synced, 8);
    let state = env.state_of(&source).await;
    assert_eq!(state.status, SyncStatus::Cancelled);
    assert_eq!(saved_cursor(&state), json!(8), "the checkpoint of the last committed batch");

    let next = utc(2026, 6, 2, 8, 0);
    assert_eq!(scheduler.connector(&source.id, &source.tenant).unwrap().next_run, Some(next));
    env.clock.set(next);
    assert_eq!(expect_started(&mut rx).await.scheduled_at, next);
    wait_reads(&source, 2).await;
    for k in 1..=2 {
        env.clock.set(next + TimeDelta::minutes(7 * k));
    }
    let finished = expect_finished(&mut rx).await;
    assert!(finished.result.success && finished.stopped_by.is_none(), "{finished:?}");
    assert_eq!(source.last_from.load(Ordering::SeqCst), 8, "resumed from the checkpoint");
    assert_eq!(finished.result.items_synced, 2);
    scheduler.stop().await;
}

#[tokio::test]
async fn stop_lets_a_running_sync_reach_a_checkpoint_and_start_resumes() {
    let t0 = utc(2026, 6, 1, 12, 0);
    let env = Env::new(t0).await;
    let source = ClockedSource::new("stoppable", 10, &env.clock).step(minutes(1));
    let (engine, committed) = env.engine(&source);
    let scheduler = env.scheduler(4);
    let mut rx = scheduler.subscribe();
    scheduler.add_connector(engine, SyncSchedule::every(Duration::from_secs(3600)).unwrap()).await.unwrap();
    scheduler.start().await;
    expect_started(&mut rx).await;
    wait_reads(&source, 1).await;
    for k in 1..=3u64 {
        env.clock.set(t0 + TimeDelta::minutes(k as i64));
        wait_until("the next batch", || committed.load(Ordering::SeqCst) == k).await;
    }
    scheduler.stop().await;
    // stop() returned after the run ended.
    let finished = expect_finished(&mut rx).await;
    assert_eq!(finished.stopped_by, Some(StopCause::SchedulerStopped));
    assert_eq!(finished.result.items_synced, 3);
    let state = env.state_of(&source).await;
    assert_eq!((state.status, saved_cursor(&state)), (SyncStatus::Cancelled, json!(3)));
    assert_eq!(state.history.back().unwrap().status, SyncStatus::Cancelled);
    assert!(!scheduler.is_started());
    assert!(scheduler.trigger(&source.id, &source.tenant).is_err(), "no triggers while stopped");

    // Started again: the next run is an interval after the last sync, and resumes at row 4.
    scheduler.start().await;
    let next = t0 + TimeDelta::minutes(63);
    assert_eq!(scheduler.connector(&source.id, &source.tenant).unwrap().next_run, Some(next));
    env.clock.set(next);
    expect_started(&mut rx).await;
    wait_reads(&source, 2).await;
    assert_eq!(source.last_from.load(Ordering::SeqCst), 3);
    scheduler.stop().await;
    assert_eq!(expect_finished(&mut rx).await.stopped_by, Some(StopCause::SchedulerStopped));
}

#[tokio::test]
async fn triggers_during_a_run_coalesce_into_one_follow_up() {
    let t0 = utc(2026, 6, 1, 12, 0);
    let env = Env::new(t0).await;
    let source = ClockedSource::new("hooked", 3, &env.clock).step(minutes(1));
    let (engine, committed) = env.engine(&source);
    let scheduler = env.scheduler(4);
    let mut rx = scheduler.subscribe();
    scheduler.add_connector(engine, SyncSchedule::every(Duration::from_secs(3600)).unwrap()).await.unwrap();
    scheduler.start().await;
    assert_eq!(expect_started(&mut rx).await.reason, RunReason::Scheduled);
    wait_reads(&source, 1).await;
    let (c, t) = (&source.id, &source.tenant);
    assert_eq!(scheduler.trigger(c, t).unwrap(), TriggerOutcome::Queued);
    assert_eq!(scheduler.trigger(c, t).unwrap(), TriggerOutcome::Coalesced);
    assert_eq!(scheduler.trigger(c, t).unwrap(), TriggerOutcome::Coalesced);
    assert!(scheduler.connector(c, t).unwrap().trigger_pending);
    for k in 1..=3u64 {
        env.clock.set(t0 + TimeDelta::minutes(k as i64));
        wait_until("the next batch", || committed.load(Ordering::SeqCst) == k || k == 3).await;
    }
    assert!(expect_finished(&mut rx).await.result.success);
    let follow_up = expect_started(&mut rx).await;
    assert_eq!((follow_up.reason, follow_up.started_at), (RunReason::Triggered, t0 + TimeDelta::minutes(3)));
    expect_finished(&mut rx).await;
    let status = scheduler.connector(c, t).unwrap();
    assert!(!status.running && !status.trigger_pending, "{status:?}");
    assert_eq!(status.next_run, Some(t0 + TimeDelta::hours(1)), "triggers leave the schedule alone");
    expect_quiet(&mut rx);
    // Idle: a trigger runs at once.
    assert_eq!(scheduler.trigger(c, t).unwrap(), TriggerOutcome::Started);
    assert_eq!(expect_started(&mut rx).await.reason, RunReason::Triggered);
    expect_finished(&mut rx).await;
    assert!(scheduler.trigger(&ConnectorId::new("nope").unwrap(), t).is_err());
    scheduler.stop().await;
}

#[tokio::test]
async fn the_concurrency_limit_holds_over_all_connectors() {
    let t0 = utc(2026, 6, 1, 12, 0);
    let env = Env::new(t0).await;
    let scheduler = env.scheduler(2);
    let (running, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (r, p) = (running.clone(), peak.clone());
    scheduler.on_event(move |event| match event {
        SchedulerEvent::Started(_) => {
            p.fetch_max(r.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
        }
        SchedulerEvent::Finished(_) => {
            r.fetch_sub(1, Ordering::SeqCst);
        }
    });
    let mut rx = scheduler.subscribe();
    let mut sources = Vec::new();
    for i in 0..5 {
        let mut source = ClockedSource::new(&format!("c{i}"), 1, &env.clock);
        source.release_at = Some(t0 + TimeDelta::minutes(1));
        let source = Arc::new(source);
        scheduler
            .add_connector(env.engine(&source).0, SyncSchedule::every(Duration::from_secs(3600)).unwrap())
            .await
            .unwrap();
        sources.push(source);
    }
    scheduler.start().await;
    expect_started(&mut rx).await;
    expect_started(&mut rx).await;
    // The other three wait for a slot; the two running wait for the clock.
    wait_until("both reads to start", || {
        sources.iter().map(|s| s.reads.load(Ordering::SeqCst)).sum::<u64>() == 2
    })
    .await;
    expect_quiet(&mut rx);
    assert!(scheduler.connectors().iter().all(|s| s.running), "waiting for a slot counts as running");
    env.clock.set(t0 + TimeDelta::minutes(1));
    let mut finished = 0;
    while finished < 5 {
        if let SchedulerEvent::Finished(f) = next_event(&mut rx).await {
            assert!(f.result.success);
            finished += 1;
        }
    }
    assert_eq!(peak.load(Ordering::SeqCst), 2);
    assert!(sources.iter().all(|s| s.yielded.load(Ordering::SeqCst) == 1));
    assert!(scheduler.remove_connector(&sources[0].id, &sources[0].tenant).await);
    assert!(!scheduler.remove_connector(&sources[0].id, &sources[0].tenant).await);
    assert_eq!(scheduler.connectors().len(), 4);
    scheduler.stop().await;
}

#[tokio::test]
async fn removing_a_running_connector_cancels_its_sync() {
    let t0 = utc(2026, 6, 1, 12, 0);
    let env = Env::new(t0).await;
    let source = ClockedSource::new("gone", 10, &env.clock).step(minutes(1));
    let (engine, committed) = env.engine(&source);
    let scheduler = env.scheduler(4);
    let mut rx = scheduler.subscribe();
    scheduler.add_connector(engine, SyncSchedule::every(Duration::from_secs(3600)).unwrap()).await.unwrap();
    scheduler.start().await;
    expect_started(&mut rx).await;
    wait_reads(&source, 1).await;
    env.clock.set(t0 + TimeDelta::minutes(1));
    wait_until("a batch", || committed.load(Ordering::SeqCst) == 1).await;
    assert!(scheduler.remove_connector(&source.id, &source.tenant).await);
    let finished = expect_finished(&mut rx).await;
    assert_eq!(finished.stopped_by, Some(StopCause::Removed));
    assert!(scheduler.connectors().is_empty());
    scheduler.stop().await;
}

fn item(key: &str) -> ItemRef {
    ItemRef::new("rows", key)
}

#[tokio::test]
async fn item_hints_merge_wait_for_a_running_sync_and_run_once_after_it() {
    let t0 = utc(2026, 6, 1, 12, 0);
    let env = Env::new(t0).await;
    let source = ClockedSource::new("hinted", 3, &env.clock).step(minutes(1));
    let (engine, committed) = env.engine(&source);
    let mut plain = ClockedSource::new("plain", 2, &env.clock);
    plain.can_fetch = false;
    let plain = Arc::new(plain);
    let (plain_engine, _) = env.engine(&plain);
    let scheduler = env.scheduler(4);
    let mut rx = scheduler.subscribe();
    scheduler.add_connector(engine, SyncSchedule::every(Duration::from_secs(3600)).unwrap()).await.unwrap();
    let (c, t) = (&source.id, &source.tenant);
    assert!(scheduler.trigger_items(c, t, vec![item("a")]).is_err(), "not started");
    scheduler.start().await;
    assert_eq!(expect_started(&mut rx).await.reason, RunReason::Scheduled);
    wait_reads(&source, 1).await;

    // During the run: queued, merged, deduplicated.
    assert_eq!(scheduler.trigger_items(c, t, vec![item("a"), item("b")]).unwrap(), TriggerOutcome::Queued);
    assert_eq!(scheduler.trigger_items(c, t, vec![item("b"), item("c")]).unwrap(), TriggerOutcome::Coalesced);
    assert_eq!(scheduler.trigger_items(c, t, vec![item("a")]).unwrap(), TriggerOutcome::Coalesced);
    assert_eq!(scheduler.trigger_items(c, t, vec![]).unwrap(), TriggerOutcome::Coalesced);
    assert_eq!(scheduler.connector(c, t).unwrap().items_pending, 3);
    for k in 1..=3u64 {
        env.clock.set(t0 + TimeDelta::minutes(k as i64));
        wait_until("the next batch", || committed.load(Ordering::SeqCst) == k || k == 3).await;
    }
    assert!(expect_finished(&mut rx).await.result.success);

    // Right after it: one item run with everything queued.
    let run = expect_started(&mut rx).await;
    assert_eq!((run.reason, run.started_at), (RunReason::Items, t0 + TimeDelta::minutes(3)));
    let finished = expect_finished(&mut rx).await;
    assert!(finished.result.success, "{finished:?}");
    assert!(!finished.result.full_sync);
    assert_eq!(finished.result.items_synced, 3);
    assert_eq!(*source.fetches.lock().unwrap(), vec![vec![item("a"), item("b"), item("c")]]);
    assert_eq!(source.reads.load(Ordering::SeqCst), 1, "items are fetched, not read");
    expect_quiet(&mut rx);
    let status = scheduler.connector(c, t).unwrap();
    assert_eq!((status.running, status.items_pending), (false, 0), "{status:?}");
    assert_eq!(status.next_run, Some(t0 + TimeDelta::hours(1)), "item runs leave the schedule alone");

    // Idle: an item run starts at once.
    assert_eq!(scheduler.trigger_items(c, t, vec![item("d")]).unwrap(), TriggerOutcome::Started);
    assert_eq!(expect_started(&mut rx).await.reason, RunReason::Items);
    assert_eq!(expect_finished(&mut rx).await.result.items_synced, 1);
    assert_eq!(source.fetches.lock().unwrap().len(), 2);

    // A connector that cannot fetch single items runs an incremental sync instead.
    scheduler
        .add_connector(plain_engine, SyncSchedule::every(Duration::from_secs(3600)).unwrap())
        .await
        .unwrap();
    assert_eq!(expect_started(&mut rx).await.reason, RunReason::Scheduled);
    assert!(expect_finished(&mut rx).await.result.success);
    let (pc, pt) = (&plain.id, &plain.tenant);
    assert_eq!(scheduler.trigger_items(pc, pt, vec![item("r1")]).unwrap(), TriggerOutcome::Started);
    assert_eq!(expect_started(&mut rx).await.reason, RunReason::Items);
    let finished = expect_finished(&mut rx).await;
    assert!(finished.result.success && !finished.result.full_sync, "{finished:?}");
    assert_eq!(plain.reads.load(Ordering::SeqCst), 2, "the fallback is a sync");
    assert_eq!(plain.last_from.load(Ordering::SeqCst), 2, "an incremental one, from the cursor");
    expect_quiet(&mut rx);

    // A connector without a schedule runs only on triggers.
    let manual = Arc::new(ClockedSource::new("manual", 2, &env.clock));
    let (manual_engine, _) = env.engine(&manual);
    scheduler.add_triggered_only(manual_engine).await.unwrap();
    let status = scheduler.connector(&manual.id, &manual.tenant).unwrap();
    assert_eq!((status.schedule.as_str(), status.next_run), ("triggers only", None));
    expect_quiet(&mut rx);
    let (mc, mt) = (&manual.id, &manual.tenant);
    assert_eq!(scheduler.trigger_items(mc, mt, vec![item("x")]).unwrap(), TriggerOutcome::Started);
    assert_eq!(expect_started(&mut rx).await.reason, RunReason::Items);
    let finished = expect_finished(&mut rx).await;
    assert!(finished.result.success && finished.result.full_sync, "never synced: a first full sync");
    assert_eq!(scheduler.connector(mc, mt).unwrap().next_run, None);
    scheduler.stop().await;
}

#[tokio::test]
async fn a_gate_skips_refused_runs_and_runs_another_process_already_did() {
    // The engine stamps its run records with the real time: start the clock at it, so this
    // scheduler's own records come before the other process's (minutes ahead).
    let now = Utc::now();
    let t0 = now - TimeDelta::nanoseconds(i64::from(now.timestamp_subsec_nanos()));
    let env = Env::new(t0).await;
    let source = Arc::new(ClockedSource::new("leased", 3, &env.clock));
    let (engine, _) = env.engine(&source);
    let allowed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let a = allowed.clone();
    let scheduler = SyncScheduler::new(SchedulerOptions {
        clock: env.clock.clone(),
        gate: Some(Arc::new(move |_: &ConnectorId, _: &TenantId| a.load(Ordering::SeqCst))),
        ..Default::default()
    });
    let mut rx = scheduler.subscribe();
    scheduler.add_connector(engine, SyncSchedule::every(minutes(10)).unwrap()).await.unwrap();
    scheduler.start().await;
    let (c, t) = (&source.id, &source.tenant);
    let next_run = || scheduler.connector(c, t).unwrap().next_run;

    // Refused: skipped, and the next time computed as usual.
    wait_until("the refused run to be skipped", || next_run() == Some(t0 + TimeDelta::minutes(10))).await;
    expect_quiet(&mut rx);
    assert_eq!(source.reads.load(Ordering::SeqCst), 0);

    // Allowed: it runs on time.
    allowed.store(true, Ordering::SeqCst);
    env.clock.set(t0 + TimeDelta::minutes(10));
    let run = expect_started(&mut rx).await;
    assert_eq!((run.reason, run.scheduled_at), (RunReason::Scheduled, t0 + TimeDelta::minutes(10)));
    expect_finished(&mut rx).await;
    wait_until("the next plan", || next_run() == Some(t0 + TimeDelta::minutes(20))).await;

    // Another process (its lease for a while) ran the connector at 19 minutes, for 30 s: the
    // run due at 20 minutes is skipped, and the schedule continues from that run's end.
    let mut state = env.state_of(&source).await;
    let started_at = t0 + TimeDelta::minutes(19);
    let finished_at = started_at + TimeDelta::seconds(30);
    let mut record = state.history.back().unwrap().clone();
    (record.started_at, record.finished_at) = (started_at, finished_at);
    state.history.push_back(record);
    state.last_sync_at = Some(finished_at);
    env.state.save(&state).await.unwrap();
    env.clock.set(t0 + TimeDelta::minutes(20));
    wait_until("the run to be skipped", || next_run() == Some(finished_at + TimeDelta::minutes(10))).await;
    expect_quiet(&mut rx);
    assert_eq!(source.reads.load(Ordering::SeqCst), 1);

    // At that time it runs (the other run is seen now).
    env.clock.set(finished_at + TimeDelta::minutes(10));
    let run = expect_started(&mut rx).await;
    assert_eq!(run.started_at, finished_at + TimeDelta::minutes(10));
    expect_finished(&mut rx).await;
    assert_eq!(source.reads.load(Ordering::SeqCst), 2);
    let after = finished_at + TimeDelta::minutes(20);
    wait_until("the next plan", || next_run() == Some(after)).await;

    // Refused again: skipped. Triggers and item hints are not gated.
    allowed.store(false, Ordering::SeqCst);
    env.clock.set(after);
    wait_until("the refused run to be skipped", || next_run() == Some(after + TimeDelta::minutes(10))).await;
    expect_quiet(&mut rx);
    assert_eq!(scheduler.trigger(c, t).unwrap(), TriggerOutcome::Started);
    assert_eq!(expect_started(&mut rx).await.reason, RunReason::Triggered);
    expect_finished(&mut rx).await;
    assert_eq!(scheduler.trigger_items(c, t, vec![item("r1")]).unwrap(), TriggerOutcome::Started);
    assert_eq!(expect_started(&mut rx).await.reason, RunReason::Items);
    expect_finished(&mut rx).await;
    scheduler.stop().await;
}
