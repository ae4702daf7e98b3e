//! Reading tables: one task and one connection per table, at most `pool_size` at once, each
//! streaming its table with one query per phase and cutting it into batches.
//!
//! Why tasks: decoding runs beside the engine's store writes (and on other cores for other
//! tables), while a bounded channel keeps memory at a few batches per table and, through the
//! driver's own backpressure, stops reading the socket when the engine falls behind.

use std::sync::Arc;
use std::time::Instant;

use connector_core::reexports::tokio_util::sync::CancellationToken;
use connector_core::{Batch, Change, Checkpoint, Cursor, Error, ItemFailure, Result};
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use tokio::sync::{Semaphore, mpsc};
use tokio_postgres::types::ToSql;

use crate::client::PgClient;
use crate::connector::Shared;
use crate::decode::{DecodedRow, cursor_text, decode_row};
use crate::sql::{KeysetCursor, TablePlan};

/// How large a batch may grow.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub rows: usize,
    pub bytes: usize,
}

/// Reads `tables` (with their start cursors) concurrently and merges their batches.
pub(crate) fn read_tables(
    shared: Arc<Shared>,
    tables: Vec<(String, Option<Cursor>)>,
    limits: Limits,
) -> BoxStream<'static, Result<Batch>> {
    // Started on first poll, inside the caller's runtime.
    stream::once(async move {
        let permits = Arc::new(Semaphore::new(shared.config.pool_size));
        let streams = tables.into_iter().map(|(table, cursor)| {
            let (tx, rx) = mpsc::channel::<Result<Batch>>(1);
            let task =
                tokio::spawn(run_table(shared.clone(), permits.clone(), table.clone(), cursor, limits, tx));
            let batches = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
            // A task that panicked ends its channel without an error; report it, or a full
            // sync would take the missing rows for deleted ones.
            let outcome = stream::once(task).filter_map(move |joined| {
                let table = table.clone();
                async move {
                    joined
                        .err()
                        .map(|e| Err(Error::internal(format!("reader of table {table:?} failed: {e}"))))
                }
            });
            batches.chain(outcome).boxed()
        });
        stream::select_all(streams)
    })
    .flatten()
    .boxed()
}

/// One table's task: waits for a connection slot, then streams the table into `tx`. Stops
/// when the receiver is dropped (the sync stopped) or the process shuts down.
async fn run_table(
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
    table: String,
    cursor: Option<Cursor>,
    limits: Limits,
    tx: mpsc::Sender<Result<Batch>>,
) {
    let shutdown: CancellationToken = shared.shutdown.clone();
    let work = async {
        let _permit = permits.acquire().await.map_err(|_| Error::internal("connection limiter closed"))?;
        read_table(&shared, &table, cursor, limits, &tx).await
    };
    tokio::select! {
        biased;
        _ = tx.closed() => {}
        _ = shutdown.cancelled() => {
            // Ending quietly would look like the end of the table.
            let _ = tx.send(Err(Error::cancelled())).await;
        }
        result = work => {
            if let Err(e) = result {
                let _ = tx.send(Err(e.context(format!("table {}", shared.config.stream_name(&table))))).await;
            }
        }
    }
}

