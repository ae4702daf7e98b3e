//! The shared HTTP client layer of the SaaS connectors (feature `http`).
//!
//! One [`HttpClient`] per credential: it injects [`Auth`], applies timeouts, retries 429, 5xx
//! and network failures with exponential backoff and full jitter, honours `Retry-After` and
//! `X-RateLimit-Reset`, spaces requests with a rate limiter, supports conditional requests
//! (`ETag` / `If-None-Match`) and counts what it sends ([`HttpCounters`]). HTTP errors become
//! [`Error`]s in one place, [`error_for_status`], which connectors can refine with an
//! [`ErrorHook`].
//!
//! ```no_run
//! # async fn demo() -> connector_core::Result<()> {
//! use connector_core::http::{Auth, HttpClient, HttpConfig, Url};
//!
//! let client = HttpClient::builder()
//!     .config(HttpConfig { requests_per_second: Some(10.0), ..HttpConfig::default() })
//!     .auth(Auth::bearer("ghp_..."))
//!     .build()?;
//! let mut url = Some(Url::parse("https://api.github.com/repos/o/r/issues?per_page=100").unwrap());
//! while let Some(page_url) = url {
//!     let page = client.get_json_page::<Vec<serde_json::Value>>(page_url).await?;
//!     // ... turn page.value into documents ...
//!     url = page.next;
//! }
//! # Ok(()) }
//! ```

mod auth;
mod counters;
mod errors;
mod link;
mod response;
#[cfg(test)]
mod tests;

use std::fmt;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::Rng;
use reqwest::IntoUrl;
use reqwest::header::IF_NONE_MATCH;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::error::{Error, ErrorKind, Result, RetryClass};

pub use auth::Auth;
pub use counters::{HttpCounters, HttpStats};
pub use errors::{
    BODY_EXCERPT_CHARS, ErrorHook, body_excerpt, error_for_status, is_rate_limit_response, retry_delay,
};
pub use link::{find_link, next_link};
pub use reqwest;
pub use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
pub use reqwest::{Method, RequestBuilder, StatusCode, Url};
pub use response::{Conditional, JsonPage, Response};

