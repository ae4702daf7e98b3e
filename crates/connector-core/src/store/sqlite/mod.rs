//! The embedded knowledge store: SQLite, with an FTS5 search index kept on a second core.
//!
//! Two files: `knowledge.db` holds the documents (and may hold state); `knowledge.search.db`,
//! beside it, holds the full-text index, which a background thread keeps up with the documents
//! (see [`indexer`]). Writes run on a blocking thread with prepared statements ([`writer`]);
//! reads go through a small sqlx pool.

mod indexer;
mod snippet;
mod writer;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};

use super::{ApplyOutcome, KnowledgeStore, SearchHit, StoredDocument, WriteScope, search_terms};
use crate::document::{Change, Document};
use crate::error::{Error, Result};
use crate::ids::{ConnectorId, TenantId};
use indexer::Indexer;

const SCHEMA_VERSION: &str = "2";

/// How long a connection waits for another writer (another process's sync) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

/// Words of content around the match in a search hit's snippet.
const SNIPPET_WORDS: usize = 24;

/// The documents file, created in one transaction when the store is new. `AUTOINCREMENT`:
/// a rowid is never reused, so the search index can never attach an old entry to a new
/// document (see [`indexer`]).
const DOCS_SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS documents (
        rowid INTEGER PRIMARY KEY AUTOINCREMENT,
        tenant_id TEXT NOT NULL,
        connector_id TEXT NOT NULL,
        id TEXT NOT NULL,
        kind TEXT NOT NULL,
        title TEXT NOT NULL,
        content TEXT NOT NULL,
        url TEXT,
        author TEXT,
        created_at TEXT,
        updated_at TEXT,
        metadata TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        sync_gen INTEGER NOT NULL,
        synced_at TEXT NOT NULL,
        UNIQUE (tenant_id, connector_id, id)
    )",
    // Rowids whose index entries must go (deleted or replaced documents), in commit order.
    "CREATE TABLE IF NOT EXISTS index_deletes (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        doc_rowid INTEGER NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "INSERT OR IGNORE INTO store_meta (key, value) VALUES ('instance_id', lower(hex(randomblob(16))))",
    // Last: its presence says the schema is complete.
    "INSERT OR REPLACE INTO store_meta (key, value) VALUES ('schema_version', '2')",
];

/// Version 1 kept an external-content FTS5 table in the documents file, and rowids could be
/// reused. The documents are copied into the new table; the index is rebuilt in the new file.
const MIGRATE_FROM_1: &[&str] = &[
    "DROP TABLE IF EXISTS documents_fts",
    "ALTER TABLE documents RENAME TO documents_v1",
    // DOCS_SCHEMA follows, then:
    "INSERT INTO documents (tenant_id, connector_id, id, kind, title, content, url, author, created_at, \
     updated_at, metadata, content_hash, sync_gen, synced_at) \
     SELECT tenant_id, connector_id, id, kind, title, content, url, author, created_at, updated_at, \
     metadata, content_hash, sync_gen, synced_at FROM documents_v1 ORDER BY rowid",
    "DROP TABLE documents_v1",
];

/// The search file. Contentless (the text is in the documents file) with `contentless_delete`
/// so an entry is removed by rowid alone.
const SEARCH_SCHEMA: &[&str] = &[
    "CREATE VIRTUAL TABLE IF NOT EXISTS documents_fts USING fts5(
        title, content, content='', contentless_delete=1,
        tokenize='unicode61 remove_diacritics 2'
    )",
    // Merge less eagerly than FTS5's default (4): in the same sync, 35% less indexing time.
    // `automerge=0` (merge only when 64 segments pile up) indexed 17% faster alone but made
    // the whole sync slower and used more memory (each crisis merge rewrites 64 segments at
    // once while the writer competes for the same two cores).
    "INSERT INTO documents_fts (documents_fts, rank) VALUES ('automerge', 16)",
    "INSERT INTO documents_fts (documents_fts, rank) VALUES ('crisismerge', 64)",
    // Pending entries are flushed to a new segment when they pass this size; at FTS5's 1 MB
    // default a 20,000-document pass writes dozens of small segments that must then be merged
    // (measured: 60 MB/s instead of 35 MB/s of text indexed).
    "INSERT INTO documents_fts (documents_fts, rank) VALUES ('hashsize', 16777216)",
    "CREATE TABLE IF NOT EXISTS index_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
];

