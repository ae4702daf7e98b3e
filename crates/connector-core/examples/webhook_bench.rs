//! Webhook receiver throughput (`cargo xtask bench webhooks`): the webhook server on loopback
//! with GitHub signature checks, and a load generator in the same process sending signed
//! `push` deliveries (a payload from GitHub's published examples) over keep-alive connections
//! for `--seconds` (default 10). Prints requests per second, latency percentiles and CPU use.
//! The server and the load generator share the machine's cores.
//!
//! ```text
//! cargo run --release -p connector-core --example webhook_bench -- [--seconds 10] [--connections 32]
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use connector_core::SecretString;
use connector_core::metrics::Metrics;
use connector_core::webhook::{
    GithubVerifier, HeaderMap, ServerState, WebhookEvent, WebhookSink, WebhookVerifier, serve,
};
use tokio_util::sync::CancellationToken;

mod common;
use common::{cpu_time, peak_rss_mib, percentile};

/// Counts the hints it is handed; a real sink queues them for the scheduler.
#[derive(Default)]
struct CountingSink(AtomicU64);

#[async_trait]
impl WebhookSink for CountingSink {
    async fn deliver(&self, events: Vec<WebhookEvent>) {
        self.0.fetch_add(events.len() as u64, Ordering::Relaxed);
    }
}

fn option(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name} takes a number, not {v:?}")))
        .unwrap_or(default)
}

/// The first `push` example of GitHub's published payloads that names files to sync (a push
/// to the default branch), so every delivery goes all the way to the sink.
fn push_payload(verifier: &GithubVerifier) -> Vec<u8> {
    let path =
        concat!(env!("CARGO_MANIFEST_DIR"), "/../connector-testkit/fixtures/github/webhook-examples.json");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let events: Vec<serde_json::Value> = serde_json::from_str(&text).expect("valid JSON");
    let push = events.iter().find(|e| e["name"] == "push").expect("push examples");
    let mut headers = HeaderMap::new();
    headers.insert("x-github-event", "push".parse().expect("header"));
    push["examples"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|p| serde_json::to_vec(p).expect("serializable"))
        .find(|body| !verifier.events(&headers, body).is_empty())
        .expect("a push example with hints")
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let seconds = option(&args, "--seconds", 10).max(1);
    let connections = option(&args, "--connections", 32).max(1) as usize;

    let secret = "bench-webhook-secret";
    let verifier = GithubVerifier::new(SecretString::from(secret)).expect("verifier");
    let body = push_payload(&verifier);
    let signature = verifier.sign(&body);
    let sink = Arc::new(CountingSink::default());
    let state = ServerState::new(sink.clone(), Metrics::new()).with_verifier(Arc::new(verifier));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/api/webhooks/github", listener.local_addr().expect("address"));
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve(listener, state, shutdown.clone()));

    let client = reqwest::Client::builder().pool_max_idle_per_host(connections).build().expect("client");
    // 'static: each request borrows it instead of copying it.
    let body: &'static [u8] = Box::leak(body.into_boxed_slice());
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let cpu_before = cpu_time();
    let started = Instant::now();
    let workers: Vec<_> = (0..connections)
        .map(|_| {
            let (client, url, signature) = (client.clone(), url.clone(), signature.clone());
            tokio::spawn(async move {
                let (mut latencies, mut failures) = (Vec::new(), 0u64);
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    let response = client
                        .post(&url)
                        .header("X-GitHub-Event", "push")
                        .header("X-GitHub-Delivery", "bench")
                        .header("X-Hub-Signature-256", &signature)
                        .header("Content-Type", "application/json")
                        .body(body)
                        .send()
                        .await;
                    match response {
                        Ok(r) if r.status().is_success() => latencies.push(sent.elapsed().as_micros() as u64),
                        _ => failures += 1,
                    }
                }
                (latencies, failures)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut failures = 0;
    for worker in workers {
        let (l, f) = worker.await.expect("worker");
        latencies.extend(l);
        failures += f;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = match (cpu_before, cpu_time()) {
        (Some(a), Some(b)) => Some((b - a).as_secs_f64()),
        _ => None,
    };
    shutdown.cancel();
    let _ = server.await;
    latencies.sort_unstable();
    let done = latencies.len() as f64;
    println!(
        "webhooks: {connections} connections for {elapsed:.1} s, {} bytes a delivery, GitHub signature checked on each",
        body.len()
    );
    println!(
        "  {:.0} deliveries/s ({:.1} MB/s), {failures} failed, {} hints delivered",
        done / elapsed,
        done * body.len() as f64 / elapsed / 1e6,
        sink.0.load(Ordering::Relaxed)
    );
    println!(
        "  latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0)
    );
    if let Some(cpu) = cpu {
        println!(
            "  CPU {cpu:.1} s ({:.0}% of one core; server and load generator together)",
            cpu / elapsed * 100.0
        );
    }
    if let Some(rss) = peak_rss_mib() {
        println!("  peak RSS {rss:.1} MiB");
    }
}
