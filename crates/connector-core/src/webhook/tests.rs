use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, Request, StatusCode};
use chrono::{DateTime, Utc};
use secrecy::SecretString;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::*;
use crate::credentials::StaticCredentialProvider;
use crate::engine::{SyncResult, SyncTimings};
use crate::ids::{ConnectorId, TenantId};
use crate::metrics::tests::{parse, value};

// Vendor test vectors (specs/README.md).
const GITHUB_SECRET: &str = "It's a Secret to Everybody";
const GITHUB_BODY: &str = "Hello, World!";
const GITHUB_SIGNATURE: &str = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
const SLACK_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
const SLACK_TIMESTAMP: i64 = 1531420618;
const SLACK_BODY: &str = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
const SLACK_SIGNATURE: &str = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";

fn github() -> GithubVerifier {
    GithubVerifier::new(SecretString::from(GITHUB_SECRET)).unwrap()
}

fn slack() -> SlackVerifier {
    SlackVerifier::new(SecretString::from(SLACK_SECRET)).unwrap()
}

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.insert(*k, HeaderValue::from_str(v).unwrap());
    }
    h
}

fn at(seconds: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(seconds, 0).unwrap()
}

#[derive(Default)]
struct RecordingSink {
    delivered: Mutex<Vec<Vec<WebhookEvent>>>,
}

#[async_trait]
impl WebhookSink for RecordingSink {
    async fn deliver(&self, events: Vec<WebhookEvent>) {
        self.delivered.lock().unwrap().push(events);
    }
}

impl RecordingSink {
    fn take(&self) -> Vec<Vec<WebhookEvent>> {
        std::mem::take(&mut *self.delivered.lock().unwrap())
    }
}

struct Server {
    app: Router,
    sink: Arc<RecordingSink>,
    metrics: Metrics,
    slack: Arc<SlackVerifier>,
}

fn server(body_limit: usize) -> Server {
    let sink = Arc::new(RecordingSink::default());
    let metrics = Metrics::new();
    let slack = Arc::new(slack());
    let state = ServerState::new(sink.clone(), metrics.clone())
        .with_verifier(Arc::new(github()))
        .with_verifier(slack.clone())
        .with_body_limit(body_limit);
    Server { app: router(state), sink, metrics, slack }
}

