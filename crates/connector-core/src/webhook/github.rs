//! GitHub webhooks: `X-Hub-Signature-256` and the events that concern synced content.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use sha2::Sha256;

use super::{HeaderMap, WebhookEvent, WebhookRejection, WebhookVerifier, header_str, str_at};
use crate::credentials::{CredentialProvider, require_credential};
use crate::error::{Error, Result};

/// The source name of GitHub webhooks (`/api/webhooks/github`).
pub const GITHUB_SOURCE: &str = "github";

/// The credential key of the webhook secret (`ARAGORA_GITHUB_WEBHOOK_SECRET`).
pub const GITHUB_WEBHOOK_SECRET_KEY: &str = "github_webhook_secret";

const SIGNATURE_HEADER: &str = "X-Hub-Signature-256";
const EVENT_HEADER: &str = "X-GitHub-Event";
const DELIVERY_HEADER: &str = "X-GitHub-Delivery";

/// GitHub lists at most this many commits in a push payload; a push with as many may have
/// more, whose paths are then unknown.
const MAX_PUSH_COMMITS: usize = 2048;

/// Verifies GitHub webhooks (`X-Hub-Signature-256: sha256=<hex>`, the HMAC-SHA256 of the raw
/// body keyed with the webhook secret) and turns their events into hints.
///
/// GitHub signs no timestamp, so there is no replay window; the hints are idempotent (a
/// replayed delivery only syncs again what is already synced), and `X-GitHub-Delivery` is
/// passed on as [`WebhookEvent::delivery_id`].
///
/// # Hints
/// Streams are named `{owner}/{repo}/{kind}`:
///
/// | event | stream kind | ids |
/// |---|---|---|
/// | `push` to the default branch | `code` | paths added or modified; removed paths in `removed_ids`; none for a force push (sync the stream) |
/// | `issues`, `issue_comment` | `issues` (`pulls` for a pull request's) | the number; `deleted` and `transferred` issues in `removed_ids` |
/// | `pull_request`, `pull_request_review`, `pull_request_review_comment`, `pull_request_review_thread` | `pulls` | the number |
/// | `discussion`, `discussion_comment` | `discussions` | the number; `deleted` and `transferred` discussions in `removed_ids` |
/// | `gollum` | `wiki` | the page names |
///
/// Pushes to other branches and tags, branch deletions, `ping` and other events give no hint.
/// The payload must be JSON (content type `application/json` in the webhook's settings).
#[derive(Debug)]
pub struct GithubVerifier {
    secret: SecretString,
}

impl GithubVerifier {
    /// A verifier with the webhook secret.
    ///
    /// # Errors
    /// A configuration error when the secret is empty.
    pub fn new(secret: SecretString) -> Result<Self> {
        if secret.expose_secret().is_empty() {
            return Err(Error::config(format!("credential `{GITHUB_WEBHOOK_SECRET_KEY}` is empty")));
        }
        Ok(Self { secret })
    }

    /// A verifier with the secret `github_webhook_secret` from `provider`.
    ///
    /// # Errors
    /// When the secret is not set (the error says where it was looked for) or the provider
    /// fails.
    pub async fn from_credentials(provider: &dyn CredentialProvider) -> Result<Self> {
        Self::new(require_credential(provider, GITHUB_WEBHOOK_SECRET_KEY).await?)
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(self.secret.expose_secret().as_bytes())
            .expect("HMAC takes keys of any length")
    }

    /// The `X-Hub-Signature-256` value of `body` (`sha256=<hex>`), as GitHub computes it: for
    /// tests and fakes that send webhooks.
    pub fn sign(&self, body: &[u8]) -> String {
        let mut mac = self.mac();
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }
}

impl WebhookVerifier for GithubVerifier {
    fn source(&self) -> &str {
        GITHUB_SOURCE
    }

    fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        _now: DateTime<Utc>,
    ) -> std::result::Result<(), WebhookRejection> {
        let value = headers.get(SIGNATURE_HEADER).ok_or(WebhookRejection::MissingHeader(SIGNATURE_HEADER))?;
        let signature = value
            .to_str()
            .ok()
            .and_then(|v| v.trim().strip_prefix("sha256="))
            .and_then(|hex_digits| hex::decode(hex_digits).ok())
            .ok_or(WebhookRejection::MalformedHeader(SIGNATURE_HEADER))?;
        let mut mac = self.mac();
        mac.update(body);
        // Constant time; a tag of the wrong length fails too.
        mac.verify_slice(&signature).map_err(|_| WebhookRejection::BadSignature)
    }

    fn events(&self, headers: &HeaderMap, body: &[u8]) -> Vec<WebhookEvent> {
        let Some(event_type) = header_str(headers, EVENT_HEADER) else {
            tracing::warn!("GitHub webhook without {EVENT_HEADER}");
            return Vec::new();
        };
        let payload: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(_) => {
                tracing::warn!(
                    event = event_type,
                    "GitHub webhook payload is not JSON: set the webhook's content type to application/json"
                );
                return Vec::new();
            }
        };
        let delivery_id = header_str(headers, DELIVERY_HEADER).map(str::to_owned);
        github_events(event_type, &payload, delivery_id).into_iter().collect()
    }
}

/// The hint of one GitHub event payload, if it concerns synced content.
fn github_events(event_type: &str, payload: &Value, delivery_id: Option<String>) -> Option<WebhookEvent> {
    let repo = str_at(payload, &["repository", "full_name"])?;
    let action = str_at(payload, &["action"]).map(str::to_owned);
    let account = str_at(payload, &["repository", "owner", "login"])
        .or_else(|| str_at(payload, &["organization", "login"]))
        .map(str::to_owned);
    let number = |object: &str| payload.get(object)?.get("number")?.as_u64().map(|n| n.to_string());
    let removal = matches!(action.as_deref(), Some("deleted" | "transferred"));

    let (kind, ids, removed_ids) = match event_type {
        "push" => {
            let (changed, removed) = push_paths(payload)?;
            ("code", changed, removed)
        }
        "issues" | "issue_comment" => {
            let issue = payload.get("issue")?;
            let kind =
                if issue.get("pull_request").is_some_and(|p| !p.is_null()) { "pulls" } else { "issues" };
            let n = number("issue")?;
            if event_type == "issues" && removal { (kind, vec![], vec![n]) } else { (kind, vec![n], vec![]) }
        }
        "pull_request"
        | "pull_request_review"
        | "pull_request_review_comment"
        | "pull_request_review_thread" => ("pulls", vec![number("pull_request")?], vec![]),
        "discussion" | "discussion_comment" => {
            let n = number("discussion")?;
            if event_type == "discussion" && removal {
                ("discussions", vec![], vec![n])
            } else {
                ("discussions", vec![n], vec![])
            }
        }
        "gollum" => {
            let mut pages: Vec<String> = payload
                .get("pages")?
                .as_array()?
                .iter()
                .filter_map(|p| p.get("page_name")?.as_str().map(str::to_owned))
                .collect();
            pages.sort();
            pages.dedup();
            ("wiki", pages, vec![])
        }
        _ => return None,
    };
    Some(WebhookEvent {
        source: GITHUB_SOURCE.to_owned(),
        event_type: event_type.to_owned(),
        action,
        account,
        scope: Some(repo.to_owned()),
        stream: Some(format!("{repo}/{kind}")),
        ids,
        removed_ids,
        delivery_id,
    })
}

/// The paths a push to the default branch changed and removed, in name order; `None` for
/// other refs and branch deletions; both empty when they are unknown (a force push, or more
/// commits than the payload lists).
fn push_paths(payload: &Value) -> Option<(Vec<String>, Vec<String>)> {
    let default_branch = str_at(payload, &["repository", "default_branch"])?;
    if str_at(payload, &["ref"])? != format!("refs/heads/{default_branch}") {
        return None;
    }
    if payload.get("deleted").and_then(Value::as_bool) == Some(true) {
        return None;
    }
    let commits: Vec<&Value> = match payload.get("commits").and_then(Value::as_array) {
        Some(list) if !list.is_empty() => list.iter().collect(),
        _ => payload.get("head_commit").filter(|c| !c.is_null()).into_iter().collect(),
    };
    let forced = payload.get("forced").and_then(Value::as_bool) == Some(true);
    if forced || commits.len() >= MAX_PUSH_COMMITS {
        return Some((Vec::new(), Vec::new()));
    }
    let mut changed = BTreeSet::new();
    let mut removed = BTreeSet::new();
    // Commits are listed oldest first: a later commit's change wins.
    for commit in commits {
        let paths = |field: &str| {
            commit
                .get(field)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(str::to_owned)
        };
        for path in paths("added").chain(paths("modified")) {
            removed.remove(&path);
            changed.insert(path);
        }
        for path in paths("removed") {
            changed.remove(&path);
            removed.insert(path);
        }
    }
    Some((changed.into_iter().collect(), removed.into_iter().collect()))
}
