/* DHCP snooping, IP source guard and ARP inspection on tc ingress (bcc dialect).
 *
 * One program serves every port of a device; `ports` says whether the ingress
 * port is trusted (towards the DHCP server) or untrusted (towards VMs).
 * DHCP is parsed here, in the datapath, so a DHCPACK installs its binding before
 * the ACK itself is forwarded: the client can use its address at once.
 *
 * Compiled with -DDS_PIN_DIR="/run/xfer/bpf/<netns>/dhcpsnoop" so that a reload
 * (or a new process) reuses the pinned maps and keeps every binding.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/errno.h>
#include "dhcpsnoop.h"

#ifndef DS_PIN_DIR
#error "DS_PIN_DIR must be defined (the device's pin directory)"
#endif
/* Let the next filter on the hook (counters) run: TC_ACT_OK would end the chain. */
#define PASS TC_ACT_UNSPEC
#define MAX_BINDINGS 4096       /* the table's size (docs/dhcp.md; store.TABLE_SIZE) */
#define MAX_PORTS 256
#define MAX_OPTIONS 64          /* options walked per message before giving up */
#define DHCP_FIXED 236          /* op..file, before the magic cookie */
#define DHCP_MAGIC 0x63825363

BPF_TABLE_PINNED("hash", struct binding_key, struct binding, bindings, MAX_BINDINGS,
                 DS_PIN_DIR "/bindings");
/* the address a MAC was last granted by DHCP, to replace or NAK it */
BPF_TABLE_PINNED("hash", struct mac_key, __u32, dhcp_by_mac, MAX_BINDINGS, DS_PIN_DIR "/dhcp_by_mac");
/* the port a client MAC sent DHCP from: the port of the binding its ACK creates */
BPF_TABLE_PINNED("lru_hash", struct mac_key, struct client_port, clients, MAX_BINDINGS,
                 DS_PIN_DIR "/clients");
BPF_TABLE_PINNED("hash", __u32, struct port_cfg, ports, MAX_PORTS, DS_PIN_DIR "/ports");
BPF_TABLE_PINNED("hash", struct stat_key, __u64, stats, MAX_PORTS * DS_COUNTER_MAX,
                 DS_PIN_DIR "/stats");
/* Bindings held per port (ifindex; 0 = imported for "any port", not yet pinned) is the sum
 * of two counts: port_bound, changed only here with atomic adds, and port_bound_adj, changed
 * only by user space (under a lock) when it adds or removes bindings. Neither writer can
 * lose the other's update, and the datapath never scans the table to know a port's usage. */
BPF_TABLE_PINNED("hash", __u32, __u64, port_bound, MAX_PORTS + 1, DS_PIN_DIR "/port_bound");
BPF_TABLE_PINNED("hash", __u32, __u64, port_bound_adj, MAX_PORTS + 1,
                 DS_PIN_DIR "/port_bound_adj");
/* the last binding each port was refused, for the log line (serve.py) */
BPF_TABLE_PINNED("hash", __u32, struct refusal, refusals, MAX_PORTS, DS_PIN_DIR "/refusals");

struct dhcp_info {
    __u8  op;
    __u8  msg_type;         /* option 53; 0 = absent (plain BOOTP) */
    __u8  overload;         /* option 52 seen */
    __u8  have_lease;
    __u32 lease_s;          /* option 51 */
    __u32 requested;        /* option 50 */
    __u32 ciaddr;
    __u32 yiaddr;
    __u8  chaddr[6];
};

static __always_inline void mac_copy(__u8 *dst, const __u8 *src)
{
    __builtin_memcpy(dst, src, 6);
}

static __always_inline int mac_eq(const __u8 *a, const __u8 *b)
{
    return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] &&
           a[5] == b[5];
}

/* Counters are created at 0 first: insert (NOEXIST) keeps a racing creator's value, so
 * two CPUs' first adds are both counted. (bcc allows no map calls inside a macro.) */
static __always_inline void count(__u32 ifindex, __u32 counter)
{
    struct stat_key k = {.ifindex = ifindex, .counter = counter};
    __u64 zero = 0, *v = stats.lookup(&k);
    if (!v) {
        stats.insert(&k, &zero);
        v = stats.lookup(&k);
    }
    if (v)
        __sync_fetch_and_add(v, 1);
}

static __always_inline void bound_add(__u32 ifindex, __s64 delta)
{
    __u64 zero = 0, *v = port_bound.lookup(&ifindex);
    if (!v) {
        port_bound.insert(&ifindex, &zero);
        v = port_bound.lookup(&ifindex);
    }
    if (v)
        __sync_fetch_and_add(v, delta);
}

