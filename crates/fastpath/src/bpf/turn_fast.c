// SPDX-License-Identifier: MIT OR GPL-2.0
//
// turnpike's kernel fast path (XDP): established UDP channels relayed
// without the socket layer. User space (turn-core's fast_path.rs) is the
// authority: it installs an entry per bound channel, with the instant it
// must stop and the bytes it may still forward, and removes it; this
// program only forwards what an entry names, before that instant and
// within that budget, and passes everything else to the stack unchanged:
// Binding, every STUN message, Send/Data, TCP, unknown flows, malformed
// ChannelData, fragments, IP options and IPv6 extension headers.
//
//   client -> peer: ChannelData to a listener from a known client 5-tuple
//     and channel becomes a UDP datagram from the relayed address to the
//     bound peer (the 4-byte header and up to 3 bytes of padding dropped,
//     RFC 8656 §12.5).
//   peer -> client: UDP to a relayed address from a peer with a bound
//     channel becomes ChannelData to the client from the listener address
//     the client uses (unpadded, as user space sends it over UDP).
//   client -> client: when the peer is another allocation's relayed
//     address here with a channel back (both legs of a call on this
//     server), ChannelData goes straight to that allocation's client.
//
// IPv4 and IPv6, the same family on both sides of an entry (user space
// installs none other). The UDP checksum is updated, not recomputed
// (RFC 1624): what arrived corrupted leaves with a checksum that still
// says so. A datagram without one (IPv4, 0) leaves without one. A
// checksum that is only the pseudo-header's sum is one a local sender
// left to offload (CHECKSUM_PARTIAL, seen on veth): it cannot be updated,
// so that datagram goes to user space.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

// Layouts shared with crates/fastpath/src/lib.rs (#[repr(C)]); addresses
// and ports in network byte order, as on the wire. `limit` is the byte
// count (of `bytes`) up to which the entry may forward; past it, packets
// go to user space, which enforces the bandwidth caps.
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
	__u64 limit;
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
	__u64 limit;
	__u64 packets;
	__u64 bytes;
};

struct client_key6 {
	__u32 client_ip[4];
	__u32 server_ip[4];
	__u16 client_port;
	__u16 server_port;
	__u16 channel;
	__u16 pad;
};

struct client_val6 {
	__u32 relay_ip[4];
	__u32 peer_ip[4];
	__u16 relay_port;
	__u16 peer_port;
	__u32 flags; // unused: IPv6 routers never fragment
	__u32 ifindex;
	__u32 pad;
	__u64 expires_ns;
	__u64 limit;
	__u64 packets;
	__u64 bytes;
};

struct peer_key6 {
	__u32 relay_ip[4];
	__u32 peer_ip[4];
	__u16 relay_port;
	__u16 peer_port;
	__u32 pad;
};

struct peer_val6 {
	__u32 client_ip[4];
	__u32 server_ip[4];
	__u16 client_port;
	__u16 server_port;
	__u16 channel;
	__u16 pad;
	__u32 ifindex;
	__u32 pad2;
	__u64 expires_ns;
	__u64 limit;
	__u64 packets;
	__u64 bytes;
};

#define HASH_MAP(name, k, v)                                                                       \
	struct {                                                                                   \
		__uint(type, BPF_MAP_TYPE_HASH);                                                   \
		__uint(max_entries, 262144);                                                       \
		__type(key, struct k);                                                             \
		__type(value, struct v);                                                           \
	} name SEC(".maps")

HASH_MAP(TURN_CLIENTS, client_key, client_val);
HASH_MAP(TURN_PEERS, peer_key, peer_val);
HASH_MAP(TURN_CLIENTS6, client_key6, client_val6);
HASH_MAP(TURN_PEERS6, peer_key6, peer_val6);

// 0: packets forwarded; 1: packets of installed flows looked at; 2: of
// those, passed to user space for want of a route or neighbour (or over
// the route's MTU); 3: of those, passed for a checksum left to offload.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u64);
} TURN_STATS SEC(".maps");

// Next hops learned from arriving packets, for hosts that do not forward
// (bpf_fib_lookup answers only for interfaces that do): a packet of an
// installed flow from IP X came in on `ifindex` from MAC `remote` to our
// MAC `local`, so a datagram to X leaves the same way. Used only while
// fresh (NEIGH_FRESH_NS), out of the interface holding the source address,
// and within that interface's MTU (TURN_MTU, written by user space).
struct neigh_key {
	__u32 ip[4]; // an IPv4 address in ip[0], the rest 0
	__u32 family;
};

struct neigh_val {
	__u32 ifindex;
	unsigned char remote[6];
	unsigned char local[6];
	__u32 pad;
	__u64 seen_ns;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct neigh_key);
	__type(value, struct neigh_val);
} TURN_NEIGH SEC(".maps");

