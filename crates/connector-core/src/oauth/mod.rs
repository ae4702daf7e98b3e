//! OAuth2 for the SaaS connectors (feature `oauth`): vendor endpoints, the authorization-code
//! flow with PKCE, and a [`TokenManager`] that keeps an access token valid.
//!
//! - [`OAuthProvider`] describes a vendor as data: [`GOOGLE_DRIVE`](OAuthProvider::GOOGLE_DRIVE),
//!   [`QUICKBOOKS`](OAuthProvider::QUICKBOOKS), [`GUSTO`](OAuthProvider::GUSTO) and
//!   [`XERO`](OAuthProvider::XERO), with their endpoints (overridable, for tests and sandboxes),
//!   default scopes, whether refresh tokens rotate, and the credential keys its tokens are
//!   stored under ([`TokenKeys`]).
//! - [`get_oauth_url`] builds the URL the user opens (random `state`, PKCE S256 where the vendor
//!   supports it); [`exchange_code`] trades the code from the redirect for a [`TokenSet`];
//!   [`store_tokens`] saves it through a [`CredentialProvider`].
//! - [`TokenManager`] hands out access tokens, refreshing them shortly before they expire, one
//!   refresh at a time, and persists every new token (the rotated refresh token first) before
//!   anyone uses it.
//!
//! Token requests go through `oauth2` 5 with its [`AsyncHttpClient`] implemented over this
//! crate's `reqwest` 0.13 (so the workspace has one `reqwest`), without following redirects
//! (the `oauth2` SSRF advice). Secrets are [`SecretString`]s end to end: no `Debug` output,
//! log event or error message contains a token, a client secret, an authorization code or a
//! PKCE verifier.
//!
//! ```no_run
//! # async fn demo() -> connector_core::Result<()> {
//! use std::sync::Arc;
//! use connector_core::EnvCredentialProvider;
//! use connector_core::oauth::{OAuthProvider, TokenManager};
//!
//! // Reads ARAGORA_QBO_CLIENT_ID, ARAGORA_QBO_CLIENT_SECRET, ARAGORA_QBO_REFRESH_TOKEN, ...
//! let credentials = Arc::new(EnvCredentialProvider::new());
//! let tokens = TokenManager::builder(OAuthProvider::QUICKBOOKS, credentials).build().await?;
//! let access_token = tokens.access_token().await?;
//! // ... call the API; on a 401: tokens.invalidate(&access_token).await ...
//! # Ok(()) }
//! ```

#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use oauth2::basic::{BasicClient, BasicErrorResponse, BasicErrorResponseType, BasicTokenResponse};
use oauth2::{
    AsyncHttpClient, AuthType, AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointNotSet,
    EndpointSet, HttpRequest, HttpResponse, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RefreshToken,
    RequestTokenError, Scope, TokenResponse, TokenUrl,
};
use reqwest::header::HeaderMap;
use secrecy::{ExposeSecret, SecretString};

use crate::credentials::{CredentialProvider, require_credential};
use crate::error::{Error, ErrorKind, Result};
use crate::http::{HttpConfig, Method, StatusCode, Url, body_excerpt, error_for_status};

/// How the client authenticates itself at a vendor's token endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// HTTP Basic auth with the client id and secret (RFC 6749 section 2.3.1): Intuit, Xero.
    Basic,
    /// `client_id` and `client_secret` in the form body: Google, Gusto.
    RequestBody,
}

/// A vendor's OAuth2 authorization server, as data.
///
/// The constants hold the production endpoints. Every field is public, and
/// [`with_endpoints`](Self::with_endpoints) / [`with_key_prefix`](Self::with_key_prefix)
/// derive variants: a local fake in tests, a second account of the same vendor.
///
/// | provider | `id` | key prefix | rotates refresh tokens | PKCE |
/// |---|---|---|---|---|
/// | [`GOOGLE_DRIVE`](Self::GOOGLE_DRIVE) | `gdrive` | `gdrive_` | no | yes |
/// | [`QUICKBOOKS`](Self::QUICKBOOKS) | `quickbooks` | `qbo_` | yes | no |
/// | [`GUSTO`](Self::GUSTO), [`GUSTO_DEMO`](Self::GUSTO_DEMO) | `gusto` | `gusto_` | yes | no |
/// | [`XERO`](Self::XERO) | `xero` | `xero_` | yes | yes |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OAuthProvider {
    /// The name used by the CLI: `connectors auth <id>`.
    pub id: &'static str,
    /// The vendor's name for messages (`QuickBooks`).
    pub name: &'static str,
    /// The prefix of the credential keys ([`TokenKeys`]): `qbo` gives `qbo_refresh_token`,
    /// read by the default provider from `ARAGORA_QBO_REFRESH_TOKEN`.
    pub key_prefix: Cow<'static, str>,
    /// The authorization endpoint the user's browser opens.
    pub auth_url: Cow<'static, str>,
    /// The token endpoint (code exchange and refresh).
    pub token_url: Cow<'static, str>,
    /// Scopes asked for when [`get_oauth_url`] is given none.
    pub default_scopes: &'static [&'static str],
    /// Whether every refresh returns a new refresh token that replaces the old one (Intuit,
    /// Gusto, Xero). The [`TokenManager`] persists a returned refresh token in every case;
    /// this flag documents the vendor and sharpens messages.
    pub rotates_refresh_token: bool,
    /// Whether the authorization server accepts PKCE (`code_challenge`, S256).
    pub supports_pkce: bool,
    /// How the client authenticates at the token endpoint.
    pub client_auth: ClientAuth,
    /// Extra query parameters of the authorization URL (Google's `access_type=offline`).
    pub extra_auth_params: &'static [(&'static str, &'static str)],
}

