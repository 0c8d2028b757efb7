// SPDX-License-Identifier: MIT OR GPL-2.0
//
// turnpike's kernel fast path (XDP): established UDP channels relayed
// without the socket layer. User space (turn-core's fast_path.rs) is the
// authority: it installs an entry per bound channel, with the instant it
// must stop, and removes it; this program only forwards what an entry
// names, before that instant, and passes everything else to the stack
// unchanged: Binding, every STUN message, Send/Data, TCP, unknown flows,
// malformed ChannelData, fragments, IP options, other families.
//
//   client -> peer: ChannelData to a listener from a known client 5-tuple
//     and channel becomes a UDP datagram from the relayed address to the
//     bound peer (the 4-byte header and any padding stripped).
//   peer -> client: UDP to a relayed address from a peer with a bound
//     channel becomes ChannelData to the client from the listener address
//     the client uses.
//
// IPv4 only so far (same family on both sides); IPv6 passes to user space.
// UDP checksums of rewritten IPv4 datagrams are 0 ("none", RFC 768), as
// the payload is not re-summed here; the IP header checksum is recomputed.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#ifndef AF_INET
#define AF_INET 2
#endif

// Layouts shared with crates/fastpath/src/lib.rs (#[repr(C)]); addresses
// and ports in network byte order, as on the wire.
struct client_key {
	__u32 client_ip;
	__u32 server_ip;
	__u16 client_port;
	__u16 server_port;
	__u16 channel;
	__u16 pad;
};

struct client_val {
	__u32 relay_ip;
	__u32 peer_ip;
	__u16 relay_port;
	__u16 peer_port;
	__u32 flags; // bit 0: set DF (the client asked for DONT-FRAGMENT)
	__u32 ifindex; // the interface holding the relay address
	__u32 pad;
	__u64 expires_ns; // CLOCK_MONOTONIC, as bpf_ktime_get_ns
	__u64 packets;
	__u64 bytes;
};

struct peer_key {
	__u32 relay_ip;
	__u32 peer_ip;
	__u16 relay_port;
	__u16 peer_port;
	__u32 pad;
};

struct peer_val {
	__u32 client_ip;
	__u32 server_ip;
	__u16 client_port;
	__u16 server_port;
	__u16 channel;
	__u16 pad;
	__u32 ifindex; // the interface holding the listener address
	__u32 pad2;
	__u64 expires_ns;
	__u64 packets;
	__u64 bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, struct client_key);
	__type(value, struct client_val);
} TURN_CLIENTS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, struct peer_key);
	__type(value, struct peer_val);
} TURN_PEERS SEC(".maps");

// 0: packets forwarded; 1: packets of installed flows looked at; 2: of
// those, passed to user space for want of a route or neighbour.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 3);
	__type(key, __u32);
	__type(value, __u64);
} TURN_STATS SEC(".maps");

static __always_inline void count(__u32 slot)
{
	__u64 *v = bpf_map_lookup_elem(&TURN_STATS, &slot);
	if (v)
		*v += 1;
}

static __always_inline __u16 ip_checksum(struct iphdr *ip)
{
	__u32 sum = 0;
	__u16 *p = (__u16 *)ip;
	ip->check = 0;
#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += p[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum;
}

// Where a datagram from `src` to `dst` leaves, and the MAC addresses to
// put on it; 0 when the kernel has no usable route or neighbour (then the
// packet goes to user space untouched, which sends it the normal way and
// so resolves the neighbour). The lookup is the one for a datagram this
// host sends (the relay is its sender, it forwards nothing), out of `oif`,
// the interface holding the source address. The kernel answers only for
// an interface with IPv4 forwarding on (user space checks at start).
static __always_inline int route(struct xdp_md *ctx, __u32 src, __u32 dst, __u16 len, __u32 oif,
				 unsigned char smac[6], unsigned char dmac[6])
{
	struct bpf_fib_lookup fib = {};
	fib.family = AF_INET;
	fib.l4_protocol = IPPROTO_UDP;
	fib.tot_len = len;
	fib.ipv4_src = src;
	fib.ipv4_dst = dst;
	fib.ifindex = oif;
	if (bpf_fib_lookup(ctx, &fib, sizeof(fib), BPF_FIB_LOOKUP_OUTPUT) != BPF_FIB_LKUP_RET_SUCCESS) {
		count(2);
		return 0;
	}
	__builtin_memcpy(smac, fib.smac, 6);
	__builtin_memcpy(dmac, fib.dmac, 6);
	return fib.ifindex;
}

static __always_inline int send(struct xdp_md *ctx, int ifindex)
{
	count(0);
	if (ifindex == (int)ctx->ingress_ifindex)
		return XDP_TX;
	return bpf_redirect(ifindex, 0);
}

