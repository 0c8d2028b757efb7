#!/usr/bin/env python3
"""Runs turnpike, coturn and the protocol-free reference relay one after the
other, each pinned to core 0 with `turnpike bench` on core 1, and prints a
Markdown table. Loopback only; run by hand, not in CI.

    python3 bench/run.py                 # 10 s per measurement, median of 3
    DURATION=3 HOLD=2000 REPEAT=1 python3 bench/run.py
    ONLY=Binding SERVERS=turnpike,reference python3 bench/run.py
    BEFORE=/path/to/older/turnpike python3 bench/run.py   # adds 'turnpike-before'

Needs: coturn (apt-get install coturn), taskset, a release build (done here).
"""
import json, os, shutil, signal, subprocess, sys, time

DURATION = os.environ.get('DURATION', '10')
WARMUP = os.environ.get('WARMUP', '2')
ALLOCS = os.environ.get('ALLOCS', '16')
WINDOW = os.environ.get('WINDOW', '16')
HOLD = os.environ.get('HOLD', '10000')
PORT = os.environ.get('PORT', '3478')
REPEAT = int(os.environ.get('REPEAT', '3'))
# ONLY=ChannelData,Binding runs the measures whose label contains one of these.
ONLY = [w for w in os.environ.get('ONLY', '').split(',') if w]
# SERVERS=turnpike,reference runs only these servers.
PICK = [w for w in os.environ.get('SERVERS', '').split(',') if w]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TP = os.path.join(ROOT, 'target/release/turnpike')
REF = os.path.join(ROOT, 'target/release/refrelay')

SERVERS = {
    'turnpike': [TP, 'serve', '--listen', f'127.0.0.1:{PORT}', '--no-tls', '--user', 'bench:bench',
                 '--realm', 'turnpike', '--allow-loopback-peers', '--rate-limit-per-ip', '0',
                 '--auth-fail-limit', '0', '--threads', '1', '--log-level', 'error'],
    # coturn with the same role: one relay thread, loopback peers allowed,
    # long-term credentials, no TLS/DTLS, no CLI, quiet logging.
    'coturn': ['turnserver', '-n', '--listening-ip=127.0.0.1', f'--listening-port={PORT}',
               '--relay-ip=127.0.0.1', '--lt-cred-mech', '--user=bench:bench', '--realm=turnpike',
               '--no-tls', '--no-dtls', '--no-cli', '--allow-loopback-peers', '--relay-threads=1',
               '--min-port=49152', '--max-port=65535', '--no-software-attribute', '--simple-log',
               '--log-file=/dev/null', '--total-quota=0', '--user-quota=0'],
    'reference': [REF, f'127.0.0.1:{PORT}'],
}

# turnpike with two workers, still on one core: the per-packet CPU cost with
# two workers sharing the load (SO_REUSEPORT) shows what sharding costs.
SERVERS['turnpike-2w'] = [a if a != '1' or SERVERS['turnpike'][k - 1] != '--threads' else '2'
                          for k, a in enumerate(SERVERS['turnpike'])]

# BEFORE=path: an older turnpike build with the same flags, measured side
# by side with this one (before/after a change, in one run).
BEFORE = os.environ.get('BEFORE')
if BEFORE:
    SERVERS['turnpike-before'] = [BEFORE] + SERVERS['turnpike'][1:]

ALL3 = ['turnpike'] + (['turnpike-before'] if BEFORE else []) + ['coturn', 'reference']
TP_COTURN = ['turnpike'] + (['turnpike-before'] if BEFORE else []) + ['coturn']
MEASURES = [
    # (label, bench args, servers that take part, repeat?)
    ('ChannelData relay (UDP)', ['--mode', 'channel'], ALL3, True),
    ('ChannelData relay (UDP), 256 allocations x window 1',
     ['--mode', 'channel', '--allocations', '256', '--window', '1'], ALL3, True),
    ('Send/Data relay (UDP)', ['--mode', 'send'], ALL3, True),
    ('ChannelData relay (TCP)', ['--mode', 'channel', '--transport', 'tcp'], TP_COTURN, True),
    ('RFC 6062 TCP relay, 8 connections x window 4',
     ['--mode', 'tcp-relay', '--transport', 'tcp', '--allocations', '8', '--window', '4'], TP_COTURN, True),
    ('Binding (UDP)', ['--mode', 'binding'], ALL3, True),
    ('ChannelData relay (UDP), 1 vs 2 workers on one core', ['--mode', 'channel'],
     ['turnpike', 'turnpike-2w'], True),
    ('Allocate+delete, authenticated (UDP)', ['--mode', 'allocate', '--allocations', '8'],
     TP_COTURN, True),
    (f'Hold {HOLD} allocations', ['--mode', 'hold', '--allocations', HOLD], TP_COTURN, False),
]