/// Settings of an [`HttpClient`]. `Default` gives values fit for public SaaS APIs.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// Limit for one attempt, from connecting to the last byte of the body. Default 30 s.
    pub timeout: Duration,
    /// Limit for establishing a connection (TCP + TLS). Default 10 s.
    pub connect_timeout: Duration,
    /// Retries after the first attempt (so at most `max_retries + 1` requests). Default 5.
    pub max_retries: u32,
    /// Backoff before the first retry is drawn from `[0, base_delay]`; the bound doubles with
    /// each retry ("full jitter"). Default 500 ms.
    pub base_delay: Duration,
    /// Upper bound of the backoff bound. Default 60 s.
    pub max_delay: Duration,
    /// The longest wait asked by `Retry-After` or `X-RateLimit-Reset` that is honoured; a
    /// longer one returns the `RateLimited` error (with its delay) at once. Default 1 h:
    /// GitHub's primary limit resets hourly and a sync waits it out rather than fail.
    pub max_retry_wait: Duration,
    /// Requests per second allowed for this client (i.e. this credential), retries included,
    /// spaced evenly (no bursts). `None` (the default) sends as fast as the caller asks.
    pub requests_per_second: Option<f64>,
    /// The `User-Agent` header. Default `enterprise-connectors/<version>`.
    pub user_agent: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            max_retries: 5,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(60),
            max_retry_wait: Duration::from_secs(3600),
            requests_per_second: None,
            user_agent: format!("enterprise-connectors/{}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// The HTTP client every SaaS connector uses. Cloning is cheap and clones share everything:
/// connection pool, credential, rate limiter and counters.
///
/// # Behavior
/// - **Requests** are built with [`HttpClient::request`] / [`get`](HttpClient::get) /
///   [`post`](HttpClient::post) (a [`reqwest::RequestBuilder`]: add query, headers, JSON or
///   form bodies) and sent with [`send`](HttpClient::send). The request is kept and cloned
///   for every attempt, so the same method, URL, headers and body are re-sent on retry (a
///   streaming body cannot be cloned: such a request is sent once).
/// - **Auth**: the [`Auth`] header is added to every request that does not already carry that
///   header, marked sensitive. [`set_auth`](HttpClient::set_auth) swaps it (rotated OAuth2
///   tokens). `reqwest` drops `Authorization` on redirects to another host, but not a custom
///   [`Auth::Header`].
/// - **Success** is a 2xx or a 304, with the whole body read ([`Response`]).
/// - **Retried**, up to [`HttpConfig::max_retries`] times: 429; 500, 502, 503, 504 and other
///   5xx except 501/505; a 403 that is a rate limit (`X-RateLimit-Remaining: 0` or
///   `Retry-After`, as GitHub sends); connect errors, timeouts, and bodies cut short
///   (fewer bytes than `Content-Length`). Every other status fails at once: 401 and other 403
///   are `Auth`, 404/410 `NotFound`, other 4xx `Source` (see [`error_for_status`]). All
///   methods are retried, POST included: writers should send idempotency keys.
/// - **Waits**: `Retry-After` (seconds or HTTP-date), else `X-RateLimit-Reset` (epoch seconds)
///   when `X-RateLimit-Remaining` is 0, is waited out exactly, up to
///   [`HttpConfig::max_retry_wait`]; a longer wait fails at once with a `RateLimited` error
///   that carries the delay, for the scheduler to retry later. While a rate-limit wait is in
///   progress, the other requests of this client (and its clones) wait too instead of
///   spending quota. Without such headers the wait is exponential backoff with full jitter:
///   uniform in `[0, min(max_delay, base_delay * 2^(retry-1))]`.
/// - **Rate limit**: with [`HttpConfig::requests_per_second`], every attempt waits for a
///   slot of a limiter shared by the client's clones.
/// - **Errors**: after the last attempt, the last error is returned with its kind
///   (`RateLimited`, `Transient`) and `gave up after N attempts: ` before a message that names
///   the method, the URL path, the status and a body excerpt of at most
///   [`BODY_EXCERPT_CHARS`] characters. An [`ErrorHook`] refines errors from vendor bodies.
/// - **Never logged or formatted**: query strings (they may carry tokens), `Authorization`
///   and other auth headers, secrets. Errors from `reqwest` are stripped of their URL.
/// - **Tracing**: one `debug` event per attempt (method, path, status or error, elapsed,
///   attempt) and a `warn` event per retry with the wait.
/// - **Counters**: every attempt, retry, status class, transport error and body byte is
///   counted in [`HttpCounters`].
/// - **Cancellation**: dropping the future stops at once, waits included.
#[derive(Clone)]
pub struct HttpClient {
    inner: Arc<Inner>,
}

struct Inner {
    client: reqwest::Client,
    config: HttpConfig,
    auth: RwLock<Option<PreparedAuth>>,
    limiter: Option<DefaultDirectRateLimiter>,
    counters: HttpCounters,
    error_hook: Option<ErrorHook>,
    /// No request of this client is sent before this instant (a rate-limit wait).
    paused_until: Mutex<Option<Instant>>,
}

struct PreparedAuth {
    auth: Auth,
    name: HeaderName,
    value: HeaderValue,
}

impl PreparedAuth {
    fn new(auth: Auth) -> Result<Self> {
        let (name, value) = auth.to_header()?;
        Ok(Self { auth, name, value })
    }
}

/// Builds an [`HttpClient`]: [`HttpClient::builder`].
#[derive(Default)]
pub struct HttpClientBuilder {
    config: HttpConfig,
    auth: Option<Auth>,
    counters: Option<HttpCounters>,
    error_hook: Option<ErrorHook>,
}

impl HttpClientBuilder {
    /// Uses `config` (default: [`HttpConfig::default`]).
    pub fn config(mut self, config: HttpConfig) -> Self {
        self.config = config;
        self
    }

    /// Authenticates every request with `auth`.
    pub fn auth(mut self, auth: Auth) -> Self {
        self.auth = Some(auth);
        self
    }

    /// Counts into `counters` (shared with other clients of the same connector) instead of
    /// new ones.
    pub fn counters(mut self, counters: HttpCounters) -> Self {
        self.counters = Some(counters);
        self
    }

    /// Refines the errors of non-success responses: see [`ErrorHook`].
    pub fn error_hook(
        mut self,
        hook: impl Fn(StatusCode, &HeaderMap, &str) -> Option<Error> + Send + Sync + 'static,
    ) -> Self {
        self.error_hook = Some(Arc::new(hook));
        self
    }

    /// The client; a `Config` error when a setting or the credential is unusable.
    pub fn build(self) -> Result<HttpClient> {
        let c = &self.config;
        let limiter = match c.requests_per_second {
            None => None,
            Some(rps) => {
                let quota = (rps.is_finite() && rps > 0.0)
                    .then(|| Duration::try_from_secs_f64(1.0 / rps).ok())
                    .flatten()
                    .and_then(Quota::with_period)
                    .ok_or_else(|| {
                        Error::config(format!(
                            "http requests_per_second must be a positive number (at most 1e9), got {rps}"
                        ))
                    })?;
                Some(RateLimiter::direct(quota.allow_burst(NonZeroU32::MIN)))
            }
        };
        let user_agent = HeaderValue::from_str(&c.user_agent)
            .map_err(|_| Error::config(format!("invalid HTTP user agent {:?}", c.user_agent)))?;
        let client = reqwest::Client::builder()
            .timeout(c.timeout)
            .connect_timeout(c.connect_timeout)
            .user_agent(user_agent)
            .build()
            .map_err(|e| Error::config("cannot create the HTTP client").with_source(e.without_url()))?;
        let auth = self.auth.map(PreparedAuth::new).transpose()?;
        Ok(HttpClient {
            inner: Arc::new(Inner {
                client,
                config: self.config,
                auth: RwLock::new(auth),
                limiter,
                counters: self.counters.unwrap_or_default(),
                error_hook: self.error_hook,
                paused_until: Mutex::new(None),
            }),
        })
    }
}

impl fmt::Debug for HttpClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpClientBuilder")
            .field("config", &self.config)
            .field("auth", &self.auth)
            .field("error_hook", &self.error_hook.is_some())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let auth = self.inner.auth.read().unwrap_or_else(|p| p.into_inner());
        f.debug_struct("HttpClient")
            .field("config", &self.inner.config)
            .field("auth", &auth.as_ref().map(|a| &a.auth))
            .field("counters", &self.inner.counters)
            .field("error_hook", &self.inner.error_hook.is_some())
            .finish()
    }
}

