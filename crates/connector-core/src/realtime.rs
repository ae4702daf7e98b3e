//! Real-time change feeds: how a source tells the engine that specific items changed.
//!
//! A feed (PostgreSQL LISTEN/NOTIFY, a MongoDB change stream, a webhook) sends
//! [`ChangeHint`]s. They are hints, never the source of completeness: the engine fetches the
//! named items' current state from the source ([`Connector::fetch`](crate::Connector::fetch)),
//! and the cursors of scheduled syncs still decide what a sync has seen. A feed that lost its
//! connection sends [`ChangeHint::CatchUp`] once it is back, so an incremental sync covers the
//! gap.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::Result;

/// One item a notification names: its stream (`public.documents`) and its id within it (the
/// primary key as text). Connectors map it to their document id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ItemRef {
    /// The stream (table, collection, repository/issues, ...).
    pub stream: String,
    /// The item's key within the stream.
    pub key: String,
}

impl ItemRef {
    /// An item reference.
    pub fn new(stream: impl Into<String>, key: impl Into<String>) -> Self {
        Self { stream: stream.into(), key: key.into() }
    }
}

/// What a change feed reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeHint {
    /// These items were inserted, updated or deleted: fetch their current state.
    Items(Vec<ItemRef>),
    /// Something changed that the feed cannot name, or the feed was down for a while: run an
    /// incremental sync.
    CatchUp,
}

/// A live feed of change hints for one connector.
///
/// # Behavior
/// - `run` returns only when `shutdown` is cancelled or on an error it cannot recover from
///   (bad configuration, credentials rejected); a dropped connection is its own business: it
///   reconnects with backoff and then sends [`ChangeHint::CatchUp`].
/// - Hints are sent as they arrive; the receiver coalesces bursts.
#[async_trait]
pub trait ChangeFeed: Send {
    /// Runs the feed until `shutdown`.
    async fn run(self: Box<Self>, hints: mpsc::Sender<ChangeHint>, shutdown: CancellationToken)
    -> Result<()>;
}
