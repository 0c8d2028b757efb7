//! The server crate's integration tests, one binary: each module is a
//! subject (a listener, a store, an RFC, a deployment), all against real
//! sockets and processes. Shared helpers are in `common`.

mod admin;
mod alpn;
mod bench_calls;
mod bench_smoke;
mod binary;
mod browser;
mod common;
mod coturn_import;
mod dtls;
mod dualstack;
mod events;
mod fastpath;
mod fleet;
mod fleet_netns;
mod garbage;
mod icmp;
mod install;
mod interop;
mod kubernetes;
mod limits;
mod metrics;
mod mobility;
mod multihome;
mod node_setup;
mod probe;
mod prometheus;
mod proxy_protocol;
mod rfc5780;
mod runtime;
mod shared_limits;
mod sqlstore;
mod tcp_relay;
mod watch;
mod web;
