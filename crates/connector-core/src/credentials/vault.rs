//! [`VaultCredentialProvider`]: credentials in a HashiCorp Vault KV version 2 secrets engine.
//!
//! Key `postgres_password` is the field `value` of the secret `aragora/postgres_password` in
//! the KV v2 engine mounted at `secret`, that is `GET /v1/secret/data/aragora/postgres_password`.
//! The mount, the prefix and the field are settings of [`VaultConfig`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::Value;
use vaultrs::api::kv2::requests::{ReadSecretRequest, SetSecretRequestOptions};
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

use super::{CredentialProvider, validate_key};
use crate::error::{Error, ErrorKind, Result};

/// Settings of a [`VaultCredentialProvider`]; every field has a default, unknown fields are
/// rejected when deserializing.
///
/// Authentication is a token (`token`, else the `VAULT_TOKEN` environment variable) or, when
/// `role_id` and `secret_id` are set, an AppRole login. `Debug` never shows the token or the
/// secret ID.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VaultConfig {
    /// The server's URL (`https://vault.example.com:8200`); default: `VAULT_ADDR`.
    pub address: Option<String>,
    /// A Vault token; default: `VAULT_TOKEN`. Not allowed together with AppRole.
    pub token: Option<SecretString>,
    /// Where the KV v2 engine is mounted. Default `secret`.
    pub mount: String,
    /// The folder of the secrets in the mount: key `k` is the secret `<prefix>/k`. Default
    /// `aragora`; empty for none.
    pub prefix: String,
    /// The field of the secret that holds the value. Default `value`.
    pub field: String,
    /// A Vault Enterprise namespace, sent as `X-Vault-Namespace`.
    pub namespace: Option<String>,
    /// Where the AppRole auth method is mounted. Default `approle`.
    pub approle_mount: String,
    /// The AppRole role ID; with `secret_id`, the provider logs in with AppRole.
    pub role_id: Option<String>,
    /// The AppRole secret ID.
    pub secret_id: Option<SecretString>,
    /// Timeout of each request to Vault, in seconds. Default 30.
    pub timeout_seconds: u64,
    /// When true, `set_credential` uses check-and-set: the write succeeds only if the secret is
    /// still at the version this provider last read or wrote (the current version when it has
    /// not seen the key), so two writers cannot silently overwrite each other. After such a
    /// conflict, writes keep failing until the key is read again. Default false.
    pub cas_required: bool,
}

impl Default for VaultConfig {
    fn default() -> Self {
        Self {
            address: None,
            token: None,
            mount: "secret".into(),
            prefix: "aragora".into(),
            field: "value".into(),
            namespace: None,
            approle_mount: "approle".into(),
            role_id: None,
            secret_id: None,
            timeout_seconds: 30,
            cas_required: false,
        }
    }
}

/// Reads and writes credentials in a HashiCorp Vault KV v2 engine.
///
/// - `get_credential` returns `Ok(None)` when the secret does not exist, is deleted, or lacks
///   the field (or the field is empty). A denied request (HTTP 401/403) is an
///   [`ErrorKind::Auth`] error naming the secret's path and the server; an unreachable server
///   or an HTTP 5xx is [`ErrorKind::Transient`].
/// - `set_credential` writes a new version of the secret whose data is the one field (other
///   fields of that secret are not kept). See [`VaultConfig::cas_required`] and
///   [`set_credential_cas`](Self::set_credential_cas) for check-and-set writes.
/// - With AppRole, the provider logs in on first use, logs in again shortly before the token's
///   lease ends, and once more when Vault answers 403 (a revoked or expired token).
///
/// The token needs `read` on `<mount>/data/<prefix>/*` and `<mount>/metadata/<prefix>/*` and
/// `create` + `update` on `<mount>/data/<prefix>/*`.
pub struct VaultCredentialProvider {
    address: String,
    mount: String,
    prefix: String,
    field: String,
    namespace: Option<String>,
    cas_required: bool,
    approle: Option<AppRole>,
    session: RwLock<Session>,
    login_lock: tokio::sync::Mutex<()>,
    /// The version of each key this provider last read or wrote, for check-and-set writes.
    versions: Mutex<HashMap<String, u64>>,
}

struct AppRole {
    mount: String,
    role_id: String,
    secret_id: SecretString,
    /// A client without a token: logs in, and is the template of the logged-in clients.
    client: VaultClient,
}

