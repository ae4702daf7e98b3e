//! Credential providers against the Vault fake: the Vault KV v2 provider (token and AppRole,
//! versions, check-and-set, errors), and the chain and cache combinators in front of it; and the
//! AWS Secrets Manager provider against moto (a real Secrets Manager API) and, for answers moto
//! does not give (access denied, server errors), a small Secrets Manager fake.
#![cfg(feature = "conformance")]

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use connector_core::credentials::{
    CachedCredentialProvider, ChainCredentialProvider, CredentialProvider, EnvCredentialProvider,
    ExposeSecret, SecretString, StaticCredentialProvider, VaultConfig, VaultCredentialProvider,
    require_credential,
};
use connector_core::reexports::serde_json::json;
use connector_core::{Error, ErrorKind};
use connector_testkit::VaultFake;

const KEY: &str = "postgres_password";
const PATH: &str = "aragora/postgres_password";
const LOGIN: &str = "/v1/auth/approle/login";

fn config(vault: &VaultFake) -> VaultConfig {
    VaultConfig {
        address: Some(vault.address().to_owned()),
        token: Some(SecretString::from(vault.root_token())),
        ..VaultConfig::default()
    }
}

fn provider(vault: &VaultFake) -> VaultCredentialProvider {
    VaultCredentialProvider::new(config(vault)).expect("valid settings")
}

fn approle_provider(vault: &VaultFake, secret_id: &str) -> VaultCredentialProvider {
    VaultCredentialProvider::new(VaultConfig {
        address: Some(vault.address().to_owned()),
        role_id: Some("connectors".into()),
        secret_id: Some(SecretString::from(secret_id)),
        ..VaultConfig::default()
    })
    .expect("valid settings")
}

async fn read(provider: &dyn CredentialProvider, key: &str) -> Result<Option<String>> {
    Ok(provider.get_credential(key).await?.map(|v| v.expose_secret().to_owned()))
}

fn logins(vault: &VaultFake) -> usize {
    vault.requests().iter().filter(|r| r.path == LOGIN).count()
}

#[tokio::test]
async fn reads_the_value_field_of_the_prefixed_secret() -> Result<()> {
    let vault = VaultFake::start().await?;
    vault.put(PATH, json!({"value": "pw-1", "note": "other fields are ignored"}));
    let p = provider(&vault);

    assert_eq!(read(&p, KEY).await?.as_deref(), Some("pw-1"));
    let requests = vault.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        (requests[0].method.as_str(), requests[0].path.as_str()),
        ("GET", "/v1/secret/data/aragora/postgres_password")
    );
    assert_eq!(requests[0].namespace, None);

    let (value, version) = p.get_credential_with_version(KEY).await?.expect("present");
    assert_eq!((value.expose_secret(), version), ("pw-1", 1));
    assert_eq!(require_credential(&p, KEY).await?.expose_secret(), "pw-1");
    Ok(())
}

#[tokio::test]
async fn mount_prefix_field_and_namespace_are_configurable() -> Result<()> {
    let vault = VaultFake::start().await?;
    vault.mount_kv("kv");
    vault.put_in("kv", "team/github_token", json!({"token": "ghp"}));
    let p = VaultCredentialProvider::new(VaultConfig {
        mount: "kv".into(),
        prefix: "team".into(),
        field: "token".into(),
        namespace: Some("ns1".into()),
        ..config(&vault)
    })?;
    assert_eq!(read(&p, "github_token").await?.as_deref(), Some("ghp"));
    let request = &vault.requests()[0];
    assert_eq!(request.path, "/v1/kv/data/team/github_token");
    assert_eq!(request.namespace.as_deref(), Some("ns1"));
    Ok(())
}