/* Take a place for one more binding on the port; 0 when it is at its limit. */
static __always_inline int admit(__u32 port)
{
    __u32 limit = DS_DEFAULT_MAX_BINDINGS;
    struct port_cfg *cfg = ports.lookup(&port);
    if (cfg && cfg->max_bindings)
        limit = cfg->max_bindings;
    __u64 zero = 0, adj = 0, *a = port_bound_adj.lookup(&port);
    if (a)
        adj = *a;
    __u64 *v = port_bound.lookup(&port);
    if (!v) {
        port_bound.insert(&port, &zero);
        v = port_bound.lookup(&port);
        if (!v)
            return 0;
    }
    /* fetch-and-add, then check: two CPUs can never both take the last place */
    __u64 before = __sync_fetch_and_add(v, 1);
    if (limit != DS_NO_PORT_LIMIT && (__s64)(before + adj) >= (__s64)limit) {
        __sync_fetch_and_add(v, -1);
        return 0;
    }
    return 1;
}

/* Count a binding refused for a client on `port` and remember it for the log line. */
static __always_inline void refuse(__u32 port, struct binding_key *k, __u32 counter)
{
    struct refusal r = {};
    r.when_ns = bpf_ktime_get_boot_ns();
    mac_copy(r.mac, k->mac);
    r.counter = counter;
    r.ip = k->ip;
    refusals.update(&port, &r);
    count(port, counter);
}

/* Delete a binding (and the MAC's DHCP address when it is this one); 1 when this call did. */
static __always_inline int drop_binding(struct binding_key *k)
{
    struct binding *b = bindings.lookup(k);
    if (!b)
        return 0;
    __u32 port = b->ifindex;
    if (bindings.delete(k) != 0)
        return 0;                           /* someone else deleted it first */
    bound_add(port, -1);
    struct mac_key mk = {};
    mac_copy(mk.mac, k->mac);
    __u32 *cur = dhcp_by_mac.lookup(&mk);
    if (cur && *cur == k->ip)
        dhcp_by_mac.delete(&mk);
    return 1;
}

/* The ifindex and lease_s of struct binding share one aligned 8-byte word. */
union port_word {
    __u64 word;
    struct {
        __u32 ifindex;
        __u32 lease_s;
    };
};

/* Pin a binding imported for "any port" to the port of its first packet, once.
 * NOTE: BPF has compare-and-swap on 64 bits only (32-bit atomics need -mcpu=v3, which
 * bcc 0.26 does not pass), so swap the word that holds ifindex and lease_s. */
static __always_inline void pin_port(struct binding *b, __u32 ifindex)
{
    __u64 *word = (__u64 *)&b->ifindex;
    union port_word old = {.word = *word};
    if (old.ifindex != 0)
        return;
    union port_word pinned = old;
    pinned.ifindex = ifindex;
    if (__sync_val_compare_and_swap(word, old.word, pinned.word) == old.word) {
        bound_add(0, -1);
        bound_add(ifindex, 1);
    }
}

/* Is (mac, ip) bound to this port and VLAN, and unexpired? Expired bindings are deleted. */
static __always_inline int bound(const __u8 *mac, __u32 ip, __u32 ifindex, __u16 vlan)
{
    struct binding_key k = {};
    mac_copy(k.mac, mac);
    k.ip = ip;
    struct binding *b = bindings.lookup(&k);
    if (!b)
        return 0;
    if (b->expires_ns && bpf_ktime_get_boot_ns() >= b->expires_ns) {
        if (drop_binding(&k))
            count(ifindex, DS_EXPIRED);
        return 0;
    }
    if (b->vlan != vlan)
        return 0;
    if (b->ifindex == 0)
        pin_port(b, ifindex);   /* imported without a port: the VM's first packet pins it */
    return b->ifindex == ifindex;
}

static __always_inline int verdict(__u32 ifindex, struct port_cfg *cfg, __u32 counter)
{
    if (cfg->mode == DS_MODE_OBSERVE) {
        count(ifindex, DS_OBSERVED);
        count(ifindex, counter);
        return PASS;
    }
    count(ifindex, counter);
    return TC_ACT_SHOT;
}

/* Parse the fixed header and the options field. Returns 0, or -1 when malformed.
 * Only options 50, 51, 52 and 53 are read; sname/file (overload) are not. */
static __always_inline int parse_dhcp(struct __sk_buff *skb, __u32 off, __u32 end,
                                      struct dhcp_info *d)
{
    __u8 fixed[34];
    __u32 magic;