// ifindex -> MTU of each interface the program runs on.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u32);
} TURN_MTU SEC(".maps");

// A learned next hop older than this is not used: the datagram goes to
// user space, whose send resolves the neighbour the normal way.
#define NEIGH_FRESH_NS (30ULL * 1000000000ULL)
// How often a fresh entry's time is rewritten (a map write per packet
// would cost more than the lookup).
#define NEIGH_TOUCH_NS (1000000000ULL)

static __always_inline void count(__u32 slot)
{
	__u64 *v = bpf_map_lookup_elem(&TURN_STATS, &slot);
	if (v)
		*v += 1;
}

// Ones'-complement arithmetic on 16-bit words as they lie in memory (the
// sum does not depend on byte order, RFC 1071 §2(B)).
static __always_inline __u32 fold(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return s;
}

static __always_inline __u32 sum32(__u32 s, __u32 w)
{
	return s + (w & 0xffff) + (w >> 16);
}

static __always_inline __u32 sub32(__u32 s, __u32 w)
{
	return sum32(s, ~w);
}

static __always_inline __u32 sum_addr6(__u32 s, const __u32 a[4])
{
#pragma unroll
	for (int i = 0; i < 4; i++)
		s = sum32(s, a[i]);
	return s;
}

static __always_inline __u32 sub_addr6(__u32 s, const __u32 a[4])
{
#pragma unroll
	for (int i = 0; i < 4; i++)
		s = sub32(s, a[i]);
	return s;
}

// The UDP checksum after `delta` (a ones'-complement sum of what was
// added, with what was taken away complemented) is applied to `check`.
// 0 (none) stays 0; a computed 0 is sent as 0xffff (RFC 768).
static __always_inline __u16 update_check(__u16 check, __u32 delta)
{
	if (check == 0)
		return 0;
	__u16 out = ~fold(sum32(delta, (__u16)~check));
	return out ? out : 0xffff;
}

// The pseudo-header part of a UDP sum (addresses summed by the caller):
// length and protocol, the same for both families when under 64 KiB.
static __always_inline __u32 sum_len_proto(__u32 s, __u16 ulen)
{
	return sum32(s, (__u32)bpf_htons(ulen) + bpf_htons(IPPROTO_UDP));
}

static __always_inline __u16 ip_checksum(struct iphdr *ip)
{
	__u32 sum = 0;
	__u16 *p = (__u16 *)ip;
	ip->check = 0;
#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += p[i];
	return ~fold(sum);
}

// ChannelData's header, as the UDP payload starts: channel and length.
struct cd_hdr {
	__u16 channel;
	__u16 len;
};

// What arrived as ChannelData: the channel and data length in host
// order, and the ones'-complement sum of the padding after the data, or
// -1 when it is not ChannelData the kernel forwards (short, too long for
// the datagram, or followed by more than 3 bytes: user space decides).
static __always_inline int channel_data(void *pl, void *end, __u16 ulen, __u16 *channel, __u16 *dlen,
					__u32 *padsum)
{
	struct cd_hdr *cd = pl;
	if ((void *)(cd + 1) > end || ulen < 12)
		return -1;
	unsigned char first = *(unsigned char *)pl;
	if ((first & 0xc0) != 0x40)
		return -1;
	*channel = bpf_ntohs(cd->channel);
	__u16 len = bpf_ntohs(cd->len);
	__u16 room = ulen - 12;
	if (len > room || room - len > 3)
		return -1;
	*dlen = len;
	// Padding bytes: each a high byte at an even offset from the UDP
	// header, a low one at an odd offset.
	__u32 s = 0;
	unsigned char *p = pl + 4 + (len & 0x7ff);
#pragma unroll
	for (int i = 0; i < 3; i++) {
		if (i < room - len) {
			if ((void *)(p + i + 1) > end)
				return -1;
			__u16 b = p[i];
			s += ((len + i) & 1) ? bpf_htons(b) : bpf_htons(b << 8);
		}
	}
	*padsum = s;
	return 0;
}

// No memcmp in BPF: six bytes compared one by one.
static __always_inline int same_mac(const unsigned char a[6], const unsigned char b[6])
{
	int same = 1;
#pragma unroll
	for (int i = 0; i < 6; i++)
		same &= a[i] == b[i];
	return same;
}

