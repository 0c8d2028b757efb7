#!/usr/bin/env python3
"""The kernel fast path measured beside the user-space path, coturn and the
reference relay, over real interfaces: a network namespace for the server
joined by two veth pairs to an outer one holding the load generator's
client and peer sockets (client side 10.203.1.0/24, peer side
10.203.2.0/24). Each server is pinned to core 0, the generator to core 1;
every veth's NAPI runs threaded, the server side's pinned to core 0 and
the generator side's to core 1, so XDP work lands on the server's core
and the generator's receiving on its own. Run as root, by hand, not in CI:

    python3 bench/fastpath.py                  # 5 s per run, median of 3
    DURATION=3 REPEAT=1 python3 bench/fastpath.py
    PROFILE=1 REPEAT=1 python3 bench/fastpath.py   # and where core 0's time goes
    NICS=1 FORWARDING=0 python3 bench/fastpath.py  # a stock one-NIC host
    SHAPES=256x1 ONLY="turnpike fast path" VETH_STATS=1 python3 bench/fastpath.py
                                               # one shape, one server, where frames drop
    CALLS=1 NICS=1 FORWARDING=0 python3 bench/fastpath.py   # calls per core instead

CALLS=1 ramps `bench --mode calls` (Opus calls whose two legs relay to
each other's relayed address: on turnpike's fast path both legs are
joined in one pass) against each server and writes the HTML reports to
bench/results/calls-ns-*.html; START, FACTOR, MAX_LOSS, MAX_P99_MS as in
bench/calls.py.

NICS=1 puts the peer on the client's link (one veth pair: clients, peers
and relay on one interface, the relay address on the same link);
FORWARDING=0 leaves IP forwarding off, as on most hosts (the fast path
then takes next hops from arriving packets).

PROFILE samples core 0 (perf record -C 0, cpu-clock) during each shape's
first fast-path run and prints the top kernel symbols to stderr.

Needs: iproute2, ethtool, taskset, coturn, a release build with clang
(done here). The namespaces and veths are made and removed here; the
servers started here are stopped by PID.
"""
import json, os, shutil, signal, subprocess, sys, time

DURATION = os.environ.get('DURATION', '5')
WARMUP = os.environ.get('WARMUP', '1')
REPEAT = int(os.environ.get('REPEAT', '3'))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TP = os.path.join(ROOT, 'target/release/turnpike')
REF = os.path.join(ROOT, 'target/release/refrelay')
O, S = f'tpbo{os.getpid()}', f'tpbs{os.getpid()}'
NICS = int(os.environ.get('NICS', '2'))
FORWARDING = os.environ.get('FORWARDING', '1') == '1'
SERVER, RELAY, PEER = '10.203.1.1', '10.203.2.1', '10.203.2.2'
IFACES = ['s1', 's2'] if NICS == 2 else ['s1']
# VETH_QUEUES=N: veths with N receive and transmit queues. A veth's XDP
# receive ring holds 256 frames per queue; a burst larger than that (256
# allocations x window 1, on one NIC both directions) overflows it and the
# sender's transmit fails (ENOBUFS, the generator's Udp SndbufErrors). A
# NIC's rings hold 512-4096 descriptors. Every queue's NAPI thread is
# still pinned to the same core.
QUEUES = (f"numtxqueues {os.environ['VETH_QUEUES']} numrxqueues {os.environ['VETH_QUEUES']}"
          if os.environ.get('VETH_QUEUES') else '')

TURNPIKE = [TP, 'serve', '--listen', f'{SERVER}:3478', '--no-tls', '--user', 'bench:bench',
            '--realm', 'turnpike', '--relay-ip', RELAY, '--allow-peer', '10.203.2.0/24',
            '--rate-limit-per-ip', '0', '--auth-fail-limit', '0', '--threads', '1',
            '--log-level', 'error']
SERVERS = {
    'turnpike fast path': TURNPIKE + ['--fast-path', 'on'] + [a for i in IFACES for a in ('--fast-path-interface', i)],
    'turnpike user space': TURNPIKE + ['--fast-path', 'off'],
    'coturn 4.6.1': ['turnserver', '-n', f'--listening-ip={SERVER}', '--listening-port=3478',
                     f'--relay-ip={RELAY}', '--lt-cred-mech', '--user=bench:bench',
                     '--realm=turnpike', '--no-tls', '--no-dtls', '--no-cli', '--relay-threads=1',
                     '--min-port=49152', '--max-port=65535', '--no-software-attribute',
                     '--simple-log', '--log-file=/dev/null', '--total-quota=0', '--user-quota=0'],
    'reference': [REF, f'{SERVER}:3478'],
}
# COTURN_NEW=/path/to/turnserver: a newer coturn built from source (e.g.
# 4.17.1, with its default recvmmsg batching) beside Debian's.
if os.environ.get('COTURN_NEW'):
    SERVERS['coturn ' + os.environ.get('COTURN_NEW_VERSION', 'new')] = (
        [os.environ['COTURN_NEW']] + SERVERS['coturn 4.6.1'][1:])
