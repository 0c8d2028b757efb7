//! turn-core's integration tests, one binary: the sans-IO server driven
//! through its public API with a fake clock and fake relays.

mod common;
mod dualstack;
mod fast_path;
mod hardening;
mod mobility;
mod rules;
mod snapshot;
mod tcp_relay;
