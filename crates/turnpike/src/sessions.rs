//! How a session (an allocation and what it holds) is shown: one JSON
//! shape for the admin API, the dashboard and the fleet's session search.

use serde_json::json;

/// One session as the admin API (and the fleet view) shows it.
pub fn to_json(s: &turn_core::SessionInfo) -> serde_json::Value {
    json!({
        "user": &*s.username,
        "client": s.tuple.client.to_string(),
        "transport": s.tuple.transport.as_str(),
        "relayed": s.relayed.to_string(),
        "age_s": s.age.as_secs(),
        "expires_in_s": s.expires_in.as_secs(),
        "to_peer": {"packets": s.stats.to_peer_packets, "bytes": s.stats.to_peer_bytes},
        "from_peer": {"packets": s.stats.from_peer_packets, "bytes": s.stats.from_peer_bytes},
        "permissions": s.permissions,
        "channels": s.channels,
        "tcp_connections": s.tcp_connections.iter().map(|t| json!({
            "id": t.id,
            "peer": t.peer.to_string(),
            "state": t.state,
            "to_peer_bytes": t.to_peer_bytes,
            "from_peer_bytes": t.from_peer_bytes,
        })).collect::<Vec<_>>(),
    })
}
