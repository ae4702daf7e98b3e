//! A HashiCorp Vault fake: the KV version 2 secrets engine and AppRole login, served over HTTP on
//! 127.0.0.1 with Vault's documented request and response shapes.
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use connector_core::reexports::serde_json::json;
//! use connector_testkit::VaultFake;
//!
//! let vault = VaultFake::start().await?;
//! vault.put("aragora/postgres_password", json!({"value": "pw"})); // secret/data/aragora/postgres_password
//! vault.approle("my-role", "my-secret-id");
//! // Point a client at vault.address() with vault.root_token() or the AppRole.
//! assert_eq!(vault.current_version("aragora/postgres_password"), 1);
//! # Ok(())
//! # }
//! ```
//!
//! What it serves (the KV v2 engine is mounted at `secret`; [`VaultFake::mount_kv`] adds others):
//! - `GET /v1/<mount>/data/<path>[?version=N]`, `POST`/`PUT` (a new version; `options.cas` is
//!   checked), `DELETE` (soft-deletes the latest version);
//! - `GET /v1/<mount>/metadata/<path>` (current version and the versions), `DELETE` (the secret
//!   and all its versions);
//! - `POST /v1/auth/approle/login` with the roles of [`VaultFake::approle`].
//!
//! Every other request needs a valid `X-Vault-Token` (the root token, or one issued by an
//! AppRole login and not expired or revoked), else 403 `{"errors":["permission denied"]}`. Tokens
//! have no policies: a valid token may do everything. Missing secrets are 404 `{"errors":[]}`.
//! [`VaultFake::requests`] records every request (method, path, namespace; never a token or a
//! body), and [`VaultFake::fail_next`] makes requests fail with 503, as a sealed Vault does.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use connector_core::reexports::chrono::{SecondsFormat, Utc};
use connector_core::reexports::serde_json::{self, Map, Value, json};

/// The mount of the KV v2 engine that [`VaultFake::put`] and friends use.
pub const DEFAULT_MOUNT: &str = "secret";
/// The mount of the AppRole auth method.
pub const APPROLE_MOUNT: &str = "approle";

/// One request the fake received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path, with its query if not empty (`/v1/secret/data/aragora/x?version=2`).
    pub path: String,
    /// The `X-Vault-Namespace` header, if sent.
    pub namespace: Option<String>,
}

/// A Vault server fake; it stops when dropped.
pub struct VaultFake {
    address: String,
    root_token: String,
    state: Arc<Mutex<FakeState>>,
    server: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for VaultFake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultFake").field("address", &self.address).finish_non_exhaustive()
    }
}

impl Drop for VaultFake {
    fn drop(&mut self) {
        self.server.abort();
    }
}

struct FakeState {
    mounts: Vec<String>,
    /// Valid tokens and when they expire (`None`: never).
    tokens: HashMap<String, Option<Instant>>,
    /// `(auth mount, role_id)` → secret_id.
    approles: HashMap<(String, String), String>,
    token_ttl: Duration,
    /// `(mount, path)` → the secret.
    secrets: BTreeMap<(String, String), Secret>,
    requests: Vec<RecordedRequest>,
    fail_next: usize,
}

struct Secret {
    created_time: String,
    updated_time: String,
    /// Version `n` is `versions[n - 1]`.
    versions: Vec<Version>,
}

struct Version {
    data: Map<String, Value>,
    created_time: String,
    deletion_time: String,
}

impl Version {
    fn metadata(&self, number: usize) -> Value {
        json!({
            "created_time": self.created_time,
            "custom_metadata": null,
            "deletion_time": self.deletion_time,
            "destroyed": false,
            "version": number,
        })
    }
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Nanos, true)
}

/// Random hex digits (not cryptographic: enough to make tokens unguessable by accident).
fn random_hex(len: usize) -> String {
    let mut out = String::with_capacity(len + 16);
    while out.len() < len {
        out.push_str(&format!("{:016x}", RandomState::new().hash_one(out.len())));
    }
    out.truncate(len);
    out
}

