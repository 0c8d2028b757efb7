//! The relay modes: closed-loop ChannelData or Send indications through
//! each allocation, echoed by the generator's own peer socket.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use stun_proto::{attr, method, ChannelData, Class, Message, MessageBuilder, MessageType};

use crate::client::{Channel, TurnClient};
use udp_io::{RecvBatch, SendQueue};

use super::{client_transport, empty_report, percentiles, Conn, Meter};
use super::{BenchArgs, BenchTransport, Mode, Report};

struct Lane {
    client: Conn,
    peer: UdpSocket,
    peer_addr: SocketAddr,
    /// The allocation's relayed address, which `peer` is connected to.
    relayed: SocketAddr,
    channel: u16,
    inflight: usize,
    last_rx: Instant,
    /// A signed Refresh(0), sent at the end so the server is left as it was.
    bye: Vec<u8>,
}

pub(super) const LOSS_TIMEOUT: Duration = Duration::from_millis(500);

/// Closed-loop relay through ChannelData or Send/Data indications.
pub(super) fn relay(args: &BenchArgs) -> Result<Report> {
    let poll = Poll::new()?;
    let mut lanes = Vec::with_capacity(args.allocations);
    for i in 0..args.allocations {
        let ch = Channel::connect(
            &client_transport(args.transport),
            args.server,
            Duration::from_secs(3),
        )
        .with_context(|| format!("connecting to {}", args.server))?;
        let mut c = TurnClient::new(ch, &args.user, &args.password);
        let a = c.allocate().map_err(|e| anyhow::anyhow!("allocation {i}: {e}"))?;
        let peer = std::net::UdpSocket::bind((args.peer_ip, 0))?;
        let peer_addr = peer.local_addr()?;
        let channel = args.first_channel + (i % 0x0FFF) as u16;
        if args.mode == Mode::Channel {
            c.channel_bind(channel, peer_addr)
                .map_err(|e| anyhow::anyhow!("channel bind {i}: {e} (is the peer address allowed?)"))?;
        } else {
            c.create_permission(&[peer_addr])
                .map_err(|e| anyhow::anyhow!("permission {i}: {e} (is the peer address allowed?)"))?;
        }
        peer.connect(a.relayed)?;
        peer.set_nonblocking(true)?;
        let bye = c.refresh_request(0);
        lanes.push(Lane {
            bye,
            client: Conn::from_channel(c.into_channel())?,
            peer: UdpSocket::from_std(peer),
            peer_addr,
            relayed: a.relayed,
            channel,
            inflight: 0,
            last_rx: Instant::now(),
        });
    }
    for (i, l) in lanes.iter_mut().enumerate() {
        l.client
            .register(poll.registry(), Token(2 * i), Interest::READABLE)?;
        poll.registry()
            .register(&mut l.peer, Token(2 * i + 1), Interest::READABLE)?;
    }
    let mut state = LoadState::new(args);
    let run = |lanes: &mut Vec<Lane>,
               state: &mut LoadState,
               poll: &mut Poll,
               until: Instant,
               record: bool|
     -> Result<()> {
        state.recording = record;
        let mut events = Events::with_capacity(1024);
        for i in 0..lanes.len() {
            state.fill(lanes, i)?;
        }
        while Instant::now() < until {
            // Busy-poll: the generator owns its core, and a generator that
            // sleeps makes the server pay to wake it for every burst (an IPI,
            // dear in a VM), which is loopback's cost, not the server's.
            poll.poll(&mut events, Some(Duration::ZERO))?;
            for ev in events.iter() {
                let i = ev.token().0 / 2;
                if ev.token().0 % 2 == 1 {
                    state.peer_echo(&mut lanes[i])?;
                } else {
                    state.client_rx(lanes, i)?;
                }
            }
            let now = Instant::now();
            for i in 0..lanes.len() {
                let l = &mut lanes[i];
                if l.inflight > 0 && now.duration_since(l.last_rx) > LOSS_TIMEOUT {
                    if state.recording {
                        state.lost += l.inflight as u64;
                    }
                    l.inflight = 0;
                    l.last_rx = now;
                    state.fill(lanes, i)?;
                }
            }
        }
        Ok(())
    };
    let mut poll = poll;
    run(
        &mut lanes,
        &mut state,
        &mut poll,
        Instant::now() + Duration::from_secs_f64(args.warmup),
        false,
    )?;
    let meter = Meter::start(args.pid, args.server_core);
    state.relayed = 0;
    state.rtts.clear();
    run(
        &mut lanes,
        &mut state,
        &mut poll,
        Instant::now() + Duration::from_secs_f64(args.duration),
        true,
    )?;
    let unit = "packets relayed";
    let mut r = empty_report(args, unit);
    r.operations = state.relayed;
    meter.finish(&mut r);
    r.lost = state.lost;
    r.rtt_us = percentiles(std::mem::take(&mut state.rtts));
    // Delete the allocations: a UDP allocation left to expire would
    // answer 437 to a later client that gets the same port.
    let mut q = SendQueue::new(false);
    for l in lanes.iter_mut() {
        let bye = std::mem::take(&mut l.bye);
        let _ = l.client.send_many(&mut q, &[&bye]);
    }
    std::thread::sleep(Duration::from_millis(50));
    drop(lanes);
    Ok(r)
}

