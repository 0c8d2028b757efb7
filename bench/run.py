#!/usr/bin/env python3
"""Runs turnpike, coturn and the protocol-free reference relay one after the
other, each pinned to core 0 with `turnpike bench` on core 1, and prints a
Markdown table. Loopback only; run by hand, not in CI.

    python3 bench/run.py                 # 10 s per measurement
    DURATION=3 HOLD=2000 python3 bench/run.py

Needs: coturn (apt-get install coturn), taskset, a release build (done here).
"""
import json, os, shutil, subprocess, sys, time

DURATION = os.environ.get('DURATION', '10')
WARMUP = os.environ.get('WARMUP', '2')
ALLOCS = os.environ.get('ALLOCS', '16')
WINDOW = os.environ.get('WINDOW', '16')
HOLD = os.environ.get('HOLD', '10000')
PORT = os.environ.get('PORT', '3478')
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

MEASURES = [
    # (label, bench args, servers that take part)
    ('ChannelData relay (UDP)', ['--mode', 'channel'], ['turnpike', 'coturn', 'reference']),
    ('Send/Data relay (UDP)', ['--mode', 'send'], ['turnpike', 'coturn', 'reference']),
    ('ChannelData relay (TCP)', ['--mode', 'channel', '--transport', 'tcp'], ['turnpike', 'coturn']),
    ('Binding (UDP)', ['--mode', 'binding'], ['turnpike', 'coturn', 'reference']),
    ('Allocate+delete, authenticated (UDP)', ['--mode', 'allocate', '--allocations', '8'], ['turnpike', 'coturn']),
    (f'Hold {HOLD} allocations', ['--mode', 'hold', '--allocations', HOLD], ['turnpike', 'coturn']),
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
           '--password', 'bench', '--json', '--pid', str(pid), '--duration', DURATION, '--warmup', WARMUP]
    if '--allocations' not in args:
        cmd += ['--allocations', ALLOCS]
    cmd += ['--window', WINDOW] + args
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
    measures = [(l, a, [s for s in ss if not PICK or s in PICK]) for l, a, ss in MEASURES
                if not ONLY or any(w in l for w in ONLY)]
    for label, args, servers in measures:
        for s in servers:
            p = start(s)
            try:
                results[(label, s)] = bench(p.pid, args)
            finally:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
            time.sleep(0.5)
    print(json.dumps({f'{k[0]} | {k[1]}': v for k, v in results.items()}, indent=1), file=sys.stderr)
    print(f'duration {DURATION} s, warm-up {WARMUP} s, {ALLOCS} allocations x window {WINDOW}, payload 160 B\n')
    print('| measure | server | ops/s | lost | RTT p50 / p99 µs | CPU µs/op user | CPU µs/op sys | RSS/alloc B |')
    print('|---|---|---|---|---|---|---|---|')
    for label, _, servers in measures:
        for s in servers:
            r = results[(label, s)]
            if 'error' in r:
                print(f'| {label} | {s} | error: {r["error"]} |||||')
                continue
            rtt = r.get('rtt_us') or {}
            f = lambda v, fmt: (fmt % v) if v is not None else '–'
            print(f'| {label} | {s} | {r["per_second"]:.0f} | {r["lost"]} | '
                  f'{rtt.get("p50", "–")} / {rtt.get("p99", "–")} | '
                  f'{f(r.get("server_user_us_per_op"), "%.3f")} | {f(r.get("server_sys_us_per_op"), "%.3f")} | '
                  f'{f(r.get("rss_per_allocation_bytes"), "%.0f")} |')


if __name__ == '__main__':
    main()
