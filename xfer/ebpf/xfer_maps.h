/* Structs shared by xfer's tc programs and their Python mirrors.
 *
 * Python mirrors each struct with ctypes (xfer/ebpf/counter_maps.py);
 * tests/test_counters_layout.py compares sizes and offsets with what clang
 * compiles here, so change both sides together.
 *
 * Fields are laid out without implicit padding: explicit pad bytes are zero so
 * that hash keys compare equal byte for byte.
 */
#ifndef XFER_MAPS_H
#define XFER_MAPS_H

#define XFER_FAMILY_IPV4 4
#define XFER_FAMILY_IPV6 6

/* One (MAC, IP) pair a VM uses on the VM-facing interface. */
struct xfer_ctr_key {
	__u8 mac[6];
	__u8 family;   /* XFER_FAMILY_IPV4 or XFER_FAMILY_IPV6 */
	__u8 pad;      /* always 0 */
	__u8 addr[16]; /* network order; IPv4 uses the first 4 bytes, the rest is 0 */
};

/* Cumulative counts of one key. "tx" is what the VM sent, "rx" what it received. */
struct xfer_ctr_val {
	__u64 tx_packets;
	__u64 tx_bytes;
	__u64 rx_packets;
	__u64 rx_bytes;
	__u64 tcp_initiated; /* SYN without ACK sent by the VM */
	__u64 tcp_accepted;  /* SYN+ACK sent by the VM */
};

/* Counts carried in by imports: a table only user space reads and writes.
 *
 * The datapath never reads it, so it is not a per-key hash (a batch insert costs
 * ~0.3 us a key, 6 ms for 20,000) but a table in big pages: two halves of
 * xfer_ctr_pages, each holding n keys (struct xfer_ctr_key) followed by n values
 * (struct xfer_ctr_val) packed across its pages, as a bundle's counters payload.
 * The one-element xfer_ctr_carried names the live half and its size. A writer
 * fills the idle half, then replaces the header: that single element update
 * commits, and a writer that dies before it leaves the old table intact.
 */
#define XFER_CARRIED_PAGE 65536 /* bytes per page */
#define XFER_CARRIED_VERSION 1  /* layout of the pages */

struct xfer_ctr_carried {
	__u64 generation; /* commits so far; the live half is generation % 2 */
	__u32 count;      /* entries in the live half */
	__u32 version;    /* XFER_CARRIED_VERSION once written; 0: never written, empty */
};

struct xfer_ctr_page {
	__u8 data[XFER_CARRIED_PAGE];
};

/* A bundle id already imported (idempotent imports); the value is the import time (ns). */
struct xfer_bundle_id {
	__u8 id[16];
};

#endif /* XFER_MAPS_H */
