/* Structs shared by dhcpsnoop.bpf.c and xfer/dhcpsnoop/abi.py (ctypes mirror).
 * Sizes and offsets are checked by tests/test_dhcp_abi.py; change both sides together.
 * Addresses are kept in network byte order, as they sit in the packet.
 */
#ifndef XFER_DHCPSNOOP_H
#define XFER_DHCPSNOOP_H

/* port roles (struct port_cfg.role) */
#define DS_ROLE_TRUSTED   1
#define DS_ROLE_UNTRUSTED 2
/* port modes (struct port_cfg.mode) */
#define DS_MODE_ENFORCE 0
#define DS_MODE_OBSERVE 1
/* Bindings a port may hold when its port_cfg.max_bindings is 0 (the C side's default;
 * `xfer dhcp attach --max-bindings` writes the configured value). */
#define DS_DEFAULT_MAX_BINDINGS 16
#define DS_NO_PORT_LIMIT 0xffff    /* max_bindings: no per-port limit (the table's size holds) */
/* binding flags */
#define DS_FLAG_DHCP   1   /* learned from a DHCPACK (or imported as such) */
#define DS_FLAG_STATIC 2   /* added by an operator; never expires unless given a lease */

/* counters, per port (struct stat_key.counter) */
enum ds_counter {
    DS_PASSED = 0,          /* untrusted-port ARP that matched a binding (IPv4 passes are
                             * not counted: per-VM counts are the counters program's job) */
    DS_DROP_SOURCE,         /* IPv4 whose (source MAC, source IP) is not bound */
    DS_DROP_ARP,            /* ARP whose sender MAC/IP is not bound */
    DS_DROP_ROGUE_SERVER,   /* DHCP server message on an untrusted port */
    DS_DROP_CHADDR,         /* DHCP client message whose chaddr is not its source MAC */
    DS_OBSERVED,            /* would have been dropped, port in observe mode */
    DS_BINDING_ADDED,       /* DHCPACK stored a new binding */
    DS_BINDING_REMOVED,     /* RELEASE, DECLINE, NAK or a new address removed a binding */
    DS_EXPIRED,             /* an expired binding met a packet and this packet deleted it */
    DS_MALFORMED,           /* DHCP message that could not be parsed: ignored */
    DS_ACK_NO_CLIENT,       /* DHCPACK for a client never seen on an untrusted port */
    DS_DHCP_CLIENT,         /* DHCP client messages let through on untrusted ports */
    DS_DROP_PORT_MISMATCH,  /* DHCP client message for a MAC/IP bound on another port/VLAN */
    DS_BINDING_RENEWED,     /* DHCPACK refreshed a binding that was stored already */
    DS_BINDING_REFUSED_PORT_LIMIT,  /* DHCPACK not bound: the client's port is at its limit */
    DS_BINDING_REFUSED_TABLE_FULL,  /* DHCPACK not bound: the binding table is full */
    DS_COUNTER_MAX,
};

struct binding_key {
    __u8  mac[6];
    __u16 pad;
    __u32 ip;               /* IPv4, network order */
};

struct binding {
    __u64 expires_ns;       /* CLOCK_BOOTTIME (bpf_ktime_get_boot_ns); 0 = never */
    __u32 ifindex;          /* client's port; 0 = any untrusted port, pinned by its first packet */
    __u32 lease_s;          /* lease as granted, informational */
    __u16 vlan;             /* 0 = untagged */
    __u8  flags;            /* DS_FLAG_* */
    __u8  pad[5];
};

struct mac_key {
    __u8  mac[6];
    __u16 pad;
};

struct client_port {        /* where a DHCP client was last heard */
    __u32 ifindex;
    __u16 vlan;
    __u16 pad;
};

struct port_cfg {
    __u8  role;             /* DS_ROLE_* */
    __u8  mode;             /* DS_MODE_* */
    __u16 max_bindings;     /* 0: DS_DEFAULT_MAX_BINDINGS; DS_NO_PORT_LIMIT: none */
};

/* The last binding a port was refused (the snooper loop logs it with the counter). */
struct refusal {
    __u64 when_ns;          /* CLOCK_BOOTTIME */
    __u8  mac[6];
    __u16 counter;          /* DS_BINDING_REFUSED_* */
    __u32 ip;               /* network order */
    __u32 pad;
};

struct stat_key {
    __u32 ifindex;
    __u32 counter;          /* enum ds_counter */
};

#endif