impl OAuthProvider {
    /// Google (Drive): read-only Drive scope; `access_type=offline` and `prompt=consent` so that
    /// Google returns a refresh token on every consent. Refresh tokens do not rotate.
    pub const GOOGLE_DRIVE: Self = Self {
        id: "gdrive",
        name: "Google Drive",
        key_prefix: Cow::Borrowed("gdrive"),
        auth_url: Cow::Borrowed("https://accounts.google.com/o/oauth2/v2/auth"),
        token_url: Cow::Borrowed("https://oauth2.googleapis.com/token"),
        default_scopes: &["https://www.googleapis.com/auth/drive.readonly"],
        rotates_refresh_token: false,
        supports_pkce: true,
        client_auth: ClientAuth::RequestBody,
        extra_auth_params: &[("access_type", "offline"), ("prompt", "consent")],
    };

    /// Intuit (QuickBooks Online; the same endpoints serve sandbox and production companies).
    /// Each refresh may return a new refresh token, and only the latest one is sure to work.
    pub const QUICKBOOKS: Self = Self {
        id: "quickbooks",
        name: "QuickBooks",
        key_prefix: Cow::Borrowed("qbo"),
        auth_url: Cow::Borrowed("https://appcenter.intuit.com/connect/oauth2"),
        token_url: Cow::Borrowed("https://oauth.platform.intuit.com/oauth2/v1/tokens/bearer"),
        default_scopes: &["com.intuit.quickbooks.accounting"],
        rotates_refresh_token: true,
        supports_pkce: false,
        client_auth: ClientAuth::Basic,
        extra_auth_params: &[],
    };

    /// Gusto (production). Scopes are set on the application, not in the request. A refresh
    /// returns a new refresh token; the old one is revoked once the new access token is used.
    pub const GUSTO: Self = Self {
        id: "gusto",
        name: "Gusto",
        key_prefix: Cow::Borrowed("gusto"),
        auth_url: Cow::Borrowed("https://api.gusto.com/oauth/authorize"),
        token_url: Cow::Borrowed("https://api.gusto.com/oauth/token"),
        default_scopes: &[],
        rotates_refresh_token: true,
        supports_pkce: false,
        client_auth: ClientAuth::RequestBody,
        extra_auth_params: &[],
    };

    /// Gusto's demo environment (`api.gusto-demo.com`), where development happens.
    pub const GUSTO_DEMO: Self = Self {
        auth_url: Cow::Borrowed("https://api.gusto-demo.com/oauth/authorize"),
        token_url: Cow::Borrowed("https://api.gusto-demo.com/oauth/token"),
        ..Self::GUSTO
    };

    /// Xero. `offline_access` is needed for a refresh token; refresh tokens rotate (the old one
    /// stays valid for a short grace period).
    pub const XERO: Self = Self {
        id: "xero",
        name: "Xero",
        key_prefix: Cow::Borrowed("xero"),
        auth_url: Cow::Borrowed("https://login.xero.com/identity/connect/authorize"),
        token_url: Cow::Borrowed("https://identity.xero.com/connect/token"),
        default_scopes: &["offline_access", "accounting.transactions", "accounting.contacts"],
        rotates_refresh_token: true,
        supports_pkce: true,
        client_auth: ClientAuth::Basic,
        extra_auth_params: &[],
    };

    /// The built-in providers, production endpoints.
    pub const ALL: [Self; 4] = [Self::GOOGLE_DRIVE, Self::QUICKBOOKS, Self::GUSTO, Self::XERO];

    /// The built-in provider with this [`id`](Self::id) (`quickbooks`), if any.
    pub fn by_id(id: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.id == id)
    }

    /// The same provider with other endpoints (a sandbox, or a local fake in tests).
    pub fn with_endpoints(mut self, auth_url: impl Into<String>, token_url: impl Into<String>) -> Self {
        self.auth_url = Cow::Owned(auth_url.into());
        self.token_url = Cow::Owned(token_url.into());
        self
    }

    /// The same provider with its tokens under other keys (`qbo_acme` for a second company:
    /// `qbo_acme_refresh_token`).
    pub fn with_key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = Cow::Owned(prefix.into());
        self
    }

    /// The credential keys of this provider's client and tokens.
    pub fn keys(&self) -> TokenKeys {
        TokenKeys::with_prefix(&self.key_prefix)
    }
}

/// The credential keys under which a provider's client credentials and tokens are stored
/// (see [`CredentialProvider`]); with the default provider, `qbo_refresh_token` is the
/// environment variable `ARAGORA_QBO_REFRESH_TOKEN`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenKeys {
    /// `<prefix>_client_id`.
    pub client_id: String,
    /// `<prefix>_client_secret`.
    pub client_secret: String,
    /// `<prefix>_refresh_token`.
    pub refresh_token: String,
    /// `<prefix>_access_token`.
    pub access_token: String,
    /// `<prefix>_token_expires_at`: when the stored access token expires, RFC 3339
    /// (`2026-01-31T12:00:00Z`) or Unix seconds; `unknown` or absent when the vendor did not say.
    pub token_expires_at: String,
}