/// The sibling file of the search index: `knowledge.db` -> `knowledge.search.db`.
pub(crate) fn search_path_of(path: &Path) -> PathBuf {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!("{stem}.search.db"))
}

/// A write connection with the store's settings.
fn connect(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: a commit is on disk before the engine saves the checkpoint that follows it.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "cache_size", -16384)?;
    // Checkpoint the WAL every ~64 MiB instead of every 4 MiB: pages that change in many
    // transactions are copied into the database once per checkpoint, not once per commit.
    conn.pragma_update(None, "wal_autocheckpoint", 16384)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(conn)
}

/// A value of a `key`/`value` table, `None` when the table or the key is missing.
fn meta_value(conn: &Connection, table: &str, key: &str) -> rusqlite::Result<Option<String>> {
    let exists: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
        [table],
        |r| r.get(0),
    )?;
    if !exists {
        return Ok(None);
    }
    conn.query_row(&format!("SELECT value FROM {table} WHERE key = ?1"), [key], |r| r.get(0)).optional()
}

/// Creates or migrates the schemas of both files. Readers never write to a complete store:
/// a write would wait behind a running sync.
fn prepare_files(path: &Path, search_path: &Path) -> Result<()> {
    let fail = |file: &Path, what: &str| {
        let msg = format!("{what} in {}", file.display());
        move |e: rusqlite::Error| Error::store(msg).with_source(e)
    };
    let mut docs = connect(path).map_err(fail(path, "opening the store"))?;
    let version =
        meta_value(&docs, "store_meta", "schema_version").map_err(fail(path, "reading the schema"))?;
    if version.as_deref() != Some(SCHEMA_VERSION) {
        let tx = docs
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(fail(path, "creating the schema"))?;
        // Another process may have done it meanwhile.
        let version =
            meta_value(&tx, "store_meta", "schema_version").map_err(fail(path, "reading the schema"))?;
        let steps: Vec<&str> = match version.as_deref() {
            None => DOCS_SCHEMA.to_vec(),
            Some("1") => {
                let (before, after) = MIGRATE_FROM_1.split_at(2);
                before.iter().chain(DOCS_SCHEMA).chain(after).copied().collect()
            }
            Some(SCHEMA_VERSION) => Vec::new(),
            Some(other) => {
                return Err(Error::store(format!(
                    "{} has store schema version {other}; this program uses {SCHEMA_VERSION}",
                    path.display()
                )));
            }
        };
        for sql in steps {
            tx.execute_batch(sql).map_err(fail(path, "creating the schema"))?;
        }
        tx.commit().map_err(fail(path, "creating the schema"))?;
    }
    let mut search = connect(search_path).map_err(fail(search_path, "opening the search index"))?;
    let ready: bool = search
        .query_row("SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'index_meta')", [], |r| r.get(0))
        .map_err(fail(search_path, "reading the search index"))?;
    if !ready {
        let tx = search
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(fail(search_path, "creating the search index"))?;
        let ready: bool = tx
            .query_row("SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'index_meta')", [], |r| {
                r.get(0)
            })
            .map_err(fail(search_path, "reading the search index"))?;
        if !ready {
            for sql in SEARCH_SCHEMA {
                tx.execute_batch(sql).map_err(fail(search_path, "creating the search index"))?;
            }
        }
        tx.commit().map_err(fail(search_path, "creating the search index"))?;
    }
    Ok(())
}

/// The embedded store. Cloning is cheap and shares the connections.
#[derive(Clone)]
pub struct SqliteKnowledgeStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Reads, and the state store when it shares the file.
    pool: SqlitePool,
    /// Search: connections with the index file attached as `search`.
    search_pool: SqlitePool,
    path: PathBuf,
    search_path: PathBuf,
    /// The write connection, opened on the first write.
    writer: Mutex<Option<Connection>>,
    /// The index thread, started on the first write.
    indexer: OnceLock<Indexer>,
    /// For [`SqliteKnowledgeStore::in_memory`]: removed on drop, after the connections.
    _dir: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for SqliteKnowledgeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteKnowledgeStore").field("path", &self.inner.path).finish_non_exhaustive()
    }
}

