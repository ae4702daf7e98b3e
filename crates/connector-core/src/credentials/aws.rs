//! [`AwsSecretsManagerCredentialProvider`]: credentials in AWS Secrets Manager.
//!
//! Key `postgres_password` is the secret named `aragora/postgres_password`, and its value is the
//! secret's `SecretString` (the current version, stage `AWSCURRENT`). The prefix, the region and
//! the endpoint are settings of [`AwsSecretsManagerConfig`]; the AWS credentials come from the
//! standard AWS chain.

use std::collections::HashMap;

use async_trait::async_trait;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_secretsmanager::Client;
use aws_sdk_secretsmanager::config::http::HttpResponse;
use aws_sdk_secretsmanager::error::{ProvideErrorMetadata, SdkError};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::sync::OnceCell;

use super::{CredentialProvider, validate_key};
use crate::error::{Error, Result};

/// Settings of an [`AwsSecretsManagerCredentialProvider`]; every field has a default, unknown
/// fields are rejected when deserializing.
///
/// There are no credential fields: the AWS credentials come from the standard AWS chain, in this
/// order: the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and
/// `AWS_SESSION_TOKEN`), web identity (`AWS_WEB_IDENTITY_TOKEN_FILE`, as on EKS), the shared
/// files `~/.aws/credentials` and `~/.aws/config` (profile `profile`, else `AWS_PROFILE`, else
/// `default`; SSO and `credential_process` profiles included), the ECS task role, and the EC2
/// instance role (IMDS).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AwsSecretsManagerConfig {
    /// The AWS region (`eu-west-1`); default: `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's
    /// `region`, or the instance's region (IMDS).
    pub region: Option<String>,
    /// Another endpoint than the region's (`http://127.0.0.1:5000` for a local server, a VPC
    /// endpoint); default: `AWS_ENDPOINT_URL_SECRETS_MANAGER` or `AWS_ENDPOINT_URL`, else
    /// `https://secretsmanager.<region>.amazonaws.com`.
    pub endpoint_url: Option<String>,
    /// The folder of the secrets: key `k` is the secret named `<prefix>/k`. Default `aragora`;
    /// empty for none.
    pub prefix: String,
    /// The profile of the shared AWS files for credentials and region; default: `AWS_PROFILE`,
    /// else `default`.
    pub profile: Option<String>,
}

impl Default for AwsSecretsManagerConfig {
    fn default() -> Self {
        Self { region: None, endpoint_url: None, prefix: "aragora".into(), profile: None }
    }
}

/// One version of a secret, from `DescribeSecret`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretVersion {
    /// The version's id (a UUID).
    pub id: String,
    /// Its staging labels: `AWSCURRENT` for the value that is read, `AWSPREVIOUS` for the one
    /// before.
    pub stages: Vec<String>,
}

impl SecretVersion {
    /// Whether this is the current version (stage `AWSCURRENT`).
    pub fn is_current(&self) -> bool {
        self.stages.iter().any(|s| s == "AWSCURRENT")
    }
}

/// Reads and writes credentials in AWS Secrets Manager.
///
/// - `get_credential` reads the `SecretString` of the secret's current version
///   (`GetSecretValue`). It returns `Ok(None)` when the secret does not exist, is scheduled for
///   deletion, or holds an empty string. A secret that holds only binary data is an
///   [`ErrorKind::Source`](crate::ErrorKind::Source) error.
/// - `set_credential` stores a new version (`PutSecretValue`), which becomes `AWSCURRENT` (the
///   one before becomes `AWSPREVIOUS`); when the secret does not exist it creates it
///   (`CreateSecret`, encrypted with the account's default key `aws/secretsmanager`).
/// - A denied request (`AccessDeniedException`, `UnrecognizedClientException`, a bad signature,
///   an expired token) is an [`ErrorKind::Auth`](crate::ErrorKind::Auth) error naming the secret
///   and the region; throttling, a 5xx answer, a timeout or an unreachable endpoint is
///   [`ErrorKind::Transient`](crate::ErrorKind::Transient) naming the endpoint. Errors never
///   contain a secret value. The SDK itself retries throttling and 5xx answers (3 attempts)
///   before the provider reports them.
///
/// The identity needs `secretsmanager:GetSecretValue`, `PutSecretValue`, `CreateSecret` and
/// `DescribeSecret` on `arn:aws:secretsmanager:*:*:secret:<prefix>/*` (read-only deployments
/// need only `GetSecretValue`), and `kms:Decrypt` / `kms:GenerateDataKey` on the KMS key when
/// secrets use a customer managed key.
pub struct AwsSecretsManagerCredentialProvider {
    prefix: String,
    config: AwsSecretsManagerConfig,
    /// The client, with the region and endpoint it uses; made on first use by [`Self::new`].
    resolved: OnceCell<Resolved>,
}

