//! Sync state: [`SyncState`] (per-stream cursors, counters, status, run history) and the
//! [`StateStore`]s that persist it: versioned JSON files (the default), SQLite, PostgreSQL, and
//! memory (tests).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::connector::{Cursor, Cursors};
use crate::error::{Error, Result};
use crate::ids::{ConnectorId, TenantId};

/// The state document's format version. Bumped on incompatible changes; older documents are
/// migrated on load, newer ones refused.
pub const STATE_VERSION: u32 = 1;

/// How many runs the history keeps per connector. The state is rewritten at every checkpoint,
/// so it must stay small.
pub const HISTORY_LIMIT: usize = 100;

/// How many error messages a history entry keeps.
pub const HISTORY_ERRORS_LIMIT: usize = 3;

/// How many error messages a state keeps from its last run.
pub const ERRORS_LIMIT: usize = 50;

/// Where a connector stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncStatus {
    /// Never synced.
    #[default]
    Idle,
    /// A sync is running (or the process running it died; see `last_sync_at`).
    Running,
    /// The last sync completed.
    Success,
    /// The last sync completed with failed items.
    Partial,
    /// The last sync failed.
    Failed,
    /// The last sync was cancelled.
    Cancelled,
}

impl SyncStatus {
    /// Lowercase name (`success`).
    pub fn as_str(self) -> &'static str {
        match self {
            SyncStatus::Idle => "idle",
            SyncStatus::Running => "running",
            SyncStatus::Success => "success",
            SyncStatus::Partial => "partial",
            SyncStatus::Failed => "failed",
            SyncStatus::Cancelled => "cancelled",
        }
    }
}

/// A full sync in progress: its generation and the cursors it reached. Kept so that a full
/// sync interrupted by a crash resumes where it stopped and still sweeps deleted items.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FullSyncProgress {
    /// Documents seen by this full sync are stamped with this generation; at the end, older
    /// ones are deleted.
    pub generation: i64,
    /// When the full sync began.
    pub started_at: DateTime<Utc>,
    /// Cursors reached so far by the full sync.
    pub cursors: Cursors,
}

/// One sync run, as kept in the history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// When the run began.
    pub started_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: DateTime<Utc>,
    /// `success`, `partial`, `failed` or `cancelled`.
    pub status: SyncStatus,
    /// Whether it was a full sync.
    pub full_sync: bool,
    /// Items written (new or changed).
    pub items_synced: u64,
    /// Items that failed.
    pub items_failed: u64,
    /// Items deleted.
    pub items_deleted: u64,
    /// Items read but unchanged.
    pub items_unchanged: u64,
    /// Errors of the run (first few).
    pub errors: Vec<String>,
}

/// A connector's persisted state: a versioned JSON document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncState {
    /// Format version ([`STATE_VERSION`]).
    pub version: u32,
    /// Whose state this is.
    pub connector_id: ConnectorId,
    /// The tenant.
    pub tenant_id: TenantId,
    /// Incremental cursors by stream.
    #[serde(default)]
    pub cursors: Cursors,
    /// A full sync in progress, if one was interrupted.
    #[serde(default)]
    pub full_sync: Option<FullSyncProgress>,
    /// The last generation handed out (monotonic).
    #[serde(default)]
    pub generation: i64,
    /// The last item written.
    #[serde(default)]
    pub last_item_id: Option<String>,
    /// When the last sync ended.
    #[serde(default)]
    pub last_sync_at: Option<DateTime<Utc>>,
    /// When the last full sync completed.
    #[serde(default)]
    pub last_full_sync_at: Option<DateTime<Utc>>,
    /// Items written over the connector's life.
    #[serde(default)]
    pub items_synced: u64,
    /// Current status.
    #[serde(default)]
    pub status: SyncStatus,
    /// Errors of the last run.
    #[serde(default)]
    pub errors: Vec<String>,
    /// Past runs, newest last.
    #[serde(default)]
    pub history: VecDeque<RunRecord>,
    /// Bumped on every save; lets a reader tell two saves apart.
    #[serde(default)]
    pub revision: u64,
}

