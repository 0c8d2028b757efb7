//! The client's connection to a server: a UDP socket, or a TCP or TLS
//! stream framed per RFC 8489 §6.2.2, with blocking sends and receives
//! under a deadline.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Which transport to reach the server over.
#[derive(Debug, Clone)]
pub enum ClientTransport {
    /// UDP.
    Udp,
    /// TCP.
    Tcp,
    /// TLS; `pinned` is the DER certificate to trust (`None`: any, which
    /// verifies nothing: for `probe --insecure` and tests).
    Tls {
        /// Certificate to accept.
        pinned: Option<Vec<u8>>,
    },
    /// TLS verified the way a browser would: the server's chain must lead
    /// to a trusted root (Mozilla's set, plus `extra_roots`), be valid now
    /// and name `server_name` (a DNS name or an IP address).
    TlsVerified {
        /// The name the certificate must carry.
        server_name: String,
        /// More trust anchors (DER), e.g. a private CA or a self-signed
        /// certificate given with `probe --ca`.
        extra_roots: Vec<Vec<u8>>,
    },
    /// DTLS 1.2 over UDP (RFC 7350); `pinned` as for [`ClientTransport::Tls`].
    Dtls {
        /// Certificate to accept (`None`: any).
        pinned: Option<Vec<u8>>,
    },
}

