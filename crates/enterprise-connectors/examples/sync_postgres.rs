//! The README's quick start: sync PostgreSQL tables into the embedded knowledge store.
//!
//! ```sh
//! export ARAGORA_POSTGRES_USER=reader ARAGORA_POSTGRES_PASSWORD=...
//! cargo run -p enterprise-connectors --example sync_postgres -- myapp documents articles
//! ```

use std::sync::Arc;

use enterprise_connectors::{
    ConnectorContext, EnvCredentialProvider, PostgresConfig, PostgresConnector, SyncEngine, SyncOptions,
    TenantId,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let database = args.next().unwrap_or_else(|| "myapp".into());
    let mut tables: Vec<String> = args.collect();
    if tables.is_empty() {
        tables.push("documents".into());
    }

    // Credentials come from ARAGORA_POSTGRES_USER / ARAGORA_POSTGRES_PASSWORD.
    let ctx = ConnectorContext::new(Arc::new(EnvCredentialProvider::new()));
    let mut config = PostgresConfig::new(TenantId::new("workspace-1")?, database, tables);
    config.content_columns = vec!["title".into(), "body".into()];
    let postgres = PostgresConnector::new(config, &ctx)?;

    // The embedded store at $ARAGORA_HOME/knowledge.db, state in $ARAGORA_HOME/sync_state.
    let engine = SyncEngine::with_defaults(Arc::new(postgres), None).await?;
    engine.on_progress(|synced, total| eprintln!("progress: {synced}/{}", total.unwrap_or(0)));
    engine.on_item_synced(|doc| tracing_free_log(&doc.title));

    let result = engine.sync(SyncOptions::default()).await; // incremental after the first
    println!("Synced {} items ({} unchanged)", result.items_synced, result.items_unchanged);
    if !result.success {
        for e in &result.errors {
            eprintln!("  - {e}");
        }
    }

    let status = engine.get_sync_status().await?;
    println!("status: {}, last sync: {:?}", status.status.as_str(), status.last_sync_at);
    Ok(())
}

fn tracing_free_log(title: &str) {
    if std::env::var_os("VERBOSE").is_some() {
        eprintln!("synced: {title}");
    }
}