impl SyncState {
    /// A fresh state.
    pub fn new(connector_id: ConnectorId, tenant_id: TenantId) -> Self {
        Self {
            version: STATE_VERSION,
            connector_id,
            tenant_id,
            cursors: Cursors::new(),
            full_sync: None,
            generation: 0,
            last_item_id: None,
            last_sync_at: None,
            last_full_sync_at: None,
            items_synced: 0,
            status: SyncStatus::Idle,
            errors: Vec::new(),
            history: VecDeque::new(),
            revision: 0,
        }
    }

    /// The cursor when the connector has one stream (the guide's `state.cursor`).
    pub fn cursor(&self) -> Option<&Cursor> {
        if self.cursors.len() == 1 { self.cursors.values().next() } else { None }
    }

    /// Appends a run to the history, keeping the newest [`HISTORY_LIMIT`] runs and the first
    /// [`HISTORY_ERRORS_LIMIT`] errors of each.
    pub fn push_history(&mut self, mut run: RunRecord) {
        if run.errors.len() > HISTORY_ERRORS_LIMIT {
            let more = run.errors.len() - HISTORY_ERRORS_LIMIT;
            run.errors.truncate(HISTORY_ERRORS_LIMIT);
            run.errors.push(format!("(+{more} more)"));
        }
        self.history.push_back(run);
        while self.history.len() > HISTORY_LIMIT {
            self.history.pop_front();
        }
    }

    /// Parses a state document, checking its version.
    pub fn from_json(bytes: &[u8], origin: &str) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| Error::state(format!("{origin}: not valid JSON: {e}")))?;
        let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
        if version > u64::from(STATE_VERSION) {
            return Err(Error::state(format!(
                "{origin}: state version {version} is newer than this program supports ({STATE_VERSION}); upgrade connectors"
            )));
        }
        serde_json::from_value(value).map_err(|e| Error::state(format!("{origin}: invalid state: {e}")))
    }
}

/// Persists [`SyncState`]s.
///
/// # Behavior
/// - `save` is atomic: after a crash, `load` returns either the previous or the new state,
///   never a mix or a truncated document.
/// - `load` of a connector never saved returns `Ok(None)`.
#[async_trait]
pub trait StateStore: Send + Sync {
    /// Loads the state of (connector, tenant).
    async fn load(&self, connector: &ConnectorId, tenant: &TenantId) -> Result<Option<SyncState>>;
    /// Saves `state` atomically.
    async fn save(&self, state: &SyncState) -> Result<()>;
    /// Deletes the state; returns whether there was one.
    async fn reset(&self, connector: &ConnectorId, tenant: &TenantId) -> Result<bool>;
    /// Every saved state.
    async fn list(&self) -> Result<Vec<SyncState>>;
    /// Where states live, for messages.
    fn describe(&self) -> String;

    /// Takes the exclusive right to sync (connector, tenant) until the guard is dropped, or
    /// fails at once naming who holds it. Stores without cross-process locks return a no-op
    /// guard (the engine still refuses two syncs in one process).
    async fn lock(&self, _connector: &ConnectorId, _tenant: &TenantId) -> Result<StateLock> {
        Ok(StateLock(None))
    }
}

/// Held while a sync runs; releases the lock when dropped.
pub struct StateLock(#[allow(dead_code)] Option<Box<dyn Send + Sync>>);

impl std::fmt::Debug for StateLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateLock")
    }
}

/// The default store: one JSON file per (connector, tenant) at
/// `{dir}/{connector_id}_{tenant_id}.json`, written to a temporary file, fsynced and renamed.
#[derive(Debug, Clone)]
pub struct JsonFileStateStore {
    dir: PathBuf,
}

