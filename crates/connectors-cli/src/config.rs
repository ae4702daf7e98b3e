//! `connectors.toml`: loading, strict validation, and building connectors, stores and state.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use connector_core::scheduler::SyncSchedule;
use connector_core::state::{JsonFileStateStore, StateStore};
use connector_core::store::KnowledgeStore;
use connector_core::{
    AwsSecretsManagerConfig, AwsSecretsManagerCredentialProvider, CachedCredentialProvider,
    ChainCredentialProvider, Connector, ConnectorContext, CredentialProvider, EnvCredentialProvider,
    VaultConfig, VaultCredentialProvider,
};
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsSection {
    /// Providers asked in order: `env`, `vault`, `aws-secrets-manager`.
    #[serde(default = "default_providers")]
    pub providers: Vec<String>,
    /// Seconds a found value stays cached; 0 turns the cache off. Default 60.
    pub cache_ttl_seconds: Option<u64>,
    /// HashiCorp Vault settings (core's `VaultConfig`).
    pub vault: Option<toml::Table>,
    /// AWS Secrets Manager settings.
    pub aws_secrets_manager: Option<toml::Table>,
}

/// Names the provider tables' keys only: their values may be secrets (a Vault token).
impl std::fmt::Debug for CredentialsSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = |t: &Option<toml::Table>| t.as_ref().map(|t| t.keys().cloned().collect::<Vec<_>>());
        f.debug_struct("CredentialsSection")
            .field("providers", &self.providers)
            .field("cache_ttl_seconds", &self.cache_ttl_seconds)
            .field("vault", &keys(&self.vault))
            .field("aws_secrets_manager", &keys(&self.aws_secrets_manager))
            .finish()
    }
}

impl Default for CredentialsSection {
    fn default() -> Self {
        Self {
            providers: default_providers(),
            cache_ttl_seconds: None,
            vault: None,
            aws_secrets_manager: None,
        }
    }
}

fn default_providers() -> Vec<String> {
    vec!["env".into()]
}

/// The provider names `[credentials] providers` accepts, with the table each one reads.
const PROVIDERS: [(&str, Option<&str>); 3] =
    [("env", None), ("vault", Some("vault")), ("aws-secrets-manager", Some("aws_secrets_manager"))];

/// How long found credentials stay cached when `cache_ttl_seconds` is not set.
const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(60);

/// The configured credential providers.
pub struct Credentials {
    /// The chain, behind the cache: what connectors read from and write to.
    pub provider: Arc<dyn CredentialProvider>,
    /// Where writes go: the first provider of the chain that stores durably, if any.
    pub writer: Option<Arc<dyn CredentialProvider>>,
    /// The providers asked before the writer: a key they hold shadows the written value.
    pub before_writer: Vec<Arc<dyn CredentialProvider>>,
}

/// `[server]`: what `connectors run` serves and how its processes share connectors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Address of the webhook / health / metrics server. Default [`DEFAULT_LISTEN`].
    pub listen: Option<String>,
    /// Seconds a connector lease lives unless renewed (PostgreSQL state only). Default
    /// [`DEFAULT_LEASE_TTL`].
    pub lease_ttl_seconds: Option<u64>,
    /// The most syncs `connectors run` runs at once, over all connectors. Default
    /// [`DEFAULT_MAX_CONCURRENT_SYNCS`].
    pub max_concurrent_syncs: Option<usize>,
}

/// Where `connectors run` listens when `[server] listen` is not set.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// The concurrency limit when `[server] max_concurrent_syncs` is not set.
pub const DEFAULT_MAX_CONCURRENT_SYNCS: usize = 4;

/// The lease TTL when `[server] lease_ttl_seconds` is not set.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);

impl ServerSection {
    /// The listen address (validated at load).
    pub fn listen_addr(&self) -> std::net::SocketAddr {
        self.listen.as_deref().unwrap_or(DEFAULT_LISTEN).parse().expect("validated at load")
    }

