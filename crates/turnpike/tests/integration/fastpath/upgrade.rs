//! A binary upgrade with the fast path on: the kernel relays through the
//! hand-over (the new process puts its program on the running XDP links
//! with its maps filled from the snapshot), on a one-NIC host that does
//! not forward.

use crate::common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

const NET: u8 = 110;
/// One ChannelData every 2 ms, as a paced media stream.
const INTERVAL: Duration = Duration::from_millis(2);

fn field(line: &str, key: &str) -> String {
    let at = line
        .find(&format!("{key}="))
        .unwrap_or_else(|| panic!("no {key} in {line}"));
    line[at + key.len() + 1..]
        .split(|c: char| c.is_whitespace() || c == ',')
        .next()
        .unwrap_or("")
        .trim_matches('"')
        .to_owned()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.split(") ").nth(1).unwrap_or("").starts_with('Z'))
}

/// The new process is held for a second after it received the sockets,
/// before its workers start: neither process reads a socket then, so a
/// stream that arrives without a gap was relayed by the kernel.
#[test]
fn the_kernel_relays_through_a_binary_upgrade_on_one_nic() {
    if let Err(why) = can_run() {
        common::missing("kernel fast path", &why);
        return;
    }
    let t = one_nic_topology("upgrade", NET, false);
    let (proc, started, rx) = common::spawn_server(
        serve_command(&t, NET, &["--fast-path", "on", "--fast-path-interface", "s1"])
            .env("TURNPIKE_UPGRADE_FAILPOINT", "stall-after-handover"),
    );
    assert!(started.contains("fast_path=on: s1"), "{started}");
    let old_pid = proc.0.id();
    let mut e = bound(&t, NET, false);
    e.warm_up();

    let stop = Arc::new(AtomicBool::new(false));
    let Ends {
        mut client,
        peer,
        relayed,
    } = e;
    peer.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let receiver = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut got: HashMap<u32, Instant> = HashMap::new();
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::SeqCst) {
                if let Ok((4, _)) = peer.recv_from(&mut buf) {
                    got.entry(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]))
                        .or_insert_with(Instant::now);
                }
            }
            (got, peer)
        })
    };
    let sender = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut seq = 0u32;
            let mut next = Instant::now();
            while !stop.load(Ordering::SeqCst) {
                client
                    .channel()
                    .send(&channel_data(&seq.to_be_bytes(), &[]))
                    .unwrap();
                seq += 1;
                next += INTERVAL;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            (client, seq)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let mut seen = Vec::new();
    kill(old_pid, "USR2");
    let done = crate::binary::wait_for(&rx, "upgrade: the new process serves", &mut seen);
    let new_pid: u32 = field(&done, "new_pid").parse().unwrap();
    let gap_ms: u64 = field(&done, "gap_ms").parse().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let (mut client, sent) = sender.join().unwrap();
    let (got, peer) = receiver.join().unwrap();

    let mut arrivals: Vec<Instant> = got.values().copied().collect();
    arrivals.sort();
    let longest = arrivals.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
    let lost = sent as usize - got.len();
    eprintln!(
        "fast path through an upgrade: {sent} sent, {lost} lost, longest silence {longest:?}; user space stopped for {gap_ms} ms"
    );
    // The hand-over held both processes' workers for the stall...
    assert!(gap_ms >= 1000, "{done}");
    // ...and the stream went on in the kernel: nothing lost, no silence
    // anywhere near that long.
    assert!(lost * 1000 <= sent as usize, "{lost} of {sent} lost");
    assert!(longest < Duration::from_millis(300), "silent for {longest:?}");

    // The new process owns the allocation: a Refresh, and both ways.
    client.refresh(600).unwrap();
    let ends = Ends {
        client,
        peer,
        relayed,
    };
    let mut ends = ends;
    ends.warm_up();
    // Its counters go on from the old process's, what the old program
    // relayed after the snapshot included: every packet counted once
    // (the stream, two warm-ups each way), nearly all by the kernel.
    let kernel = super::settled(&t, "turnpike_fast_path_packets_total");
    let relayed = metric(&t, "turnpike_relayed_packets_total");
    eprintln!("kernel {kernel}, relayed {relayed}");
    assert_eq!(relayed, sent as f64 + 4.0);
    assert!(
        kernel >= sent as f64 - 2.0,
        "the kernel's count continued: {kernel} of {sent}"
    );
    assert_eq!(metric(&t, "turnpike_fast_path_active"), 1.0);

    // The old process held nothing else and exits; its program and maps
    // go with it, the link stays with the new one: still the kernel.
    let gone = Instant::now() + Duration::from_secs(10);
    while alive(old_pid) && Instant::now() < gone {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!alive(old_pid), "the old process exits when it holds nothing");
    let before = metric(&t, "turnpike_fast_path_packets_total");
    for i in 0..200u32 {
        ends.client
            .channel()
            .send(&channel_data(&i.to_be_bytes(), &[]))
            .unwrap();
        assert!(ends.at_peer(Duration::from_secs(1)).is_some(), "packet {i}");
    }
    let after = super::settled(&t, "turnpike_fast_path_packets_total");
    assert!(
        after - before >= 195.0,
        "after the old process left, the kernel relayed {} of 200",
        after - before
    );
    kill(new_pid, "INT");
    drop(proc);
}

/// `kill -SIG PID`.
fn kill(pid: u32, sig: &str) {
    assert!(ok(
        Command::new("kill").args([&format!("-{sig}"), &pid.to_string()])
    ));
}

/// A new process that dies after it put its program on the links (its
/// workers ran, it never said it serves): the old one takes the links
/// back, and what it installs next is relayed by the kernel again.
#[test]
fn an_upgrade_that_fails_after_the_swap_gives_the_links_back() {
    if let Err(why) = can_run() {
        common::missing("kernel fast path", &why);
        return;
    }
    let net = NET + 2;
    let t = one_nic_topology("upfail", net, false);
    let (proc, _, rx) = common::spawn_server(
        serve_command(&t, net, &["--fast-path", "on", "--fast-path-interface", "s1"])
            .env("TURNPIKE_UPGRADE_FAILPOINT", "before-serving"),
    );
    let mut before = bound(&t, net, false);
    before.warm_up();
    let mut seen = Vec::new();
    kill(proc.0.id(), "USR2");
    let failed = crate::binary::wait_for(&rx, "upgrade failed; serving on as before", &mut seen);
    eprintln!("{failed}");
    // The allocation from before, and a new one made after: both relayed
    // by the kernel (through this process's maps).
    let mut after = bound(&t, net, false);
    after.warm_up();
    let counted = settled(&t, "turnpike_fast_path_packets_total");
    for e in [&mut before, &mut after] {
        for i in 0..100u32 {
            e.client
                .channel()
                .send(&channel_data(&i.to_be_bytes(), &[]))
                .unwrap();
            assert!(e.at_peer(Duration::from_secs(1)).is_some(), "packet {i}");
        }
    }
    let now = settled(&t, "turnpike_fast_path_packets_total");
    assert!(
        now - counted >= 195.0,
        "after the failed upgrade the kernel relayed {} of 200",
        now - counted
    );
    drop(proc);
}