impl SqliteKnowledgeStore {
    /// Opens (creating if needed) the store at `path`, with its search index beside it
    /// (`knowledge.db` -> `knowledge.search.db`).
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_in(path.as_ref().to_path_buf(), None).await
    }

    /// A store in a temporary directory, removed when the last clone is dropped (tests, dry
    /// runs).
    pub async fn in_memory() -> Result<Self> {
        let dir =
            tempfile::tempdir().map_err(|e| Error::store("creating a temporary store").with_source(e))?;
        let path = dir.path().join("knowledge.db");
        Self::open_in(path, Some(dir)).await
    }

    async fn open_in(path: PathBuf, dir: Option<tempfile::TempDir>) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                Error::store(format!("creating the store directory {}", parent.display())).with_source(e)
            })?;
        }
        let search_path = search_path_of(&path);
        {
            let (path, search_path) = (path.clone(), search_path.clone());
            tokio::task::spawn_blocking(move || prepare_files(&path, &search_path))
                .await
                .map_err(|e| Error::internal(format!("opening the store: {e}")))??;
        }
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .map_err(|e| Error::config(format!("store path {}: {e}", path.display())))?
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            // Reads and state saves: small page caches (the write connection has the large one).
            .pragma("cache_size", "-4096")
            .pragma("wal_autocheckpoint", "16384");
        let opening = |e| Error::store(format!("opening {}", path.display())).with_source(e);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.clone())
            .await
            .map_err(opening)?;
        let attach = search_path.to_string_lossy().into_owned();
        let search_pool = SqlitePoolOptions::new()
            .max_connections(2)
            .after_connect(move |conn, _| {
                let attach = attach.clone();
                Box::pin(async move {
                    sqlx::query("ATTACH DATABASE ? AS search").bind(attach).execute(conn).await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(opening)?;
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                search_pool,
                path,
                search_path,
                writer: Mutex::new(None),
                indexer: OnceLock::new(),
                _dir: dir,
            }),
        })
    }

    /// The connection pool, for a [`SqliteStateStore`](crate::state::SqliteStateStore) sharing
    /// the file.
    pub fn pool(&self) -> &SqlitePool {
        &self.inner.pool
    }

    /// The file of the search index.
    pub fn search_path(&self) -> &Path {
        &self.inner.search_path
    }

    fn err(&self, what: &str) -> impl FnOnce(sqlx::Error) -> Error + '_ {
        let what = what.to_owned();
        move |e| Error::store(format!("{what} in {}", self.inner.path.display())).with_source(e)
    }

    fn indexer(&self) -> &Indexer {
        self.inner
            .indexer
            .get_or_init(|| Indexer::start(self.inner.path.clone(), self.inner.search_path.clone()))
    }

    /// Runs `job` with the write connection, blocking the calling thread.
    fn write_now<T>(
        inner: &Inner,
        what: &str,
        prune_to: i64,
        job: impl FnOnce(&mut Connection, i64) -> rusqlite::Result<T>,
    ) -> Result<T> {
        let mut guard = inner.writer.lock().unwrap_or_else(|p| p.into_inner());
        let result = match guard.as_mut() {
            Some(conn) => job(conn, prune_to),
            None => connect(&inner.path).and_then(|conn| job(guard.insert(conn), prune_to)),
        };
        result.map_err(|e| {
            // A failed statement may leave the connection mid-transaction: start afresh.
            *guard = None;
            Error::store(format!("{what} in {}", inner.path.display())).with_source(e)
        })
    }

    /// Runs a write off the async executor. On a multi-threaded runtime it runs in place
    /// (`block_in_place`), so a batch is written without being copied; on a current-thread
    /// runtime, `owned` copies what the job needs and it runs on the blocking pool.
    async fn write<T: Send + 'static, J>(
        &self,
        what: &'static str,
        job: impl FnOnce(&mut Connection, i64) -> rusqlite::Result<T>,
        owned: impl FnOnce() -> J,
    ) -> Result<T>
    where
        J: FnOnce(&mut Connection, i64) -> rusqlite::Result<T> + Send + 'static,
    {
        let prune_to = self.indexer().deletes_applied();
        if tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
            return tokio::task::block_in_place(|| Self::write_now(&self.inner, what, prune_to, job));
        }
        let (inner, job) = (Arc::clone(&self.inner), owned());
        tokio::task::spawn_blocking(move || Self::write_now(&inner, what, prune_to, job))
            .await
            .map_err(|e| Error::internal(format!("{what}: {e}")))?
    }
}

