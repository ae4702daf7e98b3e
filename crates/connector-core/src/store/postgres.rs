//! The shared knowledge store: PostgreSQL with a `tsvector` column and a GIN index.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use sqlx::postgres::{PgPoolOptions, PgRow};
use sqlx::{PgPool, Row};

use super::{
    ApplyOutcome, ChangeOutcome, KnowledgeStore, SearchHit, StoredDocument, WriteScope, last_change_wins,
    redact_url, search_terms,
};
use crate::document::{Change, Document};
use crate::error::{Error, Result};
use crate::ids::{ConnectorId, TenantId};

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS knowledge_documents (
        tenant_id TEXT NOT NULL,
        connector_id TEXT NOT NULL,
        id TEXT NOT NULL,
        kind TEXT NOT NULL,
        title TEXT NOT NULL,
        content TEXT NOT NULL,
        url TEXT,
        author TEXT,
        created_at TIMESTAMPTZ,
        updated_at TIMESTAMPTZ,
        metadata JSONB NOT NULL,
        content_hash TEXT NOT NULL,
        sync_gen BIGINT NOT NULL,
        synced_at TIMESTAMPTZ NOT NULL,
        search TSVECTOR GENERATED ALWAYS AS (
            setweight(to_tsvector('simple', title), 'A') || setweight(to_tsvector('simple', content), 'B')
        ) STORED,
        PRIMARY KEY (tenant_id, connector_id, id)
    )",
    "CREATE INDEX IF NOT EXISTS knowledge_documents_search ON knowledge_documents USING GIN (search)",
];

/// The PostgreSQL store (table `knowledge_documents`).
#[derive(Debug, Clone)]
pub struct PgKnowledgeStore {
    pool: PgPool,
    location: String,
}

impl PgKnowledgeStore {
    /// Connects to `url` and creates the schema when missing.
    pub async fn connect(url: &str) -> Result<Self> {
        let location = redact_url(url);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(30))
            .connect(url)
            .await
            .map_err(|e| pg_error(e, &format!("connecting to the store {location}")))?;
        Self::with_pool(pool, location).await
    }

    /// Uses an existing pool.
    pub async fn with_pool(pool: PgPool, location: impl Into<String>) -> Result<Self> {
        let location = location.into();
        // Several processes may start at once; serialise schema creation.
        let mut tx = pool.begin().await.map_err(|e| pg_error(e, "starting schema creation"))?;
        sqlx::query("SELECT pg_advisory_xact_lock(7262535)")
            .execute(&mut *tx)
            .await
            .map_err(|e| pg_error(e, "locking for schema creation"))?;
        for sql in SCHEMA {
            sqlx::query(*sql)
                .execute(&mut *tx)
                .await
                .map_err(|e| pg_error(e, "creating the store schema"))?;
        }
        tx.commit().await.map_err(|e| pg_error(e, "creating the store schema"))?;
        Ok(Self { pool, location })
    }

    /// The pool, for a [`PgStateStore`](crate::state::PgStateStore) sharing the database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// Maps a sqlx error: authentication failures are auth errors, connection trouble is
/// transient, the rest store errors.
pub(crate) fn pg_error(e: sqlx::Error, what: &str) -> Error {
    let kind_error = match &e {
        sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("28P01") | Some("28000")) => {
            Error::auth(format!("{what}: authentication failed"))
        }
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
            Error::transient(what.to_owned())
        }
        _ => Error::store(what.to_owned()),
    };
    kind_error.with_source(e)
}

fn stored_from_row(row: &PgRow) -> Result<StoredDocument> {
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
            created_at: row.get("created_at"),
            updated_at: row.get("updated_at"),
            metadata: row.get("metadata"),
        },
        content_hash: row.get("content_hash"),
        synced_at: row.get("synced_at"),
    })
}

#[async_trait]
impl KnowledgeStore for PgKnowledgeStore {
    async fn apply(&self, scope: &WriteScope, changes: &[Change]) -> Result<ApplyOutcome> {
        let mut outcome =
            ApplyOutcome { outcomes: vec![ChangeOutcome::Superseded; changes.len()], ..Default::default() };
        if changes.is_empty() {
            return Ok(outcome);
        }
        let effective = last_change_wins(changes);
        let started = Instant::now();
        let mut tx = self.pool.begin().await.map_err(|e| pg_error(e, "starting a write"))?;
        let ids: Vec<String> =
            changes.iter().zip(&effective).filter(|(_, e)| **e).map(|(c, _)| c.id().to_owned()).collect();
        let known: HashMap<String, String> = sqlx::query_as(
            "SELECT id, content_hash FROM knowledge_documents WHERE tenant_id = $1 AND connector_id = $2 AND id = ANY($3)",
        )
        .bind(scope.tenant_id.as_str())
        .bind(scope.connector_id.as_str())
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| pg_error(e, "reading hashes"))?
        .into_iter()
        .collect();

