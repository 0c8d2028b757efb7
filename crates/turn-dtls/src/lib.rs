//! STUN and TURN over DTLS 1.2 (RFC 7350), the server's side, sans-IO.
//!
//! A [`Front`] sits between one UDP socket and the TURN core: it takes
//! datagrams and the time, and gives back datagrams to send and the STUN
//! messages its associations decrypted. The DTLS engine is `dimpl` (sans-IO,
//! `forbid(unsafe_code)`, RustCrypto); what is ours is what a TURN server on
//! the open internet needs around it:
//!
//! - **No state before the cookie round trip** (RFC 6347 §4.2.1): a
//!   ClientHello from an unknown source is answered with a
//!   HelloVerifyRequest and forgotten. The cookie proves the source can
//!   receive at its address; it is bound to that address and the hello's
//!   random and expires within two minutes. Anything else from an unknown
//!   source is dropped without an answer, and no answer is larger than the
//!   datagram that caused it (see [`hello::MIN_CLIENT_HELLO`]).
//! - **Half-open caps**: handshakes in progress are capped per host (all
//!   workers, [`Shared`]) and per source IP, and each has a deadline.
//! - **Associations** end on close_notify, a fatal error, or idleness.
//!
//! How the cookie is made: the engine computes its cookie from a secret it
//! draws from its random generator, which it lets the caller seed. The seed
//! here is a MAC of (server secret, time window, client address, hello
//! random); the throwaway engine that answers a first hello and the engine
//! that later takes the association are seeded alike, so the cookie the
//! second one expects is the one the first one sent. The engine's other
//! seeded values are its hello random and nonces; its key exchange always
//! uses the system's randomness, so two associations never share keys.

#![forbid(unsafe_code)]

mod cookie;
pub mod hello;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

pub use dimpl::DtlsCertificate;

/// How long one cookie window lasts; a cookie is accepted in its window and
/// the next (one to two windows in all).
const COOKIE_WINDOW: Duration = Duration::from_secs(60);

/// An established association is replaced by a new handshake from its
/// address only after this long without a datagram from it.
const RESTART_SILENCE: Duration = Duration::from_secs(5);

/// The largest datagram the engine writes (below the IPv6 minimum path MTU
/// less headers, so records are never fragmented by IP).
const MTU: usize = 1200;

/// Limits against state exhaustion.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Handshakes in progress on the whole host.
    pub half_open: usize,
    /// Handshakes in progress from one source IP.
    pub half_open_per_source: u32,
    /// Associations (in handshake or established) on the whole host.
    pub associations: usize,
    /// A handshake not finished by then is dropped.
    pub handshake_timeout: Duration,
    /// An association that receives nothing for this long is dropped.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            half_open: 2048,
            half_open_per_source: 16,
            associations: 20_000,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(3900),
        }
    }
}

/// What every worker's front shares: the limits that hold per host.
#[derive(Debug, Default)]
pub struct Shared {
    half_open: AtomicUsize,
    associations: AtomicUsize,
    per_source: Mutex<HashMap<IpAddr, u32>>,
}

impl Shared {
    /// Handshakes in progress on the host.
    pub fn half_open(&self) -> usize {
        self.half_open.load(Ordering::Relaxed)
    }

    /// Associations on the host.
    pub fn associations(&self) -> usize {
        self.associations.load(Ordering::Relaxed)
    }

    fn take_half_open(&self, ip: IpAddr, limits: &Limits) -> Result<(), Refused> {
        if self.associations.load(Ordering::Relaxed) >= limits.associations {
            return Err(Refused::Associations);
        }
        let mut per = self.per_source.lock().unwrap_or_else(|p| p.into_inner());
        let n = per.entry(ip).or_insert(0);
        if *n >= limits.half_open_per_source {
            return Err(Refused::PerSource);
        }
        if self
            .half_open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
                (h < limits.half_open).then_some(h + 1)
            })
            .is_err()
        {
            return Err(Refused::Host);
        }
        *n += 1;
        self.associations.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn release_half_open(&self, ip: IpAddr) {
        self.half_open.fetch_sub(1, Ordering::Relaxed);
        let mut per = self.per_source.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                per.remove(&ip);
            }
        }
    }
}

