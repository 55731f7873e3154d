/* Per-VM cumulative counters on a firewall's VM-facing interface (bcc, tc clsact).
 *
 * Attach with direct-action on both hooks of the interface that faces the VMs:
 *   ingress  frames the VMs send     -> key (source MAC, source IP), tx_*
 *   egress   frames sent to the VMs  -> key (destination MAC, destination IP), rx_*
 * Only IPv4 and IPv6 frames are counted (ARP, LLDP... are not); bytes are frame
 * bytes from the Ethernet header on, without FCS. A GSO/GRO aggregate counts as
 * the segments it stands for, with a header per segment, as on the wire.
 *
 * Maps (pinned by the loader under XFER_PIN_DIR, so counts survive detach,
 * re-attach and process restarts):
 *   xfer_ctr          what this datapath counted; written only here
 *   xfer_ctr_carried  header of the counts carried in by imports (see xfer_maps.h)
 *   xfer_ctr_pages    their table, in pages; both written only by user space
 *   xfer_ctr_imported bundle ids already imported (idempotent imports)
 * A VM's total is its xfer_ctr entry + its carried entry: user space never
 * read-modify-writes a value the datapath is incrementing, so an import cannot
 * lose a packet. This program does not use the carried maps; it declares them so
 * that attaching creates and pins them with the rest.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/pkt_cls.h>
#include "xfer_maps.h"

#ifndef XFER_PIN_DIR
#error "XFER_PIN_DIR must name the bpffs directory to pin the maps in (the loader sets it)"
#endif
/* TCP header byte 13 bits (uapi only has them as 32-bit words). */
#define TH_SYN 0x02
#define TH_ACK 0x10

#ifndef XFER_CTR_MAX
#define XFER_CTR_MAX 65536
#endif

BPF_TABLE_PINNED("hash", struct xfer_ctr_key, struct xfer_ctr_val, xfer_ctr, XFER_CTR_MAX,
		 XFER_PIN_DIR "/xfer_ctr");
/* Pages per half: room for XFER_CTR_MAX carried entries. */
#define XFER_CARRIED_HALF                                                                     \
	((XFER_CTR_MAX * (sizeof(struct xfer_ctr_key) + sizeof(struct xfer_ctr_val)) +        \
	  XFER_CARRIED_PAGE - 1) / XFER_CARRIED_PAGE)
BPF_TABLE_PINNED("array", __u32, struct xfer_ctr_carried, xfer_ctr_carried, 1,
		 XFER_PIN_DIR "/xfer_ctr_carried");
BPF_TABLE_PINNED("array", __u32, struct xfer_ctr_page, xfer_ctr_pages, 2 * XFER_CARRIED_HALF,
		 XFER_PIN_DIR "/xfer_ctr_pages");
BPF_TABLE_PINNED("lru_hash", struct xfer_bundle_id, __u64, xfer_ctr_imported, 65536,
		 XFER_PIN_DIR "/xfer_ctr_imported");

struct parsed {
	__u32 hdr_len;  /* Ethernet + IP + L4 header bytes, repeated in each GSO segment */
	__u8 tcp_flags; /* TCP byte 13 (CWR..FIN); 0 when not TCP */
};

/* Fill the key from the frame's source (tx) or destination (rx) addresses.
 * Returns 0 for IPv4/IPv6 frames, -1 for anything else. */
static __always_inline int parse(struct __sk_buff *skb, int tx, struct xfer_ctr_key *key,
				 struct parsed *p)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u8 proto;
	__u32 l4;

	if ((void *)(eth + 1) > end)
		return -1;
	__builtin_memcpy(key->mac, tx ? eth->h_source : eth->h_dest, ETH_ALEN);

	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > end)
			return -1;
		key->family = XFER_FAMILY_IPV4;
		__builtin_memcpy(key->addr, tx ? &ip->saddr : &ip->daddr, 4);
		proto = ip->protocol;
		l4 = sizeof(*eth) + ip->ihl * 4;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > end)
			return -1;
		key->family = XFER_FAMILY_IPV6;
		__builtin_memcpy(key->addr, tx ? &ip6->saddr : &ip6->daddr, 16);
		/* Extension headers are not walked: a TCP segment behind one is
		 * counted, but its SYN is not seen. */
		proto = ip6->nexthdr;
		l4 = sizeof(*eth) + sizeof(*ip6);
	} else {
		return -1;
	}

	p->hdr_len = l4;
	p->tcp_flags = 0;
	if (proto == IPPROTO_TCP) {
		struct tcphdr *tcp = data + l4;

		if ((void *)(tcp + 1) <= end) {
			p->tcp_flags = ((__u8 *)tcp)[13];
			p->hdr_len = l4 + tcp->doff * 4;
		}
	} else if (proto == IPPROTO_UDP) {
		p->hdr_len = l4 + 8;
	}
	return 0;
}

static __always_inline int count(struct __sk_buff *skb, int tx)
{
	struct xfer_ctr_key key = {};
	struct parsed p = {};
	struct xfer_ctr_val *val;
	__u64 segs, bytes;

	if (parse(skb, tx, &key, &p) < 0)
		return TC_ACT_UNSPEC;

	segs = skb->gso_segs > 1 ? skb->gso_segs : 1;
	bytes = skb->len + (segs - 1) * p.hdr_len;

	val = xfer_ctr.lookup(&key);
	if (!val) {
		struct xfer_ctr_val zero = {};

		/* NOEXIST: when both CPUs see a new key at once, one insert wins and
		 * both add to it below. */
		xfer_ctr.insert(&key, &zero);
		val = xfer_ctr.lookup(&key);
		if (!val)
			return TC_ACT_UNSPEC; /* map full: the frame goes uncounted */
	}
	/* Atomic adds keep counts exact with traffic on every CPU at once. */
	if (tx) {
		__sync_fetch_and_add(&val->tx_packets, segs);
		__sync_fetch_and_add(&val->tx_bytes, bytes);
		if ((p.tcp_flags & (TH_SYN | TH_ACK)) == TH_SYN)
			__sync_fetch_and_add(&val->tcp_initiated, 1);
		else if ((p.tcp_flags & (TH_SYN | TH_ACK)) ==
			 (TH_SYN | TH_ACK))
			__sync_fetch_and_add(&val->tcp_accepted, 1);
	} else {
		__sync_fetch_and_add(&val->rx_packets, segs);
		__sync_fetch_and_add(&val->rx_bytes, bytes);
	}
	/* NOTE: in direct-action mode TC_ACT_OK ends classification on this hook,
	 * so filters after ours (DHCP snooping, IP source guard) would never run.
	 * TC_ACT_UNSPEC passes the frame on to the next filter. */
	return TC_ACT_UNSPEC;
}

int xfer_ctr_ingress(struct __sk_buff *skb)
{
	return count(skb, 1);
}

int xfer_ctr_egress(struct __sk_buff *skb)
{
	return count(skb, 0);
}
