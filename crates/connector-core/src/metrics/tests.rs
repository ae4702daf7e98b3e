use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::*;
use crate::engine::{SyncResult, SyncTimings};

/// One sample of an exposition.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_value(text: &str) -> f64 {
    match text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        _ => text.parse().unwrap_or_else(|_| panic!("bad value {text:?}")),
    }
}

/// Parses a text exposition (format 0.0.4) line by line, checking what the format requires:
/// a `# HELP` then a `# TYPE` line per family before its samples, each once; samples grouped
/// under their family; valid metric and label names; escaped label values; histogram buckets
/// with `le`. Also checks this crate's promise: families in name order.
pub(crate) fn parse(text: &str) -> Vec<Sample> {
    assert!(text.ends_with('\n'), "an exposition ends with a line feed");
    let mut helps = HashSet::new();
    let mut types: HashMap<String, String> = HashMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut samples = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let at = || format!("line {}: {line:?}", n + 1);
        assert!(!line.is_empty(), "{}", at());
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or_else(|| panic!("{}", at()));
            assert!(valid_name(name), "{}", at());
            assert!(!help.is_empty(), "{}", at());
            // Only `\\` and `\n` escapes in HELP text.
            let mut chars = help.chars();
            while let Some(c) = chars.next() {
                if c == '\\' {
                    assert!(matches!(chars.next(), Some('\\' | 'n')), "{}", at());
                }
            }
            assert!(helps.insert(name.to_owned()), "second HELP, {}", at());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("{}", at()));
            assert!(helps.contains(name), "TYPE before HELP, {}", at());
            assert!(matches!(kind, "counter" | "gauge" | "histogram" | "summary" | "untyped"), "{}", at());
            assert!(types.insert(name.to_owned(), kind.to_owned()).is_none(), "second TYPE, {}", at());
            order.push(name.to_owned());
            continue;
        }
        assert!(!line.starts_with('#'), "{}", at());

        let end = line.find(['{', ' ']).unwrap_or_else(|| panic!("{}", at()));
        let name = &line[..end];
        assert!(valid_name(name), "{}", at());
        let mut rest = &line[end..];
        let mut labels = Vec::new();
        if let Some(after) = rest.strip_prefix('{') {
            let mut cur = after;
            loop {
                if let Some(r) = cur.strip_prefix('}') {
                    rest = r;
                    break;
                }
                let eq = cur.find('=').unwrap_or_else(|| panic!("{}", at()));
                let label = &cur[..eq];
                assert!(valid_name(label) && !label.starts_with("__"), "{}", at());
                cur = cur[eq + 1..].strip_prefix('"').unwrap_or_else(|| panic!("{}", at()));
                let mut value = String::new();
                let mut it = cur.char_indices();
                let end = loop {
                    match it.next() {
                        Some((i, '"')) => break i + 1,
                        Some((_, '\\')) => match it.next().map(|(_, c)| c) {
                            Some('\\') => value.push('\\'),
                            Some('"') => value.push('"'),
                            Some('n') => value.push('\n'),
                            other => panic!("bad escape {other:?}, {}", at()),
                        },
                        Some((_, '\n')) | None => panic!("unterminated label value, {}", at()),
                        Some((_, c)) => value.push(c),
                    }
                };
                cur = &cur[end..];
                labels.push((label.to_owned(), value));
                if let Some(r) = cur.strip_prefix(',') {
                    cur = r;
                } else {
                    assert!(cur.starts_with('}'), "{}", at());
                }
            }
        }
        let value = rest.strip_prefix(' ').unwrap_or_else(|| panic!("{}", at()));
        assert!(!value.contains(' '), "no timestamps are written, {}", at());
        let value = parse_value(value);

        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s).filter(|base| types.get(*base).map(String::as_str) == Some("histogram"))
            })
            .unwrap_or(name);
        assert_eq!(order.last().map(String::as_str), Some(family), "sample outside its family, {}", at());
        if name.ends_with("_bucket") && family != name {
            assert!(labels.iter().any(|(k, _)| k == "le"), "{}", at());
        }
        samples.push(Sample { name: name.to_owned(), labels, value });
    }
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted, "families in name order");
    samples
}

/// The value of the sample `name` with exactly `labels` (in any order).
pub(crate) fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && s.labels.len() == labels.len()
                && labels.iter().all(|(k, v)| s.labels.iter().any(|(k2, v2)| k2 == k && v2 == v))
        })
        .map(|s| s.value)
}

