//! SQL text: identifier quoting, the per-table read plan, keyset cursors and read queries.
//!
//! Everything here is pure: the catalog facts come in as [`ColumnInfo`], SQL and parameters go
//! out. Names from the configuration only ever reach SQL through [`quote_ident`]; values
//! (cursor positions) only as bind parameters.

use connector_core::{Cursor, Error, Result};
use serde::{Deserialize, Serialize};

use crate::config::PostgresConfig;
use crate::decode::ColKind;

/// Quotes an identifier for SQL: wrapped in double quotes, inner double quotes doubled.
/// Configuration validation rejects NUL, the one character that cannot be quoted.
pub(crate) fn quote_ident(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for c in name.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// `"schema"."table"`.
pub(crate) fn qualified(schema: &str, table: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}

/// One column of a table as the catalog describes it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ColumnInfo {
    /// The column name.
    pub name: String,
    /// `format_type(atttypid, atttypmod)`: the declared type as SQL text, used in casts.
    pub type_sql: String,
    /// The type's OID, or its base type's for a domain.
    pub type_oid: u32,
    /// For array types, the element type's OID.
    pub elem_oid: Option<u32>,
    /// `attnotnull`.
    pub not_null: bool,
}

/// Where the text form of a cursor column comes from in a result row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TextSource {
    /// The column's own value is already its exact text form (text types, integers, uuid,
    /// columns selected as `::text`).
    Column(usize),
    /// An extra `"col"::text` output column at this index.
    Extra(usize),
}

/// A selected column: its name and how its value is decoded.
#[derive(Debug, Clone)]
pub(crate) struct PlanColumn {
    pub name: String,
    pub kind: ColKind,
}

/// Everything needed to read one table: the select list, the keyset columns and the
/// positions of the columns that feed the document fields.
#[derive(Debug, Clone)]
pub(crate) struct TablePlan {
    /// `{schema}.{table}`.
    pub stream: String,
    pub table: String,
    /// `"schema"."table"`.
    pub from: String,
    /// One per table column, in table order; output column `i` is `columns[i]`.
    pub columns: Vec<PlanColumn>,
    select_list: String,
    ts_sql: String,
    pk_sql: String,
    ts_type: String,
    pk_type: String,
    ts_nullable: bool,
    pk_nullable: bool,
    pub ts_idx: usize,
    pub pk_idx: usize,
    pub ts_text: TextSource,
    pub pk_text: TextSource,
    /// Output columns rendered into the content, in configured order.
    pub content: Vec<usize>,
    pub title_idx: Option<usize>,
    pub author_idx: Option<usize>,
    pub created_idx: Option<usize>,
    /// `{table}:` or `{schema}.{table}:`, the document id prefix.
    pub id_prefix: String,
    /// `postgres://host:port/database/schema.table#`, the url prefix.
    pub url_prefix: String,
}

/// Problems with the configured columns of a table, named for the user.
fn missing_column(stream: &str, key: &str, name: &str, columns: &[ColumnInfo]) -> Error {
    let mut names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
    let hint = match names.iter().find(|n| n.eq_ignore_ascii_case(name)) {
        Some(similar) => format!(" (did you mean {similar:?}? names are case-sensitive)"),
        None => String::new(),
    };
    names.truncate(20);
    Error::config(format!(
        "table {stream}: {key} {name:?} is not a column of the table{hint}; its columns are: {}",
        names.join(", ")
    ))
}

