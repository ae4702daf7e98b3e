//! Row decoding: PostgreSQL binary values to JSON metadata, content text and a [`Document`].
//!
//! Values are read straight from the binary wire format (`Raw` borrows the bytes of the row),
//! so a row costs one pass and no intermediate text. Types without a native mapping here are
//! selected as `::text` by the query, so the server renders them and they arrive as text.

use std::fmt::Write as _;

use connector_core::Document;
use connector_core::reexports::chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use serde_json::{Map, Number, Value};
use tokio_postgres::Row;
use tokio_postgres::types::{FromSql, Type};

use crate::sql::{ColumnInfo, TablePlan, TextSource, url_encode_into};

/// Unix time of the PostgreSQL epoch, 2000-01-01T00:00:00Z, in microseconds.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
/// Days from 1970-01-01 to 2000-01-01.
const PG_EPOCH_DAYS: i64 = 10_957;
/// The longest fallback title, in characters.
pub(crate) const MAX_TITLE_CHARS: usize = 200;

/// How a selected column's binary value is decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ColKind {
    /// text, varchar, char(n), name.
    Text,
    /// Any type selected with `::text` (numeric, interval, enums, time, xml, ...).
    AsText,
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    /// Microseconds since 2000-01-01, no zone: read as UTC.
    Timestamp,
    /// Microseconds since 2000-01-01 UTC.
    TimestampTz,
    /// Days since 2000-01-01.
    Date,
    Uuid,
    Json,
    Jsonb,
    Bytea,
    /// An array of a natively decoded element type, or `::text[]` when the element is `AsText`.
    Array(Box<ColKind>),
}

impl ColKind {
    /// The mapping for a scalar type OID; `AsText` for everything without a native decoder.
    fn for_oid(oid: u32) -> ColKind {
        match Type::from_oid(oid) {
            Some(Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME) => ColKind::Text,
            Some(Type::BOOL) => ColKind::Bool,
            Some(Type::INT2) => ColKind::Int2,
            Some(Type::INT4) => ColKind::Int4,
            Some(Type::INT8) => ColKind::Int8,
            Some(Type::FLOAT4) => ColKind::Float4,
            Some(Type::FLOAT8) => ColKind::Float8,
            Some(Type::TIMESTAMP) => ColKind::Timestamp,
            Some(Type::TIMESTAMPTZ) => ColKind::TimestampTz,
            Some(Type::DATE) => ColKind::Date,
            Some(Type::UUID) => ColKind::Uuid,
            Some(Type::JSON) => ColKind::Json,
            Some(Type::JSONB) => ColKind::Jsonb,
            Some(Type::BYTEA) => ColKind::Bytea,
            // numeric as text keeps every digit; a JSON number would round through f64.
            _ => ColKind::AsText,
        }
    }

    /// The mapping for a catalog column.
    pub(crate) fn for_column(column: &ColumnInfo) -> ColKind {
        match column.elem_oid {
            Some(elem) => ColKind::Array(Box::new(ColKind::for_oid(elem))),
            None => ColKind::for_oid(column.type_oid),
        }
    }

    /// The OID the result column must have for this decoder.
    pub(crate) fn expected_oid(&self) -> Option<u32> {
        Some(
            match self {
                ColKind::Text | ColKind::Array(_) => return None,
                ColKind::AsText => Type::TEXT,
                ColKind::Bool => Type::BOOL,
                ColKind::Int2 => Type::INT2,
                ColKind::Int4 => Type::INT4,
                ColKind::Int8 => Type::INT8,
                ColKind::Float4 => Type::FLOAT4,
                ColKind::Float8 => Type::FLOAT8,
                ColKind::Timestamp => Type::TIMESTAMP,
                ColKind::TimestampTz => Type::TIMESTAMPTZ,
                ColKind::Date => Type::DATE,
                ColKind::Uuid => Type::UUID,
                ColKind::Json => Type::JSON,
                ColKind::Jsonb => Type::JSONB,
                ColKind::Bytea => Type::BYTEA,
            }
            .oid(),
        )
    }

    /// Whether our rendering of a value is exactly the server's text form, so a cursor can
    /// use it without asking the server for `::text`.
    pub(crate) fn text_is_exact(&self) -> bool {
        matches!(
            self,
            ColKind::Text | ColKind::AsText | ColKind::Int2 | ColKind::Int4 | ColKind::Int8 | ColKind::Uuid
        )
    }

