// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
//
// The eBPF mailbox path: one sk_msg program on every mailbox socket.
//
// Each mailbox sends on a TCP loopback socket that fabricd put into the
// `mailboxes` SOCKHASH (sk_msg runs only for TCP senders). For every message
// the program
//   1. checks the frame: one whole wire header plus exactly `len` bytes (the
//      sender writes one frame per sendmsg, small enough to stay one sk_msg),
//   2. stamps the true source port and tenant from the sending socket's
//      own storage (the `sources` map, written by fabricd), so nobody can
//      forge either,
//   3. applies the tenant policy (same tenant, or an allow entry in
//      `policy`); a denied message never reaches its destination: it is
//      counted per source tenant in `denied`, marked FLAG_DENIED and
//      diverted to fabricd's hub socket, which discards it and tells the
//      sender (a first message sent before its ring, FLAG_EARLY, is not
//      counted: its sender learns the outcome from fabricd and sends it
//      again on the ring). (Not SK_DROP: tcp_bpf keeps a DROP verdict on
//      the socket, so every later message on it would fail with EACCES
//      too. SK_DROP is kept for frames that break the format, whose sender
//      is broken.)
//      Flow-control frames (FLAG_CONTROL, one EbpfControl) may cross
//      tenants: a receiver must return credit to an allowed sender even
//      when the policy is one-way; mailboxes never surface them as data,
//   4. redirects the message into the destination mailbox's socket
//      (BPF_F_INGRESS), or into fabricd's hub socket when that port has no
//      socket, so the sender hears "no such mailbox" from fabricd.
//
// The wire types come from `fabric/wire/src/lib.rs` through the header that
// cbindgen generates at build time: they are defined once.

#include <linux/bpf.h>
#include <linux/types.h>
#include <bpf/bpf_helpers.h>

typedef __u8 uint8_t;
typedef __u16 uint16_t;
typedef __u32 uint32_t;
typedef __u64 uint64_t;

#include "nefele_wire.h"

#define MAX_MAILBOXES 65536

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, MAX_MAILBOXES);
	__type(key, WirePort);
	__type(value, __u32);
} mailboxes SEC(".maps");

/* Who sends on a socket, stored on the socket itself (socket-local
 * storage): it cannot outlive or be moved to another socket, and sk_msg
 * programs may not read socket cookies. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, EbpfSource);
} sources SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_MAILBOXES);
	__type(key, WirePort);
	__type(value, __u32); /* the tenant owning that mailbox */
} port_tenant SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, TenantPair);
	__type(value, __u32); /* nonzero: allowed */
} policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32); /* source tenant */
	__type(value, __u64); /* messages denied */
} denied SEC(".maps");

static __always_inline void count_denied(__u32 tenant)
{
	__u64 one = 1;
	__u64 *n = bpf_map_lookup_elem(&denied, &tenant);
	if (n) {
		__sync_fetch_and_add(n, 1);
		return;
	}
	if (bpf_map_update_elem(&denied, &tenant, &one, BPF_NOEXIST) != 0) {
		n = bpf_map_lookup_elem(&denied, &tenant);
		if (n)
			__sync_fetch_and_add(n, 1);
	}
}

static __always_inline int allowed(const EbpfSource *src, __u32 dst_tenant)
{
	if (src->tenant == dst_tenant || (src->flags & EBPF_SOURCE_HUB))
		return 1;
	TenantPair pair = { .src = src->tenant, .dst = dst_tenant };
	__u32 *allow = bpf_map_lookup_elem(&policy, &pair);
	return allow && *allow;
}

SEC("sk_msg")
int nefele_demux(struct sk_msg_md *msg)
{
	WirePort hub = { .node = EBPF_HUB_NODE, .port = EBPF_HUB_PORT };
	struct bpf_sock *sk = msg->sk;
	if (!sk)
		return SK_DROP;
	EbpfSource *src = bpf_sk_storage_get(&sources, sk, 0, 0);
	if (!src)
		return SK_DROP;
	if (msg->size < sizeof(WireHeader))
		return SK_DROP;
	if (msg->data + sizeof(WireHeader) > msg->data_end &&
	    bpf_msg_pull_data(msg, 0, sizeof(WireHeader), 0) != 0)
		return SK_DROP;
	WireHeader *h = msg->data;
	if ((void *)(h + 1) > msg->data_end)
		return SK_DROP;
	if (h->magic != WIRE_MAGIC || h->version != WIRE_VERSION)
		return SK_DROP;
	if ((__u64)h->len + sizeof(WireHeader) != msg->size)
		return SK_DROP;

	h->src = src->port;
	h->tenant = src->tenant;
	WirePort dst = h->dst;

	__u32 *dst_tenant = bpf_map_lookup_elem(&port_tenant, &dst);
	if (dst_tenant) {
		int flow_control = (h->flags & FLAG_CONTROL) && h->len == sizeof(EbpfControl);
		if (!flow_control && !allowed(src, *dst_tenant)) {
			if (!(h->flags & FLAG_EARLY))
				count_denied(src->tenant);
			h->flags |= FLAG_DENIED;
			return bpf_msg_redirect_hash(msg, &mailboxes, &hub, BPF_F_INGRESS);
		}
		if (bpf_msg_redirect_hash(msg, &mailboxes, &dst, BPF_F_INGRESS) == SK_PASS)
			return SK_PASS;
	}
	/* No such mailbox here (never was, or its socket just closed). */
	return bpf_msg_redirect_hash(msg, &mailboxes, &hub, BPF_F_INGRESS);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