impl TablePlan {
    /// Builds the plan for `table` from its catalog columns. Fails with a configuration error
    /// naming the table and column when a configured column does not exist.
    pub fn new(config: &PostgresConfig, table: &str, columns: &[ColumnInfo]) -> Result<Self> {
        let stream = config.stream_name(table);
        let find = |key: &str, name: &str| {
            columns
                .iter()
                .position(|c| c.name == name)
                .ok_or_else(|| missing_column(&stream, key, name, columns))
        };
        let ts_idx = find("timestamp_column", &config.timestamp_column)?;
        let pk_idx = find("primary_key_column", &config.primary_key_column)?;
        let content = if config.content_columns.is_empty() {
            (0..columns.len())
                .filter(|&i| i != ts_idx && i != pk_idx)
                .filter(|&i| ColKind::for_column(&columns[i]) != ColKind::Bytea)
                .collect()
        } else {
            let mut content = Vec::with_capacity(config.content_columns.len());
            for (i, name) in config.content_columns.iter().enumerate() {
                content.push(find(&format!("content_columns[{i}]"), name)?);
            }
            content
        };

        let plan_columns: Vec<PlanColumn> = columns
            .iter()
            .map(|c| PlanColumn { name: c.name.clone(), kind: ColKind::for_column(c) })
            .collect();

        let mut select: Vec<String> = plan_columns
            .iter()
            .map(|c| {
                let q = quote_ident(&c.name);
                match c.kind {
                    ColKind::AsText => format!("{q}::text"),
                    ColKind::Array(ref elem) if **elem == ColKind::AsText => format!("{q}::text[]"),
                    _ => q,
                }
            })
            .collect();
        let mut text_source = |idx: usize| {
            if plan_columns[idx].kind.text_is_exact() {
                TextSource::Column(idx)
            } else {
                select.push(format!("{}::text", quote_ident(&columns[idx].name)));
                TextSource::Extra(select.len() - 1)
            }
        };
        let ts_text = text_source(ts_idx);
        let pk_text = text_source(pk_idx);

        let by_name = |names: &[&str]| names.iter().find_map(|n| columns.iter().position(|c| c.name == *n));
        let id_prefix = if config.schema == "public" {
            format!("{table}:")
        } else {
            format!("{}.{table}:", config.schema)
        };
        let url_prefix = format!(
            "postgres://{}:{}/{}/{}.{}#",
            url_host(&config.host),
            config.port,
            url_encode(&config.database),
            url_encode(&config.schema),
            url_encode(table)
        );
        Ok(Self {
            stream,
            table: table.to_string(),
            from: qualified(&config.schema, table),
            select_list: select.join(", "),
            // Qualified: the select list may hold both "col" and "col"::text, whose output names
            // would make a bare ORDER BY "col" ambiguous.
            ts_sql: format!("t.{}", quote_ident(&columns[ts_idx].name)),
            pk_sql: format!("t.{}", quote_ident(&columns[pk_idx].name)),
            ts_type: columns[ts_idx].type_sql.clone(),
            pk_type: columns[pk_idx].type_sql.clone(),
            ts_nullable: !columns[ts_idx].not_null,
            pk_nullable: !columns[pk_idx].not_null,
            ts_idx,
            pk_idx,
            ts_text,
            pk_text,
            content,
            title_idx: by_name(&["title", "name", "subject"]),
            author_idx: by_name(&["author", "created_by"]),
            created_idx: by_name(&["created_at"]).filter(|&i| plan_columns[i].kind.is_time()),
            columns: plan_columns,
            id_prefix,
            url_prefix,
        })
    }

    /// The number of output columns a row of this plan's queries has.
    pub fn output_len(&self) -> usize {
        self.columns.len()
            + matches!(self.ts_text, TextSource::Extra(_)) as usize
            + matches!(self.pk_text, TextSource::Extra(_)) as usize
    }

    /// The queries that read the table from `cursor` to its end, in order.
    ///
    /// Rows are ordered by `(timestamp, pk)`, rows with a NULL timestamp first (as if it were
    /// minus infinity). Reading them is split in two so that an index on `(timestamp, pk)` can
    /// serve the main query: NULL-timestamp rows by pk, then the rest by `(timestamp, pk)`.
    /// A NOT NULL timestamp column needs only the second.
    pub fn phases(&self, cursor: Option<&KeysetCursor>) -> Vec<Phase> {
        match cursor {
            None if self.ts_nullable => {
                vec![Phase::NullTimestamps { after_pk: None }, Phase::Main { after: None }]
            }
            None => vec![Phase::Main { after: None }],
            Some(KeysetCursor { ts: None, pk }) if self.ts_nullable => {
                vec![Phase::NullTimestamps { after_pk: Some(pk.clone()) }, Phase::Main { after: None }]
            }
            // The column became NOT NULL since the cursor was saved: no NULL rows remain.
            Some(KeysetCursor { ts: None, .. }) => vec![Phase::Main { after: None }],
            Some(KeysetCursor { ts: Some(ts), pk }) => {
                vec![Phase::Main { after: Some((ts.clone(), pk.clone())) }]
            }
        }
    }