    /// timestamp, timestamptz or date: usable as a document time.
    pub(crate) fn is_time(&self) -> bool {
        matches!(self, ColKind::Timestamp | ColKind::TimestampTz | ColKind::Date)
    }
}

/// The undecoded bytes of one value (None for NULL), borrowed from the row.
struct Raw<'a>(Option<&'a [u8]>);

impl<'a> FromSql<'a> for Raw<'a> {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(Some(raw)))
    }
    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(None))
    }
    fn accepts(_: &Type) -> bool {
        true
    }
}

fn raw(row: &Row, idx: usize) -> Result<Option<&[u8]>, String> {
    row.try_get::<_, Raw<'_>>(idx).map(|r| r.0).map_err(|e| format!("column {idx}: {e}"))
}

fn fixed<const N: usize>(bytes: &[u8]) -> Result<[u8; N], String> {
    bytes.try_into().map_err(|_| format!("expected {N} bytes, got {}", bytes.len()))
}

fn utf8(bytes: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(bytes).map_err(|e| format!("invalid UTF-8: {e}"))
}

/// Microseconds since the PostgreSQL epoch to a UTC time; None for ±infinity and out of range.
fn micros_to_time(micros: i64) -> Option<DateTime<Utc>> {
    if micros == i64::MAX || micros == i64::MIN {
        return None;
    }
    DateTime::from_timestamp_micros(micros.checked_add(PG_EPOCH_MICROS)?)
}

fn days_to_date(days: i32) -> Option<NaiveDate> {
    if days == i32::MAX || days == i32::MIN {
        return None;
    }
    DateTime::from_timestamp((days as i64 + PG_EPOCH_DAYS) * 86_400, 0).map(|t| t.date_naive())
}

fn infinity(positive: bool) -> Value {
    Value::String(if positive { "infinity" } else { "-infinity" }.into())
}

fn float(f: f64) -> Value {
    match Number::from_f64(f) {
        Some(n) => Value::Number(n),
        None if f.is_nan() => Value::String("NaN".into()),
        None => infinity(f > 0.0),
    }
}