struct Resolved {
    client: Client,
    region: String,
    endpoint: String,
}

impl std::fmt::Debug for AwsSecretsManagerCredentialProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let resolved = self.resolved.get();
        f.debug_struct("AwsSecretsManagerCredentialProvider")
            .field("prefix", &self.prefix)
            .field("region", &resolved.map(|r| r.region.as_str()).or(self.config.region.as_deref()))
            .field("endpoint", &resolved.map(|r| r.endpoint.as_str()).or(self.config.endpoint_url.as_deref()))
            .field("profile", &self.config.profile)
            .finish_non_exhaustive()
    }
}

/// Error codes that mean the caller's identity or its permissions were refused.
const AUTH_CODES: &[&str] = &[
    "AccessDeniedException",
    "AccessDenied",
    "UnrecognizedClientException",
    "InvalidSignatureException",
    "SignatureDoesNotMatch",
    "IncompleteSignature",
    "InvalidClientTokenId",
    "MissingAuthenticationToken",
    "ExpiredTokenException",
    "ExpiredToken",
    "NotAuthorized",
];
/// Error codes of a service that is overloaded or failing, worth retrying later.
const TRANSIENT_CODES: &[&str] = &[
    "ThrottlingException",
    "Throttling",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "InternalServiceError",
    "InternalFailure",
    "ServiceUnavailable",
];

/// Whether an `InvalidRequestException` says the secret is scheduled for deletion.
fn marked_for_deletion(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    message.contains("marked for deletion") || message.contains("marked deleted")
}