    if (off + DHCP_FIXED + 4 > end)
        return -1;
    if (bpf_skb_load_bytes(skb, off, fixed, sizeof(fixed)) < 0)
        return -1;
    if (fixed[1] != 1 || fixed[2] != 6)     /* htype Ethernet, hlen 6 */
        return -1;
    d->op = fixed[0];
    __builtin_memcpy(&d->ciaddr, &fixed[12], 4);
    __builtin_memcpy(&d->yiaddr, &fixed[16], 4);
    mac_copy(d->chaddr, &fixed[28]);
    if (bpf_skb_load_bytes(skb, off + DHCP_FIXED, &magic, 4) < 0 || magic != bpf_htonl(DHCP_MAGIC))
        return -1;

    __u32 pos = off + DHCP_FIXED + 4;
    for (int i = 0; i < MAX_OPTIONS; i++) {
        __u8 h[2];
        if (pos >= end)
            return -1;                      /* no END option */
        if (bpf_skb_load_bytes(skb, pos, h, 1) < 0)
            return -1;
        if (h[0] == 0) {                    /* PAD */
            pos += 1;
            continue;
        }
        if (h[0] == 255)                    /* END */
            return 0;
        if (pos + 2 > end || bpf_skb_load_bytes(skb, pos, h, 2) < 0)
            return -1;                      /* code without length */
        __u32 len = h[1];
        if (pos + 2 + len > end)
            return -1;                      /* value runs past the message */
        if (h[0] == 53) {
            if (len != 1 || bpf_skb_load_bytes(skb, pos + 2, &d->msg_type, 1) < 0)
                return -1;
        } else if (h[0] == 51) {
            __u32 v;
            if (len != 4 || bpf_skb_load_bytes(skb, pos + 2, &v, 4) < 0)
                return -1;
            d->lease_s = bpf_ntohl(v);
            d->have_lease = 1;
        } else if (h[0] == 50) {
            if (len != 4 || bpf_skb_load_bytes(skb, pos + 2, &d->requested, 4) < 0)
                return -1;
        } else if (h[0] == 52) {
            d->overload = 1;
        }
        pos += 2 + len;
    }
    return -1;                              /* too many options */
}

static __always_inline void unbind(struct binding_key *k, __u32 ifindex)
{
    if (drop_binding(k))
        count(ifindex, DS_BINDING_REMOVED);
}

/* A server message on the trusted port: ACK binds, NAK unbinds. */
static __always_inline void server_message(struct __sk_buff *skb, __u32 off, __u32 end,
                                           __u32 ifindex)
{
    struct dhcp_info d = {};
    if (parse_dhcp(skb, off, end, &d) < 0 || d.op != 2 || d.overload) {
        count(ifindex, DS_MALFORMED);       /* overload: lease may hide in sname/file */
        return;
    }
    struct mac_key mk = {};
    mac_copy(mk.mac, d.chaddr);
    __u32 *prev = dhcp_by_mac.lookup(&mk);
    struct binding_key k = {};
    mac_copy(k.mac, d.chaddr);

    if (d.msg_type == 6) {                  /* DHCPNAK: the client must not use its address */
        if (prev) {
            k.ip = *prev;
            unbind(&k, ifindex);
        }
        return;
    }
    if (d.msg_type != 5 || !d.have_lease || d.yiaddr == 0)
        return;                             /* not an ACK granting a lease (e.g. INFORM's) */
    struct client_port *cp = clients.lookup(&mk);
    if (!cp) {
        count(ifindex, DS_ACK_NO_CLIENT);
        return;
    }
    __u32 port = cp->ifindex;               /* copied: an LRU entry can be reused under us */
    __u16 vlan = cp->vlan;
    if (prev && *prev != d.yiaddr) {        /* a new address replaces the old one */
        k.ip = *prev;
        unbind(&k, ifindex);
    }
    __u64 expires = d.lease_s == 0xffffffff ? 0
                    : bpf_ktime_get_boot_ns() + (__u64)d.lease_s * 1000000000ULL;
    k.ip = d.yiaddr;
    struct binding *cur = bindings.lookup(&k);
    if (cur) {                              /* a renewal: refresh in place */
        __u32 was = cur->ifindex;
        if (was != port) {                  /* the client speaks from another port now */
            if (was != 0 && !admit(port)) {
                drop_binding(&k);           /* expired there (else its DHCP was dropped) */
                refuse(port, &k, DS_BINDING_REFUSED_PORT_LIMIT);
                return;
            }
            if (was == 0)
                bound_add(port, 1);         /* an imported binding, placed like a pin */
            bound_add(was, -1);
            cur->ifindex = port;
        }
        cur->vlan = vlan;
        cur->lease_s = d.lease_s;
        cur->flags = DS_FLAG_DHCP;
        cur->expires_ns = expires;
        dhcp_by_mac.update(&mk, &d.yiaddr);
        count(ifindex, DS_BINDING_RENEWED);
        return;
    }
    if (!admit(port)) {
        refuse(port, &k, DS_BINDING_REFUSED_PORT_LIMIT);
        return;
    }
    struct binding b = {};
    b.ifindex = port;
    b.vlan = vlan;
    b.lease_s = d.lease_s;
    b.flags = DS_FLAG_DHCP;
    b.expires_ns = expires;
    /* insert (NOEXIST): a full table says E2BIG here instead of being written over */
    int err = bindings.insert(&k, &b);
    if (err != 0) {
        bound_add(port, -1);
        if (err == -EEXIST)                 /* the same ACK's twin won the race on another CPU */
            count(ifindex, DS_BINDING_RENEWED);
        else
            refuse(port, &k, DS_BINDING_REFUSED_TABLE_FULL);
        return;
    }
    if (dhcp_by_mac.update(&mk, &d.yiaddr) != 0) {
        drop_binding(&k);                   /* a binding NAK and RELEASE could not find */
        refuse(port, &k, DS_BINDING_REFUSED_TABLE_FULL);
        return;
    }
    count(ifindex, DS_BINDING_ADDED);
}

