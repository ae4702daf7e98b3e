//! Slack Events API requests: `X-Slack-Signature` (v0), the replay window, `url_verification`
//! and the events that concern synced messages and channels.

use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use sha2::Sha256;

use super::{HeaderMap, WebhookEvent, WebhookRejection, WebhookVerifier, str_at};
use crate::credentials::{CredentialProvider, require_credential};
use crate::error::{Error, Result};

/// The source name of Slack requests (`/api/webhooks/slack`).
pub const SLACK_SOURCE: &str = "slack";

/// The credential key of the app's signing secret (`ARAGORA_SLACK_SIGNING_SECRET`).
pub const SLACK_SIGNING_SECRET_KEY: &str = "slack_signing_secret";

/// How far a request's timestamp may be from now, either way: 5 minutes, as Slack advises.
pub const DEFAULT_SLACK_REPLAY_WINDOW: Duration = Duration::from_secs(5 * 60);

const SIGNATURE_HEADER: &str = "X-Slack-Signature";
const TIMESTAMP_HEADER: &str = "X-Slack-Request-Timestamp";

/// Verifies Slack requests (`X-Slack-Signature: v0=<hex>`, the HMAC-SHA256 of
/// `v0:{X-Slack-Request-Timestamp}:{body}` keyed with the signing secret; the timestamp must
/// be within the replay window of now) and turns Events API callbacks into hints.
///
/// # Hints
/// [`WebhookEvent::account`] is the team id, [`WebhookEvent::delivery_id`] the `event_id`.
///
/// | event | stream | ids |
/// |---|---|---|
/// | `message` (new, `message_changed`, `message_replied`, `thread_broadcast`, ...) | the channel id | the message `ts`, and its `thread_ts` when it is a reply |
/// | `message` / `message_deleted` | the channel id | `deleted_ts` in `removed_ids`; the thread's `ts` in `ids` |
/// | `channel_created`, `channel_rename`, `channel_archive`, `channel_unarchive` | `channels` | the channel id |
/// | `channel_deleted` | `channels` | the channel id in `removed_ids` |
///
/// A verified `url_verification` request is answered with its challenge. Other events and
/// payloads (slash commands, interactions) give no hint.
#[derive(Debug)]
pub struct SlackVerifier {
    secret: SecretString,
    replay_window: Duration,
}

impl SlackVerifier {
    /// A verifier with the app's signing secret and the [`DEFAULT_SLACK_REPLAY_WINDOW`].
    ///
    /// # Errors
    /// A configuration error when the secret is empty.
    pub fn new(secret: SecretString) -> Result<Self> {
        if secret.expose_secret().is_empty() {
            return Err(Error::config(format!("credential `{SLACK_SIGNING_SECRET_KEY}` is empty")));
        }
        Ok(Self { secret, replay_window: DEFAULT_SLACK_REPLAY_WINDOW })
    }

    /// A verifier with the secret `slack_signing_secret` from `provider`.
    ///
    /// # Errors
    /// When the secret is not set (the error says where it was looked for) or the provider
    /// fails.
    pub async fn from_credentials(provider: &dyn CredentialProvider) -> Result<Self> {
        Self::new(require_credential(provider, SLACK_SIGNING_SECRET_KEY).await?)
    }

    /// Sets how far a request's timestamp may be from now, either way.
    pub fn with_replay_window(mut self, window: Duration) -> Self {
        self.replay_window = window;
        self
    }

    fn mac(&self, timestamp: &str, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.secret.expose_secret().as_bytes())
            .expect("HMAC takes keys of any length");
        mac.update(b"v0:");
        mac.update(timestamp.as_bytes());
        mac.update(b":");
        mac.update(body);
        mac
    }

    /// The `X-Slack-Signature` value of `body` sent at `timestamp` (`v0=<hex>`), as Slack
    /// computes it: for tests and fakes that send requests.
    pub fn sign(&self, timestamp: i64, body: &[u8]) -> String {
        let mac = self.mac(&timestamp.to_string(), body);
        format!("v0={}", hex::encode(mac.finalize().into_bytes()))
    }
}

impl WebhookVerifier for SlackVerifier {
    fn source(&self) -> &str {
        SLACK_SOURCE
    }

    fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: DateTime<Utc>,
    ) -> std::result::Result<(), WebhookRejection> {
        let timestamp =
            headers.get(TIMESTAMP_HEADER).ok_or(WebhookRejection::MissingHeader(TIMESTAMP_HEADER))?;
        let signature =
            headers.get(SIGNATURE_HEADER).ok_or(WebhookRejection::MissingHeader(SIGNATURE_HEADER))?;
        let timestamp =
            timestamp.to_str().map_err(|_| WebhookRejection::MalformedHeader(TIMESTAMP_HEADER))?.trim();
        let seconds: i64 =
            timestamp.parse().map_err(|_| WebhookRejection::MalformedHeader(TIMESTAMP_HEADER))?;
        let signature = signature
            .to_str()
            .ok()
            .and_then(|v| v.trim().strip_prefix("v0="))
            .and_then(|hex_digits| hex::decode(hex_digits).ok())
            .ok_or(WebhookRejection::MalformedHeader(SIGNATURE_HEADER))?;
        // The signature first: a stale timestamp is then reported for authentic requests only.
        self.mac(timestamp, body).verify_slice(&signature).map_err(|_| WebhookRejection::BadSignature)?;
        let age_secs = now.timestamp().saturating_sub(seconds);
        if age_secs.unsigned_abs() > self.replay_window.as_secs() {
            return Err(WebhookRejection::StaleTimestamp {
                age_secs,
                window_secs: self.replay_window.as_secs(),
            });
        }
        Ok(())
    }

    fn events(&self, _headers: &HeaderMap, body: &[u8]) -> Vec<WebhookEvent> {
        let Ok(payload) = serde_json::from_slice::<Value>(body) else {
            // Slash commands and interactions are form-encoded: nothing to sync.
            return Vec::new();
        };
        if str_at(&payload, &["type"]) != Some("event_callback") {
            return Vec::new();
        }
        slack_event(&payload).into_iter().collect()
    }

    fn challenge(&self, _headers: &HeaderMap, body: &[u8]) -> Option<String> {
        let payload: Value = serde_json::from_slice(body).ok()?;
        if str_at(&payload, &["type"]) != Some("url_verification") {
            return None;
        }
        str_at(&payload, &["challenge"]).map(str::to_owned)
    }
}

/// The hint of one `event_callback`, if it concerns synced content.
fn slack_event(payload: &Value) -> Option<WebhookEvent> {
    let event = payload.get("event")?;
    let event_type = str_at(event, &["type"])?;
    let subtype = str_at(event, &["subtype"]);
    let text = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
    let mut hint = WebhookEvent {
        source: SLACK_SOURCE.to_owned(),
        event_type: event_type.to_owned(),
        action: subtype.map(str::to_owned),
        account: text(payload, "team_id"),
        delivery_id: text(payload, "event_id"),
        ..WebhookEvent::default()
    };
    match event_type {
        "message" => {
            let channel = text(event, "channel")?;
            match subtype {
                Some("message_deleted") => {
                    hint.removed_ids.push(text(event, "deleted_ts")?);
                    let thread = event.get("previous_message").and_then(|m| text(m, "thread_ts"));
                    hint.ids.extend(thread.filter(|t| !hint.removed_ids.contains(t)));
                }
                Some("message_changed" | "message_replied") => {
                    message_ids(event.get("message")?, &mut hint.ids)?
                }
                _ => message_ids(event, &mut hint.ids)?,
            }
            hint.scope = Some(channel.clone());
            hint.stream = Some(channel);
        }
        "channel_created" | "channel_rename" | "channel_archive" | "channel_unarchive"
        | "channel_deleted" => {
            // `channel` is an object for created and rename, the id for the others.
            let channel = event.get("channel")?;
            let id = channel.as_str().map(str::to_owned).or_else(|| text(channel, "id"))?;
            if event_type == "channel_deleted" {
                hint.removed_ids.push(id.clone());
            } else {
                hint.ids.push(id.clone());
            }
            hint.scope = Some(id);
            hint.stream = Some("channels".to_owned());
        }
        _ => return None,
    }
    Some(hint)
}

/// Pushes a message's `ts` and, for a reply, its thread's `ts`.
fn message_ids(message: &Value, ids: &mut Vec<String>) -> Option<()> {
    let ts = message.get("ts")?.as_str()?;
    ids.push(ts.to_owned());
    if let Some(thread) = message.get("thread_ts").and_then(Value::as_str)
        && thread != ts
    {
        ids.push(thread.to_owned());
    }
    Some(())
}
