//! A small blocking STUN/TURN client over UDP, TCP and TLS: the test
//! client of the integration tests, and the base of `probe` and `bench`.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use stun_proto::{attr, method, ChannelData, Class, Message, MessageBuilder, MessageType, PacketKind};
use turn_core::ErrorCode;

mod channel;
pub mod dtls;

pub use channel::{Channel, ClientTransport, StdSocket};

/// Why a client operation failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum ClientError {
    /// No answer in time.
    Timeout,
    /// A socket error.
    Io(io::Error),
    /// The server answered with an error response.
    Error {
        /// ERROR-CODE.
        code: u16,
        /// Reason phrase.
        reason: String,
    },
    /// The answer made no sense.
    Protocol(&'static str),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Timeout => f.write_str("no response"),
            ClientError::Io(e) => write!(f, "{e}"),
            ClientError::Error { code, reason } => write!(f, "{code} {reason}"),
            ClientError::Protocol(s) => f.write_str(s),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Io(e)
    }
}

/// What an Allocate granted.
#[derive(Debug, Clone, Copy)]
pub struct Allocation {
    /// XOR-RELAYED-ADDRESS.
    pub relayed: SocketAddr,
    /// XOR-MAPPED-ADDRESS.
    pub mapped: SocketAddr,
    /// LIFETIME in seconds.
    pub lifetime: u32,
    /// The second XOR-RELAYED-ADDRESS of a dual allocation.
    pub additional: Option<SocketAddr>,
    /// ADDRESS-ERROR-CODE: the family (1 IPv4, 2 IPv6) and code the server
    /// could not serve (RFC 8656 §14.13).
    pub family_error: Option<(u8, u16)>,
}

/// Which relayed address family an Allocate asks for (RFC 8656 §7.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayFamily {
    /// IPv4, the default (no REQUESTED-ADDRESS-FAMILY).
    #[default]
    Ipv4,
    /// IPv6 (REQUESTED-ADDRESS-FAMILY IPv6).
    Ipv6,
    /// Both (ADDITIONAL-ADDRESS-FAMILY IPv6).
    Dual,
}

/// Application data received through the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Received {
    /// A Data indication from `peer`.
    Data {
        /// Sender.
        peer: SocketAddr,
        /// Payload.
        data: Vec<u8>,
    },
    /// ChannelData on `channel`.
    Channel {
        /// Channel number.
        channel: u16,
        /// Payload.
        data: Vec<u8>,
    },
    /// A Data indication with ICMP (RFC 8656 §11.5): what was sent to
    /// `peer` drew an ICMP error.
    Icmp {
        /// The peer the datagram was for.
        peer: SocketAddr,
        /// ICMP type.
        icmp_type: u8,
        /// ICMP code.
        icmp_code: u8,
        /// Error data (the MTU for "packet too big").
        info: u32,
    },
    /// RFC 6062 ConnectionAttempt: `peer` connected to the TCP relay;
    /// bind it with [`TurnClient::connection_bind`] within 30 s.
    ConnectionAttempt {
        /// CONNECTION-ID.
        id: u32,
        /// The peer.
        peer: SocketAddr,
    },
}

/// Ends a request: the long-term credential attributes and
/// MESSAGE-INTEGRITY once a challenge taught the realm and nonce (RFC 8489
/// §9.2.3), then FINGERPRINT.
fn sign(b: &mut MessageBuilder, user: &str, realm: Option<&str>, nonce: Option<&[u8]>, key: &[u8; 16]) {
    if let (Some(realm), Some(nonce)) = (realm, nonce) {
        b.attr(attr::USERNAME, user.as_bytes())
            .attr(attr::REALM, realm.as_bytes())
            .attr(attr::NONCE, nonce)
            .message_integrity(key);
    }
    b.fingerprint();
}