/* False when (mac, ip) is bound, unexpired, to another port or VLAN than this one. */
static __always_inline int not_bound_elsewhere(struct binding_key *k, __u32 ifindex, __u16 vlan)
{
    struct binding *b = bindings.lookup(k);
    if (!b || (b->expires_ns && bpf_ktime_get_boot_ns() >= b->expires_ns))
        return 1;
    return (b->ifindex == 0 || b->ifindex == ifindex) && b->vlan == vlan;
}

/* A client message on an untrusted port that already passed the source guard. */
static __always_inline int client_message(struct __sk_buff *skb, __u32 off, __u32 end,
                                          __u32 ifindex, __u16 vlan, const __u8 *src_mac,
                                          struct port_cfg *cfg)
{
    struct dhcp_info d = {};
    if (parse_dhcp(skb, off, end, &d) < 0 || d.op != 1) {
        count(ifindex, DS_MALFORMED);
        return PASS;                   /* the server judges it; no state changes */
    }
    if (!mac_eq(d.chaddr, src_mac))
        return verdict(ifindex, cfg, DS_DROP_CHADDR);
    struct binding_key k = {};
    mac_copy(k.mac, d.chaddr);
    /* A MAC bound on another port (or VLAN) may not speak DHCP here: else anyone who
     * copies a VM's MAC could RELEASE its binding, or REQUEST its address and have
     * the server's ACK move the binding to the copier's port. */
    struct mac_key own = {};
    mac_copy(own.mac, d.chaddr);
    __u32 *leased = dhcp_by_mac.lookup(&own);
    if (leased) {
        k.ip = *leased;
        if (!not_bound_elsewhere(&k, ifindex, vlan))
            return verdict(ifindex, cfg, DS_DROP_PORT_MISMATCH);
    }
    if (d.msg_type == 4 || d.msg_type == 7) {   /* the binding it ends must be this port's */
        k.ip = d.msg_type == 4 ? d.requested : d.ciaddr;
        if (!not_bound_elsewhere(&k, ifindex, vlan))
            return verdict(ifindex, cfg, DS_DROP_PORT_MISMATCH);
    }
    count(ifindex, DS_DHCP_CLIENT);
    switch (d.msg_type) {
    case 1: case 3: case 8: {               /* DISCOVER, REQUEST, INFORM: learn the port */
        struct mac_key mk = {};
        struct client_port cp = {.ifindex = ifindex, .vlan = vlan};
        mac_copy(mk.mac, d.chaddr);
        clients.update(&mk, &cp);
        break;
    }
    case 4:                                 /* DECLINE: the requested address is in use */
        k.ip = d.requested;
        unbind(&k, ifindex);
        break;
    case 7:                                 /* RELEASE */
        k.ip = d.ciaddr;
        unbind(&k, ifindex);
        break;
    }
    return PASS;
}