impl JsonFileStateStore {
    /// A store in `dir` (created on first save).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// A store in `$ARAGORA_HOME/sync_state`.
    pub fn default_location() -> Self {
        Self::new(crate::home::default_state_dir())
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of (connector, tenant).
    pub fn path_of(&self, connector: &ConnectorId, tenant: &TenantId) -> PathBuf {
        self.dir.join(format!("{connector}_{tenant}.json"))
    }
}

fn write_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    // Make the rename itself durable.
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[async_trait]
impl StateStore for JsonFileStateStore {
    async fn load(&self, connector: &ConnectorId, tenant: &TenantId) -> Result<Option<SyncState>> {
        let path = self.path_of(connector, tenant);
        match tokio::fs::read(&path).await {
            Ok(bytes) => SyncState::from_json(&bytes, &path.display().to_string()).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::state(format!("reading {}", path.display())).with_source(e)),
        }
    }

    async fn save(&self, state: &SyncState) -> Result<()> {
        let path = self.path_of(&state.connector_id, &state.tenant_id);
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| Error::internal(e.to_string()))?;
        let dir = self.dir.clone();
        let target = path.clone();
        tokio::task::spawn_blocking(move || write_atomic(&dir, &target, &bytes))
            .await
            .map_err(|e| Error::internal(e.to_string()))?
            .map_err(|e| Error::state(format!("writing {}", path.display())).with_source(e))
    }

    async fn reset(&self, connector: &ConnectorId, tenant: &TenantId) -> Result<bool> {
        let path = self.path_of(connector, tenant);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::state(format!("removing {}", path.display())).with_source(e)),
        }
    }

    async fn list(&self) -> Result<Vec<SyncState>> {
        let mut out = Vec::new();
        let mut entries = match tokio::fs::read_dir(&self.dir).await {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(Error::state(format!("listing {}", self.dir.display())).with_source(e)),
        };
        while let Some(entry) = entries.next_entry().await? {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json") {
                let bytes = tokio::fs::read(&path).await?;
                out.push(SyncState::from_json(&bytes, &path.display().to_string())?);
            }
        }
        out.sort_by(|a, b| (&a.connector_id, &a.tenant_id).cmp(&(&b.connector_id, &b.tenant_id)));
        Ok(out)
    }

    fn describe(&self) -> String {
        format!("JSON files in {}", self.dir.display())
    }

    async fn lock(&self, connector: &ConnectorId, tenant: &TenantId) -> Result<StateLock> {
        let path = self.dir.join(format!("{connector}_{tenant}.lock"));
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| Error::state(format!("creating {}", self.dir.display())).with_source(e))?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::state(format!("opening {}", path.display())).with_source(e))?;
        match file.try_lock() {
            Ok(()) => Ok(StateLock(Some(Box::new(file)))),
            Err(std::fs::TryLockError::WouldBlock) => Err(Error::config(format!(
                "another sync of {connector} for tenant {tenant} is running (lock {})",
                path.display()
            ))),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(Error::state(format!("locking {}", path.display())).with_source(e))
            }
        }
    }
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
const STATE_TABLE_SQL: &str = "CREATE TABLE IF NOT EXISTS connector_sync_state (
    connector_id TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    state TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (connector_id, tenant_id)
)";

#[cfg(any(feature = "sqlite", feature = "postgres"))]
const STATE_UPSERT_SQL: &str = "INSERT INTO connector_sync_state (connector_id, tenant_id, state, updated_at)
    VALUES ($1, $2, $3, $4)
    ON CONFLICT (connector_id, tenant_id) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at";