// Records where a packet of an installed flow came from (see TURN_NEIGH).
static __always_inline void learn(struct xdp_md *ctx, struct ethhdr *eth, __u32 family, const __u32 *ip,
				  __u64 now)
{
	struct neigh_key k = { .family = family };
	if (family == AF_INET) {
		k.ip[0] = ip[0];
	} else {
		__builtin_memcpy(k.ip, ip, 16);
	}
	__u32 ifindex = ctx->ingress_ifindex;
	struct neigh_val *v = bpf_map_lookup_elem(&TURN_NEIGH, &k);
	if (v && v->ifindex == ifindex && same_mac(v->remote, eth->h_source) && same_mac(v->local, eth->h_dest) &&
	    now - v->seen_ns < NEIGH_TOUCH_NS)
		return;
	struct neigh_val n = { .ifindex = ifindex, .seen_ns = now };
	__builtin_memcpy(n.remote, eth->h_source, 6);
	__builtin_memcpy(n.local, eth->h_dest, 6);
	bpf_map_update_elem(&TURN_NEIGH, &k, &n, BPF_ANY);
}

// The learned next hop toward fib's destination, for a host that does
// not forward: the ifindex, or 0 when none is fresh, it is not `oif` (the
// interface holding the source address), or the datagram is over its MTU.
static __always_inline int learned(struct bpf_fib_lookup *fib, __u32 oif, unsigned char smac[6],
				   unsigned char dmac[6])
{
	struct neigh_key k = { .family = fib->family };
	if (fib->family == AF_INET) {
		k.ip[0] = fib->ipv4_dst;
	} else {
		__builtin_memcpy(k.ip, fib->ipv6_dst, 16);
	}
	struct neigh_val *v = bpf_map_lookup_elem(&TURN_NEIGH, &k);
	if (!v || bpf_ktime_get_ns() - v->seen_ns > NEIGH_FRESH_NS || (oif && v->ifindex != oif))
		return 0;
	__u32 ifindex = v->ifindex;
	__u32 *mtu = bpf_map_lookup_elem(&TURN_MTU, &ifindex);
	if (!mtu || fib->tot_len > *mtu)
		return 0;
	__builtin_memcpy(smac, v->local, 6);
	__builtin_memcpy(dmac, v->remote, 6);
	return ifindex;
}

// Where a datagram leaves, and the MAC addresses to put on it; 0 when
// there is no usable route or neighbour, or the datagram is over the
// route's MTU (then the packet goes to user space untouched, which sends
// it the normal way: resolving the neighbour, fragmenting or answering
// with ICMP as it always does). The lookup is the one for a datagram this
// host sends (the relay is its sender, it forwards nothing), out of
// `oif`, the interface holding the source address. The kernel's table
// answers only for interfaces that forward the family; on the others
// (most hosts) the next hop is the one learned from the destination's own
// packets.
static __always_inline int route(struct xdp_md *ctx, struct bpf_fib_lookup *fib, __u32 oif,
				 unsigned char smac[6], unsigned char dmac[6])
{
	fib->l4_protocol = IPPROTO_UDP;
	fib->ifindex = oif;
	int rc = bpf_fib_lookup(ctx, fib, sizeof(*fib), BPF_FIB_LOOKUP_OUTPUT);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		__builtin_memcpy(smac, fib->smac, 6);
		__builtin_memcpy(dmac, fib->dmac, 6);
		return fib->ifindex;
	}
	if (rc == BPF_FIB_LKUP_RET_FWD_DISABLED) {
		int ifindex = learned(fib, oif, smac, dmac);
		if (ifindex)
			return ifindex;
	}
	count(2);
	return 0;
}

static __always_inline int send(struct xdp_md *ctx, int ifindex)
{
	count(0);
	// bpf_redirect even back out of the interface the packet came in on
	// (the one-NIC host: clients and peers on the same link), never
	// XDP_TX: on veth (kernel 6.18) every XDP_TX frame of this program was
	// lost while a redirect to the same ifindex delivered all of them
	// (tests/integration/fastpath.rs, one_nic_*). Drivers with native XDP implement
	// both; the redirect costs a devmap flush more.
	return bpf_redirect(ifindex, 0);
}

// Whether `check` is only the pseudo-header's sum (see the top).
static __always_inline int offload_left(__u16 check, __u32 addr_sum, __u16 ulen)
{
	if ((__u16)fold(sum_len_proto(addr_sum, ulen)) == check) {
		count(3);
		return 1;
	}
	return 0;
}

// Moves the packet's start by `head` (positive: shorter) and cuts it to
// `len` bytes; 0 on success.
static __always_inline int reshape(struct xdp_md *ctx, int head, __u32 len)
{
	if (bpf_xdp_adjust_head(ctx, head))
		return -1;
	long excess = (long)((void *)(long)ctx->data_end - (void *)(long)ctx->data) - (long)len;
	if (excess > 0 && bpf_xdp_adjust_tail(ctx, -(int)excess))
		return -1;
	return 0;
}

