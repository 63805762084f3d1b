//! Wire types that cross a process or kernel boundary, defined once.
//!
//! This crate is `no_std` and has no allocator so that the eBPF programs in
//! `fabric-ebpf/` (or a C header generated from it) read exactly the layout
//! that user space writes. Every struct is `#[repr(C)]`, has no implicit
//! padding (zerocopy checks that at compile time) and stores integers in
//! native (little-endian on all supported hosts) byte order: these types only
//! travel between processes of one host; remote links serialise explicitly.
#![no_std]

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Magic value in [`WireHeader::magic`]: "NF" plus the layout version.
pub const WIRE_MAGIC: u16 = 0x4e46;
/// Version of the [`WireHeader`] layout; bumped on any incompatible change.
pub const WIRE_VERSION: u8 = 1;

/// Delivery is reliable: ordered, no loss, no duplicates, with push-back.
pub const FLAG_RELIABLE: u8 = 1 << 0;
/// More fragments of the same message follow this one.
pub const FLAG_MORE: u8 = 1 << 1;
/// The header carries a control-plane (protobuf) message, not user data.
pub const FLAG_CONTROL: u8 = 1 << 2;
/// Set by the eBPF program on a frame the tenant policy refused, which it
/// diverts to the hub (see `fabric-ebpf/src/nefele.bpf.c` for why).
pub const FLAG_DENIED: u8 = 1 << 3;
/// A mailbox's first message to a receiver, sent before it asked its
/// daemon for the ring to it: if it cannot be delivered (no socket there,
/// or the tenant policy), the program does not count it and the hub does
/// not answer, because the sender learns that from its daemon and sends
/// the message again on the ring.
pub const FLAG_EARLY: u8 = 1 << 4;

/// A mailbox's port id as it appears on the wire: `(node, port)`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct WirePort {
    pub node: u32,
    pub port: u32,
}

/// The header in front of every message on a socket path (eBPF, remote).
///
/// `src` and `tenant` are *claims* from the sender; on the eBPF path the
/// kernel program overwrites both from the sending socket, so a receiver can
/// trust them there.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct WireHeader {
    /// [`WIRE_MAGIC`].
    pub magic: u16,
    /// [`WIRE_VERSION`].
    pub version: u8,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// Tenant of the sender.
    pub tenant: u32,
    /// Destination mailbox.
    pub dst: WirePort,
    /// Source mailbox.
    pub src: WirePort,
    /// Payload length in bytes, not counting this header.
    pub len: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// Per sender→receiver sequence number (reliable mode), starting at 0.
    pub seq: u64,
}

/// Size of [`WireHeader`] in bytes.
pub const WIRE_HEADER_BYTES: usize = core::mem::size_of::<WireHeader>();
const _: () = assert!(WIRE_HEADER_BYTES == 40);

impl WireHeader {
    /// A header for a message of `len` bytes from `src` to `dst`.
    pub const fn new(
        src: WirePort,
        dst: WirePort,
        tenant: u32,
        len: u32,
        flags: u8,
        seq: u64,
    ) -> Self {
        WireHeader {
            magic: WIRE_MAGIC,
            version: WIRE_VERSION,
            flags,
            tenant,
            dst,
            src,
            len,
            reserved: 0,
            seq,
        }
    }

    /// Whether magic and version match this build.
    pub const fn is_valid(&self) -> bool {
        self.magic == WIRE_MAGIC && self.version == WIRE_VERSION
    }

    pub const fn is_reliable(&self) -> bool {
        self.flags & FLAG_RELIABLE != 0
    }
}

/// The header of one record in a shared-memory ring.
///
/// Records are packed at 16-byte boundaries (the header's size), and the
/// commit word is the header's first field: the receiver polls the word
/// that shares its line with the length and the first payload bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RecordHeader {
    /// The record's stamp once it is fully written: `(position + 1) ^ key`,
    /// with the ring's absolute, never-wrapping byte position and its random
    /// key, so that neither a record from an earlier lap nor old payload
    /// under a new header looks committed (see `fabric::ring`).
    pub commit: u64,
    /// Payload bytes that follow this header.
    pub len: u32,
    /// `RECORD_*` bits.
    pub flags: u32,
}

