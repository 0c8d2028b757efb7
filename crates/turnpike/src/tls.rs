//! TLS server configuration: PEM files, or a self-signed certificate made at
//! start-up when none is given.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

use crate::config::TlsSource;

/// A TLS server configuration and the SHA-256 fingerprint of its leaf.
pub struct TlsSetup {
    /// The rustls configuration shared by every worker.
    pub config: Arc<rustls::ServerConfig>,
    /// SHA-256 of the leaf certificate, colon-separated hex.
    pub fingerprint: String,
    /// The leaf certificate (DER), for clients in tests that pin it.
    pub leaf: CertificateDer<'static>,
}

/// Colon-separated uppercase hex SHA-256, as `openssl x509 -fingerprint` prints.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The rustls crypto provider everything here uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the TLS configuration from `src`.
pub fn setup(src: &TlsSource) -> Result<TlsSetup> {
    let (chain, key) = match src {
        TlsSource::Files { cert, key } => (load_certs(cert)?, load_key(key)?),
        // localhost and the loopback addresses, so a client on this host can
        // verify it by pinning it (`probe --ca`).
        TlsSource::SelfSigned => {
            self_signed(&["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()])?
        }
    };
    let leaf = chain[0].clone();
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS: no protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("cert/key: the private key does not match the certificate, or is unsupported")?;
    Ok(TlsSetup {
        config: Arc::new(config),
        fingerprint: fingerprint(&leaf),
        leaf,
    })
}

/// A self-signed certificate for `names` and its key.
pub fn self_signed(names: &[String]) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let ck =
        rcgen::generate_simple_self_signed(names.to_vec()).context("generating a self-signed certificate")?;
    let cert = CertificateDer::from(ck.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der()));
    Ok((vec![cert], key))
}

/// Writes a self-signed certificate and key as PEM files (for tests and for
/// people trying TLS out).
pub fn write_self_signed_pem(names: &[String], cert: &Path, key: &Path) -> Result<()> {
    let ck = rcgen::generate_simple_self_signed(names.to_vec())?;
    std::fs::write(cert, ck.cert.pem())?;
    std::fs::write(key, ck.key_pair.serialize_pem())?;
    Ok(())
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let data = std::fs::read(path).with_context(|| format!("cert: cannot read {}", path.display()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut &data[..])
        .collect::<Result<_, _>>()
        .with_context(|| format!("cert: {} is not valid PEM", path.display()))?;
    if certs.is_empty() {
        bail!(
            "cert: {} holds no CERTIFICATE block (expected a PEM certificate chain)",
            path.display()
        );
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let data = std::fs::read(path).with_context(|| format!("key: cannot read {}", path.display()))?;
    rustls_pemfile::private_key(&mut &data[..])
        .with_context(|| format!("key: {} is not valid PEM", path.display()))?
        .with_context(|| format!("key: {} holds no PRIVATE KEY block", path.display()))
}
