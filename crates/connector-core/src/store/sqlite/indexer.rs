//! The search index, kept on its own thread and in its own file.
//!
//! Documents live in `knowledge.db`; the FTS5 index lives in the sibling `knowledge.search.db`,
//! so indexing (half the cost of a bulk load) runs on another core beside the document writes
//! instead of inside their transactions. The index follows the documents like a log consumer:
//!
//! - document rowids are `AUTOINCREMENT` and an update gets a new rowid, so "every document
//!   with a rowid above the high-water mark" is exactly what is not indexed yet;
//! - a deleted or replaced rowid is written to `index_deletes` in the same transaction;
//! - each indexing transaction reads one snapshot of `knowledge.db` and commits the index
//!   entries together with the new high-water marks, so a crash at any point leaves an index
//!   that is merely behind, and the next pass catches up. Nothing to recover by hand; deleting
//!   the search file rebuilds the index.
//!
//! Several processes may write one store: each indexing transaction holds the search file's
//! write lock and reads the high-water marks inside it, so no entry is indexed twice.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{connect, meta_value};

/// Index entries per transaction: large transactions let FTS5 flush bigger segments and
/// merge less; ~10 MB of text at typical document sizes. FTS5 writes its pending entries at
/// every commit, so the thread also waits for this many written documents before a pass
/// (unless someone waits for the index, or [`LINGER`] passed): indexing each small commit of
/// the writer separately measured 3x slower.
const CHUNK: i64 = 20_000;

/// The longest a written document waits for a pass when nobody asks for the index.
const LINGER: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Progress {
    /// Bumped by every commit of documents and every flush request.
    requested: u64,
    /// The value of `requested` when the last complete catch-up began.
    done: u64,
    /// Documents written since the last pass began.
    written: u64,
    /// Someone waits: start a pass now.
    urgent: bool,
    /// The failure of the last pass, if it failed.
    error: Option<String>,
    /// `index_deletes` up to here are applied (the writer prunes them).
    deletes_applied: i64,
    stop: bool,
}

struct Shared {
    progress: Mutex<Progress>,
    changed: Condvar,
    busy_nanos: AtomicU64,
}

/// A handle on the indexing thread; dropping it stops the thread.
pub(super) struct Indexer {
    shared: Arc<Shared>,
}

impl Indexer {
    /// Starts the thread, which catches up at once with whatever is not indexed yet.
    pub(super) fn start(docs: PathBuf, search: PathBuf) -> Self {
        let shared = Arc::new(Shared {
            progress: Mutex::new(Progress { requested: 1, ..Progress::default() }),
            changed: Condvar::new(),
            busy_nanos: AtomicU64::new(0),
        });
        let worker = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name("knowledge-index".into())
            .spawn(move || run(&worker, &docs, &search));
        if let Err(e) = spawned {
            let mut p = shared.progress.lock().expect("poisoned");
            p.error = Some(format!("starting the index thread: {e}"));
            p.stop = true;
        }
        Self { shared }
    }

    /// Asks for a catch-up after `written` documents were committed (or deleted).
    pub(super) fn kick(&self, written: u64) {
        let mut p = self.shared.progress.lock().expect("poisoned");
        p.requested += 1;
        p.written += written;
        if p.written >= CHUNK as u64 {
            self.shared.changed.notify_all();
        }
    }

    /// Whether every commit announced so far is indexed, by a pass that succeeded: then
    /// [`wait`](Self::wait) has nothing to wait for (a sync that wrote nothing skips it).
    pub(super) fn caught_up(&self) -> bool {
        let p = self.shared.progress.lock().expect("poisoned");
        p.done >= p.requested && p.error.is_none() && !p.stop
    }

    /// Blocks until everything committed before the call is indexed.
    pub(super) fn wait(&self) -> Result<(), String> {
        let mut p = self.shared.progress.lock().expect("poisoned");
        p.requested += 1;
        p.urgent = true;
        let target = p.requested;
        self.shared.changed.notify_all();
        loop {
            if p.done >= target {
                // `done` moves only when a pass that began after the request ends, so the
                // error, if any, is that pass's.
                return match &p.error {
                    Some(e) => Err(e.clone()),
                    None => Ok(()),
                };
            }
            if p.stop {
                return Err(p.error.clone().unwrap_or_else(|| "the index thread stopped".into()));
            }
            p = self.shared.changed.wait(p).expect("poisoned");
        }
    }

    /// Total time the thread spent indexing.
    pub(super) fn busy(&self) -> Duration {
        Duration::from_nanos(self.shared.busy_nanos.load(Ordering::Relaxed))
    }

    /// Deletes up to here may be pruned from `index_deletes`.
    pub(super) fn deletes_applied(&self) -> i64 {
        self.shared.progress.lock().expect("poisoned").deletes_applied
    }
}

impl Drop for Indexer {
    fn drop(&mut self) {
        self.shared.progress.lock().expect("poisoned").stop = true;
        self.shared.changed.notify_all();
    }
}

