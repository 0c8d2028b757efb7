#!/usr/bin/env python3
"""What a binary upgrade (SIGUSR2) costs the calls going through it:
`turnpike bench --mode calls` at a fixed number of calls against turnpike,
once with an upgrade half-way through the measured interval and once
without, side by side; the upgrade's own log line gives the hand-over gap
and how many allocations moved. Loopback only; run by hand, not in CI.

    python3 bench/upgrade.py                  # 200 calls, 6 s, upgrade at 3 s
    CALLS=400 DURATION=8 python3 bench/upgrade.py

Each call is two allocations sending 50 packets/s to each other's relayed
address (Opus), so 200 calls are 400 allocations sending 20,000
packets/s, each crossing the server twice. Needs a release build (done here).
"""
import json, os, signal, subprocess, sys, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TP = os.path.join(ROOT, 'target/release/turnpike')
PORT = os.environ.get('PORT', '3478')
CALLS = os.environ.get('CALLS', '200')
DURATION = float(os.environ.get('DURATION', '6'))
WARMUP = os.environ.get('WARMUP', '1')
SERVER = [TP, 'serve', '--listen', f'127.0.0.1:{PORT}', '--no-tls', '--user', 'bench:bench',
          '--realm', 'turnpike', '--allow-loopback-peers', '--rate-limit-per-ip', '0',
          '--auth-fail-limit', '0', '--threads', '2', '--log-level', 'info', '--fast-path', 'off']


def run(upgrade):
    server = subprocess.Popen(SERVER, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = []
    reader = threading.Thread(target=lambda: log.extend(server.stderr), daemon=True)
    reader.start()
    time.sleep(1.0)
    bench = subprocess.Popen([TP, 'bench', '--mode', 'calls', '--server', f'127.0.0.1:{PORT}',
                              '--user', 'bench', '--password', 'bench', '--calls', CALLS,
                              '--duration', str(DURATION), '--warmup', WARMUP, '--json'],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    new_pid = None
    if upgrade:
        # Half-way through the measured interval (after set-up and warm-up).
        time.sleep(float(WARMUP) + DURATION / 2 + 2.0)
        server.send_signal(signal.SIGUSR2)
    out, _ = bench.communicate(timeout=300)
    time.sleep(0.5)
    line = next((l for l in log if 'upgrade: the new process serves' in l), None)
    if line:
        new_pid = int(line.split('new_pid=')[1].split()[0])
    for pid in filter(None, [new_pid, server.pid]):
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            pass
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        server.kill()
    time.sleep(1.0)
    if upgrade and not line:
        failed = [l for l in log if 'upgrade' in l]
        sys.exit(f'the upgrade did not complete: {failed}')
    step = json.loads(out)['steps'][-1]
    return step, (line.strip() if line else '')


def field(line, key):
    return line.split(f'{key}=')[1].split()[0] if f'{key}=' in line else '–'


def main():
    subprocess.run(['cargo', 'build', '--release', '-q', '-p', 'turnpike'], cwd=ROOT, check=True)
    rows = []
    for upgrade in (False, True):
        step, line = run(upgrade)
        rows.append((upgrade, step, line))
        print(json.dumps({'upgrade': upgrade, 'step': step, 'log': line}), file=sys.stderr)
    print(f'{CALLS} calls ({int(CALLS) * 2} allocations, {int(CALLS) * 100} packets/s sent), '
          f'{DURATION:g} s measured after {WARMUP} s warm-up, loopback, 2 worker threads\n')
    print('| run | sent pkt/s | loss % | latency p50 / p99 ms | jitter p99 ms | hand-over gap | allocations moved |')
    print('|---|---|---|---|---|---|---|')
    for upgrade, s, line in rows:
        lat, jit = s.get('latency_us') or {}, s.get('jitter_us') or {}
        ms = lambda v: f'{v / 1000:.2f}' if v is not None else '–'
        print(f'| {"with an upgrade" if upgrade else "without"} | {s["sent_pps"]:.0f} | {s["loss_pct"]:.3f} | '
              f'{ms(lat.get("p50"))} / {ms(lat.get("p99"))} | {ms(jit.get("p99"))} | '
              f'{field(line, "gap_ms") + " ms" if upgrade else "–"} | {field(line, "allocations_moved") if upgrade else "–"} |')


if __name__ == '__main__':
    main()