/// Vault's response envelope around `data`.
fn envelope(data: Value, auth: Value) -> Value {
    let id = random_hex(32);
    json!({
        "request_id": format!("{}-{}-{}-{}-{}", &id[..8], &id[8..12], &id[12..16], &id[16..20], &id[20..]),
        "lease_id": "",
        "renewable": false,
        "lease_duration": 0,
        "data": data,
        "wrap_info": null,
        "warnings": null,
        "auth": auth,
    })
}

fn ok(data: Value) -> Response {
    (StatusCode::OK, Json(envelope(data, Value::Null))).into_response()
}

fn errors(status: StatusCode, messages: &[&str]) -> Response {
    (status, Json(json!({ "errors": messages }))).into_response()
}

impl VaultFake {
    /// Starts a fake on a random port of 127.0.0.1, with a KV v2 engine at `secret`.
    pub async fn start() -> Result<Self> {
        let root_token = format!("hvs.{}", random_hex(24));
        let state = Arc::new(Mutex::new(FakeState {
            mounts: vec![DEFAULT_MOUNT.to_owned()],
            tokens: HashMap::from([(root_token.clone(), None)]),
            approles: HashMap::new(),
            token_ttl: Duration::from_secs(3600),
            secrets: BTreeMap::new(),
            requests: Vec::new(),
            fail_next: 0,
        }));
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("binding the Vault fake")?;
        let address = format!("http://{}", listener.local_addr()?);
        let app = Router::new().fallback(handle).with_state(state.clone());
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!("Vault fake stopped: {e}");
            }
        });
        Ok(Self { address, root_token, state, server })
    }

    /// `http://127.0.0.1:PORT`, for `VAULT_ADDR`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// A token that never expires.
    pub fn root_token(&self) -> &str {
        &self.root_token
    }

    fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().expect("poisoned")
    }

    /// Adds a KV v2 engine at `mount` (`kv`, `team/kv`).
    pub fn mount_kv(&self, mount: &str) {
        self.state().mounts.push(mount.trim_matches('/').to_owned());
    }

    /// Writes a new version of the secret at `path` in the `secret` mount (`aragora/x` is
    /// `secret/data/aragora/x`); `data` is a JSON object. Returns the new version.
    pub fn put(&self, path: &str, data: Value) -> u64 {
        self.put_in(DEFAULT_MOUNT, path, data)
    }

    /// Like [`Self::put`], in `mount`.
    pub fn put_in(&self, mount: &str, path: &str, data: Value) -> u64 {
        let Value::Object(data) = data else { panic!("Vault secret data must be a JSON object") };
        self.state().write(mount, path, data)
    }

    /// The data of the latest version of `path` in `secret`, unless missing or deleted.
    pub fn get(&self, path: &str) -> Option<Value> {
        let state = self.state();
        let version = state.secrets.get(&(DEFAULT_MOUNT.to_owned(), path.to_owned()))?.versions.last()?;
        version.deletion_time.is_empty().then(|| Value::Object(version.data.clone()))
    }

    /// The current version of `path` in `secret` (0 when it does not exist).
    pub fn current_version(&self, path: &str) -> u64 {
        let state = self.state();
        state.secrets.get(&(DEFAULT_MOUNT.to_owned(), path.to_owned())).map_or(0, |s| s.versions.len() as u64)
    }

    /// Soft-deletes the latest version of `path` in `secret`.
    pub fn delete(&self, path: &str) {
        self.state().delete_latest(DEFAULT_MOUNT, path);
    }

    /// Lets `role_id` with `secret_id` log in at `auth/approle/login`.
    pub fn approle(&self, role_id: &str, secret_id: &str) {
        self.state().approles.insert((APPROLE_MOUNT.to_owned(), role_id.to_owned()), secret_id.to_owned());
    }

    /// The lease of tokens issued by AppRole logins from now on (default 1 hour).
    pub fn set_token_ttl(&self, ttl: Duration) {
        self.state().token_ttl = ttl;
    }

    /// Revokes every token issued by an AppRole login (the root token stays valid).
    pub fn revoke_issued_tokens(&self) {
        let root = self.root_token.clone();
        self.state().tokens.retain(|token, _| *token == root);
    }

    /// The next `n` requests fail with 503 `{"errors":["Vault is sealed"]}`.
    pub fn fail_next(&self, n: usize) {
        self.state().fail_next = n;
    }

    /// The requests received so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state().requests.clone()
    }

    /// How many requests were received so far.
    pub fn request_count(&self) -> usize {
        self.state().requests.len()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        self.state().requests.clear();
    }
}

