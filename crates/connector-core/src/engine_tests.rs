//! Engine tests against an in-memory source and the in-memory SQLite store.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU32;

use async_trait::async_trait;
use futures::stream::BoxStream;

use super::*;
use crate::connector::Capabilities;
use crate::state::JsonFileStateStore;
use crate::store::SqliteKnowledgeStore;

/// A source of rows ordered by a change sequence (like `updated_at`).
struct FakeSource {
    id: ConnectorId,
    tenant: TenantId,
    /// seq -> (id, text); a row appears once, at its latest seq.
    rows: Mutex<BTreeMap<u64, (String, String)>>,
    next_seq: AtomicU64,
    /// Fail (transiently) after this many batches of the next pass, once.
    fail_after: AtomicU32,
    fail_kind: Mutex<Option<ErrorKind>>,
    reads: AtomicU32,
}

impl FakeSource {
    fn new(tenant: &str) -> Arc<Self> {
        Arc::new(Self {
            id: ConnectorId::new("fake").unwrap(),
            tenant: TenantId::new(tenant).unwrap(),
            rows: Mutex::default(),
            next_seq: AtomicU64::new(1),
            fail_after: AtomicU32::new(u32::MAX),
            fail_kind: Mutex::new(None),
            reads: AtomicU32::new(0),
        })
    }

    fn put(&self, id: &str, text: &str) {
        let mut rows = self.rows.lock().unwrap();
        rows.retain(|_, (rid, _)| rid != id);
        rows.insert(self.next_seq.fetch_add(1, Ordering::SeqCst), (id.to_owned(), text.to_owned()));
    }

    fn remove(&self, id: &str) {
        self.rows.lock().unwrap().retain(|_, (rid, _)| rid != id);
    }

    fn fail_once_after(&self, batches: u32, kind: ErrorKind) {
        self.fail_after.store(batches, Ordering::SeqCst);
        *self.fail_kind.lock().unwrap() = Some(kind);
    }
}

#[async_trait]
impl Connector for FakeSource {
    fn connector_id(&self) -> &ConnectorId {
        &self.id
    }
    fn tenant_id(&self) -> &TenantId {
        &self.tenant
    }
    fn kind(&self) -> &'static str {
        "fake"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities { incremental: true, total_estimate: true, ..Default::default() }
    }
    async fn check(&self) -> Result<()> {
        Ok(())
    }
    async fn estimate_total(&self, _r: &ReadRequest) -> Result<Option<u64>> {
        Ok(Some(self.rows.lock().unwrap().len() as u64))
    }
    fn read(&self, request: ReadRequest) -> BoxStream<'_, Result<Batch>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let from = request.cursors.get("rows").and_then(|c| c.as_u64()).unwrap_or(0);
        let rows: Vec<(u64, (String, String))> =
            self.rows.lock().unwrap().range(from + 1..).map(|(k, v)| (*k, v.clone())).collect();
        let fail_after = self.fail_after.swap(u32::MAX, Ordering::SeqCst);
        let fail_kind = self.fail_kind.lock().unwrap().take();
        let batches: Vec<Result<Batch>> = rows
            .chunks(request.batch_size)
            .enumerate()
            .flat_map(|(i, chunk)| {
                let batch = Batch {
                    changes: chunk
                        .iter()
                        .map(|(_, (id, text))| {
                            Change::Upsert(Document::new(id.clone(), "row", id.clone(), text.clone()))
                        })
                        .collect(),
                    failures: vec![],
                    checkpoint: Some(Checkpoint {
                        stream: "rows".into(),
                        cursor: serde_json::json!(chunk.last().unwrap().0),
                    }),
                };
                let mut out = vec![Ok(batch)];
                if i as u32 + 1 == fail_after {
                    out.push(Err(Error::new(fail_kind.unwrap(), "injected failure")));
                }
                out
            })
            .collect();
        futures::stream::iter(batches).boxed()
    }
    async fn fetch(&self, items: &[ItemRef]) -> Result<Option<Batch>> {
        let rows = self.rows.lock().unwrap();
        let changes = items
            .iter()
            .map(|item| match rows.values().find(|(id, _)| *id == item.key) {
                Some((id, text)) => {
                    Change::Upsert(Document::new(id.clone(), "row", id.clone(), text.clone()))
                }
                None => Change::Delete { id: item.key.clone() },
            })
            .collect();
        Ok(Some(Batch { changes, ..Default::default() }))
    }
}