/// Why a valid second ClientHello got no association.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The host's half-open cap.
    Host,
    /// The source IP's half-open cap.
    PerSource,
    /// The host's association cap.
    Associations,
    /// The hello offers only DTLS 1.0, which RFC 8996 forbids: answered
    /// with a protocol_version alert.
    OldVersion,
}

/// The server's certificate and key (ECDSA P-256 or P-384) and the engine
/// settings, replaced on reload (new handshakes take the new one).
#[derive(Clone)]
pub struct Identity {
    cert: DtlsCertificate,
}

impl Identity {
    /// The leaf certificate and its private key, both DER. Refuses what the
    /// engine cannot use (RSA keys) by name, before any client comes.
    pub fn new(certificate: Vec<u8>, private_key: Vec<u8>) -> Result<Identity, String> {
        let cert = DtlsCertificate {
            certificate,
            private_key,
        };
        // The engine would panic on a key it cannot parse: parse it here
        // with the engine's own key parser, once.
        let config = engine_config(None, Limits::default().handshake_timeout)?;
        if config
            .crypto_provider()
            .key_provider
            .load_private_key(&cert.private_key)
            .is_err()
        {
            // rsaEncryption (1.2.840.113549.1.1.1) in a PKCS#8 key.
            const RSA_OID: [u8; 11] = [0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
            if cert.private_key.windows(RSA_OID.len()).any(|w| w == RSA_OID) {
                return Err(
                    "the private key is RSA; DTLS here needs an ECDSA P-256 or P-384 key".to_string(),
                );
            }
            return Err(
                "the private key is not an ECDSA P-256 or P-384 key (DTLS here supports ECDSA certificates only)"
                    .to_string(),
            );
        }
        check_cookie_prediction(&cert)?;
        Ok(Identity { cert })
    }
}

/// The engine answers a real hello with exactly the HelloVerifyRequest
/// [`cookie`] predicts for its seed (see there); otherwise the front
/// cannot answer hellos without an engine, and says so at start.
fn check_cookie_prediction(cert: &DtlsCertificate) -> Result<(), String> {
    let now = Instant::now();
    let mut seed = [0u8; 8];
    getrandom::getrandom(&mut seed).map_err(|e| format!("the system's random source: {e}"))?;
    let seed = u64::from_be_bytes(seed);
    let mut client = dimpl::Dtls::new_12(engine_config(None, Duration::from_secs(10))?, cert.clone(), now);
    client.set_active(true);
    let mut server = dimpl::Dtls::new_12(
        engine_config(Some(seed), Duration::from_secs(10))?,
        cert.clone(),
        now,
    );
    let mut buf = vec![0u8; 4096];
    let first_packet = |d: &mut dimpl::Dtls, buf: &mut Vec<u8>| -> Option<Vec<u8>> {
        for _ in 0..16 {
            match d.poll_output(buf) {
                dimpl::Output::Packet(p) => return Some(p.to_vec()),
                dimpl::Output::Timeout(_) => return None,
                _ => {}
            }
        }
        None
    };
    let broken = |why: &str| {
        format!("the DTLS engine's cookie exchange is not the one this front predicts ({why}); DTLS cannot run with this dimpl version")
    };
    client.handle_timeout(now).map_err(|e| broken(&e.to_string()))?;
    let hello_bytes = first_packet(&mut client, &mut buf).ok_or_else(|| broken("no hello"))?;
    let hello = hello::client_hello(&hello_bytes).ok_or_else(|| broken("an unreadable hello"))?;
    server.handle_timeout(now).map_err(|e| broken(&e.to_string()))?;
    server
        .handle_packet(&hello_bytes)
        .map_err(|e| broken(&e.to_string()))?;
    let hvr = first_packet(&mut server, &mut buf).ok_or_else(|| broken("no HelloVerifyRequest"))?;
    let mut record_seq = [0u8; 6];
    record_seq.copy_from_slice(&hello_bytes[5..11]);
    let predicted = cookie::hello_verify_request(record_seq, &cookie::predicted(seed, hello.random));
    if hvr[..] != predicted[..] {
        return Err(broken("another HelloVerifyRequest"));
    }
    Ok(())
}

/// The engine's RustCrypto provider, with the key-exchange groups a TURN
/// client offers (X25519 and P-256; P-384 dropped), cheap to validate again.
///
/// Why: building an engine configuration validates its provider (a key
/// exchange in every group, a signature verified per cipher suite, hash,
/// HMAC and AEAD vectors), and each association builds one, its seed being
/// its own (see the crate's documentation). That was 4.2 ms of the 4.3 ms
/// of server work a handshake took (one core, release build, in memory).
/// The first configuration built in the process validates everything for
/// real; later builds get the fixed vectors' verification from memory
/// (`MemoVerifier`: same inputs, same answer) and a stand-in for the
/// self-test key exchange (`SelfTest`), and run the rest. Outside a build
/// both are the engine's own. A handshake now costs the server 0.5 ms.
fn provider() -> dimpl::crypto::CryptoProvider {
    static WRAPPED: OnceLock<Vec<ValidatedOnce>> = OnceLock::new();
    static GROUPS: OnceLock<Vec<&'static dyn dimpl::crypto::SupportedKxGroup>> = OnceLock::new();
    let mut p = dimpl::crypto::rust_crypto::default_provider();
    let wrapped = WRAPPED.get_or_init(|| {
        p.kx_groups
            .iter()
            .copied()
            .filter(|g| {
                matches!(
                    g.name(),
                    dimpl::crypto::NamedGroup::X25519 | dimpl::crypto::NamedGroup::Secp256r1
                )
            })
            .map(ValidatedOnce)
            .collect()
    });
    let groups = GROUPS.get_or_init(|| {
        wrapped
            .iter()
            .map(|g| g as &'static dyn dimpl::crypto::SupportedKxGroup)
            .collect()
    });
    p.kx_groups = groups.as_slice();
    static VERIFIER: OnceLock<MemoVerifier> = OnceLock::new();
    let inner = p.signature_verification;
    p.signature_verification = VERIFIER.get_or_init(|| MemoVerifier(inner));
    p
}

/// The engine's signature verifier; inside a configuration build, its
/// answers to the validation's fixed vectors are computed once and then
/// remembered (same inputs, same answer). Outside a build it is the
/// engine's own, untouched.
#[derive(Debug)]
struct MemoVerifier(&'static dyn dimpl::crypto::SignatureVerifier);

impl dimpl::crypto::SignatureVerifier for MemoVerifier {
    fn verify_signature(
        &self,
        cert_der: &[u8],
        data: &[u8],
        signature: &[u8],
        hash_alg: dimpl::crypto::HashAlgorithm,
        sig_alg: dimpl::crypto::SignatureAlgorithm,
    ) -> Result<(), dimpl::CryptoError> {
        if BUILD.get() == Build::None {
            return self
                .0
                .verify_signature(cert_der, data, signature, hash_alg, sig_alg);
        }
        static KNOWN: Mutex<Vec<(Vec<u8>, bool)>> = Mutex::new(Vec::new());
        let mut key = Vec::with_capacity(cert_der.len() + data.len() + signature.len() + 8);
        for part in [cert_der, data, signature] {
            key.extend_from_slice(&(part.len() as u32).to_be_bytes());
            key.extend_from_slice(part);
        }
        key.extend_from_slice(format!("{hash_alg:?}{sig_alg:?}").as_bytes());
        let mut known = KNOWN.lock().unwrap_or_else(|p| p.into_inner());
        let ok = match known.iter().find(|(k, _)| *k == key) {
            Some((_, ok)) => *ok,
            None => {
                let ok = self
                    .0
                    .verify_signature(cert_der, data, signature, hash_alg, sig_alg)
                    .is_ok();
                // The validation's vectors are a handful: bounded anyway.
                if known.len() < 16 {
                    known.push((key, ok));
                }
                ok
            }
        };
        if ok {
            Ok(())
        } else {
            self.0
                .verify_signature(cert_der, data, signature, hash_alg, sig_alg)
        }
    }
}

/// What this thread's configuration build, if any, does about the
/// self-test key exchange.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Build {
    None,
    /// The first build(s): the groups' exchange is run for real.
    Validating,
    /// A later build: both sides of the exchange are the stand-in.
    Repeat,
}

thread_local! {
    /// Decided once when a build starts, never in the middle of one: a
    /// build that read `GROUPS_VALIDATED` per exchange could start Alice
    /// for real and, another thread's build finishing meanwhile, get the
    /// stand-in for Bob, whose key the real P-256 refuses (start refused
    /// with "invalid Secp256r1 public key", seen once in CI).
    static BUILD: std::cell::Cell<Build> = const { std::cell::Cell::new(Build::None) };
}

/// Whether a configuration has been built (and its groups validated).
static GROUPS_VALIDATED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// One of the engine's key-exchange groups; inside a configuration build
/// after the first, its self-test exchange is a fixed one.
#[derive(Debug)]
struct ValidatedOnce(&'static dyn dimpl::crypto::SupportedKxGroup);

impl dimpl::crypto::SupportedKxGroup for ValidatedOnce {
    fn name(&self) -> dimpl::crypto::NamedGroup {
        self.0.name()
    }

    fn start_exchange(
        &self,
        buf: dimpl::crypto::Buf,
    ) -> Result<Box<dyn dimpl::crypto::ActiveKeyExchange>, dimpl::CryptoError> {
        if BUILD.get() == Build::Repeat {
            return Ok(Box::new(SelfTest(self.0.name())));
        }
        self.0.start_exchange(buf)
    }
}

/// The stand-in for a validation's exchange: both sides agree.
#[derive(Debug)]
struct SelfTest(dimpl::crypto::NamedGroup);

impl dimpl::crypto::ActiveKeyExchange for SelfTest {
    fn pub_key(&self) -> &[u8] {
        &[1; 32]
    }

    fn complete(
        self: Box<Self>,
        _peer: &[u8],
        out: &mut dimpl::crypto::Buf,
    ) -> Result<(), dimpl::CryptoError> {
        out.extend_from_slice(&[2; 32]);
        Ok(())
    }

    fn group(&self) -> dimpl::crypto::NamedGroup {
        self.0
    }
}

fn engine_config(seed: Option<u64>, handshake_timeout: Duration) -> Result<Arc<dimpl::Config>, String> {
    let mut b = dimpl::Config::builder()
        .with_crypto_provider(provider())
        .mtu(MTU)
        .require_client_certificate(false)
        .use_server_cookie(true)
        .handshake_timeout(handshake_timeout);
    if let Some(seed) = seed {
        // Seeded per (secret, window, address, random): see the crate's
        // documentation for what the seed decides and why that is safe.
        b = b.dangerously_set_rng_seed(seed);
    }
    BUILD.set(if GROUPS_VALIDATED.load(Ordering::Acquire) {
        Build::Repeat
    } else {
        Build::Validating
    });
    let built = b.build();
    BUILD.set(Build::None);
    let config = built.map_err(|e| format!("DTLS settings: {e}"))?;
    GROUPS_VALIDATED.store(true, Ordering::Release);
    Ok(Arc::new(config))
}

/// What one association is doing.
enum Phase {
    /// After the cookie round trip, before Finished: holds a half-open
    /// slot until `deadline`.
    Handshake {
        deadline: Instant,
    },
    Established,
}

struct Association {
    dtls: dimpl::Dtls,
    server: SocketAddr,
    phase: Phase,
    /// When the engine wants `handle_timeout` (retransmissions).
    wake: Option<Instant>,
    last_seen: Instant,
}

/// Counts for metrics, since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// HelloVerifyRequests sent (cookie round trips started).
    pub cookies_sent: u64,
    /// Second ClientHellos whose cookie did not verify.
    pub bad_cookies: u64,
    /// Handshakes refused by a half-open or association cap.
    pub refused: u64,
    /// Handshakes finished.
    pub established: u64,
    /// Handshakes that failed or timed out.
    pub failed: u64,
    /// Datagrams from sources with no association that were not a
    /// ClientHello (dropped without an answer).
    pub dropped: u64,
    /// Hellos offering only DTLS 1.0 (RFC 8996), refused with an alert.
    pub old_versions: u64,
}

impl std::ops::AddAssign for Counters {
    fn add_assign(&mut self, o: Counters) {
        self.cookies_sent += o.cookies_sent;
        self.bad_cookies += o.bad_cookies;
        self.refused += o.refused;
        self.established += o.established;
        self.failed += o.failed;
        self.dropped += o.dropped;
        self.old_versions += o.old_versions;
    }
}

/// Both ends of an association: the client's address and the server
/// address it reached (exact even behind a wildcard socket).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ends {
    /// The client's address.
    pub client: SocketAddr,
    /// The server address the client reached.
    pub server: SocketAddr,
}

/// What a call produced: datagrams to send, STUN messages received, and
/// associations that ended. Byte ranges index [`Output::bytes`].
#[derive(Debug, Default)]
pub struct Output {
    /// Every payload's bytes, one after another.
    pub bytes: Vec<u8>,
    /// Datagrams to send (to `client`, from `server`).
    pub datagrams: Vec<(Ends, Range<usize>)>,
    /// Application data received (STUN messages, ChannelData).
    pub received: Vec<(Ends, Range<usize>)>,
    /// Associations that finished their handshake.
    pub established: Vec<Ends>,
    /// Associations that ended (close_notify, error, idle, timeout).
    pub closed: Vec<Ends>,
}

impl Output {
    /// Empties it for the next call, keeping its memory.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.datagrams.clear();
        self.received.clear();
        self.established.clear();
        self.closed.clear();
    }

