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
    /// The same certificate for DTLS, or why DTLS cannot use it (the DTLS
    /// engine signs with ECDSA only).
    pub dtls: Result<turn_dtls::Identity, String>,
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

/// Seconds since the Unix epoch now.
fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The leaf's notAfter, in seconds since the Unix epoch.
fn not_after(leaf: &CertificateDer<'_>) -> Result<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| anyhow::anyhow!("cert: the leaf certificate does not parse ({e})"))?;
    Ok(cert.validity().not_after.timestamp())
}

/// How long before expiry a warning is logged at start and reload.
const EXPIRY_WARNING_SECS: i64 = 14 * 86_400;

/// An expired certificate is refused (clients would refuse every
/// connection); one expiring within 14 days starts with a warning.
fn check_validity(path: &Path, not_after: i64, now: i64) -> Result<()> {
    let when = format_unix(not_after);
    if not_after <= now {
        bail!(
            "cert {}: expired on {when}; renew it (e.g. certbot renew) and restart or reload",
            path.display()
        );
    }
    if not_after - now < EXPIRY_WARNING_SECS {
        tracing::warn!(
            cert = %path.display(),
            not_after = %when,
            days_left = (not_after - now) / 86_400,
            "TLS certificate expires soon; renew it"
        );
    } else {
        tracing::info!(cert = %path.display(), not_after = %when, "TLS certificate valid");
    }
    Ok(())
}

/// `YYYY-MM-DD HH:MM:SS UTC` for a Unix time (civil-from-days, proleptic
/// Gregorian), so no date crate is needed for one log field.
fn format_unix(t: i64) -> String {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// The ALPN ids of RFC 7443: TURN, and STUN NAT behaviour discovery.
pub const ALPN: [&[u8]; 2] = [b"stun.turn", b"stun.nat-discovery"];

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
    let dtls = match &key {
        PrivateKeyDer::Pkcs1(_) => {
            Err("the private key is RSA; DTLS here needs an ECDSA P-256 or P-384 key".to_string())
        }
        k => turn_dtls::Identity::new(leaf.to_vec(), k.secret_der().to_vec()),
    };
    let not_after = not_after(&leaf)?;
    if let TlsSource::Files { cert, .. } = src {
        check_validity(cert, not_after, now_unix())?;
    }
    crate::metrics::TLS_NOT_AFTER.store(not_after, std::sync::atomic::Ordering::Relaxed);
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS: no protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("cert/key: the private key does not match the certificate, or is unsupported")?;
    // RFC 7443: a client that offers ALPN must offer one of these; one that
    // offers none is served too (most TURN clients), and one that offers
    // only other protocols gets the no_application_protocol alert.
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(TlsSetup {
        config: Arc::new(config),
        fingerprint: fingerprint(&leaf),
        leaf,
        dtls,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_expiry() {
        assert_eq!(format_unix(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_unix(1_700_000_000), "2023-11-14 22:13:20 UTC");
        let p = Path::new("c.pem");
        assert!(check_validity(p, 1000, 2000)
            .unwrap_err()
            .to_string()
            .contains("expired on"));
        assert!(
            check_validity(p, 2000 + 86_400, 2000).is_ok(),
            "expiring soon only warns"
        );
    }
}
