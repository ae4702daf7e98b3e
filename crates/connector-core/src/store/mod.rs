//! The knowledge store: where synced documents live, namespaced by tenant.
//!
//! Two implementations: [`SqliteKnowledgeStore`] (embedded, FTS5 search; the default at
//! `$ARAGORA_HOME/knowledge.db`) and [`PgKnowledgeStore`] (PostgreSQL with `tsvector` search,
//! for deployments where several processes share one store).

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use serde::Serialize;

use crate::document::{Change, Document};
use crate::error::{Error, Result};
use crate::ids::{ConnectorId, TenantId};

#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;

#[cfg(feature = "postgres")]
pub use postgres::PgKnowledgeStore;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteKnowledgeStore;

/// A document as stored: the document plus where it came from and its hash.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredDocument {
    /// The tenant it belongs to.
    pub tenant_id: TenantId,
    /// The connector that produced it.
    pub connector_id: ConnectorId,
    /// The document.
    #[serde(flatten)]
    pub document: Document,
    /// [`Document::content_hash`] of what is stored.
    pub content_hash: String,
    /// When it was last written.
    pub synced_at: DateTime<Utc>,
}

/// One search result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SearchHit {
    /// Document id.
    pub id: String,
    /// The connector that produced it.
    pub connector_id: ConnectorId,
    /// Document kind.
    pub kind: String,
    /// Title.
    pub title: String,
    /// Link, if any.
    pub url: Option<String>,
    /// A fragment of the content around the match.
    pub snippet: String,
    /// Relevance; higher is better.
    pub score: f64,
}

/// Whose documents a write touches, and how.
#[derive(Debug, Clone)]
pub struct WriteScope {
    /// Tenant.
    pub tenant_id: TenantId,
    /// Connector.
    pub connector_id: ConnectorId,
    /// Written and (when `touch_unchanged`) unchanged documents are stamped with this
    /// generation; [`KnowledgeStore::sweep`] deletes documents with an older one.
    pub generation: i64,
    /// Stamp unchanged documents too (full syncs, so the sweep keeps them).
    pub touch_unchanged: bool,
}

/// What happened to one change of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeOutcome {
    /// A new document was written.
    Inserted,
    /// An existing document changed and was rewritten.
    Updated,
    /// The store already held the same content (same hash); nothing was rewritten.
    Unchanged,
    /// The document was deleted.
    Deleted,
    /// A delete of a document the store did not hold.
    DeleteMissing,
    /// A later change in the same batch replaced this one.
    Superseded,
}

/// The result of [`KnowledgeStore::apply`].
#[derive(Debug, Clone, Default)]
pub struct ApplyOutcome {
    /// One outcome per change, in input order.
    pub outcomes: Vec<ChangeOutcome>,
    /// Time spent writing documents.
    pub write_time: Duration,
    /// Time spent maintaining the search index inside `apply` (zero for stores that index in
    /// the background: see [`KnowledgeStore::index_busy`]).
    pub index_time: Duration,
}

impl ApplyOutcome {
    /// How many changes had `outcome`.
    pub fn count(&self, outcome: ChangeOutcome) -> u64 {
        self.outcomes.iter().filter(|o| **o == outcome).count() as u64
    }
}

/// Where documents live.
///
/// # Behavior
/// - Every call is scoped to a tenant; no call returns another tenant's documents.
/// - `apply` writes a batch atomically (all or nothing) and durably before it returns.
/// - Upserts are idempotent by (tenant, connector, id) and content hash: replaying a batch
///   after a crash writes nothing twice, and an unchanged document is not rewritten.
#[async_trait]
pub trait KnowledgeStore: Send + Sync {
    /// Applies a batch of changes in one transaction.
    async fn apply(&self, scope: &WriteScope, changes: &[Change]) -> Result<ApplyOutcome>;

    /// Deletes the connector's documents stamped with a generation older than `generation`
    /// (those a completed full sync did not see). Returns how many were deleted.
    async fn sweep(&self, tenant: &TenantId, connector: &ConnectorId, generation: i64) -> Result<u64>;