    /// The lease TTL.
    pub fn lease_ttl(&self) -> Duration {
        self.lease_ttl_seconds.map_or(DEFAULT_LEASE_TTL, Duration::from_secs)
    }

    /// The concurrency limit of `connectors run`.
    pub fn max_concurrent_syncs(&self) -> usize {
        self.max_concurrent_syncs.unwrap_or(DEFAULT_MAX_CONCURRENT_SYNCS)
    }
}

/// A loaded configuration with its connectors built.
pub struct Loaded {
    pub path: PathBuf,
    pub file: FileConfig,
    pub credentials: Credentials,
    pub connectors: Vec<Arc<dyn Connector>>,
    /// Each connector's `[connectors.schedule]` (core's [`SyncSchedule`], validated), by the
    /// index of `connectors`; `None`: run only by triggers.
    pub schedules: Vec<Option<SyncSchedule>>,
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
    let file: FileConfig = toml::from_str(&text).map_err(|e| parse_error(path, &text, &e))?;
    if let Some(listen) = &file.server.listen {
        listen.parse::<std::net::SocketAddr>().map_err(|e| {
            CliError::usage(format!(
                "{shown}: server.listen: {listen:?} is not an address like 127.0.0.1:8080: {e}"
            ))
        })?;
    }
    if file.server.max_concurrent_syncs == Some(0) {
        return Err(CliError::usage(format!(
            "{shown}: server.max_concurrent_syncs: must be at least 1 (default {DEFAULT_MAX_CONCURRENT_SYNCS})"
        )));
    }
    if file.server.lease_ttl_seconds == Some(0) {
        return Err(CliError::usage(format!(
            "{shown}: server.lease_ttl_seconds: must be at least 1 (default {})",
            DEFAULT_LEASE_TTL.as_secs()
        )));
    }
    let credentials = credentials(path, &file.credentials)?;
    let ctx = ConnectorContext::new(credentials.provider.clone());
    let mut connectors: Vec<Arc<dyn Connector>> = Vec::new();
    let mut schedules = Vec::new();
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
        let schedule = match table.remove("schedule") {
            Some(schedule) => Some(SyncSchedule::deserialize(schedule).map_err(|e| {
                CliError::usage(format!("{shown}: {what}: schedule: {}", e.message().trim()))
            })?),
            None => None,
        };
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
        schedules.push(schedule);
    }
    Ok(Loaded { path: path.to_path_buf(), file, credentials, connectors, schedules })
}

/// The defaults, as when the file is empty (for commands that run without a file).
pub fn defaults(path: &Path) -> Result<Loaded, CliError> {
    let file = FileConfig::default();
    let credentials = credentials(path, &file.credentials)?;
    Ok(Loaded { path: path.to_path_buf(), file, credentials, connectors: vec![], schedules: vec![] })
}

/// A TOML error without the source line it points at (which may hold a secret: a Vault token,
/// a password in a store URL), with the table and key it is in, and the line and column.
fn parse_error(path: &Path, text: &str, e: &toml::de::Error) -> CliError {
    let message = e.message().trim().replace('\n', " ");
    let Some(span) = e.span() else {
        return CliError::usage(format!("{}: {message}", path.display()));
    };
    let mut start = span.start.min(text.len());
    while !text.is_char_boundary(start) {
        start -= 1;
    }
    let before = &text[..start];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    let table = before[..line_start].lines().rev().map(strip_comment).find_map(table_header);
    let line_text = text[line_start..].lines().next().unwrap_or("");
    let key = line_text.split_once('=').map(|(k, _)| k.trim()).filter(|k| is_key(k));
    let place = match (table, key) {
        (Some(t), Some(k)) => format!("{t} {k}: "),
        (Some(t), None) => format!("{t}: "),
        (None, Some(k)) => format!("{k}: "),
        (None, None) => String::new(),
    };
    CliError::usage(format!("{}: {place}{message} (line {line}, column {column})", path.display()))
}

fn strip_comment(line: &str) -> &str {
    line.split_once('#').map_or(line, |(l, _)| l).trim()
}