struct Harness {
    source: Arc<FakeSource>,
    store: Arc<SqliteKnowledgeStore>,
    engine: SyncEngine,
    _dir: tempfile::TempDir,
}

async fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let source = FakeSource::new("t1");
    let store = Arc::new(SqliteKnowledgeStore::open(dir.path().join("k.db")).await.unwrap());
    let state = Arc::new(JsonFileStateStore::new(dir.path().join("state")));
    let engine = SyncEngine::new(source.clone(), store.clone(), state);
    Harness { source, store, engine, _dir: dir }
}

fn opts() -> SyncOptions {
    SyncOptions { batch_size: 10, retry_delay: Duration::from_millis(1), ..Default::default() }
}

async fn ids(store: &SqliteKnowledgeStore, tenant: &str) -> Vec<String> {
    let t = TenantId::new(tenant).unwrap();
    store.export(&t, None).map(|d| d.unwrap().document.id).collect().await
}

#[tokio::test]
async fn full_then_incremental_then_no_change() {
    let h = harness().await;
    for i in 0..25 {
        h.source.put(&format!("r{i:02}"), &format!("text {i}"));
    }
    let r = h.engine.sync(opts()).await;
    assert!(r.success, "{r:?}");
    assert!(r.full_sync, "the first sync is a full sync");
    assert_eq!((r.items_synced, r.items_unchanged, r.items_deleted), (25, 0, 0));

    h.source.put("r03", "changed");
    h.source.put("r99", "new");
    let r = h.engine.sync(opts()).await;
    assert!(r.success && !r.full_sync, "{r:?}");
    assert_eq!((r.items_synced, r.items_unchanged), (2, 0));

    let r = h.engine.sync(opts()).await;
    assert_eq!((r.items_synced, r.items_unchanged, r.items_deleted), (0, 0, 0));
    assert_eq!(ids(&h.store, "t1").await.len(), 26);
    let doc = h.store.get(h.source.tenant_id(), h.source.connector_id(), "r03").await.unwrap().unwrap();
    assert_eq!(doc.document.content, "changed");

    let state = h.engine.load_state().await.unwrap();
    assert_eq!(state.status, SyncStatus::Success);
    assert_eq!(state.history.len(), 3);
    assert_eq!(state.cursor(), Some(&serde_json::json!(27)));
}

#[tokio::test]
async fn full_sync_counts_unchanged_and_sweeps_deleted() {
    let h = harness().await;
    for i in 0..12 {
        h.source.put(&format!("r{i:02}"), "x");
    }
    h.engine.sync(opts()).await;
    h.source.remove("r05");
    h.source.remove("r06");
    let r = h.engine.sync(SyncOptions { full_sync: true, ..opts() }).await;
    assert!(r.success && r.full_sync);
    assert_eq!((r.items_synced, r.items_unchanged, r.items_deleted), (0, 10, 2));
    let left = ids(&h.store, "t1").await;
    assert_eq!(left.len(), 10);
    assert!(!left.contains(&"r05".to_string()));
    // The sweep also removed them from the search index.
    let hits = h.store.search(h.source.tenant_id(), "r05", 10).await.unwrap();
    assert!(hits.is_empty(), "{hits:?}");
}