/// A TURN client session (long-term credentials) over one [`Channel`].
pub struct TurnClient {
    ch: Channel,
    user: String,
    password: String,
    realm: Option<String>,
    nonce: Option<Vec<u8>>,
    key: [u8; 16],
    timeout: Duration,
    inbox: VecDeque<Vec<u8>>,
    buf: Vec<u8>,
    family: RelayFamily,
    tcp: bool,
    /// ALTERNATE-SERVER of the last 300 answer (RFC 8489 §14.15).
    alternate: Option<SocketAddr>,
    /// RFC 8016: ask for mobility on Allocate; the last ticket received.
    mobility: bool,
    ticket: Option<Vec<u8>>,
}

impl TurnClient {
    /// A client with credentials; nothing is sent yet.
    pub fn new(ch: Channel, user: &str, password: &str) -> Self {
        TurnClient {
            ch,
            user: user.to_owned(),
            password: password.to_owned(),
            realm: None,
            nonce: None,
            key: [0; 16],
            timeout: Duration::from_secs(3),
            inbox: VecDeque::new(),
            buf: Vec::new(),
            family: RelayFamily::Ipv4,
            tcp: false,
            alternate: None,
            mobility: false,
            ticket: None,
        }
    }

    /// The next [`TurnClient::allocate`] asks for mobility (RFC 8016
    /// MOBILITY-TICKET); the ticket it gets is kept.
    pub fn set_mobility(&mut self, on: bool) {
        self.mobility = on;
    }

    /// The last mobility ticket the server gave.
    pub fn mobility_ticket(&self) -> Option<&[u8]> {
        self.ticket.as_deref()
    }

    /// RFC 8016 §3.2: after the client's address changed, carries the
    /// allocation over to `ch` (a socket from the new address) with a
    /// Refresh bearing the ticket; the server's new ticket is kept.
    pub fn move_to(&mut self, ch: Channel) -> Result<u32, ClientError> {
        let ticket = self.ticket.clone().ok_or(ClientError::Protocol(
            "no mobility ticket (allocate with set_mobility first)",
        ))?;
        self.ch = ch;
        self.inbox.clear();
        let resp = self.transaction(method::REFRESH, &move |b| {
            b.attr(attr::MOBILITY_TICKET, &ticket);
        })?;
        let m = Message::parse(&resp).map_err(|_| ClientError::Protocol("bad response"))?;
        self.keep_ticket(&m);
        Ok(m.get_u32(attr::LIFETIME).unwrap_or(0))
    }

    fn keep_ticket(&mut self, m: &Message<'_>) {
        if let Some(t) = m.get(attr::MOBILITY_TICKET).filter(|t| !t.is_empty()) {
            self.ticket = Some(t.to_vec());
        }
    }

    /// Where the last 300 Try Alternate sent this client, if one did.
    pub fn alternate_server(&self) -> Option<SocketAddr> {
        self.alternate
    }

    /// The next [`TurnClient::allocate`] asks for a TCP relay (RFC 6062;
    /// over a TCP or TLS channel).
    pub fn set_tcp_relay(&mut self, tcp: bool) {
        self.tcp = tcp;
    }

    /// A signed Refresh with `lifetime` (0: delete), to send later on the
    /// raw socket ([`TurnClient::into_channel`]): how a load generator that
    /// drives its sockets itself ends its allocations.
    pub fn refresh_request(&mut self, lifetime: u32) -> Vec<u8> {
        let txid: [u8; 12] = rand::random();
        let mut buf = Vec::new();
        let mut b = MessageBuilder::new(&mut buf, MessageType::new(method::REFRESH, Class::Request), &txid);
        b.u32(attr::LIFETIME, lifetime);
        sign(
            &mut b,
            &self.user,
            self.realm.as_deref(),
            self.nonce.as_deref(),
            &self.key,
        );
        buf
    }