async fn read_table(
    shared: &Shared,
    table: &str,
    cursor: Option<Cursor>,
    limits: Limits,
    tx: &mpsc::Sender<Result<Batch>>,
) -> Result<()> {
    let started = Instant::now();
    let stream_name = shared.config.stream_name(table);
    let cursor = cursor.map(|c| KeysetCursor::from_cursor(&stream_name, &c)).transpose()?;
    let client = PgClient::connect(shared).await?;
    let columns = client.table_columns(&shared.config.schema, table).await?;
    if columns.is_empty() {
        return Err(client.table_not_found(&shared.config.schema, table).await);
    }
    let plan = TablePlan::new(&shared.config, table, &columns)?;
    tracing::debug!(stream = %stream_name, ?cursor, "reading table");

    let mut batch = BatchBuilder::new(stream_name.clone(), limits);
    let mut rows_read: u64 = 0;
    for phase in plan.phases(cursor.as_ref()) {
        let (sql, params) = plan.query(&phase);
        let pg = client.inner();
        let statement = pg.prepare(&sql).await.map_err(|e| client.error(&e))?;
        check_result_types(&plan, statement.columns())?;
        let params: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let rows = pg.query_raw(&statement, params).await.map_err(|e| client.error(&e))?;
        let mut rows = std::pin::pin!(rows);
        while let Some(row) = rows.try_next().await.map_err(|e| client.error(&e))? {
            rows_read += 1;
            let decoded = decode_row(&plan, &row).map_err(|e| {
                Error::source_error(format!("row {rows_read} of {stream_name}: cannot read its key: {e}"))
            })?;
            batch.push(decoded);
            if batch.is_full() {
                let ts = cursor_text(&row, plan.ts_text).map_err(Error::source_error)?;
                let pk = cursor_text(&row, plan.pk_text).map_err(Error::source_error)?.unwrap_or_default();
                if tx.send(Ok(batch.take(KeysetCursor { ts, pk }))).await.is_err() {
                    return Ok(());
                }
            }
            // The last row's cursor is needed if the stream ends here; keep the row, not a copy.
            batch.last_row = Some(row);
        }
    }
    if let Some(row) = batch.last_row.take()
        && !batch.is_empty()
    {
        let ts = cursor_text(&row, plan.ts_text).map_err(Error::source_error)?;
        let pk = cursor_text(&row, plan.pk_text).map_err(Error::source_error)?.unwrap_or_default();
        let _ = tx.send(Ok(batch.take(KeysetCursor { ts, pk }))).await;
    }
    drop(client);
    tracing::debug!(stream = %stream_name, rows = rows_read, elapsed_ms = started.elapsed().as_millis() as u64, "table read");
    Ok(())
}

/// The result columns must be what the plan decodes; a mismatch (a type changed between the
/// catalog lookup and the query) would otherwise misread bytes.
pub(crate) fn check_result_types(plan: &TablePlan, columns: &[tokio_postgres::Column]) -> Result<()> {
    if columns.len() != plan.output_len() {
        return Err(Error::source_error(format!(
            "table {}: query returned {} columns, expected {}; did the table change during the sync?",
            plan.stream,
            columns.len(),
            plan.output_len()
        )));
    }
    for (column, result) in plan.columns.iter().zip(columns) {
        if let Some(oid) = column.kind.expected_oid()
            && result.type_().oid() != oid
        {
            return Err(Error::source_error(format!(
                "table {}: column {:?} has type {} but {:?} was expected; did the table change during the sync?",
                plan.stream,
                column.name,
                result.type_(),
                column.kind
            )));
        }
    }
    Ok(())
}

struct BatchBuilder {
    stream: String,
    limits: Limits,
    changes: Vec<Change>,
    failures: Vec<ItemFailure>,
    bytes: usize,
    last_row: Option<tokio_postgres::Row>,
}

impl BatchBuilder {
    fn new(stream: String, limits: Limits) -> Self {
        Self {
            stream,
            limits,
            changes: Vec::with_capacity(limits.rows.min(4096)),
            failures: Vec::new(),
            bytes: 0,
            last_row: None,
        }
    }

    fn push(&mut self, row: DecodedRow) {
        self.bytes += row.size;
        match row.result {
            Ok(doc) => self.changes.push(Change::Upsert(doc)),
            Err((id, error)) => {
                tracing::warn!(stream = %self.stream, %id, %error, "row skipped");
                self.failures.push(ItemFailure { id, error });
            }
        }
    }

    fn len(&self) -> usize {
        self.changes.len() + self.failures.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn is_full(&self) -> bool {
        self.len() >= self.limits.rows || self.bytes >= self.limits.bytes
    }

    fn take(&mut self, cursor: KeysetCursor) -> Batch {
        self.bytes = 0;
        self.last_row = None;
        Batch {
            changes: std::mem::replace(&mut self.changes, Vec::with_capacity(self.limits.rows.min(4096))),
            failures: std::mem::take(&mut self.failures),
            checkpoint: Some(Checkpoint { stream: self.stream.clone(), cursor: cursor.to_cursor() }),
        }
    }
}