impl TokenKeys {
    /// The keys for `prefix` (`qbo`).
    pub fn with_prefix(prefix: &str) -> Self {
        Self {
            client_id: format!("{prefix}_client_id"),
            client_secret: format!("{prefix}_client_secret"),
            refresh_token: format!("{prefix}_refresh_token"),
            access_token: format!("{prefix}_access_token"),
            token_expires_at: format!("{prefix}_token_expires_at"),
        }
    }
}

/// What the user opens to authorize, and what to keep until the redirect comes back.
#[derive(Debug)]
pub struct AuthorizationRequest {
    /// The vendor's authorization URL with `client_id`, `redirect_uri`, `scope`, `state` and,
    /// where supported, `code_challenge` / `code_challenge_method=S256`.
    pub url: Url,
    /// The random `state` sent; the redirect must bring back the same value
    /// ([`check_state`](Self::check_state)).
    pub state: String,
    /// The PKCE code verifier to pass to [`exchange_code`]; `None` when the vendor does not
    /// support PKCE.
    pub pkce_verifier: Option<SecretString>,
}

impl AuthorizationRequest {
    /// Checks the `state` the redirect brought back; an `Auth` error when it differs (a forged
    /// or stale redirect).
    pub fn check_state(&self, returned: &str) -> Result<()> {
        let same = self.state.len() == returned.len()
            && self.state.bytes().zip(returned.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        if same {
            Ok(())
        } else {
            Err(Error::auth(
                "the OAuth2 redirect's `state` does not match the authorization request: start the \
                 authorization again",
            ))
        }
    }
}

/// Tokens from a token endpoint.
#[derive(Clone, Debug)]
pub struct TokenSet {
    /// The access token.
    pub access_token: SecretString,
    /// The refresh token; `None` when the response had none (a non-rotating vendor's refresh
    /// keeps the old one).
    pub refresh_token: Option<SecretString>,
    /// When the access token expires (from `expires_in`, counted from when the request was
    /// sent); `None` when the vendor did not say.
    pub expires_at: Option<DateTime<Utc>>,
    /// The granted scopes, when the response lists them.
    pub scopes: Option<Vec<String>>,
}

impl TokenSet {
    fn from_response(response: &BasicTokenResponse, sent_at: DateTime<Utc>) -> Self {
        let expires_at = response
            .expires_in()
            .and_then(|d| TimeDelta::from_std(d).ok())
            .and_then(|d| sent_at.checked_add_signed(d));
        Self {
            access_token: SecretString::from(response.access_token().secret().as_str()),
            refresh_token: response.refresh_token().map(|t| SecretString::from(t.secret().as_str())),
            expires_at,
            scopes: response.scopes().map(|s| s.iter().map(|s| s.to_string()).collect()),
        }
    }
}

/// Builds the authorization URL for `provider`.
///
/// `scopes` empty means the provider's [`default_scopes`](OAuthProvider::default_scopes). The
/// `state` is random (16 bytes); when the provider [supports PKCE](OAuthProvider::supports_pkce),
/// a random S256 challenge is added and its verifier returned, to be passed to
/// [`exchange_code`]. A `Config` error when a URL is invalid.
pub fn get_oauth_url(
    provider: &OAuthProvider,
    client_id: &str,
    redirect_uri: &str,
    scopes: &[&str],
) -> Result<AuthorizationRequest> {
    let auth_url = AuthUrl::new(provider.auth_url.to_string()).map_err(|e| {
        Error::config(format!("invalid {} authorization URL {:?}", provider.name, provider.auth_url))
            .with_source(e)
    })?;
    let client = BasicClient::new(ClientId::new(client_id.to_owned()))
        .set_auth_uri(auth_url)
        .set_redirect_uri(redirect_url(redirect_uri)?);
    let scopes = if scopes.is_empty() { provider.default_scopes } else { scopes };
    let mut request = client
        .authorize_url(CsrfToken::new_random)
        .add_scopes(scopes.iter().map(|s| Scope::new((*s).to_owned())));
    for (name, value) in provider.extra_auth_params {
        request = request.add_extra_param(*name, *value);
    }
    let mut pkce_verifier = None;
    if provider.supports_pkce {
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        request = request.set_pkce_challenge(challenge);
        pkce_verifier = Some(SecretString::from(verifier.into_secret()));
    }
    let (url, state) = request.url();
    Ok(AuthorizationRequest { url, state: state.into_secret(), pkce_verifier })
}

/// Exchanges the authorization `code` from the redirect for tokens.
///
/// `redirect_uri` must be the one given to [`get_oauth_url`]; `pkce_verifier` is the
/// [`AuthorizationRequest::pkce_verifier`]. Uses [`HttpConfig::default`] timeouts. Errors:
/// `Auth` for a rejected code (`invalid_grant`: codes are single-use and short-lived) or client
/// (`invalid_client`), `Transient` for a 5xx, a timeout or a network failure. Store the result
/// with [`store_tokens`].
pub async fn exchange_code(
    provider: &OAuthProvider,
    client_id: &str,
    client_secret: &SecretString,
    redirect_uri: &str,
    code: &SecretString,
    pkce_verifier: Option<&SecretString>,
) -> Result<TokenSet> {
    let http = OAuthHttp::new(&HttpConfig::default())?;
    let client =
        token_client(provider, client_id, client_secret)?.set_redirect_uri(redirect_url(redirect_uri)?);
    let code_value = AuthorizationCode::new(code.expose_secret().to_owned());
    let mut request = client.exchange_code(code_value);
    if let Some(verifier) = pkce_verifier {
        request = request.set_pkce_verifier(PkceCodeVerifier::new(verifier.expose_secret().to_owned()));
    }
    let sent_at = Utc::now();
    let response = request.request_async(&http).await.map_err(|e| {
        let mut secrets = vec![client_secret.expose_secret(), code.expose_secret()];
        secrets.extend(pkce_verifier.map(|v| v.expose_secret()));
        let ctx = ErrorContext { provider, grant: Grant::Code, keys: provider.keys(), secrets: &secrets };
        ctx.error(e)
    })?;
    let tokens = TokenSet::from_response(&response, sent_at);
    tracing::info!(
        provider = provider.id,
        refresh_token = tokens.refresh_token.is_some(),
        "oauth2 code exchanged"
    );
    Ok(tokens)
}

/// Saves `tokens` under the provider's [`TokenKeys`]: the refresh token first (when the set
/// has one), then the access token, then its expiry.
///
/// The order keeps a crash between two writes safe: a new refresh token is never lost, and an
/// access token is never stored with an expiry later than its own (at worst a stale expiry
/// causes one extra refresh).
pub async fn store_tokens(
    provider: &OAuthProvider,
    credentials: &dyn CredentialProvider,
    tokens: &TokenSet,
) -> Result<()> {
    let keys = provider.keys();
    if let Some(refresh) = &tokens.refresh_token {
        credentials.set_credential(&keys.refresh_token, refresh.clone()).await?;
    }
    credentials.set_credential(&keys.access_token, tokens.access_token.clone()).await?;
    let expiry = match tokens.expires_at {
        Some(at) => at.to_rfc3339_opts(SecondsFormat::Secs, true),
        None => "unknown".to_owned(),
    };
    credentials.set_credential(&keys.token_expires_at, SecretString::from(expiry)).await
}

/// The default refresh margin of a [`TokenManager`]: a token expiring within 60 s is refreshed.
pub const DEFAULT_REFRESH_MARGIN: Duration = Duration::from_secs(60);

/// Keeps one credential's access token valid: refreshes it before it expires, persists what the
/// vendor returns, and shares one refresh between concurrent callers.
///
/// Cloning is cheap; clones share the token and the lock.
///
/// # Behavior
/// - **[`access_token`](Self::access_token)** returns the current access token while it is
///   valid for more than the refresh margin ([`DEFAULT_REFRESH_MARGIN`]; half the token's
///   lifetime when that is shorter). A token whose expiry is unknown is used until
///   [`invalidate`](Self::invalidate) is called.
/// - **One refresh at a time**: the refresh runs under a lock; callers that arrive meanwhile
///   wait for it and then re-check, so N concurrent callers cause one request to the token
///   endpoint. The refresh runs in its own task: a caller that gives up (a cancelled sync) does
///   not interrupt it between the vendor's answer and the persisting of the new tokens.
/// - **Persisted before use**: the new refresh token (when the vendor returns one), the access
///   token and its expiry are written through [`CredentialProvider::set_credential`] before the
///   access token is returned to anyone. If a write fails, the call fails and the new tokens are
///   *not* used: with a vendor that rotates refresh tokens, the old refresh token stops working
///   once the new one exists (Gusto revokes it at the first use of the new access token, Xero
///   after a grace period, Intuit honours only the latest), so using tokens that exist only in
///   memory would leave nothing usable in the store after a restart and force the user to
///   authorize again. The unsaved tokens are kept in memory and saving them is retried first on
///   the next call.
/// - **Restart**: tokens are read from the provider when the manager has none (at start, after
///   a crash between refresh and use, or when another process refreshed): a stored access token
///   that is still valid is used without a refresh; otherwise the stored refresh token is used.
/// - **[`invalidate`](Self::invalidate)** after a 401 from the API forces a refresh on the next
///   call (unless the token was already replaced).
/// - **Errors** name the credential (its key and where the provider keeps it), never a value:
///   a refresh token rejected with `invalid_grant` is an `Auth` error telling to run
///   `connectors auth <id>`; a 5xx, a timeout or a network failure is `Transient` (retried by
///   the sync engine); a 429 is `RateLimited`.
#[derive(Clone)]
pub struct TokenManager {
    inner: Arc<Inner>,
}

struct Inner {
    provider: OAuthProvider,
    keys: TokenKeys,
    client_id: String,
    client_secret: SecretString,
    credentials: Arc<dyn CredentialProvider>,
    http: OAuthHttp,
    margin: Duration,
    state: tokio::sync::Mutex<State>,
}

/// What the manager holds between calls.
#[derive(Default)]
struct State {
    current: Option<Current>,
    /// Tokens from a refresh whose persisting failed: saved again before anything else.
    pending: Option<(TokenSet, Current)>,
    /// The access token an API rejected (401): not taken back from the store.
    rejected: Option<SecretString>,
}

struct Current {
    access_token: SecretString,
    /// Refresh once this instant has passed; `None`: expiry unknown, use until invalidated.
    refresh_after: Option<DateTime<Utc>>,
}

impl Current {
    fn usable(&self, now: DateTime<Utc>) -> bool {
        self.refresh_after.is_none_or(|at| now < at)
    }
}

impl State {
    fn usable(&self, now: DateTime<Utc>) -> Option<SecretString> {
        if self.pending.is_some() {
            return None;
        }
        self.current.as_ref().filter(|c| c.usable(now)).map(|c| c.access_token.clone())
    }