// Cuts the packet to `len` bytes (dropping ChannelData padding); 0 on
// success.
static __always_inline int trim(struct xdp_md *ctx, __u32 len)
{
	long excess = (long)((void *)(long)ctx->data_end - (void *)(long)ctx->data) - (long)len;
	if (excess > 0 && bpf_xdp_adjust_tail(ctx, -(int)excess))
		return -1;
	return 0;
}

// The checksum delta of one ChannelData rewritten into another (both
// legs on this server): the ports, lengths (pseudo-header and header),
// channel header and dropped padding; the caller adds the addresses.
static __always_inline __u32 hairpin_delta(__u32 d, __u16 sport, __u16 dport, __u16 ulen_be, struct cd_hdr cd,
					   __u32 padsum, __u16 nsport, __u16 ndport, __u16 nlen, struct cd_hdr ncd)
{
	d = sub32(d, sport | ((__u32)dport << 16));
	d = sub32(sub32(d, ulen_be), ulen_be);
	d = sub32(sub32(d, cd.channel | ((__u32)cd.len << 16)), padsum);
	d = sum32(d, nsport | ((__u32)ndport << 16));
	d = sum32(sum32(d, bpf_htons(nlen)), bpf_htons(nlen));
	return sum32(d, ncd.channel | ((__u32)ncd.len << 16));
}

// Both legs of a call on this server (two clients behind symmetric NATs,
// the usual relay-relay pair): client A's channel names a peer that is
// client B's relayed address here, and B has a channel bound to A's
// relayed address. Instead of a datagram from relay A to relay B (which
// the stack would deliver to B's socket, for user space to wrap again),
// A's ChannelData goes straight to client B as B's ChannelData, in one
// pass, counted on both entries as user space would count the two hops.
// `hv` is B's peer entry (relay B <- relay A).
static __always_inline int hairpin_v4(struct xdp_md *ctx, struct client_val *v, struct peer_val *hv, __u32 saddr,
				      __u32 daddr, __u16 sport, __u16 dport, __u16 ulen_be, __u16 check,
				      struct cd_hdr cd, __u16 dlen, __u32 padsum, __u64 now)
{
	if (now >= hv->expires_ns || hv->bytes + dlen > hv->limit)
		return XDP_PASS;
	unsigned char smac[6], dmac[6];
	struct bpf_fib_lookup fib = {};
	fib.family = AF_INET;
	fib.tot_len = 32 + dlen;
	fib.ipv4_src = hv->server_ip;
	fib.ipv4_dst = hv->client_ip;
	int ifindex = route(ctx, &fib, hv->ifindex, smac, dmac);
	if (!ifindex)
		return XDP_PASS;
	__u32 client_ip = hv->client_ip, server_ip = hv->server_ip;
	__u16 client_port = hv->client_port, server_port = hv->server_port;
	struct cd_hdr ncd = { bpf_htons(hv->channel), cd.len };
	__sync_fetch_and_add(&v->packets, 1);
	__sync_fetch_and_add(&v->bytes, dlen);
	__sync_fetch_and_add(&hv->packets, 1);
	__sync_fetch_and_add(&hv->bytes, dlen);
	__u16 nlen = 12 + dlen;
	__u32 d = sum32(sum32(sub32(sub32(0, saddr), daddr), server_ip), client_ip);
	d = hairpin_delta(d, sport, dport, ulen_be, cd, padsum, server_port, client_port, nlen, ncd);
	__u16 ncheck = update_check(check, d);
	if (trim(ctx, 14 + 20 + nlen))
		return XDP_DROP;
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct udphdr *udp = (void *)(ip + 1);
	struct cd_hdr *out = (void *)(udp + 1);
	if ((void *)(out + 1) > end)
		return XDP_DROP;
	__builtin_memcpy(eth->h_dest, dmac, 6);
	__builtin_memcpy(eth->h_source, smac, 6);
	ip->tot_len = bpf_htons(20 + nlen);
	ip->saddr = server_ip;
	ip->daddr = client_ip;
	ip->ttl = 64;
	ip->frag_off = 0;
	ip->check = ip_checksum(ip);
	udp->source = server_port;
	udp->dest = client_port;
	udp->len = bpf_htons(nlen);
	udp->check = ncheck;
	*out = ncd;
	return send(ctx, ifindex);
}