fn result(connector: &str, tenant: &str) -> SyncResult {
    SyncResult {
        connector_id: ConnectorId::new(connector).unwrap(),
        tenant_id: TenantId::new(tenant).unwrap(),
        success: true,
        full_sync: false,
        items_synced: 5,
        items_failed: 0,
        items_deleted: 2,
        items_unchanged: 3,
        errors: vec![],
        error_kind: None,
        duration: Duration::from_millis(1500),
        timings: SyncTimings::default(),
    }
}

const DOCS: [(&str, &str); 2] = [("connector_id", "docs-db"), ("tenant_id", "workspace-1")];

#[test]
fn recorded_sync_result_is_exposed() {
    let metrics = Metrics::new();
    metrics.record_sync(&result("docs-db", "workspace-1"));
    let text = metrics.render();
    let s = parse(&text);

    let with = |extra: (&'static str, &'static str)| [DOCS[0], DOCS[1], extra];
    assert_eq!(value(&s, "connectors_syncs_total", &with(("status", "success"))), Some(1.0));
    assert_eq!(value(&s, "connectors_items_synced_total", &DOCS), Some(5.0));
    assert_eq!(value(&s, "connectors_items_failed_total", &DOCS), Some(0.0));
    assert_eq!(value(&s, "connectors_items_deleted_total", &DOCS), Some(2.0));
    assert_eq!(value(&s, "connectors_items_unchanged_total", &DOCS), Some(3.0));
    assert_eq!(value(&s, "connectors_sync_errors_total", &DOCS), Some(0.0));
    assert_eq!(value(&s, "connectors_sync_running", &DOCS), Some(0.0));
    assert_eq!(value(&s, "connectors_sync_duration_seconds_bucket", &with(("le", "1"))), Some(0.0));
    assert_eq!(value(&s, "connectors_sync_duration_seconds_bucket", &with(("le", "2.5"))), Some(1.0));
    assert_eq!(value(&s, "connectors_sync_duration_seconds_bucket", &with(("le", "+Inf"))), Some(1.0));
    assert_eq!(value(&s, "connectors_sync_duration_seconds_sum", &DOCS), Some(1.5));
    assert_eq!(value(&s, "connectors_sync_duration_seconds_count", &DOCS), Some(1.0));
    // Buckets are cumulative and ascending, one per bound plus +Inf.
    let buckets: Vec<f64> =
        s.iter().filter(|x| x.name == "connectors_sync_duration_seconds_bucket").map(|x| x.value).collect();
    assert_eq!(buckets.len(), SYNC_DURATION_BUCKETS.len() + 1);
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]));

    assert!(text.contains("# TYPE connectors_syncs_total counter\n"));
    assert!(text.contains("# TYPE connectors_sync_running gauge\n"));
    assert!(text.contains("# TYPE connectors_sync_duration_seconds histogram\n"));
    assert!(
        text.contains(
            "connectors_items_synced_total{connector_id=\"docs-db\",tenant_id=\"workspace-1\"} 5\n"
        )
    );
    // Deterministic.
    assert_eq!(text, metrics.render());
}

#[test]
fn statuses_errors_and_running_gauge() {
    let metrics = Metrics::new();
    let mut partial = result("docs-db", "workspace-1");
    partial.success = false;
    partial.items_failed = 2;
    partial.errors = vec!["row 7: bad".into(), "row 9: bad".into()];
    let mut failed = result("docs-db", "workspace-1");
    failed.success = false;
    failed.error_kind = Some(ErrorKind::Auth);
    failed.errors = vec!["authentication failed".into()];
    let mut cancelled = result("docs-db", "workspace-1");
    cancelled.success = false;
    cancelled.error_kind = Some(ErrorKind::Cancelled);
    cancelled.duration = Duration::from_secs(10_000);
    assert_eq!(sync_status(&partial), "partial");
    assert_eq!(sync_status(&failed), "failed");
    assert_eq!(sync_status(&cancelled), "cancelled");

    let guard = metrics.sync_started(&partial.connector_id, &partial.tenant_id);
    let s = parse(&metrics.render());
    assert_eq!(value(&s, "connectors_sync_running", &DOCS), Some(1.0));
    drop(guard);

    for r in [&partial, &failed, &cancelled, &failed] {
        metrics.record_sync(r);
    }
    let s = parse(&metrics.render());
    let status = |st: &'static str| [DOCS[0], DOCS[1], ("status", st)];
    assert_eq!(value(&s, "connectors_syncs_total", &status("partial")), Some(1.0));
    assert_eq!(value(&s, "connectors_syncs_total", &status("failed")), Some(2.0));
    assert_eq!(value(&s, "connectors_syncs_total", &status("cancelled")), Some(1.0));
    assert_eq!(value(&s, "connectors_syncs_total", &status("success")), None);
    assert_eq!(value(&s, "connectors_sync_errors_total", &DOCS), Some(4.0));
    assert_eq!(value(&s, "connectors_items_failed_total", &DOCS), Some(2.0));
    assert_eq!(value(&s, "connectors_sync_running", &DOCS), Some(0.0));
    // 10 000 s is above every bound: only in +Inf.
    let bucket = |le: &'static str| [DOCS[0], DOCS[1], ("le", le)];
    assert_eq!(value(&s, "connectors_sync_duration_seconds_bucket", &bucket("7200")), Some(3.0));
    assert_eq!(value(&s, "connectors_sync_duration_seconds_bucket", &bucket("+Inf")), Some(4.0));
}

