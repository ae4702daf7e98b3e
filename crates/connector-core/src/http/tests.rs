//! Tests of the client against local fake servers on 127.0.0.1:0 (real sockets, real time).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap as AxHeaders, Response as AxResponse};
use axum::routing::{any, get};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

const TOKEN: &str = "ghp_TopSecretToken0123456789";

/// Settings with small delays so retry tests stay fast.
fn fast() -> HttpConfig {
    HttpConfig {
        timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        max_retries: 3,
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(50),
        max_retry_wait: Duration::from_secs(5),
        ..HttpConfig::default()
    }
}

fn client(config: HttpConfig) -> HttpClient {
    init_tracing();
    HttpClient::builder().config(config).auth(Auth::bearer(TOKEN)).build().unwrap()
}

async fn serve(router: Router) -> String {
    init_tracing();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}")
}

fn reply(status: u16, headers: &[(&str, String)], body: impl Into<String>) -> AxResponse<Body> {
    let mut b = AxResponse::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, v);
    }
    b.body(Body::from(body.into())).unwrap()
}

fn epoch_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Counts hits and records when they arrived.
#[derive(Clone, Default)]
struct Hits {
    count: Arc<AtomicUsize>,
    times: Arc<Mutex<Vec<(Instant, SystemTime)>>>,
    auth: Arc<Mutex<Vec<Option<String>>>>,
}

impl Hits {
    /// Records a hit; returns its number (1-based).
    fn hit(&self, headers: &AxHeaders) -> usize {
        self.times.lock().unwrap().push((Instant::now(), SystemTime::now()));
        let auth = headers.get("authorization").map(|v| v.to_str().unwrap().to_owned());
        self.auth.lock().unwrap().push(auth);
        self.count.fetch_add(1, Ordering::SeqCst) + 1
    }
    fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
    fn gap(&self, a: usize, b: usize) -> Duration {
        let t = self.times.lock().unwrap();
        t[b].0 - t[a].0
    }
}

/// A route whose `n`-th hit is answered by `f(n)`.
fn route(hits: &Hits, f: impl Fn(usize) -> AxResponse<Body> + Clone + Send + Sync + 'static) -> Router {
    let hits = hits.clone();
    Router::new().route(
        "/{*path}",
        any(move |headers: AxHeaders| {
            let hits = hits.clone();
            let f = f.clone();
            async move { f(hits.hit(&headers)) }
        }),
    )
}

