//! The webhook server (feature `webhooks`): `POST /api/webhooks/{source}`, `GET /healthz` and
//! `GET /metrics` on one axum [`Router`].
//!
//! A [`WebhookVerifier`] per source checks each request's signature (in constant time; with a
//! replay window where the source signs a timestamp) and turns the verified payload into
//! [`WebhookEvent`]s: hints naming what changed (a repository's issue 12, the paths a push
//! changed, a Slack message). The hints go to a [`WebhookSink`] (the scheduler), which runs
//! targeted syncs. Webhooks are hints only: cursors stay the source of completeness, so a lost
//! or ignored webhook delays a change until the next scheduled sync and loses nothing.
//!
//! Sources: [`GithubVerifier`] (`X-Hub-Signature-256`, secret `github_webhook_secret`, i.e.
//! `ARAGORA_GITHUB_WEBHOOK_SECRET`) and [`SlackVerifier`] (`X-Slack-Signature` v0, secret
//! `slack_signing_secret`, 5 minute replay window; answers Slack's `url_verification`).
//!
//! # Responses of `POST /api/webhooks/{source}`
//! | status | when |
//! |---|---|
//! | 202 | verified; the events were handed to the sink (body `{"events": N}`) |
//! | 200 | verified; nothing to do (a `ping`, an event type without hints), or Slack's challenge |
//! | 401 | missing or malformed signature headers, a signature that does not match, a stale timestamp: nothing is processed |
//! | 404 | no verifier for `{source}` |
//! | 413 | the body exceeds the limit ([`DEFAULT_BODY_LIMIT`] unless [`ServerState::with_body_limit`]) |
//!
//! Every request is counted in `connectors_webhooks_total{source,outcome}` (see
//! [`crate::metrics`]); rejections are logged at `warn` without the signature or the body.
//!
//! ```no_run
//! # async fn demo(sink: std::sync::Arc<dyn connector_core::webhook::WebhookSink>) -> connector_core::Result<()> {
//! use connector_core::EnvCredentialProvider;
//! use connector_core::metrics::Metrics;
//! use connector_core::webhook::{self, ServerState};
//!
//! let verifiers = webhook::verifiers_from_credentials(
//!     &EnvCredentialProvider::new(),
//!     webhook::DEFAULT_SLACK_REPLAY_WINDOW,
//! )
//! .await?;
//! let state = ServerState::new(sink, Metrics::new()).with_verifiers(verifiers);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! webhook::serve(listener, state, tokio_util::sync::CancellationToken::new()).await?;
//! # Ok(()) }
//! ```

mod github;
mod slack;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::credentials::CredentialProvider;
use crate::error::Result;
use crate::metrics::{self, Metrics};

pub use axum::http::HeaderMap;
pub use github::{GITHUB_SOURCE, GITHUB_WEBHOOK_SECRET_KEY, GithubVerifier};
pub use slack::{DEFAULT_SLACK_REPLAY_WINDOW, SLACK_SIGNING_SECRET_KEY, SLACK_SOURCE, SlackVerifier};

/// The default body size limit of webhook requests: 1 MiB. GitHub caps payloads at 25 MB but
/// the events that produce hints are far smaller; raise it with
/// [`ServerState::with_body_limit`] if a source sends more.
pub const DEFAULT_BODY_LIMIT: usize = 1 << 20;

/// The route of webhook requests; `{source}` is a verifier's [`WebhookVerifier::source`].
pub const WEBHOOK_ROUTE: &str = "/api/webhooks/{source}";

/// The `source` label under which requests for an unknown source are counted (the path
/// segment itself is not used as a label: anyone can send any path).
pub const UNKNOWN_SOURCE_LABEL: &str = "unknown";

/// A hint that something changed at a source, from a verified webhook.
///
/// `ids` and `removed_ids` name items within `stream`; both empty means "something in the
/// stream changed, which items is unknown" (a force push): sync the stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WebhookEvent {
    /// The source, which is also the connector type it concerns (`github`, `slack`).
    pub source: String,
    /// The vendor's event type (`push`, `issues`, `message`).
    pub event_type: String,
    /// The vendor's action or subtype (`opened`, `deleted`, `message_changed`), if any.
    pub action: Option<String>,
    /// The account the event belongs to: the GitHub repository owner (organization or user),
    /// the Slack team id.
    pub account: Option<String>,
    /// What within the account: the GitHub repository (`octo-org/octo-repo`), the Slack
    /// channel id.
    pub scope: Option<String>,
    /// The connector stream the items belong to (`octo-org/octo-repo/issues`).
    pub stream: Option<String>,
    /// Items created or changed: issue and pull request numbers, file paths, wiki page names,
    /// Slack message timestamps.
    pub ids: Vec<String>,
    /// Items the source reports deleted (or moved away).
    pub removed_ids: Vec<String>,
    /// The vendor's delivery id (`X-GitHub-Delivery`, Slack's `event_id`), to drop
    /// redelivered duplicates.
    pub delivery_id: Option<String>,
}