async fn send(
    app: &Router,
    path: &str,
    pairs: &[(&'static str, &str)],
    body: impl Into<Body>,
) -> (StatusCode, String) {
    let mut request = Request::builder().method("POST").uri(path);
    for (k, v) in pairs {
        request = request.header(*k, *v);
    }
    let response = app.clone().oneshot(request.body(body.into()).unwrap()).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

async fn get(app: &Router, path: &str) -> (StatusCode, Option<String>, String) {
    let request = Request::builder().uri(path).body(Body::empty()).unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let content_type = response.headers().get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap().to_owned());
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, content_type, String::from_utf8(bytes.to_vec()).unwrap())
}

fn webhook_count(metrics: &Metrics, source: &str, outcome: &str) -> Option<f64> {
    value(&parse(&metrics.render()), "connectors_webhooks_total", &[("source", source), ("outcome", outcome)])
}

// ---- signatures -------------------------------------------------------------------------

#[test]
fn github_vendor_vector_verifies() {
    let v = github();
    assert_eq!(v.sign(GITHUB_BODY.as_bytes()), GITHUB_SIGNATURE);
    let h = headers(&[("x-hub-signature-256", GITHUB_SIGNATURE)]);
    assert_eq!(v.verify(&h, GITHUB_BODY.as_bytes(), Utc::now()), Ok(()));
    // Upper-case hex is the same signature.
    let h =
        headers(&[("x-hub-signature-256", &GITHUB_SIGNATURE.to_uppercase().replace("SHA256=", "sha256="))]);
    assert_eq!(v.verify(&h, GITHUB_BODY.as_bytes(), Utc::now()), Ok(()));
}

#[test]
fn github_rejections() {
    let v = github();
    let body = GITHUB_BODY.as_bytes();
    let now = Utc::now();
    assert_eq!(
        v.verify(&HeaderMap::new(), body, now),
        Err(WebhookRejection::MissingHeader("X-Hub-Signature-256"))
    );
    // Another body, another secret, a truncated tag, another algorithm, not hex.
    let h = headers(&[("x-hub-signature-256", GITHUB_SIGNATURE)]);
    assert_eq!(v.verify(&h, b"Hello, World?", now), Err(WebhookRejection::BadSignature));
    let other = GithubVerifier::new(SecretString::from("another secret")).unwrap();
    assert_eq!(other.verify(&h, body, now), Err(WebhookRejection::BadSignature));
    let h = headers(&[("x-hub-signature-256", &GITHUB_SIGNATURE[..GITHUB_SIGNATURE.len() - 2])]);
    assert_eq!(v.verify(&h, body, now), Err(WebhookRejection::BadSignature));
    for bad in ["sha1=757107ea", "757107ea0eb2509fc211221cce984b8a", "sha256=zz"] {
        let h = headers(&[("x-hub-signature-256", bad)]);
        assert_eq!(
            v.verify(&h, body, now),
            Err(WebhookRejection::MalformedHeader("X-Hub-Signature-256")),
            "{bad}"
        );
    }
    assert_eq!(WebhookRejection::BadSignature.status(), StatusCode::UNAUTHORIZED);
    assert!(GithubVerifier::new(SecretString::from("")).is_err());
}

#[test]
fn slack_vendor_vector_verifies_within_the_replay_window() {
    let v = slack();
    assert_eq!(v.sign(SLACK_TIMESTAMP, SLACK_BODY.as_bytes()), SLACK_SIGNATURE);
    let h = headers(&[("x-slack-request-timestamp", "1531420618"), ("x-slack-signature", SLACK_SIGNATURE)]);
    let body = SLACK_BODY.as_bytes();
    assert_eq!(v.verify(&h, body, at(SLACK_TIMESTAMP)), Ok(()));
    assert_eq!(v.verify(&h, body, at(SLACK_TIMESTAMP + 300)), Ok(()));
    assert_eq!(v.verify(&h, body, at(SLACK_TIMESTAMP - 300)), Ok(()));
    assert_eq!(
        v.verify(&h, body, at(SLACK_TIMESTAMP + 301)),
        Err(WebhookRejection::StaleTimestamp { age_secs: 301, window_secs: 300 })
    );
    assert_eq!(
        v.verify(&h, body, at(SLACK_TIMESTAMP - 400)),
        Err(WebhookRejection::StaleTimestamp { age_secs: -400, window_secs: 300 })
    );
    // The window is configurable.
    let wide = slack().with_replay_window(Duration::from_secs(600));
    assert_eq!(wide.verify(&h, body, at(SLACK_TIMESTAMP + 599)), Ok(()));
    assert_eq!(WebhookRejection::StaleTimestamp { age_secs: 1, window_secs: 0 }.outcome(), "stale_timestamp");
}

#[test]
fn slack_rejections() {
    let v = slack();
    let body = SLACK_BODY.as_bytes();
    let now = at(SLACK_TIMESTAMP);
    let only_sig = headers(&[("x-slack-signature", SLACK_SIGNATURE)]);
    assert_eq!(
        v.verify(&only_sig, body, now),
        Err(WebhookRejection::MissingHeader("X-Slack-Request-Timestamp"))
    );
    let only_ts = headers(&[("x-slack-request-timestamp", "1531420618")]);
    assert_eq!(v.verify(&only_ts, body, now), Err(WebhookRejection::MissingHeader("X-Slack-Signature")));
    // The timestamp is signed: another one breaks the signature.
    let h = headers(&[("x-slack-request-timestamp", "1531420619"), ("x-slack-signature", SLACK_SIGNATURE)]);
    assert_eq!(v.verify(&h, body, now), Err(WebhookRejection::BadSignature));
    let h = headers(&[("x-slack-request-timestamp", "1531420618"), ("x-slack-signature", SLACK_SIGNATURE)]);
    assert_eq!(v.verify(&h, &body[1..], now), Err(WebhookRejection::BadSignature));
    let h = headers(&[("x-slack-request-timestamp", "yesterday"), ("x-slack-signature", SLACK_SIGNATURE)]);
    assert_eq!(v.verify(&h, body, now), Err(WebhookRejection::MalformedHeader("X-Slack-Request-Timestamp")));
    let h = headers(&[("x-slack-request-timestamp", "1531420618"), ("x-slack-signature", "v1=abcd")]);
    assert_eq!(v.verify(&h, body, now), Err(WebhookRejection::MalformedHeader("X-Slack-Signature")));
    // Messages never carry the signature.
    for r in [WebhookRejection::BadSignature, WebhookRejection::MalformedHeader("X-Slack-Signature")] {
        assert!(!r.to_string().contains("a2114d57"));
    }
}

#[tokio::test]
async fn verifiers_from_credentials_uses_the_secrets_that_are_set() {
    let none = StaticCredentialProvider::new();
    assert!(verifiers_from_credentials(&none, DEFAULT_SLACK_REPLAY_WINDOW).await.unwrap().is_empty());
    let both = StaticCredentialProvider::new()
        .with(GITHUB_WEBHOOK_SECRET_KEY, GITHUB_SECRET)
        .with(SLACK_SIGNING_SECRET_KEY, SLACK_SECRET);
    let verifiers = verifiers_from_credentials(&both, DEFAULT_SLACK_REPLAY_WINDOW).await.unwrap();
    let sources: Vec<&str> = verifiers.iter().map(|v| v.source()).collect();
    assert_eq!(sources, ["github", "slack"]);
    let h = headers(&[("x-hub-signature-256", GITHUB_SIGNATURE)]);
    assert_eq!(verifiers[0].verify(&h, GITHUB_BODY.as_bytes(), Utc::now()), Ok(()));

    let err = GithubVerifier::from_credentials(&none).await.unwrap_err().to_string();
    assert!(err.contains("github_webhook_secret"), "{err}");
    assert!(SlackVerifier::from_credentials(&both).await.is_ok());
}

// ---- GitHub hints from the vendor's example payloads --------------------------------------

fn github_examples() -> Vec<(String, Vec<Value>)> {
    let path =
        concat!(env!("CARGO_MANIFEST_DIR"), "/../connector-testkit/fixtures/github/webhook-examples.json");
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{path}: {e} (the testkit's vendor fixtures)"));
    let list: Vec<Value> = serde_json::from_str(&text).unwrap();
    list.into_iter()
        .map(|e| (e["name"].as_str().unwrap().to_owned(), e["examples"].as_array().unwrap().clone()))
        .collect()
}

fn github_hints(event: &str, payload: &Value) -> Vec<WebhookEvent> {
    let body = serde_json::to_vec(payload).unwrap();
    github().events(&headers(&[("x-github-event", event), ("x-github-delivery", "d-1")]), &body)
}

/// `(stream, ids, removed_ids)` of the single hint of a payload.
fn summary(hints: &[WebhookEvent]) -> (String, Vec<String>, Vec<String>) {
    assert_eq!(hints.len(), 1, "{hints:?}");
    let h = &hints[0];
    (h.stream.clone().unwrap(), h.ids.clone(), h.removed_ids.clone())
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn github_example_payloads_give_the_expected_hints() {
    let examples = github_examples();
    assert!(examples.len() >= 50);
    let hello = "Codertocat/Hello-World";
    let mut seen = std::collections::BTreeSet::new();
    for (event, payloads) in &examples {
        for (i, payload) in payloads.iter().enumerate() {
            let hints = github_hints(event, payload);
            let action = payload["action"].as_str();
            let repo = payload["repository"]["full_name"].as_str().unwrap_or_default();
            let at = format!("{event} #{i} ({action:?})");
            let expected: Option<(String, Vec<String>, Vec<String>)> = match event.as_str() {
                // Examples 4 and 5 push README.md to the default branch; the others are tags.
                "push" if i == 4 || i == 5 => {
                    Some((format!("{hello}/code"), strings(&["README.md"]), vec![]))
                }
                "push" => None,
                "issues" => {
                    let number = payload["issue"]["number"].to_string();
                    let kind =
                        if payload["issue"].get("pull_request").is_some() { "pulls" } else { "issues" };
                    if matches!(action, Some("deleted" | "transferred")) {
                        Some((format!("{repo}/{kind}"), vec![], vec![number]))
                    } else {
                        Some((format!("{repo}/{kind}"), vec![number], vec![]))
                    }
                }
                "issue_comment" => Some((format!("{repo}/issues"), strings(&["1"]), vec![])),
                "pull_request"
                | "pull_request_review"
                | "pull_request_review_comment"
                | "pull_request_review_thread" => Some((
                    format!("{repo}/pulls"),
                    vec![payload["pull_request"]["number"].to_string()],
                    vec![],
                )),
                "discussion" if action == Some("transferred") => Some((
                    format!("{repo}/discussions"),
                    vec![],
                    vec![payload["discussion"]["number"].to_string()],
                )),
                "discussion" | "discussion_comment" => Some((
                    format!("{repo}/discussions"),
                    vec![payload["discussion"]["number"].to_string()],
                    vec![],
                )),
                "gollum" => Some((format!("{hello}/wiki"), strings(&["Home"]), vec![])),
                _ => None,
            };
            match expected {
                None => assert!(hints.is_empty(), "{at}: {hints:?}"),
                Some(expected) => {
                    assert_eq!(summary(&hints), expected, "{at}");
                    let h = &hints[0];
                    assert_eq!(h.source, "github", "{at}");
                    assert_eq!(h.event_type, *event, "{at}");
                    assert_eq!(h.action.as_deref(), action, "{at}");
                    assert_eq!(h.scope.as_deref(), Some(repo), "{at}");
                    assert_eq!(h.account.as_deref(), Some(repo.split('/').next().unwrap()), "{at}");
                    assert_eq!(h.delivery_id.as_deref(), Some("d-1"), "{at}");
                    seen.insert(event.clone());
                }
            }
        }
    }
    let covered: Vec<&str> = seen.iter().map(String::as_str).collect();
    assert_eq!(
        covered,
        [
            "discussion",
            "discussion_comment",
            "gollum",
            "issue_comment",
            "issues",
            "pull_request",
            "pull_request_review",
            "pull_request_review_comment",
            "pull_request_review_thread",
            "push",
        ]
    );
}

#[test]
fn github_example_details() {
    let examples: std::collections::HashMap<String, Vec<Value>> = github_examples().into_iter().collect();
    // A pull request's issue events land in the pulls stream.
    let demilestoned = &examples["issues"][5];
    assert_eq!(demilestoned["action"], "demilestoned");
    assert_eq!(summary(&github_hints("issues", demilestoned)).0, "Codertocat/Hello-World/pulls");
    // A transferred issue leaves its repository.
    let transferred = &examples["issues"][21];
    assert_eq!(transferred["action"], "transferred");
    let hints = github_hints("issues", transferred);
    assert_eq!(summary(&hints), ("octo-org/octo-repo/issues".into(), vec![], strings(&["1"])));
    assert_eq!(hints[0].account.as_deref(), Some("octo-org"));
    // A deleted comment changes its issue.
    let comment_deleted = examples["issue_comment"].iter().find(|p| p["action"] == "deleted").unwrap();
    assert_eq!(summary(&github_hints("issue_comment", comment_deleted)).1, strings(&["1"]));
    // The event type comes from the header, not the payload.
    let opened = examples["pull_request"].iter().find(|p| p["action"] == "opened").unwrap();
    assert!(github_hints("star", opened).is_empty());
    assert!(github().events(&HeaderMap::new(), &serde_json::to_vec(opened).unwrap()).is_empty());
    assert!(github().events(&headers(&[("x-github-event", "push")]), b"payload=%7B%7D").is_empty());
}

#[test]
fn github_push_paths_follow_commit_order() {
    let payload = json!({
        "ref": "refs/heads/main",
        "deleted": false,
        "forced": false,
        "repository": {"full_name": "o/r", "default_branch": "main", "owner": {"login": "o"}},
        "commits": [
            {"added": ["a.md", "b.md"], "modified": ["c.md"], "removed": ["d.md"]},
            {"added": ["d.md"], "modified": [], "removed": ["a.md", "e.md"]},
        ],
    });
    let hints = github_hints("push", &payload);
    assert_eq!(
        summary(&hints),
        ("o/r/code".into(), strings(&["b.md", "c.md", "d.md"]), strings(&["a.md", "e.md"]))
    );

    // A force push: which paths changed is unknown, so the whole stream is hinted.
    let mut forced = payload.clone();
    forced["forced"] = json!(true);
    assert_eq!(summary(&github_hints("push", &forced)), ("o/r/code".into(), vec![], vec![]));
    // Other branches, and the default branch's deletion, give nothing.
    let mut other = payload.clone();
    other["ref"] = json!("refs/heads/feature");
    assert!(github_hints("push", &other).is_empty());
    let mut deleted = payload;
    deleted["deleted"] = json!(true);
    assert!(github_hints("push", &deleted).is_empty());
}

// ---- Slack hints --------------------------------------------------------------------------

fn callback(event: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "token": "XXYYZZ",
        "team_id": "T123ABC456",
        "api_app_id": "A123ABC456",
        "event": event,
        "type": "event_callback",
        "event_id": "Ev123ABC456",
        "event_time": 1515449522,
    }))
    .unwrap()
}