impl AwsSecretsManagerCredentialProvider {
    /// A provider with `config`. It loads the AWS configuration (region, credentials chain,
    /// endpoint overrides from the environment and the shared files) on first use and does not
    /// contact AWS before then; a missing region is reported then, as a
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) error.
    pub fn new(config: AwsSecretsManagerConfig) -> Result<Self> {
        let prefix = check_config(&config)?;
        Ok(Self { prefix, config, resolved: OnceCell::new() })
    }

    /// A provider with the default settings: prefix `aragora`, region, endpoint and credentials
    /// from the environment and the shared AWS files.
    pub fn from_env() -> Result<Self> {
        Self::new(AwsSecretsManagerConfig::default())
    }

    /// A provider that uses an AWS configuration the caller loaded (with its credentials, HTTP
    /// client, retry and timeout settings); `config.region` and `config.endpoint_url`, when set,
    /// override its region and endpoint. `config.profile` must not be set: `sdk` was loaded
    /// already.
    pub fn with_sdk_config(config: AwsSecretsManagerConfig, sdk: &SdkConfig) -> Result<Self> {
        let prefix = check_config(&config)?;
        if config.profile.is_some() {
            return Err(Error::config(
                "AWS Secrets Manager: `profile` applies only when the provider loads the AWS \
                 configuration itself; select the profile when loading the SdkConfig",
            ));
        }
        let resolved = resolve(&config, sdk)?;
        Ok(Self { prefix, config, resolved: OnceCell::new_with(Some(resolved)) })
    }

    /// The secret's name for `key` (`aragora/postgres_password`).
    pub fn secret_id(&self, key: &str) -> String {
        if self.prefix.is_empty() { key.to_owned() } else { format!("{}/{key}", self.prefix) }
    }

    /// The prefix, without slashes at its ends (`aragora`; empty for none).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The region and endpoint in use, loading the AWS configuration if not done yet.
    pub async fn region_and_endpoint(&self) -> Result<(String, String)> {
        let resolved = self.resolved().await?;
        Ok((resolved.region.clone(), resolved.endpoint.clone()))
    }

    /// The versions of the secret for `key` that carry a staging label (`DescribeSecret`), the
    /// current one first; empty when the secret does not exist.
    pub async fn secret_versions(&self, key: &str) -> Result<Vec<SecretVersion>> {
        validate_key(key)?;
        let resolved = self.resolved().await?;
        let secret_id = self.secret_id(key);
        let described = resolved.client.describe_secret().secret_id(&secret_id).send().await;
        let described = match described {
            Ok(output) => output,
            Err(e) if e.code() == Some("ResourceNotFoundException") => return Ok(Vec::new()),
            Err(e) => return Err(resolved.error(e, "describing", &secret_id)),
        };
        let empty = HashMap::new();
        let mut versions: Vec<SecretVersion> = described
            .version_ids_to_stages()
            .unwrap_or(&empty)
            .iter()
            .map(|(id, stages)| SecretVersion { id: id.clone(), stages: stages.clone() })
            .collect();
        let rank = |v: &SecretVersion| {
            if v.is_current() {
                0
            } else if v.stages.iter().any(|s| s == "AWSPREVIOUS") {
                1
            } else {
                2
            }
        };
        versions.sort_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.id.cmp(&b.id)));
        Ok(versions)
    }

    /// Like [`set_credential`](CredentialProvider::set_credential), and returns the id of the
    /// new version.
    pub async fn put_secret_value(&self, key: &str, value: &SecretString) -> Result<String> {
        validate_key(key)?;
        let resolved = self.resolved().await?;
        let secret_id = self.secret_id(key);
        let written = match resolved.put(&secret_id, value).await {
            Err(e) if e.code() == Some("ResourceNotFoundException") => {
                match resolved.create(&secret_id, value).await {
                    // Another writer created it meanwhile: add our version on top.
                    Err(e) if e.code() == Some("ResourceExistsException") => resolved
                        .put(&secret_id, value)
                        .await
                        .map_err(|e| resolved.error(e, "writing", &secret_id)),
                    other => other.map_err(|e| resolved.error(e, "creating", &secret_id)),
                }
            }
            Err(e)
                if e.code() == Some("InvalidRequestException")
                    && marked_for_deletion(e.message().unwrap_or_default()) =>
            {
                Err(Error::config(format!(
                    "cannot write AWS Secrets Manager secret {secret_id} in region {}: it is scheduled for \
                     deletion; restore it first (`aws secretsmanager restore-secret --secret-id {secret_id}`)",
                    resolved.region
                )))
            }
            other => other.map_err(|e| resolved.error(e, "writing", &secret_id)),
        };
        // No AWS message is known to quote the value; make sure of it all the same.
        written.map_err(|e| redact(e, value))
    }

    async fn resolved(&self) -> Result<&Resolved> {
        self.resolved
            .get_or_try_init(|| async {
                let mut loader = aws_config::defaults(BehaviorVersion::latest());
                if let Some(region) = &self.config.region {
                    loader = loader.region(Region::new(region.clone()));
                }
                if let Some(profile) = &self.config.profile {
                    loader = loader.profile_name(profile);
                }
                if let Some(endpoint) = &self.config.endpoint_url {
                    loader = loader.endpoint_url(endpoint);
                }
                let sdk = loader.load().await;
                resolve(&self.config, &sdk)
            })
            .await
    }
}