/// Why a webhook request was rejected. Messages never include the signature or the body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WebhookRejection {
    /// A required header is absent.
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    /// A header is not in the expected form (`sha256=<hex>`, a Unix timestamp).
    #[error("malformed header {0}")]
    MalformedHeader(&'static str),
    /// The signature does not match the body and the secret.
    #[error("signature does not match")]
    BadSignature,
    /// The signed timestamp is outside the replay window.
    #[error("request timestamp is {age_secs} s from now; the replay window is {window_secs} s")]
    StaleTimestamp {
        /// Now minus the request's timestamp, in seconds (negative: in the future).
        age_secs: i64,
        /// The window, in seconds.
        window_secs: u64,
    },
}

impl WebhookRejection {
    /// The HTTP status answered: 401 for every rejection.
    pub fn status(&self) -> StatusCode {
        StatusCode::UNAUTHORIZED
    }

    /// The `outcome` label of `connectors_webhooks_total`: `missing_header`,
    /// `bad_signature` (malformed or not matching) or `stale_timestamp`.
    pub fn outcome(&self) -> &'static str {
        match self {
            WebhookRejection::MissingHeader(_) => "missing_header",
            WebhookRejection::MalformedHeader(_) | WebhookRejection::BadSignature => "bad_signature",
            WebhookRejection::StaleTimestamp { .. } => "stale_timestamp",
        }
    }
}

/// Verifies one source's webhook requests and turns their payloads into hints.
pub trait WebhookVerifier: Send + Sync {
    /// The source name: the last segment of `/api/webhooks/{source}` (`github`).
    fn source(&self) -> &str;

    /// Checks the request's signature (and timestamp, where the source signs one) against
    /// the raw body. `now` is the reference time of the replay window.
    fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: DateTime<Utc>,
    ) -> std::result::Result<(), WebhookRejection>;

    /// The hints carried by a verified request; empty when the event concerns nothing that
    /// is synced (or the payload is not understood).
    fn events(&self, headers: &HeaderMap, body: &[u8]) -> Vec<WebhookEvent>;

    /// A reply the source expects instead of the usual acknowledgement, for a verified
    /// request (Slack's `url_verification` challenge). `None` by default.
    fn challenge(&self, headers: &HeaderMap, body: &[u8]) -> Option<String> {
        let _ = (headers, body);
        None
    }
}

/// Receives the hints of verified webhooks (the scheduler implements it).
///
/// The server awaits `deliver` before answering, and vendors time out quickly (Slack after 3
/// seconds, GitHub after 10): queue the events and return; do not sync here.
#[async_trait]
pub trait WebhookSink: Send + Sync {
    /// Takes the hints of one request (never empty).
    async fn deliver(&self, events: Vec<WebhookEvent>);
}

/// Says whether the process is ready (`GET /healthz` answers 503 when not).
pub type HealthCheck = Arc<dyn Fn() -> bool + Send + Sync>;

/// What the server's handlers share: the verifiers by source, the sink, the metrics, the
/// health check and the body limit.
pub struct ServerState {
    verifiers: BTreeMap<String, Arc<dyn WebhookVerifier>>,
    sink: Arc<dyn WebhookSink>,
    metrics: Metrics,
    health: Option<HealthCheck>,
    body_limit: usize,
}

impl fmt::Debug for ServerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerState")
            .field("sources", &self.verifiers.keys().collect::<Vec<_>>())
            .field("health_check", &self.health.is_some())
            .field("body_limit", &self.body_limit)
            .finish_non_exhaustive()
    }
}

impl ServerState {
    /// A state without verifiers (every webhook source answers 404), always healthy, with
    /// the [`DEFAULT_BODY_LIMIT`].
    pub fn new(sink: Arc<dyn WebhookSink>, metrics: Metrics) -> Self {
        Self { verifiers: BTreeMap::new(), sink, metrics, health: None, body_limit: DEFAULT_BODY_LIMIT }
    }

    /// Adds a verifier; it replaces one with the same source.
    pub fn with_verifier(mut self, verifier: Arc<dyn WebhookVerifier>) -> Self {
        self.verifiers.insert(verifier.source().to_owned(), verifier);
        self
    }

