//! One client connection of the generator: UDP, TCP or DTLS, with the
//! buffering a non-blocking stream needs.

use std::io::{self, Read, Write};
use std::net::SocketAddr;

use anyhow::Result;
use mio::net::{TcpStream, UdpSocket};

use crate::client::{Channel, ClientTransport};
use udp_io::{RecvBatch, SendQueue};

use super::BenchTransport;

pub(crate) fn client_transport(t: BenchTransport) -> ClientTransport {
    match t {
        BenchTransport::Udp => ClientTransport::Udp,
        BenchTransport::Tcp => ClientTransport::Tcp,
        // The generator measures, it does not authenticate the server.
        BenchTransport::Dtls => ClientTransport::Dtls { pinned: None },
    }
}

/// A client-side socket in the load loop.
pub(crate) enum Conn {
    /// A connected UDP socket and the server address it is connected to.
    Udp(UdpSocket, SocketAddr),
    Tcp {
        s: TcpStream,
        rbuf: Vec<u8>,
        wbuf: Vec<u8>,
    },
    /// A DTLS association: every message a record of its own.
    Dtls(Box<crate::client::dtls::DtlsSocket>),
}

impl Conn {
    pub(crate) fn from_channel(ch: Channel) -> Result<Conn> {
        Ok(match ch.into_std()? {
            crate::client::StdSocket::Udp(u) => {
                u.set_nonblocking(true)?;
                let remote = u.peer_addr()?;
                Conn::Udp(UdpSocket::from_std(u), remote)
            }
            crate::client::StdSocket::Dtls(d) => {
                d.set_nonblocking(true)?;
                Conn::Dtls(d)
            }
            crate::client::StdSocket::Tcp(t, leftover) => {
                t.set_nonblocking(true)?;
                Conn::Tcp {
                    s: TcpStream::from_std(t),
                    rbuf: leftover,
                    wbuf: Vec::new(),
                }
            }
        })
    }

    /// Registers the socket with `registry`.
    pub(crate) fn register(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
        interest: mio::Interest,
    ) -> io::Result<()> {
        match self {
            Conn::Udp(u, _) => registry.register(u, token, interest),
            Conn::Tcp { s, .. } => registry.register(s, token, interest),
            Conn::Dtls(d) => registry.register(&mut mio::unix::SourceFd(&d.raw_fd()), token, interest),
        }
    }

    /// Sends several messages: on UDP through `q` (one `sendmmsg`, equal
    /// sizes merged by GSO), so the generator's kernel work per packet stays
    /// below the server's.
    pub(crate) fn send_many(&mut self, q: &mut SendQueue, msgs: &[&[u8]]) -> io::Result<()> {
        match self {
            Conn::Udp(u, remote) => {
                for m in msgs {
                    q.push(&u, None, *remote, m);
                }
                q.flush();
                Ok(())
            }
            Conn::Tcp { s, wbuf, .. } => {
                for m in msgs {
                    wbuf.extend_from_slice(m);
                }
                flush(s, wbuf)
            }
            Conn::Dtls(d) => {
                for m in msgs {
                    match d.send(m) {
                        Ok(()) => {}
                        // A full socket buffer loses the record, as UDP would.
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            }
        }
    }

    /// Receives every whole message available, calling `f` on each; on UDP
    /// with `recvmmsg`, so the generator stays cheaper than what it loads.
    pub(crate) fn recv_all(
        &mut self,
        buf: &mut [u8],
        batch: &mut RecvBatch,
        mut f: impl FnMut(&[u8]),
    ) -> io::Result<()> {
        match self {
            Conn::Udp(u, _) => loop {
                let n = match batch.recv(&u) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                    Err(e) => return Err(e),
                };
                for i in 0..n {
                    if let Some(udp_io::Datagram { data: m, .. }) = batch.get(i) {
                        f(m);
                    }
                }
                if n < udp_io::BATCH {
                    return Ok(());
                }
            },
            Conn::Dtls(d) => d.read_available(f),
            Conn::Tcp { s, rbuf, wbuf } => {
                flush(s, wbuf)?;
                loop {
                    match s.read(buf) {
                        Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                        Ok(n) => rbuf.extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
                let mut off = 0;
                while let Some(Ok(n)) = turn_core::stream_frame_len(&rbuf[off..]) {
                    if rbuf.len() - off < n {
                        break;
                    }
                    f(&rbuf[off..off + n]);
                    off += n;
                }
                rbuf.drain(..off);
                Ok(())
            }
        }
    }
}

fn flush(s: &mut TcpStream, wbuf: &mut Vec<u8>) -> io::Result<()> {
    let mut done = 0;
    while done < wbuf.len() {
        match s.write(&wbuf[done..]) {
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    wbuf.drain(..done);
    Ok(())
}
