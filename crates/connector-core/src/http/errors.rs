//! Mapping HTTP error responses to [`Error`]s, in one place.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};

use crate::error::Error;

/// How many characters of a response body error messages quote.
pub const BODY_EXCERPT_CHARS: usize = 300;

/// A connector's hook that refines the error for a non-success response from the vendor's
/// error body (GitHub's `{"message": ...}`, Slack's `error` codes, ...).
///
/// Called with the status, the response headers and the whole body (lossy UTF-8). Returning
/// `None` keeps the default mapping of [`error_for_status`]. The returned error's kind decides
/// retries (RateLimited and Transient are retried); the client prefixes its message with
/// `HTTP <status> for <METHOD> <path>` and, when the error has no retry delay of its own,
/// adds the one from `Retry-After` / `X-RateLimit-Reset`.
pub type ErrorHook = Arc<dyn Fn(StatusCode, &HeaderMap, &str) -> Option<Error> + Send + Sync>;

/// The error for a response with a non-success `status`: the one place HTTP statuses become
/// [`Error`] kinds.
///
/// | status | kind | retried by [`HttpClient`](super::HttpClient) |
/// |---|---|---|
/// | 401 | `Auth` | no |
/// | 403 with `X-RateLimit-Remaining: 0` or `Retry-After` | `RateLimited` (+ delay) | yes |
/// | 403 otherwise | `Auth` | no |
/// | 404, 410 | `NotFound` | no |
/// | 429 | `RateLimited` (+ delay when known) | yes |
/// | 501, 505 | `Source` (the server will never support the request) | no |
/// | other 5xx | `Transient` (+ delay from `Retry-After`) | yes |
/// | other 4xx, 1xx, 3xx | `Source` | no |
///
/// The message names the method, the URL *path* (never the query string, which may carry
/// tokens), the status and `body_excerpt`: `authentication failed (HTTP 401) for GET /user:
/// Bad credentials`. The delay comes from [`retry_delay`].
pub fn error_for_status(
    method: &Method,
    url: &Url,
    status: StatusCode,
    headers: &HeaderMap,
    body_excerpt: &str,
) -> Error {
    let target = format!("{method} {}", url.path());
    let code = status.as_u16();
    let tail = if body_excerpt.is_empty() { String::new() } else { format!(": {body_excerpt}") };
    let delay = retry_delay(headers, SystemTime::now());
    let wait = delay.map(|d| format!(", retry in {}", describe_wait(d))).unwrap_or_default();
    match code {
        401 => Error::auth(format!("authentication failed (HTTP 401) for {target}{tail}")),
        403 if is_rate_limit_response(headers) => {
            Error::rate_limited(format!("rate limit exceeded (HTTP 403) for {target}{wait}{tail}"), delay)
        }
        403 => Error::auth(format!("permission denied (HTTP 403) for {target}{tail}")),
        404 | 410 => Error::not_found(format!("not found (HTTP {code}) for {target}{tail}")),
        429 => Error::rate_limited(format!("rate limited (HTTP 429) for {target}{wait}{tail}"), delay),
        501 | 505 => Error::source_error(format!(
            "request not supported by the server (HTTP {code}) for {target}{tail}"
        )),
        500..=599 => {
            let e = Error::transient(format!("server error (HTTP {code}) for {target}{wait}{tail}"));
            match delay {
                Some(d) => e.with_retry_after(d),
                None => e,
            }
        }
        400..=499 => Error::source_error(format!("request rejected (HTTP {code}) for {target}{tail}")),
        _ => Error::source_error(format!("unexpected response (HTTP {code}) for {target}{tail}")),
    }
}

/// Whether a 403 is a rate limit rather than a permission error: GitHub answers 403 with
/// `X-RateLimit-Remaining: 0` when the primary limit is exhausted, and 403 with `Retry-After`
/// for its secondary limits.
pub fn is_rate_limit_response(headers: &HeaderMap) -> bool {
    rate_limit_exhausted(headers) || headers.contains_key(RETRY_AFTER)
}

fn rate_limit_exhausted(headers: &HeaderMap) -> bool {
    header_str(headers, "x-ratelimit-remaining").is_some_and(|v| v.trim() == "0")
}

