//! turnpike: a STUN/TURN server. The binary's parts, as a library so the
//! integration tests use the same code. The client side (`probe`, `bench`)
//! is the `turnpike-client` crate.
#![forbid(unsafe_code)]

pub mod admin;
pub mod build_id;
pub mod config;
pub mod coturn;
pub mod coturn_conf;
pub mod credentials;
pub mod events;
pub mod external_ip;
pub mod fleet;
pub mod http;
pub mod metrics;
pub mod node;
pub mod redisdb;
pub mod runtime;
pub mod sessions;
pub mod sqldb;
pub mod tls;
pub mod upgrade;
pub mod userdb;
pub mod web;

pub use build_id::version;