impl FakeState {
    fn secret(&self, mount: &str, path: &str) -> Option<&Secret> {
        self.secrets.get(&(mount.to_owned(), path.to_owned()))
    }

    fn current_version(&self, mount: &str, path: &str) -> u64 {
        self.secret(mount, path).map_or(0, |s| s.versions.len() as u64)
    }

    fn write(&mut self, mount: &str, path: &str, data: Map<String, Value>) -> u64 {
        let time = now();
        let secret = self.secrets.entry((mount.to_owned(), path.to_owned())).or_insert_with(|| Secret {
            created_time: time.clone(),
            updated_time: time.clone(),
            versions: Vec::new(),
        });
        secret.updated_time = time.clone();
        secret.versions.push(Version { data, created_time: time, deletion_time: String::new() });
        secret.versions.len() as u64
    }

    fn delete_latest(&mut self, mount: &str, path: &str) {
        if let Some(version) =
            self.secrets.get_mut(&(mount.to_owned(), path.to_owned())).and_then(|s| s.versions.last_mut())
            && version.deletion_time.is_empty()
        {
            version.deletion_time = now();
        }
    }

    fn token_is_valid(&self, headers: &HeaderMap) -> bool {
        let Some(token) = headers.get("x-vault-token").and_then(|v| v.to_str().ok()) else { return false };
        matches!(self.tokens.get(token), Some(expires) if expires.is_none_or(|at| Instant::now() < at))
    }

    fn login(&mut self, mount: &str, body: &[u8]) -> Response {
        let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let (Some(role_id), Some(secret_id)) = (body["role_id"].as_str(), body["secret_id"].as_str()) else {
            return errors(StatusCode::BAD_REQUEST, &["missing role_id or secret_id"]);
        };
        if self.approles.get(&(mount.to_owned(), role_id.to_owned())).map(String::as_str) != Some(secret_id) {
            return errors(StatusCode::BAD_REQUEST, &["invalid role or secret ID"]);
        }
        let token = format!("hvs.{}", random_hex(24));
        self.tokens.insert(token.clone(), Some(Instant::now() + self.token_ttl));
        let auth = json!({
            "client_token": token,
            "accessor": random_hex(24),
            "policies": ["default"],
            "token_policies": ["default"],
            "metadata": {},
            "lease_duration": self.token_ttl.as_secs(),
            "renewable": true,
            "entity_id": "",
            "token_type": "service",
            "orphan": true,
        });
        (StatusCode::OK, Json(envelope(Value::Null, auth))).into_response()
    }

    fn read(&self, mount: &str, path: &str, version: Option<u64>) -> Response {
        let Some(secret) = self.secret(mount, path) else { return errors(StatusCode::NOT_FOUND, &[]) };
        let number = match version {
            Some(n) if n > 0 => n as usize,
            _ => secret.versions.len(),
        };
        let Some(found) = secret.versions.get(number.wrapping_sub(1)) else {
            return errors(StatusCode::NOT_FOUND, &[]);
        };
        if found.deletion_time.is_empty() {
            ok(json!({ "data": found.data, "metadata": found.metadata(number) }))
        } else {
            // As Vault: 404 with the deleted version's metadata and no data.
            let body = envelope(json!({ "data": null, "metadata": found.metadata(number) }), Value::Null);
            (StatusCode::NOT_FOUND, Json(body)).into_response()
        }
    }