    /// One document.
    async fn get(
        &self,
        tenant: &TenantId,
        connector: &ConnectorId,
        id: &str,
    ) -> Result<Option<StoredDocument>>;

    /// Every document of the tenant (optionally of one connector), streamed in id order.
    fn export<'a>(
        &'a self,
        tenant: &'a TenantId,
        connector: Option<&'a ConnectorId>,
    ) -> BoxStream<'a, Result<StoredDocument>>;

    /// Full-text search within the tenant, best first.
    async fn search(&self, tenant: &TenantId, query: &str, limit: usize) -> Result<Vec<SearchHit>>;

    /// How many documents the tenant (optionally one connector) has.
    async fn count(&self, tenant: &TenantId, connector: Option<&ConnectorId>) -> Result<u64>;

    /// Where the store is, for messages (never a password).
    fn describe(&self) -> String;

    /// Waits until search sees every write this process committed. A store that indexes in
    /// the background (the embedded one) catches up here; others return at once. The engine
    /// calls it at the end of each sync, so a finished sync is searchable.
    async fn flush_index(&self) -> Result<()> {
        Ok(())
    }

    /// Total time spent maintaining the search index in the background since the store was
    /// opened (zero for stores that index inside `apply`).
    fn index_busy(&self) -> Duration {
        Duration::ZERO
    }
}

/// Which changes of a batch take effect: when an id appears more than once, the last change
/// wins and the earlier ones are [`ChangeOutcome::Superseded`].
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) fn last_change_wins(changes: &[Change]) -> Vec<bool> {
    let mut seen = std::collections::HashSet::with_capacity(changes.len());
    let mut effective = vec![false; changes.len()];
    for (i, c) in changes.iter().enumerate().rev() {
        if seen.insert(c.id()) {
            effective[i] = true;
        }
    }
    effective
}

/// Turns a user's search words into a query the FTS engines accept literally: each word is
/// a quoted term, all terms must match.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) fn search_terms(query: &str) -> Result<Vec<String>> {
    let terms: Vec<String> = query
        .split(|c: char| c.is_whitespace() || c == '"')
        .filter(|t| t.chars().any(char::is_alphanumeric))
        .map(str::to_owned)
        .collect();
    if terms.is_empty() {
        return Err(Error::config(format!("search query {query:?} has no words to search for")));
    }
    Ok(terms)
}

/// Opens the store a URL names: `sqlite://PATH` (or a plain path) or `postgres://...`.
pub async fn open_store(url: &str) -> Result<std::sync::Arc<dyn KnowledgeStore>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        #[cfg(feature = "postgres")]
        return Ok(std::sync::Arc::new(PgKnowledgeStore::connect(url).await?));
        #[cfg(not(feature = "postgres"))]
        return Err(Error::config("this build has no PostgreSQL store (feature `postgres`)"));
    }
    let path = url.strip_prefix("sqlite://").unwrap_or(url);
    #[cfg(feature = "sqlite")]
    return Ok(std::sync::Arc::new(SqliteKnowledgeStore::open(path).await?));
    #[cfg(not(feature = "sqlite"))]
    {
        let _ = path;
        Err(Error::config("this build has no SQLite store (feature `sqlite`)"))
    }
}

/// Hides the password of a database URL for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}@{}", &url[..scheme_end + 3], user, &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact_url("postgres://u:secret@h:5/db"), "postgres://u@h:5/db");
        assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
        assert_eq!(redact_url("sqlite:///tmp/a.db"), "sqlite:///tmp/a.db");
    }

    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    #[test]
    fn search_terms_are_literal_words() {
        assert_eq!(search_terms("  rust \"AND\" OR-x ").unwrap(), ["rust", "AND", "OR-x"]);
        assert!(search_terms(" \" * ").is_err());
    }

    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    #[test]
    fn last_change_wins_per_id() {
        let d = |id: &str| Change::Upsert(Document::new(id, "row", "", ""));
        let changes = [d("a"), d("b"), Change::Delete { id: "a".into() }];
        assert_eq!(last_change_wins(&changes), [false, true, true]);
    }
}