    /// The SQL and bind parameters (all text) of one phase.
    ///
    /// Cursor values travel as text and are cast on the server (`$1::text::<type>`), so they
    /// round-trip exactly whatever the column types are. The row comparison
    /// `(ts, pk) > ($1, $2)` neither skips nor repeats rows that share a timestamp.
    pub fn query(&self, phase: &Phase) -> (String, Vec<String>) {
        let (ts, pk) = (&self.ts_sql, &self.pk_sql);
        let mut conditions = Vec::new();
        let mut params = Vec::new();
        let order;
        match phase {
            Phase::NullTimestamps { after_pk } => {
                conditions.push(format!("{ts} IS NULL"));
                if let Some(after) = after_pk {
                    conditions.push(format!("{pk} > $1::text::{}", self.pk_type));
                    params.push(after.clone());
                }
                order = pk.clone();
            }
            Phase::Main { after } => match after {
                // The row comparison is NULL (false) for NULL timestamps, so they stay excluded.
                Some((after_ts, after_pk)) => {
                    conditions.push(format!(
                        "({ts}, {pk}) > ($1::text::{}, $2::text::{})",
                        self.ts_type, self.pk_type
                    ));
                    params.push(after_ts.clone());
                    params.push(after_pk.clone());
                    order = format!("{ts}, {pk}");
                }
                None => {
                    if self.ts_nullable {
                        conditions.push(format!("{ts} IS NOT NULL"));
                    }
                    order = format!("{ts}, {pk}");
                }
            },
        }
        if self.pk_nullable {
            // A row without a key cannot be identified or resumed after; it is not synced.
            conditions.push(format!("{pk} IS NOT NULL"));
        }
        let mut sql = format!("SELECT {} FROM {} AS t", self.select_list, self.from);
        if !conditions.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conditions.join(" AND "));
        }
        sql.push_str(" ORDER BY ");
        sql.push_str(&order);
        (sql, params)
    }

    /// The query that reads the rows whose keys are in `$1` (a text array of key texts), with
    /// the select list of [`query`](Self::query), so a fetched row decodes exactly like a read
    /// one. The keys are cast on the server, like cursor values.
    pub fn fetch_query(&self) -> String {
        format!(
            "SELECT {} FROM {} AS t WHERE {} = ANY($1::text[]::{}[])",
            self.select_list, self.from, self.pk_sql, self.pk_type
        )
    }

    /// The query that turns key texts (`$1`, a text array) into the key column's values, one
    /// row each, selected so that [`cursor_text`](crate::decode::cursor_text) at the returned
    /// source gives the same text as it gives for a row with that key (the key part of the
    /// document id). A text that is no valid key fails the query (SQLSTATE class 22).
    pub fn key_text_query(&self) -> (String, TextSource) {
        let cast = format!("k.key::{}", self.pk_type);
        let (expr, source) = match self.pk_text {
            TextSource::Column(_) if self.columns[self.pk_idx].kind == ColKind::AsText => {
                (format!("{cast}::text"), TextSource::Column(0))
            }
            TextSource::Column(_) => (cast, TextSource::Column(0)),
            TextSource::Extra(_) => (format!("{cast}::text"), TextSource::Extra(0)),
        };
        (format!("SELECT {expr} FROM unnest($1::text[]) AS k(key)"), source)
    }
}

/// One query of a table read; see [`TablePlan::phases`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Rows whose timestamp is NULL, by pk, after `after_pk`.
    NullTimestamps { after_pk: Option<String> },
    /// Rows with a timestamp, by `(timestamp, pk)`, after `after`.
    Main { after: Option<(String, String)> },
}

/// A table's position: the last row read, as the server's text form of its timestamp (NULL
/// for rows without one) and primary key. Stored as `{"ts": "...", "pk": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysetCursor {
    /// The timestamp column's value as text (`2024-05-01 12:00:00.5+00`), or null.
    pub ts: Option<String>,
    /// The primary key's value as text.
    pub pk: String,
}

