//! A blocking DTLS 1.2 client socket (RFC 7350): a connected UDP socket
//! and a `dimpl` engine in the client role. The server's certificate is
//! checked against a pinned one when given (the probe's `--ca` for a
//! self-signed server); otherwise it is accepted as it comes, like
//! [`super::channel::ClientTransport::Tls`] without a pin.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A DTLS association over a connected UDP socket.
pub struct DtlsSocket {
    sock: UdpSocket,
    dtls: dimpl::Dtls,
    /// Decrypted messages not yet handed out.
    inbox: std::collections::VecDeque<Vec<u8>>,
    /// When the engine wants `handle_timeout` (retransmission).
    wake: Option<Instant>,
    closed: bool,
    buf: Vec<u8>,
}

/// The certificate the engine needs to be made (a TURN server does not ask
/// for it): one per process, made on first use.
fn client_certificate() -> io::Result<dimpl::DtlsCertificate> {
    static CERT: std::sync::OnceLock<Result<dimpl::DtlsCertificate, String>> = std::sync::OnceLock::new();
    CERT.get_or_init(|| {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        let cert = rcgen::CertificateParams::new(vec!["turnpike-client".to_string()])
            .map_err(|e| e.to_string())?
            .self_signed(&key)
            .map_err(|e| e.to_string())?;
        Ok(dimpl::DtlsCertificate {
            certificate: cert.der().to_vec(),
            private_key: key.serialize_der(),
        })
    })
    .clone()
    .map_err(io::Error::other)
}

impl DtlsSocket {
    /// Handshakes with `server` over `sock` (bound, not yet connected)
    /// within `timeout`; `pinned`: the only server certificate (DER) to
    /// accept.
    pub(crate) fn connect(
        sock: UdpSocket,
        server: SocketAddr,
        pinned: Option<&[u8]>,
        timeout: Duration,
    ) -> io::Result<DtlsSocket> {
        sock.connect(server)?;
        let config = dimpl::Config::builder()
            .handshake_timeout(timeout)
            .build()
            .map_err(io::Error::other)?;
        let now = Instant::now();
        let mut dtls = dimpl::Dtls::new_12(Arc::new(config), client_certificate()?, now);
        dtls.set_active(true);
        let mut s = DtlsSocket {
            sock,
            dtls,
            inbox: Default::default(),
            wake: None,
            closed: false,
            buf: vec![0u8; 4096],
        };
        s.dtls.handle_timeout(now).map_err(io::Error::other)?;
        let deadline = now + timeout;
        let mut peer_cert: Option<Vec<u8>> = None;
        loop {
            if s.drain(&mut peer_cert)? {
                break;
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "DTLS handshake timed out",
                ));
            }
            s.wait(deadline)?;
        }
        if let Some(pin) = pinned {
            if peer_cert.as_deref() != Some(pin) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "DTLS: the server's certificate is not the pinned one",
                ));
            }
        }
        Ok(s)
    }

    /// Sends what the engine has, keeps what it decrypted; true once the
    /// handshake is done.
    fn drain(&mut self, peer_cert: &mut Option<Vec<u8>>) -> io::Result<bool> {
        let mut connected = false;
        loop {
            match self.dtls.poll_output(&mut self.buf) {
                dimpl::Output::Packet(p) => {
                    self.sock.send(p)?;
                }
                dimpl::Output::Connected => connected = true,
                dimpl::Output::PeerCert(c) => *peer_cert = Some(c.to_vec()),
                dimpl::Output::ApplicationData(d) => self.inbox.push_back(d.to_vec()),
                dimpl::Output::CloseNotify => self.closed = true,
                dimpl::Output::BufferTooSmall { needed } => self.buf.resize(needed, 0),
                dimpl::Output::Timeout(t) => {
                    self.wake = Some(t);
                    return Ok(connected);
                }
                _ => {}
            }
        }
    }

    /// Waits for one datagram (or the engine's next timer, or `deadline`)
    /// and feeds it to the engine.
    fn wait(&mut self, deadline: Instant) -> io::Result<()> {
        let now = Instant::now();
        let until = self.wake.map_or(deadline, |w| w.min(deadline));
        let left = until.saturating_duration_since(now).max(Duration::from_millis(1));
        self.sock.set_read_timeout(Some(left))?;
        let mut tmp = [0u8; 65536];
        match self.sock.recv(&mut tmp) {
            Ok(n) => {
                self.dtls
                    .handle_timeout(Instant::now())
                    .map_err(io::Error::other)?;
                self.dtls.handle_packet(&tmp[..n]).map_err(io::Error::other)?;
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                self.dtls
                    .handle_timeout(Instant::now())
                    .map_err(io::Error::other)?;
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// For a caller's own poll loop (the load generator).
    pub(crate) fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        self.sock.set_nonblocking(on)
    }

    /// The socket's descriptor, to register with a poll.
    pub(crate) fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.sock.as_raw_fd()
    }

    /// Non-blocking: reads every datagram waiting and hands each message
    /// they carried to `f`.
    pub(crate) fn read_available(&mut self, mut f: impl FnMut(&[u8])) -> io::Result<()> {
        let mut tmp = [0u8; 65536];
        loop {
            match self.sock.recv(&mut tmp) {
                Ok(n) => {
                    self.dtls.handle_packet(&tmp[..n]).map_err(io::Error::other)?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(e),
            }
        }
        self.drain(&mut None)?;
        while let Some(m) = self.inbox.pop_front() {
            f(&m);
        }
        Ok(())
    }

    /// Sends one message in a record.
    pub(crate) fn send(&mut self, data: &[u8]) -> io::Result<()> {
        self.dtls.send_application_data(data).map_err(io::Error::other)?;
        self.drain(&mut None).map(|_| ())
    }

    /// Receives one message, or `None` when `deadline` passes first.
    pub(crate) fn recv(&mut self, deadline: Instant) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(m) = self.inbox.pop_front() {
                return Ok(Some(m));
            }
            if self.closed {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            self.wait(deadline)?;
            self.drain(&mut None)?;
        }
    }
}

impl Drop for DtlsSocket {
    fn drop(&mut self) {
        // close_notify, so the server drops the association (and the
        // allocation made over it) at once.
        if self.dtls.close().is_ok() {
            let _ = self.drain(&mut None);
        }
    }
}