# BASELINE=/path/to/an/older/turnpike: that build too, both paths, to
# see what a change did (side by side in the same run).
if os.environ.get('BASELINE'):
    base = [os.environ['BASELINE']] + TURNPIKE[1:]
    SERVERS['baseline fast path'] = base + SERVERS['turnpike fast path'][len(TURNPIKE):]
    SERVERS['baseline user space'] = base + ['--fast-path', 'off']
# ONLY="coturn 4.6.1,reference": just those servers.
if os.environ.get('ONLY'):
    SERVERS = {k: v for k, v in SERVERS.items() if k in os.environ['ONLY'].split(',')}
# The generator's veths: for the fast path they compute UDP checksums (tx
# off), as datagrams from a wire carry them (the fast path updates a
# checksum and passes one left to offload up); for the socket-path servers
# they leave them to offload (tx on), which the receiving stack takes as
# verified, as it takes a NIC's checksum offload. TX=off or TX=on forces
# one setting for every server.
TX = os.environ.get('TX')


def set_tx(name):
    tx = TX or ('off' if name.endswith('fast path') else 'on')
    outer = 'a1 a2' if NICS == 2 else 'a1'
    sh(f'for i in {outer}; do ip netns exec {O} ethtool -K $i tx {tx} >/dev/null; done')
SHAPES = [('16 x 16', '16', '16'), ('64 x 4', '64', '4'), ('256 x 1', '256', '1')]
# SHAPES="256x1,64x4": just those shapes.
if os.environ.get('SHAPES'):
    SHAPES = [s for s in SHAPES if s[0].replace(' ', '') in os.environ['SHAPES'].split(',')]


def sh(cmd):
    subprocess.run(['sh', '-ec', cmd], check=True)


def setup():
    if NICS == 2:
        sh(f'''ip netns add {O}; ip netns add {S}
ip -n {O} link set lo up; ip -n {S} link set lo up
ip -n {O} link add a1 {QUEUES} type veth peer name s1 netns {S} {QUEUES}
ip -n {O} link add a2 {QUEUES} type veth peer name s2 netns {S} {QUEUES}
ip -n {O} addr add 10.203.1.2/24 dev a1; ip -n {S} addr add {SERVER}/24 dev s1
ip -n {O} addr add {PEER}/24 dev a2; ip -n {S} addr add {RELAY}/24 dev s2
for i in a1 a2; do ip -n {O} link set $i up; ip netns exec {O} ethtool -K $i gro on >/dev/null; done
for i in s1 s2; do ip -n {S} link set $i up; ip netns exec {S} ethtool -K $i gro on >/dev/null; done''')
    else:
        # One link: the client's and the peer's subnets both on a1/s1.
        sh(f'''ip netns add {O}; ip netns add {S}
ip -n {O} link set lo up; ip -n {S} link set lo up
ip -n {O} link add a1 {QUEUES} type veth peer name s1 netns {S} {QUEUES}
ip -n {O} addr add 10.203.1.2/24 dev a1; ip -n {S} addr add {SERVER}/24 dev s1
ip -n {O} addr add {PEER}/24 dev a1; ip -n {S} addr add {RELAY}/24 dev s1
ip -n {O} link set a1 up; ip netns exec {O} ethtool -K a1 gro on >/dev/null
ip -n {S} link set s1 up; ip netns exec {S} ethtool -K s1 gro on >/dev/null''')
    if FORWARDING:
        sh(f"ip netns exec {S} sysctl -qw " + ' '.join(f'net.ipv4.conf.{i}.forwarding=1' for i in IFACES))
    # Threaded NAPI: the server's veths pinned to the server's core, the
    # generator's to the generator's, so each side's receive work (XDP on
    # the server's side) is counted where it belongs.
    for ns, ifs in ((S, IFACES), (O, [i.replace('s', 'a') for i in IFACES])):
        for i in ifs:
            sh(f"ip netns exec {ns} sh -c 'echo 1 > /sys/class/net/{i}/threaded'")
    time.sleep(0.2)
    ps = subprocess.run(['ps', '-eo', 'pid,comm'], capture_output=True, text=True).stdout
    for line in ps.splitlines()[1:]:
        pid, comm = line.split(None, 1)
        core = '0' if comm.startswith(('napi/s1', 'napi/s2')) else '1' if comm.startswith(('napi/a1', 'napi/a2')) else None
        if core:
            subprocess.run(['taskset', '-pc', core, pid], capture_output=True)
            # NAPI_FIFO=1: the veths' NAPI threads preempt the processes on
            # their cores, so a busy generator cannot leave its receive
            # ring (256 frames on veth) to overflow.
            if os.environ.get('NAPI_FIFO') == '1':
                subprocess.run(['chrt', '-f', '-p', '50', pid], capture_output=True)


