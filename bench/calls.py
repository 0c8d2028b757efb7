#!/usr/bin/env python3
"""Capacity in calls: `turnpike bench --mode calls --ramp` against turnpike
and Debian's coturn in one run, each server pinned to core 1 (one worker,
one relay thread) and the generator on core 0; the figure is the most calls
carried within the bounds, and each server's HTML report is written to
bench/results/. Loopback only; run by hand, not in CI.

    python3 bench/calls.py                       # opus, channels, UDP
    DURATION=3 START=300 FACTOR=1.2 python3 bench/calls.py
    EXTRA="--preset video-500k" python3 bench/calls.py

Needs: coturn (apt-get install coturn), taskset, a release build (done here).
"""
import json, os, shlex, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import SERVERS, TP, PORT, ROOT  # the same servers as the relay benchmarks

DURATION = os.environ.get('DURATION', '5')
WARMUP = os.environ.get('WARMUP', '1')
START = os.environ.get('START', '200')
FACTOR = os.environ.get('FACTOR', '1.25')
MAX_LOSS = os.environ.get('MAX_LOSS', '1')
MAX_P99 = os.environ.get('MAX_P99_MS', '20')
EXTRA = shlex.split(os.environ.get('EXTRA', ''))
PICK = [w for w in os.environ.get('SERVERS', 'turnpike,coturn').split(',') if w]
OUT = os.path.join(ROOT, 'bench/results')


def ramp(name):
    server = subprocess.Popen(['taskset', '-c', '1'] + SERVERS[name], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        report = os.path.join(OUT, f'calls-{name}.html')
        cmd = ['taskset', '-c', '0', TP, 'bench', '--mode', 'calls', '--server', f'127.0.0.1:{PORT}',
               '--user', 'bench', '--password', 'bench', '--pid', str(server.pid), '--server-core', '1',
               '--calls', START, '--ramp', '--ramp-factor', FACTOR, '--max-loss', MAX_LOSS,
               '--max-p99-ms', MAX_P99, '--duration', DURATION, '--warmup', WARMUP,
               '--report', report, '--json'] + EXTRA
        print(f'# {name}: {shlex.join(cmd)}', file=sys.stderr)
        out = subprocess.run(cmd, capture_output=True, text=True)
        sys.stderr.write(out.stderr)
        if out.returncode != 0:
            raise SystemExit(f'{name}: bench failed')
        return json.loads(out.stdout)
    finally:
        server.terminate()
        server.wait()


def main():
    subprocess.run(['cargo', 'build', '--release', '-q', '-p', 'turnpike'], cwd=ROOT, check=True)
    os.makedirs(OUT, exist_ok=True)
    rows = []
    for name in PICK:
        r = ramp(name)
        c = r['capacity'] or {}
        best = next((s for s in r['steps'] if s['calls'] == c.get('calls')), None)
        rows.append((name, c, best, r))
        with open(os.path.join(OUT, f'calls-{name}.json'), 'w') as f:
            json.dump(r, f, indent=1)
    print('| server | calls carried | server core at it | calls per core (projected) | latency p99 at it | stopped |')
    print('|---|---|---|---|---|---|')
    for name, c, best, r in rows:
        p99 = f"{best['latency_us']['p99'] / 1000:.2f} ms" if best else '-'
        core = f"{c['cpu_pct']:.1f}%" if c.get('cpu_pct') is not None else '-'
        per = f"{c['calls_per_core']:.0f}" if c.get('calls_per_core') else '-'
        print(f"| {name} | {c.get('calls', 0)} | {core} | {per} | {p99} | {r['stopped']} |")


if __name__ == '__main__':
    main()