#[test]
fn slack_events_give_message_and_channel_hints() {
    let v = slack();
    let none = HeaderMap::new();
    let hints =
        v.events(&none, &callback(json!({"type": "message", "channel": "C2147483705", "user": "U2147483697", "text": "Hello world", "ts": "1355517523.000005"})));
    assert_eq!(hints.len(), 1);
    let h = &hints[0];
    assert_eq!(h.source, "slack");
    assert_eq!(h.event_type, "message");
    assert_eq!(h.action, None);
    assert_eq!(h.account.as_deref(), Some("T123ABC456"));
    assert_eq!(h.scope.as_deref(), Some("C2147483705"));
    assert_eq!(h.stream.as_deref(), Some("C2147483705"));
    assert_eq!(h.ids, strings(&["1355517523.000005"]));
    assert_eq!(h.delivery_id.as_deref(), Some("Ev123ABC456"));

    // A reply names its thread too.
    let reply = v.events(
        &none,
        &callback(json!({"type": "message", "channel": "C1", "ts": "2.000002", "thread_ts": "1.000001", "text": "re"})),
    );
    assert_eq!(reply[0].ids, strings(&["2.000002", "1.000001"]));
    // An edit names the edited message.
    let changed = v.events(
        &none,
        &callback(json!({"type": "message", "subtype": "message_changed", "channel": "C1", "ts": "3.0",
            "message": {"type": "message", "text": "edited", "ts": "1.000001"}})),
    );
    assert_eq!(changed[0].action.as_deref(), Some("message_changed"));
    assert_eq!(changed[0].ids, strings(&["1.000001"]));
    // A deletion.
    let deleted = v.events(
        &none,
        &callback(json!({"type": "message", "subtype": "message_deleted", "channel": "C1", "ts": "4.0",
            "deleted_ts": "2.000002", "previous_message": {"ts": "2.000002", "thread_ts": "1.000001"}})),
    );
    assert_eq!(deleted[0].removed_ids, strings(&["2.000002"]));
    assert_eq!(deleted[0].ids, strings(&["1.000001"]));
    // Channels.
    let created = v.events(
        &none,
        &callback(json!({"type": "channel_created", "channel": {"id": "C024BE91L", "name": "fun", "created": 1360782804}})),
    );
    assert_eq!(
        (created[0].stream.as_deref(), created[0].ids.clone()),
        (Some("channels"), strings(&["C024BE91L"]))
    );
    let gone = v.events(&none, &callback(json!({"type": "channel_deleted", "channel": "C024BE91L"})));
    assert_eq!(gone[0].removed_ids, strings(&["C024BE91L"]));
    // Nothing for other events, slash commands and challenges.
    assert!(
        v.events(&none, &callback(json!({"type": "reaction_added", "user": "U1", "reaction": "+1"})))
            .is_empty()
    );
    assert!(v.events(&none, SLACK_BODY.as_bytes()).is_empty());
    let challenge = br#"{"token":"t","challenge":"3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P","type":"url_verification"}"#;
    assert!(v.events(&none, challenge).is_empty());
    assert_eq!(
        v.challenge(&none, challenge).as_deref(),
        Some("3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P")
    );
    assert_eq!(v.challenge(&none, &callback(json!({"type": "message"}))), None);
}