impl SqliteKnowledgeStore {
    /// Whether committed documents or deletes are not in the search index yet.
    async fn index_behind(&self) -> Result<bool> {
        sqlx::query_scalar(
            "WITH m AS (SELECT key, value FROM search.index_meta) \
             SELECT (SELECT coalesce(max(rowid), 0) FROM documents) \
                      > coalesce((SELECT CAST(value AS INTEGER) FROM m WHERE key = 'indexed_rowid'), 0) \
                 OR (SELECT coalesce(max(seq), 0) FROM index_deletes) \
                      > coalesce((SELECT CAST(value AS INTEGER) FROM m WHERE key = 'applied_delete'), 0) \
                 OR (SELECT value FROM store_meta WHERE key = 'instance_id') \
                      IS NOT (SELECT value FROM m WHERE key = 'instance_id')",
        )
        .fetch_one(&self.inner.search_pool)
        .await
        .map_err(self.err("reading the search index state"))
    }
}

#[cfg(test)]
mod tests;

fn ts(t: Option<DateTime<Utc>>) -> Option<String> {
    t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
}

fn parse_ts(s: Option<String>) -> Option<DateTime<Utc>> {
    s.and_then(|s| DateTime::parse_from_rfc3339(&s).ok()).map(|t| t.with_timezone(&Utc))
}

fn stored_from_row(row: &SqliteRow) -> Result<StoredDocument> {
    let metadata: String = row.get("metadata");
    Ok(StoredDocument {
        tenant_id: TenantId::new(row.get::<String, _>("tenant_id"))?,
        connector_id: ConnectorId::new(row.get::<String, _>("connector_id"))?,
        document: Document {
            id: row.get("id"),
            kind: row.get("kind"),
            title: row.get("title"),
            content: row.get("content"),
            url: row.get("url"),
            author: row.get("author"),
            created_at: parse_ts(row.get("created_at")),
            updated_at: parse_ts(row.get("updated_at")),
            metadata: serde_json::from_str(&metadata).unwrap_or(serde_json::Value::Null),
        },
        content_hash: row.get("content_hash"),
        synced_at: parse_ts(row.get("synced_at")).unwrap_or_default(),
    })
}

const DOC_COLUMNS: &str = "tenant_id, connector_id, id, kind, title, content, url, author, created_at, \
                           updated_at, metadata, content_hash, synced_at";

#[async_trait]
impl KnowledgeStore for SqliteKnowledgeStore {
    async fn apply(&self, scope: &WriteScope, changes: &[Change]) -> Result<ApplyOutcome> {
        if changes.is_empty() {
            return Ok(ApplyOutcome::default());
        }
        let outcome = self
            .write(
                "writing documents",
                |conn, prune_to| writer::apply(conn, scope, changes, prune_to),
                || {
                    let (scope, changes) = (scope.clone(), changes.to_vec());
                    move |conn: &mut Connection, prune_to| writer::apply(conn, &scope, &changes, prune_to)
                },
            )
            .await?;
        let written = changes.len() as u64;
        self.indexer().kick(written);
        Ok(outcome)
    }

    async fn sweep(&self, tenant: &TenantId, connector: &ConnectorId, generation: i64) -> Result<u64> {
        let scope = WriteScope {
            tenant_id: tenant.clone(),
            connector_id: connector.clone(),
            generation,
            touch_unchanged: false,
        };
        let deleted = self
            .write(
                "deleting documents",
                |conn, _| writer::sweep(conn, &scope),
                || {
                    let scope = scope.clone();
                    move |conn: &mut Connection, _| writer::sweep(conn, &scope)
                },
            )
            .await?;
        self.indexer().kick(deleted);
        Ok(deleted)
    }