impl KeysetCursor {
    /// Reads a stored cursor; an error names the stream.
    pub fn from_cursor(stream: &str, cursor: &Cursor) -> Result<Self> {
        serde_json::from_value(cursor.clone()).map_err(|e| {
            Error::state(format!(
                "saved cursor of stream {stream} is not a postgres keyset cursor {{\"ts\": ..., \"pk\": ...}} ({e}): \
                 reset the connector's state or run a full sync"
            ))
        })
    }

    /// The JSON stored in the sync state.
    pub fn to_cursor(&self) -> Cursor {
        serde_json::json!({ "ts": self.ts, "pk": self.pk })
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub(crate) fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    url_encode_into(&mut out, s);
    out
}

pub(crate) fn url_encode_into(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 15) as usize] as char);
        }
    }
}

fn url_host(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { url_encode(host) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use connector_core::TenantId;

    fn col(name: &str, type_sql: &str, oid: u32, not_null: bool) -> ColumnInfo {
        ColumnInfo { name: name.into(), type_sql: type_sql.into(), type_oid: oid, elem_oid: None, not_null }
    }

    fn config(tables: &[&str]) -> PostgresConfig {
        PostgresConfig::new(
            TenantId::new("t").unwrap(),
            "myapp",
            tables.iter().map(|t| t.to_string()).collect(),
        )
    }

    fn docs_columns() -> Vec<ColumnInfo> {
        vec![
            col("id", "bigint", 20, true),
            col("title", "text", 25, false),
            col("body", "text", 25, false),
            col("price", "numeric(10,2)", 1700, false),
            col("blob", "bytea", 17, false),
            col("updated_at", "timestamp with time zone", 1184, true),
        ]
    }

    #[test]
    fn quoting_doubles_quotes_and_cannot_be_escaped() {
        assert_eq!(quote_ident("docs"), "\"docs\"");
        assert_eq!(quote_ident("Mixed Case"), "\"Mixed Case\"");
        assert_eq!(quote_ident("we\"ird; DROP TABLE x"), "\"we\"\"ird; DROP TABLE x\"");
        assert_eq!(quote_ident("\""), "\"\"\"\"");
        assert_eq!(qualified("s\"", "t"), "\"s\"\"\".\"t\"");
        // A quoted identifier ends only at a lone quote: after the opening quote, quotes come
        // in pairs until the final one.
        for name in ["a\"", "\"\"", "x\"; DROP TABLE y; --", "\"\"\""] {
            let q = quote_ident(name);
            let inner = &q[1..q.len() - 1];
            assert!(inner.replace("\"\"", "").chars().all(|c| c != '"'), "{q}");
        }
    }

    #[test]
    fn hostile_names_stay_inside_quotes_in_generated_sql() {
        let evil = "we\"ird; DROP TABLE x";
        let mut cfg = config(&[evil]);
        cfg.schema = "s\"; --".into();
        cfg.timestamp_column = "ts\"--".into();
        cfg.primary_key_column = "p\"k".into();
        let cols =
            vec![col("p\"k", "integer", 23, true), col("ts\"--", "timestamp with time zone", 1184, true)];
        let plan = TablePlan::new(&cfg, evil, &cols).unwrap();
        let (sql, params) = plan.query(&Phase::Main { after: Some(("t".into(), "1".into())) });
        assert_eq!(
            sql,
            "SELECT \"p\"\"k\", \"ts\"\"--\", \"ts\"\"--\"::text FROM \"s\"\"; --\".\"we\"\"ird; DROP TABLE x\" AS t \
             WHERE (t.\"ts\"\"--\", t.\"p\"\"k\") > ($1::text::timestamp with time zone, $2::text::integer) \
             ORDER BY t.\"ts\"\"--\", t.\"p\"\"k\""
        );
        assert_eq!(params, ["t", "1"]);
        assert_eq!(plan.stream, "s\"; --.we\"ird; DROP TABLE x");
        assert!(
            plan.url_prefix
                .starts_with("postgres://localhost:5432/myapp/s%22%3B%20--.we%22ird%3B%20DROP%20TABLE%20x#")
        );
    }

    #[test]
    fn plan_selects_text_casts_and_extra_cursor_columns() {
        let plan = TablePlan::new(&config(&["docs"]), "docs", &docs_columns()).unwrap();
        let (sql, params) = plan.query(&Phase::Main { after: None });
        assert_eq!(
            sql,
            "SELECT \"id\", \"title\", \"body\", \"price\"::text, \"blob\", \"updated_at\", \"updated_at\"::text \
             FROM \"public\".\"docs\" AS t ORDER BY t.\"updated_at\", t.\"id\""
        );
        assert!(params.is_empty());
        assert_eq!(plan.ts_text, TextSource::Extra(6));
        assert_eq!(plan.pk_text, TextSource::Column(0));
        assert_eq!(plan.output_len(), 7);
        // Default content: everything but pk, timestamp and bytea.
        assert_eq!(plan.content, vec![1, 2, 3]);
        assert_eq!(plan.title_idx, Some(1));
        assert_eq!(plan.id_prefix, "docs:");
        assert_eq!(plan.url_prefix, "postgres://localhost:5432/myapp/public.docs#");

        let (sql, params) =
            plan.query(&Phase::Main { after: Some(("2024-01-01 00:00:00+00".into(), "7".into())) });
        assert!(sql.ends_with(
            "WHERE (t.\"updated_at\", t.\"id\") > ($1::text::timestamp with time zone, $2::text::bigint) \
             ORDER BY t.\"updated_at\", t.\"id\""
        ));
        assert_eq!(params, ["2024-01-01 00:00:00+00", "7"]);
    }

    #[test]
    fn fetch_queries_select_like_reads_and_cast_keys() {
        let plan = TablePlan::new(&config(&["docs"]), "docs", &docs_columns()).unwrap();
        assert_eq!(
            plan.fetch_query(),
            "SELECT \"id\", \"title\", \"body\", \"price\"::text, \"blob\", \"updated_at\", \"updated_at\"::text \
             FROM \"public\".\"docs\" AS t WHERE t.\"id\" = ANY($1::text[]::bigint[])"
        );
        assert_eq!(
            plan.key_text_query(),
            ("SELECT k.key::bigint FROM unnest($1::text[]) AS k(key)".to_string(), TextSource::Column(0))
        );

        let mut cols = docs_columns();
        cols[0] = col("id", "numeric", 1700, true);
        let plan = TablePlan::new(&config(&["docs"]), "docs", &cols).unwrap();
        assert_eq!(
            plan.key_text_query(),
            (
                "SELECT k.key::numeric::text FROM unnest($1::text[]) AS k(key)".to_string(),
                TextSource::Column(0)
            )
        );
        let mut cfg = config(&["docs"]);
        (cfg.timestamp_column, cfg.primary_key_column) = ("id".into(), "updated_at".into());
        let plan = TablePlan::new(&cfg, "docs", &docs_columns()).unwrap();
        assert!(
            plan.fetch_query()
                .ends_with("WHERE t.\"updated_at\" = ANY($1::text[]::timestamp with time zone[])")
        );
        assert_eq!(
            plan.key_text_query(),
            (
                "SELECT k.key::timestamp with time zone::text FROM unnest($1::text[]) AS k(key)".to_string(),
                TextSource::Extra(0)
            )
        );
    }

    #[test]
    fn nullable_timestamps_are_read_first_by_key() {
        let mut cols = docs_columns();
        cols[5].not_null = false;
        cols[0] = col("id", "uuid", 2950, false);
        let mut cfg = config(&["docs"]);
        cfg.schema = "app".into();
        let plan = TablePlan::new(&cfg, "docs", &cols).unwrap();
        assert_eq!(plan.id_prefix, "app.docs:");
        assert_eq!(
            plan.phases(None),
            vec![Phase::NullTimestamps { after_pk: None }, Phase::Main { after: None }]
        );
        let null_cursor = KeysetCursor { ts: None, pk: "k".into() };
        assert_eq!(
            plan.phases(Some(&null_cursor)),
            vec![Phase::NullTimestamps { after_pk: Some("k".into()) }, Phase::Main { after: None }]
        );
        let cursor = KeysetCursor { ts: Some("t".into()), pk: "k".into() };
        assert_eq!(plan.phases(Some(&cursor)), vec![Phase::Main { after: Some(("t".into(), "k".into())) }]);

        let (sql, params) = plan.query(&Phase::NullTimestamps { after_pk: Some("k".into()) });
        assert!(
            sql.ends_with(
                "WHERE t.\"updated_at\" IS NULL AND t.\"id\" > $1::text::uuid AND t.\"id\" IS NOT NULL ORDER BY t.\"id\""
            ),
            "{sql}"
        );
        assert_eq!(params, ["k"]);
        let (sql, _) = plan.query(&Phase::Main { after: None });
        assert!(
            sql.ends_with(
                "WHERE t.\"updated_at\" IS NOT NULL AND t.\"id\" IS NOT NULL ORDER BY t.\"updated_at\", t.\"id\""
            ),
            "{sql}"
        );

        // Once the column is NOT NULL, a cursor inside the NULL rows restarts the main phase.
        let plan = TablePlan::new(&cfg, "docs", &docs_columns()).unwrap();
        assert_eq!(plan.phases(Some(&null_cursor)), vec![Phase::Main { after: None }]);
    }

    #[test]
    fn missing_columns_are_named_with_hints() {
        let mut cfg = config(&["docs"]);
        cfg.timestamp_column = "Updated_At".into();
        let err = TablePlan::new(&cfg, "docs", &docs_columns()).unwrap_err().to_string();
        assert!(
            err.starts_with("table public.docs: timestamp_column \"Updated_At\" is not a column of the table (did you mean \"updated_at\"?"),
            "{err}"
        );
        let mut cfg = config(&["docs"]);
        cfg.content_columns = vec!["title".into(), "summary".into()];
        let err = TablePlan::new(&cfg, "docs", &docs_columns()).unwrap_err().to_string();
        assert!(err.contains("content_columns[1] \"summary\""), "{err}");
        assert!(err.contains("id, title, body, price, blob, updated_at"), "{err}");
        let mut cfg = config(&["docs"]);
        cfg.primary_key_column = "doc_id".into();
        let err = TablePlan::new(&cfg, "docs", &docs_columns()).unwrap_err();
        assert_eq!(err.kind(), connector_core::ErrorKind::Config);
        assert!(err.to_string().contains("primary_key_column \"doc_id\""));
    }

    #[test]
    fn explicit_content_columns_keep_their_order_and_may_include_keys() {
        let mut cfg = config(&["docs"]);
        cfg.content_columns = vec!["body".into(), "id".into(), "blob".into()];
        let plan = TablePlan::new(&cfg, "docs", &docs_columns()).unwrap();
        assert_eq!(plan.content, vec![2, 0, 4]);
    }

    #[test]
    fn cursor_round_trips_and_rejects_foreign_shapes() {
        let c = KeysetCursor { ts: Some("2024-01-01 00:00:00+00".into()), pk: "42".into() };
        let json = c.to_cursor();
        assert_eq!(json, serde_json::json!({"ts": "2024-01-01 00:00:00+00", "pk": "42"}));
        assert_eq!(KeysetCursor::from_cursor("public.docs", &json).unwrap(), c);
        let null_ts = serde_json::json!({"ts": null, "pk": "a"});
        assert_eq!(KeysetCursor::from_cursor("s", &null_ts).unwrap().ts, None);
        let err = KeysetCursor::from_cursor("public.docs", &serde_json::json!({"page": 3})).unwrap_err();
        assert_eq!(err.kind(), connector_core::ErrorKind::State);
        assert!(err.to_string().contains("public.docs"));
    }

    #[test]
    fn urls_never_carry_credentials_and_escape_names() {
        let mut cfg = config(&["my table"]);
        cfg.host = "::1".into();
        cfg.port = 6543;
        let plan = TablePlan::new(&cfg, "my table", &docs_columns()).unwrap();
        assert_eq!(plan.url_prefix, "postgres://[::1]:6543/myapp/public.my%20table#");
        assert_eq!(url_encode("a/b#c"), "a%2Fb%23c");
    }
}