/// Checks the settings and returns the prefix without slashes at its ends.
fn check_config(config: &AwsSecretsManagerConfig) -> Result<String> {
    let prefix = config.prefix.trim_matches('/').to_owned();
    if !prefix.chars().all(|c| c.is_ascii_alphanumeric() || "/_+=.@-".contains(c)) || prefix.len() > 300 {
        return Err(Error::config(format!(
            "AWS Secrets Manager prefix {prefix:?}: secret names allow letters, digits and /_+=.@- only"
        )));
    }
    if let Some(region) = &config.region
        && (region.is_empty() || !region.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
    {
        return Err(Error::config(format!(
            "invalid AWS region {region:?}: expected a name such as `eu-west-1`"
        )));
    }
    if let Some(endpoint) = &config.endpoint_url {
        let host = endpoint.strip_prefix("https://").or_else(|| endpoint.strip_prefix("http://"));
        if host.is_none_or(|h| h.is_empty() || h.starts_with('/')) {
            return Err(Error::config(format!(
                "invalid AWS Secrets Manager endpoint_url {endpoint:?}: expected http(s)://host[:port]"
            )));
        }
    }
    if config.profile.as_deref() == Some("") {
        return Err(Error::config("AWS `profile` must not be empty; leave it out for the default"));
    }
    Ok(prefix)
}

/// The client for `config` over `sdk`, with the region and endpoint it uses.
fn resolve(config: &AwsSecretsManagerConfig, sdk: &SdkConfig) -> Result<Resolved> {
    let mut builder = aws_sdk_secretsmanager::config::Builder::from(sdk);
    if let Some(region) = &config.region {
        builder = builder.region(Region::new(region.clone()));
    }
    if let Some(endpoint) = &config.endpoint_url {
        builder = builder.endpoint_url(endpoint);
    }
    let client_config = builder.build();
    let Some(region) = client_config.region().map(|r| r.to_string()) else {
        return Err(Error::config(
            "no AWS region for Secrets Manager: set `region`, or AWS_REGION, or `region` in the AWS profile",
        ));
    };
    // The endpoint as the client resolves it, for messages.
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let endpoint = config
        .endpoint_url
        .clone()
        .or_else(|| sdk.service_config().and(env("AWS_ENDPOINT_URL_SECRETS_MANAGER")))
        .or_else(|| sdk.endpoint_url().map(str::to_owned))
        .unwrap_or_else(|| {
            let domain = if region.starts_with("cn-") { "amazonaws.com.cn" } else { "amazonaws.com" };
            format!("https://secretsmanager.{region}.{domain}")
        });
    let endpoint = endpoint.trim_end_matches('/').to_owned();
    Ok(Resolved { client: Client::from_conf(client_config), region, endpoint })
}

/// `e` and its sources, `: `-separated (`io error: tcp connect error: Connection refused`).
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !part.is_empty() && !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// Replaces `value` in the error's message (defence in depth: errors never show values).
fn redact(e: Error, value: &SecretString) -> Error {
    let value = value.expose_secret();
    if value.is_empty() || !e.message().contains(value) {
        return e;
    }
    Error::new(e.kind(), e.message().replace(value, "[redacted]"))
}

impl Resolved {
    async fn put(
        &self,
        secret_id: &str,
        value: &SecretString,
    ) -> Result<String, SdkError<aws_sdk_secretsmanager::operation::put_secret_value::PutSecretValueError>>
    {
        let output = self
            .client
            .put_secret_value()
            .secret_id(secret_id)
            .secret_string(value.expose_secret())
            .send()
            .await?;
        Ok(output.version_id().unwrap_or_default().to_owned())
    }

    async fn create(
        &self,
        secret_id: &str,
        value: &SecretString,
    ) -> Result<String, SdkError<aws_sdk_secretsmanager::operation::create_secret::CreateSecretError>> {
        let output = self
            .client
            .create_secret()
            .name(secret_id)
            .description("Created by enterprise-connectors")
            .secret_string(value.expose_secret())
            .send()
            .await?;
        Ok(output.version_id().unwrap_or_default().to_owned())
    }

    /// Maps an SDK error; `what` says what was being done to the secret (`reading`).
    ///
    /// Only the error's code and message go into the error, never the raw response (whose body,
    /// for a response that could not be parsed, may be a secret value).
    fn error<E>(&self, e: SdkError<E, HttpResponse>, what: &str, secret_id: &str) -> Error
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let (endpoint, region) = (&self.endpoint, &self.region);
        let status = e.raw_response().map(|r| r.status().as_u16());
        match &e {
            SdkError::ServiceError(_) | SdkError::ResponseError(_) => {
                let status = status.unwrap_or_default();
                let code = e.code().unwrap_or_default();
                let detail = match (code, e.message().filter(|m| !m.is_empty())) {
                    ("", _) => format!("HTTP {status}"),
                    (code, None) => format!("HTTP {status}, {code}"),
                    (code, Some(message)) => format!("HTTP {status}, {code}: {message}"),
                };
                if AUTH_CODES.contains(&code) || (code.is_empty() && matches!(status, 401 | 403)) {
                    Error::auth(format!(
                        "AWS Secrets Manager denied {what} secret {secret_id} in region {region} ({detail}): \
                         check the AWS credentials and their IAM permissions"
                    ))
                } else if matches!(code, "DecryptionFailure" | "EncryptionFailure") {
                    Error::auth(format!(
                        "AWS Secrets Manager could not use the KMS key while {what} secret {secret_id} in \
                         region {region} ({detail}): check kms:Decrypt and kms:GenerateDataKey on the secret's key"
                    ))
                } else if TRANSIENT_CODES.contains(&code) || status >= 500 || status == 429 {
                    Error::transient(format!(
                        "AWS Secrets Manager at {endpoint} failed {what} secret {secret_id} ({detail})"
                    ))
                } else if matches!(e, SdkError::ResponseError(_)) {
                    Error::source_error(format!(
                        "unexpected answer from AWS Secrets Manager at {endpoint} while {what} secret \
                         {secret_id} (HTTP {status}): not a Secrets Manager response"
                    ))
                } else {
                    Error::source_error(format!(
                        "AWS Secrets Manager at {endpoint} rejected {what} secret {secret_id} in region \
                         {region} ({detail})"
                    ))
                }
            }
            SdkError::TimeoutError(_) => Error::transient(format!(
                "AWS Secrets Manager at {endpoint} timed out while {what} secret {secret_id}"
            )),
            SdkError::DispatchFailure(failure) => {
                let cause = match failure.as_connector_error() {
                    Some(connector) => causes(connector).trim_start_matches("other: ").to_owned(),
                    None => causes(&e),
                };
                if failure.is_io() || failure.is_timeout() {
                    Error::transient(format!(
                        "could not reach AWS Secrets Manager at {endpoint} while {what} secret {secret_id}: {cause}"
                    ))
                } else if cause.to_ascii_lowercase().contains("credentials") {
                    Error::auth(format!(
                        "no usable AWS credentials for Secrets Manager in region {region} while {what} secret \
                         {secret_id}: {cause}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a `profile`, \
                         or run with an instance or task role"
                    ))
                } else if failure.is_user() {
                    Error::config(format!(
                        "invalid request to AWS Secrets Manager at {endpoint} while {what} secret {secret_id}: {cause}"
                    ))
                } else {
                    Error::transient(format!(
                        "request to AWS Secrets Manager at {endpoint} failed while {what} secret {secret_id}: {cause}"
                    ))
                }
            }
            _ => Error::config(format!(
                "could not build the request to AWS Secrets Manager at {endpoint} for {what} secret {secret_id}: {}",
                causes(&e)
            )),
        }
    }
}