/// `[table]` or `[[array]]` when `line` is a table header.
fn table_header(line: &str) -> Option<&str> {
    let inner = line.strip_prefix('[')?.strip_suffix(']')?;
    let inner = inner.strip_prefix('[').and_then(|i| i.strip_suffix(']')).unwrap_or(inner);
    is_key(inner.trim()).then_some(line)
}

/// A bare or dotted TOML key (`providers`, `credentials.vault`).
fn is_key(text: &str) -> bool {
    !text.is_empty() && text.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ' '))
}

/// Builds the providers `[credentials] providers` names, in order, as a chain behind the cache.
fn credentials(path: &Path, section: &CredentialsSection) -> Result<Credentials, CliError> {
    let shown = path.display();
    let known = || PROVIDERS.iter().map(|(name, _)| format!("{name:?}")).collect::<Vec<_>>().join(", ");
    if section.providers.is_empty() {
        return Err(CliError::usage(format!(
            "{shown}: [credentials] providers: the list is empty; name at least one of {}",
            known()
        )));
    }
    let mut seen = BTreeSet::new();
    for name in &section.providers {
        if !PROVIDERS.iter().any(|(known, _)| known == name) {
            return Err(CliError::usage(format!(
                "{shown}: [credentials] providers: unknown provider {name:?}; known providers: {}",
                known()
            )));
        }
        if !seen.insert(name.as_str()) {
            return Err(CliError::usage(format!(
                "{shown}: [credentials] providers: {name:?} is listed twice"
            )));
        }
    }
    let tables =
        [("vault", section.vault.is_some()), ("aws_secrets_manager", section.aws_secrets_manager.is_some())];
    for (table, present) in tables {
        let (name, _) =
            PROVIDERS.iter().find(|(_, t)| *t == Some(table)).expect("every table has a provider");
        if present && !seen.contains(name) {
            return Err(CliError::usage(format!(
                "{shown}: [credentials.{table}]: the table is set but {name:?} is not in [credentials] \
                 providers ({}); add it (e.g. providers = [{name:?}, \"env\"]) or remove the table",
                section.providers.iter().map(|p| format!("{p:?}")).collect::<Vec<_>>().join(", ")
            )));
        }
    }
    let mut providers: Vec<Arc<dyn CredentialProvider>> = Vec::new();
    for name in &section.providers {
        providers.push(match name.as_str() {
            "env" => Arc::new(EnvCredentialProvider::new()),
            "vault" => vault_provider(path, section.vault.as_ref())?,
            "aws-secrets-manager" => aws_provider(path, section.aws_secrets_manager.as_ref())?,
            other => unreachable!("provider {other:?} was checked above"),
        });
    }
    let writer_index = providers.iter().position(|p| p.is_writable());
    let writer = writer_index.map(|i| providers[i].clone());
    let before_writer = providers[..writer_index.unwrap_or(0)].to_vec();
    let chain = ChainCredentialProvider::from_providers(providers);
    let ttl = section.cache_ttl_seconds.map_or(DEFAULT_CACHE_TTL, Duration::from_secs);
    let provider: Arc<dyn CredentialProvider> = if ttl.is_zero() {
        Arc::new(chain)
    } else {
        Arc::new(CachedCredentialProvider::with_ttl(chain, ttl))
    };
    Ok(Credentials { provider, writer, before_writer })
}

/// `[credentials.vault]`: a [`VaultCredentialProvider`]; without the table, the defaults
/// (`VAULT_ADDR`, `VAULT_TOKEN`). Does not contact Vault.
fn vault_provider(path: &Path, table: Option<&toml::Table>) -> Result<Arc<dyn CredentialProvider>, CliError> {
    let config: VaultConfig = match table {
        Some(table) => provider_table(path, "vault", table, &["token", "secret_id"])?,
        None => VaultConfig::default(),
    };
    let provider = VaultCredentialProvider::new(config)
        .map_err(|e| CliError::usage(format!("{}: [credentials.vault]: {e}", path.display())))?;
    Ok(Arc::new(provider))
}