/// Decodes one non-NULL binary value to its metadata JSON.
pub(crate) fn decode_value(kind: &ColKind, bytes: &[u8]) -> Result<Value, String> {
    Ok(match kind {
        ColKind::Text | ColKind::AsText => Value::String(utf8(bytes)?.to_owned()),
        ColKind::Bool => Value::Bool(fixed::<1>(bytes)?[0] != 0),
        ColKind::Int2 => Value::from(i16::from_be_bytes(fixed(bytes)?)),
        ColKind::Int4 => Value::from(i32::from_be_bytes(fixed(bytes)?)),
        ColKind::Int8 => Value::from(i64::from_be_bytes(fixed(bytes)?)),
        ColKind::Float4 => {
            let f = f32::from_be_bytes(fixed(bytes)?);
            // Widen through the shortest decimal form so 0.1f32 stays 0.1, not 0.10000000149.
            float(if f.is_finite() { f.to_string().parse().unwrap_or(f as f64) } else { f as f64 })
        }
        ColKind::Float8 => float(f64::from_be_bytes(fixed(bytes)?)),
        ColKind::Timestamp | ColKind::TimestampTz => {
            let micros = i64::from_be_bytes(fixed(bytes)?);
            match micros_to_time(micros) {
                Some(t) => Value::String(t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
                None if micros == i64::MAX || micros == i64::MIN => infinity(micros == i64::MAX),
                None => return Err(format!("timestamp {micros} µs after 2000-01-01 is out of range")),
            }
        }
        ColKind::Date => {
            let days = i32::from_be_bytes(fixed(bytes)?);
            match days_to_date(days) {
                Some(d) => Value::String(d.format("%Y-%m-%d").to_string()),
                None if days == i32::MAX || days == i32::MIN => infinity(days == i32::MAX),
                None => return Err(format!("date {days} days after 2000-01-01 is out of range")),
            }
        }
        ColKind::Uuid => Value::String(format_uuid(&fixed(bytes)?)),
        ColKind::Json => json(bytes)?,
        ColKind::Jsonb => match bytes.split_first() {
            Some((1, text)) => json(text)?,
            _ => return Err("unsupported jsonb binary version".into()),
        },
        ColKind::Bytea => Value::String(base64(bytes)),
        ColKind::Array(elem) => decode_array(elem, bytes)?,
    })
}

/// JSON text to a value. PostgreSQL's `json` accepts numbers JSON parsers reject (`1e400`);
/// such a document is kept as its text rather than failing the row.
fn json(bytes: &[u8]) -> Result<Value, String> {
    match serde_json::from_slice(bytes) {
        Ok(v) => Ok(v),
        Err(_) => Ok(Value::String(utf8(bytes)?.to_owned())),
    }
}

/// The binary array format: ndim, has-null flag, element OID, (length, lower bound) per
/// dimension, then each element as a length (-1 for NULL) and bytes. Multi-dimensional arrays
/// become nested JSON arrays.
fn decode_array(elem: &ColKind, bytes: &[u8]) -> Result<Value, String> {
    let mut rest = bytes;
    let mut take = |n: usize| -> Result<&[u8], String> {
        if rest.len() < n {
            return Err("truncated array".to_string());
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    let ndim = i32::from_be_bytes(fixed(take(4)?)?);
    take(8)?; // has-null flag, element OID
    if ndim <= 0 {
        return Ok(Value::Array(Vec::new()));
    }
    let mut dims = Vec::with_capacity(ndim as usize);
    for _ in 0..ndim {
        let len = i32::from_be_bytes(fixed(take(4)?)?);
        take(4)?; // lower bound
        dims.push(usize::try_from(len).map_err(|_| "negative array dimension")?);
    }
    let total: usize = dims.iter().product();
    let mut flat = Vec::with_capacity(total.min(1 << 16));
    for _ in 0..total {
        let len = i32::from_be_bytes(fixed(take(4)?)?);
        if len < 0 {
            flat.push(Value::Null);
        } else {
            flat.push(decode_value(elem, take(len as usize)?)?);
        }
    }
    // Fold the innermost dimension first: [2][3] -> two arrays of three.
    for &dim in dims[1..].iter().rev() {
        let mut grouped = Vec::with_capacity(flat.len() / dim.max(1));
        let mut it = flat.into_iter();
        loop {
            let chunk: Vec<Value> = it.by_ref().take(dim).collect();
            if chunk.is_empty() {
                break;
            }
            grouped.push(Value::Array(chunk));
        }
        flat = grouped;
    }
    Ok(Value::Array(flat))
}

fn format_uuid(b: &[u8; 16]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push(HEX[(byte >> 4) as usize] as char);
        s.push(HEX[(byte & 15) as usize] as char);
    }
    s
}

/// Standard base64 with padding.
pub(crate) fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = (chunk[0] as u32) << 16
            | (*chunk.get(1).unwrap_or(&0) as u32) << 8
            | *chunk.get(2).unwrap_or(&0) as u32;
        out.push(ABC[(n >> 18) as usize & 63] as char);
        out.push(ABC[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 { ABC[(n >> 6) as usize & 63] as char } else { '=' });
        out.push(if chunk.len() > 2 { ABC[n as usize & 63] as char } else { '=' });
    }
    out
}

/// A time column's value as a document time (None for NULL, infinity and non-time columns).
fn time_of(kind: &ColKind, bytes: Option<&[u8]>) -> Option<DateTime<Utc>> {
    let bytes = bytes?;
    match kind {
        ColKind::Timestamp | ColKind::TimestampTz => {
            micros_to_time(i64::from_be_bytes(bytes.try_into().ok()?))
        }
        ColKind::Date => days_to_date(i32::from_be_bytes(bytes.try_into().ok()?))
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|t| t.and_utc()),
        _ => None,
    }
}

/// Appends a metadata value's text form: strings as they are, JSON for composite values,
/// nothing for NULL.
fn push_text(out: &mut String, value: &Value) {
    match value {
        Value::Null => {}
        Value::String(s) => out.push_str(s),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            let _ = write!(out, "{n}");
        }
        other => {
            let _ = write!(out, "{other}");
        }
    }
}

fn text_of(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => {
            let mut s = String::new();
            push_text(&mut s, other);
            Some(s)
        }
    }
}

/// The first line of `s`, at most `max` characters.
fn truncate_title(s: &str, max: usize) -> String {
    let line = s.trim_start().lines().next().unwrap_or("").trim_end();
    match line.char_indices().nth(max) {
        Some((cut, _)) => line[..cut].to_string(),
        None => line.to_string(),
    }
}

