//! [`PostgresConnector`]: the [`Connector`] implementation.

use std::sync::Arc;

use async_trait::async_trait;
use connector_core::credentials::CredentialProvider;
use connector_core::reexports::tokio_util::sync::CancellationToken;
use connector_core::{
    Batch, Capabilities, ChangeFeed, Connector, ConnectorContext, ConnectorId, Error, ItemRef, ReadMode,
    ReadRequest, Result, TenantId,
};
use futures::stream::BoxStream;

use crate::client::PgClient;
use crate::config::PostgresConfig;
use crate::listener::PgChangeFeed;
use crate::reader::{Limits, read_tables};
use crate::sql::{TablePlan, qualified};
use crate::tls::Tls;

/// Below this many estimated rows the estimate is an exact `count(*)`: cheap, and fresh
/// tables have not been analyzed yet.
const EXACT_COUNT_BELOW: f64 = 100_000.0;

/// What the reader tasks share with the connector.
pub(crate) struct Shared {
    pub config: PostgresConfig,
    /// TLS of every connection, built from the config once.
    pub tls: Tls,
    pub credentials: Arc<dyn CredentialProvider>,
    pub shutdown: CancellationToken,
}

/// Syncs rows of PostgreSQL tables as documents. See the [crate docs](crate).
pub struct PostgresConnector {
    id: ConnectorId,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for PostgresConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConnector")
            .field("id", &self.id)
            .field("config", &self.shared.config)
            .field("credentials", &self.shared.credentials.describe())
            .finish()
    }
}

impl PostgresConnector {
    /// Validates `config`, reads the TLS roots (`sslrootcert`, or the system's roots for
    /// `verify-ca`/`verify-full`) and builds the connector. Does not connect: see
    /// [`Connector::check`].
    pub fn new(config: PostgresConfig, ctx: &ConnectorContext) -> Result<Self> {
        config.validate()?;
        let tls = Tls::new(&config)?;
        Ok(Self {
            id: config.connector_id(),
            shared: Arc::new(Shared {
                config,
                tls,
                credentials: ctx.credentials.clone(),
                shutdown: ctx.shutdown.clone(),
            }),
        })
    }

    /// The configuration the connector was built with.
    pub fn config(&self) -> &PostgresConfig {
        &self.shared.config
    }

    /// The stream names, one per table: `{schema}.{table}`.
    pub fn streams(&self) -> Vec<String> {
        self.shared.config.tables.iter().map(|t| self.shared.config.stream_name(t)).collect()
    }

    async fn connect(&self) -> Result<PgClient> {
        PgClient::connect(&self.shared).await
    }

    async fn check_table(&self, client: &PgClient, table: &str) -> Result<()> {
        let schema = &self.shared.config.schema;
        let columns = client.table_columns(schema, table).await?;
        if columns.is_empty() {
            return Err(client.table_not_found(schema, table).await);
        }
        let plan = TablePlan::new(&self.shared.config, table, &columns)?;
        client.check_privileges(schema, table).await?;
        let (ts, pk) = (&columns[plan.ts_idx], &columns[plan.pk_idx]);
        if !pk.not_null {
            tracing::warn!(
                stream = %plan.stream, column = %pk.name,
                "primary_key_column is nullable; rows with a NULL key are not synced"
            );
        }
        if !ts.not_null {
            tracing::info!(
                stream = %plan.stream, column = %ts.name,
                "timestamp_column is nullable; rows with a NULL timestamp are seen by full syncs \
                 but their later changes are not seen by incremental syncs"
            );
        }
        // Let the server plan both query shapes: catches types without ordering (json, point)
        // and privileges on every column.
        for phase in plan.phases(None) {
            let (sql, _) = plan.query(&phase);
            client.inner().prepare(&sql).await.map_err(|e| client.error(&e))?;
        }
        Ok(())
    }