enum Kind {
    Udp(UdpSocket),
    Dtls(Box<super::dtls::DtlsSocket>),
    Tcp(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

/// One connection (or UDP socket) to a server, framing messages on streams.
pub struct Channel {
    kind: Kind,
    rbuf: Vec<u8>,
}

impl Channel {
    /// Connects to `server`.
    pub fn connect(
        transport: &ClientTransport,
        server: SocketAddr,
        timeout: Duration,
    ) -> io::Result<Channel> {
        Self::connect_from(transport, server, None, timeout)
    }

    /// Connects to `server` from the local address `local` (any if `None`).
    pub fn connect_from(
        transport: &ClientTransport,
        server: SocketAddr,
        local: Option<std::net::IpAddr>,
        timeout: Duration,
    ) -> io::Result<Channel> {
        let any: std::net::IpAddr = if server.is_ipv4() {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        };
        let bind = SocketAddr::new(local.unwrap_or(any), 0);
        let tcp = |server: SocketAddr| -> io::Result<TcpStream> {
            let s = socket2::Socket::new(socket2::Domain::for_address(server), socket2::Type::STREAM, None)?;
            if local.is_some() {
                s.bind(&bind.into())?;
            }
            s.connect_timeout(&server.into(), timeout)?;
            Ok(s.into())
        };
        let kind = match transport {
            ClientTransport::Udp => {
                let s = UdpSocket::bind(bind)?;
                s.connect(server)?;
                Kind::Udp(s)
            }
            ClientTransport::Dtls { pinned } => {
                let s = UdpSocket::bind(bind)?;
                Kind::Dtls(Box::new(super::dtls::DtlsSocket::connect(
                    s,
                    server,
                    pinned.as_deref(),
                    timeout,
                )?))
            }
            ClientTransport::Tcp => {
                let s = tcp(server)?;
                s.set_nodelay(true)?;
                Kind::Tcp(s)
            }
            ClientTransport::Tls { .. } | ClientTransport::TlsVerified { .. } => {
                let s = tcp(server)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(timeout))?;
                let (cfg, name): (Arc<rustls::ClientConfig>, String) = match transport {
                    ClientTransport::TlsVerified {
                        server_name,
                        extra_roots,
                    } => (crate::tls::verified_config(extra_roots)?, server_name.clone()),
                    ClientTransport::Tls { pinned } => (
                        crate::tls::client_config(pinned.as_deref()),
                        "localhost".to_owned(),
                    ),
                    _ => unreachable!("matched above"),
                };
                let name = rustls::pki_types::ServerName::try_from(name).map_err(io::Error::other)?;
                let conn = rustls::ClientConnection::new(cfg, name).map_err(io::Error::other)?;
                let mut tls = rustls::StreamOwned::new(conn, s);
                // Complete the handshake now so failures surface here.
                while tls.conn.is_handshaking() {
                    tls.conn.complete_io(&mut tls.sock)?;
                }
                Kind::Tls(Box::new(tls))
            }
        };
        Ok(Channel {
            kind,
            rbuf: Vec::new(),
        })
    }

    /// The local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.kind {
            Kind::Udp(s) => s.local_addr(),
            Kind::Dtls(s) => s.local_addr(),
            Kind::Tcp(s) => s.local_addr(),
            Kind::Tls(s) => s.sock.local_addr(),
        }
    }

    /// Whether this is a stream (ChannelData must be padded).
    pub fn is_stream(&self) -> bool {
        !matches!(self.kind, Kind::Udp(_) | Kind::Dtls(_))
    }

    /// Sends one message (a datagram, or bytes on the stream).
    pub fn send(&mut self, data: &[u8]) -> io::Result<()> {
        match &mut self.kind {
            Kind::Udp(s) => s.send(data).map(|_| ()),
            Kind::Dtls(s) => s.send(data),
            Kind::Tcp(s) => s.write_all(data),
            Kind::Tls(s) => {
                s.write_all(data)?;
                s.flush()
            }
        }
    }

    /// One read from a TCP or TLS stream, waiting at most `left`.
    fn read_stream(&mut self, left: Duration, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.kind {
            Kind::Udp(_) | Kind::Dtls(_) => Err(io::ErrorKind::Unsupported.into()),
            Kind::Tcp(s) => {
                s.set_read_timeout(Some(left))?;
                s.read(buf)
            }
            Kind::Tls(s) => {
                s.sock.set_read_timeout(Some(left))?;
                s.read(buf)
            }
        }
    }

    /// Receives raw bytes (an RFC 6062 data connection after
    /// ConnectionBind): what is buffered, else one read; `None` when
    /// `deadline` passes first; an error when the stream ended.
    pub fn recv_raw(&mut self, deadline: Instant) -> io::Result<Option<Vec<u8>>> {
        if !self.rbuf.is_empty() {
            return Ok(Some(std::mem::take(&mut self.rbuf)));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        let mut tmp = vec![0u8; 65536];
        match self.read_stream(left, &mut tmp) {
            Ok(0) => Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                tmp.truncate(n);
                Ok(Some(tmp))
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Receives one message, or `None` when `deadline` passes first.
    pub fn recv(&mut self, deadline: Instant) -> io::Result<Option<Vec<u8>>> {
        loop {
            if self.is_stream() {
                match turn_core::stream_frame_len(&self.rbuf) {
                    Some(Ok(n)) if self.rbuf.len() >= n => {
                        let msg: Vec<u8> = self.rbuf.drain(..n).collect();
                        return Ok(Some(msg));
                    }
                    Some(Err(())) => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "not STUN or ChannelData",
                        ))
                    }
                    _ => {}
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let left = left.max(Duration::from_millis(1));
            let mut tmp = [0u8; 65536];
            let res = match &mut self.kind {
                Kind::Udp(s) => {
                    s.set_read_timeout(Some(left))?;
                    match s.recv(&mut tmp) {
                        Ok(n) => return Ok(Some(tmp[..n].to_vec())),
                        Err(e) => Err(e),
                    }
                }
                Kind::Dtls(s) => return s.recv(Instant::now() + left),
                _ => self.read_stream(left, &mut tmp),
            };
            match res {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.rbuf.extend_from_slice(&tmp[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Ok(None)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// The plain socket under a [`Channel`], for callers that drive it
/// themselves (the load generator).
pub enum StdSocket {
    /// A connected UDP socket.
    Udp(UdpSocket),
    /// A DTLS association (its engine and socket together).
    Dtls(Box<super::dtls::DtlsSocket>),
    /// A TCP stream and any bytes already read but not yet consumed.
    Tcp(TcpStream, Vec<u8>),
}

impl Channel {
    /// Gives up the socket (TLS channels cannot: the session lives here).
    pub fn into_std(self) -> io::Result<StdSocket> {
        match self.kind {
            Kind::Udp(u) => Ok(StdSocket::Udp(u)),
            Kind::Dtls(d) => Ok(StdSocket::Dtls(d)),
            Kind::Tcp(t) => Ok(StdSocket::Tcp(t, self.rbuf)),
            Kind::Tls(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "TLS channels cannot be unwrapped",
            )),
        }
    }
}