    async fn flush_index(&self) -> Result<()> {
        match self.inner.indexer.get() {
            None => return Ok(()), // nothing was written by this process
            Some(indexer) if indexer.caught_up() => return Ok(()),
            Some(_) => {}
        }
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || inner.indexer.get().map_or(Ok(()), Indexer::wait))
            .await
            .map_err(|e| Error::internal(format!("updating the search index: {e}")))?
            .map_err(|e| {
                Error::store(format!("updating the search index {}: {e}", self.inner.search_path.display()))
            })
    }

    fn index_busy(&self) -> Duration {
        self.inner.indexer.get().map(Indexer::busy).unwrap_or_default()
    }

    async fn get(
        &self,
        tenant: &TenantId,
        connector: &ConnectorId,
        id: &str,
    ) -> Result<Option<StoredDocument>> {
        let sql = format!(
            "SELECT {DOC_COLUMNS} FROM documents WHERE tenant_id = ? AND connector_id = ? AND id = ?"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
            .bind(tenant.as_str())
            .bind(connector.as_str())
            .bind(id)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(self.err("reading a document"))?;
        row.as_ref().map(stored_from_row).transpose()
    }

    fn export<'a>(
        &'a self,
        tenant: &'a TenantId,
        connector: Option<&'a ConnectorId>,
    ) -> BoxStream<'a, Result<StoredDocument>> {
        let sql: &'static str = if connector.is_some() {
            "SELECT tenant_id, connector_id, id, kind, title, content, url, author, created_at, updated_at, \
             metadata, content_hash, synced_at FROM documents WHERE tenant_id = ? AND connector_id = ? \
             ORDER BY connector_id, id"
        } else {
            "SELECT tenant_id, connector_id, id, kind, title, content, url, author, created_at, updated_at, \
             metadata, content_hash, synced_at FROM documents WHERE tenant_id = ? ORDER BY connector_id, id"
        };
        let mut q = sqlx::query(sql).bind(tenant.as_str());
        if let Some(c) = connector {
            q = q.bind(c.as_str());
        }
        q.fetch(&self.inner.pool)
            .map_err(|e| Error::store("exporting documents").with_source(e))
            .and_then(|row| async move { stored_from_row(&row) })
            .boxed()
    }

    async fn search(&self, tenant: &TenantId, query: &str, limit: usize) -> Result<Vec<SearchHit>> {
        let terms = search_terms(query)?;
        // Normally the index is complete (every sync waits for it). After a writer crashed,
        // or a search file was deleted, catch up first rather than answer from a partial index.
        if self.index_behind().await? {
            self.indexer();
            self.flush_index().await?;
        }
        let fts_query = terms.iter().map(|t| format!("\"{t}\"")).collect::<Vec<_>>().join(" ");
        // The full-text match drives the query (CROSS JOIN fixes SQLite's join order: with the
        // tenant's rows as the outer loop the match would run once per row). Every match is
        // ranked; content is read and snippets are cut for the best `limit` only. An index
        // entry whose document is gone (deleted, not yet unindexed) finds no row and drops out.
        let rows = sqlx::query(
            "WITH top AS MATERIALIZED ( \
                 SELECT f.rowid AS rid, bm25(f.documents_fts, 3.0, 1.0) AS rank \
                 FROM search.documents_fts f CROSS JOIN documents d ON d.rowid = f.rowid \
                 WHERE f.documents_fts MATCH ?1 AND d.tenant_id = ?2 \
                 ORDER BY rank LIMIT ?3) \
             SELECT d.id, d.connector_id, d.kind, d.title, d.url, d.content, top.rank AS rank \
             FROM top CROSS JOIN documents d ON d.rowid = top.rid \
             ORDER BY top.rank",
        )
        .bind(fts_query)
        .bind(tenant.as_str())
        .bind(limit as i64)
        .fetch_all(&self.inner.search_pool)
        .await
        .map_err(self.err("searching"))?;
        rows.iter()
            .map(|r| {
                Ok(SearchHit {
                    id: r.get("id"),
                    connector_id: ConnectorId::new(r.get::<String, _>("connector_id"))?,
                    kind: r.get("kind"),
                    title: r.get("title"),
                    url: r.get("url"),
                    snippet: snippet::cut(r.get("content"), &terms, SNIPPET_WORDS),
                    score: -r.get::<f64, _>("rank"),
                })
            })
            .collect()
    }

    async fn count(&self, tenant: &TenantId, connector: Option<&ConnectorId>) -> Result<u64> {
        let n: i64 = match connector {
            Some(c) => {
                sqlx::query_scalar("SELECT count(*) FROM documents WHERE tenant_id = ? AND connector_id = ?")
                    .bind(tenant.as_str())
                    .bind(c.as_str())
                    .fetch_one(&self.inner.pool)
                    .await
            }
            None => {
                sqlx::query_scalar("SELECT count(*) FROM documents WHERE tenant_id = ?")
                    .bind(tenant.as_str())
                    .fetch_one(&self.inner.pool)
                    .await
            }
        }
        .map_err(self.err("counting documents"))?;
        Ok(n as u64)
    }

    fn describe(&self) -> String {
        format!("SQLite {}", self.inner.path.display())
    }
}