/// The client that carries the current token.
struct Session {
    client: Option<Arc<VaultClient>>,
    /// Bumped at each login, so concurrent callers that saw the same stale token log in once.
    generation: u64,
    /// When to log in again (AppRole tokens with a lease); `None`: never.
    refresh_at: Option<Instant>,
}

impl std::fmt::Debug for VaultCredentialProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let auth = match &self.approle {
            Some(a) => format!("approle (mount {}, role_id {})", a.mount, a.role_id),
            None => "token".into(),
        };
        f.debug_struct("VaultCredentialProvider")
            .field("address", &self.address)
            .field("mount", &self.mount)
            .field("prefix", &self.prefix)
            .field("field", &self.field)
            .field("namespace", &self.namespace)
            .field("auth", &auth)
            .field("cas_required", &self.cas_required)
            .finish_non_exhaustive()
    }
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The HTTP status of a failed request, and Vault's error messages.
fn status_of(e: &ClientError) -> Option<(u16, String)> {
    match e {
        ClientError::APIError { code, errors } => Some((*code, errors.join("; "))),
        ClientError::RestClientError {
            source: rustify::errors::ClientError::ServerResponseError { code, .. },
        } => Some((*code, String::new())),
        _ => None,
    }
}

/// For a 404 on reading a secret: the current version, which Vault reports when the latest
/// version is deleted (`{"data": {"data": null, "metadata": {"version": N}}}`), else 0 (no
/// secret). `None` for other errors.
fn missing_version(e: &ClientError) -> Option<u64> {
    match e {
        ClientError::APIError { code: 404, .. } => Some(0),
        ClientError::RestClientError {
            source: rustify::errors::ClientError::ServerResponseError { code: 404, content },
        } => {
            let body: Option<Value> = content.as_deref().and_then(|c| serde_json::from_str(c).ok());
            Some(body.and_then(|b| b["data"]["metadata"]["version"].as_u64()).unwrap_or(0))
        }
        _ => None,
    }
}

fn describe_status(code: u16, messages: &str) -> String {
    if messages.is_empty() { format!("HTTP {code}") } else { format!("HTTP {code}: {messages}") }
}

impl VaultCredentialProvider {
    /// A provider with `config`; the address and token default to `VAULT_ADDR` and
    /// `VAULT_TOKEN`. Does not contact Vault.
    pub fn new(config: VaultConfig) -> Result<Self> {
        let address = config.address.or_else(|| env_var("VAULT_ADDR")).ok_or_else(|| {
            Error::config("no Vault address: set `address` or the VAULT_ADDR environment variable")
        })?;
        let address = address.trim_end_matches('/').to_owned();
        match url::Url::parse(&address) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {}
            _ => {
                return Err(Error::config(format!(
                    "invalid Vault address {address:?}: expected http(s)://host[:port]"
                )));
            }
        }
        let mount = config.mount.trim_matches('/').to_owned();
        let prefix = config.prefix.trim_matches('/').to_owned();
        if mount.is_empty() || config.field.is_empty() {
            return Err(Error::config("Vault `mount` and `field` must not be empty"));
        }
        if config.timeout_seconds == 0 {
            return Err(Error::config("Vault `timeout_seconds` must be at least 1"));
        }

        let approle = match (config.role_id, config.secret_id) {
            (Some(role_id), Some(secret_id)) if config.token.is_none() => Some((role_id, secret_id)),
            (Some(_), Some(_)) => {
                return Err(Error::config(
                    "set either a Vault `token` or `role_id` and `secret_id`, not both",
                ));
            }
            (None, None) => None,
            _ => return Err(Error::config("Vault AppRole login needs both `role_id` and `secret_id`")),
        };
        let token = match &approle {
            Some(_) => SecretString::from(String::new()),
            None => {
                config.token.or_else(|| env_var("VAULT_TOKEN").map(SecretString::from)).ok_or_else(|| {
                    Error::config(
                        "no Vault credentials: set `token` or the VAULT_TOKEN environment variable, \
                     or `role_id` and `secret_id`",
                    )
                })?
            }
        };

        let mut builder = VaultClientSettingsBuilder::default();
        builder
            .address(&address)
            .token(token.expose_secret())
            .timeout(Some(Duration::from_secs(config.timeout_seconds)))
            .namespace(config.namespace.clone());
        let settings = builder
            .build()
            .map_err(|e| Error::config(format!("Vault client settings for {address}")).with_source(e))?;
        let client = VaultClient::new(settings).map_err(|e| {
            Error::config(format!("cannot create a Vault client for {address}")).with_source(e)
        })?;

