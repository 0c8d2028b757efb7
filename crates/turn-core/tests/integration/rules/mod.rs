//! One test per protocol rule, driving the sans-IO server with fake time and
//! a fake relay provider. A 600 s lifetime is walked in microseconds.
//! `stun.rs`: Binding, authentication, RFC 5780; `allocation.rs`: Allocate,
//! Refresh and lifetimes; `relaying.rs`: permissions, Send/Data, the peer
//! policy and channels.

mod allocation;
mod relaying;
mod stun;
