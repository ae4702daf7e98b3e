//! Tests against a fake token endpoint on 127.0.0.1:0 (real sockets, real time).
//!
//! The fake checks client authentication (Basic or form body, as the provider says), the
//! authorization code, the redirect URI and the PKCE verifier (S256, computed here), accepts
//! only the latest refresh token, rotates it when asked, and counts requests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap as AxHeaders, Response as AxResponse};
use axum::routing::post;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

use super::*;
use crate::credentials::StaticCredentialProvider;

const CLIENT_ID: &str = "client-id-123";
const CLIENT_SECRET: &str = "cs-SECRET-client-4f2a";
const REDIRECT: &str = "http://localhost:8080/oauth/callback";

// ---------------------------------------------------------------------------------------------
// The fake token endpoint

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Normal,
    /// Answer every refresh with `invalid_grant`.
    InvalidGrant,
    /// Answer with this status and an HTML page that echoes the form (secrets included).
    Status(u16),
    /// Wait this long before answering.
    Sleep(Duration),
}

struct FakeState {
    auth: ClientAuth,
    /// The only refresh token accepted.
    refresh_token: String,
    generation: u32,
    rotate: bool,
    expires_in: u64,
    mode: Mode,
    /// Added to every answer, to widen race windows.
    delay: Duration,
    /// Issued codes: code -> (PKCE challenge, redirect URI).
    codes: HashMap<String, (Option<String>, String)>,
}

#[derive(Clone)]
struct Fake {
    state: Arc<Mutex<FakeState>>,
    hits: Arc<AtomicUsize>,
    url: String,
}