    fn is_rejected(&self, token: &SecretString) -> bool {
        self.rejected.as_ref().is_some_and(|r| same_secret(r, token))
    }
}

/// Builds a [`TokenManager`]: [`TokenManager::builder`].
pub struct TokenManagerBuilder {
    provider: OAuthProvider,
    credentials: Arc<dyn CredentialProvider>,
    client: Option<(String, SecretString)>,
    margin: Duration,
    http: HttpConfig,
}

impl fmt::Debug for TokenManagerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenManagerBuilder")
            .field("provider", &self.provider.id)
            .field("credentials", &self.credentials.describe())
            .field("client_id", &self.client.as_ref().map(|(id, _)| id))
            .field("margin", &self.margin)
            .finish_non_exhaustive()
    }
}

impl TokenManagerBuilder {
    /// Uses this client id and secret instead of reading `<prefix>_client_id` and
    /// `<prefix>_client_secret` from the credential provider.
    pub fn client(mut self, client_id: impl Into<String>, client_secret: SecretString) -> Self {
        self.client = Some((client_id.into(), client_secret));
        self
    }

    /// Refreshes tokens that expire within `margin` (default [`DEFAULT_REFRESH_MARGIN`]).
    pub fn refresh_margin(mut self, margin: Duration) -> Self {
        self.margin = margin;
        self
    }