/// The cursor text of the timestamp or key of a row (None for NULL).
pub(crate) fn cursor_text(row: &Row, source: TextSource) -> Result<Option<String>, String> {
    let idx = match source {
        TextSource::Column(i) | TextSource::Extra(i) => i,
    };
    Ok(match raw(row, idx)? {
        None => None,
        Some(bytes) => match source {
            TextSource::Extra(_) => Some(utf8(bytes)?.to_owned()),
            TextSource::Column(i) => Some(match &row_kind_text(row, i, bytes)? {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            }),
        },
    })
}

/// Decodes a key column (text, integers, uuid: the kinds whose rendering is exact) by the
/// row's own column type.
fn row_kind_text(row: &Row, idx: usize, bytes: &[u8]) -> Result<Value, String> {
    let ty = row.columns()[idx].type_();
    let kind = match *ty {
        Type::INT2 => ColKind::Int2,
        Type::INT4 => ColKind::Int4,
        Type::INT8 => ColKind::Int8,
        Type::UUID => ColKind::Uuid,
        _ => ColKind::Text,
    };
    decode_value(&kind, bytes)
}

/// A decoded row: the document, or why it could not be built (keyed by the document id).
pub(crate) struct DecodedRow {
    pub result: Result<Document, (String, String)>,
    /// Approximate bytes the row holds in memory, for batch limits.
    pub size: usize,
}

/// Builds the document of one row. Only a row whose primary key cannot be read fails as a
/// whole (the caller ends the stream); any other problem becomes a per-row failure.
pub(crate) fn decode_row(plan: &TablePlan, row: &Row) -> Result<DecodedRow, String> {
    let pk = cursor_text(row, plan.pk_text)?.ok_or("primary key is NULL")?;
    let mut id = String::with_capacity(plan.id_prefix.len() + pk.len());
    id.push_str(&plan.id_prefix);
    id.push_str(&pk);

    let mut values = Vec::with_capacity(plan.columns.len());
    let mut size = 0;
    for (i, column) in plan.columns.iter().enumerate() {
        let value = match raw(row, i)? {
            None => Value::Null,
            Some(bytes) => {
                size += bytes.len();
                match decode_value(&column.kind, bytes) {
                    Ok(v) => v,
                    Err(e) => {
                        return Ok(DecodedRow {
                            result: Err((id, format!("column {:?}: {e}", column.name))),
                            size,
                        });
                    }
                }
            }
        };
        values.push(value);
    }

    let mut content = String::with_capacity(size + plan.content.len() * 16);
    if let [only] = plan.content[..] {
        push_content(&mut content, plan, row, only, &values[only])?;
    } else {
        for &i in &plan.content {
            if values[i].is_null() {
                continue;
            }
            if !content.is_empty() {
                content.push('\n');
            }
            content.push_str(&plan.columns[i].name);
            content.push_str(": ");
            push_content(&mut content, plan, row, i, &values[i])?;
        }
    }

    let title = plan
        .title_idx
        .and_then(|i| text_of(&values[i]))
        .or_else(|| {
            plan.content
                .iter()
                .find(|&&i| plan.columns[i].kind != ColKind::Bytea && !values[i].is_null())
                .and_then(|&i| text_of(&values[i]))
                .map(|t| truncate_title(&t, MAX_TITLE_CHARS))
                .filter(|t| !t.is_empty())
        })
        .unwrap_or_else(|| format!("{} {pk}", plan.table));
    let author = plan.author_idx.and_then(|i| text_of(&values[i]));
    let created_at = match plan.created_idx {
        Some(i) => time_of(&plan.columns[i].kind, raw(row, i)?),
        None => None,
    };
    let updated_at = time_of(&plan.columns[plan.ts_idx].kind, raw(row, plan.ts_idx)?);

    let mut url = String::with_capacity(plan.url_prefix.len() + pk.len());
    url.push_str(&plan.url_prefix);
    url_encode_into(&mut url, &pk);

    // Text content columns are already in `content`, verbatim; repeating them in metadata
    // would double what every document stores and hashes. Typed values stay.
    let mut metadata = Map::new();
    for (i, (column, value)) in plan.columns.iter().zip(values).enumerate() {
        if column.kind != ColKind::Text || !plan.content.contains(&i) {
            metadata.insert(column.name.clone(), value);
        }
    }
    size += content.len() + title.len() + id.len() + url.len();
    Ok(DecodedRow {
        result: Ok(Document {
            id,
            kind: "row".into(),
            title,
            content,
            url: Some(url),
            author,
            created_at,
            updated_at,
            metadata: Value::Object(metadata),
        }),
        size,
    })
}