    /// Adds several verifiers (see [`ServerState::with_verifier`]).
    pub fn with_verifiers(self, verifiers: impl IntoIterator<Item = Arc<dyn WebhookVerifier>>) -> Self {
        verifiers.into_iter().fold(self, Self::with_verifier)
    }

    /// Sets the largest webhook body accepted, in bytes; larger ones get 413.
    pub fn with_body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// Sets the readiness check of `GET /healthz`.
    pub fn with_health_check(mut self, check: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        self.health = Some(Arc::new(check));
        self
    }

    /// The sources that have a verifier, in name order.
    pub fn sources(&self) -> impl Iterator<Item = &str> {
        self.verifiers.keys().map(String::as_str)
    }

    /// The metrics served at `GET /metrics`.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// The verifiers whose secrets `provider` holds: GitHub when `github_webhook_secret` is set,
/// Slack (with `slack_replay_window`) when `slack_signing_secret` is set.
///
/// # Errors
/// When the provider fails (not when a secret is absent).
pub async fn verifiers_from_credentials(
    provider: &dyn CredentialProvider,
    slack_replay_window: Duration,
) -> Result<Vec<Arc<dyn WebhookVerifier>>> {
    let mut out: Vec<Arc<dyn WebhookVerifier>> = Vec::new();
    if let Some(secret) = provider.get_credential(GITHUB_WEBHOOK_SECRET_KEY).await? {
        out.push(Arc::new(GithubVerifier::new(secret)?));
    }
    if let Some(secret) = provider.get_credential(SLACK_SIGNING_SECRET_KEY).await? {
        out.push(Arc::new(SlackVerifier::new(secret)?.with_replay_window(slack_replay_window)));
    }
    Ok(out)
}

/// The server's routes: `POST /api/webhooks/{source}`, `GET /healthz`, `GET /metrics`.
pub fn router(state: ServerState) -> Router {
    let limit = state.body_limit;
    Router::new()
        .route(WEBHOOK_ROUTE, post(receive))
        .route("/healthz", get(healthz))
        .route("/metrics", get(render_metrics))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(Arc::new(state))
}

/// Serves [`router`] on `listener` until `shutdown` is cancelled, then finishes the requests
/// in flight and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ServerState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body.into()).into_response()
}

async fn receive(
    State(state): State<Arc<ServerState>>,
    Path(source): Path<String>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    let Some(verifier) = state.verifiers.get(&source) else {
        tracing::warn!(source = ?source, "webhook for an unknown source");
        state.metrics.record_webhook(UNKNOWN_SOURCE_LABEL, "unknown_source");
        return text(StatusCode::NOT_FOUND, "unknown webhook source\n");
    };
    let source = verifier.source();
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            let status = rejection.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                tracing::warn!(
                    source,
                    limit = state.body_limit,
                    "webhook rejected: body larger than the limit"
                );
                state.metrics.record_webhook(source, "too_large");
                return text(status, format!("body larger than {} bytes\n", state.body_limit));
            }
            tracing::warn!(source, error = %rejection, "webhook rejected: body could not be read");
            state.metrics.record_webhook(source, "bad_body");
            return text(status, "body could not be read\n");
        }
    };
    if let Err(rejection) = verifier.verify(&headers, &body, Utc::now()) {
        tracing::warn!(source, reason = %rejection, "webhook rejected");
        state.metrics.record_webhook(source, rejection.outcome());
        return text(rejection.status(), format!("{rejection}\n"));
    }
    if let Some(challenge) = verifier.challenge(&headers, &body) {
        state.metrics.record_webhook(source, "challenge");
        return text(StatusCode::OK, challenge);
    }
    let events = verifier.events(&headers, &body);
    if events.is_empty() {
        tracing::debug!(source, "webhook verified; no hints");
        state.metrics.record_webhook(source, "ignored");
        return text(StatusCode::OK, "ok\n");
    }
    let n = events.len();
    tracing::debug!(source, events = n, "webhook verified; delivering hints");
    state.sink.deliver(events).await;
    state.metrics.record_webhook(source, "accepted");
    (StatusCode::ACCEPTED, axum::Json(serde_json::json!({ "events": n }))).into_response()
}

async fn healthz(State(state): State<Arc<ServerState>>) -> Response {
    match &state.health {
        Some(check) if !check() => text(StatusCode::SERVICE_UNAVAILABLE, "not ready"),
        _ => text(StatusCode::OK, "ok"),
    }
}

async fn render_metrics(State(state): State<Arc<ServerState>>) -> Response {
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], state.metrics.render()).into_response()
}

/// Helpers of the verifiers: JSON navigation.
fn str_at<'a>(value: &'a serde_json::Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(value, |v, key| v.get(key))?.as_str()
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}