#[async_trait]
impl CredentialProvider for AwsSecretsManagerCredentialProvider {
    async fn get_credential(&self, key: &str) -> Result<Option<SecretString>> {
        validate_key(key)?;
        let resolved = self.resolved().await?;
        let secret_id = self.secret_id(key);
        let read = resolved.client.get_secret_value().secret_id(&secret_id).send().await;
        let output = match read {
            Ok(output) => output,
            Err(e) if e.code() == Some("ResourceNotFoundException") => return Ok(None),
            Err(e)
                if e.code() == Some("InvalidRequestException")
                    && marked_for_deletion(e.message().unwrap_or_default()) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(resolved.error(e, "reading", &secret_id)),
        };
        match (output.secret_string(), output.secret_binary()) {
            (Some(s), _) if !s.is_empty() => Ok(Some(SecretString::from(s.to_owned()))),
            (None, Some(_)) => Err(Error::source_error(format!(
                "AWS Secrets Manager secret {secret_id} in region {} holds binary data (SecretBinary), \
                 not a string",
                resolved.region
            ))),
            _ => Ok(None),
        }
    }

    async fn set_credential(&self, key: &str, value: SecretString) -> Result<()> {
        self.put_secret_value(key, &value).await.map(drop)
    }

    fn describe(&self) -> String {
        let (region, endpoint) = match self.resolved.get() {
            Some(r) => (Some(r.region.as_str()), Some(r.endpoint.as_str())),
            None => (self.config.region.as_deref(), self.config.endpoint_url.as_deref()),
        };
        let mut text = format!("AWS Secrets Manager secrets {}", self.secret_id("*"));
        match region {
            Some(region) => text.push_str(&format!(" in region {region}")),
            None => text.push_str(" in the default region"),
        }
        if let Some(endpoint) = endpoint {
            text.push_str(&format!(" at {endpoint}"));
        }
        text
    }