#[cfg(any(feature = "sqlite", feature = "postgres"))]
macro_rules! sql_state_store {
    ($(#[$doc:meta])* $name:ident, $pool:ty, $label:literal, $lock:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone)]
        pub struct $name {
            pool: $pool,
            location: String,
        }

        impl $name {
            /// Uses `pool`, creating the state table when missing.
            pub async fn new(pool: $pool, location: impl Into<String>) -> Result<Self> {
                let fail = |e| Error::state(concat!("creating the ", $label, " state table")).with_source(e);
                // Several processes may start at once: PostgreSQL's CREATE TABLE IF NOT EXISTS
                // is not safe against a concurrent one (a duplicate key in its catalog), so
                // creation is serialized where the database needs it.
                let mut tx = pool.begin().await.map_err(fail)?;
                let lock: Option<&str> = $lock;
                if let Some(lock) = lock {
                    sqlx::query(lock).execute(&mut *tx).await.map_err(fail)?;
                }
                sqlx::query(STATE_TABLE_SQL).execute(&mut *tx).await.map_err(fail)?;
                tx.commit().await.map_err(fail)?;
                Ok(Self { pool, location: location.into() })
            }
        }

        #[async_trait]
        impl StateStore for $name {
            async fn load(&self, connector: &ConnectorId, tenant: &TenantId) -> Result<Option<SyncState>> {
                let row: Option<(String,)> = sqlx::query_as(
                    "SELECT state FROM connector_sync_state WHERE connector_id = $1 AND tenant_id = $2",
                )
                .bind(connector.as_str())
                .bind(tenant.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| Error::state(format!("loading state of {connector}/{tenant}")).with_source(e))?;
                row.map(|(s,)| SyncState::from_json(s.as_bytes(), &format!("{} state {connector}/{tenant}", $label)))
                    .transpose()
            }

            async fn save(&self, state: &SyncState) -> Result<()> {
                let json = serde_json::to_string(state).map_err(|e| Error::internal(e.to_string()))?;
                sqlx::query(STATE_UPSERT_SQL)
                    .bind(state.connector_id.as_str())
                    .bind(state.tenant_id.as_str())
                    .bind(json)
                    .bind(Utc::now().to_rfc3339())
                    .execute(&self.pool)
                    .await
                    .map_err(|e| {
                        Error::state(format!("saving state of {}/{}", state.connector_id, state.tenant_id))
                            .with_source(e)
                    })?;
                Ok(())
            }

            async fn reset(&self, connector: &ConnectorId, tenant: &TenantId) -> Result<bool> {
                let done = sqlx::query("DELETE FROM connector_sync_state WHERE connector_id = $1 AND tenant_id = $2")
                    .bind(connector.as_str())
                    .bind(tenant.as_str())
                    .execute(&self.pool)
                    .await
                    .map_err(|e| Error::state(format!("resetting state of {connector}/{tenant}")).with_source(e))?;
                Ok(done.rows_affected() > 0)
            }

            async fn list(&self) -> Result<Vec<SyncState>> {
                let rows: Vec<(String,)> = sqlx::query_as(
                    "SELECT state FROM connector_sync_state ORDER BY connector_id, tenant_id",
                )
                .fetch_all(&self.pool)
                .await
                .map_err(|e| Error::state("listing states").with_source(e))?;
                rows.iter().map(|(s,)| SyncState::from_json(s.as_bytes(), $label)).collect()
            }

            fn describe(&self) -> String {
                format!("{} {}", $label, self.location)
            }
        }
    };
}

#[cfg(feature = "sqlite")]
sql_state_store!(
    /// State in a SQLite database (table `connector_sync_state`); may share the file of the
    /// embedded knowledge store.
    SqliteStateStore,
    sqlx::SqlitePool,
    "SQLite",
    None
);

#[cfg(feature = "postgres")]
sql_state_store!(
    /// State in PostgreSQL (table `connector_sync_state`), for several processes sharing it.
    PgStateStore,
    sqlx::PgPool,
    "PostgreSQL",
    Some("SELECT pg_advisory_xact_lock(7262536)")
);

/// States in memory: nothing survives the process (tests, benchmarks, dry runs). No
/// cross-process lock (the engine still refuses two syncs in one process).
#[derive(Debug, Default)]
pub struct MemoryStateStore {
    states: std::sync::Mutex<std::collections::HashMap<(ConnectorId, TenantId), SyncState>>,
}

impl MemoryStateStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl StateStore for MemoryStateStore {
    async fn load(&self, connector: &ConnectorId, tenant: &TenantId) -> Result<Option<SyncState>> {
        let states = self.states.lock().expect("poisoned");
        Ok(states.get(&(connector.clone(), tenant.clone())).cloned())
    }

    async fn save(&self, state: &SyncState) -> Result<()> {
        let key = (state.connector_id.clone(), state.tenant_id.clone());
        self.states.lock().expect("poisoned").insert(key, state.clone());
        Ok(())
    }

    async fn reset(&self, connector: &ConnectorId, tenant: &TenantId) -> Result<bool> {
        let mut states = self.states.lock().expect("poisoned");
        Ok(states.remove(&(connector.clone(), tenant.clone())).is_some())
    }

    async fn list(&self) -> Result<Vec<SyncState>> {
        let mut out: Vec<SyncState> = self.states.lock().expect("poisoned").values().cloned().collect();
        out.sort_by(|a, b| (&a.connector_id, &a.tenant_id).cmp(&(&b.connector_id, &b.tenant_id)));
        Ok(out)
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> (ConnectorId, TenantId) {
        (ConnectorId::new("docs-db").unwrap(), TenantId::new("workspace-1").unwrap())
    }

    #[tokio::test]
    async fn json_store_round_trips_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = JsonFileStateStore::new(dir.path().join("sync_state"));
        let (c, t) = ids();
        assert!(store.load(&c, &t).await.unwrap().is_none());
        let mut s = SyncState::new(c.clone(), t.clone());
        s.cursors.insert("public.documents".into(), serde_json::json!({"ts": "2024-01-01", "pk": "9"}));
        store.save(&s).await.unwrap();
        assert!(dir.path().join("sync_state/docs-db_workspace-1.json").exists());
        assert_eq!(store.load(&c, &t).await.unwrap().unwrap(), s);
        assert_eq!(store.list().await.unwrap().len(), 1);
        assert!(store.reset(&c, &t).await.unwrap());
        assert!(!store.reset(&c, &t).await.unwrap());
        // No temporary files left behind.
        assert_eq!(std::fs::read_dir(dir.path().join("sync_state")).unwrap().count(), 0);
    }

    #[test]
    fn history_stays_bounded() {
        let (c, t) = ids();
        let mut s = SyncState::new(c, t);
        let now = Utc::now();
        for i in 0..(HISTORY_LIMIT + 7) {
            s.push_history(RunRecord {
                started_at: now,
                finished_at: now,
                status: SyncStatus::Failed,
                full_sync: false,
                items_synced: i as u64,
                items_failed: 0,
                items_deleted: 0,
                items_unchanged: 0,
                errors: (0..10).map(|e| format!("error {e}")).collect(),
            });
        }
        assert_eq!(s.history.len(), HISTORY_LIMIT);
        assert_eq!(s.history.front().unwrap().items_synced, 7, "the oldest runs go first");
        let last = s.history.back().unwrap();
        assert_eq!(last.errors.len(), HISTORY_ERRORS_LIMIT + 1);
        assert_eq!(last.errors.last().unwrap(), "(+7 more)");
    }

    #[tokio::test]
    async fn corrupt_and_future_states_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let store = JsonFileStateStore::new(dir.path());
        let (c, t) = ids();
        std::fs::write(store.path_of(&c, &t), b"{\"version\": 1, \"connector_").unwrap();
        let err = store.load(&c, &t).await.unwrap_err().to_string();
        assert!(err.contains("docs-db_workspace-1.json") && err.contains("not valid JSON"), "{err}");
        std::fs::write(store.path_of(&c, &t), br#"{"version": 99}"#).unwrap();
        let err = store.load(&c, &t).await.unwrap_err().to_string();
        assert!(err.contains("newer than this program"), "{err}");
    }

    #[cfg(feature = "sqlite")]
    #[tokio::test]
    async fn sqlite_store_round_trips() {
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .unwrap();
        let store = SqliteStateStore::new(pool, ":memory:").await.unwrap();
        let (c, t) = ids();
        let mut s = SyncState::new(c.clone(), t.clone());
        store.save(&s).await.unwrap();
        s.items_synced = 5;
        store.save(&s).await.unwrap();
        assert_eq!(store.load(&c, &t).await.unwrap().unwrap().items_synced, 5);
        assert!(store.reset(&c, &t).await.unwrap());
        assert!(store.load(&c, &t).await.unwrap().is_none());
    }
}