#[tokio::test]
async fn transient_failure_is_retried_from_the_checkpoint() {
    let h = harness().await;
    for i in 0..50 {
        h.source.put(&format!("r{i:02}"), "x");
    }
    h.source.fail_once_after(2, ErrorKind::Transient);
    let r = h.engine.sync(opts()).await;
    assert!(r.success, "{r:?}");
    assert_eq!(r.items_synced, 50, "nothing lost, nothing written twice");
    assert_eq!(r.items_unchanged, 0, "the retry resumed after the committed batches");
    assert_eq!(h.source.reads.load(Ordering::SeqCst), 2);
    assert_eq!(ids(&h.store, "t1").await.len(), 50);
}

#[tokio::test]
async fn permanent_failure_keeps_checkpoint_and_next_sync_resumes_the_full_sync() {
    let h = harness().await;
    for i in 0..50 {
        h.source.put(&format!("r{i:02}"), "x");
    }
    assert!(h.engine.sync(opts()).await.success);
    h.source.remove("r00");
    h.source.fail_once_after(3, ErrorKind::Auth);
    let r = h.engine.sync(SyncOptions { full_sync: true, ..opts() }).await;
    assert!(!r.success);
    assert_eq!(r.error_kind, Some(ErrorKind::Auth));
    assert_eq!(h.source.reads.load(Ordering::SeqCst), 2, "auth errors are not retried");
    let state = h.engine.load_state().await.unwrap();
    assert_eq!(state.status, SyncStatus::Failed);
    let full = state.full_sync.expect("the interrupted full sync is remembered");
    assert_eq!(full.cursors["rows"], serde_json::json!(31), "three batches of ten were committed");
    assert_eq!(state.cursors["rows"], serde_json::json!(50), "incremental cursors untouched");

    let r = h.engine.sync(opts()).await;
    assert!(r.success && r.full_sync, "{r:?}");
    assert_eq!(r.items_unchanged, 19, "resumed after the 30 committed rows");
    assert_eq!(r.items_deleted, 1, "the resumed full sync still sweeps");
    assert_eq!(ids(&h.store, "t1").await.len(), 49);
    assert!(h.engine.load_state().await.unwrap().full_sync.is_none());
}

#[tokio::test]
async fn callbacks_and_cancellation() {
    let h = harness().await;
    for i in 0..40 {
        h.source.put(&format!("r{i:02}"), "x");
    }
    let seen = Arc::new(AtomicU64::new(0));
    let s = seen.clone();
    h.engine.on_item_synced(move |_| {
        s.fetch_add(1, Ordering::SeqCst);
    });
    let last = Arc::new(Mutex::new((0, None)));
    let l = last.clone();
    h.engine.on_progress(move |done, total| *l.lock().unwrap() = (done, total));
    let r = h.engine.sync(opts()).await;
    assert!(r.success);
    assert_eq!(seen.load(Ordering::SeqCst), 40);
    assert_eq!(*last.lock().unwrap(), (40, Some(40)));

    // Cancelled before it starts reading: stops at the first boundary.
    let engine = Arc::new(h.engine);
    h.source.put("late", "y");
    let e2 = engine.clone();
    engine.on_progress(move |_, _| e2.cancel_sync());
    for i in 0..40 {
        h.source.put(&format!("n{i:02}"), "x");
    }
    let r = engine.sync(opts()).await;
    assert!(!r.success);
    assert_eq!(r.error_kind, Some(ErrorKind::Cancelled));
    assert!(r.items_synced < 41, "{r:?}");
    let state = engine.load_state().await.unwrap();
    assert_eq!(state.status, SyncStatus::Cancelled);
    // The next sync picks up where the cancelled one stopped.
    let r2 = engine.sync(opts()).await;
    assert_eq!(r.items_synced + r2.items_synced, 41, "{r2:?}");
}

