//! The [`Connector`] trait: a source turns per-stream cursors into a stream of [`Batch`]es.
//!
//! # Behavior
//! - A connector knows its source and nothing else. Retries, checkpointing, progress,
//!   cancellation, status and history live in the [`SyncEngine`](crate::engine::SyncEngine).
//! - [`Connector::read`] yields batches in source order. Each batch may carry a
//!   [`Checkpoint`] for one stream: the cursor from which reading that stream again yields
//!   exactly what comes after this batch. The engine persists it only after the batch's
//!   changes are durable in the store.
//! - In [`ReadMode::Full`] the connector ignores the cursors it is handed for streams it
//!   starts from scratch, and reports every item it has. The engine then deletes items the
//!   source no longer reported (mark and sweep). A resumed full sync hands the cursors of the
//!   interrupted full run back, and the connector continues from them.
//! - Errors the connector cannot recover from locally are returned through the stream; the
//!   engine decides from [`Error::retry_class`](crate::Error::retry_class) whether to reopen the
//!   stream from the last checkpoint.
//! - Memory stays bounded: a connector never collects a whole listing or table; it yields
//!   batches of at most [`ReadRequest::batch_size`] items (or a few MiB of content).

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

use crate::document::{Change, ItemFailure};
use crate::error::Result;
use crate::ids::{ConnectorId, TenantId};
use crate::realtime::{ChangeFeed, ItemRef};

/// A connector-defined position within one stream (a `(timestamp, id)` pair, a page token,
/// a tree SHA). Opaque to the engine; stored as JSON in the sync state.
pub type Cursor = serde_json::Value;

/// Cursors by stream name (`public.documents`, `my-org/repo1/issues`).
pub type Cursors = BTreeMap<String, Cursor>;

/// What a connector can do; read by the engine, the scheduler and the conformance suite.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Reads only what changed since a cursor.
    pub incremental: bool,
    /// Reports deletes during incremental syncs (a delete feed). Without it, deletes are
    /// found by full syncs only.
    pub incremental_deletes: bool,
    /// Can push change notifications (webhooks, LISTEN/NOTIFY, change streams).
    pub realtime: bool,
    /// Can report an estimate of the number of items, for progress bars.
    pub total_estimate: bool,
}

/// Full or incremental.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadMode {
    /// Read everything; the engine sweeps items not seen.
    Full,
    /// Read from the cursors.
    Incremental,
}

/// What the engine asks of [`Connector::read`].
#[derive(Debug, Clone)]
pub struct ReadRequest {
    /// Full or incremental.
    pub mode: ReadMode,
    /// The cursor of each stream read before. Empty on the first sync.
    pub cursors: Cursors,
    /// The most items a batch should hold.
    pub batch_size: usize,
    /// The most content bytes a batch should hold (approximately).
    pub batch_bytes: usize,
}

/// A cursor for one stream, valid once the batch carrying it is durable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The stream the cursor belongs to.
    pub stream: String,
    /// Where to resume that stream.
    pub cursor: Cursor,
}

/// A group of changes read from the source, written to the store as one unit.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    /// Upserts and deletes, in source order.
    pub changes: Vec<Change>,
    /// Items that could not be read (counted as failed, the sync goes on).
    pub failures: Vec<ItemFailure>,
    /// The cursor to save once `changes` are durable.
    pub checkpoint: Option<Checkpoint>,
}

impl Batch {
    /// True when the batch holds nothing to write and no checkpoint.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.failures.is_empty() && self.checkpoint.is_none()
    }
}

/// A source of documents. See the [module docs](self) for the contract.
#[async_trait]
pub trait Connector: Send + Sync {
    /// The connector instance's stable id.
    fn connector_id(&self) -> &ConnectorId;

    /// The tenant its documents belong to.
    fn tenant_id(&self) -> &TenantId;

    /// The connector type (`postgres`, `github`, ...).
    fn kind(&self) -> &'static str;

    /// What the connector supports.
    fn capabilities(&self) -> Capabilities;

    /// Checks configuration, credentials and connectivity without reading data.
    async fn check(&self) -> Result<()>;

    /// An estimate of the items a sync in `mode` will read, for progress reporting.
    async fn estimate_total(&self, _request: &ReadRequest) -> Result<Option<u64>> {
        Ok(None)
    }

    /// Reads the source from `request.cursors` as a stream of batches.
    fn read(&self, request: ReadRequest) -> BoxStream<'_, Result<Batch>>;

    /// The current state of specific items, for real-time hints: an upsert for each item that
    /// exists and a delete for each that does not. `None` when the connector cannot fetch
    /// single items (the engine then runs an incremental sync instead).
    async fn fetch(&self, _items: &[ItemRef]) -> Result<Option<Batch>> {
        Ok(None)
    }

    /// The connector's live change feed (LISTEN/NOTIFY, a change stream), when it has one
    /// configured. Called once by `connectors run`.
    fn change_feed(&self) -> Option<Box<dyn ChangeFeed>> {
        None
    }
}

#[async_trait]
impl<T: Connector + ?Sized> Connector for Arc<T> {
    fn connector_id(&self) -> &ConnectorId {
        (**self).connector_id()
    }
    fn tenant_id(&self) -> &TenantId {
        (**self).tenant_id()
    }
    fn kind(&self) -> &'static str {
        (**self).kind()
    }
    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }
    async fn check(&self) -> Result<()> {
        (**self).check().await
    }
    async fn estimate_total(&self, request: &ReadRequest) -> Result<Option<u64>> {
        (**self).estimate_total(request).await
    }
    fn read(&self, request: ReadRequest) -> BoxStream<'_, Result<Batch>> {
        (**self).read(request)
    }
    async fn fetch(&self, items: &[ItemRef]) -> Result<Option<Batch>> {
        (**self).fetch(items).await
    }
    fn change_feed(&self) -> Option<Box<dyn ChangeFeed>> {
        (**self).change_feed()
    }
}

/// What a connector is built with: the credential provider and a shutdown signal.
/// Connectors never read environment variables or other globals directly.
#[derive(Clone)]
pub struct ConnectorContext {
    /// Where secrets come from.
    pub credentials: Arc<dyn crate::credentials::CredentialProvider>,
    /// Cancelled when the process shuts down; long-lived tasks (listeners) stop on it.
    pub shutdown: tokio_util::sync::CancellationToken,
}

impl ConnectorContext {
    /// A context with `credentials` and a fresh shutdown token.
    pub fn new(credentials: Arc<dyn crate::credentials::CredentialProvider>) -> Self {
        Self { credentials, shutdown: tokio_util::sync::CancellationToken::new() }
    }
}

impl std::fmt::Debug for ConnectorContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectorContext").field("credentials", &self.credentials.describe()).finish()
    }
}
