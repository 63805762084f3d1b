//! The eBPF programs of the fabric, compiled at build time and embedded.
//!
//! `src/nefele.bpf.c` holds one `sk_msg` program, `nefele_demux`, and its
//! maps; `fabric::ebpf` loads it (with aya) into `fabricd`. The program and
//! the maps it reads are described there and in the C source. The wire
//! types both sides read are defined once, in `fabric-wire`; the build
//! turns them into the C header the program includes.

/// The ELF object's bytes, aligned as the ELF parser wants them.
#[repr(C, align(8))]
struct Aligned<B: ?Sized>(B);

static OBJECT_ALIGNED: &Aligned<[u8]> =
    &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/nefele.bpf.o")));

/// The compiled object (`nefele.bpf.o`), ready for `aya::Ebpf::load`.
pub fn object() -> &'static [u8] {
    &OBJECT_ALIGNED.0
}

/// Name of the sk_msg program in [`object`].
pub const PROGRAM: &str = "nefele_demux";
/// The SOCKHASH of mailbox sockets, keyed by port (`WirePort`).
pub const MAP_MAILBOXES: &str = "mailboxes";
/// Socket cookie → `EbpfSource` (who sends on that socket).
pub const MAP_SOURCES: &str = "sources";
/// Port (`WirePort`) → tenant of that mailbox.
pub const MAP_PORT_TENANT: &str = "port_tenant";
/// `TenantPair` → nonzero if allowed.
pub const MAP_POLICY: &str = "policy";
/// Source tenant → messages the policy denied.
pub const MAP_DENIED: &str = "denied";
