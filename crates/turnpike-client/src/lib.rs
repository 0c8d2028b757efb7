//! The client side of turnpike, apart from the server: a blocking STUN/TURN
//! client over UDP, TCP and TLS ([`client`]), `turnpike probe` ([`probe`])
//! and `turnpike bench` ([`bench`]). It depends on the wire format and the
//! protocol core's framing, never on the server's runtime.
#![forbid(unsafe_code)]

pub mod bench;
pub mod bench_calls;
mod bench_report;
mod bench_tcp;
pub mod client;
pub mod dns;
pub mod probe;
pub mod tls;