impl Fake {
    async fn start(auth: ClientAuth, refresh_token: &str, rotate: bool) -> Self {
        let state = FakeState {
            auth,
            refresh_token: refresh_token.to_owned(),
            generation: 0,
            rotate,
            expires_in: 3600,
            mode: Mode::Normal,
            delay: Duration::ZERO,
            codes: HashMap::new(),
        };
        let mut fake = Fake { state: Arc::new(Mutex::new(state)), hits: Arc::default(), url: String::new() };
        let handler = fake.clone();
        let router = Router::new().route(
            "/token",
            post(move |headers: AxHeaders, body: String| {
                let fake = handler.clone();
                async move { fake.token(headers, body).await }
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        fake.url = format!("http://{addr}");
        fake
    }

    /// `base` with its endpoints pointed at this fake.
    fn provider(&self, base: OAuthProvider) -> OAuthProvider {
        base.with_endpoints(format!("{}/authorize", self.url), format!("{}/token", self.url))
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = mode;
    }

    fn set_delay(&self, delay: Duration) {
        self.state.lock().unwrap().delay = delay;
    }

    /// What the authorization endpoint does when the user consents: issue a code bound to the
    /// challenge and redirect URI of the authorization URL.
    fn consent(&self, auth_url: &Url) -> String {
        let query: HashMap<String, String> = auth_url.query_pairs().into_owned().collect();
        let challenge = query.get("code_challenge").cloned();
        if challenge.is_some() {
            assert_eq!(query["code_challenge_method"], "S256");
        }
        let code = format!("code-SECRET-{}", self.hits() + 100);
        self.state.lock().unwrap().codes.insert(code.clone(), (challenge, query["redirect_uri"].clone()));
        code
    }

    async fn token(&self, headers: AxHeaders, body: String) -> AxResponse<Body> {
        self.hits.fetch_add(1, Ordering::SeqCst);
        let form: HashMap<String, String> =
            Url::parse(&format!("http://x/?{body}")).unwrap().query_pairs().into_owned().collect();
        let (mode, delay) = {
            let s = self.state.lock().unwrap();
            (s.mode, s.delay)
        };
        tokio::time::sleep(delay).await;
        match mode {
            Mode::Status(status) => {
                return reply(
                    status,
                    "text/html",
                    format!("<html><body>upstream failure; request was {body}</body></html>"),
                );
            }
            Mode::Sleep(d) => tokio::time::sleep(d).await,
            Mode::Normal | Mode::InvalidGrant => {}
        }
        let mut s = self.state.lock().unwrap();
        let authenticated = match s.auth {
            ClientAuth::Basic => {
                let expected =
                    format!("Basic {}", base64(format!("{CLIENT_ID}:{CLIENT_SECRET}").as_bytes(), false));
                headers.get("authorization").is_some_and(|v| v.to_str().unwrap() == expected)
                    && !form.contains_key("client_secret")
            }
            ClientAuth::RequestBody => {
                form.get("client_id").is_some_and(|v| v == CLIENT_ID)
                    && form.get("client_secret").is_some_and(|v| v == CLIENT_SECRET)
                    && !headers.contains_key("authorization")
            }
        };
        if !authenticated {
            return oauth_error(401, "invalid_client");
        }
        match form.get("grant_type").map(String::as_str) {
            Some("authorization_code") => {
                let Some((challenge, redirect)) = form.get("code").and_then(|c| s.codes.remove(c)) else {
                    return oauth_error(400, "invalid_grant");
                };
                if form.get("redirect_uri") != Some(&redirect) {
                    return oauth_error(400, "invalid_grant");
                }
                if let Some(challenge) = challenge {
                    let computed =
                        form.get("code_verifier").map(|v| base64(&Sha256::digest(v.as_bytes()), true));
                    if computed.as_ref() != Some(&challenge) {
                        return oauth_error(400, "invalid_grant");
                    }
                }
                s.issue(true)
            }
            Some("refresh_token") => {
                if s.mode == Mode::InvalidGrant || form.get("refresh_token") != Some(&s.refresh_token) {
                    return oauth_error(400, "invalid_grant");
                }
                let rotate = s.rotate;
                s.issue(rotate)
            }
            _ => oauth_error(400, "unsupported_grant_type"),
        }
    }
}

impl FakeState {
    fn issue(&mut self, new_refresh_token: bool) -> AxResponse<Body> {
        self.generation += 1;
        let mut body = serde_json::json!({
            "access_token": format!("at-SECRET-{}", self.generation),
            "token_type": "bearer",
            "expires_in": self.expires_in,
        });
        if new_refresh_token {
            self.refresh_token = format!("rt-SECRET-{}", self.generation);
            body["refresh_token"] = self.refresh_token.clone().into();
        }
        reply(200, "application/json", body.to_string())
    }
}

fn reply(status: u16, content_type: &str, body: String) -> AxResponse<Body> {
    AxResponse::builder().status(status).header("content-type", content_type).body(Body::from(body)).unwrap()
}

fn oauth_error(status: u16, code: &str) -> AxResponse<Body> {
    let body = serde_json::json!({ "error": code, "error_description": "refused by the fake" });
    reply(status, "application/json", body.to_string())
}

/// Base64 (standard with padding, or URL-safe without), written here so the fake does not
/// check the library with itself.
fn base64(data: &[u8], url_safe: bool) -> String {
    let alphabet: &[u8; 64] = if url_safe {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    };
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(alphabet[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else if !url_safe {
                out.push('=');
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// A credential store that records writes and can refuse them

#[derive(Default)]
struct TestStore {
    inner: StaticCredentialProvider,
    events: Mutex<Vec<String>>,
    fail_sets: AtomicBool,
}

impl TestStore {
    fn with(self, key: &str, value: impl Into<String>) -> Self {
        Self { inner: self.inner.with(key, value), ..self }
    }

    fn event(&self, event: impl Into<String>) {
        self.events.lock().unwrap().push(event.into());
    }

    fn events(&self) -> Vec<String> {
        self.events.lock().unwrap().clone()
    }

    async fn value(&self, key: &str) -> Option<String> {
        self.inner.get_credential(key).await.unwrap().map(|v| v.expose_secret().to_owned())
    }
}

#[async_trait]
impl CredentialProvider for TestStore {
    async fn get_credential(&self, key: &str) -> Result<Option<SecretString>> {
        self.inner.get_credential(key).await
    }

    async fn set_credential(&self, key: &str, value: SecretString) -> Result<()> {
        if self.fail_sets.load(Ordering::SeqCst) {
            self.event(format!("failed {key}"));
            return Err(Error::transient(format!("the test store refused to write {key}")));
        }
        self.event(format!("set {key}={}", value.expose_secret()));
        self.inner.set_credential(key, value).await
    }

    fn describe(&self) -> String {
        "the test store".into()
    }
}

/// A QuickBooks store with an access token expiring in `expires_in_secs` and refresh token
/// `rt-SECRET-0`.
fn qbo_store(expires_in_secs: i64) -> TestStore {
    let expires_at = (Utc::now() + TimeDelta::seconds(expires_in_secs)).to_rfc3339();
    TestStore::default()
        .with("qbo_access_token", "at-SECRET-old")
        .with("qbo_token_expires_at", expires_at)
        .with("qbo_refresh_token", "rt-SECRET-0")
}

async fn manager(provider: OAuthProvider, store: &Arc<TestStore>) -> TokenManager {
    TokenManager::new(provider, CLIENT_ID, SecretString::from(CLIENT_SECRET), store.clone()).await.unwrap()
}

/// Asserts that `text` holds none of the secrets used in these tests.
fn assert_no_secret(text: &str) {
    for secret in ["SECRET", CLIENT_SECRET] {
        assert!(!text.contains(secret), "a secret leaked into {text:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Providers and the authorization URL

#[test]
fn providers_are_data_with_the_guides_keys() {
    let qbo = OAuthProvider::by_id("quickbooks").unwrap();
    assert_eq!(qbo, OAuthProvider::QUICKBOOKS);
    let keys = qbo.keys();
    assert_eq!(keys.client_id, "qbo_client_id");
    assert_eq!(keys.client_secret, "qbo_client_secret");
    assert_eq!(keys.refresh_token, "qbo_refresh_token");
    assert_eq!(keys.access_token, "qbo_access_token");
    assert_eq!(keys.token_expires_at, "qbo_token_expires_at");
    assert_eq!(OAuthProvider::GOOGLE_DRIVE.keys().refresh_token, "gdrive_refresh_token");
    assert_eq!(OAuthProvider::GUSTO.keys().access_token, "gusto_access_token");
    assert_eq!(OAuthProvider::XERO.keys().client_id, "xero_client_id");
    let rotating: Vec<&str> =
        OAuthProvider::ALL.iter().filter(|p| p.rotates_refresh_token).map(|p| p.id).collect();
    assert_eq!(rotating, ["quickbooks", "gusto", "xero"]);
    assert!(OAuthProvider::XERO.default_scopes.contains(&"offline_access"));
    assert_eq!(OAuthProvider::GUSTO_DEMO.id, "gusto");
    assert!(OAuthProvider::GUSTO_DEMO.token_url.contains("gusto-demo"));
    assert!(OAuthProvider::by_id("nope").is_none());
    let acme = qbo.clone().with_key_prefix("qbo_acme").with_endpoints("http://a/auth", "http://a/token");
    assert_eq!(acme.keys().refresh_token, "qbo_acme_refresh_token");
    assert_eq!(acme.token_url, "http://a/token");
    assert_eq!(
        OAuthProvider::QUICKBOOKS.token_url,
        "https://oauth.platform.intuit.com/oauth2/v1/tokens/bearer"
    );
}

#[test]
fn auth_url_has_client_redirect_scopes_state_and_s256_challenge() {
    let provider =
        OAuthProvider::XERO.with_endpoints("https://login.example/authorize", "https://login.example/token");
    let request = get_oauth_url(&provider, CLIENT_ID, REDIRECT, &[]).unwrap();
    assert!(request.url.as_str().starts_with("https://login.example/authorize?"));
    let query: HashMap<String, String> = request.url.query_pairs().into_owned().collect();
    assert_eq!(query["response_type"], "code");
    assert_eq!(query["client_id"], CLIENT_ID);
    assert_eq!(query["redirect_uri"], REDIRECT);
    assert_eq!(query["scope"], "offline_access accounting.transactions accounting.contacts");
    assert_eq!(query["state"], request.state);
    assert!(request.state.len() >= 16);
    assert_eq!(query["code_challenge_method"], "S256");
    let verifier = request.pkce_verifier.as_ref().unwrap().expose_secret();
    assert!(verifier.len() >= 43);
    assert_eq!(query["code_challenge"], base64(&Sha256::digest(verifier.as_bytes()), true));
    assert!(!request.url.as_str().contains(verifier));
    assert!(!format!("{request:?}").contains(verifier));
    request.check_state(&request.state).unwrap();
    assert_eq!(request.check_state("forged").unwrap_err().kind(), ErrorKind::Auth);

    // Random state and verifier on every call.
    let again = get_oauth_url(&provider, CLIENT_ID, REDIRECT, &[]).unwrap();
    assert_ne!(again.state, request.state);
    assert_ne!(again.pkce_verifier.unwrap().expose_secret(), verifier);

    // Explicit scopes replace the defaults; Google asks for offline access.
    let google = get_oauth_url(&OAuthProvider::GOOGLE_DRIVE, CLIENT_ID, REDIRECT, &["a", "b"]).unwrap();
    let query: HashMap<String, String> = google.url.query_pairs().into_owned().collect();
    assert_eq!(query["scope"], "a b");
    assert_eq!(query["access_type"], "offline");
    assert_eq!(query["prompt"], "consent");

    // No PKCE where the vendor does not support it.
    let qbo = get_oauth_url(&OAuthProvider::QUICKBOOKS, CLIENT_ID, REDIRECT, &[]).unwrap();
    assert!(qbo.pkce_verifier.is_none());
    assert!(!qbo.url.as_str().contains("code_challenge"));
    assert!(qbo.url.as_str().contains("scope=com.intuit.quickbooks.accounting"));

    assert_eq!(get_oauth_url(&provider, CLIENT_ID, "not a url", &[]).unwrap_err().kind(), ErrorKind::Config);
}

// ---------------------------------------------------------------------------------------------
// Code exchange

#[tokio::test]
async fn exchange_code_round_trip_with_pkce() {
    // Google: client credentials in the form body, PKCE.
    let fake = Fake::start(ClientAuth::RequestBody, "unused", false).await;
    let provider = fake.provider(OAuthProvider::GOOGLE_DRIVE);
    let request = get_oauth_url(&provider, CLIENT_ID, REDIRECT, &[]).unwrap();
    let code = SecretString::from(fake.consent(&request.url));
    let secret = SecretString::from(CLIENT_SECRET);

    // A wrong verifier is refused by the fake: the code is single-use, so get a second one.
    let wrong = SecretString::from("x".repeat(64));
    let err = exchange_code(&provider, CLIENT_ID, &secret, REDIRECT, &code, Some(&wrong)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth);
    let message = err.to_string();
    assert!(message.contains("Google Drive authorization code was rejected (invalid_grant"), "{message}");
    assert!(message.contains("connectors auth gdrive"), "{message}");
    assert_no_secret(&message);
    assert!(!message.contains(&"x".repeat(64)));

    let code = SecretString::from(fake.consent(&request.url));
    let before = Utc::now();
    let tokens =
        exchange_code(&provider, CLIENT_ID, &secret, REDIRECT, &code, request.pkce_verifier.as_ref())
            .await
            .unwrap();
    assert_eq!(tokens.access_token.expose_secret(), "at-SECRET-1");
    assert_eq!(tokens.refresh_token.as_ref().unwrap().expose_secret(), "rt-SECRET-1");
    let expires_at = tokens.expires_at.unwrap();
    assert!(
        expires_at >= before + TimeDelta::seconds(3599)
            && expires_at <= Utc::now() + TimeDelta::seconds(3600)
    );
    assert_no_secret(&format!("{tokens:?}"));

    // Stored under the provider's keys, readable by a manager without a refresh.
    let store = Arc::new(TestStore::default());
    store_tokens(&provider, &*store, &tokens).await.unwrap();
    assert_eq!(store.value("gdrive_refresh_token").await.unwrap(), "rt-SECRET-1");
    assert_eq!(store.value("gdrive_access_token").await.unwrap(), "at-SECRET-1");
    let hits = fake.hits();
    let tokens = manager(provider, &store).await;
    assert_eq!(tokens.access_token().await.unwrap().expose_secret(), "at-SECRET-1");
    assert_eq!(fake.hits(), hits);
}

#[tokio::test]
async fn a_rejected_client_names_the_client_keys() {
    let fake = Fake::start(ClientAuth::Basic, "rt-SECRET-0", true).await;
    let provider = fake.provider(OAuthProvider::QUICKBOOKS);
    let store = Arc::new(qbo_store(-10));
    let tokens = TokenManager::new(provider, CLIENT_ID, SecretString::from("cs-SECRET-wrong"), store.clone())
        .await
        .unwrap();
    let err = tokens.access_token().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth);
    let message = err.to_string();
    assert!(message.contains("qbo_client_id, qbo_client_secret"), "{message}");
    assert!(message.contains("invalid_client"), "{message}");
    assert_no_secret(&message);
}

// ---------------------------------------------------------------------------------------------
// Refresh

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_triggers_exactly_one_refresh_for_50_concurrent_callers() {
    let fake = Fake::start(ClientAuth::Basic, "rt-SECRET-0", true).await;
    fake.set_delay(Duration::from_millis(200));
    let store = Arc::new(qbo_store(10)); // within the 60 s margin
    let tokens = manager(fake.provider(OAuthProvider::QUICKBOOKS), &store).await;
    let callers: Vec<_> = (0..50)
        .map(|_| {
            let tokens = tokens.clone();
            tokio::spawn(async move { tokens.access_token().await })
        })
        .collect();
    for caller in callers {
        assert_eq!(caller.await.unwrap().unwrap().expose_secret(), "at-SECRET-1");
    }
    assert_eq!(fake.hits(), 1, "one refresh for all callers");
    assert_eq!(store.value("qbo_refresh_token").await.unwrap(), "rt-SECRET-1");
    // Valid now: no further request.
    assert_eq!(tokens.access_token().await.unwrap().expose_secret(), "at-SECRET-1");
    assert_eq!(fake.hits(), 1);
}

#[tokio::test]
async fn rotated_refresh_token_is_persisted_before_use() {
    let fake = Fake::start(ClientAuth::Basic, "rt-SECRET-0", true).await;
    let store = Arc::new(qbo_store(-5));
    let tokens = manager(fake.provider(OAuthProvider::QUICKBOOKS), &store).await;
    let token = tokens.access_token().await.unwrap();
    store.event(format!("returned {}", token.expose_secret()));
    let events = store.events();
    assert_eq!(
        events[..3],
        [
            "set qbo_refresh_token=rt-SECRET-1".to_owned(),
            "set qbo_access_token=at-SECRET-1".to_owned(),
            format!("set qbo_token_expires_at={}", store.value("qbo_token_expires_at").await.unwrap()),
        ]
    );
    assert_eq!(events[3], "returned at-SECRET-1");
    assert_eq!(events.len(), 4);
    let expires_at = parse_expiry(&store.value("qbo_token_expires_at").await.unwrap()).unwrap().unwrap();
    assert!(expires_at > Utc::now() + TimeDelta::seconds(3500));
}

#[tokio::test]
async fn a_failed_save_is_an_error_and_the_new_token_is_not_used() {
    let fake = Fake::start(ClientAuth::Basic, "rt-SECRET-0", true).await;
    let store = Arc::new(qbo_store(-5));
    store.fail_sets.store(true, Ordering::SeqCst);
    let tokens = manager(fake.provider(OAuthProvider::QUICKBOOKS), &store).await;

    let err = tokens.access_token().await.unwrap_err();
    let message = err.to_string();
    assert!(message.contains("could not save the new QuickBooks tokens"), "{message}");
    assert!(message.contains("qbo_refresh_token"), "{message}");
    assert!(message.contains("not used until saved"), "{message}");
    assert_no_secret(&message);
    assert!(err.is_retryable(), "the store's own error kind is kept: {err:?}");
    assert_eq!(store.value("qbo_refresh_token").await.unwrap(), "rt-SECRET-0");
    assert_eq!(fake.hits(), 1);

    // Still failing: still an error, and no second refresh (the rotated token is kept).
    assert!(tokens.access_token().await.is_err());
    assert_eq!(fake.hits(), 1);

    // The store is back: the kept tokens are saved first, then used, without a refresh.
    store.fail_sets.store(false, Ordering::SeqCst);
    assert_eq!(tokens.access_token().await.unwrap().expose_secret(), "at-SECRET-1");
    assert_eq!(fake.hits(), 1);
    assert_eq!(store.value("qbo_refresh_token").await.unwrap(), "rt-SECRET-1");
    assert_eq!(store.value("qbo_access_token").await.unwrap(), "at-SECRET-1");
}

#[tokio::test]
async fn restart_uses_the_persisted_tokens_without_a_refresh() {
    let fake = Fake::start(ClientAuth::Basic, "rt-SECRET-0", true).await;
    let provider = fake.provider(OAuthProvider::QUICKBOOKS);
    let store = Arc::new(qbo_store(-5));
    let first = manager(provider.clone(), &store).await;
    assert_eq!(first.access_token().await.unwrap().expose_secret(), "at-SECRET-1");
    assert_eq!(fake.hits(), 1);
    drop(first); // the process dies after the refresh

    let second = manager(provider.clone(), &store).await;
    let token = second.access_token().await.unwrap();
    assert_eq!(token.expose_secret(), "at-SECRET-1");
    assert_eq!(fake.hits(), 1, "the persisted access token is still valid");

    // A 401 from the API: the next call refreshes with the persisted (rotated) refresh token,
    // which is the only one the fake accepts.
    second.invalidate(&token).await;
    let token = second.access_token().await.unwrap();
    assert_eq!(token.expose_secret(), "at-SECRET-2");
    assert_eq!(fake.hits(), 2);
    // A stale 401 report (for a token already replaced) changes nothing.
    second.invalidate(&SecretString::from("at-SECRET-1")).await;
    assert_eq!(second.access_token().await.unwrap().expose_secret(), "at-SECRET-2");
    assert_eq!(fake.hits(), 2);

    // A stored expiry that is unknown means "valid until rejected".
    let store = Arc::new(
        TestStore::default()
            .with("qbo_access_token", "at-SECRET-env")
            .with("qbo_refresh_token", "rt-SECRET-2"),
    );
    let third = manager(provider, &store).await;
    assert_eq!(third.access_token().await.unwrap().expose_secret(), "at-SECRET-env");
    assert_eq!(fake.hits(), 2);
}

#[tokio::test]
async fn reads_client_credentials_from_the_store() {
    let fake = Fake::start(ClientAuth::Basic, "rt-SECRET-0", true).await;
    let store =
        Arc::new(qbo_store(-5).with("qbo_client_id", CLIENT_ID).with("qbo_client_secret", CLIENT_SECRET));
    let provider = fake.provider(OAuthProvider::QUICKBOOKS);
    let tokens = TokenManager::builder(provider.clone(), store.clone()).build().await.unwrap();
    assert_eq!(tokens.access_token().await.unwrap().expose_secret(), "at-SECRET-1");

    let empty: Arc<dyn CredentialProvider> = Arc::new(StaticCredentialProvider::new());
    let err = TokenManager::builder(provider, empty).build().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth);
    assert!(err.to_string().contains("qbo_client_id"), "{err}");
}

#[tokio::test]
async fn missing_refresh_token_names_the_key() {
    let fake = Fake::start(ClientAuth::Basic, "rt-SECRET-0", true).await;
    let store = Arc::new(TestStore::default());
    let tokens = manager(fake.provider(OAuthProvider::QUICKBOOKS), &store).await;
    let err = tokens.access_token().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth);
    assert_eq!(
        err.to_string(),
        "no QuickBooks refresh token: set qbo_refresh_token in the test store or run `connectors auth quickbooks`"
    );
    assert_eq!(fake.hits(), 0);
}

// ---------------------------------------------------------------------------------------------
// Errors

#[tokio::test]
async fn invalid_grant_is_an_auth_error_naming_the_key() {
    let fake = Fake::start(ClientAuth::Basic, "rt-SECRET-0", true).await;
    fake.set_mode(Mode::InvalidGrant);
    let store = Arc::new(qbo_store(-5));
    let tokens = manager(fake.provider(OAuthProvider::QUICKBOOKS), &store).await;
    let err = tokens.access_token().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth);
    assert!(!err.is_retryable());
    let message = err.to_string();
    assert!(
        message.starts_with(
            "the QuickBooks refresh token in qbo_refresh_token in the test store was rejected (invalid_grant"
        ),
        "{message}"
    );
    assert!(message.ends_with("run `connectors auth quickbooks`"), "{message}");
    assert_no_secret(&message);
    assert_no_secret(&format!("{err:?}"));
}

#[tokio::test]
async fn invalid_grant_retries_once_when_the_store_got_a_new_refresh_token() {
    // Another process (or `connectors auth`) stored a new refresh token after we read ours.
    let fake = Fake::start(ClientAuth::Basic, "rt-SECRET-new", true).await;
    let store = Arc::new(qbo_store(-5));
    let tokens = manager(fake.provider(OAuthProvider::QUICKBOOKS), &store).await;
    // Swap the refresh token while the first request is in flight.
    fake.set_delay(Duration::from_millis(200));
    let swap = {
        let store = store.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            store
                .inner
                .set_credential("qbo_refresh_token", SecretString::from("rt-SECRET-new"))
                .await
                .unwrap();
        })
    };
    assert_eq!(tokens.access_token().await.unwrap().expose_secret(), "at-SECRET-1");
    swap.await.unwrap();
    assert_eq!(fake.hits(), 2);
}

#[tokio::test]
async fn server_error_is_transient_and_redacted() {
    let fake = Fake::start(ClientAuth::RequestBody, "rt-SECRET-0", false).await;
    fake.set_mode(Mode::Status(500));
    let store = Arc::new(
        TestStore::default().with("gdrive_refresh_token", "rt-SECRET-0").with("gdrive_token_expires_at", "0"),
    );
    let tokens = manager(fake.provider(OAuthProvider::GOOGLE_DRIVE), &store).await;
    let err = tokens.access_token().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transient);
    assert!(err.is_retryable());
    let message = err.to_string();
    assert!(
        message.starts_with(
            "refreshing the Google Drive access token with the refresh token in gdrive_refresh_token in the test store"
        ),
        "{message}"
    );
    assert!(message.contains("HTTP 500"), "{message}");
    // The fake echoed the form (refresh token, client secret): cut out.
    assert!(message.contains("upstream failure"), "{message}");
    assert!(message.contains("<redacted>"), "{message}");
    assert_no_secret(&message);

    // A 429 keeps its kind too.
    fake.set_mode(Mode::Status(429));
    let err = tokens.access_token().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RateLimited);
    assert_no_secret(&err.to_string());
}

#[tokio::test]
async fn timeout_is_transient_and_names_the_key() {
    let fake = Fake::start(ClientAuth::Basic, "rt-SECRET-0", true).await;
    fake.set_mode(Mode::Sleep(Duration::from_secs(3)));
    let store = Arc::new(qbo_store(-5));
    let config = HttpConfig { timeout: Duration::from_millis(300), ..HttpConfig::default() };
    let tokens = TokenManager::builder(fake.provider(OAuthProvider::QUICKBOOKS), store.clone())
        .client(CLIENT_ID, SecretString::from(CLIENT_SECRET))
        .http_config(config)
        .build()
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let err = tokens.access_token().await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(err.kind(), ErrorKind::Transient);
    let message = err.to_string();
    assert!(message.contains("qbo_refresh_token"), "{message}");
    assert!(message.contains("timed out"), "{message}");
    assert_no_secret(&message);
    // Nothing was stored.
    assert_eq!(store.value("qbo_refresh_token").await.unwrap(), "rt-SECRET-0");
}

#[tokio::test]
async fn debug_output_hides_every_secret() {
    let store = Arc::new(qbo_store(100));
    let tokens = manager(OAuthProvider::QUICKBOOKS, &store).await;
    assert_eq!(tokens.access_token().await.unwrap().expose_secret(), "at-SECRET-old");
    assert_no_secret(&format!("{tokens:?}"));
    let builder = TokenManager::builder(OAuthProvider::XERO, store.clone())
        .client(CLIENT_ID, SecretString::from(CLIENT_SECRET));
    assert_no_secret(&format!("{builder:?}"));
    let set = TokenSet {
        access_token: SecretString::from("at-SECRET-x"),
        refresh_token: Some(SecretString::from("rt-SECRET-x")),
        expires_at: None,
        scopes: None,
    };
    assert_no_secret(&format!("{set:?}"));
}

#[test]
fn stored_expiry_formats() {
    assert_eq!(parse_expiry("unknown"), Ok(None));
    assert_eq!(parse_expiry("0"), Ok(DateTime::from_timestamp(0, 0)));
    assert_eq!(parse_expiry("2026-01-31T12:00:00Z"), Ok(DateTime::from_timestamp(1_769_860_800, 0)));
    assert_eq!(parse_expiry("2026-01-31T13:00:00+01:00"), Ok(DateTime::from_timestamp(1_769_860_800, 0)));
    assert_eq!(parse_expiry("tomorrow"), Err(()));
}

#[test]
fn redaction_covers_raw_and_form_encoded_secrets() {
    let provider = OAuthProvider::QUICKBOOKS;
    let secrets = ["a/b+c=d SECRET"];
    let ctx =
        ErrorContext { provider: &provider, grant: Grant::Code, keys: provider.keys(), secrets: &secrets };
    let text = ctx.redact("raw a/b+c=d SECRET, form a%2Fb%2Bc%3Dd+SECRET");
    assert_eq!(text, "raw <redacted>, form <redacted>");
}
