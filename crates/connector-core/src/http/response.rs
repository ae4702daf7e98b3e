//! Buffered responses and the results of the JSON and conditional helpers.

use std::borrow::Cow;
use std::fmt;

use reqwest::header::{ETAG, HeaderMap};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

use super::link::find_link;

/// A successful (2xx or 304) response whose body has been read completely.
///
/// The body is in memory: this type is meant for API pages (JSON, a few MiB at most).
#[derive(Clone)]
pub struct Response {
    pub(crate) method: Method,
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) url: Url,
    pub(crate) body: Vec<u8>,
}

impl Response {
    /// The status (2xx, or 304 for a conditional request).
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The response headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The final URL, after redirects. It may hold a query string with secrets: do not log it.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The body bytes.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The body, consuming the response.
    pub fn into_body(self) -> Vec<u8> {
        self.body
    }

    /// The body as text (invalid UTF-8 replaced by U+FFFD).
    pub fn text(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.body)
    }

    /// The body parsed as JSON; a `Source` error naming the method and path when it does not
    /// parse into `T`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.body).map_err(|e| {
            Error::source_error(format!(
                "invalid JSON in the response to {} {} (HTTP {})",
                self.method,
                self.url.path(),
                self.status.as_u16()
            ))
            .with_source(e)
        })
    }

    /// The `ETag` header, as sent (weak validators keep their `W/` prefix).
    pub fn etag(&self) -> Option<&str> {
        self.headers.get(ETAG).and_then(|v| v.to_str().ok())
    }

    /// The `Link: <...>; rel="next"` target, resolved against this response's URL.
    ///
    /// Only a link to the same origin (scheme, host, port) as the response is returned, so a
    /// hostile or misconfigured server cannot make the connector send its credentials to
    /// another host by following pagination. Use [`find_link`] for anything else.
    pub fn next_link(&self) -> Option<Url> {
        find_link(&self.headers, "next", Some(&self.url)).filter(|next| next.origin() == self.url.origin())
    }
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The path only: queries may carry tokens.
        f.debug_struct("Response")
            .field("method", &self.method)
            .field("status", &self.status)
            .field("path", &self.url.path())
            .field("body_len", &self.body.len())
            .finish_non_exhaustive()
    }
}

/// The result of a conditional GET ([`HttpClient::get_conditional`](super::HttpClient::get_conditional)).
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "a short-lived return value; boxing would only add an allocation"
)]
pub enum Conditional {
    /// `304 Not Modified`: what the caller has is current.
    NotModified,
    /// The resource changed (or no validator was sent).
    Modified {
        /// The new `ETag`, to send next time.
        etag: Option<String>,
        /// The full response.
        response: Response,
    },
}

/// A JSON body together with its response headers, for paginated listings.
#[derive(Debug, Clone)]
pub struct JsonPage<T> {
    /// The parsed body.
    pub value: T,
    /// The response headers (`Link`, rate-limit headers, `ETag`, ...).
    pub headers: HeaderMap,
    /// The same-origin `rel="next"` link, if any (see [`Response::next_link`]).
    pub next: Option<Url>,
}