int dhcpsnoop_ingress(struct __sk_buff *skb)
{
    __u32 ifindex = skb->ifindex;
    struct port_cfg *cfg = ports.lookup(&ifindex);
    if (!cfg)
        return PASS;

    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return PASS;
    __u8 src_mac[6];
    mac_copy(src_mac, eth->h_source);
    __u16 proto = eth->h_proto;
    __u32 off = sizeof(*eth);
    __u16 vlan = 0;
    /* NOTE: veth and most NICs strip the 802.1Q tag into skb metadata before tc
     * ingress; only an unaccelerated tag is still in the packet. */
    if (skb->vlan_present) {
        vlan = skb->vlan_tci & 0x0fff;
    } else if (proto == bpf_htons(ETH_P_8021Q)) {
        __u16 *tag = (void *)(eth + 1);
        if ((void *)(tag + 2) > data_end)
            return cfg->role == DS_ROLE_TRUSTED ? PASS : verdict(ifindex, cfg, DS_DROP_SOURCE);
        vlan = bpf_ntohs(tag[0]) & 0x0fff;
        proto = tag[1];
        off += 4;
    }

    if (proto == bpf_htons(ETH_P_ARP)) {
        if (cfg->role == DS_ROLE_TRUSTED)
            return PASS;
        __u8 arp[28];
        if (bpf_skb_load_bytes(skb, off, arp, sizeof(arp)) < 0)
            return verdict(ifindex, cfg, DS_DROP_ARP);
        /* Ethernet/IPv4 only: htype 1, ptype 0x0800, hlen 6, plen 4 */
        if (arp[0] != 0 || arp[1] != 1 || arp[2] != 8 || arp[3] != 0 || arp[4] != 6 || arp[5] != 4)
            return verdict(ifindex, cfg, DS_DROP_ARP);
        __u32 spa;
        __builtin_memcpy(&spa, &arp[14], 4);
        if (!mac_eq(&arp[8], src_mac))
            return verdict(ifindex, cfg, DS_DROP_ARP);
        if (spa == 0)                       /* RFC 5227 probe: a client checking its lease */
            return PASS;
        if (!bound(&arp[8], spa, ifindex, vlan))
            return verdict(ifindex, cfg, DS_DROP_ARP);
        count(ifindex, DS_PASSED);
        return PASS;
    }
    if (proto != bpf_htons(ETH_P_IP))
        return PASS;                   /* IPv6 and others are not guarded (docs/dhcp.md) */

    struct iphdr ip;
    if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0)
        return cfg->role == DS_ROLE_TRUSTED ? PASS : verdict(ifindex, cfg, DS_DROP_SOURCE);
    __u32 ihl = ip.ihl * 4;
    __u32 l4 = off + ihl;
    __u32 ip_end = off + bpf_ntohs(ip.tot_len);
    int first_udp = ip.protocol == IPPROTO_UDP && ihl >= 20 &&
                    (ip.frag_off & bpf_htons(0x1fff)) == 0;
    struct udphdr udp = {};
    __u32 dhcp_end = 0;
    if (first_udp && bpf_skb_load_bytes(skb, l4, &udp, sizeof(udp)) == 0) {
        dhcp_end = l4 + bpf_ntohs(udp.len);
        if (dhcp_end > ip_end || dhcp_end > skb->len)
            dhcp_end = 0;                   /* lengths disagree: treat as malformed */
    } else {
        first_udp = 0;
    }
    __u32 dhcp_off = l4 + sizeof(udp);

    if (cfg->role == DS_ROLE_TRUSTED) {
        if (first_udp && udp.source == bpf_htons(67) && udp.dest == bpf_htons(68)) {
            if (dhcp_end)
                server_message(skb, dhcp_off, dhcp_end, ifindex);
            else
                count(ifindex, DS_MALFORMED);
        }
        return PASS;
    }

    /* untrusted port */
    if (first_udp && udp.source == bpf_htons(67))
        return verdict(ifindex, cfg, DS_DROP_ROGUE_SERVER);
    int dhcp_client = first_udp && udp.source == bpf_htons(68) && udp.dest == bpf_htons(67);
    if (!(dhcp_client && ip.saddr == 0) && !bound(src_mac, ip.saddr, ifindex, vlan))
        return verdict(ifindex, cfg, DS_DROP_SOURCE);
    if (!dhcp_client)
        return PASS;    /* not counted: a shared counter costs ~70 of ~220 ns per packet */
    if (!dhcp_end) {
        count(ifindex, DS_MALFORMED);
        return PASS;
    }
    return client_message(skb, dhcp_off, dhcp_end, ifindex, vlan, src_mac, cfg);
}