        let (approle, session) = match approle {
            Some((role_id, secret_id)) => (
                Some(AppRole {
                    mount: config.approle_mount.trim_matches('/').to_owned(),
                    role_id,
                    secret_id,
                    client,
                }),
                Session { client: None, generation: 0, refresh_at: None },
            ),
            None => (None, Session { client: Some(Arc::new(client)), generation: 0, refresh_at: None }),
        };
        Ok(Self {
            address,
            mount,
            prefix,
            field: config.field,
            namespace: config.namespace,
            cas_required: config.cas_required,
            approle,
            session: RwLock::new(session),
            login_lock: tokio::sync::Mutex::new(()),
            versions: Mutex::default(),
        })
    }

    /// A provider with the default settings: `VAULT_ADDR`, `VAULT_TOKEN`, mount `secret`,
    /// prefix `aragora`, field `value`.
    pub fn from_env() -> Result<Self> {
        Self::new(VaultConfig::default())
    }

    /// The server's address, without a trailing slash.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The secret's path in the mount for `key` (`aragora/postgres_password`).
    pub fn secret_path(&self, key: &str) -> String {
        if self.prefix.is_empty() { key.to_owned() } else { format!("{}/{key}", self.prefix) }
    }

    /// The secret's API path for `key`, without `/v1/` (`secret/data/aragora/postgres_password`).
    pub fn data_path(&self, key: &str) -> String {
        format!("{}/data/{}", self.mount, self.secret_path(key))
    }

    /// Reads `key` with the version of the secret it came from, for
    /// [`set_credential_cas`](Self::set_credential_cas).
    pub async fn get_credential_with_version(&self, key: &str) -> Result<Option<(SecretString, u64)>> {
        validate_key(key)?;
        let path = self.secret_path(key);
        let what = format!("reading {}", self.data_path(key));
        let read = self
            .request(&what, |client| {
                let endpoint = ReadSecretRequest::builder()
                    .mount(self.mount.as_str())
                    .path(path.as_str())
                    .build()
                    .expect("mount and path are set");
                async move {
                    match vaultrs::api::exec_with_result(&*client, endpoint).await {
                        Ok(secret) => Ok(Ok(secret)),
                        Err(e) => missing_version(&e).map(Err).ok_or(e),
                    }
                }
            })
            .await?;
        let secret = match read {
            Ok(secret) => secret,
            Err(version) => {
                self.remember_version(key, version);
                return Ok(None);
            }
        };
        let version = secret.metadata.version;
        self.remember_version(key, version);
        let Value::Object(mut data) = secret.data else { return Ok(None) };
        match data.remove(&self.field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some((SecretString::from(s), version))),
            Some(_) => Err(Error::source_error(format!(
                "field `{}` of Vault secret {} at {} is not a string",
                self.field,
                self.data_path(key),
                self.address
            ))),
        }
    }

    /// Writes `value` under `key` only if the secret is at `expected_version` (0: only if it
    /// does not exist), and returns the new version. When another writer got there first, the
    /// error ([`ErrorKind::Config`]) says that check-and-set failed.
    pub async fn set_credential_cas(
        &self,
        key: &str,
        value: SecretString,
        expected_version: u64,
    ) -> Result<u64> {
        validate_key(key)?;
        self.write(key, &value, Some(expected_version)).await
    }

    /// The secret's current version (0 when it does not exist), from its metadata.
    pub async fn current_version(&self, key: &str) -> Result<u64> {
        validate_key(key)?;
        let path = self.secret_path(key);
        let what = format!("reading {}/metadata/{path}", self.mount);
        let read = self
            .request(&what, |client| {
                let path = path.as_str();
                async move { vaultrs::kv2::read_metadata(&*client, &self.mount, path).await }
            })
            .await;
        match read {
            Ok(metadata) => Ok(metadata.current_version),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        }
    }

    fn remember_version(&self, key: &str, version: u64) {
        self.versions.lock().expect("poisoned").insert(key.to_owned(), version);
    }

    async fn write(&self, key: &str, value: &SecretString, cas: Option<u64>) -> Result<u64> {
        let cas = cas
            .map(|v| {
                u32::try_from(v).map_err(|_| Error::config(format!("check-and-set version {v} is too large")))
            })
            .transpose()?;
        let path = self.secret_path(key);
        let what = format!("writing {}", self.data_path(key));
        let data = HashMap::from([(self.field.as_str(), value.expose_secret())]);
        let written = self
            .request(&what, |client| {
                let (path, data) = (path.as_str(), &data);
                async move {
                    match cas {
                        Some(cas) => {
                            let options = SetSecretRequestOptions { cas };
                            vaultrs::kv2::set_with_options(&*client, &self.mount, path, data, options).await
                        }
                        None => vaultrs::kv2::set(&*client, &self.mount, path, data).await,
                    }
                }
            })
            .await;
        // After a failed write the remembered version stays: once another writer got in,
        // writes keep failing until the key is read again.
        let version = written?.version;
        self.remember_version(key, version);
        Ok(version)
    }

    /// Runs `op` with a logged-in client; with AppRole, logs in again and retries once on 403.
    async fn request<T, F, Fut>(&self, what: &str, op: F) -> Result<T>
    where
        F: Fn(Arc<VaultClient>) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let (client, generation) = self.client().await?;
        let result = match op(client).await {
            Err(e) if self.approle.is_some() && status_of(&e).is_some_and(|(code, _)| code == 403) => {
                let (client, _) = self.login(generation).await?;
                op(client).await
            }
            other => other,
        };
        result.map_err(|e| self.error(e, what))
    }

    /// The current session's client, unless it must log in (again) first.
    fn current_client(&self) -> Option<(Arc<VaultClient>, u64)> {
        let session = self.session.read().expect("poisoned");
        let fresh = session.refresh_at.is_none_or(|at| Instant::now() < at);
        session.client.clone().filter(|_| fresh).map(|c| (c, session.generation))
    }

    async fn client(&self) -> Result<(Arc<VaultClient>, u64)> {
        if let Some(current) = self.current_client() {
            return Ok(current);
        }
        let generation = self.session.read().expect("poisoned").generation;
        self.login(generation).await
    }

    /// Logs in with AppRole, unless another task already replaced the session `stale`.
    async fn login(&self, stale: u64) -> Result<(Arc<VaultClient>, u64)> {
        let Some(approle) = &self.approle else {
            return Err(Error::internal("Vault token sessions do not log in"));
        };
        let _guard = self.login_lock.lock().await;
        if let Some((client, generation)) = self.current_client()
            && generation != stale
        {
            return Ok((client, generation));
        }
        let what = format!("AppRole login at {}/v1/auth/{}/login", self.address, approle.mount);
        let auth = vaultrs::auth::approle::login(
            &approle.client,
            &approle.mount,
            &approle.role_id,
            approle.secret_id.expose_secret(),
        )
        .await
        .map_err(|e| match status_of(&e) {
            Some((code @ 400..=403, messages)) => Error::auth(format!(
                "{what} failed ({}): check role_id and secret_id",
                describe_status(code, &messages)
            )),
            _ => self.error(e, &what),
        })?;

        let mut settings = approle.client.settings.clone();
        settings.token = auth.client_token;
        let client = VaultClient::new(settings).map_err(|e| {
            Error::config(format!("cannot create a Vault client for {}", self.address)).with_source(e)
        })?;
        let client = Arc::new(client);
        // Log in again a tenth of the lease (at most 30 s) before it ends.
        let refresh_at = (auth.lease_duration > 0).then(|| {
            let lease = Duration::from_secs(auth.lease_duration);
            Instant::now() + lease - (lease / 10).min(Duration::from_secs(30))
        });
        let mut session = self.session.write().expect("poisoned");
        session.generation += 1;
        session.client = Some(client.clone());
        session.refresh_at = refresh_at;
        tracing::debug!(address = %self.address, lease_seconds = auth.lease_duration, "logged in to Vault with AppRole");
        Ok((client, session.generation))
    }

    /// Maps a vaultrs error; `what` says what was being done (`reading secret/data/aragora/x`).
    fn error(&self, e: ClientError, what: &str) -> Error {
        let address = &self.address;
        let Some((code, messages)) = status_of(&e) else {
            return match e {
                ClientError::RestClientError {
                    source: rustify::errors::ClientError::RequestError { .. },
                } => Error::transient(format!("could not reach Vault at {address} while {what}"))
                    .with_source(e),
                _ => Error::source_error(format!("unexpected answer from Vault at {address} while {what}"))
                    .with_source(e),
            };
        };
        let status = describe_status(code, &messages);
        match code {
            404 => Error::not_found(format!("{what}: not found in Vault at {address}")),
            401 | 403 => Error::auth(format!(
                "Vault at {address} denied {what} ({status}): check the token or AppRole and its policy"
            )),
            400 if messages.contains("check-and-set parameter did not match") => Error::config(format!(
                "{what} in Vault at {address}: check-and-set failed, the secret changed since this \
                 provider read it (another writer updated it); read it again before writing"
            )),
            400 if messages.contains("check-and-set parameter required") => Error::config(format!(
                "{what} in Vault at {address}: the mount requires check-and-set writes; set `cas_required = true`"
            )),
            429 => Error::rate_limited(format!("Vault at {address} throttled {what} ({status})"), None),
            500.. => Error::transient(format!("Vault at {address} failed {what} ({status})")),
            _ => Error::source_error(format!("Vault at {address} rejected {what} ({status})")),
        }
    }
}