struct LoadState {
    mode: Mode,
    window: usize,
    size: usize,
    stream: bool,
    t0: Instant,
    buf: Vec<u8>,
    msg: Vec<u8>,
    batch: RecvBatch,
    q: SendQueue,
    relayed: u64,
    lost: u64,
    rtts: Vec<u32>,
    recording: bool,
}

impl LoadState {
    fn new(args: &BenchArgs) -> Self {
        LoadState {
            mode: args.mode,
            window: args.window,
            size: args.payload_size(),
            stream: args.transport == BenchTransport::Tcp,
            t0: Instant::now(),
            buf: vec![0u8; 65536],
            msg: Vec::with_capacity(2048),
            batch: RecvBatch::new(),
            q: SendQueue::new(!args.no_gso),
            relayed: 0,
            lost: 0,
            rtts: Vec::with_capacity(1 << 20),
            recording: false,
        }
    }

    /// Sends packets into lane `i` until its window is full, in one batch.
    fn fill(&mut self, lanes: &mut [Lane], i: usize) -> Result<()> {
        let l = &mut lanes[i];
        let want = self.window.saturating_sub(l.inflight);
        if want == 0 {
            return Ok(());
        }
        self.msg.clear();
        let mut ends = Vec::with_capacity(want);
        for _ in 0..want {
            let stamp = self.t0.elapsed().as_nanos() as u64;
            let mut payload = [0u8; 16];
            payload[..8].copy_from_slice(&stamp.to_be_bytes());
            payload[8..12].copy_from_slice(&(i as u32).to_be_bytes());
            let start = self.msg.len();
            match self.mode {
                Mode::Channel => {
                    self.msg
                        .extend_from_slice(&ChannelData::header(l.channel, self.size as u16));
                    self.msg.extend_from_slice(&payload);
                    self.msg.resize(start + 4 + self.size, 0xAB);
                    if self.stream {
                        self.msg.resize(start + ((4 + self.size + 3) & !3), 0);
                    }
                }
                _ => {
                    let mut data = payload.to_vec();
                    data.resize(self.size, 0xAB);
                    let mut one = Vec::with_capacity(self.size + 64);
                    MessageBuilder::new(
                        &mut one,
                        MessageType::new(method::SEND, Class::Indication),
                        &[7; 12],
                    )
                    .xor_addr(attr::XOR_PEER_ADDRESS, l.peer_addr)
                    .attr(attr::DATA, &data);
                    self.msg.extend_from_slice(&one);
                }
            }
            ends.push(self.msg.len());
        }
        let mut msgs = Vec::with_capacity(want);
        let mut start = 0;
        for e in ends {
            msgs.push(&self.msg[start..e]);
            start = e;
        }
        l.client.send_many(&mut self.q, &msgs)?;
        l.inflight += want;
        Ok(())
    }

    /// The peer side: echo every datagram back through the relayed address,
    /// a `recvmmsg` and a `sendmmsg` per batch.
    fn peer_echo(&mut self, l: &mut Lane) -> Result<()> {
        loop {
            let n = match self.batch.recv(&l.peer) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(e.into()),
            };
            if self.recording {
                self.relayed += n as u64;
            }
            for i in 0..n {
                if let Some(udp_io::Datagram { data: d, .. }) = self.batch.get(i) {
                    self.q.push(&l.peer, None, l.relayed, d);
                }
            }
            self.q.flush();
            if n < udp_io::BATCH {
                return Ok(());
            }
        }
    }

    /// The client side: each echo that arrives completes a round trip.
    fn client_rx(&mut self, lanes: &mut [Lane], i: usize) -> Result<()> {
        let mut done = 0usize;
        let mut rtts = std::mem::take(&mut self.rtts);
        let now_ns = self.t0.elapsed().as_nanos() as u64;
        let recording = self.recording;
        let res = lanes[i].client.recv_all(&mut self.buf, &mut self.batch, |m| {
            let payload = match stun_proto::packet_kind(m) {
                stun_proto::PacketKind::ChannelData => ChannelData::parse(m).map(|c| c.data),
                stun_proto::PacketKind::Stun => Message::parse(m).ok().and_then(|msg| msg.get(attr::DATA)),
                _ => None,
            };
            if let Some(p) = payload.filter(|p| p.len() >= 16) {
                let sent = u64::from_be_bytes(p[..8].try_into().unwrap_or_default());
                if recording {
                    rtts.push((now_ns.saturating_sub(sent) / 1000).min(u32::MAX as u64) as u32);
                }
                done += 1;
            }
        });
        self.rtts = rtts;
        res?;
        let l = &mut lanes[i];
        if done > 0 {
            if self.recording {
                self.relayed += done as u64;
            }
            l.inflight = l.inflight.saturating_sub(done);
            l.last_rx = Instant::now();
        }
        self.fill(lanes, i)
    }
}