fn run(shared: &Shared, docs_path: &Path, search_path: &Path) {
    let mut conns: Option<(Connection, Connection)> = None;
    loop {
        let target = {
            let mut p = shared.progress.lock().expect("poisoned");
            let mut pending_since: Option<Instant> = None;
            loop {
                if p.stop {
                    return;
                }
                if p.done >= p.requested {
                    pending_since = None;
                    p = shared.changed.wait(p).expect("poisoned");
                    continue;
                }
                let since = *pending_since.get_or_insert_with(Instant::now);
                let lingered = since.elapsed();
                if p.urgent || p.written >= CHUNK as u64 || lingered >= LINGER {
                    break;
                }
                p = shared.changed.wait_timeout(p, LINGER - lingered).expect("poisoned").0;
            }
            p.written = 0;
            p.urgent = false;
            p.requested
        };
        let started = Instant::now();
        let result =
            open(&mut conns, docs_path, search_path).and_then(|(docs, search)| catch_up(docs, search));
        shared.busy_nanos.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let mut p = shared.progress.lock().expect("poisoned");
        match result {
            Ok(deletes_applied) => {
                p.done = target;
                p.error = None;
                p.deletes_applied = deletes_applied;
            }
            Err(e) => {
                tracing::warn!(error = %e, "updating the search index failed; the next write retries");
                conns = None;
                // Wait for the next request instead of spinning on the failure.
                p.done = target;
                p.error = Some(e.to_string());
            }
        }
        shared.changed.notify_all();
    }
}

fn open<'a>(
    conns: &'a mut Option<(Connection, Connection)>,
    docs_path: &Path,
    search_path: &Path,
) -> rusqlite::Result<(&'a mut Connection, &'a mut Connection)> {
    if conns.is_none() {
        let docs = connect(docs_path)?;
        // It reads each document once, in rowid order: a page cache would only hold memory.
        docs.pragma_update(None, "cache_size", -2048)?;
        let mut search = connect(search_path)?;
        // The index can always be rebuilt from the documents: a commit lost in a power cut is
        // indexed again, so it need not wait for the disk.
        search.pragma_update(None, "synchronous", "NORMAL")?;
        search.pragma_update(None, "cache_size", -8192)?;
        reset_if_foreign(&docs, &mut search)?;
        *conns = Some((docs, search));
    }
    let (docs, search) = conns.as_mut().expect("just opened");
    Ok((docs, search))
}

/// The index file belongs to one documents file (its `instance_id`): if the documents file was
/// replaced, the old index is dropped and rebuilt.
fn reset_if_foreign(docs: &Connection, search: &mut Connection) -> rusqlite::Result<()> {
    let instance = meta_value(docs, "store_meta", "instance_id")?.unwrap_or_default();
    let indexed: Option<String> = search
        .query_row("SELECT value FROM index_meta WHERE key = 'instance_id'", [], |r| r.get(0))
        .optional()?;
    if indexed.as_deref() == Some(instance.as_str()) {
        return Ok(());
    }
    let tx = search.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute("INSERT INTO documents_fts (documents_fts) VALUES ('delete-all')", [])?;
    tx.execute("INSERT OR REPLACE INTO index_meta (key, value) VALUES ('instance_id', ?1)", [&instance])?;
    tx.execute("INSERT OR REPLACE INTO index_meta (key, value) VALUES ('indexed_rowid', '0')", [])?;
    tx.execute("INSERT OR REPLACE INTO index_meta (key, value) VALUES ('applied_delete', '0')", [])?;
    tx.commit()
}

/// Indexes everything committed so far, in chunks. Returns the last applied delete.
fn catch_up(docs: &mut Connection, search: &mut Connection) -> rusqlite::Result<i64> {
    loop {
        let (done, applied) = pass(docs, search)?;
        if done < CHUNK {
            return Ok(applied);
        }
    }
}

fn counter(conn: &Connection, key: &str) -> rusqlite::Result<i64> {
    let v: Option<String> =
        conn.query_row("SELECT value FROM index_meta WHERE key = ?1", [key], |r| r.get(0)).optional()?;
    Ok(v.and_then(|v| v.parse().ok()).unwrap_or(0))
}

/// One transaction: applies up to `CHUNK` deletes and indexes up to `CHUNK` documents.
/// Returns the larger of the two counts and the last applied delete.
fn pass(docs: &mut Connection, search: &mut Connection) -> rusqlite::Result<(i64, i64)> {
    let stx = search.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut indexed = counter(&stx, "indexed_rowid")?;
    let mut applied = counter(&stx, "applied_delete")?;
    // One read snapshot of the documents for both queries.
    let dtx = docs.transaction_with_behavior(TransactionBehavior::Deferred)?;
    let (mut deletes, mut inserts) = (0, 0);
    {
        let mut remove = stx.prepare_cached("DELETE FROM documents_fts WHERE rowid = ?1")?;
        let mut pending = dtx.prepare_cached(
            "SELECT seq, doc_rowid FROM index_deletes WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let mut rows = pending.query(params![applied, CHUNK])?;
        while let Some(row) = rows.next()? {
            applied = row.get(0)?;
            remove.execute([row.get::<_, i64>(1)?])?;
            deletes += 1;
        }
        let mut add =
            stx.prepare_cached("INSERT INTO documents_fts (rowid, title, content) VALUES (?1, ?2, ?3)")?;
        let mut fresh = dtx.prepare_cached(
            "SELECT rowid, title, content FROM documents WHERE rowid > ?1 ORDER BY rowid LIMIT ?2",
        )?;
        let mut rows = fresh.query(params![indexed, CHUNK])?;
        while let Some(row) = rows.next()? {
            indexed = row.get(0)?;
            add.execute(params![indexed, row.get_ref(1)?.as_str()?, row.get_ref(2)?.as_str()?])?;
            inserts += 1;
        }
    }
    dtx.commit()?;
    if deletes + inserts > 0 {
        let mut set = stx.prepare_cached("INSERT OR REPLACE INTO index_meta (key, value) VALUES (?1, ?2)")?;
        set.execute(params!["indexed_rowid", indexed.to_string()])?;
        set.execute(params!["applied_delete", applied.to_string()])?;
    }
    stx.commit()?;
    Ok((deletes.max(inserts), applied))
}