#[tokio::test]
async fn missing_secrets_fields_and_deleted_versions_are_none() -> Result<()> {
    let vault = VaultFake::start().await?;
    let p = provider(&vault);
    assert_eq!(read(&p, "absent_key").await?, None);

    vault.put("aragora/no_field", json!({"other": "x"}));
    assert_eq!(read(&p, "no_field").await?, None);

    vault.put(PATH, json!({"value": "pw"}));
    vault.delete(PATH);
    assert_eq!(read(&p, KEY).await?, None, "a soft-deleted latest version reads as missing");

    let err = require_credential(&p, "absent_key").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth);
    assert!(
        err.to_string().contains("field `value` of Vault secret secret/data/aragora/absent_key"),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn a_bad_token_is_an_auth_error_that_names_the_path_but_not_the_token() -> Result<()> {
    let vault = VaultFake::start().await?;
    vault.put(PATH, json!({"value": "pw"}));
    let token = "hvs.WRONG-token-123";
    let p = VaultCredentialProvider::new(VaultConfig {
        token: Some(SecretString::from(token)),
        ..config(&vault)
    })?;

    for err in [
        p.get_credential(KEY).await.unwrap_err(),
        p.set_credential(KEY, SecretString::from("new-pw")).await.unwrap_err(),
    ] {
        assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
        let message = err.to_string();
        assert!(message.contains("secret/data/aragora/postgres_password"), "{message}");
        assert!(message.contains(vault.address()), "{message}");
        assert!(message.contains("permission denied"), "{message}");
        assert!(!message.contains(token) && !format!("{err:?}").contains(token), "{message}");
        assert!(!message.contains("new-pw"));
    }
    assert_eq!(vault.current_version(PATH), 1, "the denied write changed nothing");
    Ok(())
}

#[tokio::test]
async fn set_creates_a_new_version_each_time() -> Result<()> {
    let vault = VaultFake::start().await?;
    let p = provider(&vault);
    for (i, value) in ["v-one", "v-two", "v-three"].into_iter().enumerate() {
        p.set_credential(KEY, SecretString::from(value)).await?;
        assert_eq!(vault.current_version(PATH), i as u64 + 1);
    }
    assert_eq!(vault.get(PATH), Some(json!({"value": "v-three"})));
    let (value, version) = p.get_credential_with_version(KEY).await?.expect("present");
    assert_eq!((value.expose_secret(), version), ("v-three", 3));
    assert_eq!(p.current_version(KEY).await?, 3);
    assert_eq!(p.current_version("absent_key").await?, 0);
    Ok(())
}

#[tokio::test]
async fn check_and_set_stops_a_writer_that_read_an_older_version() -> Result<()> {
    let vault = VaultFake::start().await?;
    vault.put(PATH, json!({"value": "v1"}));
    let cas =
        |vault: &VaultFake| VaultCredentialProvider::new(VaultConfig { cas_required: true, ..config(vault) });
    let (first, second) = (cas(&vault)?, cas(&vault)?);

    // Both read version 1; the first writer wins, the second is told instead of overwriting.
    assert_eq!(read(&first, KEY).await?.as_deref(), Some("v1"));
    assert_eq!(read(&second, KEY).await?.as_deref(), Some("v1"));
    first.set_credential(KEY, SecretString::from("first")).await?;
    let err = second.set_credential(KEY, SecretString::from("second")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("check-and-set failed"), "{err}");
    assert!(err.to_string().contains("secret/data/aragora/postgres_password"), "{err}");
    assert_eq!(vault.get(PATH), Some(json!({"value": "first"})));

    // The second writer must read the new value before it may write.
    assert!(second.set_credential(KEY, SecretString::from("second")).await.is_err());
    assert_eq!(read(&second, KEY).await?.as_deref(), Some("first"));
    second.set_credential(KEY, SecretString::from("second")).await?;
    assert_eq!(vault.current_version(PATH), 3);

    // A writer that has not read the key checks against the current version; one that read it
    // as deleted, against the deleted version.
    let fresh = cas(&vault)?;
    fresh.set_credential(KEY, SecretString::from("fresh")).await?;
    vault.delete(PATH);
    assert_eq!(read(&fresh, KEY).await?, None);
    fresh.set_credential(KEY, SecretString::from("recreated")).await?;
    assert_eq!(vault.current_version(PATH), 5);
    assert_eq!(read(&second, KEY).await?.as_deref(), Some("recreated"));

    // The explicit form: expected versions, 0 for "must not exist yet".
    let plain = provider(&vault);
    let err = plain.set_credential_cas(KEY, SecretString::from("x"), 4).await.unwrap_err();
    assert!(err.to_string().contains("check-and-set failed"), "{err}");
    assert_eq!(plain.set_credential_cas(KEY, SecretString::from("x"), 5).await?, 6);
    assert_eq!(plain.set_credential_cas("new_key", SecretString::from("n"), 0).await?, 1);
    assert!(plain.set_credential_cas("new_key", SecretString::from("n"), 0).await.is_err());
    Ok(())
}

#[tokio::test]
async fn approle_logs_in_once_and_again_when_the_token_is_revoked_or_expires() -> Result<()> {
    let vault = VaultFake::start().await?;
    vault.put(PATH, json!({"value": "pw"}));
    vault.approle("connectors", "sid-123");
    let p = approle_provider(&vault, "sid-123");

    assert_eq!(read(&p, KEY).await?.as_deref(), Some("pw"));
    assert_eq!(read(&p, KEY).await?.as_deref(), Some("pw"));
    assert_eq!(logins(&vault), 1);

    // A revoked token: 403, one new login, the request is retried.
    vault.revoke_issued_tokens();
    assert_eq!(read(&p, KEY).await?.as_deref(), Some("pw"));
    assert_eq!(logins(&vault), 2);

    // A token whose lease is about to end is replaced before use.
    vault.set_token_ttl(Duration::from_secs(1));
    vault.revoke_issued_tokens();
    p.set_credential(KEY, SecretString::from("pw-2")).await?;
    assert_eq!(logins(&vault), 3);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    vault.clear_requests();
    assert_eq!(read(&p, KEY).await?.as_deref(), Some("pw-2"));
    let paths: Vec<String> = vault.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(
        paths,
        [LOGIN, "/v1/secret/data/aragora/postgres_password"],
        "no request with the expired token"
    );
    Ok(())
}

#[tokio::test]
async fn a_bad_secret_id_is_an_auth_error_without_the_secret_id() -> Result<()> {
    let vault = VaultFake::start().await?;
    vault.approle("connectors", "sid-123");
    let p = approle_provider(&vault, "sid-WRONG");
    let err = p.get_credential(KEY).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    assert!(err.to_string().contains("AppRole login"), "{err}");
    assert!(!err.to_string().contains("sid-WRONG"), "{err}");
    Ok(())
}

#[tokio::test]
async fn unavailable_vault_is_a_transient_error_naming_the_address() -> Result<()> {
    let vault = VaultFake::start().await?;
    vault.put(PATH, json!({"value": "pw"}));
    let p = provider(&vault);

    vault.fail_next(1);
    let err = p.get_credential(KEY).await.unwrap_err();
    assert_transient(&err, vault.address());
    assert!(err.to_string().contains("503"), "{err}");
    assert_eq!(read(&p, KEY).await?.as_deref(), Some("pw"), "the next request succeeds");

    // Nothing listens on port 1.
    let down = VaultCredentialProvider::new(VaultConfig {
        address: Some("http://127.0.0.1:1".into()),
        ..config(&vault)
    })?;
    assert_transient(&down.get_credential(KEY).await.unwrap_err(), "http://127.0.0.1:1");
    Ok(())
}

fn assert_transient(err: &Error, address: &str) {
    assert_eq!(err.kind(), ErrorKind::Transient, "{err}");
    assert!(err.is_retryable());
    assert!(err.to_string().contains(address), "{err}");
}

#[tokio::test]
async fn chain_reads_in_order_and_writes_to_the_first_writable_provider() -> Result<()> {
    let vault = VaultFake::start().await?;
    vault.put(PATH, json!({"value": "from-vault"}));
    vault.put("aragora/only_in_vault", json!({"value": "v"}));
    let vault_provider: Arc<dyn CredentialProvider> = Arc::new(provider(&vault));
    let local: Arc<dyn CredentialProvider> =
        Arc::new(StaticCredentialProvider::new().with(KEY, "from-static"));
    let env: Arc<dyn CredentialProvider> = Arc::new(EnvCredentialProvider::with_prefix("CREDTEST_"));

    let static_first = ChainCredentialProvider::new().then(local.clone()).then(vault_provider.clone());
    assert_eq!(read(&static_first, KEY).await?.as_deref(), Some("from-static"));
    assert_eq!(vault.request_count(), 0, "the static hit does not ask Vault");
    assert_eq!(read(&static_first, "only_in_vault").await?.as_deref(), Some("v"));

    let vault_first = ChainCredentialProvider::new().then(vault_provider.clone()).then(local);
    assert_eq!(read(&vault_first, KEY).await?.as_deref(), Some("from-vault"));

    let env_then_vault = ChainCredentialProvider::new().then(env.clone()).then(vault_provider);
    assert!(
        env_then_vault
            .describe()
            .starts_with("credential chain: environment variables CREDTEST_*, then Vault")
    );
    env_then_vault.set_credential("rotated_token", SecretString::from("r1")).await?;
    assert_eq!(vault.get("aragora/rotated_token"), Some(json!({"value": "r1"})));
    assert_eq!(read(env.as_ref(), "rotated_token").await?, None, "the environment is not written");
    let err = require_credential(&env_then_vault, "nowhere").await.unwrap_err().to_string();
    assert!(err.contains("environment variable CREDTEST_NOWHERE or field `value` of Vault secret"), "{err}");
    Ok(())
}

#[tokio::test]
async fn cache_hits_do_not_reach_vault() -> Result<()> {
    let vault = VaultFake::start().await?;
    vault.put(PATH, json!({"value": "pw"}));
    let cached = CachedCredentialProvider::new(provider(&vault));

    assert_eq!(read(&cached, KEY).await?.as_deref(), Some("pw"));
    assert_eq!(read(&cached, KEY).await?.as_deref(), Some("pw"));
    assert_eq!(vault.request_count(), 1, "the second read is served from the cache");

    assert_eq!(read(&cached, "absent_key").await?, None);
    assert_eq!(read(&cached, "absent_key").await?, None);
    assert_eq!(vault.request_count(), 3, "misses are not cached");

    cached.set_credential(KEY, SecretString::from("pw-2")).await?;
    let after_write = vault.request_count();
    assert_eq!(read(&cached, KEY).await?.as_deref(), Some("pw-2"));
    assert_eq!(vault.request_count(), after_write, "the written value is cached");
    assert_eq!(vault.get(PATH), Some(json!({"value": "pw-2"})));
    Ok(())
}

#[tokio::test]
async fn debug_output_never_shows_the_token_or_secret_id() -> Result<()> {
    let vault = VaultFake::start().await?;
    let token_config = config(&vault);
    let approle_config = VaultConfig {
        address: Some(vault.address().to_owned()),
        role_id: Some("connectors".into()),
        secret_id: Some(SecretString::from("sid-SECRET-456")),
        ..VaultConfig::default()
    };
    let token_provider = VaultCredentialProvider::new(token_config.clone())?;
    let approle = VaultCredentialProvider::new(approle_config.clone())?;
    let cached = CachedCredentialProvider::new(VaultCredentialProvider::new(token_config.clone())?);
    let outputs = [
        format!("{token_config:?}"),
        format!("{token_config:#?}"),
        format!("{approle_config:?}"),
        format!("{token_provider:?}"),
        format!("{approle:?}"),
        format!("{cached:?}"),
        token_provider.describe(),
    ];
    for output in outputs {
        assert!(!output.contains(vault.root_token()), "{output}");
        assert!(!output.contains("sid-SECRET-456"), "{output}");
    }
    assert!(format!("{token_provider:?}").contains(vault.address()));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// AWS Secrets Manager

mod aws {
    use std::sync::{Arc, Mutex};

    use anyhow::Result;
    use axum::Router;
    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use connector_core::credentials::{
        AwsSecretsManagerConfig, AwsSecretsManagerCredentialProvider, ChainCredentialProvider,
        CredentialProvider, EnvCredentialProvider, ExposeSecret, SecretString, require_credential,
    };
    use connector_core::reexports::aws_config::{BehaviorVersion, Region, SdkConfig};
    use connector_core::reexports::aws_sdk_secretsmanager::Client;
    use connector_core::reexports::aws_sdk_secretsmanager::config::retry::RetryConfig;
    use connector_core::reexports::aws_sdk_secretsmanager::config::{Credentials, SharedCredentialsProvider};
    use connector_core::{Error, ErrorKind};
    use connector_testkit::MotoServer;

    use super::read;

    /// The secret access key of the tests' AWS credentials: it must never show.
    const SECRET_ACCESS_KEY: &str = "sk-testkit-NEVER-SHOWN-7f3a";

    /// An AWS configuration with static credentials (moto accepts any) and the tests' region,
    /// so that no test asks the real credential chain (or the instance metadata service).
    fn sdk_config(retries: bool) -> SdkConfig {
        let credentials = Credentials::new("AKIDTESTKIT", SECRET_ACCESS_KEY, None, None, "connector-testkit");
        SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(MotoServer::REGION))
            .credentials_provider(SharedCredentialsProvider::new(credentials))
            .retry_config(if retries { RetryConfig::standard() } else { RetryConfig::disabled() })
            .build()
    }

    fn provider(endpoint: &str, prefix: &str) -> AwsSecretsManagerCredentialProvider {
        let config = AwsSecretsManagerConfig {
            endpoint_url: Some(endpoint.to_owned()),
            prefix: prefix.to_owned(),
            ..AwsSecretsManagerConfig::default()
        };
        AwsSecretsManagerCredentialProvider::with_sdk_config(config, &sdk_config(true))
            .expect("valid settings")
    }

    /// A plain SDK client on moto, to check what the provider stored.
    fn sdk_client(moto: &MotoServer) -> Client {
        let config =
            connector_core::reexports::aws_sdk_secretsmanager::config::Builder::from(&sdk_config(true))
                .endpoint_url(moto.endpoint())
                .build();
        Client::from_conf(config)
    }

    /// Fails when `text` shows a secret value or the secret access key.
    fn assert_hides(text: &str, values: &[&str]) {
        assert!(!text.contains(SECRET_ACCESS_KEY), "the secret access key shows: {text}");
        for value in values {
            assert!(!text.contains(value), "secret value {value:?} shows: {text}");
        }
    }

    fn assert_error_hides(err: &Error, values: &[&str]) {
        assert_hides(&err.to_string(), values);
        assert_hides(&format!("{err:?}"), values);
    }

    #[tokio::test]
    async fn put_then_get_creates_the_prefixed_secret() -> Result<()> {
        let moto = MotoServer::shared().await?;
        let p = provider(moto.endpoint(), "aragora");
        let key = "put_get_password";
        assert_eq!(p.secret_id(key), "aragora/put_get_password");
        assert!(p.is_writable());

        p.set_credential(key, SecretString::from("pw-put-get-1")).await?;
        assert_eq!(read(&p, key).await?.as_deref(), Some("pw-put-get-1"));
        assert_eq!(require_credential(&p, key).await?.expose_secret(), "pw-put-get-1");

        // It is an ordinary secret named aragora/<key> holding the value as its SecretString.
        let stored = sdk_client(moto).get_secret_value().secret_id("aragora/put_get_password").send().await?;
        assert_eq!(stored.secret_string(), Some("pw-put-get-1"));
        assert_eq!(p.secret_versions(key).await?.len(), 1);
        assert_eq!(
            p.describe(),
            format!("AWS Secrets Manager secrets aragora/* in region us-east-1 at {}", moto.endpoint())
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_missing_secret_is_none() -> Result<()> {
        let moto = MotoServer::shared().await?;
        let p = provider(moto.endpoint(), "aragora");
        assert_eq!(read(&p, "never_stored_key").await?, None);
        assert!(p.secret_versions("never_stored_key").await?.is_empty());

        let err = require_credential(&p, "never_stored_key").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Auth);
        assert_eq!(
            err.to_string(),
            "missing credential `never_stored_key`: set AWS Secrets Manager secret \
             aragora/never_stored_key in region us-east-1"
        );
        assert!(p.get_credential("Not-A-Key").await.is_err(), "keys are checked before any request");
        Ok(())
    }

    #[tokio::test]
    async fn rotation_adds_a_version_and_reads_the_newest() -> Result<()> {
        let moto = MotoServer::shared().await?;
        let p = provider(moto.endpoint(), "rotation");
        let key = "qbo_refresh_token";
        let first = p.put_secret_value(key, &SecretString::from("rt-one")).await?;
        p.set_credential(key, SecretString::from("rt-two")).await?;
        assert_eq!(read(&p, key).await?.as_deref(), Some("rt-two"));

        let versions = p.secret_versions(key).await?;
        assert_eq!(versions.len(), 2, "{versions:?}");
        assert!(versions[0].is_current(), "{versions:?}");
        assert_ne!(versions[0].id, first);
        assert_eq!(versions[1].id, first);
        assert_eq!(versions[1].stages, ["AWSPREVIOUS"]);

        // The previous value is still there, under AWSPREVIOUS.
        let previous = sdk_client(moto)
            .get_secret_value()
            .secret_id("rotation/qbo_refresh_token")
            .version_stage("AWSPREVIOUS")
            .send()
            .await?;
        assert_eq!(previous.secret_string(), Some("rt-one"));
        Ok(())
    }

    #[tokio::test]
    async fn prefixes_keep_secrets_apart() -> Result<()> {
        let moto = MotoServer::shared().await?;
        let team = provider(moto.endpoint(), "/team-a/");
        let default = provider(moto.endpoint(), "aragora");
        let none = provider(moto.endpoint(), "");
        let key = "prefix_github_token";
        assert_eq!(team.secret_id(key), "team-a/prefix_github_token");

        team.set_credential(key, SecretString::from("ghp-team")).await?;
        assert_eq!(read(&team, key).await?.as_deref(), Some("ghp-team"));
        assert_eq!(read(&default, key).await?, None, "aragora/ does not see team-a/");

        // A secret made outside the provider, under another prefix, and one without a prefix.
        let client = sdk_client(moto);
        client.create_secret().name("other/prefix_github_token").secret_string("ghp-other").send().await?;
        client.create_secret().name("prefix_github_token").secret_string("ghp-bare").send().await?;
        assert_eq!(read(&provider(moto.endpoint(), "other"), key).await?.as_deref(), Some("ghp-other"));
        assert_eq!(read(&none, key).await?.as_deref(), Some("ghp-bare"));
        assert_eq!(read(&default, key).await?, None);
        Ok(())
    }

    #[tokio::test]
    async fn a_secret_scheduled_for_deletion_reads_as_none() -> Result<()> {
        let moto = MotoServer::shared().await?;
        let p = provider(moto.endpoint(), "deleted");
        p.set_credential("old_token", SecretString::from("tok-old")).await?;
        sdk_client(moto).delete_secret().secret_id("deleted/old_token").send().await?;
        assert_eq!(read(&p, "old_token").await?, None);
        Ok(())
    }

    #[tokio::test]
    async fn a_binary_secret_is_a_source_error() -> Result<()> {
        let moto = MotoServer::shared().await?;
        let client = sdk_client(moto);
        let blob =
            connector_core::reexports::aws_sdk_secretsmanager::primitives::Blob::new(b"bin-secret".to_vec());
        client.create_secret().name("kinds/binary_key").secret_binary(blob).send().await?;
        let p = provider(moto.endpoint(), "kinds");
        let err = p.get_credential("binary_key").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Source, "{err}");
        assert!(err.to_string().contains("kinds/binary_key"), "{err}");
        assert!(err.to_string().contains("binary"), "{err}");
        assert_error_hides(&err, &["bin-secret"]);
        Ok(())
    }

    #[tokio::test]
    async fn chain_writes_rotated_tokens_to_secrets_manager() -> Result<()> {
        let moto = MotoServer::shared().await?;
        let aws: Arc<dyn CredentialProvider> = Arc::new(provider(moto.endpoint(), "chain"));
        let env: Arc<dyn CredentialProvider> = Arc::new(EnvCredentialProvider::with_prefix("AWSCHAINTEST_"));
        let chain = ChainCredentialProvider::new().then(env).then(aws.clone());
        chain.set_credential("rotated_token", SecretString::from("r-1")).await?;
        assert_eq!(read(aws.as_ref(), "rotated_token").await?.as_deref(), Some("r-1"));
        assert_eq!(read(&chain, "rotated_token").await?.as_deref(), Some("r-1"));
        let err = require_credential(&chain, "nowhere").await.unwrap_err().to_string();
        assert!(
            err.contains(
                "environment variable AWSCHAINTEST_NOWHERE or AWS Secrets Manager secret chain/nowhere"
            ),
            "{err}"
        );
        Ok(())
    }

    /// A Secrets Manager that answers every request with one error, as the service does: JSON
    /// 1.1, `{"__type": ..., "message": ...}`. When `echo` is set, the message also quotes the
    /// request body, as a careless proxy might, to prove the provider still hides the value.
    struct ErrorFake {
        endpoint: String,
        targets: Arc<Mutex<Vec<String>>>,
        server: tokio::task::JoinHandle<()>,
    }

    impl Drop for ErrorFake {
        fn drop(&mut self) {
            self.server.abort();
        }
    }

    #[derive(Clone)]
    struct FakeAnswer {
        status: StatusCode,
        error_type: &'static str,
        message: &'static str,
        echo: bool,
        targets: Arc<Mutex<Vec<String>>>,
    }

    async fn answer(State(fake): State<FakeAnswer>, headers: HeaderMap, body: Bytes) -> Response {
        let target = headers.get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or_default();
        fake.targets.lock().unwrap().push(target.to_owned());
        let mut message = fake.message.to_owned();
        if fake.echo {
            message.push_str(&format!(" (request: {})", String::from_utf8_lossy(&body)));
        }
        let body =
            connector_core::reexports::serde_json::json!({ "__type": fake.error_type, "message": message })
                .to_string();
        (fake.status, [("content-type", "application/x-amz-json-1.1")], body).into_response()
    }

    async fn error_fake(
        status: StatusCode,
        error_type: &'static str,
        message: &'static str,
        echo: bool,
    ) -> ErrorFake {
        let targets = Arc::new(Mutex::new(Vec::new()));
        let state = FakeAnswer { status, error_type, message, echo, targets: targets.clone() };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("address"));
        let app = Router::new().fallback(answer).with_state(state);
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        ErrorFake { endpoint, targets, server }
    }

    fn fake_provider(endpoint: &str) -> AwsSecretsManagerCredentialProvider {
        let config =
            AwsSecretsManagerConfig { endpoint_url: Some(endpoint.to_owned()), ..Default::default() };
        AwsSecretsManagerCredentialProvider::with_sdk_config(config, &sdk_config(false))
            .expect("valid settings")
    }

    #[tokio::test]
    async fn access_denied_is_an_auth_error_naming_the_secret_and_region() -> Result<()> {
        for error_type in
            ["AccessDeniedException", "UnrecognizedClientException", "InvalidSignatureException"]
        {
            let fake = error_fake(
                StatusCode::BAD_REQUEST,
                error_type,
                "User: arn:aws:iam::123456789012:user/ci is not authorized to perform this operation",
                true,
            )
            .await;
            let p = fake_provider(&fake.endpoint);
            let read_err = p.get_credential("postgres_password").await.unwrap_err();
            let write_err =
                p.set_credential("postgres_password", SecretString::from("pw-DENIED-42")).await.unwrap_err();
            for err in [&read_err, &write_err] {
                assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
                assert!(!err.is_retryable());
                let message = err.to_string();
                assert!(message.contains("aragora/postgres_password"), "{message}");
                assert!(message.contains("region us-east-1"), "{message}");
                assert!(message.contains(error_type), "{message}");
                assert_error_hides(err, &["pw-DENIED-42"]);
            }
            assert!(read_err.to_string().contains("denied reading"), "{read_err}");
            assert!(write_err.to_string().contains("denied writing"), "{write_err}");
            assert!(
                write_err.to_string().contains("[redacted]"),
                "the echoed value is replaced: {write_err}"
            );
            assert_eq!(
                *fake.targets.lock().unwrap(),
                ["secretsmanager.GetSecretValue", "secretsmanager.PutSecretValue"],
                "one request each, no retry of a denied request"
            );
        }
        Ok(())
    }

    #[tokio::test]
    async fn writing_a_secret_scheduled_for_deletion_says_to_restore_it() -> Result<()> {
        // moto accepts new versions of a deleted secret; Secrets Manager answers this.
        let fake = error_fake(
            StatusCode::BAD_REQUEST,
            "InvalidRequestException",
            "You can't perform this operation on the secret because it was marked for deletion.",
            true,
        )
        .await;
        let err = fake_provider(&fake.endpoint)
            .set_credential("old_token", SecretString::from("tok-new-77"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config, "{err}");
        assert!(err.to_string().contains("scheduled for deletion"), "{err}");
        assert!(err.to_string().contains("restore-secret --secret-id aragora/old_token"), "{err}");
        assert_error_hides(&err, &["tok-new-77"]);
        Ok(())
    }

    #[tokio::test]
    async fn throttling_and_server_errors_are_transient_naming_the_endpoint() -> Result<()> {
        let cases = [
            (StatusCode::INTERNAL_SERVER_ERROR, "InternalServiceError"),
            (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable"),
            (StatusCode::BAD_REQUEST, "ThrottlingException"),
        ];
        for (status, error_type) in cases {
            let fake = error_fake(status, error_type, "try again later", false).await;
            let p = fake_provider(&fake.endpoint);
            let err = p.get_credential("postgres_password").await.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Transient, "{err}");
            assert!(err.is_retryable());
            assert!(err.to_string().contains(&fake.endpoint), "{err}");
            assert!(err.to_string().contains(error_type), "{err}");
        }
        // Other rejections are the source's errors, not retried.
        let fake =
            error_fake(StatusCode::BAD_REQUEST, "InvalidParameterException", "bad parameter", false).await;
        let err = fake_provider(&fake.endpoint).get_credential("postgres_password").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Source, "{err}");
        assert!(err.to_string().contains("InvalidParameterException: bad parameter"), "{err}");
        Ok(())
    }

    #[tokio::test]
    async fn credentials_that_cannot_be_loaded_are_an_auth_error() -> Result<()> {
        use connector_core::reexports::aws_config::provider_config::ProviderConfig;
        use connector_core::reexports::aws_config::web_identity_token::{
            StaticConfiguration, WebIdentityTokenCredentialsProvider,
        };

        // A web identity whose token file is missing fails before it asks STS.
        let missing = WebIdentityTokenCredentialsProvider::builder()
            .static_configuration(StaticConfiguration {
                web_identity_token_file: "/nonexistent/connectors-testkit/token".into(),
                role_arn: "arn:aws:iam::123456789012:role/connectors".into(),
                session_name: "testkit".into(),
            })
            .configure(&ProviderConfig::without_region().with_region(Some(Region::new(MotoServer::REGION))))
            .build();
        let sdk = sdk_config(false)
            .into_builder()
            .credentials_provider(SharedCredentialsProvider::new(missing))
            .build();
        let fake = error_fake(StatusCode::BAD_REQUEST, "AccessDeniedException", "unexpected", false).await;
        let config =
            AwsSecretsManagerConfig { endpoint_url: Some(fake.endpoint.clone()), ..Default::default() };
        let p = AwsSecretsManagerCredentialProvider::with_sdk_config(config, &sdk)?;

        let err = p.get_credential("postgres_password").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
        let message = err.to_string();
        assert!(message.contains("no usable AWS credentials"), "{message}");
        assert!(message.contains("aragora/postgres_password"), "{message}");
        assert!(fake.targets.lock().unwrap().is_empty(), "nothing was sent without credentials");
        Ok(())
    }

    #[tokio::test]
    async fn an_unreachable_endpoint_is_transient_naming_the_endpoint() -> Result<()> {
        // Nothing listens on port 1.
        let p = fake_provider("http://127.0.0.1:1");
        for err in [
            p.get_credential("postgres_password").await.unwrap_err(),
            p.set_credential("postgres_password", SecretString::from("pw-unsent-9")).await.unwrap_err(),
        ] {
            assert_eq!(err.kind(), ErrorKind::Transient, "{err}");
            assert!(err.is_retryable());
            let message = err.to_string();
            assert!(
                message.contains("could not reach AWS Secrets Manager at http://127.0.0.1:1"),
                "{message}"
            );
            assert!(message.contains("aragora/postgres_password"), "{message}");
            assert_error_hides(&err, &["pw-unsent-9"]);
        }
        Ok(())
    }

    #[tokio::test]
    async fn debug_output_never_shows_secrets() -> Result<()> {
        let moto = MotoServer::shared().await?;
        let config = AwsSecretsManagerConfig {
            endpoint_url: Some(moto.endpoint().to_owned()),
            prefix: "debug".into(),
            ..AwsSecretsManagerConfig::default()
        };
        let p = AwsSecretsManagerCredentialProvider::with_sdk_config(config.clone(), &sdk_config(true))?;
        p.set_credential("debug_key", SecretString::from("dbg-VALUE-31")).await?;
        let value = p.get_credential("debug_key").await?.expect("stored");
        let lazy = AwsSecretsManagerCredentialProvider::new(config.clone())?;
        let outputs = [
            format!("{config:?}"),
            format!("{p:?}"),
            format!("{p:#?}"),
            format!("{lazy:?}"),
            format!("{value:?}"),
            format!("{:?}", p.secret_versions("debug_key").await?),
            p.describe(),
            p.location_of("debug_key"),
        ];
        for output in outputs {
            assert_hides(&output, &["dbg-VALUE-31"]);
        }
        assert!(format!("{p:?}").contains(moto.endpoint()));
        assert!(format!("{p:?}").contains("us-east-1"));
        Ok(())
    }
}