    /// Timeouts and user agent of the token requests (default [`HttpConfig::default`]: 30 s per
    /// request, 10 s to connect). Retries are not made here: a failed refresh is an error the
    /// caller (the sync engine) retries.
    pub fn http_config(mut self, config: HttpConfig) -> Self {
        self.http = config;
        self
    }

    /// The manager. Reads the client id and secret from the credential provider unless
    /// [`client`](Self::client) gave them (an `Auth` error naming the missing key); tokens are
    /// read on the first [`TokenManager::access_token`].
    pub async fn build(self) -> Result<TokenManager> {
        let keys = self.provider.keys();
        let (client_id, client_secret) = match self.client {
            Some(client) => client,
            None => {
                let id = require_credential(&*self.credentials, &keys.client_id).await?;
                let secret = require_credential(&*self.credentials, &keys.client_secret).await?;
                (id.expose_secret().to_owned(), secret)
            }
        };
        // Fail early on an unusable endpoint.
        token_client(&self.provider, &client_id, &client_secret)?;
        Ok(TokenManager {
            inner: Arc::new(Inner {
                http: OAuthHttp::new(&self.http)?,
                provider: self.provider,
                keys,
                client_id,
                client_secret,
                credentials: self.credentials,
                margin: self.margin,
                state: tokio::sync::Mutex::default(),
            }),
        })
    }
}

impl fmt::Debug for TokenManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &self.inner;
        f.debug_struct("TokenManager")
            .field("provider", &inner.provider.id)
            .field("client_id", &inner.client_id)
            .field("credentials", &inner.credentials.describe())
            .field("margin", &inner.margin)
            .finish_non_exhaustive()
    }
}

impl TokenManager {
    /// A builder for `provider`, reading and writing tokens through `credentials`.
    pub fn builder(provider: OAuthProvider, credentials: Arc<dyn CredentialProvider>) -> TokenManagerBuilder {
        TokenManagerBuilder {
            provider,
            credentials,
            client: None,
            margin: DEFAULT_REFRESH_MARGIN,
            http: HttpConfig::default(),
        }
    }

    /// A manager with the given client credentials and default settings.
    pub async fn new(
        provider: OAuthProvider,
        client_id: impl Into<String>,
        client_secret: SecretString,
        credentials: Arc<dyn CredentialProvider>,
    ) -> Result<Self> {
        Self::builder(provider, credentials).client(client_id, client_secret).build().await
    }

    /// The provider this manager refreshes tokens with.
    pub fn provider(&self) -> &OAuthProvider {
        &self.inner.provider
    }

    /// The credential keys the tokens are stored under.
    pub fn keys(&self) -> &TokenKeys {
        &self.inner.keys
    }

    /// A valid access token: the current one, the stored one, or a new one from a refresh (see
    /// [`TokenManager`] for when, how, and the errors).
    pub async fn access_token(&self) -> Result<SecretString> {
        if let Some(token) = self.inner.state.lock().await.usable(Utc::now()) {
            return Ok(token);
        }
        let inner = Arc::clone(&self.inner);
        match tokio::spawn(async move { inner.obtain().await }).await {
            Ok(result) => result,
            Err(e) => {
                Err(Error::internal(format!("the {} token refresh task failed", self.inner.provider.name))
                    .with_source(e))
            }
        }
    }

