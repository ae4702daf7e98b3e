//! Sync, HTTP and webhook metrics in the Prometheus text exposition format (version 0.0.4).
//!
//! [`Metrics`] is a small registry, cheap to clone (clones share the values), that the
//! scheduler feeds with [`SyncResult`]s ([`Metrics::record_sync`]), running syncs
//! ([`Metrics::sync_started`]), the HTTP layer's request counters
//! ([`Metrics::register_http_counters`]) and webhook outcomes ([`Metrics::record_webhook`]).
//! [`Metrics::render`] writes the exposition served at `GET /metrics`.
//!
//! # Families
//! Labelled by `connector_id` and `tenant_id` unless said otherwise:
//!
//! | name | type | what |
//! |---|---|---|
//! | `connectors_syncs_total{status}` | counter | finished syncs by status: `success`, `partial`, `failed`, `cancelled` |
//! | `connectors_items_synced_total` | counter | documents written (new or changed) |
//! | `connectors_items_failed_total` | counter | items that failed |
//! | `connectors_items_deleted_total` | counter | documents deleted |
//! | `connectors_items_unchanged_total` | counter | documents read but unchanged |
//! | `connectors_sync_errors_total` | counter | error messages reported by syncs |
//! | `connectors_sync_duration_seconds` | histogram | wall time of finished syncs ([`SYNC_DURATION_BUCKETS`]) |
//! | `connectors_sync_running` | gauge | syncs running now |
//! | `connectors_api_requests_total` | counter | API requests sent, retries included (feature `http`) |
//! | `connectors_api_retries_total` | counter | API requests that were retries (feature `http`) |
//! | `connectors_api_responses_total{class}` | counter | API responses by class: `2xx`, `304`, `4xx`, `429`, `5xx`, `other` (feature `http`) |
//! | `connectors_api_transport_errors_total` | counter | API attempts without a complete response (feature `http`) |
//! | `connectors_api_received_bytes_total` | counter | API response body bytes (feature `http`) |
//! | `connectors_webhooks_total{source,outcome}` | counter | webhook requests by source and outcome (no connector labels) |
//!
//! # Output
//! Families are written in name order, each with its `# HELP` and `# TYPE` lines (also when it
//! has no sample yet), and samples in label order, so two renders of the same values are
//! byte-identical. Label values are escaped as the format asks (`\\`, `\"`, `\n`).
//!
//! ```
//! use connector_core::metrics::Metrics;
//!
//! let metrics = Metrics::new();
//! metrics.record_webhook("github", "accepted");
//! assert!(metrics.render().contains("connectors_webhooks_total{source=\"github\",outcome=\"accepted\"} 1\n"));
//! ```

#[cfg(test)]
pub(crate) mod tests;

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::engine::SyncResult;
use crate::error::ErrorKind;
#[cfg(feature = "http")]
use crate::http::HttpCounters;
use crate::ids::{ConnectorId, TenantId};

/// The `Content-Type` of the exposition [`Metrics::render`] writes.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds (seconds) of the `connectors_sync_duration_seconds` buckets: from a quick
/// incremental sync (under a second) to a long full sync (two hours); longer ones land in
/// `+Inf` only.
pub const SYNC_DURATION_BUCKETS: &[f64] =
    &[0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0];

/// `(connector_id, tenant_id)`.
type Series = (String, String);

/// A registry of the connectors' metrics. Cheap to clone: clones share the values.
#[derive(Clone, Default)]
pub struct Metrics {
    inner: Arc<Mutex<Registry>>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.lock();
        f.debug_struct("Metrics")
            .field("connectors", &r.items_synced.len())
            .field("webhook_series", &r.webhooks.len())
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Registry {
    syncs: BTreeMap<(Series, &'static str), u64>,
    items_synced: BTreeMap<Series, u64>,
    items_failed: BTreeMap<Series, u64>,
    items_deleted: BTreeMap<Series, u64>,
    items_unchanged: BTreeMap<Series, u64>,
    sync_errors: BTreeMap<Series, u64>,
    durations: BTreeMap<Series, Histogram>,
    running: BTreeMap<Series, i64>,
    webhooks: BTreeMap<(String, String), u64>,
    #[cfg(feature = "http")]
    http: BTreeMap<Series, HttpCounters>,
}

impl Registry {
    /// Creates the zero-valued series of a connector, so it shows before its first sync.
    fn touch(&mut self, series: &Series) {
        for map in [
            &mut self.items_synced,
            &mut self.items_failed,
            &mut self.items_deleted,
            &mut self.items_unchanged,
            &mut self.sync_errors,
        ] {
            map.entry(series.clone()).or_default();
        }
        self.running.entry(series.clone()).or_default();
        self.durations.entry(series.clone()).or_insert_with(Histogram::new);
    }
}

/// A histogram over [`SYNC_DURATION_BUCKETS`].
#[derive(Clone)]
struct Histogram {
    /// Observations per bucket (not cumulative); the last cell is above every bound.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new() -> Self {
        Self { counts: vec![0; SYNC_DURATION_BUCKETS.len() + 1], sum: 0.0, count: 0 }
    }

    fn observe(&mut self, value: f64) {
        let i = SYNC_DURATION_BUCKETS.iter().position(|b| value <= *b).unwrap_or(SYNC_DURATION_BUCKETS.len());
        self.counts[i] += 1;
        self.sum += value;
        self.count += 1;
    }
}

/// Marks a sync as running in `connectors_sync_running` until dropped.
///
/// Returned by [`Metrics::sync_started`]; dropping it (however the sync ends, panics
/// included) decrements the gauge.
#[must_use = "the sync counts as running only while the guard lives"]
pub struct RunningSync {
    metrics: Metrics,
    series: Series,
}

impl fmt::Debug for RunningSync {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunningSync")
            .field("connector_id", &self.series.0)
            .field("tenant_id", &self.series.1)
            .finish()
    }
}

