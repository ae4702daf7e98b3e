//! Request counters shared by the clones of an [`HttpClient`](super::HttpClient).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use reqwest::StatusCode;

/// Counters of the requests an [`HttpClient`](super::HttpClient) sent and the responses it got.
///
/// Cheap to clone: clones share the same atomics, so one `HttpCounters` can be handed to
/// several clients of a connector (one per credential) and read by metrics and benchmarks.
/// Read them with [`HttpCounters::snapshot`].
#[derive(Clone, Default)]
pub struct HttpCounters {
    cells: Arc<Cells>,
}

#[derive(Default)]
struct Cells {
    requests: AtomicU64,
    retries: AtomicU64,
    status_2xx: AtomicU64,
    status_304: AtomicU64,
    status_4xx: AtomicU64,
    status_429: AtomicU64,
    status_5xx: AtomicU64,
    status_other: AtomicU64,
    transport_errors: AtomicU64,
    bytes_received: AtomicU64,
}

/// A point-in-time copy of [`HttpCounters`].
///
/// The status classes are disjoint: a 429 counts in `status_429` only, a 304 in `status_304`
/// only, and every other 4xx (including a rate-limit 403) in `status_4xx`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct HttpStats {
    /// Requests sent, retries included: what the API's quota sees.
    pub requests: u64,
    /// Requests that were retries of an earlier attempt.
    pub retries: u64,
    /// Responses with a 2xx status.
    pub status_2xx: u64,
    /// `304 Not Modified` responses to conditional requests.
    pub status_304: u64,
    /// Responses with a 4xx status other than 429.
    pub status_4xx: u64,
    /// `429 Too Many Requests` responses.
    pub status_429: u64,
    /// Responses with a 5xx status.
    pub status_5xx: u64,
    /// Responses with any other status (1xx, 3xx other than 304).
    pub status_other: u64,
    /// Attempts that got no complete response: connect errors, timeouts, truncated bodies.
    pub transport_errors: u64,
    /// Response body bytes received (after any content decoding).
    pub bytes_received: u64,
}

impl HttpStats {
    /// The counts accumulated since `earlier` (field-wise difference, saturating at 0).
    pub fn since(&self, earlier: &HttpStats) -> HttpStats {
        HttpStats {
            requests: self.requests.saturating_sub(earlier.requests),
            retries: self.retries.saturating_sub(earlier.retries),
            status_2xx: self.status_2xx.saturating_sub(earlier.status_2xx),
            status_304: self.status_304.saturating_sub(earlier.status_304),
            status_4xx: self.status_4xx.saturating_sub(earlier.status_4xx),
            status_429: self.status_429.saturating_sub(earlier.status_429),
            status_5xx: self.status_5xx.saturating_sub(earlier.status_5xx),
            status_other: self.status_other.saturating_sub(earlier.status_other),
            transport_errors: self.transport_errors.saturating_sub(earlier.transport_errors),
            bytes_received: self.bytes_received.saturating_sub(earlier.bytes_received),
        }
    }
}

impl HttpCounters {
    /// New counters, all zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current values.
    pub fn snapshot(&self) -> HttpStats {
        let c = &*self.cells;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        HttpStats {
            requests: get(&c.requests),
            retries: get(&c.retries),
            status_2xx: get(&c.status_2xx),
            status_304: get(&c.status_304),
            status_4xx: get(&c.status_4xx),
            status_429: get(&c.status_429),
            status_5xx: get(&c.status_5xx),
            status_other: get(&c.status_other),
            transport_errors: get(&c.transport_errors),
            bytes_received: get(&c.bytes_received),
        }
    }

    pub(crate) fn record_request(&self, is_retry: bool) {
        self.cells.requests.fetch_add(1, Ordering::Relaxed);
        if is_retry {
            self.cells.retries.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn record_status(&self, status: StatusCode) {
        let c = &*self.cells;
        let cell = match status.as_u16() {
            200..=299 => &c.status_2xx,
            304 => &c.status_304,
            429 => &c.status_429,
            400..=499 => &c.status_4xx,
            500..=599 => &c.status_5xx,
            _ => &c.status_other,
        };
        cell.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_transport_error(&self) {
        self.cells.transport_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_bytes(&self, n: usize) {
        self.cells.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl fmt::Debug for HttpCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("HttpCounters").field(&self.snapshot()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_are_disjoint_and_clones_share() {
        let a = HttpCounters::new();
        let b = a.clone();
        for code in [200, 204, 304, 301, 400, 403, 404, 429, 500, 503] {
            b.record_status(StatusCode::from_u16(code).unwrap());
        }
        a.record_request(false);
        a.record_request(true);
        a.record_bytes(10);
        a.record_transport_error();
        let s = b.snapshot();
        let expected = HttpStats {
            requests: 2,
            retries: 1,
            status_2xx: 2,
            status_304: 1,
            status_4xx: 3,
            status_429: 1,
            status_5xx: 2,
            status_other: 1,
            transport_errors: 1,
            bytes_received: 10,
        };
        assert_eq!(s, expected);
        assert_eq!(s.since(&HttpStats { requests: 1, ..HttpStats::default() }).requests, 1);
        let json = serde_json::to_value(s).unwrap();
        assert_eq!(json["status_429"], 1);
    }
}