    /// RFC 6062 §4.3 Connect: the server connects to `peer` from the TCP
    /// relayed address; returns the CONNECTION-ID to bind.
    pub fn connect(&mut self, peer: SocketAddr) -> Result<u32, ClientError> {
        let resp = self.transaction(method::CONNECT, &move |b| {
            b.xor_addr(attr::XOR_PEER_ADDRESS, peer);
        })?;
        let m = Message::parse(&resp).map_err(|_| ClientError::Protocol("bad response"))?;
        m.get_u32(attr::CONNECTION_ID)
            .ok_or(ClientError::Protocol("Connect success without CONNECTION-ID"))
    }

    /// RFC 6062 §4.4: opens a data connection over `transport` to `server`
    /// with this client's credentials and binds it to connection `id`. The
    /// channel returned carries raw bytes to and from the peer.
    pub fn connection_bind(
        &self,
        transport: &ClientTransport,
        server: SocketAddr,
        id: u32,
    ) -> Result<Channel, ClientError> {
        let ch = Channel::connect(transport, server, self.timeout)?;
        let mut d = TurnClient::new(ch, &self.user, &self.password);
        d.timeout = self.timeout;
        // The nonce and realm carry over (same source IP): no 401 round trip.
        d.realm = self.realm.clone();
        d.nonce = self.nonce.clone();
        d.key = self.key;
        d.transaction(method::CONNECTION_BIND, &move |b| {
            b.u32(attr::CONNECTION_ID, id);
        })?;
        Ok(d.ch)
    }

    /// Overall time limit for one transaction.
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    /// The underlying channel.
    pub fn channel(&mut self) -> &mut Channel {
        &mut self.ch
    }

    /// The realm the server challenged with, once known.
    pub fn realm(&self) -> Option<&str> {
        self.realm.as_deref()
    }

    /// Gives up the channel (the allocation stays until it expires).
    pub fn into_channel(self) -> Channel {
        self.ch
    }

    /// Runs one request/response transaction, authenticating on 401/438 as
    /// RFC 8489 §9.2.3 describes, retransmitting over UDP (RFC 8489 §6.2.1).
    /// Returns the success response's bytes.
    pub fn transaction(&mut self, m: u16, add: &dyn Fn(&mut MessageBuilder)) -> Result<Vec<u8>, ClientError> {
        let mut auth_tries = 0;
        loop {
            let txid: [u8; 12] = rand::random();
            {
                let mut b = MessageBuilder::new(&mut self.buf, MessageType::new(m, Class::Request), &txid);
                add(&mut b);
                sign(
                    &mut b,
                    &self.user,
                    self.realm.as_deref(),
                    self.nonce.as_deref(),
                    &self.key,
                );
            }
            let req = self.buf.clone();
            let resp = self.exchange(&req, txid)?;
            let msg = Message::parse(&resp).map_err(|_| ClientError::Protocol("unparseable response"))?;
            match msg.message_type().class {
                Class::Success => return Ok(resp),
                Class::Error => {
                    let (code, reason) = msg
                        .error_code()
                        .ok_or(ClientError::Protocol("error without ERROR-CODE"))?;
                    let reason = String::from_utf8_lossy(reason).into_owned();
                    let retry = match code {
                        401 => auth_tries == 0 || self.nonce.is_none(),
                        438 => auth_tries < 3,
                        _ => false,
                    };
                    if retry && auth_tries < 3 {
                        auth_tries += 1;
                        let realm = msg
                            .get(attr::REALM)
                            .ok_or(ClientError::Protocol("401 without REALM"))?;
                        let nonce = msg
                            .get(attr::NONCE)
                            .ok_or(ClientError::Protocol("401 without NONCE"))?;
                        let realm = String::from_utf8_lossy(realm).into_owned();
                        let had_realm = self.realm.is_some();
                        self.key = stun_proto::long_term_key_md5(&self.user, &realm, &self.password);
                        self.realm = Some(realm);
                        self.nonce = Some(nonce.to_vec());
                        // A 401 after credentials were sent means they are wrong.
                        if ErrorCode::from_code(code) == Some(ErrorCode::Unauthorized)
                            && had_realm
                            && auth_tries > 1
                        {
                            return Err(ClientError::Error { code, reason });
                        }
                        continue;
                    }
                    if ErrorCode::from_code(code) == Some(ErrorCode::TryAlternate) {
                        self.alternate = msg.get_addr(attr::ALTERNATE_SERVER).and_then(|a| a.ok());
                    }
                    return Err(ClientError::Error { code, reason });
                }
                _ => return Err(ClientError::Protocol("unexpected message class")),
            }
        }
    }

