//! The document write path: prepared statements on one connection, run on a blocking thread.
//!
//! Each change costs one indexed lookup (the stored hash) and, when the content changed, one
//! insert; no statement is built per batch and no argument is copied.

use std::time::Instant;

use chrono::Utc;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::ts;
use crate::document::Change;
use crate::store::{ApplyOutcome, ChangeOutcome, WriteScope, last_change_wins};

const INSERT: &str = "INSERT INTO documents (tenant_id, connector_id, id, kind, title, content, url, author, \
                      created_at, updated_at, metadata, content_hash, sync_gen, synced_at) \
                      VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)";

/// Writes one batch in one transaction. `prune_deletes_to`: entries of `index_deletes` the
/// index has applied, removed in passing.
pub(super) fn apply(
    conn: &mut Connection,
    scope: &WriteScope,
    changes: &[Change],
    prune_deletes_to: i64,
) -> rusqlite::Result<ApplyOutcome> {
    let started = Instant::now();
    let mut outcome =
        ApplyOutcome { outcomes: vec![ChangeOutcome::Superseded; changes.len()], ..Default::default() };
    let effective = last_change_wins(changes);
    let now = ts(Some(Utc::now()));
    let (tenant, connector) = (scope.tenant_id.as_str(), scope.connector_id.as_str());
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        let mut find = tx.prepare_cached(
            "SELECT rowid, content_hash FROM documents WHERE tenant_id = ?1 AND connector_id = ?2 AND id = ?3",
        )?;
        let mut insert = tx.prepare_cached(INSERT)?;
        let mut remove = tx.prepare_cached("DELETE FROM documents WHERE rowid = ?1")?;
        let mut unindex = tx.prepare_cached("INSERT INTO index_deletes (doc_rowid) VALUES (?1)")?;
        let mut touch = tx.prepare_cached("UPDATE documents SET sync_gen = ?2 WHERE rowid = ?1")?;
        for (i, change) in changes.iter().enumerate() {
            if !effective[i] {
                continue;
            }
            let known: Option<(i64, String)> = find
                .query_row(params![tenant, connector, change.id()], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let (hash, metadata) = match change {
                Change::Upsert(doc) => {
                    let metadata = doc.metadata.to_string();
                    (doc.content_hash_with(metadata.as_bytes()), metadata)
                }
                Change::Delete { .. } => (String::new(), String::new()),
            };
            outcome.outcomes[i] = match (change, known) {
                (Change::Upsert(_), Some((rowid, old))) if old == hash => {
                    if scope.touch_unchanged {
                        touch.execute(params![rowid, scope.generation])?;
                    }
                    ChangeOutcome::Unchanged
                }
                (Change::Upsert(doc), known) => {
                    let result = match known {
                        // A changed document gets a new rowid: the index picks it up as new
                        // and drops the old entry.
                        Some((rowid, _)) => {
                            remove.execute([rowid])?;
                            unindex.execute([rowid])?;
                            ChangeOutcome::Updated
                        }
                        None => ChangeOutcome::Inserted,
                    };
                    insert.execute(params![
                        tenant,
                        connector,
                        doc.id,
                        doc.kind,
                        doc.title,
                        doc.content,
                        doc.url,
                        doc.author,
                        ts(doc.created_at),
                        ts(doc.updated_at),
                        metadata,
                        hash,
                        scope.generation,
                        now,
                    ])?;
                    result
                }
                (Change::Delete { .. }, Some((rowid, _))) => {
                    remove.execute([rowid])?;
                    unindex.execute([rowid])?;
                    ChangeOutcome::Deleted
                }
                (Change::Delete { .. }, None) => ChangeOutcome::DeleteMissing,
            };
        }
        if prune_deletes_to > 0 {
            tx.prepare_cached("DELETE FROM index_deletes WHERE seq <= ?1")?.execute([prune_deletes_to])?;
        }
    }
    tx.commit()?;
    outcome.write_time = started.elapsed();
    Ok(outcome)
}

/// Deletes the connector's documents older than `generation`, and queues their index entries
/// for removal.
pub(super) fn sweep(conn: &mut Connection, scope: &WriteScope) -> rusqlite::Result<u64> {
    let args = params![scope.tenant_id.as_str(), scope.connector_id.as_str(), scope.generation];
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute(
        "INSERT INTO index_deletes (doc_rowid) SELECT rowid FROM documents \
         WHERE tenant_id = ?1 AND connector_id = ?2 AND sync_gen < ?3",
        args,
    )?;
    let deleted = tx.execute(
        "DELETE FROM documents WHERE tenant_id = ?1 AND connector_id = ?2 AND sync_gen < ?3",
        args,
    )?;
    tx.commit()?;
    Ok(deleted as u64)
}