#[test]
fn series_sorted_and_registered_connectors_start_at_zero() {
    let metrics = Metrics::new();
    metrics.record_sync(&result("zeta", "t1"));
    metrics.register_connector(&ConnectorId::new("alpha").unwrap(), &TenantId::new("t1").unwrap());
    let s = parse(&metrics.render());
    let synced: Vec<&str> = s
        .iter()
        .filter(|x| x.name == "connectors_items_synced_total")
        .map(|x| x.labels[0].1.as_str())
        .collect();
    assert_eq!(synced, ["alpha", "zeta"]);
    assert_eq!(
        value(&s, "connectors_items_synced_total", &[("connector_id", "alpha"), ("tenant_id", "t1")]),
        Some(0.0)
    );
}

#[test]
fn label_values_are_escaped() {
    assert_eq!(escape_label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    let metrics = Metrics::new();
    let nasty = "we\"ird\\source\nname";
    metrics.record_webhook(nasty, "accepted");
    metrics.record_webhook(nasty, "accepted");
    let text = metrics.render();
    assert!(text.contains(
        "connectors_webhooks_total{source=\"we\\\"ird\\\\source\\nname\",outcome=\"accepted\"} 2\n"
    ));
    let s = parse(&text);
    assert_eq!(
        value(&s, "connectors_webhooks_total", &[("source", nasty), ("outcome", "accepted")]),
        Some(2.0)
    );
}

#[test]
fn empty_registry_still_describes_every_family() {
    let text = Metrics::new().render();
    assert!(parse(&text).is_empty());
    for family in [
        "connectors_syncs_total",
        "connectors_items_synced_total",
        "connectors_items_failed_total",
        "connectors_items_deleted_total",
        "connectors_sync_errors_total",
        "connectors_sync_duration_seconds",
        "connectors_sync_running",
        "connectors_webhooks_total",
    ] {
        assert!(text.contains(&format!("# HELP {family} ")), "{family}");
        assert!(text.contains(&format!("# TYPE {family} ")), "{family}");
    }
}

#[cfg(feature = "http")]
#[test]
fn http_counters_are_exposed() {
    use crate::http::HttpCounters;
    use reqwest::StatusCode;

    let metrics = Metrics::new();
    let counters = HttpCounters::new();
    let (cid, tid) = (ConnectorId::new("docs-db").unwrap(), TenantId::new("workspace-1").unwrap());
    metrics.register_http_counters(&cid, &tid, counters.clone());
    counters.record_request(false);
    counters.record_request(true);
    counters.record_request(false);
    counters.record_status(StatusCode::OK);
    counters.record_status(StatusCode::TOO_MANY_REQUESTS);
    counters.record_transport_error();
    counters.record_bytes(1234);

    let s = parse(&metrics.render());
    assert_eq!(value(&s, "connectors_api_requests_total", &DOCS), Some(3.0));
    assert_eq!(value(&s, "connectors_api_retries_total", &DOCS), Some(1.0));
    assert_eq!(value(&s, "connectors_api_responses_total", &[DOCS[0], DOCS[1], ("class", "2xx")]), Some(1.0));
    assert_eq!(value(&s, "connectors_api_responses_total", &[DOCS[0], DOCS[1], ("class", "429")]), Some(1.0));
    assert_eq!(value(&s, "connectors_api_responses_total", &[DOCS[0], DOCS[1], ("class", "5xx")]), Some(0.0));
    assert_eq!(value(&s, "connectors_api_transport_errors_total", &DOCS), Some(1.0));
    assert_eq!(value(&s, "connectors_api_received_bytes_total", &DOCS), Some(1234.0));
    // Read live at each render.
    counters.record_request(false);
    let s = parse(&metrics.render());
    assert_eq!(value(&s, "connectors_api_requests_total", &DOCS), Some(4.0));
}