#[tokio::test]
async fn tenants_never_see_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteKnowledgeStore::open(dir.path().join("k.db")).await.unwrap());
    let state = Arc::new(JsonFileStateStore::new(dir.path().join("state")));
    let a = FakeSource::new("tenant-a");
    let b = FakeSource::new("tenant-b");
    a.put("doc", "alpha secret plans");
    b.put("doc", "bravo public notes");
    SyncEngine::new(a.clone(), store.clone(), state.clone()).sync(opts()).await;
    SyncEngine::new(b.clone(), store.clone(), state.clone()).sync(opts()).await;
    let ta = TenantId::new("tenant-a").unwrap();
    let tb = TenantId::new("tenant-b").unwrap();
    assert_eq!(store.search(&ta, "alpha", 10).await.unwrap().len(), 1);
    assert!(store.search(&tb, "alpha", 10).await.unwrap().is_empty());
    assert!(store.search(&ta, "bravo", 10).await.unwrap().is_empty());
    assert_eq!(store.count(&ta, None).await.unwrap(), 1);
    let hit = &store.search(&tb, "notes", 10).await.unwrap()[0];
    assert!(hit.snippet.contains("[notes]"), "{hit:?}");
}

#[tokio::test]
async fn two_syncs_of_one_connector_cannot_overlap_across_engines() {
    let h = harness().await;
    let dir = h._dir.path().join("state");
    let state = JsonFileStateStore::new(&dir);
    let _held = state.lock(h.source.connector_id(), h.source.tenant_id()).await.unwrap();
    let r = h.engine.sync(opts()).await;
    assert!(!r.success);
    assert!(r.errors[0].contains("another sync of fake for tenant t1 is running"), "{r:?}");
}

#[tokio::test]
async fn search_ranks_all_matches_and_snips_the_best() {
    let h = harness().await;
    for i in 0..300 {
        let extra = if i == 150 { " beacon beacon beacon" } else { "" };
        h.source.put(&format!("r{i:03}"), &format!("common words everywhere number {i}{extra} beacon"));
    }
    assert!(h.engine.sync(opts()).await.success);
    let hits = h.store.search(h.source.tenant_id(), "beacon", 3).await.unwrap();
    assert_eq!(hits.len(), 3);
    assert_eq!(hits[0].id, "r150", "the document with the most occurrences ranks first: {hits:?}");
    assert!(hits.windows(2).all(|w| w[0].score >= w[1].score), "{hits:?}");
    assert!(hits.iter().all(|h| h.snippet.contains("[beacon]")), "{hits:?}");
    let other = TenantId::new("someone-else").unwrap();
    assert!(h.store.search(&other, "beacon", 3).await.unwrap().is_empty());
}

#[tokio::test]
async fn item_hints_fetch_current_state_without_moving_cursors() {
    let h = harness().await;
    let item = |id: &str| ItemRef::new("rows", id);
    // Before a first sync there is nothing to build on: the caller runs a sync instead.
    assert!(h.engine.sync_items(&[item("a")]).await.is_none());
    h.source.put("a", "first");
    h.source.put("b", "second");
    assert!(h.engine.sync(opts()).await.success);
    let cursors =
        h.engine.state.load(h.source.connector_id(), h.source.tenant_id()).await.unwrap().unwrap().cursors;

    h.source.put("a", "changed");
    h.source.remove("b");
    h.source.put("c", "new");
    let result = h.engine.sync_items(&[item("a"), item("b"), item("c"), item("zz")]).await.unwrap();
    assert!(result.success, "{:?}", result.errors);
    assert_eq!((result.items_synced, result.items_deleted), (2, 1));
    assert_eq!(ids(&h.store, "t1").await, ["a", "c"]);
    let tenant = TenantId::new("t1").unwrap();
    let hits = h.store.search(&tenant, "changed", 5).await.unwrap();
    assert_eq!(hits.len(), 1, "the hint's write is searchable when it returns");
    let after = h.engine.state.load(h.source.connector_id(), h.source.tenant_id()).await.unwrap().unwrap();
    assert_eq!(after.cursors, cursors, "hints never move cursors");

    // A full sync later keeps what the hint wrote and still sweeps what is gone.
    h.source.remove("c");
    assert!(h.engine.sync(SyncOptions { full_sync: true, ..opts() }).await.success);
    assert_eq!(ids(&h.store, "t1").await, ["a"]);
}