    /// Reports that the API rejected `token` (HTTP 401): the next
    /// [`access_token`](Self::access_token) refreshes. Does nothing when `token` is no longer
    /// the current one (another caller already caused a refresh).
    pub async fn invalidate(&self, token: &SecretString) {
        let mut state = self.inner.state.lock().await;
        if state.current.as_ref().is_some_and(|c| same_secret(&c.access_token, token)) {
            tracing::info!(
                provider = self.inner.provider.id,
                "oauth2 access token rejected by the API; refreshing"
            );
            state.current = None;
            state.rejected = Some(token.clone());
        }
    }
}

/// What the store holds.
struct Stored {
    access_token: Option<SecretString>,
    expires_at: Option<DateTime<Utc>>,
    /// The expiry could not be read: treat the stored access token as expired.
    expiry_unreadable: bool,
    refresh_token: Option<SecretString>,
}

impl Inner {
    /// The slow path of `access_token`, under the lock.
    async fn obtain(&self) -> Result<SecretString> {
        let mut state = self.state.lock().await;
        if let Some((tokens, current)) = state.pending.take() {
            if let Err(e) = self.persist(&tokens).await {
                state.pending = Some((tokens, current));
                return Err(e);
            }
            state.rejected = None;
            state.current = Some(current);
        }
        // Re-check: the refresh we waited for may have happened.
        if let Some(token) = state.usable(Utc::now()) {
            return Ok(token);
        }
        let mut retried = false;
        loop {
            let stored = self.load().await?;
            if let Some(token) = &stored.access_token
                && !stored.expiry_unreadable
                && !state.is_rejected(token)
            {
                let current = Current {
                    access_token: token.clone(),
                    refresh_after: stored.expires_at.map(|at| at - margin_delta(self.margin)),
                };
                if current.usable(Utc::now()) {
                    tracing::debug!(provider = self.provider.id, "using the stored oauth2 access token");
                    state.current = Some(current);
                    return Ok(token.clone());
                }
            }
            let Some(refresh_token) = stored.refresh_token else {
                return Err(Error::auth(format!(
                    "no {} refresh token: set {} or run `connectors auth {}`",
                    self.provider.name,
                    self.location(&self.keys.refresh_token),
                    self.provider.id
                )));
            };
            let (tokens, current) = match self.refresh(&refresh_token).await {
                Ok(refreshed) => refreshed,
                // The store may have been updated meanwhile (`connectors auth`, another
                // process): try once more with what it holds now.
                Err(e)
                    if e.kind() == ErrorKind::Auth
                        && !retried
                        && self.refresh_token_changed(&refresh_token).await =>
                {
                    retried = true;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if let Err(e) = self.persist(&tokens).await {
                state.pending = Some((tokens, current));
                return Err(e);
            }
            state.rejected = None;
            let token = current.access_token.clone();
            state.current = Some(current);
            return Ok(token);
        }
    }

    async fn refresh_token_changed(&self, used: &SecretString) -> bool {
        match self.credentials.get_credential(&self.keys.refresh_token).await {
            Ok(Some(now)) => !same_secret(&now, used),
            _ => false,
        }
    }

    /// One refresh request: the new tokens and when to refresh them.
    async fn refresh(&self, refresh_token: &SecretString) -> Result<(TokenSet, Current)> {
        let client = token_client(&self.provider, &self.client_id, &self.client_secret)?;
        let token = RefreshToken::new(refresh_token.expose_secret().to_owned());
        let sent_at = Utc::now();
        let response =
            client.exchange_refresh_token(&token).request_async(&self.http).await.map_err(|e| {
                let secrets = [refresh_token.expose_secret(), self.client_secret.expose_secret()];
                let grant = Grant::Refresh { location: self.location(&self.keys.refresh_token) };
                ErrorContext { provider: &self.provider, grant, keys: self.keys.clone(), secrets: &secrets }
                    .error(e)
            })?;
        let tokens = TokenSet::from_response(&response, sent_at);
        let lifetime = tokens.expires_at.map(|at| at - sent_at);
        let margin = match lifetime {
            Some(lifetime) => margin_delta(self.margin).min(lifetime / 2),
            None => TimeDelta::zero(),
        };
        let current = Current {
            access_token: tokens.access_token.clone(),
            refresh_after: tokens.expires_at.map(|at| at - margin),
        };
        tracing::info!(
            provider = self.provider.id,
            expires_at = ?tokens.expires_at,
            rotated = tokens.refresh_token.as_ref().is_some_and(|new| !same_secret(new, refresh_token)),
            "oauth2 access token refreshed"
        );
        Ok((tokens, current))
    }

    async fn load(&self) -> Result<Stored> {
        let read = |key: &str| {
            let key = key.to_owned();
            async move {
                let value = self.credentials.get_credential(&key).await.map_err(|e| {
                    e.context(format!("reading the {} token {}", self.provider.name, self.location(&key)))
                })?;
                Ok::<_, Error>(value.filter(|v| !v.expose_secret().is_empty()))
            }
        };
        let access_token = read(&self.keys.access_token).await?;
        let refresh_token = read(&self.keys.refresh_token).await?;
        let (expires_at, expiry_unreadable) = match read(&self.keys.token_expires_at).await? {
            None => (None, false),
            Some(text) => match parse_expiry(text.expose_secret()) {
                Ok(at) => (at, false),
                Err(()) => {
                    tracing::warn!(
                        provider = self.provider.id,
                        key = %self.keys.token_expires_at,
                        "unreadable oauth2 token expiry; refreshing the access token"
                    );
                    (None, true)
                }
            },
        };
        Ok(Stored { access_token, expires_at, expiry_unreadable, refresh_token })
    }

    async fn persist(&self, tokens: &TokenSet) -> Result<()> {
        store_tokens(&self.provider, &*self.credentials, tokens).await.map_err(|e| {
            let rotation = if self.provider.rotates_refresh_token {
                format!(
                    "; {} rotates refresh tokens, so the stored one may stop working: the new tokens \
                     are kept in memory and saving them is retried on the next call",
                    self.provider.name
                )
            } else {
                "; saving is retried on the next call".to_owned()
            };
            e.context(format!(
                "could not save the new {} tokens ({}); they are not used until saved{rotation}",
                self.provider.name,
                self.location(&self.keys.refresh_token)
            ))
        })
    }

    fn location(&self, key: &str) -> String {
        self.credentials.location_of(key)
    }
}

fn margin_delta(margin: Duration) -> TimeDelta {
    TimeDelta::from_std(margin).unwrap_or(TimeDelta::MAX)
}

/// Parses a stored expiry: RFC 3339 or Unix seconds; `unknown` is `None`.
fn parse_expiry(text: &str) -> std::result::Result<Option<DateTime<Utc>>, ()> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("unknown") {
        return Ok(None);
    }
    if let Ok(secs) = text.parse::<i64>() {
        return DateTime::from_timestamp(secs, 0).map(Some).ok_or(());
    }
    DateTime::parse_from_rfc3339(text).map(|t| Some(t.with_timezone(&Utc))).map_err(|_| ())
}

fn same_secret(a: &SecretString, b: &SecretString) -> bool {
    let (a, b) = (a.expose_secret().as_bytes(), b.expose_secret().as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn redirect_url(redirect_uri: &str) -> Result<RedirectUrl> {
    RedirectUrl::new(redirect_uri.to_owned())
        .map_err(|e| Error::config(format!("invalid OAuth2 redirect URI {redirect_uri:?}")).with_source(e))
}

type TokenClient = BasicClient<EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointSet>;

/// An `oauth2` client for the token endpoint.
fn token_client(
    provider: &OAuthProvider,
    client_id: &str,
    client_secret: &SecretString,
) -> Result<TokenClient> {
    let token_url = TokenUrl::new(provider.token_url.to_string()).map_err(|e| {
        Error::config(format!("invalid {} token URL {:?}", provider.name, provider.token_url)).with_source(e)
    })?;
    let auth_type = match provider.client_auth {
        ClientAuth::Basic => AuthType::BasicAuth,
        ClientAuth::RequestBody => AuthType::RequestBody,
    };
    Ok(BasicClient::new(ClientId::new(client_id.to_owned()))
        .set_client_secret(ClientSecret::new(client_secret.expose_secret().to_owned()))
        .set_token_uri(token_url)
        .set_auth_type(auth_type))
}

/// The `oauth2` HTTP client over this crate's `reqwest`: no redirects, timeouts from an
/// [`HttpConfig`], and the statuses that are not OAuth2 errors (5xx, 429, 3xx, a 4xx without an
/// OAuth2 error body) turned into [`TransportError::Status`] so their kind is not lost.
#[derive(Clone)]
struct OAuthHttp {
    client: reqwest::Client,
}

impl OAuthHttp {
    fn new(config: &HttpConfig) -> Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.connect_timeout)
            .user_agent(config.user_agent.clone())
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| {
                Error::config("cannot create the OAuth2 HTTP client").with_source(e.without_url())
            })?;
        Ok(Self { client })
    }
}