impl Drop for RunningSync {
    fn drop(&mut self) {
        let mut r = self.metrics.lock();
        if let Some(v) = r.running.get_mut(&self.series) {
            *v -= 1;
        }
    }
}

/// The `status` label of a finished sync: `success`, `partial` (completed with failed items),
/// `cancelled` or `failed`. The same names as [`SyncStatus`](crate::SyncStatus).
pub fn sync_status(result: &SyncResult) -> &'static str {
    match result.error_kind {
        None if result.success => "success",
        None if result.items_failed > 0 => "partial",
        Some(ErrorKind::Cancelled) => "cancelled",
        _ => "failed",
    }
}

fn series(connector_id: &ConnectorId, tenant_id: &TenantId) -> Series {
    (connector_id.as_str().to_owned(), tenant_id.as_str().to_owned())
}

impl Metrics {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding the lock cannot leave a half-updated value that matters for
        // metrics: keep serving them.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates a connector's series at zero, so dashboards see it before its first sync.
    pub fn register_connector(&self, connector_id: &ConnectorId, tenant_id: &TenantId) {
        self.lock().touch(&series(connector_id, tenant_id));
    }

    /// Counts a finished sync: its status, items, errors and duration.
    pub fn record_sync(&self, result: &SyncResult) {
        let key = series(&result.connector_id, &result.tenant_id);
        let mut r = self.lock();
        r.touch(&key);
        *r.syncs.entry((key.clone(), sync_status(result))).or_default() += 1;
        let add = |map: &mut BTreeMap<Series, u64>, n: u64| {
            if let Some(v) = map.get_mut(&key) {
                *v += n;
            }
        };
        add(&mut r.items_synced, result.items_synced);
        add(&mut r.items_failed, result.items_failed);
        add(&mut r.items_deleted, result.items_deleted);
        add(&mut r.items_unchanged, result.items_unchanged);
        add(&mut r.sync_errors, result.errors.len() as u64);
        if let Some(h) = r.durations.get_mut(&key) {
            h.observe(result.duration.as_secs_f64());
        }
    }

    /// Marks a sync of the connector as running until the returned guard is dropped.
    pub fn sync_started(&self, connector_id: &ConnectorId, tenant_id: &TenantId) -> RunningSync {
        let key = series(connector_id, tenant_id);
        {
            let mut r = self.lock();
            r.touch(&key);
            *r.running.entry(key.clone()).or_default() += 1;
        }
        RunningSync { metrics: self.clone(), series: key }
    }

    /// Exposes a connector's HTTP request counters (read at each render). Registering
    /// counters again for the same connector replaces the earlier ones.
    #[cfg(feature = "http")]
    pub fn register_http_counters(
        &self,
        connector_id: &ConnectorId,
        tenant_id: &TenantId,
        counters: HttpCounters,
    ) {
        let key = series(connector_id, tenant_id);
        let mut r = self.lock();
        r.touch(&key);
        r.http.insert(key, counters);
    }

    /// Counts a webhook request of `source` (`github`) with `outcome` (`accepted`,
    /// `bad_signature`, ...).
    pub fn record_webhook(&self, source: &str, outcome: &str) {
        *self.lock().webhooks.entry((source.to_owned(), outcome.to_owned())).or_default() += 1;
    }

    /// The current values in the Prometheus text exposition format 0.0.4 (serve with
    /// [`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let r = self.lock();
        let mut families: Vec<Family> = Vec::new();

        let mut syncs = Family::new("connectors_syncs_total", "counter", "Finished syncs by status.");
        for (((c, t), status), v) in &r.syncs {
            syncs.sample(
                "",
                &[("connector_id", c.as_str()), ("tenant_id", t.as_str()), ("status", *status)],
                v,
            );
        }
        families.push(syncs);