    fn push(&mut self, to: Ends, data: &[u8], received: bool) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(data);
        let r = start..self.bytes.len();
        if received {
            self.received.push((to, r));
        } else {
            self.datagrams.push((to, r));
        }
    }
}

/// One socket's DTLS associations and the stateless cookie exchange.
pub struct Front {
    identity: Identity,
    secret: [u8; 32],
    epoch: Instant,
    limits: Limits,
    shared: Arc<Shared>,
    associations: HashMap<SocketAddr, Association>,
    counters: Counters,
    buf: Vec<u8>,
    last_refusal: Option<(SocketAddr, Refused)>,
}

impl Front {
    /// A front with `secret` (shared by every worker's front, so any of
    /// them accepts another's cookie) and `epoch` (the same instant for all).
    pub fn new(
        identity: Identity,
        secret: [u8; 32],
        epoch: Instant,
        limits: Limits,
        shared: Arc<Shared>,
    ) -> Front {
        Front {
            identity,
            secret,
            epoch,
            limits,
            shared,
            associations: HashMap::new(),
            counters: Counters::default(),
            buf: vec![0u8; 2048],
            last_refusal: None,
        }
    }

    /// New handshakes use `identity` (a reloaded certificate).
    pub fn set_identity(&mut self, identity: Identity) {
        self.identity = identity;
    }