/// A content value: its text form; a `bytea` listed in `content_columns` as (lossy) UTF-8
/// text, since base64 is not searchable.
fn push_content(
    out: &mut String,
    plan: &TablePlan,
    row: &Row,
    i: usize,
    value: &Value,
) -> Result<(), String> {
    if plan.columns[i].kind == ColKind::Bytea {
        if let Some(bytes) = raw(row, i)? {
            out.push_str(&String::from_utf8_lossy(bytes));
        }
    } else {
        push_text(out, value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn decode(kind: ColKind, bytes: &[u8]) -> Value {
        decode_value(&kind, bytes).unwrap()
    }

    #[test]
    fn scalars_map_to_typed_json() {
        assert_eq!(decode(ColKind::Text, "héllo".as_bytes()), json!("héllo"));
        assert_eq!(
            decode(ColKind::AsText, b"12345678901234567890.000000001"),
            json!("12345678901234567890.000000001")
        );
        assert_eq!(decode(ColKind::Bool, &[1]), json!(true));
        assert_eq!(decode(ColKind::Bool, &[0]), json!(false));
        assert_eq!(decode(ColKind::Int2, &(-2i16).to_be_bytes()), json!(-2));
        assert_eq!(decode(ColKind::Int4, &7i32.to_be_bytes()), json!(7));
        assert_eq!(decode(ColKind::Int8, &i64::MAX.to_be_bytes()), json!(i64::MAX));
        assert_eq!(decode(ColKind::Float4, &0.1f32.to_be_bytes()), json!(0.1));
        assert_eq!(decode(ColKind::Float8, &2.5f64.to_be_bytes()), json!(2.5));
        assert_eq!(decode(ColKind::Float8, &f64::NAN.to_be_bytes()), json!("NaN"));
        assert_eq!(decode(ColKind::Float8, &f64::NEG_INFINITY.to_be_bytes()), json!("-infinity"));
        let uuid = [0x55, 0x0e, 0x84, 0x00, 0xe2, 0x9b, 0x41, 0xd4, 0xa7, 0x16, 0x44, 0x66, 0x55, 0x44, 0, 0];
        assert_eq!(decode(ColKind::Uuid, &uuid), json!("550e8400-e29b-41d4-a716-446655440000"));
        assert_eq!(decode(ColKind::Json, br#"{"a":[1,2]}"#), json!({"a": [1, 2]}));
        assert_eq!(decode(ColKind::Jsonb, b"\x01{\"a\":null}"), json!({"a": null}));
        assert_eq!(decode(ColKind::Json, b"[1e400]"), json!("[1e400]"));
        assert_eq!(decode(ColKind::Bytea, b"hello!?"), json!("aGVsbG8hPw=="));
        assert!(decode_value(&ColKind::Int4, &[0, 1]).unwrap_err().contains("expected 4 bytes"));
    }

    #[test]
    fn times_are_rfc3339_utc() {
        // 2024-05-01T12:00:00.5Z in µs since 2000-01-01.
        let micros: i64 = 767_880_000_500_000;
        assert_eq!(decode(ColKind::TimestampTz, &micros.to_be_bytes()), json!("2024-05-01T12:00:00.500Z"));
        assert_eq!(decode(ColKind::Timestamp, &0i64.to_be_bytes()), json!("2000-01-01T00:00:00Z"));
        assert_eq!(decode(ColKind::TimestampTz, &i64::MAX.to_be_bytes()), json!("infinity"));
        assert_eq!(decode(ColKind::Timestamp, &i64::MIN.to_be_bytes()), json!("-infinity"));
        assert_eq!(decode(ColKind::Date, &(-1i32).to_be_bytes()), json!("1999-12-31"));
        assert_eq!(decode(ColKind::Date, &i32::MIN.to_be_bytes()), json!("-infinity"));
        let t = time_of(&ColKind::TimestampTz, Some(&micros.to_be_bytes())).unwrap();
        assert_eq!(t.to_rfc3339(), "2024-05-01T12:00:00.500+00:00");
        assert_eq!(time_of(&ColKind::TimestampTz, Some(&i64::MAX.to_be_bytes())), None);
        assert_eq!(
            time_of(&ColKind::Date, Some(&1i32.to_be_bytes())).unwrap().to_rfc3339(),
            "2000-01-02T00:00:00+00:00"
        );
    }

    fn array(elem_oid: u32, dims: &[i32], elems: &[Option<&[u8]>]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend((dims.len() as i32).to_be_bytes());
        b.extend((elems.iter().any(Option::is_none) as i32).to_be_bytes());
        b.extend(elem_oid.to_be_bytes());
        for d in dims {
            b.extend(d.to_be_bytes());
            b.extend(1i32.to_be_bytes());
        }
        for e in elems {
            match e {
                None => b.extend((-1i32).to_be_bytes()),
                Some(bytes) => {
                    b.extend((bytes.len() as i32).to_be_bytes());
                    b.extend(*bytes);
                }
            }
        }
        b
    }

    #[test]
    fn arrays_become_nested_json_arrays() {
        let one = 1i32.to_be_bytes();
        let two = 2i32.to_be_bytes();
        let int4 = ColKind::Array(Box::new(ColKind::Int4));
        assert_eq!(
            decode(int4.clone(), &array(23, &[3], &[Some(&one), None, Some(&two)])),
            json!([1, null, 2])
        );
        assert_eq!(decode(int4.clone(), &array(23, &[], &[])), json!([]));
        let grid =
            array(23, &[2, 3], &[Some(&one), Some(&two), Some(&one), Some(&two), Some(&one), Some(&two)]);
        assert_eq!(decode(int4.clone(), &grid), json!([[1, 2, 1], [2, 1, 2]]));
        let text = ColKind::Array(Box::new(ColKind::AsText));
        assert_eq!(decode(text, &array(25, &[2], &[Some(b"1.50"), Some(b"x")])), json!(["1.50", "x"]));
        let truncated = &array(23, &[3], &[Some(&one), Some(&two)]);
        assert!(decode_value(&int4, truncated).is_err());
    }

    #[test]
    fn type_oids_map_to_decoders() {
        let col = |oid, elem| ColumnInfo {
            name: "c".into(),
            type_sql: String::new(),
            type_oid: oid,
            elem_oid: elem,
            not_null: true,
        };
        let cases = [
            (25, None, ColKind::Text),
            (1043, None, ColKind::Text),
            (1042, None, ColKind::Text),
            (19, None, ColKind::Text),
            (16, None, ColKind::Bool),
            (21, None, ColKind::Int2),
            (23, None, ColKind::Int4),
            (20, None, ColKind::Int8),
            (700, None, ColKind::Float4),
            (701, None, ColKind::Float8),
            (1700, None, ColKind::AsText),
            (1114, None, ColKind::Timestamp),
            (1184, None, ColKind::TimestampTz),
            (1082, None, ColKind::Date),
            (2950, None, ColKind::Uuid),
            (114, None, ColKind::Json),
            (3802, None, ColKind::Jsonb),
            (17, None, ColKind::Bytea),
            (1186, None, ColKind::AsText),   // interval
            (1083, None, ColKind::AsText),   // time
            (16_384, None, ColKind::AsText), // an enum or extension type
            (1007, Some(23), ColKind::Array(Box::new(ColKind::Int4))),
            (1231, Some(1700), ColKind::Array(Box::new(ColKind::AsText))),
        ];
        for (oid, elem, kind) in cases {
            assert_eq!(ColKind::for_column(&col(oid, elem)), kind, "oid {oid}");
        }
    }

    #[test]
    fn base64_and_titles() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(&[0xff, 0xfe, 0xfd, 0x00]), "//79AA==");
        assert_eq!(truncate_title("  first line\nsecond", 200), "first line");
        assert_eq!(truncate_title(&"é".repeat(300), 200), "é".repeat(200));
        let mut s = String::new();
        push_text(&mut s, &json!({"k": [1, "a"]}));
        push_text(&mut s, &Value::Null);
        push_text(&mut s, &json!(1.5));
        assert_eq!(s, r#"{"k":[1,"a"]}1.5"#);
    }
}