    async fn estimate_table(&self, client: &PgClient, table: &str) -> Result<u64> {
        let schema = &self.shared.config.schema;
        const SQL: &str = "SELECT c.reltuples::float8 FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2";
        let row = client.inner().query_opt(SQL, &[schema, &table]).await.map_err(|e| client.error(&e))?;
        let Some(row) = row else { return Err(client.table_not_found(schema, table).await) };
        let reltuples: f64 = row.get(0);
        // -1: never analyzed (PostgreSQL 14+), 0: empty or never analyzed, views: no statistics.
        if reltuples >= EXACT_COUNT_BELOW {
            return Ok(reltuples as u64);
        }
        let sql = format!("SELECT count(*) FROM {}", qualified(schema, table));
        match client.inner().query_one(&sql, &[]).await {
            Ok(row) => Ok(row.get::<_, i64>(0).max(0) as u64),
            // Statement timeout (set below): the estimate is for a progress bar only.
            Err(e) if e.code().map(|c| c.code()) == Some("57014") => Ok(reltuples.max(0.0) as u64),
            Err(e) => Err(client.error(&e)),
        }
    }
}

#[async_trait]
impl Connector for PostgresConnector {
    fn connector_id(&self) -> &ConnectorId {
        &self.id
    }

    fn tenant_id(&self) -> &TenantId {
        &self.shared.config.tenant_id
    }

    fn kind(&self) -> &'static str {
        crate::KIND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            incremental: true,
            incremental_deletes: false,
            realtime: self.shared.config.notify_channel.is_some(),
            total_estimate: true,
        }
    }

    /// Connects, then checks for every table that it exists, that the user may read it, that
    /// the timestamp, primary-key and content columns exist, and that the read queries plan.
    /// All problems are reported together.
    async fn check(&self) -> Result<()> {
        let client = self.connect().await?;
        let mut problems = Vec::new();
        for table in &self.shared.config.tables {
            if let Err(e) = self.check_table(&client, table).await {
                problems.push(e);
            }
        }
        match problems.len() {
            0 => Ok(()),
            1 => Err(problems.remove(0)),
            n => {
                let kind = problems[0].kind();
                let text: Vec<String> = problems.iter().map(|e| e.to_string()).collect();
                Err(Error::new(kind, format!("{n} problems: {}", text.join("; "))))
            }
        }
    }

    /// Rows in the configured tables: `pg_class.reltuples`, or an exact `count(*)` (bounded to
    /// 5 s) for small or never-analyzed tables. `None` for an incremental sync that resumes
    /// from a cursor, where the number of changed rows is unknown.
    async fn estimate_total(&self, request: &ReadRequest) -> Result<Option<u64>> {
        if request.mode == ReadMode::Incremental
            && self.streams().iter().any(|s| request.cursors.contains_key(s))
        {
            return Ok(None);
        }
        let client = self.connect().await?;
        client.inner().batch_execute("SET statement_timeout = '5s'").await.map_err(|e| client.error(&e))?;
        let mut total = 0u64;
        for table in &self.shared.config.tables {
            total += self.estimate_table(&client, table).await?;
        }
        Ok(Some(total))
    }

    /// Streams every table from its cursor in `request.cursors` (or from the start), in both
    /// modes: in incremental mode the cursors are those of the last sync, in full mode those of
    /// an interrupted full sync being resumed (the engine passes none for a fresh full sync).
    fn read(&self, request: ReadRequest) -> BoxStream<'_, Result<Batch>> {
        let config = &self.shared.config;
        let tables = config
            .tables
            .iter()
            .map(|t| (t.clone(), request.cursors.get(&config.stream_name(t)).cloned()))
            .collect();
        let limits = Limits {
            rows: match request.batch_size {
                0 => config.batch_size,
                n => n.min(config.batch_size),
            },
            bytes: match request.batch_bytes {
                0 => usize::MAX,
                n => n,
            },
        };
        read_tables(self.shared.clone(), tables, limits)
    }

    /// Reads the rows `items` name (`stream` = `{schema}.{table}`, `key` = the primary key as
    /// text) with one query per table and 1,000 keys: an upsert per row found, decoded exactly
    /// as a sync decodes it, and a delete per key without a row. Items of other streams are
    /// ignored.
    async fn fetch(&self, items: &[ItemRef]) -> Result<Option<Batch>> {
        crate::fetch::fetch_items(&self.shared, items).await.map(Some)
    }

    /// With `notify_channel` set: a feed that LISTENs on it (see the crate docs).
    fn change_feed(&self) -> Option<Box<dyn ChangeFeed>> {
        let channel = self.shared.config.notify_channel.clone()?;
        Some(Box::new(PgChangeFeed::new(self.shared.clone(), channel)))
    }
}
