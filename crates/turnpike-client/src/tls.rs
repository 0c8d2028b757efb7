//! TLS for the client side: a verifier that pins one certificate (tests and
//! diagnostics against self-signed servers), or accepts any (`probe` only
//! says so in its report).

use std::sync::Arc;

use rustls::pki_types::CertificateDer;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate verifier for clients that accept exactly one certificate
/// (tests and diagnostics against self-signed servers), by its DER bytes.
#[derive(Debug)]
pub struct PinnedCert {
    der: Vec<u8>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl PinnedCert {
    /// Accept only `der`; `None` accepts any certificate (diagnostics only).
    pub fn new(der: Option<&[u8]>) -> Self {
        PinnedCert {
            der: der.map(|d| d.to_vec()).unwrap_or_default(),
            provider: provider(),
        }
    }
}

impl rustls::client::danger::ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if self.der.is_empty() || end_entity.as_ref() == &self.der[..] {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client configuration trusting exactly `pinned` (or anything, if `None`).
pub fn client_config(pinned: Option<&[u8]>) -> Arc<rustls::ClientConfig> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedCert::new(pinned)))
                .with_no_client_auth()
        })
        .unwrap_or_else(|_| unreachable!("ring supports the default protocol versions"));
    cfg.alpn_protocols = vec![ALPN_TURN.to_vec()];
    Arc::new(cfg)
}

/// RFC 7443's ALPN id for TURN, offered on every TLS connection (servers
/// without ALPN ignore it).
pub const ALPN_TURN: &[u8] = b"stun.turn";

/// A client configuration that verifies the server the way a browser
/// would: Mozilla's roots (webpki-roots, built in, so no system store is
/// needed) plus `extra_roots`.
pub fn verified_config(extra_roots: &[Vec<u8>]) -> std::io::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for der in extra_roots {
        roots
            .add(CertificateDer::from(der.clone()))
            .map_err(|e| std::io::Error::other(format!("--ca: {e}")))?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN_TURN.to_vec()];
    Ok(Arc::new(cfg))
}

/// The certificates of a PEM file, as DER.
pub fn load_pem_certs(path: &std::path::Path) -> std::io::Result<Vec<Vec<u8>>> {
    let data = std::fs::read(path)?;
    let certs: Vec<Vec<u8>> = rustls_pemfile::certs(&mut &data[..])
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()?;
    if certs.is_empty() {
        return Err(std::io::Error::other(format!(
            "{}: no CERTIFICATE block",
            path.display()
        )));
    }
    Ok(certs)
}
