//! Credentials injected into every request of an [`HttpClient`](super::HttpClient).

use std::fmt;

use reqwest::header::{AUTHORIZATION, HeaderName, HeaderValue};
use secrecy::{ExposeSecret, SecretString};

use crate::error::{Error, Result};

/// How an [`HttpClient`](super::HttpClient) authenticates its requests.
///
/// The header built from it is marked sensitive ([`HeaderValue::set_sensitive`]), so `http`
/// and `reqwest` never print it, and `Debug` of an `Auth` shows `<redacted>` in place of every
/// secret. A request that already carries the header (set by the connector for one call) keeps
/// its own value.
#[derive(Clone)]
pub enum Auth {
    /// `Authorization: Bearer <token>` (GitHub, Slack, Notion, OAuth2 access tokens).
    Bearer(SecretString),
    /// `Authorization: Basic base64(user:password)` (Confluence e-mail + API token).
    Basic {
        /// The user name; not secret, shown by `Debug`.
        user: String,
        /// The password or API token.
        password: SecretString,
    },
    /// A custom header carrying the secret (`X-API-Key: <key>`).
    Header {
        /// The header's name.
        name: HeaderName,
        /// The header's value.
        value: SecretString,
    },
}

impl Auth {
    /// [`Auth::Bearer`] from a token.
    pub fn bearer(token: impl Into<String>) -> Self {
        Auth::Bearer(SecretString::from(token.into()))
    }

    /// [`Auth::Basic`] from a user and a password.
    pub fn basic(user: impl Into<String>, password: impl Into<String>) -> Self {
        Auth::Basic { user: user.into(), password: SecretString::from(password.into()) }
    }

    /// [`Auth::Header`]; fails with a config error when `name` is not a valid header name.
    pub fn header(name: &str, value: impl Into<String>) -> Result<Self> {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| Error::config(format!("{name:?} is not a valid HTTP header name")))?;
        Ok(Auth::Header { name, value: SecretString::from(value.into()) })
    }

    /// The header this auth adds to requests, marked sensitive.
    ///
    /// Fails with a config error (naming the header, never the value) when the secret holds
    /// characters that an HTTP header cannot carry.
    pub fn to_header(&self) -> Result<(HeaderName, HeaderValue)> {
        let (name, text) = match self {
            Auth::Bearer(token) => (AUTHORIZATION, format!("Bearer {}", token.expose_secret())),
            Auth::Basic { user, password } => {
                let pair = format!("{user}:{}", password.expose_secret());
                (AUTHORIZATION, format!("Basic {}", base64(pair.as_bytes())))
            }
            Auth::Header { name, value } => (name.clone(), value.expose_secret().to_owned()),
        };
        let mut value = HeaderValue::from_str(&text).map_err(|_| {
            Error::config(format!(
                "the {} credential for header `{name}` contains characters not allowed in an HTTP header",
                self.scheme()
            ))
        })?;
        value.set_sensitive(true);
        Ok((name, value))
    }

    fn scheme(&self) -> &'static str {
        match self {
            Auth::Bearer(_) => "bearer",
            Auth::Basic { .. } => "basic",
            Auth::Header { .. } => "header",
        }
    }
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Redacted;
        impl fmt::Debug for Redacted {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("<redacted>")
            }
        }
        match self {
            Auth::Bearer(_) => f.debug_tuple("Bearer").field(&Redacted).finish(),
            Auth::Basic { user, .. } => {
                f.debug_struct("Basic").field("user", user).field("password", &Redacted).finish()
            }
            Auth::Header { name, .. } => {
                f.debug_struct("Header").field("name", name).field("value", &Redacted).finish()
            }
        }
    }
}

/// Standard base64 with padding (RFC 4648), for Basic auth.
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let table = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
            ("user:pass", "dXNlcjpwYXNz"),
        ];
        for (input, expected) in table {
            assert_eq!(base64(input.as_bytes()), expected, "{input:?}");
        }
        assert_eq!(base64(&[0xff, 0xfe, 0xfd]), "//79");
    }

    #[test]
    fn headers_are_sensitive_and_debug_is_redacted() {
        let cases = [
            (Auth::bearer("tok-123"), "authorization", "Bearer tok-123"),
            (Auth::basic("me@example.com", "pw-456"), "authorization", "Basic bWVAZXhhbXBsZS5jb206cHctNDU2"),
            (Auth::header("X-Api-Key", "key-789").unwrap(), "x-api-key", "key-789"),
        ];
        for (auth, name, value) in cases {
            let (n, v) = auth.to_header().unwrap();
            assert_eq!(n.as_str(), name);
            assert_eq!(v.to_str().unwrap(), value);
            assert!(v.is_sensitive());
            let debug = format!("{auth:?} {v:?}");
            for secret in ["tok-123", "pw-456", "key-789", "bWVAZXhhbXBsZS5jb206cHctNDU2"] {
                assert!(!debug.contains(secret), "{debug}");
            }
            assert!(debug.contains("<redacted>"), "{debug}");
        }
    }

    #[test]
    fn invalid_values_fail_without_echoing_the_secret() {
        assert!(Auth::header("bad header", "x").is_err());
        let err = Auth::bearer("line\nbreak-secret").to_header().unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Config);
        assert!(!err.to_string().contains("break-secret"), "{err}");
    }
}