SEC("xdp")
int turn_fast(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->ihl != 5 || ip->version != 4 || ip->protocol != IPPROTO_UDP)
		return XDP_PASS;
	// Fragments (MF or an offset) and short or odd lengths: user space.
	if (ip->frag_off & bpf_htons(0x3fff))
		return XDP_PASS;
	struct udphdr *udp = (void *)(ip + 1);
	if ((void *)(udp + 1) > end)
		return XDP_PASS;
	__u16 ulen = bpf_ntohs(udp->len);
	if (ulen < 8 || ulen > 1500 || bpf_ntohs(ip->tot_len) != 20 + ulen)
		return XDP_PASS;
	if ((void *)udp + ulen > end)
		return XDP_PASS;
	unsigned char *pl = (void *)(udp + 1);
	__u64 now = bpf_ktime_get_ns();
	unsigned char smac[6], dmac[6];
	struct ethhdr e0 = *eth;

	// Client -> peer: ChannelData (first two bits 01, RFC 8656 §12.4).
	if (ulen >= 12 && (void *)(pl + 4) <= end && (pl[0] & 0xc0) == 0x40) {
		struct client_key k = {
			.client_ip = ip->saddr,
			.server_ip = ip->daddr,
			.client_port = udp->source,
			.server_port = udp->dest,
			.channel = (__u16)((pl[0] << 8) | pl[1]),
		};
		__u16 dlen = (__u16)((pl[2] << 8) | pl[3]);
		struct client_val *v = bpf_map_lookup_elem(&TURN_CLIENTS, &k);
		if (v) {
			count(1);
			// RFC 8656 §12.5: the length must fit what arrived (padding
			// after it, up to the datagram's end, is dropped).
			if (4 + (__u32)dlen > (__u32)ulen - 8 || now >= v->expires_ns)
				return XDP_PASS;
			int ifindex = route(ctx, v->relay_ip, v->peer_ip, 28 + dlen, v->ifindex, smac, dmac);
			if (!ifindex)
				return XDP_PASS;
			__u32 relay_ip = v->relay_ip, peer_ip = v->peer_ip;
			__u16 relay_port = v->relay_port, peer_port = v->peer_port;
			__u32 df = v->flags & 1;
			__sync_fetch_and_add(&v->packets, 1);
			__sync_fetch_and_add(&v->bytes, dlen);
			struct iphdr ip0 = *ip;
			// The payload stays where it is; the headers move 4 bytes on,
			// over the ChannelData header.
			if (bpf_xdp_adjust_head(ctx, 4))
				return XDP_DROP;
			data = (void *)(long)ctx->data;
			end = (void *)(long)ctx->data_end;
			long excess = (long)(end - data) - (14 + 20 + 8 + dlen);
			if (excess > 0 && bpf_xdp_adjust_tail(ctx, -(int)excess))
				return XDP_DROP;
			data = (void *)(long)ctx->data;
			end = (void *)(long)ctx->data_end;
			eth = data;
			ip = (void *)(eth + 1);
			udp = (void *)(ip + 1);
			if ((void *)(udp + 1) > end)
				return XDP_DROP;
			__builtin_memcpy(eth->h_dest, dmac, 6);
			__builtin_memcpy(eth->h_source, smac, 6);
			eth->h_proto = e0.h_proto;
			*ip = ip0;
			ip->tot_len = bpf_htons(28 + dlen);
			ip->saddr = relay_ip;
			ip->daddr = peer_ip;
			ip->ttl = 64;
			ip->frag_off = df ? bpf_htons(0x4000) : 0;
			ip->check = ip_checksum(ip);
			udp->source = relay_port;
			udp->dest = peer_port;
			udp->len = bpf_htons(8 + dlen);
			udp->check = 0;
			return send(ctx, ifindex);
		}
	}

	// Peer -> client: a datagram to a relayed address from a bound peer.
	struct peer_key pk = {
		.relay_ip = ip->daddr,
		.peer_ip = ip->saddr,
		.relay_port = udp->dest,
		.peer_port = udp->source,
	};
	struct peer_val *pv = bpf_map_lookup_elem(&TURN_PEERS, &pk);
	if (!pv)
		return XDP_PASS;
	count(1);
	__u16 dlen = ulen - 8;
	// Room for the ChannelData header within the datagram limit user
	// space also keeps.
	if (now >= pv->expires_ns || dlen > 1400)
		return XDP_PASS;
	int ifindex = route(ctx, pv->server_ip, pv->client_ip, 32 + dlen, pv->ifindex, smac, dmac);
	if (!ifindex)
		return XDP_PASS;
	__u32 client_ip = pv->client_ip, server_ip = pv->server_ip;
	__u16 client_port = pv->client_port, server_port = pv->server_port, channel = pv->channel;
	__sync_fetch_and_add(&pv->packets, 1);
	__sync_fetch_and_add(&pv->bytes, dlen);
	struct iphdr ip0 = *ip;
	long excess = (long)(end - data) - (14 + 20 + ulen);
	// Ethernet padding on a short frame: trimmed first.
	if (excess > 0 && bpf_xdp_adjust_tail(ctx, -(int)excess))
		return XDP_DROP;
	if (bpf_xdp_adjust_head(ctx, -4))
		return XDP_PASS;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	eth = data;
	ip = (void *)(eth + 1);
	udp = (void *)(ip + 1);
	unsigned char *cd = (void *)(udp + 1);
	if ((void *)(cd + 4) > end)
		return XDP_DROP;
	__builtin_memcpy(eth->h_dest, dmac, 6);
	__builtin_memcpy(eth->h_source, smac, 6);
	eth->h_proto = e0.h_proto;
	*ip = ip0;
	ip->tot_len = bpf_htons(32 + dlen);
	ip->saddr = server_ip;
	ip->daddr = client_ip;
	ip->ttl = 64;
	ip->frag_off = 0;
	ip->check = ip_checksum(ip);
	udp->source = server_port;
	udp->dest = client_port;
	udp->len = bpf_htons(12 + dlen);
	udp->check = 0;
	cd[0] = channel >> 8;
	cd[1] = channel & 0xff;
	cd[2] = dlen >> 8;
	cd[3] = dlen & 0xff;
	return send(ctx, ifindex);
}

// For the far ends of veth pairs in tests and benchmarks: a device that
// receives redirected XDP frames needs an XDP program of its own.
SEC("xdp")
int pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