def teardown():
    subprocess.run(['ip', 'netns', 'del', O], capture_output=True)
    subprocess.run(['ip', 'netns', 'del', S], capture_output=True)


def start(name):
    p = subprocess.Popen(['ip', 'netns', 'exec', S, 'taskset', '-c', '0'] + SERVERS[name],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.5)
    if p.poll() is not None:
        sys.exit(f'{name} did not start')
    return p


def server_pid(p):
    # `ip netns exec` execs the server, so the child's pid is the server's.
    return p.pid


def profiled(label):
    """Starts perf on core 0 for this run, if asked; returns its process."""
    if not os.environ.get('PROFILE') or not shutil.which('perf'):
        return None
    out = f'/tmp/turnpike-fastpath-{label.replace(" ", "")}.perf'
    return subprocess.Popen(['perf', 'record', '-q', '-e', 'cpu-clock', '-C', '0', '-o', out, '--',
                             'sleep', str(float(WARMUP) + float(DURATION))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out


def report(prof, label):
    proc, out = prof
    proc.wait()
    rep = subprocess.run(['perf', 'report', '-i', out, '--no-children', '--sort', 'sym', '--stdio',
                          '--percent-limit', '1.5'], capture_output=True, text=True, stdin=subprocess.DEVNULL).stdout
    lines = [l for l in rep.splitlines() if l.strip() and not l.startswith('#')]
    print(f'--- core 0 profile, fast path, {label}:\n' + '\n'.join(lines[:25]), file=sys.stderr)


def veth_stats():
    """The veths' driver counters (ethtool -S), by interface and name."""
    out = {}
    for ns, ifs in ((S, IFACES), (O, [i.replace('s', 'a') for i in IFACES])):
        for i in ifs:
            text = subprocess.run(['ip', 'netns', 'exec', ns, 'ethtool', '-S', i],
                                  capture_output=True, text=True).stdout
            for line in text.splitlines()[1:]:
                k, _, v = line.strip().partition(':')
                if v.strip().isdigit():
                    out[f'{i} {k}'] = int(v)
    # And each namespace's UDP counters (a full socket buffer, a bad
    # checksum: drops past the interfaces).
    for ns, side in ((S, 'server'), (O, 'generator')):
        snmp = subprocess.run(['ip', 'netns', 'exec', ns, 'cat', '/proc/net/snmp'],
                              capture_output=True, text=True).stdout.splitlines()
        udp = [l.split()[1:] for l in snmp if l.startswith('Udp:')]
        if len(udp) == 2:
            for k, v in zip(*udp):
                out[f'{side} Udp {k}'] = int(v)
    return out


def drops(before, after):
    """VETH_STATS=1: the veth counters a run moved that count drops and
    errors (a full XDP ring shows as xdp_tx/xmit errors or drops)."""
    moved = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    return {k: v for k, v in moved.items() if any(w in k.lower() for w in ('drop', 'err', 'full'))}


def bench(pid, allocs, window):
    cmd = ['ip', 'netns', 'exec', O, 'taskset', '-c', '1', TP, 'bench', '--server', f'{SERVER}:3478',
           '--peer-ip', PEER, '--user', 'bench', '--password', 'bench', '--json', '--pid', str(pid),
           '--server-core', '0', '--duration', DURATION, '--warmup', WARMUP, '--no-gso',
           '--mode', 'channel', '--allocations', allocs, '--window', window]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        return {'error': out.stderr.strip()[:200]}
    return json.loads(out.stdout)


def calls(pid, name):
    report = os.path.join(ROOT, 'bench/results', f'calls-ns-{name.replace(" ", "-")}.html')
    cmd = ['ip', 'netns', 'exec', O, 'taskset', '-c', '1', TP, 'bench', '--mode', 'calls',
           '--server', f'{SERVER}:3478', '--user', 'bench', '--password', 'bench', '--pid', str(pid),
           '--server-core', '0', '--calls', os.environ.get('START', '200'), '--ramp',
           '--ramp-factor', os.environ.get('FACTOR', '1.25'), '--max-loss', os.environ.get('MAX_LOSS', '1'),
           '--max-p99-ms', os.environ.get('MAX_P99_MS', '20'), '--duration', DURATION, '--warmup', WARMUP,
           '--label', name, '--report', report, '--json']
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        return {'error': out.stderr.strip()[-300:]}
    return json.loads(out.stdout)


def main_calls():
    setup()
    results = {}
    try:
        for name in SERVERS:
            if name == 'reference':
                continue
            set_tx(name)
            p = start(name)
            try:
                results[name] = calls(server_pid(p), name)
            finally:
                p.send_signal(signal.SIGINT)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
            time.sleep(0.5)
    finally:
        teardown()
    print(json.dumps(results, indent=1), file=sys.stderr)
    print(f'{NICS} NIC(s), forwarding {"on" if FORWARDING else "off"}; calls ramp, {DURATION} s a step\n')
    print('| server | calls carried | calls per core | server core % | stopped |')
    print('|---|---|---|---|---|')
    for name, r in results.items():
        if 'error' in r:
            print(f'| {name} | error: {r["error"][:120]} ||||')
            continue
        cap = r.get('capacity') or {}
        print(f'| {name} | {cap.get("calls", "–")} | {(cap.get("calls_per_core") or 0):.0f} | '
              f'{(cap.get("cpu_pct") or 0):.0f} | {r.get("stopped", "")} |')


def main():
    if os.geteuid() != 0:
        sys.exit('run as root (namespaces, XDP)')
    for tool in ('ip', 'ethtool', 'taskset', 'turnserver'):
        if not shutil.which(tool):
            sys.exit(f'{tool} not found')
    subprocess.run(['cargo', 'build', '--release', '-q', '-p', 'turnpike', '-p', 'turnpike-bench'],
                   cwd=ROOT, check=True)
    if os.environ.get('CALLS') == '1':
        return main_calls()
    setup()
    results = {}
    try:
        for label, allocs, window in SHAPES:
            for _ in range(REPEAT):
                for name in SERVERS:
                    set_tx(name)
                    p = start(name)
                    first = name == 'turnpike fast path' and (label, name) not in results
                    prof = profiled(label) if first else None
                    try:
                        before = veth_stats() if os.environ.get('VETH_STATS') == '1' else None
                        r = bench(server_pid(p), allocs, window)
                        if before is not None:
                            r['veth_drops'] = drops(before, veth_stats())
                            print(f'{label} | {name}: lost {r.get("lost")}, veth {r["veth_drops"]}', file=sys.stderr)
                        results.setdefault((label, name), []).append(r)
                        if prof:
                            report(prof, label)
                    finally:
                        p.send_signal(signal.SIGINT)
                        try:
                            p.wait(10)
                        except subprocess.TimeoutExpired:
                            p.kill()
                    time.sleep(0.5)
    finally:
        teardown()
    print(json.dumps({f'{k[0]} | {k[1]}': v for k, v in results.items()}, indent=1), file=sys.stderr)
    print(f'{NICS} NIC(s), forwarding {"on" if FORWARDING else "off"}; '
          f'duration {DURATION} s, warm-up {WARMUP} s, payload 160 B, ChannelData over UDP without GSO; '
          f'median of {REPEAT} by packets/s (all runs listed)\n')
    print('| allocations x window | server | packets/s | runs | lost | RTT p50 / p99 µs '
          '| user µs/pkt | sys µs/pkt | core 0 µs/pkt (all) |')
    print('|---|---|---|---|---|---|---|---|---|')
    for label, _, _ in SHAPES:
        for name in SERVERS:
            runs = results[(label, name)]
            ok = [r for r in runs if 'error' not in r]
            if not ok:
                print(f'| {label} | {name} | error: {runs[0]["error"]} ||||||')
                continue
            ok.sort(key=lambda r: r['per_second'])
            r = ok[len(ok) // 2]
            every = ' / '.join(f'{x["per_second"] / 1000:.0f}k' for x in ok)
            rtt = r.get('rtt_us') or {}
            f = lambda v: f'{v:.3f}' if v is not None else '–'
            print(f'| {label} | {name} | {r["per_second"]:.0f} | {every} | {r["lost"]} | '
                  f'{rtt.get("p50", "–")} / {rtt.get("p99", "–")} | {f(r.get("server_user_us_per_op"))} | '
                  f'{f(r.get("server_sys_us_per_op"))} | {f(r.get("server_core_us_per_op"))} |')


if __name__ == '__main__':
    main()
