//! Credential providers against the Vault fake: the Vault KV v2 provider (token and AppRole,
//! versions, check-and-set, errors), and the chain and cache combinators in front of it.
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
