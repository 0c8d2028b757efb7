#!/usr/bin/env python3
"""Measures response/request byte ratios of unauthenticated answers (Binding,
the 401 challenge to Allocate, and bare 20-byte headers of every TURN
request) for any STUN/TURN server on UDP.

    python3 tools/amplification.py 127.0.0.1:3478 [more servers...]

Sends only to the addresses given; loopback in our use."""
import os, socket, struct, sys, zlib

def msg(method_type, attrs=b'', fingerprint=False):
    txid = os.urandom(12)
    body = attrs
    if fingerprint:
        hdr = struct.pack('>HHI', method_type, len(body) + 8, 0x2112A442) + txid
        crc = (zlib.crc32(hdr + body) ^ 0x5354554E) & 0xFFFFFFFF
        body += struct.pack('>HHI', 0x8028, 4, crc)
    return struct.pack('>HHI', method_type, len(body), 0x2112A442) + txid + body

REQUESTED_TRANSPORT = struct.pack('>HHI', 0x0019, 4, 0x11000000)
CASES = [
    ('Binding', msg(0x0001)),
    ('Binding+FINGERPRINT', msg(0x0001, fingerprint=True)),
    ('Allocate -> 401', msg(0x0003, REQUESTED_TRANSPORT)),
    ('Allocate+FINGERPRINT -> 401', msg(0x0003, REQUESTED_TRANSPORT, fingerprint=True)),
    ('bare Allocate header', msg(0x0003)),
    ('bare Refresh header', msg(0x0004)),
    ('bare CreatePermission header', msg(0x0008)),
    ('bare ChannelBind header', msg(0x0009)),
]

def measure(server):
    host, port = server.rsplit(':', 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    rows = []
    for name, req in CASES:
        # A fresh source port per case: no allocation, no earlier state.
        s.close()
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        s.sendto(req, (host, int(port)))
        try:
            resp, _ = s.recvfrom(2048)
            rows.append((name, len(req), len(resp), len(resp) / len(req)))
        except socket.timeout:
            rows.append((name, len(req), 0, 0.0))
    return rows

for server in sys.argv[1:]:
    print(f'== {server}')
    print(f'{"request":32} {"req B":>6} {"resp B":>7} {"ratio":>6}')
    for name, a, b, r in measure(server):
        print(f'{name:32} {a:6} {b:7} {r:6.2f}')