def start(name):
    p = subprocess.Popen(['taskset', '-c', '0'] + SERVERS[name], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    time.sleep(1.5)
    if p.poll() is not None:
        sys.exit(f'{name} did not start')
    return p


def bench(pid, args):
    cmd = ['taskset', '-c', '1', TP, 'bench', '--server', f'127.0.0.1:{PORT}', '--user', 'bench',
           '--password', 'bench', '--json', '--pid', str(pid), '--server-core', '0', '--duration', DURATION,
           '--warmup', WARMUP]
    if '--allocations' not in args:
        cmd += ['--allocations', ALLOCS]
    if '--window' not in args:
        cmd += ['--window', WINDOW]
    cmd += args
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        return {'error': out.stderr.strip()[:200]}
    return json.loads(out.stdout)


def main():
    for tool in ('taskset', 'turnserver'):
        if not shutil.which(tool):
            sys.exit(f'{tool} not found (apt-get install coturn util-linux)')
    subprocess.run(['cargo', 'build', '--release', '-q', '-p', 'turnpike', '-p', 'turnpike-bench'],
                   cwd=ROOT, check=True)
    results = {}
    measures = [(l, a, [s for s in ss if not PICK or s in PICK], rep) for l, a, ss, rep in MEASURES
                if not ONLY or any(w in l for w in ONLY)]
    for label, args, servers, rep in measures:
        # Rounds alternate the servers, so drift on the machine hits all alike.
        for _ in range(REPEAT if rep else 1):
            for s in servers:
                p = start(s)
                try:
                    results.setdefault((label, s), []).append(bench(p.pid, args))
                finally:
                    # SIGINT: turnpike stops at once (SIGTERM would drain first).
                    p.send_signal(signal.SIGINT)
                    try:
                        p.wait(10)
                    except subprocess.TimeoutExpired:
                        p.kill()
                time.sleep(0.5)
    print(json.dumps({f'{k[0]} | {k[1]}': v for k, v in results.items()}, indent=1), file=sys.stderr)
    print(f'duration {DURATION} s, warm-up {WARMUP} s, {ALLOCS} allocations x window {WINDOW} '
          f'unless named, payload 160 B; median of {REPEAT} runs by ops/s (all runs listed)\n')
    print('| measure | server | ops/s | runs (ops/s) | lost | RTT p50 / p99 µs | CPU µs/op user '
          '| CPU µs/op sys | core 0 µs/op (all) | RSS/alloc B |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    for label, _, servers, _ in measures:
        for s in servers:
            runs = results[(label, s)]
            ok = [r for r in runs if 'error' not in r]
            if not ok:
                print(f'| {label} | {s} | error: {runs[0]["error"]} |||||||')
                continue
            ok.sort(key=lambda r: r['per_second'])
            r = ok[len(ok) // 2]
            every = ' / '.join(f'{x["per_second"] / 1000:.0f}k' for x in runs if 'error' not in x)
            rtt = r.get('rtt_us') or {}
            f = lambda v, fmt: (fmt % v) if v is not None else '–'
            print(f'| {label} | {s} | {r["per_second"]:.0f} | {every} | {r["lost"]} | '
                  f'{rtt.get("p50", "–")} / {rtt.get("p99", "–")} | '
                  f'{f(r.get("server_user_us_per_op"), "%.3f")} | {f(r.get("server_sys_us_per_op"), "%.3f")} | '
                  f'{f(r.get("server_core_us_per_op"), "%.3f")} | '
                  f'{f(r.get("rss_per_allocation_bytes"), "%.0f")} |')


if __name__ == '__main__':
    main()
