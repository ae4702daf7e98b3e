//! TLS: the rustls client configuration of each [`SslMode`], built once per connector.
//!
//! `tokio_postgres` knows `disable`, `prefer` and `require` only; the stricter modes are
//! `require` with a certificate verifier that does their checks:
//!
//! | sslmode | driver mode | certificate check |
//! |---|---|---|
//! | `disable` | `Disable` | none (no TLS) |
//! | `prefer` | `Prefer` | none; handshake signatures are still checked |
//! | `require` | `Require` | none, or the chain when `sslrootcert` is set (as libpq) |
//! | `verify-ca` | `Require` | chain to a trusted root; any host name |
//! | `verify-full` | `Require` | chain to a trusted root, and the host name |
//!
//! The crypto provider (aws-lc-rs) is named in each `ClientConfig`: the library installs no
//! process-wide default provider.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use connector_core::{Error, Result};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode as DriverSslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{PostgresConfig, SslMode};

/// How the connections of one connector negotiate TLS.
#[derive(Clone)]
pub(crate) struct Tls {
    /// The mode as configured, named in errors.
    pub sslmode: SslMode,
    /// What the driver is told.
    pub driver_mode: DriverSslMode,
    /// The rustls connector; `None` when TLS is never used (`disable`, Unix sockets).
    pub connector: Option<MakeRustlsConnect>,
    /// Where the trusted roots come from (`sslrootcert "/etc/pki/db-ca.pem"`, `the system's
    /// trusted roots`), named in certificate errors; `None` when certificates are not checked.
    pub roots: Option<String>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("sslmode", &self.sslmode)
            .field("driver_mode", &self.driver_mode)
            .field("roots", &self.roots)
            .finish_non_exhaustive()
    }
}

/// How much of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Nothing but the handshake signatures (proof that the server holds the certificate's key).
    None,
    /// The chain up to a trusted root, not the host name.
    Chain,
    /// The chain and the host name.
    Full,
}

impl Tls {
    /// The TLS setup of `config`: reads `sslrootcert` (or the system's roots when a mode
    /// verifies certificates without it). Problems are configuration errors naming the key.
    pub fn new(config: &PostgresConfig) -> Result<Tls> {
        let off = Tls {
            sslmode: config.sslmode,
            driver_mode: DriverSslMode::Disable,
            connector: None,
            roots: None,
        };
        // As in libpq, sslmode does not apply to Unix sockets (PostgreSQL has no TLS there).
        if config.host.starts_with('/') {
            return Ok(off);
        }
        let (driver_mode, check) = match config.sslmode {
            SslMode::Disable => return Ok(off),
            SslMode::Prefer => (DriverSslMode::Prefer, Check::None),
            SslMode::Require if config.sslrootcert.is_some() => (DriverSslMode::Require, Check::Chain),
            SslMode::Require => (DriverSslMode::Require, Check::None),
            SslMode::VerifyCa => (DriverSslMode::Require, Check::Chain),
            SslMode::VerifyFull => (DriverSslMode::Require, Check::Full),
        };
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let algorithms = provider.signature_verification_algorithms;
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::internal(format!("postgres connector: TLS setup: {e}")))?;
        let (client, roots) = if check == Check::None {
            let verifier = Arc::new(CertificateCheck { roots: None, algorithms });
            (builder.dangerous().with_custom_certificate_verifier(verifier), None)
        } else {
            let (roots, described) = match &config.sslrootcert {
                Some(path) => (load_root_file(path)?, format!("sslrootcert {path:?}")),
                None => (native_roots(config.sslmode)?, "the system's trusted roots".to_owned()),
            };
            let roots = Arc::new(roots);
            let builder = if check == Check::Chain {
                builder.dangerous().with_custom_certificate_verifier(Arc::new(CertificateCheck {
                    roots: Some(roots),
                    algorithms,
                }))
            } else {
                let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| Error::config(format!("postgres connector: {described}: {e}")))?;
                builder.with_webpki_verifier(verifier)
            };
            (builder, Some(described))
        };
        let client = client.with_no_client_auth();
        Ok(Tls {
            sslmode: config.sslmode,
            driver_mode,
            connector: Some(MakeRustlsConnect::new(client)),
            roots,
        })
    }
}

