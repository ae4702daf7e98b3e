//! The PostgreSQL server of the integration tests: the testkit's shared server (the one
//! `cargo xtask test` announces, or one started for this process and stopped with it).

#![allow(dead_code)]

use std::sync::Arc;

use connector_core::{ConnectorContext, StaticCredentialProvider, TenantId};
use connector_postgres::PostgresConfig;
use connector_testkit::postgres::PgServer;

pub struct Server {
    pg: &'static PgServer,
}

/// The shared server.
pub async fn server() -> Server {
    Server { pg: PgServer::shared().await.expect("PostgreSQL for tests (run `cargo xtask test`)") }
}

impl Server {
    pub fn port(&self) -> u16 {
        self.pg.port()
    }

    /// A superuser connection to `db`.
    pub async fn admin(&self, db: &str) -> tokio_postgres::Client {
        self.pg.client(db).await.unwrap()
    }

    /// A fresh database named `pgconn_{name}` (dropped first if it exists), set up with `sql`.
    pub async fn database(&self, name: &str, sql: &str) -> tokio_postgres::Client {
        let admin = self.admin("postgres").await;
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS pgconn_{name} WITH (FORCE)")).await.unwrap();
        admin.batch_execute(&format!("CREATE DATABASE pgconn_{name}")).await.unwrap();
        let client = self.admin(&format!("pgconn_{name}")).await;
        client.batch_execute(sql).await.unwrap();
        client
    }

    /// A config for `tables` in database `pgconn_{db}` on this server, tenant `t1`.
    pub fn config(&self, db: &str, tables: &[&str]) -> PostgresConfig {
        PostgresConfig {
            host: self.pg.host().into(),
            port: self.pg.port(),
            ..PostgresConfig::new(
                TenantId::new("t1").unwrap(),
                format!("pgconn_{db}"),
                tables.iter().map(|t| t.to_string()).collect(),
            )
        }
    }
}

/// A context whose credentials are the superuser's.
pub fn ctx() -> ConnectorContext {
    ctx_with(
        StaticCredentialProvider::new()
            .with("postgres_user", PgServer::SUPERUSER)
            .with("postgres_password", PgServer::SUPERUSER_PASSWORD),
    )
}

pub fn ctx_with(provider: StaticCredentialProvider) -> ConnectorContext {
    ConnectorContext::new(Arc::new(provider))
}