static __always_inline int relay_v4(struct xdp_md *ctx, struct ethhdr *eth, void *end, __u64 now)
{
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->ihl != 5 || ip->version != 4 || ip->protocol != IPPROTO_UDP)
		return XDP_PASS;
	// Fragments (MF or an offset): user space.
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
	void *pl = udp + 1;
	unsigned char smac[6], dmac[6];
	struct bpf_fib_lookup fib = {};
	fib.family = AF_INET;
	__u32 saddr = ip->saddr, daddr = ip->daddr;
	__u16 sport = udp->source, dport = udp->dest, check = udp->check;
	__u16 channel, dlen;
	__u32 padsum;

	// Client -> peer: ChannelData (first two bits 01, RFC 8656 §12.4).
	if (channel_data(pl, end, ulen, &channel, &dlen, &padsum) == 0) {
		struct client_key k = {
			.client_ip = saddr,
			.server_ip = daddr,
			.client_port = sport,
			.server_port = dport,
			.channel = channel,
		};
		struct client_val *v = bpf_map_lookup_elem(&TURN_CLIENTS, &k);
		if (v) {
			count(1);
			learn(ctx, eth, AF_INET, &saddr, now);
			if (now >= v->expires_ns || v->bytes + dlen > v->limit)
				return XDP_PASS;
			if (check && offload_left(check, sum32(sum32(0, saddr), daddr), ulen))
				return XDP_PASS;
			struct peer_key hk = {
				.relay_ip = v->peer_ip,
				.peer_ip = v->relay_ip,
				.relay_port = v->peer_port,
				.peer_port = v->relay_port,
			};
			struct peer_val *hv = bpf_map_lookup_elem(&TURN_PEERS, &hk);
			if (hv)
				return hairpin_v4(ctx, v, hv, saddr, daddr, sport, dport, udp->len, check,
						  *(struct cd_hdr *)pl, dlen, padsum, now);
			fib.tot_len = 28 + dlen;
			fib.ipv4_src = v->relay_ip;
			fib.ipv4_dst = v->peer_ip;
			int ifindex = route(ctx, &fib, v->ifindex, smac, dmac);
			if (!ifindex)
				return XDP_PASS;
			__u32 relay_ip = v->relay_ip, peer_ip = v->peer_ip;
			__u16 relay_port = v->relay_port, peer_port = v->peer_port;
			__u32 df = v->flags & 1;
			__sync_fetch_and_add(&v->packets, 1);
			__sync_fetch_and_add(&v->bytes, dlen);
			struct cd_hdr cd = *(struct cd_hdr *)pl;
			__u16 nlen = 8 + dlen;
			__u32 d = 0;
			d = sub32(sub32(d, saddr), daddr);
			d = sub32(d, sport | ((__u32)dport << 16));
			d = sub32(sub32(d, udp->len), udp->len); // pseudo-header and header
			d = sub32(sub32(d, cd.channel | ((__u32)cd.len << 16)), padsum);
			d = sum32(sum32(d, relay_ip), peer_ip);
			d = sum32(d, relay_port | ((__u32)peer_port << 16));
			d = sum32(sum32(d, bpf_htons(nlen)), bpf_htons(nlen));
			__u16 ncheck = update_check(check, d);
			struct iphdr ip0 = *ip;
			__u16 proto = eth->h_proto;
			// The payload stays where it is; the headers move 4 bytes on,
			// over the ChannelData header.
			if (reshape(ctx, 4, 14 + 28 + dlen))
				return XDP_DROP;
			void *data = (void *)(long)ctx->data;
			end = (void *)(long)ctx->data_end;
			eth = data;
			ip = (void *)(eth + 1);
			udp = (void *)(ip + 1);
			if ((void *)(udp + 1) > end)
				return XDP_DROP;
			__builtin_memcpy(eth->h_dest, dmac, 6);
			__builtin_memcpy(eth->h_source, smac, 6);
			eth->h_proto = proto;
			*ip = ip0;
			ip->tot_len = bpf_htons(20 + nlen);
			ip->saddr = relay_ip;
			ip->daddr = peer_ip;
			ip->ttl = 64;
			ip->frag_off = df ? bpf_htons(0x4000) : 0;
			ip->check = ip_checksum(ip);
			udp->source = relay_port;
			udp->dest = peer_port;
			udp->len = bpf_htons(nlen);
			udp->check = ncheck;
			return send(ctx, ifindex);
		}
	}

	// Peer -> client: a datagram to a relayed address from a bound peer.
	struct peer_key pk = {
		.relay_ip = daddr,
		.peer_ip = saddr,
		.relay_port = dport,
		.peer_port = sport,
	};
	struct peer_val *pv = bpf_map_lookup_elem(&TURN_PEERS, &pk);
	if (!pv)
		return XDP_PASS;
	count(1);
	learn(ctx, eth, AF_INET, &saddr, now);
	dlen = ulen - 8;
	// Room for the ChannelData header within the datagram limit user
	// space also keeps.
	if (now >= pv->expires_ns || dlen > 1400 || pv->bytes + dlen > pv->limit)
		return XDP_PASS;
	if (check && offload_left(check, sum32(sum32(0, saddr), daddr), ulen))
		return XDP_PASS;
	fib.tot_len = 32 + dlen;
	fib.ipv4_src = pv->server_ip;
	fib.ipv4_dst = pv->client_ip;
	int ifindex = route(ctx, &fib, pv->ifindex, smac, dmac);
	if (!ifindex)
		return XDP_PASS;
	__u32 client_ip = pv->client_ip, server_ip = pv->server_ip;
	__u16 client_port = pv->client_port, server_port = pv->server_port;
	channel = pv->channel;
	__sync_fetch_and_add(&pv->packets, 1);
	__sync_fetch_and_add(&pv->bytes, dlen);
	__u16 nlen = 12 + dlen;
	struct cd_hdr cd = { bpf_htons(channel), bpf_htons(dlen) };
	__u32 d = 0;
	d = sub32(sub32(d, saddr), daddr);
	d = sub32(d, sport | ((__u32)dport << 16));
	d = sub32(sub32(d, udp->len), udp->len);
	d = sum32(sum32(d, server_ip), client_ip);
	d = sum32(d, server_port | ((__u32)client_port << 16));
	d = sum32(sum32(d, bpf_htons(nlen)), bpf_htons(nlen));
	d = sum32(d, cd.channel | ((__u32)cd.len << 16));
	__u16 ncheck = update_check(check, d);
	struct iphdr ip0 = *ip;
	__u16 proto = eth->h_proto;
	if (reshape(ctx, -4, 14 + 20 + nlen))
		return XDP_PASS;
	void *data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	eth = data;
	ip = (void *)(eth + 1);
	udp = (void *)(ip + 1);
	struct cd_hdr *out = (void *)(udp + 1);
	if ((void *)(out + 1) > end)
		return XDP_DROP;
	__builtin_memcpy(eth->h_dest, dmac, 6);
	__builtin_memcpy(eth->h_source, smac, 6);
	eth->h_proto = proto;
	*ip = ip0;
	ip->tot_len = bpf_htons(20 + nlen);
	ip->saddr = server_ip;
	ip->daddr = client_ip;
	ip->ttl = 64;
	ip->frag_off = 0;
	ip->check = ip_checksum(ip);
	udp->source = server_port;
	udp->dest = client_port;
	udp->len = bpf_htons(nlen);
	udp->check = ncheck;
	*out = cd;
	return send(ctx, ifindex);
}