/// How long the server asked us to wait, as of `now`.
///
/// - `Retry-After`: delay-seconds (`120`, fractions accepted) or an HTTP-date.
/// - Otherwise, when `X-RateLimit-Remaining` is `0`: `X-RateLimit-Reset`, in epoch seconds (a
///   value below 1 000 000 000 is taken as seconds from now, as some vendors send a delta).
///
/// A time already past gives `Duration::ZERO`; no usable header gives `None`.
pub fn retry_delay(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if let Some(value) = header_str(headers, RETRY_AFTER.as_str()) {
        let value = value.trim();
        if let Ok(secs) = value.parse::<f64>() {
            if secs.is_finite() && secs >= 0.0 {
                return Some(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX));
            }
        } else if let Ok(at) = httpdate::parse_http_date(value) {
            return Some(at.duration_since(now).unwrap_or(Duration::ZERO));
        }
    }
    if rate_limit_exhausted(headers) {
        let reset = header_str(headers, "x-ratelimit-reset")?.trim().parse::<f64>().ok()?;
        if !reset.is_finite() || reset < 0.0 {
            return None;
        }
        if reset < 1_000_000_000.0 {
            return Some(Duration::from_secs_f64(reset));
        }
        let at = UNIX_EPOCH.checked_add(Duration::try_from_secs_f64(reset).ok()?)?;
        return Some(at.duration_since(now).unwrap_or(Duration::ZERO));
    }
    None
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// A short single-line excerpt of a response body for error messages: lossy UTF-8, control
/// characters and whitespace runs collapsed to one space, at most [`BODY_EXCERPT_CHARS`]
/// characters (then `…`).
pub fn body_excerpt(body: &[u8]) -> String {
    // Only look at a prefix: a 1 MiB HTML error page needs no full decode.
    let prefix = &body[..body.len().min(BODY_EXCERPT_CHARS * 4 + 4)];
    let text = String::from_utf8_lossy(prefix);
    let mut out = String::new();
    let mut chars = 0;
    let mut pending_space = false;
    let mut truncated = prefix.len() < body.len();
    for c in text.chars() {
        if c.is_whitespace() || c.is_control() {
            pending_space = !out.is_empty();
            continue;
        }
        if chars + usize::from(pending_space) >= BODY_EXCERPT_CHARS {
            truncated = true;
            break;
        }
        if pending_space {
            out.push(' ');
            chars += 1;
            pending_space = false;
        }
        out.push(c);
        chars += 1;
    }
    if truncated {
        out.push('…');
    }
    out
}