        let mut cols = UpsertColumns::default();
        let mut deletes = Vec::new();
        let mut unchanged = Vec::new();
        for (i, change) in changes.iter().enumerate() {
            if !effective[i] {
                continue;
            }
            match change {
                Change::Upsert(doc) => {
                    let hash = doc.content_hash();
                    outcome.outcomes[i] = match known.get(&doc.id) {
                        None => ChangeOutcome::Inserted,
                        Some(old) if *old == hash => ChangeOutcome::Unchanged,
                        Some(_) => ChangeOutcome::Updated,
                    };
                    if outcome.outcomes[i] == ChangeOutcome::Unchanged {
                        unchanged.push(doc.id.clone());
                    } else {
                        cols.push(doc, hash);
                    }
                }
                Change::Delete { id } => {
                    outcome.outcomes[i] = if known.contains_key(id) {
                        deletes.push(id.clone());
                        ChangeOutcome::Deleted
                    } else {
                        ChangeOutcome::DeleteMissing
                    };
                }
            }
        }
        if !deletes.is_empty() {
            sqlx::query(
                "DELETE FROM knowledge_documents WHERE tenant_id = $1 AND connector_id = $2 AND id = ANY($3)",
            )
            .bind(scope.tenant_id.as_str())
            .bind(scope.connector_id.as_str())
            .bind(&deletes)
            .execute(&mut *tx)
            .await
            .map_err(|e| pg_error(e, "deleting documents"))?;
        }
        if scope.touch_unchanged && !unchanged.is_empty() {
            sqlx::query(
                "UPDATE knowledge_documents SET sync_gen = $4 WHERE tenant_id = $1 AND connector_id = $2 AND id = ANY($3)",
            )
            .bind(scope.tenant_id.as_str())
            .bind(scope.connector_id.as_str())
            .bind(&unchanged)
            .bind(scope.generation)
            .execute(&mut *tx)
            .await
            .map_err(|e| pg_error(e, "marking documents"))?;
        }
        if !cols.ids.is_empty() {
            sqlx::query(
                "INSERT INTO knowledge_documents (tenant_id, connector_id, id, kind, title, content, url, author, \
                 created_at, updated_at, metadata, content_hash, sync_gen, synced_at) \
                 SELECT $1, $2, u.id, u.kind, u.title, u.content, u.url, u.author, u.created_at, u.updated_at, \
                        u.metadata, u.content_hash, $3, now() \
                 FROM UNNEST($4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], \
                             $10::timestamptz[], $11::timestamptz[], $12::jsonb[], $13::text[]) \
                      AS u(id, kind, title, content, url, author, created_at, updated_at, metadata, content_hash) \
                 ON CONFLICT (tenant_id, connector_id, id) DO UPDATE SET kind = excluded.kind, \
                   title = excluded.title, content = excluded.content, url = excluded.url, \
                   author = excluded.author, created_at = excluded.created_at, updated_at = excluded.updated_at, \
                   metadata = excluded.metadata, content_hash = excluded.content_hash, \
                   sync_gen = excluded.sync_gen, synced_at = excluded.synced_at",
            )
            .bind(scope.tenant_id.as_str())
            .bind(scope.connector_id.as_str())
            .bind(scope.generation)
            .bind(&cols.ids)
            .bind(&cols.kinds)
            .bind(&cols.titles)
            .bind(&cols.contents)
            .bind(&cols.urls)
            .bind(&cols.authors)
            .bind(&cols.created)
            .bind(&cols.updated)
            .bind(&cols.metadata)
            .bind(&cols.hashes)
            .execute(&mut *tx)
            .await
            .map_err(|e| pg_error(e, "writing documents"))?;
        }
        tx.commit().await.map_err(|e| pg_error(e, "committing a batch"))?;
        // The tsvector is maintained by PostgreSQL inside the same statements; it is counted
        // as write time.
        outcome.write_time = started.elapsed();
        Ok(outcome)
    }

    async fn sweep(&self, tenant: &TenantId, connector: &ConnectorId, generation: i64) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM knowledge_documents WHERE tenant_id = $1 AND connector_id = $2 AND sync_gen < $3",
        )
        .bind(tenant.as_str())
        .bind(connector.as_str())
        .bind(generation)
        .execute(&self.pool)
        .await
        .map_err(|e| pg_error(e, "deleting documents"))?;
        Ok(done.rows_affected())
    }

    async fn get(
        &self,
        tenant: &TenantId,
        connector: &ConnectorId,
        id: &str,
    ) -> Result<Option<StoredDocument>> {
        let row = sqlx::query(
            "SELECT * FROM knowledge_documents WHERE tenant_id = $1 AND connector_id = $2 AND id = $3",
        )
        .bind(tenant.as_str())
        .bind(connector.as_str())
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| pg_error(e, "reading a document"))?;
        row.as_ref().map(stored_from_row).transpose()
    }

    fn export<'a>(
        &'a self,
        tenant: &'a TenantId,
        connector: Option<&'a ConnectorId>,
    ) -> BoxStream<'a, Result<StoredDocument>> {
        sqlx::query(
            "SELECT * FROM knowledge_documents WHERE tenant_id = $1 AND ($2::text IS NULL OR connector_id = $2) \
             ORDER BY connector_id, id",
        )
        .bind(tenant.as_str())
        .bind(connector.map(|c| c.as_str()))
        .fetch(&self.pool)
        .map_err(|e| pg_error(e, "exporting documents"))
        .and_then(|row| async move { stored_from_row(&row) })
        .boxed()
    }

    async fn search(&self, tenant: &TenantId, query: &str, limit: usize) -> Result<Vec<SearchHit>> {
        let terms = search_terms(query)?;
        let rows = sqlx::query(
            "SELECT id, connector_id, kind, title, url, \
                    ts_headline('simple', content, q, 'StartSel=[,StopSel=],MaxWords=30,MinWords=10,MaxFragments=1') AS snippet, \
                    ts_rank(search, q)::float8 AS score \
             FROM knowledge_documents, \
                  (SELECT string_agg(quote_literal(t) || ':*', ' & ')::tsquery AS q \
                   FROM unnest($2::text[]) AS t) AS query \
             WHERE tenant_id = $1 AND search @@ q ORDER BY score DESC, id LIMIT $3",
        )
        .bind(tenant.as_str())
        .bind(terms.iter().map(|t| t.to_lowercase()).collect::<Vec<_>>())
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| pg_error(e, "searching"))?;
        rows.iter()
            .map(|r| {
                Ok(SearchHit {
                    id: r.get("id"),
                    connector_id: ConnectorId::new(r.get::<String, _>("connector_id"))?,
                    kind: r.get("kind"),
                    title: r.get("title"),
                    url: r.get("url"),
                    snippet: r.get("snippet"),
                    score: r.get("score"),
                })
            })
            .collect()
    }

    async fn count(&self, tenant: &TenantId, connector: Option<&ConnectorId>) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM knowledge_documents WHERE tenant_id = $1 AND ($2::text IS NULL OR connector_id = $2)",
        )
        .bind(tenant.as_str())
        .bind(connector.map(|c| c.as_str()))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| pg_error(e, "counting documents"))?;
        Ok(n as u64)
    }

    fn describe(&self) -> String {
        format!("PostgreSQL {}", self.location)
    }
}

#[derive(Default)]
struct UpsertColumns {
    ids: Vec<String>,
    kinds: Vec<String>,
    titles: Vec<String>,
    contents: Vec<String>,
    urls: Vec<Option<String>>,
    authors: Vec<Option<String>>,
    created: Vec<Option<DateTime<Utc>>>,
    updated: Vec<Option<DateTime<Utc>>>,
    metadata: Vec<serde_json::Value>,
    hashes: Vec<String>,
}

impl UpsertColumns {
    fn push(&mut self, d: &Document, hash: String) {
        // PostgreSQL text cannot hold NUL; strip it rather than fail the batch.
        let clean = |s: &str| if s.contains('\0') { s.replace('\0', "") } else { s.to_owned() };
        self.ids.push(d.id.clone());
        self.kinds.push(d.kind.clone());
        self.titles.push(clean(&d.title));
        self.contents.push(clean(&d.content));
        self.urls.push(d.url.clone());
        self.authors.push(d.author.clone());
        self.created.push(d.created_at);
        self.updated.push(d.updated_at);
        self.metadata.push(d.metadata.clone());
        self.hashes.push(hash);
    }
}