    /// Counts since start.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Associations of this front (established or in handshake).
    pub fn len(&self) -> usize {
        self.associations.len()
    }

    /// Whether this front has no association.
    pub fn is_empty(&self) -> bool {
        self.associations.is_empty()
    }

    /// Associations of this front still in their handshake.
    pub fn half_open(&self) -> usize {
        self.associations
            .values()
            .filter(|a| matches!(a.phase, Phase::Handshake { .. }))
            .count()
    }

    /// Both ends of every association, handshaking or established.
    pub fn ends(&self) -> impl Iterator<Item = Ends> + '_ {
        self.associations.iter().map(|(client, a)| Ends {
            client: *client,
            server: a.server,
        })
    }

    /// Whether `client` has an established association.
    pub fn is_established(&self, client: SocketAddr) -> bool {
        matches!(
            self.associations.get(&client).map(|a| &a.phase),
            Some(Phase::Established)
        )
    }

    /// The last refusal by a cap, taken (for a log line).
    pub fn take_refusal(&mut self) -> Option<(SocketAddr, Refused)> {
        self.last_refusal.take()
    }

    /// The earliest time [`Front::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.associations
            .values()
            .map(|a| {
                let end = match a.phase {
                    Phase::Handshake { deadline } => deadline,
                    Phase::Established => a.last_seen + self.limits.idle_timeout,
                };
                a.wake.map_or(end, |w| w.min(end))
            })
            .min()
    }

    /// One datagram from `from`, which reached `server`.
    pub fn handle(
        &mut self,
        now: Instant,
        from: SocketAddr,
        server: SocketAddr,
        datagram: &[u8],
        out: &mut Output,
    ) {
        if let Some(hello) = hello::client_hello(datagram) {
            // A retransmitted second hello belongs to the handshake it
            // started; any other hello goes through the cookie exchange
            // (a client that restarts from the same address).
            let in_handshake = matches!(
                self.associations.get(&from).map(|a| &a.phase),
                Some(Phase::Handshake { .. })
            );
            if !(in_handshake && hello.message_seq > 0) {
                self.hello(now, Ends { client: from, server }, datagram, hello, out);
                return;
            }
        }
        let Some(a) = self.associations.get_mut(&from) else {
            self.counters.dropped += 1;
            return;
        };
        a.last_seen = now;
        let result = a
            .dtls
            .handle_timeout(now)
            .and_then(|()| a.dtls.handle_packet(datagram));
        self.after(now, from, result.is_ok(), out);
    }

    /// Encrypts `data` (a STUN message or ChannelData) to `to`'s
    /// association; false when there is none established.
    pub fn send(&mut self, now: Instant, to: SocketAddr, data: &[u8], out: &mut Output) -> bool {
        let Some(a) = self.associations.get_mut(&to) else {
            return false;
        };
        if !matches!(a.phase, Phase::Established) {
            return false;
        }
        let ok = a.dtls.send_application_data(data).is_ok();
        self.after(now, to, ok, out);
        ok
    }

    /// Retransmissions, handshake deadlines and idle associations.
    pub fn handle_timeout(&mut self, now: Instant, out: &mut Output) {
        let due: Vec<SocketAddr> = self
            .associations
            .iter()
            .filter(|(_, a)| {
                let end = match a.phase {
                    Phase::Handshake { deadline } => deadline,
                    Phase::Established => a.last_seen + self.limits.idle_timeout,
                };
                end <= now || a.wake.is_some_and(|w| w <= now)
            })
            .map(|(k, _)| *k)
            .collect();
        for from in due {
            let Some(a) = self.associations.get_mut(&from) else {
                continue;
            };
            let expired = match a.phase {
                Phase::Handshake { deadline } => deadline <= now,
                Phase::Established => a.last_seen + self.limits.idle_timeout <= now,
            };
            if expired {
                self.close(from, out);
                continue;
            }
            let ok = a.dtls.handle_timeout(now).is_ok();
            self.after(now, from, ok, out);
        }
    }

    /// Ends every association (shutdown): close_notify to each.
    pub fn close_all(&mut self, now: Instant, out: &mut Output) {
        let all: Vec<SocketAddr> = self.associations.keys().copied().collect();
        for from in all {
            if let Some(a) = self.associations.get_mut(&from) {
                let _ = a.dtls.close();
                self.after(now, from, true, out);
            }
            self.close(from, out);
        }
    }

    /// RFC 6347 §4.2.1: a hello without a valid cookie gets a
    /// HelloVerifyRequest and leaves nothing behind; one with a valid
    /// cookie starts an association, within the caps.
    fn hello(
        &mut self,
        now: Instant,
        ends: Ends,
        datagram: &[u8],
        hello: hello::ClientHello<'_>,
        out: &mut Output,
    ) {
        let from = ends.client;
        if hello.version > hello::DTLS_1_2 {
            // RFC 8996: DTLS 1.0 is not negotiated. The alert is smaller
            // than the hello and keeps nothing.
            self.counters.old_versions += 1;
            self.last_refusal = Some((from, Refused::OldVersion));
            out.push(ends, &hello::protocol_version_alert(hello.version), false);
            return;
        }
        let window = now.saturating_duration_since(self.epoch).as_secs() / COOKIE_WINDOW.as_secs();
        let seed_now = self.seed(from, hello.random, window);
        let cookie_now = cookie::predicted(seed_now, hello.random);
        // The cookie of this window, else the previous one's.
        let matched = if hello.cookie.is_empty() {
            None
        } else if bool::from(cookie_now[..].ct_eq(hello.cookie)) {
            Some(seed_now)
        } else {
            let seed_before = self.seed(from, hello.random, window.wrapping_sub(1));
            let cookie_before = cookie::predicted(seed_before, hello.random);
            bool::from(cookie_before[..].ct_eq(hello.cookie)).then_some(seed_before)
        };
        let Some(seed) = matched else {
            if !hello.cookie.is_empty() {
                self.counters.bad_cookies += 1;
            }
            let mut record_seq = [0u8; 6];
            record_seq.copy_from_slice(&datagram[5..11]);
            let hvr = cookie::hello_verify_request(record_seq, &cookie_now);
            if hvr.len() <= datagram.len() {
                self.counters.cookies_sent += 1;
                out.push(ends, &hvr, false);
            }
            return;
        };
        // The cookie came back: the source receives at its address.
        let Some(mut dtls) = self.engine_for(now, seed, &hello.as_first(datagram)) else {
            self.counters.failed += 1;
            return;
        };
        if !self.start(now, from, &mut dtls, datagram, out) {
            return;
        }
        self.associations.insert(
            from,
            Association {
                dtls,
                server: ends.server,
                phase: Phase::Handshake {
                    deadline: now + self.limits.handshake_timeout,
                },
                wake: None,
                last_seen: now,
            },
        );
        self.after(now, from, true, out);
    }

    /// Takes a half-open slot for `from`; on success the association's
    /// engine gets the hello that carried the cookie.
    fn start(
        &mut self,
        now: Instant,
        from: SocketAddr,
        dtls: &mut dimpl::Dtls,
        datagram: &[u8],
        out: &mut Output,
    ) -> bool {
        if let Some(old) = self.associations.get(&from) {
            // RFC 6347 §4.2.8: a client that starts over from the same
            // address. A replayed hello must not end a live association, so
            // one that still hears from its client stays.
            if matches!(old.phase, Phase::Established)
                && now.saturating_duration_since(old.last_seen) < RESTART_SILENCE
            {
                self.counters.refused += 1;
                return false;
            }
            self.close(from, out);
        }
        if let Err(r) = self.shared.take_half_open(from.ip(), &self.limits) {
            self.counters.refused += 1;
            self.last_refusal = Some((from, r));
            return false;
        }
        let _ = dtls
            .handle_timeout(now)
            .and_then(|()| dtls.handle_packet(datagram));
        true
    }

    /// The association's engine, seeded with `seed` (so it expects the
    /// cookie the client returned), fed the first-hello form of the hello:
    /// it answers that with a HelloVerifyRequest, dropped here, and then
    /// waits for the hello with the cookie (message_seq 1), as if it had
    /// sent the first answer itself.
    fn engine_for(&mut self, now: Instant, seed: u64, first: &[u8]) -> Option<dimpl::Dtls> {
        let config = engine_config(Some(seed), self.limits.handshake_timeout).ok()?;
        let mut dtls = dimpl::Dtls::new_12(config, self.identity.cert.clone(), now);
        dtls.handle_timeout(now).ok()?;
        dtls.handle_packet(first).ok()?;
        let mut answered = false;
        for _ in 0..16 {
            match dtls.poll_output(&mut self.buf) {
                dimpl::Output::Packet(p) => answered |= hello::hello_verify_cookie(p).is_some(),
                dimpl::Output::Timeout(_) => break,
                _ => {}
            }
        }
        answered.then_some(dtls)
    }

    fn seed(&self, from: SocketAddr, random: &[u8; 32], window: u64) -> u64 {
        let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(&self.secret) else {
            unreachable!("HMAC takes a key of any length")
        };
        mac.update(&window.to_be_bytes());
        match from.ip() {
            IpAddr::V4(v4) => mac.update(&v4.octets()),
            IpAddr::V6(v6) => mac.update(&v6.octets()),
        }
        mac.update(&from.port().to_be_bytes());
        mac.update(random);
        let tag = mac.finalize().into_bytes();
        let mut seed = [0u8; 8];
        seed.copy_from_slice(&tag[..8]);
        u64::from_be_bytes(seed)
    }

    /// Drains what the engine of `from` produced after a call; `ok` false
    /// (a fatal engine error) ends the association.
    fn after(&mut self, now: Instant, from: SocketAddr, ok: bool, out: &mut Output) {
        let Some(a) = self.associations.get_mut(&from) else {
            return;
        };
        let ends = Ends {
            client: from,
            server: a.server,
        };
        let mut closing = !ok;
        let mut established = false;
        for _ in 0..256 {
            match a.dtls.poll_output(&mut self.buf) {
                dimpl::Output::Packet(p) => out.push(ends, p, false),
                dimpl::Output::ApplicationData(d) => out.push(ends, d, true),
                dimpl::Output::Connected => established = true,
                dimpl::Output::CloseNotify => closing = true,
                dimpl::Output::BufferTooSmall { needed } => {
                    if needed > 65536 {
                        closing = true;
                        break;
                    }
                    self.buf.resize(needed, 0);
                }
                dimpl::Output::Timeout(t) => {
                    a.wake = Some(t);
                    break;
                }
                _ => {}
            }
        }
        if a.wake.is_some_and(|w| w <= now) {
            a.wake = None;
        }
        if established {
            if let Phase::Handshake { .. } = a.phase {
                a.phase = Phase::Established;
                self.shared.release_half_open(from.ip());
                self.counters.established += 1;
                out.established.push(ends);
            }
        }
        if closing || a.dtls.is_closed() {
            self.close(from, out);
        }
    }

    fn close(&mut self, from: SocketAddr, out: &mut Output) {
        let Some(a) = self.associations.remove(&from) else {
            return;
        };
        if let Phase::Handshake { .. } = a.phase {
            self.shared.release_half_open(from.ip());
            self.counters.failed += 1;
        }
        self.shared.associations.fetch_sub(1, Ordering::Relaxed);
        out.closed.push(Ends {
            client: from,
            server: a.server,
        });
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        let mut out = Output::default();
        let all: Vec<SocketAddr> = self.associations.keys().copied().collect();
        for from in all {
            self.close(from, &mut out);
        }
    }
}