/// Why an attempt failed, for logging and counting.
struct Failure {
    error: Error,
    status: Option<StatusCode>,
}

impl HttpClient {
    /// A client with `config` and no auth.
    pub fn new(config: HttpConfig) -> Result<Self> {
        HttpClientBuilder::default().config(config).build()
    }

    /// A builder, for auth, shared counters and an error hook.
    pub fn builder() -> HttpClientBuilder {
        HttpClientBuilder::default()
    }

    /// The client's settings.
    pub fn config(&self) -> &HttpConfig {
        &self.inner.config
    }

    /// The client's counters (shared by its clones).
    pub fn counters(&self) -> &HttpCounters {
        &self.inner.counters
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> HttpStats {
        self.inner.counters.snapshot()
    }

    /// Replaces the credential (e.g. after an OAuth2 refresh); `None` removes it. Requests
    /// already sent keep the old one; retries use the new one.
    pub fn set_auth(&self, auth: Option<Auth>) -> Result<()> {
        let prepared = auth.map(PreparedAuth::new).transpose()?;
        *self.inner.auth.write().unwrap_or_else(|p| p.into_inner()) = prepared;
        Ok(())
    }

    /// A request to `url`, to configure and pass to [`send`](Self::send). An invalid URL is
    /// reported by `send`.
    pub fn request(&self, method: Method, url: impl IntoUrl) -> RequestBuilder {
        self.inner.client.request(method, url)
    }

    /// A GET request; see [`request`](Self::request).
    pub fn get(&self, url: impl IntoUrl) -> RequestBuilder {
        self.request(Method::GET, url)
    }

    /// A POST request; see [`request`](Self::request).
    pub fn post(&self, url: impl IntoUrl) -> RequestBuilder {
        self.request(Method::POST, url)
    }

    /// Sends `request` with auth, rate limiting and retries (see [`HttpClient`]); `Ok` for a
    /// 2xx or 304 with the body read.
    pub async fn send(&self, request: RequestBuilder) -> Result<Response> {
        let request = request.build().map_err(|e| {
            Error::config("invalid HTTP request (bad URL or header)").with_source(e.without_url())
        })?;
        self.execute(request).await
    }

    /// [`send`](Self::send) for an already built request.
    pub async fn execute(&self, request: reqwest::Request) -> Result<Response> {
        let method = request.method().clone();
        let path = request.url().path().to_owned();
        let config = &self.inner.config;
        let mut pending = Some(request);
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let original = pending.take().expect("a request is pending");
            let mut request = match original.try_clone() {
                Some(copy) => {
                    pending = Some(original);
                    copy
                }
                None => original,
            };
            self.apply_auth(&mut request);
            self.wait_for_pause().await;
            if let Some(limiter) = &self.inner.limiter {
                limiter.until_ready().await;
            }
            self.inner.counters.record_request(attempt > 1);
            let started = Instant::now();
            let outcome = self.attempt(request, &method).await;
            let elapsed_ms = started.elapsed().as_millis() as u64;
            let failure = match outcome {
                Ok(response) => {
                    tracing::debug!(
                        method = %method,
                        path = %path,
                        status = response.status.as_u16(),
                        elapsed_ms,
                        attempt,
                        "http request"
                    );
                    return Ok(response);
                }
                Err(failure) => failure,
            };
            let error = failure.error;
            match failure.status {
                Some(status) => tracing::debug!(
                    method = %method,
                    path = %path,
                    status = status.as_u16(),
                    elapsed_ms,
                    attempt,
                    "http request"
                ),
                None => tracing::debug!(
                    method = %method,
                    path = %path,
                    error = %error,
                    elapsed_ms,
                    attempt,
                    "http request failed"
                ),
            }
            let wait = match error.retry_class() {
                RetryClass::Permanent => return Err(error),
                RetryClass::After(wait) if wait > config.max_retry_wait => {
                    return Err(error.context(format!(
                        "not retrying: the server asks to wait {}, more than max_retry_wait ({})",
                        errors::describe_wait(wait),
                        errors::describe_wait(config.max_retry_wait)
                    )));
                }
                RetryClass::After(wait) => wait,
                RetryClass::Backoff => self.backoff(attempt),
            };
            if attempt > config.max_retries || pending.is_none() {
                return Err(if attempt > 1 {
                    error.context(format!("gave up after {attempt} attempts"))
                } else {
                    error
                });
            }
            if error.kind() == ErrorKind::RateLimited && error.retry_after().is_some() {
                self.pause_until(Instant::now() + wait);
            }
            tracing::warn!(
                method = %method,
                path = %path,
                attempt,
                wait_ms = wait.as_millis() as u64,
                error = %error,
                "retrying http request"
            );
            tokio::time::sleep(wait).await;
        }
    }