static __always_inline void write_ip6(struct ipv6hdr *ip, const __u32 src[4], const __u32 dst[4], __u16 plen)
{
	// Version 6, no traffic class or flow label: what the relay's own
	// socket would send.
	*(__u32 *)ip = bpf_htonl(0x60000000);
	ip->payload_len = bpf_htons(plen);
	ip->nexthdr = IPPROTO_UDP;
	ip->hop_limit = 64;
	__builtin_memcpy(&ip->saddr, src, 16);
	__builtin_memcpy(&ip->daddr, dst, 16);
}

// hairpin_v4 for IPv6.
static __always_inline int hairpin_v6(struct xdp_md *ctx, struct client_val6 *v, struct peer_val6 *hv,
				      const __u32 saddr[4], const __u32 daddr[4], __u16 sport, __u16 dport,
				      __u16 ulen_be, __u16 check, struct cd_hdr cd, __u16 dlen, __u32 padsum,
				      __u64 now)
{
	if (now >= hv->expires_ns || hv->bytes + dlen > hv->limit)
		return XDP_PASS;
	unsigned char smac[6], dmac[6];
	struct bpf_fib_lookup fib = {};
	fib.family = AF_INET6;
	fib.tot_len = 52 + dlen;
	__builtin_memcpy(fib.ipv6_src, hv->server_ip, 16);
	__builtin_memcpy(fib.ipv6_dst, hv->client_ip, 16);
	int ifindex = route(ctx, &fib, hv->ifindex, smac, dmac);
	if (!ifindex)
		return XDP_PASS;
	__u32 client_ip[4], server_ip[4];
	__builtin_memcpy(client_ip, hv->client_ip, 16);
	__builtin_memcpy(server_ip, hv->server_ip, 16);
	__u16 client_port = hv->client_port, server_port = hv->server_port;
	struct cd_hdr ncd = { bpf_htons(hv->channel), cd.len };
	__sync_fetch_and_add(&v->packets, 1);
	__sync_fetch_and_add(&v->bytes, dlen);
	__sync_fetch_and_add(&hv->packets, 1);
	__sync_fetch_and_add(&hv->bytes, dlen);
	__u16 nlen = 12 + dlen;
	__u32 d = sum_addr6(sum_addr6(sub_addr6(sub_addr6(0, saddr), daddr), server_ip), client_ip);
	d = hairpin_delta(d, sport, dport, ulen_be, cd, padsum, server_port, client_port, nlen, ncd);
	__u16 ncheck = update_check(check, d);
	if (trim(ctx, 14 + 40 + nlen))
		return XDP_DROP;
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip = (void *)(eth + 1);
	struct udphdr *udp = (void *)(ip + 1);
	struct cd_hdr *out = (void *)(udp + 1);
	if ((void *)(out + 1) > end)
		return XDP_DROP;
	__builtin_memcpy(eth->h_dest, dmac, 6);
	__builtin_memcpy(eth->h_source, smac, 6);
	write_ip6(ip, server_ip, client_ip, nlen);
	udp->source = server_port;
	udp->dest = client_port;
	udp->len = bpf_htons(nlen);
	udp->check = ncheck;
	*out = ncd;
	return send(ctx, ifindex);
}