// ---- the server ---------------------------------------------------------------------------

#[tokio::test]
async fn signed_github_push_is_delivered() {
    let s = server(DEFAULT_BODY_LIMIT);
    let examples: std::collections::HashMap<String, Vec<Value>> = github_examples().into_iter().collect();
    let body = serde_json::to_vec(&examples["push"][4]).unwrap();
    let signature = github().sign(&body);
    let (status, text) = send(
        &s.app,
        "/api/webhooks/github",
        &[
            ("content-type", "application/json"),
            ("x-github-event", "push"),
            ("x-github-delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958"),
            ("x-hub-signature-256", &signature),
        ],
        body,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{text}");
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), json!({"events": 1}));
    let delivered = s.sink.take();
    assert_eq!(delivered.len(), 1);
    let hint = &delivered[0][0];
    assert_eq!(hint.stream.as_deref(), Some("Codertocat/Hello-World/code"));
    assert_eq!(hint.ids, strings(&["README.md"]));
    assert_eq!(hint.delivery_id.as_deref(), Some("72d3162e-cc78-11e3-81ab-4c9367dc0958"));
    assert_eq!(webhook_count(&s.metrics, "github", "accepted"), Some(1.0));

    // The vendor vector: verified, but `Hello, World!` is no event payload: 200, nothing
    // delivered.
    let (status, _) = send(
        &s.app,
        "/api/webhooks/github",
        &[("x-github-event", "ping"), ("x-hub-signature-256", GITHUB_SIGNATURE)],
        GITHUB_BODY,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(s.sink.take().is_empty());
    assert_eq!(webhook_count(&s.metrics, "github", "ignored"), Some(1.0));
}