/// The certificates of a PEM file, as trust anchors. The error names `sslrootcert` and the path.
pub(crate) fn load_root_file(path: &Path) -> Result<RootCertStore> {
    let invalid = |why: String| Error::config(format!("postgres connector: sslrootcert = {path:?}: {why}"));
    let pem = std::fs::read(path).map_err(|e| invalid(format!("cannot read the file: {e}")))?;
    let mut roots = RootCertStore::empty();
    for (i, cert) in CertificateDer::pem_slice_iter(&pem).enumerate() {
        let cert = cert.map_err(|e| invalid(format!("is not a valid PEM file: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| invalid(format!("certificate {} cannot be used as a root: {e}", i + 1)))?;
    }
    if roots.is_empty() {
        return Err(invalid("contains no PEM certificate (\"-----BEGIN CERTIFICATE-----\")".into()));
    }
    Ok(roots)
}

/// The operating system's trusted roots (`SSL_CERT_FILE` and `SSL_CERT_DIR` are honoured).
fn native_roots(sslmode: SslMode) -> Result<RootCertStore> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (_, unusable) = roots.add_parsable_certificates(found.certs);
    for error in &found.errors {
        tracing::debug!("loading the system's trusted roots: {error}");
    }
    if roots.is_empty() {
        let why = found.errors.first().map(|e| format!(" ({e})")).unwrap_or_default();
        return Err(Error::config(format!(
            "postgres connector: sslmode = {:?}: no trusted root certificates found in the system's store{why}; \
             set sslrootcert to a PEM file with the CA that issued the server's certificate",
            sslmode.as_str()
        )));
    }
    if unusable > 0 {
        tracing::debug!("{unusable} of the system's root certificates could not be parsed and are ignored");
    }
    Ok(roots)
}

/// The certificate check of the modes rustls' standard verifier does not cover. The handshake
/// signatures are always verified, so the connection is encrypted with a key the server holds.
/// - `roots: None` (`prefer`, `require`): any certificate is accepted (nobody vouched for it).
/// - `roots: Some` (`verify-ca`, and `require` with `sslrootcert`): the chain must lead to a
///   trusted root and be valid now for server authentication; the host name is not compared.
#[derive(Debug)]
struct CertificateCheck {
    roots: Option<Arc<RootCertStore>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for CertificateCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The kind of a TLS failure, from the `rustls` error the handshake ended with.
pub(crate) fn failure_of(error: &rustls::Error) -> crate::client::TlsFailure {
    use crate::client::TlsFailure;
    use rustls::CertificateError as C;
    match error {
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => TlsFailure::UnknownIssuer,
        rustls::Error::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            TlsFailure::NameMismatch
        }
        rustls::Error::InvalidCertificate(_)
        | rustls::Error::NoCertificatesPresented
        | rustls::Error::InvalidCertRevocationList(_) => TlsFailure::Certificate,
        _ => TlsFailure::Protocol,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use connector_core::{ErrorKind, TenantId};

    fn config(host: &str, sslmode: SslMode, sslrootcert: Option<&Path>) -> PostgresConfig {
        PostgresConfig {
            host: host.into(),
            sslmode,
            sslrootcert: sslrootcert.map(Path::to_path_buf),
            ..PostgresConfig::new(TenantId::new("t").unwrap(), "db", vec!["docs".into()])
        }
    }

    #[test]
    fn each_mode_maps_to_a_driver_mode_and_a_check() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, crate::config::tests::TEST_CA_PEM).unwrap();
        let from_file = Some(format!("sslrootcert {ca:?}"));
        let system = Some("the system's trusted roots".to_owned());
        let cases = [
            (SslMode::Disable, None, DriverSslMode::Disable, false, None),
            (SslMode::Prefer, None, DriverSslMode::Prefer, true, None),
            (SslMode::Require, None, DriverSslMode::Require, true, None),
            // libpq: a root file turns require into verify-ca.
            (SslMode::Require, Some(ca.as_path()), DriverSslMode::Require, true, from_file.clone()),
            (SslMode::VerifyCa, Some(ca.as_path()), DriverSslMode::Require, true, from_file.clone()),
            (SslMode::VerifyFull, Some(ca.as_path()), DriverSslMode::Require, true, from_file.clone()),
            (SslMode::VerifyCa, None, DriverSslMode::Require, true, system.clone()),
            (SslMode::VerifyFull, None, DriverSslMode::Require, true, system.clone()),
        ];
        for (mode, rootcert, driver_mode, connector, roots) in cases {
            let tls = match Tls::new(&config("db.internal", mode, rootcert)) {
                Ok(tls) => tls,
                // A machine without a system store: the error says what to do.
                Err(e) if rootcert.is_none() && e.to_string().contains("no trusted root certificates") => {
                    assert_eq!(e.kind(), ErrorKind::Config);
                    assert!(e.to_string().contains(&format!("sslmode = {:?}", mode.as_str())), "{e}");
                    continue;
                }
                Err(e) => panic!("{mode}: {e}"),
            };
            assert_eq!(tls.sslmode, mode);
            assert_eq!(tls.driver_mode, driver_mode, "{mode}");
            assert_eq!(tls.connector.is_some(), connector, "{mode}");
            assert_eq!(tls.roots, roots, "{mode} {rootcert:?}");
        }
    }

    #[test]
    fn unix_sockets_never_use_tls() {
        for mode in SslMode::ALL {
            let tls = Tls::new(&config("/var/run/postgresql", mode, None)).unwrap();
            assert_eq!(tls.driver_mode, DriverSslMode::Disable, "{mode}");
            assert!(tls.connector.is_none());
            assert_eq!(tls.sslmode, mode, "errors still name the configured mode");
        }
    }

    #[test]
    fn a_bad_root_file_is_a_config_error_naming_the_key() {
        let err =
            Tls::new(&config("db", SslMode::VerifyFull, Some(Path::new("/nonexistent/ca.pem")))).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(
            err.to_string().contains("sslrootcert = \"/nonexistent/ca.pem\": cannot read the file"),
            "{err}"
        );
    }

    #[test]
    fn rustls_errors_are_sorted_by_cause() {
        use crate::client::TlsFailure;
        use rustls::CertificateError as C;
        let cases = [
            (rustls::Error::InvalidCertificate(C::UnknownIssuer), TlsFailure::UnknownIssuer),
            (rustls::Error::InvalidCertificate(C::NotValidForName), TlsFailure::NameMismatch),
            (rustls::Error::InvalidCertificate(C::Expired), TlsFailure::Certificate),
            (rustls::Error::InvalidCertificate(C::BadSignature), TlsFailure::Certificate),
            (rustls::Error::NoCertificatesPresented, TlsFailure::Certificate),
            (rustls::Error::AlertReceived(rustls::AlertDescription::ProtocolVersion), TlsFailure::Protocol),
            (
                rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered),
                TlsFailure::Protocol,
            ),
        ];
        for (error, failure) in cases {
            assert_eq!(failure_of(&error), failure, "{error}");
        }
    }
}