/// The record is padding up to the end of the ring: skip to the start.
pub const RECORD_PAD: u32 = 1 << 0;
/// More fragments of the same message follow.
pub const RECORD_MORE: u32 = 1 << 1;

/// Size of [`RecordHeader`] in bytes.
pub const RECORD_HEADER_BYTES: usize = core::mem::size_of::<RecordHeader>();
const _: () = assert!(RECORD_HEADER_BYTES == 16);

/// The eBPF path's maps and in-band control, shared with
/// `fabric-ebpf/src/nefele.bpf.c` through a header cbindgen generates from
/// this file.
///
/// Key of the hub socket (`fabricd`'s own) in the mailbox SOCKHASH: messages
/// for a port that has no socket there are redirected to it, so the sender
/// hears "no such mailbox" instead of a bare `EACCES`. No mailbox has port 0.
pub const EBPF_HUB_NODE: u32 = 0;
/// See [`EBPF_HUB_NODE`].
pub const EBPF_HUB_PORT: u32 = 0;

/// The hub may send to every tenant (its replies cross tenants).
pub const EBPF_SOURCE_HUB: u32 = 1 << 0;

/// Value of the source map (socket cookie → who sends on that socket):
/// the program stamps `port` and `tenant` into every header it passes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct EbpfSource {
    pub port: WirePort,
    pub tenant: u32,
    /// `EBPF_SOURCE_*` bits.
    pub flags: u32,
}

/// Key of the tenant policy map: may `src` send to `dst`? Same-tenant
/// traffic is always allowed and needs no entry.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct TenantPair {
    pub src: u32,
    pub dst: u32,
}

/// Payload of a control message on the eBPF path (a header with
/// [`FLAG_CONTROL`]): flow-control credit and liveness, between mailboxes
/// and with the hub.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct EbpfControl {
    /// `EBPF_CTL_*`.
    pub kind: u32,
    pub reserved: u32,
    /// The port the message is about.
    pub port: WirePort,
    /// Kind-specific: the credit's running total of bytes consumed.
    pub value: u64,
}

/// Size of [`EbpfControl`] in bytes.
pub const EBPF_CONTROL_BYTES: usize = core::mem::size_of::<EbpfControl>();
const _: () = assert!(EBPF_CONTROL_BYTES == 24);

/// Receiver → sender: `value` bytes of yours have been consumed in total.
pub const EBPF_CTL_CREDIT: u32 = 1;
/// Mailbox → hub: tell me when `port` goes away (at once if it is gone).
pub const EBPF_CTL_WATCH: u32 = 2;
/// Hub → mailbox: `port` is gone; everything it sent to you was delivered
/// before this message.
pub const EBPF_CTL_GONE: u32 = 3;
/// Hub → sender: your message to `port` found no such mailbox.
pub const EBPF_CTL_NO_SUCH_MAILBOX: u32 = 4;
/// Hub → sender: the tenant policy refused your message to `port`.
pub const EBPF_CTL_DENIED: u32 = 5;

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::FromBytes;

    #[test]
    fn header_round_trips_through_bytes() {
        let h = WireHeader::new(
            WirePort { node: 1, port: 2 },
            WirePort { node: 3, port: 4 },
            7,
            64,
            FLAG_RELIABLE,
            9,
        );
        let bytes = h.as_bytes();
        assert_eq!(bytes.len(), WIRE_HEADER_BYTES);
        let back = WireHeader::read_from_bytes(bytes).expect("exact size");
        assert_eq!(back, h);
        assert!(back.is_valid());
        assert!(back.is_reliable());
        // Field offsets the eBPF side depends on.
        assert_eq!(core::mem::offset_of!(WireHeader, tenant), 4);
        assert_eq!(core::mem::offset_of!(WireHeader, dst), 8);
        assert_eq!(core::mem::offset_of!(WireHeader, src), 16);
        assert_eq!(core::mem::offset_of!(WireHeader, len), 24);
        assert_eq!(core::mem::offset_of!(WireHeader, seq), 32);
    }

    #[test]
    fn garbage_is_not_valid() {
        let h = WireHeader::read_from_bytes(&[0xffu8; WIRE_HEADER_BYTES][..]).expect("exact size");
        assert!(!h.is_valid());
    }
}