    fn create_version(&mut self, mount: &str, path: &str, body: &[u8]) -> Response {
        let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let Some(data) = body["data"].as_object() else {
            return errors(StatusCode::BAD_REQUEST, &["no data provided"]);
        };
        if let Some(cas) = body["options"]["cas"].as_u64()
            && cas != self.current_version(mount, path)
        {
            return errors(
                StatusCode::BAD_REQUEST,
                &["check-and-set parameter did not match the current version"],
            );
        }
        let number = self.write(mount, path, data.clone()) as usize;
        let secret = self.secret(mount, path).expect("just written");
        ok(secret.versions[number - 1].metadata(number))
    }

    fn metadata(&self, mount: &str, path: &str) -> Response {
        let Some(secret) = self.secret(mount, path) else { return errors(StatusCode::NOT_FOUND, &[]) };
        let versions: Map<String, Value> = secret
            .versions
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let meta = json!({
                    "created_time": v.created_time,
                    "deletion_time": v.deletion_time,
                    "destroyed": false,
                });
                ((i + 1).to_string(), meta)
            })
            .collect();
        ok(json!({
            "cas_required": false,
            "created_time": secret.created_time,
            "current_version": secret.versions.len(),
            "custom_metadata": null,
            "delete_version_after": "0s",
            "max_versions": 0,
            "oldest_version": 0,
            "updated_time": secret.updated_time,
            "versions": versions,
        }))
    }

    fn kv(&mut self, method: &Method, rest: &str, query: Option<&str>, body: &[u8]) -> Response {
        let Some(mount) = self.mounts.iter().find(|m| rest.starts_with(&format!("{m}/"))).cloned() else {
            let message = format!("no handler for route \"{rest}\". route entry not found.");
            return errors(StatusCode::NOT_FOUND, &[message.as_str()]);
        };
        let rest = &rest[mount.len() + 1..];
        let (kind, path) = rest.split_once('/').unwrap_or((rest, ""));
        if path.is_empty() {
            return errors(StatusCode::NOT_FOUND, &[]);
        }
        let version = query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .find_map(|pair| pair.strip_prefix("version="))
            .and_then(|v| v.parse().ok());
        match (kind, method.as_str()) {
            ("data", "GET") => self.read(&mount, path, version),
            ("data", "POST" | "PUT") => self.create_version(&mount, path, body),
            ("data", "DELETE") => {
                self.delete_latest(&mount, path);
                StatusCode::NO_CONTENT.into_response()
            }
            ("metadata", "GET") => self.metadata(&mount, path),
            ("metadata", "DELETE") => {
                self.secrets.remove(&(mount.clone(), path.to_owned()));
                StatusCode::NO_CONTENT.into_response()
            }
            ("data" | "metadata", _) => errors(StatusCode::METHOD_NOT_ALLOWED, &["unsupported operation"]),
            _ => errors(StatusCode::NOT_FOUND, &[]),
        }
    }
}

async fn handle(
    State(state): State<Arc<Mutex<FakeState>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut state = state.lock().expect("poisoned");
    state.requests.push(RecordedRequest {
        method: method.to_string(),
        path: match uri.query() {
            Some(query) if !query.is_empty() => format!("{}?{query}", uri.path()),
            _ => uri.path().to_owned(),
        },
        namespace: headers.get("x-vault-namespace").and_then(|v| v.to_str().ok()).map(str::to_owned),
    });
    if state.fail_next > 0 {
        state.fail_next -= 1;
        return errors(StatusCode::SERVICE_UNAVAILABLE, &["Vault is sealed"]);
    }
    let Some(rest) = uri.path().strip_prefix("/v1/") else { return errors(StatusCode::NOT_FOUND, &[]) };
    if let Some(mount) = rest.strip_prefix("auth/").and_then(|r| r.strip_suffix("/login"))
        && method == Method::POST
    {
        return state.login(mount, &body);
    }
    if !state.token_is_valid(&headers) {
        return errors(StatusCode::FORBIDDEN, &["permission denied"]);
    }
    state.kv(&method, rest, uri.query(), &body)
}