#[async_trait]
impl CredentialProvider for VaultCredentialProvider {
    async fn get_credential(&self, key: &str) -> Result<Option<SecretString>> {
        Ok(self.get_credential_with_version(key).await?.map(|(value, _)| value))
    }

    async fn set_credential(&self, key: &str, value: SecretString) -> Result<()> {
        validate_key(key)?;
        let cas = if self.cas_required {
            let seen = self.versions.lock().expect("poisoned").get(key).copied();
            Some(match seen {
                Some(version) => version,
                None => self.current_version(key).await?,
            })
        } else {
            None
        };
        self.write(key, &value, cas).await.map(drop)
    }

    fn describe(&self) -> String {
        let namespace = self.namespace.as_ref().map(|ns| format!(" (namespace {ns})")).unwrap_or_default();
        format!("Vault KV v2 {}/* at {}{namespace}", self.data_path("").trim_end_matches('/'), self.address)
    }

    fn location_of(&self, key: &str) -> String {
        format!("field `{}` of Vault secret {} at {}", self.field, self.data_path(key), self.address)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VaultConfig {
        VaultConfig {
            address: Some("http://127.0.0.1:8200/".into()),
            token: Some(SecretString::from("hvs.not-a-real-token")),
            ..VaultConfig::default()
        }
    }

    #[test]
    fn config_deserializes_with_defaults_and_rejects_unknown_fields() {
        let c: VaultConfig =
            serde_json::from_str(r#"{"address": "https://v:8200", "token": "t0k"}"#).unwrap();
        assert_eq!((c.mount.as_str(), c.prefix.as_str(), c.field.as_str()), ("secret", "aragora", "value"));
        assert_eq!((c.approle_mount.as_str(), c.timeout_seconds, c.cas_required), ("approle", 30, false));
        assert!(!format!("{c:?}").contains("t0k"));
        assert!(serde_json::from_str::<VaultConfig>(r#"{"tokne": "x"}"#).is_err());
    }

    #[tokio::test]
    async fn paths_and_descriptions() {
        let p = VaultCredentialProvider::new(config()).unwrap();
        assert_eq!(p.address(), "http://127.0.0.1:8200");
        assert_eq!(p.data_path("postgres_password"), "secret/data/aragora/postgres_password");
        assert_eq!(p.describe(), "Vault KV v2 secret/data/aragora/* at http://127.0.0.1:8200");
        assert_eq!(
            p.location_of("x"),
            "field `value` of Vault secret secret/data/aragora/x at http://127.0.0.1:8200"
        );
        let p = VaultCredentialProvider::new(VaultConfig { prefix: "/".into(), ..config() }).unwrap();
        assert_eq!(p.data_path("x"), "secret/data/x");
        assert!(p.get_credential("Bad-Key").await.is_err());
    }

    #[test]
    fn invalid_settings_are_config_errors() {
        let cases = [
            VaultConfig { address: Some("vault:8200".into()), ..config() },
            VaultConfig { address: Some("ftp://vault".into()), ..config() },
            VaultConfig { mount: "".into(), ..config() },
            VaultConfig { timeout_seconds: 0, ..config() },
            VaultConfig { role_id: Some("r".into()), ..config() },
            VaultConfig { role_id: Some("r".into()), secret_id: Some(SecretString::from("s")), ..config() },
        ];
        for c in cases {
            let err = VaultCredentialProvider::new(c).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Config, "{err}");
            assert!(!err.to_string().contains("hvs.not-a-real-token"));
        }
    }
}