/// Why a token request got no usable answer.
enum TransportError {
    /// The request could not be sent or the answer not read (stripped of its URL).
    Reqwest(reqwest::Error),
    /// A status that is not an OAuth2 error response. The body is kept for the error message
    /// (redacted there) and never formatted by this type.
    Status { status: StatusCode, headers: HeaderMap, body: Vec<u8> },
    /// The response could not be handed to `oauth2`.
    Other(String),
}

impl fmt::Debug for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransportError::Reqwest(e) => fmt::Display::fmt(e, f),
            TransportError::Status { status, .. } => write!(f, "HTTP {}", status.as_u16()),
            TransportError::Other(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for TransportError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TransportError::Reqwest(e) => Some(e),
            _ => None,
        }
    }
}

/// Whether `body` is an OAuth2 error response (`{"error": "..."}`), which `oauth2` parses.
fn is_oauth_error_body(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .is_some_and(|v| v.get("error").is_some_and(serde_json::Value::is_string))
}

type HttpFuture<'c> =
    Pin<Box<dyn Future<Output = std::result::Result<HttpResponse, TransportError>> + Send + 'c>>;

impl<'c> AsyncHttpClient<'c> for OAuthHttp {
    type Error = TransportError;
    type Future = HttpFuture<'c>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(async move {
            let request =
                reqwest::Request::try_from(request).map_err(|e| TransportError::Reqwest(e.without_url()))?;
            let response =
                self.client.execute(request).await.map_err(|e| TransportError::Reqwest(e.without_url()))?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = response.bytes().await.map_err(|e| TransportError::Reqwest(e.without_url()))?.to_vec();
            let oauth_error = status.is_client_error() && is_oauth_error_body(&body);
            if !status.is_success() && !oauth_error {
                return Err(TransportError::Status { status, headers, body });
            }
            let mut builder = oauth2::http::Response::builder().status(status);
            for (name, value) in &headers {
                builder = builder.header(name, value);
            }
            builder.body(body).map_err(|e| TransportError::Other(format!("invalid HTTP response: {e}")))
        })
    }
}