#[tokio::test]
async fn http_429_with_retry_after_waits_then_succeeds() {
    let hits = Hits::default();
    let base = serve(route(&hits, |n| match n {
        1 => reply(429, &[("retry-after", "1".into())], "slow down"),
        _ => reply(200, &[("content-type", "application/json".into())], r#"{"ok":true}"#),
    }))
    .await;
    let c = client(fast());
    let started = Instant::now();
    let v: serde_json::Value = c.get_json(format!("{base}/items")).await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(v["ok"], true);
    assert_eq!(hits.count(), 2);
    assert!(hits.gap(0, 1) >= Duration::from_millis(990), "retried after {:?}", hits.gap(0, 1));
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    let s = c.stats();
    assert_eq!((s.requests, s.retries, s.status_429, s.status_2xx), (2, 1, 1, 1), "{s:?}");
    assert_eq!(s.bytes_received, ("slow down".len() + r#"{"ok":true}"#.len()) as u64);
    // The token was sent on both attempts.
    let expected = Some(format!("Bearer {TOKEN}"));
    assert_eq!(*hits.auth.lock().unwrap(), vec![expected.clone(), expected]);
}

#[tokio::test]
async fn http_503_twice_then_ok_and_post_body_is_resent() {
    let hits = Hits::default();
    let bodies = Arc::new(Mutex::new(Vec::<String>::new()));
    let (h, b) = (hits.clone(), bodies.clone());
    let router = Router::new().route(
        "/search",
        any(move |headers: AxHeaders, body: String| {
            let (h, b) = (h.clone(), b.clone());
            async move {
                b.lock().unwrap().push(body);
                match h.hit(&headers) {
                    1 | 2 => reply(503, &[], "<html>unavailable</html>"),
                    _ => reply(200, &[], r#"{"results":[1,2]}"#),
                }
            }
        }),
    );
    let base = serve(router).await;
    let c = client(fast());
    let request = c.post(format!("{base}/search")).json(&serde_json::json!({"query": "q"}));
    let v: serde_json::Value = c.send_json(request).await.unwrap();
    assert_eq!(v["results"][1], 2);
    assert_eq!(hits.count(), 3);
    assert_eq!(*bodies.lock().unwrap(), vec![r#"{"query":"q"}"#; 3]);
    let s = c.stats();
    assert_eq!((s.requests, s.retries, s.status_5xx, s.status_2xx), (3, 2, 2, 1), "{s:?}");
}

#[tokio::test]
async fn http_500_forever_gives_up_with_transient_error() {
    let hits = Hits::default();
    let base = serve(route(&hits, |_| reply(500, &[], format!("internal {}", "x".repeat(1000))))).await;
    let c = client(HttpConfig { max_retries: 2, ..fast() });
    let err = c.get_json::<serde_json::Value>(format!("{base}/repos/o/r?page=2")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transient);
    assert_eq!(hits.count(), 3);
    let text = err.to_string();
    assert!(
        text.starts_with(
            "gave up after 3 attempts: server error (HTTP 500) for GET /repos/o/r: internal xxx"
        ),
        "{text}"
    );
    assert!(text.ends_with('…') && text.len() < 400, "{text}");
    assert!(!text.contains("page=2"), "{text}");
    let s = c.stats();
    assert_eq!((s.requests, s.retries, s.status_5xx), (3, 2, 3));
}

#[tokio::test]
async fn http_401_is_auth_error_without_retry() {
    let hits = Hits::default();
    let base = serve(route(&hits, |_| reply(401, &[], r#"{"message":"Bad credentials"}"#))).await;
    let c = client(fast());
    let err = c.get_json::<serde_json::Value>(format!("{base}/user")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth);
    assert_eq!(
        err.to_string(),
        r#"authentication failed (HTTP 401) for GET /user: {"message":"Bad credentials"}"#
    );
    assert_eq!(hits.count(), 1);
    assert_eq!(c.stats().requests, 1);
    assert!(!format!("{err:?} {err}").contains(TOKEN));
}

#[tokio::test]
async fn http_403_with_exhausted_rate_limit_waits_for_reset() {
    let hits = Hits::default();
    let reset = Arc::new(Mutex::new(0u64));
    let r = reset.clone();
    let base = serve(route(&hits, move |n| match n {
        1 => {
            let at = epoch_secs() + 1;
            *r.lock().unwrap() = at;
            reply(
                403,
                &[("x-ratelimit-remaining", "0".into()), ("x-ratelimit-reset", at.to_string())],
                r#"{"message":"API rate limit exceeded"}"#,
            )
        }
        _ => reply(200, &[], "[]"),
    }))
    .await;
    let c = client(fast());
    let v: Vec<u32> = c.get_json(format!("{base}/repos/o/r/issues")).await.unwrap();
    assert!(v.is_empty());
    assert_eq!(hits.count(), 2);
    let second = hits.times.lock().unwrap()[1].1;
    let reset_at = UNIX_EPOCH + Duration::from_secs(*reset.lock().unwrap());
    assert!(second >= reset_at, "retried before the reset time");
    assert_eq!(c.stats().retries, 1);
}

#[tokio::test]
async fn http_403_without_rate_limit_is_auth_and_404_is_not_found() {
    let hits = Hits::default();
    let base = serve(route(&hits, |n| match n {
        1 => reply(
            403,
            &[("x-ratelimit-remaining", "4999".into())],
            r#"{"message":"Resource not accessible by integration"}"#,
        ),
        _ => reply(404, &[], r#"{"message":"Not Found"}"#),
    }))
    .await;
    let c = client(fast());
    let err = c.get_json::<serde_json::Value>(format!("{base}/orgs/o")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    assert!(err.to_string().starts_with("permission denied (HTTP 403) for GET /orgs/o: "), "{err}");
    assert_eq!(hits.count(), 1);
    let err = c.get_json::<serde_json::Value>(format!("{base}/repos/o/missing")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert_eq!(err.to_string(), r#"not found (HTTP 404) for GET /repos/o/missing: {"message":"Not Found"}"#);
    assert_eq!(hits.count(), 2);
    let s = c.stats();
    assert_eq!((s.requests, s.retries, s.status_4xx), (2, 0, 2));
}

#[tokio::test]
async fn timeouts_are_retried_then_transient() {
    let hits = Hits::default();
    let h = hits.clone();
    let router = Router::new().route(
        "/slow",
        get(move |headers: AxHeaders| {
            let h = h.clone();
            async move {
                h.hit(&headers);
                tokio::time::sleep(Duration::from_secs(5)).await;
                "late"
            }
        }),
    );
    let base = serve(router).await;
    let c = client(HttpConfig { timeout: Duration::from_millis(200), max_retries: 2, ..fast() });
    let started = Instant::now();
    let err = c.send(c.get(format!("{base}/slow?access_token=qs-secret"))).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transient, "{err}");
    assert_eq!(hits.count(), 3);
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    let text = format!("{err} {err:?}");
    assert!(text.starts_with("gave up after 3 attempts: timed out for GET /slow"), "{text}");
    assert!(!text.contains("qs-secret") && !text.contains("access_token"), "{text}");
    let s = c.stats();
    assert_eq!((s.requests, s.retries, s.transport_errors), (3, 2, 3));
}

/// A raw HTTP/1.1 server: the first connection gets a body shorter than its Content-Length.
async fn truncating_server() -> (String, Arc<AtomicUsize>) {
    init_tracing();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => request.extend_from_slice(&buf[..k]),
                    }
                }
                let response: &[u8] = if n == 1 {
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"items\":[1,"
                } else {
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\nconnection: close\r\n\r\n{\"items\":[1,2]}"
                };
                let _ = socket.write_all(response).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    (format!("http://{addr}"), connections)
}

#[tokio::test]
async fn truncated_body_is_retried() {
    let (base, connections) = truncating_server().await;
    let c = client(fast());
    let v: serde_json::Value = c.get_json(format!("{base}/items")).await.unwrap();
    assert_eq!(v["items"][1], 2);
    assert_eq!(connections.load(Ordering::SeqCst), 2);
    let s = c.stats();
    assert_eq!((s.requests, s.retries, s.transport_errors, s.status_2xx), (2, 1, 1, 2), "{s:?}");

    // Without retries the truncation is a Transient error.
    let (base, _) = truncating_server().await;
    let c = client(HttpConfig { max_retries: 0, ..fast() });
    let err = c.get_json::<serde_json::Value>(format!("{base}/items")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transient);
    assert!(err.to_string().starts_with("response body incomplete for GET /items"), "{err}");
}

#[tokio::test]
async fn etag_and_if_none_match_give_not_modified() {
    let hits = Hits::default();
    let h = hits.clone();
    let router = Router::new().route(
        "/doc",
        get(move |headers: AxHeaders| {
            let h = h.clone();
            async move {
                h.hit(&headers);
                match headers.get("if-none-match").map(|v| v.to_str().unwrap().to_owned()) {
                    Some(tag) if tag == "\"v1\"" => reply(304, &[("etag", "\"v1\"".into())], ""),
                    _ => reply(200, &[("etag", "\"v1\"".into())], "content v1"),
                }
            }
        }),
    );
    let base = serve(router).await;
    let c = client(fast());
    let first = c.get_conditional(format!("{base}/doc"), None).await.unwrap();
    let Conditional::Modified { etag, response } = first else { panic!("{first:?}") };
    assert_eq!(etag.as_deref(), Some("\"v1\""));
    assert_eq!(response.text(), "content v1");
    let second = c.get_conditional(format!("{base}/doc"), etag.as_deref()).await.unwrap();
    assert!(matches!(second, Conditional::NotModified), "{second:?}");
    let third = c.get_conditional(format!("{base}/doc"), Some("\"v0\"")).await.unwrap();
    assert!(matches!(third, Conditional::Modified { .. }), "{third:?}");
    let s = c.stats();
    assert_eq!((s.requests, s.status_2xx, s.status_304), (3, 2, 1));
}

#[tokio::test]
async fn rate_limiter_spaces_requests() {
    let hits = Hits::default();
    let base = serve(route(&hits, |_| reply(200, &[], "{}"))).await;
    let c = client(HttpConfig { requests_per_second: Some(20.0), ..fast() });
    let started = Instant::now();
    let requests = (0..10).map(|i| c.get_json::<serde_json::Value>(format!("{base}/r/{i}")));
    for r in futures::future::join_all(requests).await {
        r.unwrap();
    }
    let elapsed = started.elapsed();
    assert_eq!(hits.count(), 10);
    // 10 requests at 20/s without burst: 9 gaps of 50 ms.
    assert!(elapsed >= Duration::from_millis(440), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");

    // Clones share the limiter.
    let clone = c.clone();
    let started = Instant::now();
    let (a, b) = tokio::join!(
        c.get_json::<serde_json::Value>(format!("{base}/a")),
        clone.get_json::<serde_json::Value>(format!("{base}/b"))
    );
    a.unwrap();
    b.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(40), "{:?}", started.elapsed());
    assert_eq!(c.stats().requests, 12);

    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let err = HttpClient::new(HttpConfig { requests_per_second: Some(bad), ..fast() }).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
    }
}

#[tokio::test]
async fn rate_limit_wait_too_long_fails_at_once() {
    let hits = Hits::default();
    let base =
        serve(route(&hits, |_| reply(429, &[("retry-after", "3600".into())], "quota exhausted"))).await;
    let c = client(HttpConfig { max_retry_wait: Duration::from_secs(1), ..fast() });
    let started = Instant::now();
    let err = c.send(c.get(format!("{base}/x"))).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(hits.count(), 1);
    assert_eq!(err.kind(), ErrorKind::RateLimited);
    assert_eq!(err.retry_after(), Some(Duration::from_secs(3600)));
    assert_eq!(
        err.to_string(),
        "not retrying: the server asks to wait 3600s, more than max_retry_wait (1s): \
         rate limited (HTTP 429) for GET /x, retry in 3600s: quota exhausted"
    );
}

#[tokio::test]
async fn rate_limit_wait_pauses_the_other_requests() {
    let hits = Hits::default();
    let base = serve(route(&hits, |n| match n {
        1 => reply(429, &[("retry-after", "1".into())], ""),
        _ => reply(200, &[], "{}"),
    }))
    .await;
    let c = client(fast());
    let other = c.clone();
    let first = tokio::spawn({
        let c = c.clone();
        let url = format!("{base}/limited");
        async move { c.get_json::<serde_json::Value>(url).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    other.get_json::<serde_json::Value>(format!("{base}/other")).await.unwrap();
    first.await.unwrap().unwrap();
    assert_eq!(hits.count(), 3);
    // The second request waited for the first one's Retry-After instead of being sent at 200 ms.
    assert!(hits.gap(0, 1) >= Duration::from_millis(950), "{:?}", hits.gap(0, 1));
}

#[tokio::test]
async fn error_hook_refines_and_can_make_errors_retryable() {
    let hits = Hits::default();
    let base = serve(route(&hits, |n| match n {
        1 => reply(409, &[], r#"{"code":"conflict_error","message":"Conflict occurred"}"#),
        2 => reply(200, &[], "{}"),
        _ => reply(400, &[], r#"{"code":"validation_error","message":"body.filter is invalid"}"#),
    }))
    .await;
    let c = HttpClient::builder()
        .config(fast())
        .error_hook(|status, _headers, body| {
            let v: serde_json::Value = serde_json::from_str(body).ok()?;
            let message = v["message"].as_str()?.to_owned();
            match (status.as_u16(), v["code"].as_str()?) {
                (409, "conflict_error") => Some(Error::transient(message)),
                (400, code) => Some(Error::config(format!("{code}: {message}"))),
                _ => None,
            }
        })
        .build()
        .unwrap();
    c.get_json::<serde_json::Value>(format!("{base}/pages")).await.unwrap();
    assert_eq!(hits.count(), 2);
    let err = c.send(c.post(format!("{base}/databases/q"))).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert_eq!(err.to_string(), "HTTP 400 for POST /databases/q: validation_error: body.filter is invalid");
    assert_eq!(hits.count(), 3);
}

#[tokio::test]
async fn basic_and_header_auth_are_injected_and_request_headers_win() {
    let seen = Arc::new(Mutex::new(Vec::<(Option<String>, Option<String>)>::new()));
    let s = seen.clone();
    let router = Router::new().route(
        "/who",
        get(move |headers: AxHeaders| {
            let s = s.clone();
            async move {
                let get = |n: &str| headers.get(n).map(|v| v.to_str().unwrap().to_owned());
                s.lock().unwrap().push((get("authorization"), get("x-api-key")));
                let ua = get("user-agent").unwrap_or_default();
                reply(200, &[], ua)
            }
        }),
    );
    let base = serve(router).await;
    let url = format!("{base}/who");
    let basic = HttpClient::builder().auth(Auth::basic("me@example.com", "tok")).build().unwrap();
    let ua = basic.send(basic.get(&url)).await.unwrap();
    assert_eq!(ua.text(), format!("enterprise-connectors/{}", env!("CARGO_PKG_VERSION")));
    let key = HttpClient::builder().auth(Auth::header("x-api-key", "k-1").unwrap()).build().unwrap();
    key.send(key.get(&url)).await.unwrap();
    // A per-request Authorization header is kept; set_auth swaps the credential.
    let bearer = client(fast());
    bearer.send(bearer.get(&url).bearer_auth("per-request")).await.unwrap();
    bearer.set_auth(Some(Auth::bearer("rotated"))).unwrap();
    bearer.send(bearer.get(&url)).await.unwrap();
    bearer.set_auth(None).unwrap();
    bearer.send(bearer.get(&url)).await.unwrap();
    let s = |v: &str| Some(v.to_owned());
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            (s("Basic bWVAZXhhbXBsZS5jb206dG9r"), None),
            (None, s("k-1")),
            (s("Bearer per-request"), None),
            (s("Bearer rotated"), None),
            (None, None),
        ]
    );
}

#[tokio::test]
async fn json_pages_follow_same_origin_link_headers() {
    let hits = Hits::default();
    let h = hits.clone();
    let router = Router::new().route(
        "/issues",
        get(move |headers: AxHeaders, axum::extract::Query(q): axum::extract::Query<Vec<(String, String)>>| {
            let h = h.clone();
            async move {
                h.hit(&headers);
                let host = headers.get("host").unwrap().to_str().unwrap().to_owned();
                let page: u32 = q.iter().find(|(k, _)| k == "page").map_or(1, |(_, v)| v.parse().unwrap());
                let link = match page {
                    1 => format!(r#"<http://{host}/issues?page=2>; rel="next", <http://{host}/issues?page=3>; rel="last""#),
                    2 => format!(r#"</issues?page=3>; rel="next", <http://{host}/issues?page=1>; rel="prev""#),
                    _ => r#"<http://evil.test/issues?page=4>; rel="next""#.to_owned(),
                };
                reply(200, &[("link", link)], format!("[{page}]"))
            }
        }),
    );
    let base = serve(router).await;
    let c = client(fast());
    let mut url: Option<Url> = Some(format!("{base}/issues").parse().unwrap());
    let mut seen = Vec::new();
    while let Some(u) = url {
        let page: JsonPage<Vec<u32>> = c.get_json_page(u).await.unwrap();
        assert!(page.headers.contains_key("link"));
        seen.extend(page.value);
        url = page.next;
    }
    // Page 2's relative link is resolved; page 3's cross-origin link is not followed.
    assert_eq!(seen, vec![1, 2, 3]);
    assert_eq!(hits.count(), 3);

    // Invalid JSON is a Source error naming the path.
    let err = c.get_json::<Vec<String>>(format!("{base}/issues?page=9")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Source);
    assert!(err.to_string().starts_with("invalid JSON in the response to GET /issues (HTTP 200)"), "{err}");
}

#[tokio::test]
async fn connection_refused_is_retried_and_hides_the_query() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let c = client(HttpConfig { max_retries: 2, ..fast() });
    let err = c
        .get_json::<serde_json::Value>(format!(
            "http://127.0.0.1:{port}/api/v1/items?access_token=qs-secret-1"
        ))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transient);
    let text = format!("{err} {err:?}");
    assert!(text.starts_with("gave up after 3 attempts: connection failed for GET /api/v1/items"), "{text}");
    assert!(!text.contains("qs-secret") && !text.contains("access_token"), "{text}");
    let s = c.stats();
    assert_eq!((s.requests, s.retries, s.transport_errors), (3, 2, 3));

    // An invalid URL is a config error.
    let err = c.send(c.get("not a url")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
}

/// Captures this crate's events into the sink of the thread that emits them.
///
/// Installed once as the global default, before any test sends a request: with a scoped
/// (`set_default`) subscriber, a callsite first hit by another test thread at the moment the
/// scoped subscriber registers can cache `Interest::never` and its events are lost.
struct Capture;

thread_local! {
    static SINK: std::cell::RefCell<Option<Arc<Mutex<Vec<String>>>>> = const { std::cell::RefCell::new(None) };
}

fn init_tracing() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        // Another test may have installed a global subscriber first; the log test then fails
        // loudly instead of passing silently.
        let _ = tracing::subscriber::set_global_default(Capture);
    });
}

/// Collects the events emitted on this thread until the guard is dropped.
fn capture_events() -> (Arc<Mutex<Vec<String>>>, impl Drop) {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            SINK.with(|s| *s.borrow_mut() = None);
        }
    }
    init_tracing();
    let lines = Arc::new(Mutex::new(Vec::new()));
    SINK.with(|s| *s.borrow_mut() = Some(lines.clone()));
    (lines, Reset)
}

struct Fields<'a>(&'a mut String);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, "{}={:?} ", field.name(), value);
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        metadata.target().starts_with("connector_core")
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let Some(sink) = SINK.with(|s| s.borrow().clone()) else { return };
        let mut line = format!("{} ", event.metadata().level());
        event.record(&mut Fields(&mut line));
        sink.lock().unwrap().push(line);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test]
async fn secrets_and_queries_never_reach_debug_errors_or_logs() {
    let (lines, _guard) = capture_events();

    let hits = Hits::default();
    let base = serve(route(&hits, |n| match n {
        1 => reply(502, &[], "bad gateway"),
        2 => reply(200, &[], "{}"),
        _ => reply(401, &[], "token expired"),
    }))
    .await;
    let c = client(fast());
    assert!(!format!("{c:?}").contains(TOKEN), "{c:?}");
    assert!(format!("{c:?}").contains("Bearer(<redacted>)"), "{c:?}");
    let ok = c.send(c.get(format!("{base}/repos/o/r?access_token=qs-secret-2"))).await.unwrap();
    assert!(!format!("{ok:?}").contains("qs-secret"), "{ok:?}");
    let err = c.send(c.get(format!("{base}/user?access_token=qs-secret-2"))).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth);
    let err_text = format!("{err} {err:?}");
    assert!(!err_text.contains(TOKEN) && !err_text.contains("qs-secret"), "{err_text}");
    assert_eq!(hits.auth.lock().unwrap()[0].as_deref(), Some(format!("Bearer {TOKEN}").as_str()));

    let lines = lines.lock().unwrap().clone();
    let all = lines.join("\n");
    // One debug event per attempt and one warning per retry.
    assert_eq!(lines.iter().filter(|l| l.starts_with("DEBUG")).count(), 3, "{all}");
    assert_eq!(lines.iter().filter(|l| l.starts_with("WARN")).count(), 1, "{all}");
    assert!(
        all.contains("path=/repos/o/r") && all.contains("status=502") && all.contains("attempt=2"),
        "{all}"
    );
    assert!(all.contains("wait_ms="), "{all}");
    for forbidden in [TOKEN, "qs-secret", "access_token", "Bearer", "authorization"] {
        assert!(!all.contains(forbidden), "{forbidden} in logs: {all}");
    }
}

#[test]
fn backoff_is_full_jitter_under_an_exponential_cap() {
    let c = HttpClient::new(HttpConfig {
        base_delay: Duration::from_millis(100),
        max_delay: Duration::from_millis(1000),
        ..HttpConfig::default()
    })
    .unwrap();
    for (retry, cap) in [(1, 100), (2, 200), (3, 400), (4, 800), (5, 1000), (40, 1000)] {
        let samples: Vec<Duration> = (0..200).map(|_| c.backoff(retry)).collect();
        let max = samples.iter().max().unwrap();
        let min = samples.iter().min().unwrap();
        assert!(*max <= Duration::from_millis(cap), "retry {retry}: {max:?}");
        // Jittered over the whole range, not a fixed delay.
        assert!(*max > Duration::from_millis(cap / 2), "retry {retry}: {max:?}");
        assert!(*min < Duration::from_millis(cap / 2), "retry {retry}: {min:?}");
    }
}

#[test]
fn config_defaults() {
    let c = HttpConfig::default();
    assert_eq!(c.timeout, Duration::from_secs(30));
    assert_eq!(c.connect_timeout, Duration::from_secs(10));
    assert_eq!(c.max_retries, 5);
    assert_eq!(c.base_delay, Duration::from_millis(500));
    assert_eq!(c.max_delay, Duration::from_secs(60));
    assert_eq!(c.max_retry_wait, Duration::from_secs(3600));
    assert_eq!(c.requests_per_second, None);
    assert!(c.user_agent.starts_with("enterprise-connectors/"));
}