    /// One attempt: send, read the whole body, map the status.
    async fn attempt(&self, request: reqwest::Request, method: &Method) -> Result<Response, Failure> {
        let url = request.url().clone();
        let counters = &self.inner.counters;
        let response = match self.inner.client.execute(request).await {
            Ok(r) => r,
            Err(e) => {
                counters.record_transport_error();
                return Err(Failure { error: transport_error(e, method, &url), status: None });
            }
        };
        let status = response.status();
        let headers = response.headers().clone();
        let final_url = response.url().clone();
        counters.record_status(status);
        let body: Result<Vec<u8>, reqwest::Error> = response.bytes().await.map(Vec::from);
        if let Ok(body) = &body {
            counters.record_bytes(body.len());
        }
        if status.is_success() || status == StatusCode::NOT_MODIFIED {
            return match body {
                Ok(body) => Ok(Response { method: method.clone(), status, headers, url: final_url, body }),
                Err(e) => {
                    counters.record_transport_error();
                    Err(Failure { error: transport_error(e, method, &url), status: None })
                }
            };
        }
        let body = body.unwrap_or_default();
        Err(Failure { error: self.status_error(method, &url, status, &headers, &body), status: Some(status) })
    }

    fn status_error(
        &self,
        method: &Method,
        url: &Url,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Error {
        if let Some(hook) = &self.inner.error_hook
            && let Some(error) = hook(status, headers, &String::from_utf8_lossy(body))
        {
            let error = error.context(format!("HTTP {} for {method} {}", status.as_u16(), url.path()));
            let retryable = matches!(error.kind(), ErrorKind::RateLimited | ErrorKind::Transient);
            return match retry_delay(headers, std::time::SystemTime::now()) {
                Some(delay) if retryable && error.retry_after().is_none() => error.with_retry_after(delay),
                _ => error,
            };
        }
        error_for_status(method, url, status, headers, &body_excerpt(body))
    }

    fn apply_auth(&self, request: &mut reqwest::Request) {
        let auth = self.inner.auth.read().unwrap_or_else(|p| p.into_inner());
        if let Some(auth) = auth.as_ref()
            && !request.headers().contains_key(&auth.name)
        {
            request.headers_mut().insert(auth.name.clone(), auth.value.clone());
        }
    }

    async fn wait_for_pause(&self) {
        let until = *self.inner.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(until) = until
            && until > Instant::now()
        {
            tokio::time::sleep_until(until).await;
        }
    }

    fn pause_until(&self, until: Instant) {
        let mut paused = self.inner.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        if paused.is_none_or(|current| current < until) {
            *paused = Some(until);
        }
    }

    /// Full jitter: uniform in `[0, min(max_delay, base_delay * 2^(retry - 1))]`.
    fn backoff(&self, retry: u32) -> Duration {
        let config = &self.inner.config;
        let factor = 1u32 << retry.saturating_sub(1).min(31);
        let bound = config.base_delay.saturating_mul(factor).min(config.max_delay);
        let nanos = u64::try_from(bound.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::rng().random_range(0..=nanos))
    }

    /// Sends `request` with `If-None-Match: <etag>` when an ETag is given.
    pub async fn send_conditional(&self, request: RequestBuilder, etag: Option<&str>) -> Result<Conditional> {
        let request = match etag {
            Some(etag) => {
                let value = HeaderValue::from_str(etag)
                    .map_err(|_| Error::config(format!("invalid ETag {etag:?}: not a valid header value")))?;
                request.header(IF_NONE_MATCH, value)
            }
            None => request,
        };
        let response = self.send(request).await?;
        if response.status() == StatusCode::NOT_MODIFIED {
            return Ok(Conditional::NotModified);
        }
        let etag = response.etag().map(str::to_owned);
        Ok(Conditional::Modified { etag, response })
    }

    /// A conditional GET: [`Conditional::NotModified`] on 304, else the response and its new
    /// `ETag`. A 304 does not count against most vendors' quotas (GitHub).
    pub async fn get_conditional(&self, url: impl IntoUrl, etag: Option<&str>) -> Result<Conditional> {
        self.send_conditional(self.get(url), etag).await
    }

    /// GETs `url` and parses the JSON body.
    pub async fn get_json<T: DeserializeOwned>(&self, url: impl IntoUrl) -> Result<T> {
        self.send_json(self.get(url).header(reqwest::header::ACCEPT, "application/json")).await
    }

    /// Sends `request` and parses the JSON body.
    pub async fn send_json<T: DeserializeOwned>(&self, request: RequestBuilder) -> Result<T> {
        self.send(request).await?.json()
    }

    /// GETs `url` and returns the parsed JSON body with the headers and the same-origin
    /// `rel="next"` link, for `Link`-paginated listings.
    pub async fn get_json_page<T: DeserializeOwned>(&self, url: impl IntoUrl) -> Result<JsonPage<T>> {
        self.send_json_page(self.get(url).header(reqwest::header::ACCEPT, "application/json")).await
    }

    /// Sends `request` and returns the parsed JSON body with headers and next link.
    pub async fn send_json_page<T: DeserializeOwned>(&self, request: RequestBuilder) -> Result<JsonPage<T>> {
        let response = self.send(request).await?;
        let value = response.json()?;
        let next = response.next_link();
        Ok(JsonPage { value, next, headers: response.headers })
    }
}

/// A transport failure as a `Transient` error (a failed redirect is `Source`), without the URL.
fn transport_error(e: reqwest::Error, method: &Method, url: &Url) -> Error {
    let e = e.without_url();
    let target = format!("{method} {}", url.path());
    if e.is_redirect() {
        return Error::source_error(format!("redirect failed for {target}")).with_source(e);
    }
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "response body incomplete"
    } else {
        "request failed"
    };
    Error::transient(format!("{what} for {target}")).with_source(e)
}