#[tokio::test]
async fn bad_requests_are_rejected_and_nothing_is_delivered() {
    let s = server(1024);
    let push = br#"{"ref":"refs/heads/main","repository":{"full_name":"o/r","default_branch":"main"},"commits":[{"added":["x"]}]}"#;
    let good = github().sign(push);
    let now = Utc::now().timestamp().to_string();

    // Wrong signature.
    let wrong = github().sign(b"something else");
    let (status, text) = send(
        &s.app,
        "/api/webhooks/github",
        &[("x-github-event", "push"), ("x-hub-signature-256", &wrong)],
        &push[..],
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(text, "signature does not match\n");
    // Missing signature header.
    let (status, _) = send(&s.app, "/api/webhooks/github", &[("x-github-event", "push")], &push[..]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Slack without its timestamp.
    let (status, _) =
        send(&s.app, "/api/webhooks/slack", &[("x-slack-signature", SLACK_SIGNATURE)], SLACK_BODY).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // The Slack vendor vector is authentic but from 2018: stale.
    let (status, text) = send(
        &s.app,
        "/api/webhooks/slack",
        &[("x-slack-request-timestamp", "1531420618"), ("x-slack-signature", SLACK_SIGNATURE)],
        SLACK_BODY,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(text.starts_with("request timestamp is "), "{text}");
    // A fresh Slack timestamp with a signature over another timestamp.
    let (status, _) = send(
        &s.app,
        "/api/webhooks/slack",
        &[("x-slack-request-timestamp", &now), ("x-slack-signature", SLACK_SIGNATURE)],
        SLACK_BODY,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Too large (correctly signed, with and without a Content-Length).
    let big = vec![b' '; 2048];
    let big_signature = github().sign(&big);
    let (status, _) = send(
        &s.app,
        "/api/webhooks/github",
        &[("x-github-event", "push"), ("x-hub-signature-256", &big_signature), ("content-length", "2048")],
        big.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let chunks = futures::stream::iter((0..4).map(|_| Ok::<_, std::io::Error>(vec![b' '; 512])));
    let (status, _) = send(
        &s.app,
        "/api/webhooks/github",
        &[("x-github-event", "push"), ("x-hub-signature-256", &big_signature)],
        Body::from_stream(chunks),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    // Unknown source.
    let (status, _) =
        send(&s.app, "/api/webhooks/gitlab", &[("x-hub-signature-256", &good)], &push[..]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Not a POST.
    let (status, _, _) = get(&s.app, "/api/webhooks/github").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);

    assert!(s.sink.take().is_empty(), "nothing reaches the sink");
    let samples = parse(&s.metrics.render());
    let count = |source, outcome| {
        value(&samples, "connectors_webhooks_total", &[("source", source), ("outcome", outcome)])
    };
    assert_eq!(count("github", "bad_signature"), Some(1.0));
    assert_eq!(count("github", "missing_header"), Some(1.0));
    assert_eq!(count("github", "too_large"), Some(2.0));
    assert_eq!(count("slack", "missing_header"), Some(1.0));
    assert_eq!(count("slack", "stale_timestamp"), Some(1.0));
    assert_eq!(count("slack", "bad_signature"), Some(1.0));
    assert_eq!(count(UNKNOWN_SOURCE_LABEL, "unknown_source"), Some(1.0));
    assert_eq!(count("github", "accepted"), None);

    // Exactly at the limit is accepted.
    let exact = {
        let mut b = push.to_vec();
        b.resize(1024, b' ');
        b
    };
    let (status, _) = send(
        &s.app,
        "/api/webhooks/github",
        &[("x-github-event", "push"), ("x-hub-signature-256", &github().sign(&exact))],
        exact,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(s.sink.take().len(), 1);
}

#[tokio::test]
async fn slack_challenge_and_events() {
    let s = server(DEFAULT_BODY_LIMIT);
    let now = Utc::now().timestamp();
    let challenge = br#"{"token":"Jhj5dZrVaK7ZwHHjRyZWjbDl","challenge":"3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P","type":"url_verification"}"#;
    let signature = s.slack.sign(now, challenge);
    let ts = now.to_string();
    let (status, text) = send(
        &s.app,
        "/api/webhooks/slack",
        &[
            ("content-type", "application/json"),
            ("x-slack-request-timestamp", &ts),
            ("x-slack-signature", &signature),
        ],
        &challenge[..],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(text, "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P");
    // An unsigned challenge is not answered.
    let (status, _) =
        send(&s.app, "/api/webhooks/slack", &[("x-slack-request-timestamp", &ts)], &challenge[..]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let body = callback(json!({"type": "message", "channel": "C1", "ts": "1.000001", "text": "hi"}));
    let signature = s.slack.sign(now, &body);
    let (status, _) = send(
        &s.app,
        "/api/webhooks/slack",
        &[("x-slack-request-timestamp", &ts), ("x-slack-signature", &signature), ("x-slack-retry-num", "1")],
        body,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let delivered = s.sink.take();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0][0].ids, strings(&["1.000001"]));
    assert_eq!(webhook_count(&s.metrics, "slack", "challenge"), Some(1.0));
    assert_eq!(webhook_count(&s.metrics, "slack", "accepted"), Some(1.0));
}

#[tokio::test]
async fn healthz_follows_the_health_check() {
    let s = server(DEFAULT_BODY_LIMIT);
    let (status, _, body) = get(&s.app, "/healthz").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));

    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = ready.clone();
    let app = router(
        ServerState::new(Arc::new(RecordingSink::default()), Metrics::new())
            .with_health_check(move || flag.load(std::sync::atomic::Ordering::SeqCst)),
    );
    let (status, _, body) = get(&app, "/healthz").await;
    assert_eq!((status, body.as_str()), (StatusCode::SERVICE_UNAVAILABLE, "not ready"));
    ready.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(get(&app, "/healthz").await.0, StatusCode::OK);
}

#[tokio::test]
async fn metrics_endpoint_exposes_recorded_syncs() {
    let s = server(DEFAULT_BODY_LIMIT);
    s.metrics.record_sync(&SyncResult {
        connector_id: ConnectorId::new("docs-db").unwrap(),
        tenant_id: TenantId::new("workspace-1").unwrap(),
        success: true,
        full_sync: true,
        items_synced: 42,
        items_failed: 0,
        items_deleted: 1,
        items_unchanged: 0,
        errors: vec![],
        error_kind: None,
        duration: Duration::from_secs(3),
        timings: SyncTimings::default(),
    });
    let (status, content_type, body) = get(&s.app, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type.as_deref(), Some("text/plain; version=0.0.4; charset=utf-8"));
    let samples = parse(&body);
    let docs = [("connector_id", "docs-db"), ("tenant_id", "workspace-1")];
    assert_eq!(value(&samples, "connectors_items_synced_total", &docs), Some(42.0));
    assert_eq!(
        value(&samples, "connectors_syncs_total", &[docs[0], docs[1], ("status", "success")]),
        Some(1.0)
    );
    assert_eq!(value(&samples, "connectors_sync_duration_seconds_sum", &docs), Some(3.0));
}

#[tokio::test]
async fn serves_on_a_real_listener_until_cancelled() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sink = Arc::new(RecordingSink::default());
    let state = ServerState::new(sink.clone(), Metrics::new()).with_verifier(Arc::new(github()));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(serve(listener, state, shutdown.clone()));

    let request = |head: String, body: &[u8]| {
        let body = body.to_vec();
        async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.write_all(head.as_bytes()).await.unwrap();
            stream.write_all(&body).await.unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).await.unwrap();
            response
        }
    };
    let response =
        request("GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".into(), b"").await;
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(response.ends_with("\r\n\r\nok"), "{response}");

    let body =
        br#"{"action":"opened","issue":{"number":7},"repository":{"full_name":"o/r","owner":{"login":"o"}}}"#;
    let head = format!(
        "POST /api/webhooks/github HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\n\
         X-GitHub-Event: issues\r\nX-Hub-Signature-256: {}\r\nContent-Length: {}\r\n\r\n",
        github().sign(body),
        body.len()
    );
    let response = request(head, body).await;
    assert!(response.starts_with("HTTP/1.1 202 Accepted\r\n"), "{response}");
    assert_eq!(sink.take()[0][0].ids, strings(&["7"]));

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap().unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "the listener is closed");
}
