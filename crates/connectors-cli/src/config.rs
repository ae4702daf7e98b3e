//! `connectors.toml`: loading, strict validation, and building connectors, stores and state.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use connector_core::state::{JsonFileStateStore, StateStore};
use connector_core::store::KnowledgeStore;
use connector_core::{Connector, ConnectorContext, CredentialProvider, EnvCredentialProvider};
use serde::Deserialize;

use crate::CliError;

/// The file's top level.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Where documents go.
    #[serde(default)]
    pub store: StoreSection,
    /// Where sync state goes.
    #[serde(default)]
    pub state: StateSection,
    /// Where secrets come from.
    #[serde(default)]
    pub credentials: CredentialsSection,
    /// `connectors run` server.
    #[serde(default)]
    pub server: ServerSection,
    /// The connectors.
    #[serde(default)]
    pub connectors: Vec<toml::Table>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// `sqlite:///path/knowledge.db`, a plain path, or `postgres://...`.
    pub url: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateSection {
    /// Directory of JSON state files.
    pub dir: Option<PathBuf>,
    /// Or a database: `sqlite:///path/state.db` or `postgres://...`.
    pub url: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsSection {
    /// Providers tried in order.
    #[serde(default = "default_providers")]
    pub providers: Vec<String>,
    /// HashiCorp Vault settings.
    pub vault: Option<toml::Table>,
    /// AWS Secrets Manager settings.
    pub aws_secrets_manager: Option<toml::Table>,
}

impl Default for CredentialsSection {
    fn default() -> Self {
        Self { providers: default_providers(), vault: None, aws_secrets_manager: None }
    }
}

fn default_providers() -> Vec<String> {
    vec!["env".into()]
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // read by `connectors run`; validated at load
pub struct ServerSection {
    /// Address of the webhook / health / metrics server.
    pub listen: Option<String>,
}

/// A connector's `[connectors.schedule]` table; checked now, used by `connectors run`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct ScheduleSection {
    pub interval_seconds: Option<u64>,
    pub interval_minutes: Option<u64>,
    pub interval_hours: Option<u64>,
    pub cron: Option<String>,
    pub start_time: Option<String>,
    pub end_time: Option<String>,
    pub timezone: Option<String>,
}

/// A loaded configuration with its connectors built.
pub struct Loaded {
    pub path: PathBuf,
    pub file: FileConfig,
    pub connectors: Vec<Arc<dyn Connector>>,
}

/// Which file to read: `--config`, else `$ARAGORA_CONFIG`, else `./connectors.toml`.
pub fn resolve_path(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    match std::env::var_os("ARAGORA_CONFIG").filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from("connectors.toml"),
    }
}

fn describe_table(index: usize, table: &toml::Table) -> String {
    let mut s = format!("connectors[{index}]");
    if let Some(id) = table.get("id").and_then(|v| v.as_str()) {
        s.push_str(&format!(" (id {id:?})"));
    } else if let Some(t) = table.get("type").and_then(|v| v.as_str()) {
        s.push_str(&format!(" (type {t:?})"));
    }
    s
}

/// Reads and validates the file, and builds every connector (without connecting).
pub fn load(path: &Path) -> Result<Loaded, CliError> {
    let shown = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::NotFound {
            " (pass --config PATH or set ARAGORA_CONFIG)"
        } else {
            ""
        };
        CliError::usage(format!("cannot read configuration {shown}: {e}{hint}"))
    })?;
    let file: FileConfig = toml::from_str(&text)
        .map_err(|e| CliError::usage(format!("{shown}: {}", e.to_string().trim_end())))?;
    if let Some(listen) = &file.server.listen {
        listen.parse::<std::net::SocketAddr>().map_err(|e| {
            CliError::usage(format!(
                "{shown}: server.listen: {listen:?} is not an address like 127.0.0.1:8080: {e}"
            ))
        })?;
    }
    let credentials = credential_provider(path, &file.credentials)?;
    let ctx = ConnectorContext::new(credentials);
    let mut connectors: Vec<Arc<dyn Connector>> = Vec::new();
    let mut seen = BTreeSet::new();
    for (index, table) in file.connectors.iter().enumerate() {
        let what = describe_table(index, table);
        let mut table = table.clone();
        let kind = match table.remove("type") {
            Some(toml::Value::String(s)) => s,
            Some(other) => {
                return Err(CliError::usage(format!(
                    "{shown}: {what}: key `type` must be a string, not {other}"
                )));
            }
            None => {
                return Err(CliError::usage(format!(
                    "{shown}: {what}: missing key `type` (one of: {})",
                    enterprise_connectors::registry::known_types().join(", ")
                )));
            }
        };
        if let Some(schedule) = table.remove("schedule") {
            ScheduleSection::deserialize(schedule)
                .map_err(|e| CliError::usage(format!("{shown}: {what}: schedule: {}", e.message().trim())))?;
        }
        let connector = enterprise_connectors::registry::build(&kind, table, &ctx)
            .map_err(|e| CliError::usage(format!("{shown}: {what}: {e}")))?;
        let key = (connector.connector_id().clone(), connector.tenant_id().clone());
        if !seen.insert(key) {
            return Err(CliError::usage(format!(
                "{shown}: {what}: connector id {:?} is used twice for tenant {:?}; give each an `id`",
                connector.connector_id().as_str(),
                connector.tenant_id().as_str()
            )));
        }
        connectors.push(connector);
    }
    Ok(Loaded { path: path.to_path_buf(), file, connectors })
}

