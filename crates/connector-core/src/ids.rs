//! Validated identifiers: [`TenantId`] and [`ConnectorId`].
//!
//! Both appear in file names (`{connector_id}_{tenant_id}.json`), SQL parameters and secret
//! paths, so they are restricted to a safe alphabet: ASCII letters, digits, `-`, `_` and `.`,
//! 1 to 128 characters, not starting with `.` or `-`, and never containing `..`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::Error;

/// The longest identifier accepted.
pub const MAX_ID_LEN: usize = 128;

fn validate(what: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{what} must not be empty"));
    }
    if value.len() > MAX_ID_LEN {
        return Err(format!(
            "{what} {value:?} is {} characters long; the limit is {MAX_ID_LEN}",
            value.len()
        ));
    }
    if value.contains("..") {
        return Err(format!("{what} {value:?} must not contain `..`"));
    }
    if value.starts_with('.') || value.starts_with('-') {
        return Err(format!("{what} {value:?} must not start with `.` or `-`"));
    }
    if let Some(bad) = value.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        return Err(format!(
            "{what} {value:?} contains {bad:?}; only ASCII letters, digits, `-`, `_` and `.` are allowed"
        ));
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps `value`.
            pub fn new(value: impl Into<String>) -> Result<Self, Error> {
                let value = value.into();
                validate($what, &value).map_err(Error::config)?;
                Ok(Self(value))
            }

            /// The identifier as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                validate($what, &s).map_err(serde::de::Error::custom)?;
                Ok(Self(s))
            }
        }
    };
}

id_type!(
    /// A tenant namespace (`workspace-1`). Every knowledge-store call is scoped to one.
    TenantId,
    "tenant_id"
);
id_type!(
    /// A connector instance's stable id (`docs-db`), unique within a tenant.
    ConnectorId,
    "connector id"
);

impl ConnectorId {
    /// Derives a valid id from arbitrary text (`postgres-localhost-myapp`): characters outside
    /// the allowed alphabet become `-`, runs of `-` collapse, and the result is truncated.
    pub fn derive(parts: &[&str]) -> Self {
        let mut out = String::new();
        for part in parts {
            for c in part.chars() {
                let c = if c.is_ascii_alphanumeric() || c == '_' { c.to_ascii_lowercase() } else { '-' };
                if c == '-' && (out.is_empty() || out.ends_with('-')) {
                    continue;
                }
                out.push(c);
            }
            if !out.is_empty() && !out.ends_with('-') {
                out.push('-');
            }
        }
        let mut out: String = out.trim_end_matches('-').chars().take(MAX_ID_LEN).collect();
        while out.ends_with('-') {
            out.pop();
        }
        if out.is_empty() {
            out.push_str("connector");
        }
        Self(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_ids() {
        for ok in ["workspace-1", "a", "Tenant_2.prod", &"x".repeat(128)] {
            TenantId::new(ok).unwrap();
        }
    }

    #[test]
    fn rejects_path_tricks_and_bad_characters() {
        for bad in ["", "../x", "..", "a/b", "a\\b", ".hidden", "-flag", "a b", "é", &"x".repeat(129), "a..b"]
        {
            let err = TenantId::new(bad).unwrap_err().to_string();
            assert!(err.contains("tenant_id"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn deserialize_validates() {
        let err = serde_json::from_str::<TenantId>("\"../x\"").unwrap_err();
        assert!(err.to_string().contains("`..`"));
    }

    #[test]
    fn derive_makes_valid_ids() {
        let id = ConnectorId::derive(&["postgres", "db.example.com:5432", "My App"]);
        assert_eq!(id.as_str(), "postgres-db-example-com-5432-my-app");
        ConnectorId::new(id.as_str()).unwrap();
        assert_eq!(ConnectorId::derive(&["///"]).as_str(), "connector");
    }
}