        for (name, help, map) in [
            ("connectors_items_synced_total", "Documents written (new or changed).", &r.items_synced),
            ("connectors_items_failed_total", "Items that failed.", &r.items_failed),
            ("connectors_items_deleted_total", "Documents deleted.", &r.items_deleted),
            ("connectors_items_unchanged_total", "Documents read but unchanged.", &r.items_unchanged),
            ("connectors_sync_errors_total", "Error messages reported by syncs.", &r.sync_errors),
        ] {
            let mut f = Family::new(name, "counter", help);
            for ((c, t), v) in map {
                f.sample("", &[("connector_id", c.as_str()), ("tenant_id", t.as_str())], v);
            }
            families.push(f);
        }

        let mut running = Family::new("connectors_sync_running", "gauge", "Syncs running now.");
        for ((c, t), v) in &r.running {
            running.sample("", &[("connector_id", c.as_str()), ("tenant_id", t.as_str())], v);
        }
        families.push(running);

        let mut durations = Family::new(
            "connectors_sync_duration_seconds",
            "histogram",
            "Wall time of finished syncs in seconds.",
        );
        for ((c, t), h) in &r.durations {
            let mut cumulative = 0;
            for (i, n) in h.counts.iter().enumerate() {
                cumulative += n;
                let le = SYNC_DURATION_BUCKETS.get(i).map_or_else(|| "+Inf".to_owned(), |b| format_float(*b));
                durations.sample(
                    "_bucket",
                    &[("connector_id", c.as_str()), ("tenant_id", t.as_str()), ("le", le.as_str())],
                    cumulative,
                );
            }
            durations.sample(
                "_sum",
                &[("connector_id", c.as_str()), ("tenant_id", t.as_str())],
                format_float(h.sum),
            );
            durations.sample("_count", &[("connector_id", c.as_str()), ("tenant_id", t.as_str())], h.count);
        }
        families.push(durations);

        #[cfg(feature = "http")]
        families.extend(http_families(&r.http));

        let mut webhooks =
            Family::new("connectors_webhooks_total", "counter", "Webhook requests by source and outcome.");
        for ((source, outcome), v) in &r.webhooks {
            webhooks.sample("", &[("source", source.as_str()), ("outcome", outcome.as_str())], v);
        }
        families.push(webhooks);
        drop(r);

        families.sort_by(|a, b| a.name.cmp(b.name));
        let mut out = String::new();
        for f in families {
            let _ = writeln!(out, "# HELP {} {}", f.name, escape_help(f.help));
            let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
            out.push_str(&f.lines);
        }
        out
    }
}

#[cfg(feature = "http")]
fn http_families(http: &BTreeMap<Series, HttpCounters>) -> Vec<Family> {
    let mut requests =
        Family::new("connectors_api_requests_total", "counter", "API requests sent, retries included.");
    let mut retries =
        Family::new("connectors_api_retries_total", "counter", "API requests that were retries.");
    let mut responses =
        Family::new("connectors_api_responses_total", "counter", "API responses by status class.");
    let mut transport = Family::new(
        "connectors_api_transport_errors_total",
        "counter",
        "API attempts that got no complete response.",
    );
    let mut bytes =
        Family::new("connectors_api_received_bytes_total", "counter", "API response body bytes received.");
    for ((c, t), counters) in http {
        let s = counters.snapshot();
        let labels = [("connector_id", c.as_str()), ("tenant_id", t.as_str())];
        requests.sample("", &labels, s.requests);
        retries.sample("", &labels, s.retries);
        for (class, v) in [
            ("2xx", s.status_2xx),
            ("304", s.status_304),
            ("4xx", s.status_4xx),
            ("429", s.status_429),
            ("5xx", s.status_5xx),
            ("other", s.status_other),
        ] {
            responses.sample(
                "",
                &[("connector_id", c.as_str()), ("tenant_id", t.as_str()), ("class", class)],
                v,
            );
        }
        transport.sample("", &labels, s.transport_errors);
        bytes.sample("", &labels, s.bytes_received);
    }
    vec![requests, retries, responses, transport, bytes]
}

/// One metric family being rendered.
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    lines: String,
}

impl Family {
    fn new(name: &'static str, kind: &'static str, help: &'static str) -> Self {
        Self { name, kind, help, lines: String::new() }
    }

    /// Appends `name{suffix}{labels} value`.
    fn sample(&mut self, suffix: &str, labels: &[(&str, &str)], value: impl fmt::Display) {
        self.lines.push_str(self.name);
        self.lines.push_str(suffix);
        if !labels.is_empty() {
            self.lines.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.lines.push(',');
                }
                let _ = write!(self.lines, "{k}=\"{}\"", escape_label_value(v));
            }
            self.lines.push('}');
        }
        let _ = writeln!(self.lines, " {value}");
    }
}

/// Escapes a label value for the text format: `\` as `\\`, `"` as `\"`, a line feed as `\n`.
pub fn escape_label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Escapes `# HELP` text: `\` as `\\`, a line feed as `\n`.
fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A float as the text format writes it (`+Inf`, `-Inf`, `NaN`, else Rust's shortest form).
fn format_float(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v == f64::INFINITY {
        "+Inf".to_owned()
    } else if v == f64::NEG_INFINITY {
        "-Inf".to_owned()
    } else {
        format!("{v}")
    }
}