    fn exchange(&mut self, req: &[u8], txid: [u8; 12]) -> Result<Vec<u8>, ClientError> {
        let end = Instant::now() + self.timeout;
        let mut rto = Duration::from_millis(250);
        self.ch.send(req)?;
        let mut next_send = Instant::now() + rto;
        loop {
            let wait_until = if self.ch.is_stream() {
                end
            } else {
                next_send.min(end)
            };
            match self.ch.recv(wait_until)? {
                Some(pkt) => {
                    if let Ok(m) = Message::parse(&pkt) {
                        if m.transaction_id() == txid
                            && matches!(m.message_type().class, Class::Success | Class::Error)
                        {
                            return Ok(pkt);
                        }
                    }
                    self.inbox.push_back(pkt);
                }
                None => {
                    let now = Instant::now();
                    if now >= end {
                        return Err(ClientError::Timeout);
                    }
                    if !self.ch.is_stream() && now >= next_send {
                        self.ch.send(req)?;
                        rto *= 2;
                        next_send = now + rto;
                    }
                }
            }
        }
    }

    /// Allocate with REQUESTED-TRANSPORT UDP.
    pub fn allocate(&mut self) -> Result<Allocation, ClientError> {
        let family = self.family;
        let proto = if self.tcp {
            attr::PROTOCOL_TCP
        } else {
            attr::PROTOCOL_UDP
        };
        let mobility = self.mobility;
        let resp = self.transaction(method::ALLOCATE, &move |b| {
            b.u32(attr::REQUESTED_TRANSPORT, (proto as u32) << 24);
            if mobility {
                b.attr(attr::MOBILITY_TICKET, &[]);
            }
            match family {
                RelayFamily::Ipv4 => {}
                RelayFamily::Ipv6 => {
                    b.attr(attr::REQUESTED_ADDRESS_FAMILY, &[attr::FAMILY_IPV6, 0, 0, 0]);
                }
                RelayFamily::Dual => {
                    b.attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[attr::FAMILY_IPV6, 0, 0, 0]);
                }
            }
        })?;
        let m = Message::parse(&resp).map_err(|_| ClientError::Protocol("bad response"))?;
        // A server that never challenged us (no realm learned) signs nothing.
        if self.realm.is_some() && !m.verify_integrity(&self.key) {
            return Err(ClientError::Protocol(
                "response MESSAGE-INTEGRITY does not verify",
            ));
        }
        let relayed = m
            .get_xor_addr(attr::XOR_RELAYED_ADDRESS)
            .and_then(|r| r.ok())
            .ok_or(ClientError::Protocol("no XOR-RELAYED-ADDRESS"))?;
        let mapped = m
            .get_xor_addr(attr::XOR_MAPPED_ADDRESS)
            .and_then(|r| r.ok())
            .ok_or(ClientError::Protocol("no XOR-MAPPED-ADDRESS"))?;
        let additional = m
            .get_all(attr::XOR_RELAYED_ADDRESS)
            .filter_map(|v| m.decode_xor_addr(v).ok())
            .find(|a| *a != relayed);
        self.keep_ticket(&m);
        let family_error = m
            .get(attr::ADDRESS_ERROR_CODE)
            .filter(|v| v.len() >= 4)
            .map(|v| (v[0], (v[2] & 0x07) as u16 * 100 + v[3] as u16));
        Ok(Allocation {
            relayed,
            mapped,
            lifetime: m.get_u32(attr::LIFETIME).unwrap_or(0),
            additional,
            family_error,
        })
    }

    /// The relayed family the next [`TurnClient::allocate`] asks for.
    pub fn set_relay_family(&mut self, family: RelayFamily) {
        self.family = family;
    }

    /// Refresh; returns the granted lifetime (0 deletes).
    pub fn refresh(&mut self, lifetime: u32) -> Result<u32, ClientError> {
        let resp = self.transaction(method::REFRESH, &move |b| {
            b.u32(attr::LIFETIME, lifetime);
        })?;
        let m = Message::parse(&resp).map_err(|_| ClientError::Protocol("bad response"))?;
        Ok(m.get_u32(attr::LIFETIME).unwrap_or(0))
    }

    /// CreatePermission for the IPs of `peers`.
    pub fn create_permission(&mut self, peers: &[SocketAddr]) -> Result<(), ClientError> {
        self.transaction(method::CREATE_PERMISSION, &|b| {
            for p in peers {
                b.xor_addr(attr::XOR_PEER_ADDRESS, *p);
            }
        })
        .map(|_| ())
    }

    /// ChannelBind `channel` to `peer`.
    pub fn channel_bind(&mut self, channel: u16, peer: SocketAddr) -> Result<(), ClientError> {
        self.transaction(method::CHANNEL_BIND, &move |b| {
            b.u32(attr::CHANNEL_NUMBER, (channel as u32) << 16)
                .xor_addr(attr::XOR_PEER_ADDRESS, peer);
        })
        .map(|_| ())
    }

    /// Sends `data` to `peer` in a Send indication.
    pub fn send_indication(&mut self, peer: SocketAddr, data: &[u8]) -> io::Result<()> {
        let txid: [u8; 12] = rand::random();
        MessageBuilder::new(
            &mut self.buf,
            MessageType::new(method::SEND, Class::Indication),
            &txid,
        )
        .xor_addr(attr::XOR_PEER_ADDRESS, peer)
        .attr(attr::DATA, data);
        let msg = std::mem::take(&mut self.buf);
        let r = self.ch.send(&msg);
        self.buf = msg;
        r
    }

    /// Sends `data` on `channel` as ChannelData (padded on streams).
    pub fn send_channel(&mut self, channel: u16, data: &[u8]) -> io::Result<()> {
        self.buf.clear();
        self.buf
            .extend_from_slice(&ChannelData::header(channel, data.len() as u16));
        self.buf.extend_from_slice(data);
        if self.ch.is_stream() {
            while !self.buf.len().is_multiple_of(4) {
                self.buf.push(0);
            }
        }
        let msg = std::mem::take(&mut self.buf);
        let r = self.ch.send(&msg);
        self.buf = msg;
        r
    }

    /// Waits for relayed data (a Data indication or ChannelData).
    pub fn recv(&mut self, timeout: Duration) -> Result<Received, ClientError> {
        let end = Instant::now() + timeout;
        loop {
            let pkt = match self.inbox.pop_front() {
                Some(p) => p,
                None => self.ch.recv(end)?.ok_or(ClientError::Timeout)?,
            };
            match stun_proto::packet_kind(&pkt) {
                PacketKind::ChannelData => {
                    if let Some(cd) = ChannelData::parse(&pkt) {
                        return Ok(Received::Channel {
                            channel: cd.channel,
                            data: cd.data.to_vec(),
                        });
                    }
                }
                PacketKind::Stun => {
                    if let Ok(m) = Message::parse(&pkt) {
                        if m.message_type() == MessageType::new(method::CONNECTION_ATTEMPT, Class::Indication)
                        {
                            if let (Some(id), Some(Ok(peer))) = (
                                m.get_u32(attr::CONNECTION_ID),
                                m.get_xor_addr(attr::XOR_PEER_ADDRESS),
                            ) {
                                return Ok(Received::ConnectionAttempt { id, peer });
                            }
                        }
                        if m.message_type() == MessageType::new(method::DATA, Class::Indication) {
                            if let (Some(Ok(peer)), Some(data)) =
                                (m.get_xor_addr(attr::XOR_PEER_ADDRESS), m.get(attr::DATA))
                            {
                                return Ok(Received::Data {
                                    peer,
                                    data: data.to_vec(),
                                });
                            }
                            if let (Some(Ok(peer)), Some([_, _, t, c, d0, d1, d2, d3])) =
                                (m.get_xor_addr(attr::XOR_PEER_ADDRESS), m.get(attr::ICMP))
                            {
                                return Ok(Received::Icmp {
                                    peer,
                                    icmp_type: *t,
                                    icmp_code: *c,
                                    info: u32::from_be_bytes([*d0, *d1, *d2, *d3]),
                                });
                            }
                        }
                    }
                }
                PacketKind::Other => {}
            }
        }
    }
}

