//! Batched UDP I/O for turnpike; with the `fastpath` crate, the workspace's only `unsafe` code.
//!
//! - [`RecvBatch`]: `recvmmsg(2)` of up to [`BATCH`] datagrams, each with
//!   its sender and, on sockets with [`set_recv_local_addr`], the local
//!   address it reached (`IP_PKTINFO` / `IPV6_PKTINFO`): a listener bound
//!   to a wildcard address learns which of the host's addresses a client
//!   used.
//! - [`SendQueue`]: a loop iteration's outgoing datagrams, sent with
//!   `sendmmsg(2)`, one syscall per socket, each from the source address it
//!   names (pktinfo again), with runs to one destination merged into UDP GSO
//!   super-datagrams (`UDP_SEGMENT`).
//! - [`ErrorQueue`]: ICMP errors the kernel queued for a socket with
//!   [`set_recv_errors`] (`IP_RECVERR`), read with `MSG_ERRQUEUE`.
//! - [`handover`]: open sockets passed to another process (`SCM_RIGHTS`),
//!   for a binary upgrade.
//! - Socket options a relay needs ([`set_dont_fragment`]) and the host's
//!   own addresses ([`local_addresses`]).
//!
//! Every `unsafe` block carries a `SAFETY:` note; the public API is safe.
//! Sockets are borrowed per call ([`std::os::fd::AsFd`]); datagrams queued
//! for a socket must leave before it closes, which [`SendQueue::close`]
//! makes the one way to close a socket the queue has seen.

mod addr;
mod errqueue;
pub mod handover;
mod opts;
mod recv;
mod send;
mod sys;

pub use errqueue::{ErrorQueue, IcmpError};
pub use opts::{set_dont_fragment, set_recv_errors, set_recv_local_addr};
pub use recv::{Datagram, RecvBatch, BATCH};
pub use send::{SendQueue, SendStats, QUEUE_ENTRIES};
pub use sys::{
    clock_ticks_per_second, enter_network_namespace, interface_addresses, interface_of, local_addresses,
};