    fn location_of(&self, key: &str) -> String {
        let region = self.resolved.get().map(|r| r.region.as_str()).or(self.config.region.as_deref());
        match region {
            Some(region) => format!("AWS Secrets Manager secret {} in region {region}", self.secret_id(key)),
            None => format!("AWS Secrets Manager secret {}", self.secret_id(key)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_secretsmanager::config::{Credentials, SharedCredentialsProvider};

    fn sdk() -> SdkConfig {
        SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
                "AKIDEXAMPLE",
                "not-a-real-secret-key",
                None,
                None,
                "test",
            )))
            .build()
    }

    #[test]
    fn config_deserializes_with_defaults_and_rejects_unknown_fields() {
        let c: AwsSecretsManagerConfig = serde_json::from_str(r#"{"region": "eu-west-1"}"#).unwrap();
        assert_eq!((c.region.as_deref(), c.prefix.as_str()), (Some("eu-west-1"), "aragora"));
        assert_eq!((c.endpoint_url.as_deref(), c.profile.as_deref()), (None, None));
        assert!(serde_json::from_str::<AwsSecretsManagerConfig>(r#"{"regoin": "x"}"#).is_err());
        assert!(serde_json::from_str::<AwsSecretsManagerConfig>(r#"{"access_key_id": "x"}"#).is_err());
    }

    #[tokio::test]
    async fn names_and_descriptions() {
        let config = AwsSecretsManagerConfig {
            region: Some("eu-west-1".into()),
            prefix: "/team/app/".into(),
            ..AwsSecretsManagerConfig::default()
        };
        let p = AwsSecretsManagerCredentialProvider::with_sdk_config(config, &sdk()).unwrap();
        assert_eq!(p.secret_id("github_token"), "team/app/github_token");
        assert_eq!(
            p.describe(),
            "AWS Secrets Manager secrets team/app/* in region eu-west-1 at https://secretsmanager.eu-west-1.amazonaws.com"
        );
        assert_eq!(p.location_of("x"), "AWS Secrets Manager secret team/app/x in region eu-west-1");
        assert!(p.get_credential("Bad-Key").await.is_err());
        assert!(!format!("{p:?}").contains("not-a-real-secret-key"));

        let lazy = AwsSecretsManagerCredentialProvider::new(AwsSecretsManagerConfig {
            prefix: String::new(),
            ..AwsSecretsManagerConfig::default()
        })
        .unwrap();
        assert_eq!(lazy.secret_id("x"), "x");
        assert_eq!(lazy.describe(), "AWS Secrets Manager secrets * in the default region");
    }

    #[test]
    fn invalid_settings_are_config_errors() {
        let base = AwsSecretsManagerConfig { region: Some("us-east-1".into()), ..Default::default() };
        let cases = [
            AwsSecretsManagerConfig { prefix: "a b".into(), ..base.clone() },
            AwsSecretsManagerConfig { region: Some("eu west".into()), ..base.clone() },
            AwsSecretsManagerConfig { endpoint_url: Some("localhost:5000".into()), ..base.clone() },
            AwsSecretsManagerConfig { endpoint_url: Some("http://".into()), ..base.clone() },
            AwsSecretsManagerConfig { profile: Some(String::new()), ..base.clone() },
        ];
        for c in cases {
            let err = AwsSecretsManagerCredentialProvider::new(c).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::Config, "{err}");
        }
        let with_profile = AwsSecretsManagerConfig { profile: Some("prod".into()), ..base };
        let err = AwsSecretsManagerCredentialProvider::with_sdk_config(with_profile, &sdk()).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Config, "{err}");
    }

    #[test]
    fn a_missing_region_is_a_config_error() {
        let err =
            AwsSecretsManagerCredentialProvider::with_sdk_config(AwsSecretsManagerConfig::default(), &sdk())
                .unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Config, "{err}");
        assert!(err.to_string().contains("no AWS region"), "{err}");
    }
}