/// `1.5s`, `250ms`, `3600s`.
pub(crate) fn describe_wait(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{ErrorKind, RetryClass};
    use reqwest::header::HeaderValue;

    type Pairs<'a> = Vec<(&'static str, &'a str)>;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn status_mapping_table() {
        let url = Url::parse("https://api.example.com/repos/o/r/issues?access_token=sekrit&page=2").unwrap();
        let in_an_hour = (SystemTime::now() + Duration::from_secs(3600))
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            .to_string();
        let gh_limit = [("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", in_an_hour.as_str())];
        // (status, headers, expected kind, retried, expected message)
        let table: Vec<(u16, Pairs, ErrorKind, bool, &str)> = vec![
            (
                401,
                vec![],
                ErrorKind::Auth,
                false,
                "authentication failed (HTTP 401) for GET /repos/o/r/issues: Bad credentials",
            ),
            (403, vec![], ErrorKind::Auth, false, "permission denied (HTTP 403) for GET /repos/o/r/issues"),
            (
                403,
                vec![("x-ratelimit-remaining", "12")],
                ErrorKind::Auth,
                false,
                "permission denied (HTTP 403)",
            ),
            (403, gh_limit.to_vec(), ErrorKind::RateLimited, true, "rate limit exceeded (HTTP 403)"),
            (403, vec![("retry-after", "60")], ErrorKind::RateLimited, true, ", retry in 60s"),
            (404, vec![], ErrorKind::NotFound, false, "not found (HTTP 404) for GET /repos/o/r/issues"),
            (410, vec![], ErrorKind::NotFound, false, "not found (HTTP 410)"),
            (429, vec![("retry-after", "1")], ErrorKind::RateLimited, true, "rate limited (HTTP 429)"),
            (
                429,
                vec![],
                ErrorKind::RateLimited,
                true,
                "rate limited (HTTP 429) for GET /repos/o/r/issues: ",
            ),
            (500, vec![], ErrorKind::Transient, true, "server error (HTTP 500) for GET /repos/o/r/issues"),
            (502, vec![], ErrorKind::Transient, true, "server error (HTTP 502)"),
            (503, vec![("retry-after", "2")], ErrorKind::Transient, true, "server error (HTTP 503)"),
            (504, vec![], ErrorKind::Transient, true, "server error (HTTP 504)"),
            (501, vec![], ErrorKind::Source, false, "not supported by the server (HTTP 501)"),
            (400, vec![], ErrorKind::Source, false, "request rejected (HTTP 400) for GET /repos/o/r/issues"),
            (409, vec![], ErrorKind::Source, false, "request rejected (HTTP 409)"),
            (422, vec![], ErrorKind::Source, false, "request rejected (HTTP 422)"),
            (302, vec![], ErrorKind::Source, false, "unexpected response (HTTP 302)"),
        ];
        for (code, hs, kind, retried, message) in table {
            let status = StatusCode::from_u16(code).unwrap();
            let h = headers(&hs);
            let err = error_for_status(&Method::GET, &url, status, &h, "Bad credentials");
            assert_eq!(err.kind(), kind, "{code} {hs:?}: {err}");
            assert_eq!(err.is_retryable(), retried, "{code} {hs:?}: {err}");
            let text = err.to_string();
            assert!(text.contains(message), "{code} {hs:?}: {text:?} lacks {message:?}");
            assert!(text.ends_with(": Bad credentials"), "{text}");
            assert!(!text.contains("sekrit") && !text.contains("access_token"), "{text}");
        }

        // Delays travel in the error.
        let e = error_for_status(
            &Method::GET,
            &url,
            StatusCode::TOO_MANY_REQUESTS,
            &headers(&[("retry-after", "1")]),
            "",
        );
        assert_eq!(e.retry_class(), RetryClass::After(Duration::from_secs(1)));
        assert_eq!(e.to_string(), "rate limited (HTTP 429) for GET /repos/o/r/issues, retry in 1s");
        let e = error_for_status(
            &Method::GET,
            &url,
            StatusCode::SERVICE_UNAVAILABLE,
            &headers(&[("retry-after", "2")]),
            "",
        );
        assert_eq!(e.retry_class(), RetryClass::After(Duration::from_secs(2)));
        let e = error_for_status(&Method::GET, &url, StatusCode::FORBIDDEN, &headers(&gh_limit), "");
        let RetryClass::After(d) = e.retry_class() else { panic!("{e:?}") };
        assert!(d > Duration::from_secs(3590) && d <= Duration::from_secs(3600), "{d:?}");
        let e = error_for_status(&Method::POST, &url, StatusCode::TOO_MANY_REQUESTS, &HeaderMap::new(), "");
        assert_eq!(e.retry_class(), RetryClass::Backoff);
        assert_eq!(e.to_string(), "rate limited (HTTP 429) for POST /repos/o/r/issues");
    }

    #[test]
    fn retry_delay_parsing() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let cases: Vec<(Pairs, Option<Duration>)> = vec![
            (vec![("retry-after", "1")], Some(Duration::from_secs(1))),
            (vec![("retry-after", " 120 ")], Some(Duration::from_secs(120))),
            (vec![("retry-after", "0.5")], Some(Duration::from_millis(500))),
            (vec![("retry-after", "-3")], None),
            (vec![("retry-after", "soon")], None),
            // 1_700_000_000 is Tue, 14 Nov 2023 22:13:20 GMT.
            (vec![("retry-after", "Tue, 14 Nov 2023 22:13:50 GMT")], Some(Duration::from_secs(30))),
            (vec![("retry-after", "Tue, 14 Nov 2023 22:00:00 GMT")], Some(Duration::ZERO)),
            (
                vec![("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "1700000042")],
                Some(Duration::from_secs(42)),
            ),
            (vec![("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "1699999000")], Some(Duration::ZERO)),
            (
                vec![("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "30")],
                Some(Duration::from_secs(30)),
            ),
            (vec![("x-ratelimit-remaining", "5"), ("x-ratelimit-reset", "1700000042")], None),
            (vec![("x-ratelimit-reset", "1700000042")], None),
            (vec![("x-ratelimit-remaining", "0")], None),
            // Retry-After wins over the reset time.
            (
                vec![
                    ("retry-after", "7"),
                    ("x-ratelimit-remaining", "0"),
                    ("x-ratelimit-reset", "1700000042"),
                ],
                Some(Duration::from_secs(7)),
            ),
            (vec![], None),
        ];
        for (hs, expected) in cases {
            assert_eq!(retry_delay(&headers(&hs), now), expected, "{hs:?}");
        }
    }

    #[test]
    fn excerpts_are_short_and_single_line() {
        assert_eq!(body_excerpt(b""), "");
        assert_eq!(
            body_excerpt(b"  {\"message\":\n\t\"Bad credentials\"}\r\n"),
            "{\"message\": \"Bad credentials\"}"
        );
        assert_eq!(body_excerpt(b"bad \x1b[31m\xff utf8"), "bad [31m\u{fffd} utf8");
        let long = "é".repeat(10_000);
        let e = body_excerpt(long.as_bytes());
        assert_eq!(e.chars().count(), BODY_EXCERPT_CHARS + 1);
        assert!(e.ends_with('…'));
        let exact = "a".repeat(BODY_EXCERPT_CHARS);
        assert_eq!(body_excerpt(exact.as_bytes()), exact);
    }

    #[test]
    fn waits_are_described_briefly() {
        assert_eq!(describe_wait(Duration::from_millis(250)), "250ms");
        assert_eq!(describe_wait(Duration::from_secs(3600)), "3600s");
        assert_eq!(describe_wait(Duration::from_millis(1500)), "1.5s");
    }
}
