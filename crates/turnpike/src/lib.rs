//! turnpike: a STUN/TURN server. The binary's parts, as a library so the
//! integration tests (and later `probe` and `bench`) use the same code.
#![forbid(unsafe_code)]

pub mod admin;
pub mod bench;
pub mod client;
pub mod config;
pub mod credentials;
pub mod dns;
pub mod metrics;
pub mod probe;
pub mod redisdb;
pub mod runtime;
pub mod tls;
pub mod userdb;