fn credential_provider(
    path: &Path,
    section: &CredentialsSection,
) -> Result<Arc<dyn CredentialProvider>, CliError> {
    for (key, table) in [("vault", &section.vault), ("aws_secrets_manager", &section.aws_secrets_manager)] {
        if table.is_some() {
            return Err(CliError::usage(format!(
                "{}: [credentials.{key}]: this provider is not available in this build yet; remove the table and use the \"env\" provider",
                path.display()
            )));
        }
    }
    match section.providers.as_slice() {
        [only] if only == "env" => Ok(Arc::new(EnvCredentialProvider::new())),
        [] => {
            Err(CliError::usage(format!("{}: credentials.providers is empty; use [\"env\"]", path.display())))
        }
        list => {
            let other = list.iter().find(|p| p.as_str() != "env").map(String::as_str).unwrap_or("env");
            Err(CliError::usage(match other {
                "vault" | "aws-secrets-manager" => format!(
                    "{}: credentials.providers: {other:?} is not available in this build yet; use [\"env\"]",
                    path.display()
                ),
                _ => format!(
                    "{}: credentials.providers: unknown provider {other:?}; expected \"env\", \"vault\" or \"aws-secrets-manager\"",
                    path.display()
                ),
            }))
        }
    }
}

impl Loaded {
    /// The connectors named by `--connector` (all when none is named).
    pub fn select(&self, ids: &[String]) -> Result<Vec<Arc<dyn Connector>>, CliError> {
        if ids.is_empty() {
            return Ok(self.connectors.clone());
        }
        let mut out = Vec::new();
        for id in ids {
            let found: Vec<_> =
                self.connectors.iter().filter(|c| c.connector_id().as_str() == id).cloned().collect();
            if found.is_empty() {
                let known: Vec<&str> = self.connectors.iter().map(|c| c.connector_id().as_str()).collect();
                return Err(CliError::usage(format!(
                    "{}: no connector with id {id:?}; configured: {}",
                    self.path.display(),
                    if known.is_empty() { "(none)".to_string() } else { known.join(", ") }
                )));
            }
            out.extend(found);
        }
        Ok(out)
    }

    /// The knowledge store the file names (default: embedded SQLite in `$ARAGORA_HOME`).
    pub async fn store(&self) -> Result<Arc<dyn KnowledgeStore>, CliError> {
        let url = match &self.file.store.url {
            Some(u) => u.clone(),
            None => connector_core::home::default_store_path().display().to_string(),
        };
        connector_core::store::open_store(&url).await.map_err(|e| {
            let msg = format!("store: {e}");
            if e.kind() == connector_core::ErrorKind::Config {
                CliError::usage(msg)
            } else {
                CliError::failed(msg)
            }
        })
    }

    /// The state store the file names (default: JSON files in `$ARAGORA_HOME/sync_state`).
    pub async fn state(&self) -> Result<Arc<dyn StateStore>, CliError> {
        let s = &self.file.state;
        match (&s.dir, &s.url) {
            (Some(_), Some(_)) => Err(CliError::usage(format!(
                "{}: state: set either `dir` or `url`, not both",
                self.path.display()
            ))),
            (Some(dir), None) => Ok(Arc::new(JsonFileStateStore::new(dir))),
            (None, None) => Ok(Arc::new(JsonFileStateStore::default_location())),
            (None, Some(url)) => {
                open_state_db(url).await.map_err(|e| CliError::failed(format!("state: {e}")))
            }
        }
    }
}

async fn open_state_db(url: &str) -> connector_core::Result<Arc<dyn StateStore>> {
    use connector_core::Error;
    let location = connector_core::store::redact_url(url);
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let pool = sqlx_pg_pool(url)
            .await
            .map_err(|e| Error::state(format!("connecting to {location}")).with_source(e))?;
        return Ok(Arc::new(connector_core::state::PgStateStore::new(pool, location).await?));
    }
    let path = url.strip_prefix("sqlite://").unwrap_or(url);
    let store = connector_core::store::SqliteKnowledgeStore::open(path).await?;
    Ok(Arc::new(connector_core::state::SqliteStateStore::new(store.pool().clone(), path.to_owned()).await?))
}

async fn sqlx_pg_pool(
    url: &str,
) -> Result<connector_core::reexports::sqlx::PgPool, connector_core::reexports::sqlx::Error> {
    connector_core::reexports::sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(url).await
}