/// `[credentials.aws_secrets_manager]`: an [`AwsSecretsManagerCredentialProvider`]; without the
/// table, the defaults (region and credentials from the standard AWS chain). Does not contact
/// AWS.
fn aws_provider(path: &Path, table: Option<&toml::Table>) -> Result<Arc<dyn CredentialProvider>, CliError> {
    let config: AwsSecretsManagerConfig = match table {
        Some(table) => provider_table(path, "aws_secrets_manager", table, &[])?,
        None => AwsSecretsManagerConfig::default(),
    };
    let provider = AwsSecretsManagerCredentialProvider::new(config).map_err(|e| {
        CliError::usage(format!("{}: [credentials.aws_secrets_manager]: {e}", path.display()))
    })?;
    Ok(Arc::new(provider))
}

/// Deserializes the table `[credentials.<name>]` into a provider's settings. The values of
/// `secret_fields` appear in no message: they must be strings, and are cut out of errors.
fn provider_table<T: serde::de::DeserializeOwned>(
    path: &Path,
    name: &str,
    table: &toml::Table,
    secret_fields: &[&str],
) -> Result<T, CliError> {
    let shown = path.display();
    let mut secrets = Vec::new();
    for field in secret_fields {
        match table.get(*field) {
            None => {}
            Some(toml::Value::String(s)) => secrets.push(s.as_str()),
            Some(_) => {
                return Err(CliError::usage(format!(
                    "{shown}: [credentials.{name}]: `{field}` must be a string"
                )));
            }
        }
    }
    T::deserialize(toml::Value::Table(table.clone())).map_err(|e| {
        let mut message = e.to_string().trim().replace('\n', " ");
        for secret in secrets.iter().filter(|s| s.len() >= 4) {
            message = message.replace(secret, "<redacted>");
        }
        CliError::usage(format!("{shown}: [credentials.{name}]: {message}"))
    })
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
        Ok(self.state_and_pool().await?.0)
    }

    /// The state store, and its PostgreSQL pool when it is in PostgreSQL (`connectors run`
    /// keeps its connector leases there).
    pub async fn state_and_pool(&self) -> Result<(Arc<dyn StateStore>, Option<PgPool>), CliError> {
        let s = &self.file.state;
        match (&s.dir, &s.url) {
            (Some(_), Some(_)) => Err(CliError::usage(format!(
                "{}: state: set either `dir` or `url`, not both",
                self.path.display()
            ))),
            (Some(dir), None) => Ok((Arc::new(JsonFileStateStore::new(dir)), None)),
            (None, None) => Ok((Arc::new(JsonFileStateStore::default_location()), None)),
            (None, Some(url)) => {
                open_state_db(url).await.map_err(|e| CliError::failed(format!("state: {e}")))
            }
        }
    }
}

type PgPool = connector_core::reexports::sqlx::PgPool;

async fn open_state_db(url: &str) -> connector_core::Result<(Arc<dyn StateStore>, Option<PgPool>)> {
    use connector_core::Error;
    let location = connector_core::store::redact_url(url);
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let pool = sqlx_pg_pool(url)
            .await
            .map_err(|e| Error::state(format!("connecting to {location}")).with_source(e))?;
        let store = connector_core::state::PgStateStore::new(pool.clone(), location).await?;
        return Ok((Arc::new(store), Some(pool)));
    }
    let path = url.strip_prefix("sqlite://").unwrap_or(url);
    let store = connector_core::store::SqliteKnowledgeStore::open(path).await?;
    let state = connector_core::state::SqliteStateStore::new(store.pool().clone(), path.to_owned()).await?;
    Ok((Arc::new(state), None))
}

async fn sqlx_pg_pool(
    url: &str,
) -> Result<connector_core::reexports::sqlx::PgPool, connector_core::reexports::sqlx::Error> {
    connector_core::reexports::sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(url).await
}
