#!/usr/bin/env python3
"""Writes the seed corpora: the RFC vectors for `codec`, and operation
sequences for `core` that allocate, permit, bind, relay and expire."""
import os, re, struct

here = os.path.dirname(os.path.abspath(__file__))
vectors = open(os.path.join(here, '../../docs/conformance/vectors.md')).read() \
    if os.path.exists(os.path.join(here, '../../docs/conformance/vectors.md')) else ''
os.makedirs(os.path.join(here, 'codec'), exist_ok=True)
os.makedirs(os.path.join(here, 'core'), exist_ok=True)

blocks = re.findall(r'\n((?:    [0-9a-f]+\n)+)', vectors)
for i, b in enumerate(blocks):
    data = bytes.fromhex(''.join(b.split()))
    open(os.path.join(here, 'codec', f'vector-{i}'), 'wb').write(data)
# A ChannelData message and a Binding request with FINGERPRINT.
open(os.path.join(here, 'codec', 'channeldata'), 'wb').write(bytes.fromhex('4000000568656c6c6f000000'))
open(os.path.join(here, 'codec', 'binding-fp'), 'wb').write(bytes.fromhex(
    '000100082112a442' + '01' * 12 + '80280004') + b'\x00\x00\x00\x00')

def op(code, tuple_idx, payload):
    return bytes([code | (tuple_idx << 4), len(payload) & 0xFF, len(payload) >> 8]) + payload

def attr(t, v):
    return struct.pack('>HB', t, len(v)) + v

alloc = op(5, 0, b'\x00' + attr(0x0019, b'\x11\x00\x00\x00'))
alloc_even = op(5, 1, b'\x00' + attr(0x0019, b'\x11\x00\x00\x00') + attr(0x0018, b'\x80'))
perm = op(7, 0, b'\x02' + attr(0x0012, b'\x00\x00'))
bind = op(8, 0, b'\x03' + attr(0x000C, b'\x40\x00\x00\x00') + attr(0x0012, b'\x00\x00'))
chan = op(0, 0, bytes.fromhex('4000000568656c6c6f000000'))
peer = op(9, 0, b'\x00media')
refresh0 = op(6, 0, b'\x01' + attr(0x000D, b'\x00\x00\x00\x00'))
tick = op(11, 0, b'\x50')
close = op(12, 2, b'')
tcp_alloc = op(5, 2, b'\x00' + attr(0x0019, b'\x06\x00\x00\x00'))
connect = op(5, 2, b'\x04' + attr(0x0012, b'\x00\x00'))
connected = op(10, 0, b'\x00\x00')
conn_bind = op(5, 3, b'\x05' + attr(0x002A, b'\x00\x00\x00\x00'))
tcp_perm = op(5, 2, b'\x02' + attr(0x0012, b'\x00\x00'))
peer_in = op(10, 0, b'\x02\x00')
seqs = {
    # RFC 6062: Connect, its completion, ConnectionBind from another
    # connection; and a peer connecting in after a permission.
    'tcp-active': b'\x04' + tcp_alloc + connect + connected + conn_bind + tick + close,
    'tcp-passive': b'\x05' + tcp_alloc + tcp_perm + peer_in + conn_bind + op(10, 0, b'\x03\x00') + tick,
    'allocate-relay': b'\x00' + alloc + perm + bind + chan + peer + tick + peer,
    'reserve': b'\x01' + alloc_even + alloc + refresh0,
    'tcp-close': b'\x02' + op(5, 2, b'\x00' + attr(0x0019, b'\x11\x00\x00\x00')) + close,
    'expire': b'\x03' + alloc + tick * 10 + op(15, 0, b'x' * 10) + chan,
    # RFC 8016 (mobility on): an Allocate asking for a ticket, a channel,
    # the move from the other UDP client's address with the ticket, data
    # to the new address, the spent ticket replayed from the first.
    'mobility': b'\x04' + op(5, 0, b'\x00' + attr(0x0019, b'\x11\x00\x00\x00') + attr(0x8030, b''))
        + bind + op(6, 1, b'\x01' + attr(0x8030, b'\x00')) + peer
        + op(6, 0, b'\x01' + attr(0x8030, b'\x00')) + tick,
}
for name, data in seqs.items():
    open(os.path.join(here, 'core', name), 'wb').write(data)
print(f'{len(blocks)} vectors, {len(seqs)} core sequences')
