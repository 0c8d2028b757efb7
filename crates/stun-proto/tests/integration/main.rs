//! stun-proto's integration tests, one binary.

mod roundtrip;
mod vectors;
