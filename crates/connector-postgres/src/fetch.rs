//! Fetching single rows by key, for real-time hints: [`Connector::fetch`](connector_core::Connector::fetch).
//!
//! Each table's keys are read with the reader's select list and decoded by the reader's
//! [`decode_row`], so a fetched row and a synced row give the same document and hash. Keys are
//! bind parameters cast on the server, like cursor values, and first normalized there into the
//! text the reader puts in document ids (`00042` and `42` are the same integer key; uuids are
//! lower-cased), so a delete names the document a sync wrote.

use std::collections::{HashMap, HashSet};

use connector_core::{Batch, Change, Error, ItemFailure, ItemRef, Result};

use crate::client::PgClient;
use crate::connector::Shared;
use crate::decode::{cursor_text, decode_row};
use crate::reader::check_result_types;
use crate::sql::{TablePlan, TextSource};
use tokio_postgres::Statement;

/// The most keys one query asks for.
pub(crate) const FETCH_CHUNK: usize = 1000;

/// The current state of `items`: an upsert per row found, a delete per key not found. Items of
/// streams that are not configured tables are ignored.
pub(crate) async fn fetch_items(shared: &Shared, items: &[ItemRef]) -> Result<Batch> {
    let config = &shared.config;
    let index: HashMap<String, usize> =
        config.tables.iter().enumerate().map(|(i, t)| (config.stream_name(t), i)).collect();
    let mut keys: Vec<Vec<&str>> = vec![Vec::new(); config.tables.len()];
    let mut seen: HashSet<(usize, &str)> = HashSet::with_capacity(items.len());
    for item in items {
        match index.get(&item.stream) {
            Some(&i) => {
                if seen.insert((i, item.key.as_str())) {
                    keys[i].push(&item.key);
                }
            }
            None => {
                tracing::debug!(stream = %item.stream, key = %item.key, "hint for a stream that is not a configured table, ignored")
            }
        }
    }
    let mut batch = Batch::default();
    if keys.iter().all(Vec::is_empty) {
        return Ok(batch);
    }
    let client = PgClient::connect(shared).await?;
    for (table, keys) in config.tables.iter().zip(&keys) {
        if keys.is_empty() {
            continue;
        }
        fetch_table(shared, &client, table, keys, &mut batch)
            .await
            .map_err(|e| e.context(format!("table {}", config.stream_name(table))))?;
    }
    Ok(batch)
}

async fn fetch_table(
    shared: &Shared,
    client: &PgClient,
    table: &str,
    keys: &[&str],
    batch: &mut Batch,
) -> Result<()> {
    let schema = &shared.config.schema;
    let columns = client.table_columns(schema, table).await?;
    if columns.is_empty() {
        return Err(client.table_not_found(schema, table).await);
    }
    let plan = TablePlan::new(&shared.config, table, &columns)?;
    let pg = client.inner();
    let statement = pg.prepare(&plan.fetch_query()).await.map_err(|e| client.error(&e))?;
    check_result_types(&plan, statement.columns())?;
    let (key_sql, key_source) = plan.key_text_query();
    let key_statement = pg.prepare(&key_sql).await.map_err(|e| client.error(&e))?;
    let (changes_before, failures_before) = (batch.changes.len(), batch.failures.len());
    // Ids already answered: two texts of one key (`7`, `07`) may fall in different chunks.
    let mut done = HashSet::new();
    for chunk in keys.chunks(FETCH_CHUNK) {
        let mut ids = key_ids(client, &plan, (&key_statement, key_source), chunk).await?;
        ids.retain(|id| done.insert(id.clone()));
        if ids.is_empty() {
            continue;
        }
        let texts: Vec<&str> = ids.iter().map(|id| &id[plan.id_prefix.len()..]).collect();
        let rows = pg.query(&statement, &[&texts]).await.map_err(|e| client.error(&e))?;
        let mut present = HashSet::with_capacity(rows.len());
        for row in &rows {
            let decoded = decode_row(&plan, row).map_err(|e| {
                Error::source_error(format!("fetched row of {}: cannot read its key: {e}", plan.stream))
            })?;
            match decoded.result {
                Ok(doc) => {
                    present.insert(doc.id.clone());
                    batch.changes.push(Change::Upsert(doc));
                }
                Err((id, error)) => {
                    tracing::warn!(stream = %plan.stream, %id, %error, "row skipped");
                    present.insert(id.clone());
                    batch.failures.push(ItemFailure { id, error });
                }
            }
        }
        for id in ids {
            if !present.contains(&id) {
                batch.changes.push(Change::Delete { id });
            }
        }
    }
    tracing::debug!(
        stream = %plan.stream,
        keys = keys.len(),
        changes = batch.changes.len() - changes_before,
        failures = batch.failures.len() - failures_before,
        "fetched rows"
    );
    Ok(())
}

/// The document ids of `keys` (the key texts normalized by the server, deduplicated). A key
/// that is no valid value of the key column (`abc` for an integer) is left out with a warning:
/// no row can have it.
async fn key_ids(
    client: &PgClient,
    plan: &TablePlan,
    (statement, source): (&Statement, TextSource),
    keys: &[&str],
) -> Result<Vec<String>> {
    let rows = match client.inner().query(statement, &[&keys]).await {
        Ok(rows) => rows,
        Err(e) if is_data_exception(&e) => {
            // One bad key fails the whole array: find the good ones one by one.
            let mut rows = Vec::with_capacity(keys.len());
            for key in keys {
                let one = std::slice::from_ref(key);
                match client.inner().query(statement, &[&one]).await {
                    Ok(found) => rows.extend(found),
                    Err(e) if is_data_exception(&e) => {
                        tracing::warn!(stream = %plan.stream, key = %key, error = %client.error(&e), "hint names an invalid key, ignored");
                    }
                    Err(e) => return Err(client.error(&e)),
                }
            }
            rows
        }
        Err(e) => return Err(client.error(&e)),
    };
    let mut seen = HashSet::with_capacity(rows.len());
    let mut ids = Vec::with_capacity(rows.len());
    for row in &rows {
        let text = cursor_text(row, source)
            .map_err(Error::source_error)?
            .ok_or_else(|| Error::source_error(format!("{}: a key cast to NULL", plan.stream)))?;
        let id = format!("{}{text}", plan.id_prefix);
        if seen.insert(id.clone()) {
            ids.push(id);
        }
    }
    Ok(ids)
}

/// SQLSTATE class 22 (data exception): a value that does not convert.
fn is_data_exception(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| c.code().starts_with("22"))
}