/// Sends Binding requests to `server` from an unconnected UDP socket and
/// returns the source address of the first answer, whatever it is. A
/// connected socket (like a browser's or a NAT's mapping) drops answers
/// from any other address; this sees them, to tell "no answer" from
/// "answers from the wrong address" (a multi-homed server answering from
/// another of its addresses).
pub fn binding_answer_source(server: SocketAddr, timeout: Duration) -> io::Result<Option<SocketAddr>> {
    let any: SocketAddr = if server.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = UdpSocket::bind(any)?;
    let txid: [u8; 12] = rand::random();
    let mut req = Vec::new();
    MessageBuilder::new(&mut req, MessageType::new(method::BINDING, Class::Request), &txid).fingerprint();
    let end = Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    while Instant::now() < end {
        s.send_to(&req, server)?;
        s.set_read_timeout(Some(
            end.saturating_duration_since(Instant::now())
                .min(Duration::from_millis(300))
                .max(Duration::from_millis(1)),
        ))?;
        match s.recv_from(&mut buf) {
            Ok((n, from)) => {
                if Message::parse(&buf[..n]).is_ok_and(|m| m.transaction_id() == txid) {
                    return Ok(Some(from));
                }
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// One STUN Binding transaction: the reflexive address the server saw.
pub fn binding(ch: &mut Channel, timeout: Duration) -> Result<SocketAddr, ClientError> {
    binding_answer(ch, timeout).map(|(mapped, _)| mapped)
}

/// One STUN Binding transaction: the reflexive address the server saw and
/// the SOFTWARE it names itself by, if it sends one.
pub fn binding_answer(
    ch: &mut Channel,
    timeout: Duration,
) -> Result<(SocketAddr, Option<String>), ClientError> {
    let txid: [u8; 12] = rand::random();
    let mut buf = Vec::new();
    MessageBuilder::new(&mut buf, MessageType::new(method::BINDING, Class::Request), &txid).fingerprint();
    let end = Instant::now() + timeout;
    let mut rto = Duration::from_millis(250);
    ch.send(&buf)?;
    let mut next = Instant::now() + rto;
    loop {
        let until = if ch.is_stream() { end } else { next.min(end) };
        match ch.recv(until)? {
            Some(pkt) => {
                if let Ok(m) = Message::parse(&pkt) {
                    if m.transaction_id() == txid {
                        if let Some((code, reason)) = m.error_code() {
                            return Err(ClientError::Error {
                                code,
                                reason: String::from_utf8_lossy(reason).into_owned(),
                            });
                        }
                        let software = m
                            .get(attr::SOFTWARE)
                            .map(|s| String::from_utf8_lossy(s).trim().to_owned());
                        return m
                            .get_xor_addr(attr::XOR_MAPPED_ADDRESS)
                            .and_then(|r| r.ok())
                            .map(|a| (a, software))
                            .ok_or(ClientError::Protocol("no XOR-MAPPED-ADDRESS"));
                    }
                }
            }
            None => {
                let now = Instant::now();
                if now >= end {
                    return Err(ClientError::Timeout);
                }
                if !ch.is_stream() && now >= next {
                    ch.send(&buf)?;
                    rto *= 2;
                    next = now + rto;
                }
            }
        }
    }
}