/// A fresh random secret for [`Front::new`].
pub fn random_secret() -> Result<[u8; 32], String> {
    let mut s = [0u8; 32];
    getrandom::getrandom(&mut s).map_err(|e| format!("the system's random source: {e}"))?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The interleaving CI once met: this thread's build starts before any
    /// build has finished (real exchanges), another thread's build finishes
    /// between Alice's and Bob's start. Both must still be real.
    #[test]
    fn a_build_keeps_its_exchanges_real_when_another_finishes_midway() {
        let group = provider()
            .kx_groups
            .iter()
            .copied()
            .find(|g| g.name() == dimpl::crypto::NamedGroup::Secp256r1)
            .unwrap();
        BUILD.set(Build::Validating);
        let alice = group.start_exchange(dimpl::crypto::Buf::new()).unwrap();
        GROUPS_VALIDATED.store(true, Ordering::Release);
        let bob = group.start_exchange(dimpl::crypto::Buf::new()).unwrap();
        BUILD.set(Build::None);
        let (alice_pub, bob_pub) = (alice.pub_key().to_vec(), bob.pub_key().to_vec());
        let (mut a, mut b) = (dimpl::crypto::Buf::new(), dimpl::crypto::Buf::new());
        alice.complete(&bob_pub, &mut a).unwrap();
        bob.complete(&alice_pub, &mut b).unwrap();
        assert_eq!(a.as_ref(), b.as_ref());
        assert_eq!(alice_pub.len(), 65, "a real uncompressed P-256 key");
    }
}
