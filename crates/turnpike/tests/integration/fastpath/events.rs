//! Session events when the kernel relays: on a one-NIC host, a real
//! webhook receiver (in the server's namespace) gets one start and one end
//! per allocation whose bytes and packets are exactly what the client and
//! peer sent, though the kernel carried nearly all of it, and interim
//! reports that grow with the kernel's counts.

use crate::common;
use crate::events::{secret_file, Receiver};

use std::time::Duration;

use common::in_ns;

use super::*;

#[test]
fn usage_events_count_what_the_kernel_relayed_exactly() {
    if let Err(why) = can_run() {
        common::missing("kernel fast path", &why);
        return;
    }
    let net = 94;
    let t = one_nic_topology("events", net, false);
    let rx = in_ns(&t.server, || Receiver::start(None));
    let secret = secret_file("fastpath");
    let url = format!("http://{}/turn-events", rx.addr);
    let (server, started) = serve(
        &t,
        net,
        &[
            "--fast-path",
            "on",
            "--fast-path-interface",
            "s1",
            "--events-webhook",
            &url,
            "--events-webhook-secret-file",
            secret.to_str().unwrap(),
            "--events-interim",
            "1",
        ],
    );
    assert!(started.contains("fast_path=on"), "{started}");
    let (n, size) = (300u64, 160usize);
    let mut expected = Vec::new();
    for v6 in [false, true] {
        let mut e = bound(&t, net, v6);
        // The warm-up's packet each way ("warm", 4 bytes) counts too.
        e.warm_up();
        let data = vec![0x5au8; size];
        for _ in 0..n {
            e.client.channel().send(&channel_data(&data, &[])).unwrap();
            assert_eq!(e.at_peer(Duration::from_secs(1)).map(|d| d.len()), Some(size));
            e.peer.send_to(&data[..size / 2], e.relayed).unwrap();
            assert!(e.at_client(Duration::from_secs(1)).is_some());
        }
        // Long enough for an interim report with the kernel's counts.
        std::thread::sleep(Duration::from_millis(2500));
        let relayed = e.relayed;
        in_ns(&t.outer, move || assert_eq!(e.client.refresh(0).unwrap(), 0));
        expected.push((relayed, n * size as u64 + 4, n * (size / 2) as u64 + 4));
    }
    let kernel = settled(&t, "turnpike_fast_path_packets_total");
    assert!(
        kernel >= (4 * n) as f64 * 0.95,
        "the kernel relayed {kernel} of {} packets",
        4 * n
    );
    let starts = rx.wait_for("allocation.start", 2, Duration::from_secs(10));
    let ends = rx.wait_for("allocation.end", 2, Duration::from_secs(10));
    assert_eq!(starts.len(), 2, "{starts:?}");
    assert_eq!(ends.len(), 2, "one end per allocation: {ends:?}");
    let interims = rx.of_type("allocation.interim");
    for (relayed, to_peer, from_peer) in expected {
        let relayed = relayed.to_string();
        let end = ends
            .iter()
            .find(|e| {
                e["relayed"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|a| a == &relayed))
            })
            .unwrap_or_else(|| panic!("no end for {relayed}: {ends:?}"));
        assert_eq!(end["reason"], "deleted", "{end}");
        assert_eq!(end["bytes_to_peers"].as_u64(), Some(to_peer), "{end}");
        assert_eq!(end["bytes_from_peers"].as_u64(), Some(from_peer), "{end}");
        assert_eq!(end["packets_to_peers"].as_u64(), Some(n + 1), "{end}");
        assert_eq!(end["packets_from_peers"].as_u64(), Some(n + 1), "{end}");
        // An interim report of this allocation saw the kernel's counts
        // before its end.
        let seen = interims
            .iter()
            .filter(|i| i["allocation"] == end["allocation"])
            .filter_map(|i| i["bytes_to_peers"].as_u64())
            .max();
        assert_eq!(seen, Some(to_peer), "interims of {relayed}: {interims:?}");
    }
    drop(server);
    let _ = std::fs::remove_file(secret);
}
