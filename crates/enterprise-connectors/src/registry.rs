//! Builds connectors from configuration tables by their `type`, for the CLI and for
//! applications that read the same `connectors.toml`.

use std::sync::Arc;

use connector_core::{Connector, ConnectorContext, Error, Result};

/// The connector types this build knows (`postgres`, ...), depending on enabled features.
pub fn known_types() -> &'static [&'static str] {
    &[
        #[cfg(feature = "postgres")]
        "postgres",
    ]
}

/// Deserializes `table` (a connector's keys without `type` and `schedule`) into the config of
/// connector type `kind`, strictly (unknown keys are errors), and builds the connector.
pub fn build(kind: &str, table: toml::Table, ctx: &ConnectorContext) -> Result<Arc<dyn Connector>> {
    let _ = (&table, ctx);
    match kind {
        #[cfg(feature = "postgres")]
        "postgres" => {
            let config: crate::postgres::PostgresConfig = parse(table)?;
            Ok(Arc::new(crate::postgres::PostgresConnector::new(config, ctx)?))
        }
        other => Err(Error::config(format!(
            "unknown connector type {other:?}; this build knows: {}",
            known_types().join(", ")
        ))),
    }
}

#[allow(dead_code)]
fn parse<T: serde::de::DeserializeOwned>(table: toml::Table) -> Result<T> {
    <T as serde::Deserialize>::deserialize(toml::Value::Table(table))
        .map_err(|e| Error::config(e.message().trim().to_owned()))
}

#[cfg(all(test, feature = "postgres"))]
mod tests {
    use super::*;

    fn ctx() -> ConnectorContext {
        ConnectorContext::new(Arc::new(connector_core::StaticCredentialProvider::new()))
    }

    #[test]
    fn unknown_keys_and_types_are_named() {
        let table: toml::Table = toml::from_str(
            r#"tenant_id = "t"
database = "db"
tables = ["a"]
tabels = ["b"]"#,
        )
        .unwrap();
        let err = build("postgres", table, &ctx()).err().unwrap().to_string();
        assert!(err.contains("unknown field `tabels`"), "{err}");
        let err = build("nosuch", toml::Table::new(), &ctx()).err().unwrap().to_string();
        assert!(err.contains("unknown connector type \"nosuch\""), "{err}");
    }
}