/// Which grant a token request was for.
enum Grant {
    /// A refresh with the token stored at `location`.
    Refresh { location: String },
    /// An authorization code exchange.
    Code,
}

/// Turns `oauth2` errors into [`Error`]s that name the credential and never a secret.
struct ErrorContext<'a> {
    provider: &'a OAuthProvider,
    grant: Grant,
    keys: TokenKeys,
    /// Values to cut out of anything the server sent back.
    secrets: &'a [&'a str],
}

impl ErrorContext<'_> {
    /// What was being done, for the start of messages.
    fn doing(&self) -> String {
        match &self.grant {
            Grant::Refresh { location } => {
                format!(
                    "refreshing the {} access token with the refresh token in {location}",
                    self.provider.name
                )
            }
            Grant::Code => format!("exchanging the {} authorization code", self.provider.name),
        }
    }

    /// `text` with every secret (raw or form-encoded) replaced by `<redacted>`.
    fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for secret in self.secrets.iter().filter(|s| s.len() >= 4) {
            out = out.replace(secret, "<redacted>");
            let encoded: String = url_encode(secret);
            if encoded != *secret {
                out = out.replace(&encoded, "<redacted>");
            }
        }
        out
    }

    fn error(&self, error: RequestTokenError<TransportError, BasicErrorResponse>) -> Error {
        let name = self.provider.name;
        let id = self.provider.id;
        match error {
            RequestTokenError::ServerResponse(response) => {
                let code = response.error().as_ref().to_owned();
                let detail = response
                    .error_description()
                    .map(|d| format!(": {}", body_excerpt(self.redact(d).as_bytes())))
                    .unwrap_or_default();
                match (response.error(), &self.grant) {
                    (BasicErrorResponseType::InvalidGrant, Grant::Refresh { location }) => {
                        Error::auth(format!(
                            "the {name} refresh token in {location} was rejected (invalid_grant{detail}): run \
                         `connectors auth {id}`"
                        ))
                    }
                    (BasicErrorResponseType::InvalidGrant, Grant::Code) => Error::auth(format!(
                        "the {name} authorization code was rejected (invalid_grant{detail}): codes are \
                         single-use and expire within minutes; run `connectors auth {id}` again"
                    )),
                    (
                        BasicErrorResponseType::InvalidClient | BasicErrorResponseType::UnauthorizedClient,
                        _,
                    ) => Error::auth(format!(
                        "{}: the {name} client credentials ({}, {}) were rejected ({code}{detail})",
                        self.doing(),
                        self.keys.client_id,
                        self.keys.client_secret
                    )),
                    (BasicErrorResponseType::InvalidScope, _) => {
                        Error::config(format!("{}: the scopes were rejected ({code}{detail})", self.doing()))
                    }
                    _ => {
                        Error::auth(format!("{}: the token endpoint refused ({code}{detail})", self.doing()))
                    }
                }
            }
            RequestTokenError::Request(TransportError::Status { status, headers, body }) => {
                let excerpt = body_excerpt(self.redact(&String::from_utf8_lossy(&body)).as_bytes());
                // Checked when the request was built.
                let url = Url::parse(&self.provider.token_url).expect("token URL parsed before");
                let error = if status.is_redirection() {
                    Error::source_error(format!(
                        "the token endpoint redirected (HTTP {}): check the {name} token URL",
                        status.as_u16()
                    ))
                } else {
                    error_for_status(&Method::POST, &url, status, &headers, &excerpt)
                };
                error.context(self.doing())
            }
            RequestTokenError::Request(TransportError::Reqwest(e)) => {
                let what = if e.is_timeout() {
                    "the token endpoint timed out"
                } else if e.is_connect() {
                    "cannot connect to the token endpoint"
                } else {
                    "the token request failed"
                };
                Error::transient(format!("{}: {what}", self.doing())).with_source(e)
            }
            RequestTokenError::Request(TransportError::Other(message)) => {
                Error::source_error(format!("{}: {message}", self.doing()))
            }
            // Never quote the body or serde's message: a success body holds the tokens.
            RequestTokenError::Parse(e, _body) => Error::source_error(format!(
                "{}: the token endpoint's answer is not a valid token response (at `{}`)",
                self.doing(),
                e.path()
            )),
            RequestTokenError::Other(message) => {
                Error::source_error(format!("{}: {}", self.doing(), self.redact(&message)))
            }
        }
    }
}

/// `application/x-www-form-urlencoded` encoding of `text`, as a form echo would show it.
fn url_encode(text: &str) -> String {
    let mut url = Url::parse("http://x/").expect("static URL");
    url.query_pairs_mut().append_pair("v", text);
    url.query().unwrap_or_default().trim_start_matches("v=").to_owned()
}