static __always_inline int relay_v6(struct xdp_md *ctx, struct ethhdr *eth, void *end, __u64 now)
{
	struct ipv6hdr *ip = (void *)(eth + 1);
	// Extension headers (fragments among them): user space.
	if ((void *)(ip + 1) > end || ip->version != 6 || ip->nexthdr != IPPROTO_UDP)
		return XDP_PASS;
	struct udphdr *udp = (void *)(ip + 1);
	if ((void *)(udp + 1) > end)
		return XDP_PASS;
	__u16 ulen = bpf_ntohs(udp->len);
	// A checksum is mandatory over IPv6 (RFC 8200 §8.1).
	if (ulen < 8 || ulen > 1500 || bpf_ntohs(ip->payload_len) != ulen || udp->check == 0)
		return XDP_PASS;
	if ((void *)udp + ulen > end)
		return XDP_PASS;
	void *pl = udp + 1;
	unsigned char smac[6], dmac[6];
	struct bpf_fib_lookup fib = {};
	fib.family = AF_INET6;
	__u32 saddr[4], daddr[4];
	__builtin_memcpy(saddr, &ip->saddr, 16);
	__builtin_memcpy(daddr, &ip->daddr, 16);
	__u16 sport = udp->source, dport = udp->dest, check = udp->check;
	__u32 addr_sum = sum_addr6(sum_addr6(0, saddr), daddr);
	__u16 channel, dlen;
	__u32 padsum;

	if (channel_data(pl, end, ulen, &channel, &dlen, &padsum) == 0) {
		struct client_key6 k = {
			.client_port = sport,
			.server_port = dport,
			.channel = channel,
		};
		__builtin_memcpy(k.client_ip, saddr, 16);
		__builtin_memcpy(k.server_ip, daddr, 16);
		struct client_val6 *v = bpf_map_lookup_elem(&TURN_CLIENTS6, &k);
		if (v) {
			count(1);
			learn(ctx, eth, AF_INET6, saddr, now);
			if (now >= v->expires_ns || v->bytes + dlen > v->limit)
				return XDP_PASS;
			if (offload_left(check, addr_sum, ulen))
				return XDP_PASS;
			struct peer_key6 hk = {
				.relay_port = v->peer_port,
				.peer_port = v->relay_port,
			};
			__builtin_memcpy(hk.relay_ip, v->peer_ip, 16);
			__builtin_memcpy(hk.peer_ip, v->relay_ip, 16);
			struct peer_val6 *hv = bpf_map_lookup_elem(&TURN_PEERS6, &hk);
			if (hv)
				return hairpin_v6(ctx, v, hv, saddr, daddr, sport, dport, udp->len, check,
						  *(struct cd_hdr *)pl, dlen, padsum, now);
			fib.tot_len = 48 + dlen;
			__builtin_memcpy(fib.ipv6_src, v->relay_ip, 16);
			__builtin_memcpy(fib.ipv6_dst, v->peer_ip, 16);
			int ifindex = route(ctx, &fib, v->ifindex, smac, dmac);
			if (!ifindex)
				return XDP_PASS;
			__u32 relay_ip[4], peer_ip[4];
			__builtin_memcpy(relay_ip, v->relay_ip, 16);
			__builtin_memcpy(peer_ip, v->peer_ip, 16);
			__u16 relay_port = v->relay_port, peer_port = v->peer_port;
			__sync_fetch_and_add(&v->packets, 1);
			__sync_fetch_and_add(&v->bytes, dlen);
			struct cd_hdr cd = *(struct cd_hdr *)pl;
			__u16 nlen = 8 + dlen;
			__u32 d = sub_addr6(sub_addr6(0, saddr), daddr);
			d = sub32(d, sport | ((__u32)dport << 16));
			d = sub32(sub32(d, udp->len), udp->len);
			d = sub32(sub32(d, cd.channel | ((__u32)cd.len << 16)), padsum);
			d = sum_addr6(sum_addr6(d, relay_ip), peer_ip);
			d = sum32(d, relay_port | ((__u32)peer_port << 16));
			d = sum32(sum32(d, bpf_htons(nlen)), bpf_htons(nlen));
			__u16 ncheck = update_check(check, d);
			__u16 proto = eth->h_proto;
			if (reshape(ctx, 4, 14 + 48 + dlen))
				return XDP_DROP;
			void *data = (void *)(long)ctx->data;
			end = (void *)(long)ctx->data_end;
			eth = data;
			ip = (void *)(eth + 1);
			udp = (void *)(ip + 1);
			if ((void *)(udp + 1) > end)
				return XDP_DROP;
			__builtin_memcpy(eth->h_dest, dmac, 6);
			__builtin_memcpy(eth->h_source, smac, 6);
			eth->h_proto = proto;
			write_ip6(ip, relay_ip, peer_ip, nlen);
			udp->source = relay_port;
			udp->dest = peer_port;
			udp->len = bpf_htons(nlen);
			udp->check = ncheck;
			return send(ctx, ifindex);
		}
	}

	struct peer_key6 pk = {
		.relay_port = dport,
		.peer_port = sport,
	};
	__builtin_memcpy(pk.relay_ip, daddr, 16);
	__builtin_memcpy(pk.peer_ip, saddr, 16);
	struct peer_val6 *pv = bpf_map_lookup_elem(&TURN_PEERS6, &pk);
	if (!pv)
		return XDP_PASS;
	count(1);
	learn(ctx, eth, AF_INET6, saddr, now);
	dlen = ulen - 8;
	if (now >= pv->expires_ns || dlen > 1400 || pv->bytes + dlen > pv->limit)
		return XDP_PASS;
	if (offload_left(check, addr_sum, ulen))
		return XDP_PASS;
	fib.tot_len = 52 + dlen;
	__builtin_memcpy(fib.ipv6_src, pv->server_ip, 16);
	__builtin_memcpy(fib.ipv6_dst, pv->client_ip, 16);
	int ifindex = route(ctx, &fib, pv->ifindex, smac, dmac);
	if (!ifindex)
		return XDP_PASS;
	__u32 client_ip[4], server_ip[4];
	__builtin_memcpy(client_ip, pv->client_ip, 16);
	__builtin_memcpy(server_ip, pv->server_ip, 16);
	__u16 client_port = pv->client_port, server_port = pv->server_port;
	channel = pv->channel;
	__sync_fetch_and_add(&pv->packets, 1);
	__sync_fetch_and_add(&pv->bytes, dlen);
	__u16 nlen = 12 + dlen;
	struct cd_hdr cd = { bpf_htons(channel), bpf_htons(dlen) };
	__u32 d = sub_addr6(sub_addr6(0, saddr), daddr);
	d = sub32(d, sport | ((__u32)dport << 16));
	d = sub32(sub32(d, udp->len), udp->len);
	d = sum_addr6(sum_addr6(d, server_ip), client_ip);
	d = sum32(d, server_port | ((__u32)client_port << 16));
	d = sum32(sum32(d, bpf_htons(nlen)), bpf_htons(nlen));
	d = sum32(d, cd.channel | ((__u32)cd.len << 16));
	__u16 ncheck = update_check(check, d);
	__u16 proto = eth->h_proto;
	if (reshape(ctx, -4, 14 + 40 + nlen))
		return XDP_PASS;
	void *data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	eth = data;
	ip = (void *)(eth + 1);
	udp = (void *)(ip + 1);
	struct cd_hdr *out = (void *)(udp + 1);
	if ((void *)(out + 1) > end)
		return XDP_DROP;
	__builtin_memcpy(eth->h_dest, dmac, 6);
	__builtin_memcpy(eth->h_source, smac, 6);
	eth->h_proto = proto;
	write_ip6(ip, server_ip, client_ip, nlen);
	udp->source = server_port;
	udp->dest = client_port;
	udp->len = bpf_htons(nlen);
	udp->check = ncheck;
	*out = cd;
	return send(ctx, ifindex);
}

SEC("xdp")
int turn_fast(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return XDP_PASS;
	__u64 now = bpf_ktime_get_ns();
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		return relay_v4(ctx, eth, end, now);
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return relay_v6(ctx, eth, end, now);
	return XDP_PASS;
}

// For the far ends of veth pairs in tests and benchmarks: a device that
// receives redirected XDP frames needs an XDP program of its own.
SEC("xdp")
int pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
