//! The single-producer, single-consumer byte ring that carries messages
//! between one sender and one receiver, and the doorbell a receiver parks on.
//!
//! # Layout of a ring segment
//!
//! One page of control lines (each field group on its own cache line, so the
//! producer and the consumer never write the same line), then
//! `ring_capacity_bytes` of data. The data holds variable-size records, each
//! aligned to [`RECORD_ALIGN`] (16) bytes: a [`RecordHeader`] whose first
//! word is the *commit* word, then the payload. The consumer polls the
//! commit word of the record at its head. Records are packed rather than
//! aligned to cache lines because a stream is bound by the lines that move
//! between the cores: a 64-byte message takes 80 bytes (1.25 lines) instead
//! of 128 (see Streams below). Single small messages, where latency
//! counts, take the hot slot instead (below). While it polls an
//! empty ring, the consumer prefetches the line after its head, so that a
//! record's second line is on its way with the first.
//!
//! The commit word holds the record's *stamp*: `(position + 1) ^ key`, where
//! positions are absolute byte counts that never wrap and `key` is a random
//! word of the ring (top bit set, so no stamp is zero). A record from an
//! earlier lap never looks committed, as its position differs. Because
//! records vary in size, an old record's *payload* may sit where a new
//! header goes; it looks committed only if the sender's data held exactly
//! that stamp at that place, which without the ring's key it cannot know
//! (one chance in 2^64 per line, where a plain `position + 1` would be a
//! number an application might well send). So the producer writes nothing
//! but its records: no zeroing of free space ahead of itself, whose stores
//! (a line each, cold in the consumer's cache) would compete with the
//! commits for the interconnect. A sender that reads the key and forges
//! stamps only garbles its own messages: the consumer checks every record
//! it takes (see [`Consumer::poll`]).
//!
//! # The hot slot
//!
//! A ring walks through fresh lines: each message lands on lines the two
//! cores last shared a lap ago. On some hosts that costs as much as the
//! message itself — on an AMD EPYC (Zen 4) under KVM a 64-byte round trip
//! over fresh lines took 2.2–3 × a bounced line where one reused slot per
//! direction took 1.2–1.5 × (`perf/model/hot_slot_model.c`). So the
//! control page also holds a *hot slot*: two lines, a commit word, a
//! `taken` word that the consumer writes, the length and up to
//! [`HOT_SLOT_MAX_PAYLOAD`] bytes. The producer puts a small message there
//! instead of the ring when the consumer has taken the slot's last message
//! and, as far as the producer knows, read the whole ring. A request–reply
//! exchange then uses the same two lines each time; a stream that outruns
//! its consumer goes to the ring (rather than bouncing the `taken` word
//! between the cores with every message) and comes back once the consumer
//! has caught up. Order does not rest on that rule but on sequence
//! numbers, which both sides count (the slot's commit word is
//! `seq ^ key`): the consumer takes the slot's message when it is the next
//! one, and the ring's first record otherwise. It looks at the ring before
//! the slot, so a record seen in the ring means anything the producer put
//! in the slot before it is seen too (Release commits, Acquire loads).
//!
//! Messages larger than a quarter of the ring travel as several fragments
//! (`RECORD_MORE`), which bounds a message's size by [`MAX_MESSAGE_BYTES`],
//! not by the ring.
//!
//! # Streams
//!
//! A consumer that keeps up with a stream polls each record's line just
//! before the producer writes it, and the line crosses between the cores
//! twice per record. So after it took two or more messages from the ring
//! in a row and then found it empty, a consumer's quick polls look at the
//! hot slot only, for [`STREAM_HOLD_POLLS`] polls (1–2 µs of spinning):
//! the producer writes several records undisturbed and the consumer takes
//! them as a batch (with packing, 64-byte throughput +25 %; packing
//! without the hold was no faster than before). A ring message that comes
//! right after a burst waits out the hold; single messages do not trigger
//! it, and thorough polls (every 64th spin, and before any park) ignore it.
//!
//! The consumer publishes its head when it finds the ring empty, and while
//! it keeps finding records, every [`PUBLISH_FRACTION`]th of the ring; the
//! producer reads it only when its cached copy says the ring is full.
//! Each side parks on a [`WaitWord`] when it has nothing to do: the
//! consumer on its mailbox's [`Doorbell`] (one for all of its rings), the
//! producer on the ring's space word.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fabric_wire::{RecordHeader, RECORD_HEADER_BYTES, RECORD_MORE, RECORD_PAD};

use crate::futex::{Check, WaitWord};
use crate::segment::Segment;

/// Cache-line size the layout is built around.
pub const CACHE_LINE_BYTES: usize = 64;
/// Alignment of a record in the ring: its header's.
pub const RECORD_ALIGN: usize = RECORD_HEADER_BYTES;
/// Bytes of control lines in front of a ring's data.
pub const RING_CONTROL_BYTES: usize = 4096;
/// Data bytes of a ring unless configured otherwise. Rings are faulted in
/// when mapped (a page fault on the hot path costs microseconds), so each
/// sender→receiver pair costs this much memory.
pub const DEFAULT_RING_CAPACITY_BYTES: usize = 256 << 10;
/// Smallest allowed ring.
pub const MIN_RING_CAPACITY_BYTES: usize = 4096;
/// Largest allowed ring.
pub const MAX_RING_CAPACITY_BYTES: usize = 1 << 30;
/// Largest message, in bytes, in reliable mode (fragmented through the ring).
/// Unreliable messages must fit the ring's free space at once.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The consumer publishes its head (a full barrier, and a line the
/// producer reads when it runs out of room) once per this fraction of the
/// ring read, at every fragment, and whenever it finds the ring empty,
/// rather than after every record. A consumer that took everything has
/// then published all but at most this fraction, which leaves room for
/// the largest record (a quarter ring, plus a pad record), so
/// a producer never waits on bytes that were read already.
pub const PUBLISH_FRACTION: u64 = 8;

const RING_MAGIC: u64 = 0x4e45_4645_4c45_5234; // "NEFELER4"
const RX_GONE: u32 = 1;
const TX_GONE: u32 = 2;
/// The tenant policy no longer lets the sender reach the receiver.
const REVOKED: u32 = 4;

#[repr(C, align(64))]
struct Meta {
    magic: AtomicU64,
    capacity: AtomicU64,
    /// The ring's stamp key (see the module doc).
    key: AtomicU64,
}

#[repr(C, align(64))]
struct ProducerLine {
    /// The producer parks here when the ring is full.
    space: WaitWord,
    /// Unreliable messages dropped because the ring was full.
    dropped: AtomicU64,
}

#[repr(C, align(64))]
struct ConsumerLine {
    /// Absolute position of the next record to read.
    head: AtomicU64,
}

#[repr(C, align(64))]
struct StateLine {
    /// `RX_GONE` / `TX_GONE` / `REVOKED` bits.
    closed: AtomicU32,
}

/// The front of the hot slot (see the module doc): its payload follows,
/// up to [`HOT_SLOT_MAX_PAYLOAD`] bytes, and is reached only through raw
/// pointers (as a record's is).
#[repr(C)]
struct HotHeader {
    /// `seq ^ key` of the message in the slot, `seq` counting the ring's
    /// messages from 1.
    commit: AtomicU64,
    /// `seq` of the last message the consumer took from the slot (the only
    /// word of the slot the consumer writes).
    taken: AtomicU64,
    len: AtomicU32,
}

#[repr(C)]
struct RingControl {
    meta: Meta,
    producer: ProducerLine,
    consumer: ConsumerLine,
    state: StateLine,
    hot: HotHeader,
}

/// Bytes of the hot slot: two lines, header and payload.
const HOT_SLOT_BYTES: usize = 2 * CACHE_LINE_BYTES;
/// Where the hot slot's payload starts, from the slot's start.
const HOT_DATA_OFFSET: usize = 24;
/// Largest message the hot slot carries.
pub const HOT_SLOT_MAX_PAYLOAD: usize = HOT_SLOT_BYTES - HOT_DATA_OFFSET;
/// After a record in the ring, the producer looks whether the consumer
/// has read the ring (and the hot slot may take messages again) once per
/// this many sends.
pub const HOT_LOOK_EVERY: u32 = 32;

/// Quick polls for which a consumer that found its ring empty right after
/// taking several messages from it looks at the hot slot only.
pub const STREAM_HOLD_POLLS: u32 = 32;
/// Where the hot slot starts in the control page.
const HOT_SLOT_OFFSET: usize = std::mem::offset_of!(RingControl, hot);

const _: () = assert!(HOT_SLOT_OFFSET + HOT_SLOT_BYTES <= RING_CONTROL_BYTES);
const _: () = assert!(HOT_SLOT_OFFSET.is_multiple_of(CACHE_LINE_BYTES));
const _: () = assert!(std::mem::size_of::<HotHeader>() <= HOT_DATA_OFFSET);

/// Errors of a send; all leave earlier messages intact.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("the receiver's ring is full (non-blocking send); nothing was sent, try again later")]
    WouldBlock,
    #[error(
        "the receiver is gone (its mailbox closed, its process died, or its node left the cluster)"
    )]
    PeerGone,
    #[error("message of {len} bytes exceeds the limit of {max} bytes for this delivery mode")]
    TooLarge { len: usize, max: usize },
    #[error("timed out waiting for space in the receiver's ring")]
    Timeout,
    #[error("no such mailbox: no mailbox has that port (it never existed, or it closed before the message arrived)")]
    NoSuchMailbox,
    #[error("the tenant policy does not let this mailbox's tenant reach that mailbox's tenant (the message was dropped and counted in fabricd's stats)")]
    Denied,
}

/// Whether a send may block and whether it must arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendMode {
    /// Reliable: ordered, no loss, no duplicates, a full ring pushes back.
    /// Unreliable: dropped (and counted) when the ring is full.
    pub reliable: bool,
    /// For reliable sends: `false` returns [`SendError::WouldBlock`] instead of
    /// waiting when the first fragment does not fit (later fragments of a
    /// message larger than a fragment still wait for the receiver).
    pub blocking: bool,
}

impl SendMode {
    pub const RELIABLE: SendMode = SendMode {
        reliable: true,
        blocking: true,
    };
    pub const RELIABLE_NONBLOCKING: SendMode = SendMode {
        reliable: true,
        blocking: false,
    };
    pub const UNRELIABLE: SendMode = SendMode {
        reliable: false,
        blocking: false,
    };
}

/// What one poll of a ring found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Poll {
    /// A whole message was appended to the output buffer.
    Message,
    /// Nothing (or only part of a fragmented message) is there yet.
    Empty,
    /// The producer is gone and everything it sent has been read.
    Closed,
}

/// A ring segment's shared memory, with typed access to its control lines.
struct Ring {
    seg: Arc<Segment>,
    /// `seg`'s address, kept here so that the hot paths reach the ring
    /// without going through the `Arc` and the mapping first.
    base: *mut u8,
    capacity: u64,
    key: u64,
}

// SAFETY: `base` points into the mapping that `seg` keeps alive, which any
// thread may access (through atomics, or through the record protocol).
unsafe impl Send for Ring {}
unsafe impl Sync for Ring {}

impl Ring {
    #[inline]
    fn ctl(&self) -> &RingControl {
        // SAFETY: `attach`/`create` checked the segment is at least
        // RING_CONTROL_BYTES long and page aligned; RingControl consists of
        // atomics only, valid for any bit pattern, shared across processes.
        unsafe { &*(self.base as *const RingControl) }
    }

    #[inline]
    fn data(&self) -> *mut u8 {
        // SAFETY: the data area starts right after the control page and is
        // `capacity` bytes long (checked at attach).
        unsafe { self.base.add(RING_CONTROL_BYTES) }
    }

    fn header_at(&self, pos: u64) -> &RecordHeaderAtomic {
        let off = (pos & (self.capacity - 1)) as usize;
        debug_assert_eq!(off % RECORD_ALIGN, 0);
        // SAFETY: `off` is within the data area and aligned to a record
        // (16 bytes), so the header lies within it (the capacity is a
        // multiple of 16) and its words are aligned; the commit word is
        // only accessed atomically.
        unsafe { &*(self.data().add(off) as *const RecordHeaderAtomic) }
    }

    /// The commit word of a record at `pos` once it is written.
    #[inline]
    fn stamp(&self, pos: u64) -> u64 {
        (pos + 1) ^ self.key
    }

    /// Whether the record at `pos` is committed (Acquire: its contents are
    /// visible then).
    #[inline]
    fn committed(&self, pos: u64) -> bool {
        self.header_at(pos).commit.load(Ordering::Acquire) == self.stamp(pos)
    }

    /// Starts loading the line after the record slot at `pos` into this
    /// core's cache: a hint, which never faults.
    #[inline]
    fn prefetch_after(&self, pos: u64) {
        let off = ((pos + CACHE_LINE_BYTES as u64) & (self.capacity - 1)) as usize;
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `off` is within the data area (and a prefetch of any
        // address is harmless anyway).
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(self.data().add(off) as *const i8);
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = off;
    }

    fn closed(&self) -> u32 {
        self.ctl().state.closed.load(Ordering::Acquire)
    }

    /// Starts loading the hot slot's second line (a message over 40
    /// bytes ends there): a hint, as in [`Ring::prefetch_after`].
    #[inline]
    fn prefetch_hot_tail(&self) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: within the control page.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(
                self.base.add(HOT_SLOT_OFFSET + CACHE_LINE_BYTES) as *const i8
            );
        }
    }

    /// Starts taking both hot-slot lines for writing (`prefetchw`): the
    /// consumer wrote the first (`taken`) and read both, so a plain load
    /// of `taken` would fetch the line shared and the stores after it
    /// would ask the consumer's core for it again. 64 B round trips on a
    /// Zen 4 host: fabric-shm / floor median 1.39–1.50 → 1.31 (two batches
    /// of alternating runs, `perf/NOTES.md`).
    #[inline]
    fn claim_hot(&self) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: within the control page; a prefetch never faults (and
        // x86-64 processors without PRFCHW execute `prefetchw` as a NOP).
        unsafe {
            let slot = self.base.add(HOT_SLOT_OFFSET);
            std::arch::asm!(
                "prefetchw [{0}]",
                "prefetchw [{0} + 64]",
                in(reg) slot,
                options(nostack, preserves_flags, readonly)
            );
        }
    }

    #[inline]
    fn hot(&self) -> &HotHeader {
        &self.ctl().hot
    }

    /// The hot slot's payload.
    #[inline]
    fn hot_data(&self) -> *mut u8 {
        // SAFETY: the slot lies within the control page (asserted at
        // compile time), which the segment holds.
        unsafe { self.base.add(HOT_SLOT_OFFSET + HOT_DATA_OFFSET) }
    }

    /// The hot slot's commit word once message `seq` is written there.
    #[inline]
    fn hot_stamp(&self, seq: u64) -> u64 {
        seq ^ self.key
    }
}

/// [`RecordHeader`] with an atomic commit word, for access in place.
#[repr(C)]
struct RecordHeaderAtomic {
    commit: AtomicU64,
    len: AtomicU32,
    flags: AtomicU32,
}
const _: () =
    assert!(std::mem::size_of::<RecordHeaderAtomic>() == std::mem::size_of::<RecordHeader>());
const _: () = assert!(std::mem::offset_of!(RecordHeader, commit) == 0);

fn record_bytes(payload: usize) -> u64 {
    ((RECORD_HEADER_BYTES + payload + RECORD_ALIGN - 1) & !(RECORD_ALIGN - 1)) as u64
}

/// Validates a capacity: a power of two within the limits.
pub fn check_capacity(capacity: usize) -> std::io::Result<()> {
    if !capacity.is_power_of_two()
        || !(MIN_RING_CAPACITY_BYTES..=MAX_RING_CAPACITY_BYTES).contains(&capacity)
    {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "ring_capacity_bytes {capacity} must be a power of two between {MIN_RING_CAPACITY_BYTES} and {MAX_RING_CAPACITY_BYTES}"
            ),
        ));
    }
    Ok(())
}

/// Bytes of a segment that holds a ring of `capacity` data bytes.
pub fn segment_bytes(capacity: usize) -> usize {
    RING_CONTROL_BYTES + capacity
}

/// Formats a fresh (zeroed) segment as a ring.
pub fn format(seg: &Segment) -> std::io::Result<()> {
    let capacity = seg.len().saturating_sub(RING_CONTROL_BYTES);
    check_capacity(capacity)?;
    // SAFETY: length checked just above; the control page holds only atomics.
    let ctl = unsafe { &*(seg.as_ptr() as *const RingControl) };
    ctl.meta.capacity.store(capacity as u64, Ordering::Relaxed);
    ctl.meta
        .key
        .store(rand::random::<u64>() | 1 << 63, Ordering::Relaxed);
    ctl.meta.magic.store(RING_MAGIC, Ordering::Release);
    Ok(())
}

fn attach(seg: Arc<Segment>) -> std::io::Result<Ring> {
    let bad = |why: &str| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not a fabric ring segment: {why}"),
        )
    };
    if seg.len() < RING_CONTROL_BYTES + MIN_RING_CAPACITY_BYTES {
        return Err(bad("too short"));
    }
    // SAFETY: length checked just above.
    let ctl = unsafe { &*(seg.as_ptr() as *const RingControl) };
    if ctl.meta.magic.load(Ordering::Acquire) != RING_MAGIC {
        return Err(bad("bad magic"));
    }
    let capacity = ctl.meta.capacity.load(Ordering::Relaxed);
    if capacity as usize != seg.len() - RING_CONTROL_BYTES || !capacity.is_power_of_two() {
        return Err(bad("capacity does not match the segment"));
    }
    let key = ctl.meta.key.load(Ordering::Relaxed);
    Ok(Ring {
        base: seg.as_ptr(),
        seg,
        capacity,
        key,
    })
}

/// Marks the ring's receiver as gone and wakes a blocked producer. Used by a
/// consumer on drop, and by `fabricd` when the receiving process dies.
pub fn close_receiver_side(seg: &Segment) {
    if let Ok(ctl) = control_of(seg) {
        ctl.state.closed.fetch_or(RX_GONE, Ordering::AcqRel);
        ctl.producer.space.notify_always();
    }
}

/// Closes the ring to new messages because the tenant policy no longer
/// lets its sender reach its receiver: the sender's next send fails with
/// [`SendError::Denied`] (a sender waiting for room is woken to hear it);
/// what it sent before is still delivered. Used by `fabricd` on a revoke.
pub fn revoke(seg: &Segment) {
    if let Ok(ctl) = control_of(seg) {
        ctl.state.closed.fetch_or(REVOKED, Ordering::AcqRel);
        ctl.producer.space.notify_always();
    }
}

/// Whether [`revoke`] closed the ring.
pub fn revoked(seg: &Segment) -> bool {
    control_of(seg).is_ok_and(|c| c.state.closed.load(Ordering::Acquire) & REVOKED != 0)
}

/// Marks the ring's sender as gone; the receiver still drains what was sent.
/// The caller wakes the receiver's doorbell.
pub fn close_sender_side(seg: &Segment) {
    if let Ok(ctl) = control_of(seg) {
        ctl.state.closed.fetch_or(TX_GONE, Ordering::AcqRel);
    }
}

/// Unreliable messages dropped on this ring so far.
pub fn dropped_of(seg: &Segment) -> u64 {
    control_of(seg).map_or(0, |c| c.producer.dropped.load(Ordering::Relaxed))
}

fn control_of(seg: &Segment) -> std::io::Result<&RingControl> {
    if seg.len() < RING_CONTROL_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "segment too short for a ring",
        ));
    }
    // SAFETY: length checked; the control page holds only atomics.
    Ok(unsafe { &*(seg.as_ptr() as *const RingControl) })
}

/// A mailbox's doorbell: the one place its receiver parks, whichever ring
/// (or control event) it waits for.
#[repr(C, align(64))]
struct DoorbellShared {
    wait: WaitWord,
    /// Bumped by `fabricd` whenever it queues an event on the mailbox's
    /// control socket, so the receiver need not make a syscall to look.
    notices: AtomicU32,
}

/// Bytes of a doorbell segment.
pub const DOORBELL_BYTES: usize = 4096;

/// A handle on a doorbell segment.
pub struct Doorbell {
    seg: Segment,
}

impl Doorbell {
    /// Wraps a zeroed (new) or received segment.
    pub fn new(seg: Segment) -> std::io::Result<Self> {
        if seg.len() < std::mem::size_of::<DoorbellShared>() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "doorbell segment too short",
            ));
        }
        Ok(Doorbell { seg })
    }

    fn shared(&self) -> &DoorbellShared {
        // SAFETY: length checked at construction; only atomics inside.
        unsafe { &*(self.seg.as_ptr() as *const DoorbellShared) }
    }

    /// Spins, then parks, until `poll` yields or `deadline` passes.
    pub fn wait_until<T>(
        &self,
        spin: Duration,
        deadline: Option<Instant>,
        poll: impl FnMut(Check) -> Option<T>,
    ) -> Option<T> {
        self.shared().wait.wait_until(spin, deadline, poll)
    }

    /// [`Doorbell::wait_until`] with a custom park (see
    /// [`WaitWord::wait_until_parking`](crate::futex::WaitWord::wait_until_parking)).
    pub fn wait_until_parking<T>(
        &self,
        spin: Duration,
        deadline: Option<Instant>,
        poll: impl FnMut(Check) -> Option<T>,
        park: impl FnMut(&std::sync::atomic::AtomicU32, u32, Duration),
    ) -> Option<T> {
        self.shared()
            .wait
            .wait_until_parking(spin, deadline, poll, park)
    }

    /// Announces that the receiver goes to sleep outside
    /// [`Doorbell::wait_until`] (an event loop); see [`Parking`].
    pub fn park(self: &Arc<Self>) -> Parking {
        let seen = self.shared().wait.announce();
        Parking {
            doorbell: self.clone(),
            seen,
        }
    }

    /// The wait word a producer rings after each commit (it keeps the
    /// doorbell, and so the word, alive).
    fn wait_word(&self) -> *const WaitWord {
        &self.shared().wait
    }

    /// Records a control event and wakes the receiver.
    pub fn notice(&self) {
        self.shared().notices.fetch_add(1, Ordering::Release);
        self.shared().wait.notify_always();
    }

    /// The notice counter; a change means events wait on the control socket.
    #[inline]
    pub fn notices(&self) -> u32 {
        self.shared().notices.load(Ordering::Acquire)
    }

    pub fn segment(&self) -> &Segment {
        &self.seg
    }
}

/// A receiver's announced sleep on its doorbell, for an event loop that
/// waits on the doorbell's futex itself (a pollable mailbox's fd, through
/// io_uring) instead of in [`Doorbell::wait_until`]: while it lives, ring senders and the daemon
/// wake the futex word; dropping it ends the sleep. Take it, look for
/// messages once more, and sleep on [`Parking::word`] while it still holds
/// [`Parking::seen`] only if there were none.
pub struct Parking {
    doorbell: Arc<Doorbell>,
    seen: u32,
}

impl Parking {
    /// The futex word to sleep on.
    pub fn word(&self) -> &AtomicU32 {
        &self.doorbell.shared().wait.epoch
    }

    /// Its value when the sleep was announced: a wake changes it.
    pub fn seen(&self) -> u32 {
        self.seen
    }
}

impl Drop for Parking {
    fn drop(&mut self) {
        self.doorbell.shared().wait.retire();
    }
}

/// The sending end of one ring.
pub struct Producer {
    ring: Ring,
    doorbell: Arc<Doorbell>,
    /// `doorbell`'s wait word, reached without going through the `Arc`.
    bell: *const WaitWord,
    tail: u64,
    head_cache: u64,
    spin: Duration,
    /// Messages sent so far (the hot slot's sequence numbers).
    sent: u64,
    /// Sequence number of the last message put in the hot slot (0: none).
    hot_last: u64,
    /// The consumer is known to have read every record of the ring.
    ring_read: bool,
    /// Sends until the producer next looks whether the consumer has read
    /// the ring (while `ring_read` is false).
    until_look: u32,
    /// [`HOT_LOOK_EVERY`] (tests look at every send).
    look_every: u32,
}

// SAFETY: `bell` points into the doorbell segment that the producer's
// `Arc` keeps alive; it is only used through atomics.
unsafe impl Send for Producer {}

impl Producer {
    /// The sending end of the ring in `seg`, waking `doorbell` on commits.
    pub fn attach(seg: Arc<Segment>, doorbell: Arc<Doorbell>) -> std::io::Result<Self> {
        let ring = attach(seg)?;
        // A fresh ring: the producer is the first writer and starts where the
        // consumer is (a ring is never handed to a second producer).
        let head = ring.ctl().consumer.head.load(Ordering::Acquire);
        Ok(Producer {
            ring,
            bell: doorbell.wait_word(),
            doorbell,
            tail: head,
            head_cache: head,
            spin: crate::futex::DEFAULT_SPIN,
            sent: 0,
            hot_last: 0,
            ring_read: true,
            until_look: 0,
            look_every: HOT_LOOK_EVERY,
        })
    }

    /// Largest payload of one record (a quarter of the ring).
    fn max_fragment(&self) -> usize {
        self.ring.capacity as usize / 4 - RECORD_HEADER_BYTES
    }

    /// Bytes needed at the tail for a record of `size`, counting a pad record
    /// if it would straddle the end.
    fn needed(&self, size: u64) -> u64 {
        let off = self.tail & (self.ring.capacity - 1);
        let pad = if off + size > self.ring.capacity {
            self.ring.capacity - off
        } else {
            0
        };
        pad + size
    }

    fn fits(&self, need: u64) -> bool {
        self.tail + need - self.head_cache <= self.ring.capacity
    }

    /// Whether the receiver is gone.
    pub fn peer_gone(&self) -> bool {
        self.ring.closed() & RX_GONE != 0
    }

    /// Why no message may be sent any more, if so (one load of a line
    /// that changes only then).
    #[inline]
    fn refusal(&self) -> Result<(), SendError> {
        let closed = self.ring.closed();
        if closed & RX_GONE != 0 {
            Err(SendError::PeerGone)
        } else if closed & REVOKED != 0 {
            Err(SendError::Denied)
        } else {
            Ok(())
        }
    }

    /// Unreliable messages dropped so far.
    pub fn dropped(&self) -> u64 {
        self.ring.ctl().producer.dropped.load(Ordering::Relaxed)
    }

    /// Sends one message; see [`SendMode`] for what may block.
    #[inline]
    pub fn send(
        &mut self,
        msg: &[u8],
        mode: SendMode,
        deadline: Option<Instant>,
    ) -> Result<(), SendError> {
        // The common cases, kept short: a small message the hot slot takes,
        // or a reliable message of one record that fits the free space as
        // last known.
        let hot = msg.len() <= HOT_SLOT_MAX_PAYLOAD;
        if hot || mode.reliable && msg.len() <= self.max_fragment() {
            self.refusal()?;
            if hot && self.hot_free() {
                self.write_hot(msg);
                return Ok(());
            }
            let size = record_bytes(msg.len());
            if mode.reliable && self.fits(self.needed(size)) {
                self.write_record(msg, 0, size);
                return Ok(());
            }
        }
        self.send_any(msg, mode, deadline)
    }

    /// Whether the next message goes to the hot slot: the consumer has
    /// taken the slot's last message and read every record of the ring
    /// (see the module doc: the second keeps streams in the ring). The
    /// second is known for free while the slot carries all the traffic;
    /// after a record, the producer looks at the consumer's published head
    /// every [`HOT_LOOK_EVERY`] sends until it finds the ring read (a
    /// consumer that keeps up with a stream publishes its head each time
    /// it finds the ring empty: a look per send would fetch that line
    /// from the other core every time).
    #[inline]
    fn hot_free(&mut self) -> bool {
        if !self.ring_read {
            if self.until_look > 0 {
                self.until_look -= 1;
                return false;
            }
            self.until_look = self.look_every;
            let head = self.ring.ctl().consumer.head.load(Ordering::Acquire);
            if head != self.tail {
                return false;
            }
            self.head_cache = head;
            self.ring_read = true;
        }
        self.ring.claim_hot();
        self.ring.hot().taken.load(Ordering::Acquire) == self.hot_last
    }

    /// Puts a message of at most [`HOT_SLOT_MAX_PAYLOAD`] bytes in the hot
    /// slot, which [`Producer::hot_free`] found free.
    #[inline]
    fn write_hot(&mut self, msg: &[u8]) {
        debug_assert!(msg.len() <= HOT_SLOT_MAX_PAYLOAD);
        self.sent += 1;
        self.hot_last = self.sent;
        let h = self.ring.hot();
        h.len.store(msg.len() as u32, Ordering::Relaxed);
        // SAFETY: the payload fits the slot (asserted by the callers), and
        // the consumer took the slot's last message (it reads the slot only
        // after the commit below).
        unsafe {
            std::ptr::copy_nonoverlapping(msg.as_ptr(), self.ring.hot_data(), msg.len());
        }
        // As in `commit`: publishes, and is the doorbell check's barrier.
        h.commit
            .swap(self.ring.hot_stamp(self.sent), Ordering::SeqCst);
        // SAFETY: as in `write_record`.
        unsafe { &*self.bell }.notify_after_seqcst_rmw();
    }

    /// [`Producer::send`] for every case.
    #[inline(never)]
    fn send_any(
        &mut self,
        msg: &[u8],
        mode: SendMode,
        deadline: Option<Instant>,
    ) -> Result<(), SendError> {
        self.refusal()?;
        if !mode.reliable {
            return self.send_unreliable(msg);
        }
        if msg.len() > MAX_MESSAGE_BYTES {
            return Err(SendError::TooLarge {
                len: msg.len(),
                max: MAX_MESSAGE_BYTES,
            });
        }
        let frag = self.max_fragment();
        let mut rest = msg;
        let mut first = true;
        loop {
            let n = rest.len().min(frag);
            let (chunk, tail) = rest.split_at(n);
            let size = record_bytes(n);
            self.wait_for_space(size, first && !mode.blocking, deadline)?;
            first = false;
            self.write_record(chunk, if tail.is_empty() { 0 } else { RECORD_MORE }, size);
            if tail.is_empty() {
                return Ok(());
            }
            rest = tail;
        }
    }

    fn send_unreliable(&mut self, msg: &[u8]) -> Result<(), SendError> {
        let frag = self.max_fragment();
        if msg.len() > frag {
            return Err(SendError::TooLarge {
                len: msg.len(),
                max: frag,
            });
        }
        let size = record_bytes(msg.len());
        let need = self.needed(size);
        if !self.fits(need) {
            self.head_cache = self.ring.ctl().consumer.head.load(Ordering::Acquire);
            if !self.fits(need) {
                self.ring
                    .ctl()
                    .producer
                    .dropped
                    .fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        }
        self.write_record(msg, 0, size);
        Ok(())
    }

    fn wait_for_space(
        &mut self,
        size: u64,
        nonblocking: bool,
        deadline: Option<Instant>,
    ) -> Result<(), SendError> {
        let need = self.needed(size);
        if self.fits(need) {
            return Ok(());
        }
        let ring = &self.ring;
        let tail = self.tail;
        let capacity = ring.capacity;
        let fresh = |head: &mut u64| -> Option<Result<(), SendError>> {
            *head = ring.ctl().consumer.head.load(Ordering::Acquire);
            if tail + need - *head <= capacity {
                Some(Ok(()))
            } else if ring.closed() & RX_GONE != 0 {
                Some(Err(SendError::PeerGone))
            } else if ring.closed() & REVOKED != 0 {
                Some(Err(SendError::Denied))
            } else if nonblocking {
                Some(Err(SendError::WouldBlock))
            } else {
                None
            }
        };
        let mut head = self.head_cache;
        let outcome = ring
            .ctl()
            .producer
            .space
            .wait_until(self.spin, deadline, |_| fresh(&mut head));
        self.head_cache = head;
        outcome.unwrap_or(Err(SendError::Timeout))
    }

    /// Writes one record at the tail; space was checked.
    fn write_record(&mut self, payload: &[u8], flags: u32, size: u64) {
        let cap = self.ring.capacity;
        let off = self.tail & (cap - 1);
        if off + size > cap {
            // A record never straddles the end: pad up to it.
            let pad = cap - off;
            self.commit(self.tail, pad, RECORD_PAD, &[]);
            self.tail += pad;
        }
        self.commit(self.tail, size, flags, payload);
        self.tail += size;
        self.ring_read = false;
        if flags & RECORD_MORE == 0 {
            self.sent += 1;
        }
        debug_assert!(self.tail - self.head_cache <= cap);
        // SAFETY: `bell` points into `doorbell`'s segment, which it keeps
        // mapped; the receiver is woken if it parked (the commit's swap was
        // the barrier).
        unsafe { &*self.bell }.notify_after_seqcst_rmw();
    }

    fn commit(&self, pos: u64, size: u64, flags: u32, payload: &[u8]) {
        debug_assert!(RECORD_HEADER_BYTES + payload.len() <= size as usize);
        let h = self.ring.header_at(pos);
        h.len.store(payload.len() as u32, Ordering::Relaxed);
        h.flags.store(flags, Ordering::Relaxed);
        let off = (pos & (self.ring.capacity - 1)) as usize;
        // SAFETY: the record [off, off + size) lies within the data area (a
        // record never straddles the end: a pad record is written instead),
        // it is free (checked by the caller against the consumer's head), and
        // the consumer reads it only after the Release store below.
        unsafe {
            std::ptr::copy_nonoverlapping(
                payload.as_ptr(),
                self.ring.data().add(off + RECORD_HEADER_BYTES),
                payload.len(),
            );
        }
        // A SeqCst swap publishes the record (Release is implied) and is the
        // full barrier the doorbell check after it needs.
        h.commit.swap(self.ring.stamp(pos), Ordering::SeqCst);
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        close_sender_side(&self.ring.seg);
        self.doorbell.notice();
    }
}

/// Set to `0` to keep consumers from evicting the ring lines they read.
pub const EVICT_ENV: &str = "NEFELE_RING_EVICT";

/// The largest record (header and payload) whose lines a consumer evicts
/// once read (see [`evicts_read_lines`]).
pub const EVICT_RECORD_BYTES: u64 = 256;

/// Whether consumers evict the lines of the small records they read in a
/// stream (x86 with `clflushopt`, unless [`EVICT_ENV`] is `0`).
///
/// A line the consumer read stays in its core's cache until the producer
/// comes round the ring again, and the producer's store then has to take
/// it from that core; with a full barrier per commit the producer waits
/// for each such transfer in turn, which bounds a stream of small
/// messages. Evicted, the line is in no core's cache when the producer
/// comes back, and its stores do not wait on the other core: 64 B
/// throughput on a Zen 4 host 22 → 37–41 M msg/s (`perf/NOTES.md`).
/// The consumer evicts when it has time: when it finds the ring empty
/// after a burst (as its hold begins; see the module doc) and when it
/// publishes its head within one, never right after taking a single
/// message (an eviction writes the line back from the producer's cache,
/// and the consumer's next full barrier, say the commit of its reply,
/// would wait for that: 200 B round trips took 1.5 ×). Records over
/// [`EVICT_RECORD_BYTES`] are left alone: evicting their many lines cost
/// large messages' blocking round trips, most of all when both ends
/// share a core (and its cache).
pub fn evicts_read_lines() -> bool {
    static EVICTS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *EVICTS.get_or_init(|| std::env::var(EVICT_ENV).map_or(true, |v| v != "0") && has_clflushopt())
}

#[cfg(target_arch = "x86_64")]
fn has_clflushopt() -> bool {
    // Leaf 7 is read only if the processor reports it.
    use std::arch::x86_64::__cpuid_count;
    __cpuid_count(0, 0).eax >= 7 && __cpuid_count(7, 0).ebx & (1 << 23) != 0
}

#[cfg(not(target_arch = "x86_64"))]
fn has_clflushopt() -> bool {
    false
}

/// The start positions of the cache lines that lie wholly in `[from, to)`.
fn whole_lines(from: u64, to: u64) -> impl Iterator<Item = u64> {
    let line = CACHE_LINE_BYTES as u64;
    let first = from.div_ceil(line) * line;
    (first..to.saturating_sub(line - 1)).step_by(CACHE_LINE_BYTES)
}

/// Evicts from every cache the lines of `ring` that lie wholly in
/// `[from, to)` (absolute positions): lines the consumer has read.
#[inline]
fn evict_lines(ring: &Ring, from: u64, to: u64) {
    for at in whole_lines(from, to) {
        let off = (at & (ring.capacity - 1)) as usize;
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `off` is within the data area; clflushopt (present:
        // checked by `evicts_read_lines`) writes a line back if it is
        // dirty and evicts it, leaving its contents as they are.
        unsafe {
            std::arch::asm!(
                "clflushopt [{0}]",
                in(reg) ring.data().add(off),
                options(nostack, preserves_flags)
            );
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = off;
    }
}

/// The receiving end of one ring.
pub struct Consumer {
    ring: Ring,
    head: u64,
    /// Fragments of a message whose last fragment has not arrived yet.
    partial: Vec<u8>,
    /// The sender broke the protocol; the ring is closed for good.
    corrupt: bool,
    /// The head as the producer last saw it (see [`PUBLISH_FRACTION`]).
    published: u64,
    /// Messages received so far (the hot slot's sequence numbers).
    received: u64,
    /// Messages taken from the ring since it was last found empty.
    burst: u32,
    /// Quick polls left that look at the hot slot only (see
    /// [`STREAM_HOLD_POLLS`]).
    hold: u32,
    /// Evict the lines of small records read in a stream (see
    /// [`evicts_read_lines`]).
    flush: bool,
    /// Where the lines not yet evicted (or passed over) start.
    evict_from: u64,
}

impl Consumer {
    /// Closes this ring to new messages, as [`revoke`] does: for a receiver
    /// that moved to another tenant, on the rings of its own process that
    /// no daemon watches.
    pub fn revoke(&self) {
        revoke(&self.ring.seg);
    }

    pub fn attach(seg: Arc<Segment>) -> std::io::Result<Self> {
        let ring = attach(seg)?;
        let head = ring.ctl().consumer.head.load(Ordering::Acquire);
        Ok(Consumer {
            ring,
            head,
            partial: Vec::new(),
            corrupt: false,
            published: head,
            received: 0,
            burst: 0,
            hold: 0,
            flush: evicts_read_lines(),
            evict_from: head,
        })
    }

    /// Unreliable messages the producer dropped so far.
    pub fn dropped(&self) -> u64 {
        self.ring.ctl().producer.dropped.load(Ordering::Relaxed)
    }

    /// Whether a record is committed past the head: one load, for a loop
    /// that spins over many rings (it does not see a closed producer).
    #[inline]
    pub fn has_record(&self) -> bool {
        self.ring.committed(self.head) || self.hot_ready()
    }

    /// Whether the hot slot holds the next message.
    #[inline]
    fn hot_ready(&self) -> bool {
        self.ring.hot().commit.load(Ordering::Acquire) == self.ring.hot_stamp(self.received + 1)
    }

    /// Takes the next message from the hot slot into `out`.
    #[inline]
    fn take_hot(&mut self, out: &mut Vec<u8>) -> Poll {
        let h = self.ring.hot();
        let len = h.len.load(Ordering::Relaxed) as usize;
        if len > HOT_SLOT_MAX_PAYLOAD || !self.partial.is_empty() {
            return self.broken(
                "the hot slot holds more than it can, or a message before a fragmented one ended",
            );
        }
        out.clear();
        out.reserve(len);
        // SAFETY: the message was committed (Acquire in `hot_ready`), lies
        // within the slot (checked), and the producer will not touch the
        // slot until the Release store below.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ring.hot_data(), out.as_mut_ptr(), len);
            out.set_len(len);
        }
        self.received += 1;
        h.taken.store(self.received, Ordering::Release);
        Poll::Message
    }

    /// Appends the next whole message to `out` (which it clears first) if
    /// one is there.
    #[inline]
    pub fn try_recv(&mut self, out: &mut Vec<u8>) -> Poll {
        self.poll(out, Check::Full)
    }

    /// [`Consumer::try_recv`]; a [`Check::Quick`] poll does not look whether
    /// the producer is gone (it reports `Empty` instead of `Closed`).
    #[inline]
    pub fn poll(&mut self, out: &mut Vec<u8>, check: Check) -> Poll {
        if self.corrupt {
            return Poll::Closed;
        }
        if self.hold > 0 && check == Check::Quick {
            self.hold -= 1;
            return if self.hot_ready() {
                self.take_hot(out)
            } else {
                Poll::Empty
            };
        }
        loop {
            // The ring first, then the slot: a record seen in the ring
            // means anything the producer put in the slot before it is
            // seen too, and the slot's message, if it is the next one,
            // comes first (see the module doc).
            let in_ring = self.ring.committed(self.head);
            if self.hot_ready() {
                return self.take_hot(out);
            }
            if !in_ring {
                if self.burst >= 2 {
                    self.hold = STREAM_HOLD_POLLS;
                    self.evict_read_lines();
                }
                self.evict_from = self.head;
                self.burst = 0;
                self.ring.prefetch_after(self.head);
                self.ring.prefetch_hot_tail();
                if self.published != self.head {
                    self.publish_head();
                }
                return match check {
                    Check::Quick => Poll::Empty,
                    Check::Full => self.empty_or_closed(),
                };
            }
            let h = self.ring.header_at(self.head);
            let len = h.len.load(Ordering::Relaxed) as usize;
            let flags = h.flags.load(Ordering::Relaxed);
            let off = (self.head & (self.ring.capacity - 1)) as usize;
            let size = if flags & RECORD_PAD != 0 {
                self.ring.capacity - off as u64
            } else {
                record_bytes(len)
            };
            if off as u64 + size > self.ring.capacity
                || self.partial.len() + len > MAX_MESSAGE_BYTES
            {
                return self.broken(
                    "a record crosses the end of the ring or a message exceeds MAX_MESSAGE_BYTES",
                );
            }
            if flags & RECORD_PAD == 0 {
                let to_partial = flags & RECORD_MORE != 0 || !self.partial.is_empty();
                if !to_partial {
                    out.clear();
                }
                let dst: &mut Vec<u8> = if to_partial {
                    &mut self.partial
                } else {
                    &mut *out
                };
                dst.reserve(len);
                // SAFETY: the record was committed (Acquire above), lies
                // within the data area (asserted), and the producer will not
                // touch it until we publish a head past it.
                unsafe {
                    let src = self.ring.data().add(off + RECORD_HEADER_BYTES);
                    let at = dst.len();
                    std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr().add(at), len);
                    dst.set_len(at + len);
                }
            }
            self.head += size;
            if flags & (RECORD_PAD | RECORD_MORE) != 0 || size > EVICT_RECORD_BYTES {
                // Only whole small records' lines are evicted.
                self.evict_from = self.head;
            }
            if flags & (RECORD_PAD | RECORD_MORE) != 0 {
                self.publish_head();
                continue;
            }
            if self.head - self.published >= self.ring.capacity / PUBLISH_FRACTION {
                self.evict_read_lines();
                self.publish_head();
            }
            if !self.partial.is_empty() {
                out.clear();
                std::mem::swap(out, &mut self.partial);
            }
            self.received += 1;
            self.burst += 1;
            return Poll::Message;
        }
    }

    /// Evicts the lines of the small records read since the last time
    /// (see [`evicts_read_lines`]).
    #[inline]
    fn evict_read_lines(&mut self) {
        if self.flush {
            evict_lines(&self.ring, self.evict_from, self.head);
        }
        self.evict_from = self.head;
    }

    /// Tells the producer how far this consumer has read, and wakes it if
    /// it waits for room.
    fn publish_head(&mut self) {
        self.published = self.head;
        let ctl = self.ring.ctl();
        ctl.consumer.head.swap(self.head, Ordering::SeqCst);
        ctl.producer.space.notify_after_seqcst_rmw();
    }

    /// A sender that breaks the ring protocol (a bug, or a hostile process)
    /// loses its link, and nothing else: the receiver reports the ring
    /// closed, and the sender gets `PeerGone`.
    #[cold]
    fn broken(&mut self, why: &str) -> Poll {
        if !self.corrupt {
            eprintln!("fabric: dropping a corrupt ring from its sender: {why}");
            self.corrupt = true;
            close_receiver_side(&self.ring.seg);
        }
        Poll::Closed
    }

    fn empty_or_closed(&mut self) -> Poll {
        if self.ring.closed() & TX_GONE == 0 {
            return Poll::Empty;
        }
        // The producer is gone; anything it committed is visible now.
        if self.has_record() {
            Poll::Empty // more to read: the caller polls again
        } else {
            Poll::Closed
        }
    }
}

/// What a fair poll over several rings found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// Ring `i` gave a whole message.
    Message(usize),
    /// Ring `i`'s producer is gone and everything it sent has been read.
    Closed(usize),
}

/// Polls the rings of `items` round-robin, starting at `*next`, so that one
/// busy sender cannot starve the others; after a message, `*next` moves
/// past the ring that gave it.
#[inline]
pub fn poll_fair<T>(
    items: &mut [T],
    next: &mut usize,
    out: &mut Vec<u8>,
    check: Check,
    consumer: impl Fn(&mut T) -> &mut Consumer,
) -> Option<Found> {
    let n = items.len();
    let mut i = if *next < n { *next } else { 0 };
    for _ in 0..n {
        match consumer(&mut items[i]).poll(out, check) {
            Poll::Message => {
                *next = i + 1;
                return Some(Found::Message(i));
            }
            Poll::Closed => return Some(Found::Closed(i)),
            Poll::Empty => {}
        }
        i = if i + 1 == n { 0 } else { i + 1 };
    }
    None
}

impl Drop for Consumer {
    fn drop(&mut self) {
        close_receiver_side(&self.ring.seg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(capacity: usize) -> (Arc<Segment>, Producer, Consumer) {
        let seg = Arc::new(Segment::anonymous(segment_bytes(capacity)).expect("memory"));
        format(&seg).expect("format");
        let bell = Arc::new(
            Doorbell::new(Segment::anonymous(DOORBELL_BYTES).expect("memory")).expect("doorbell"),
        );
        let p = Producer::attach(seg.clone(), bell).expect("producer");
        let c = Consumer::attach(seg.clone()).expect("consumer");
        (seg, p, c)
    }

    #[test]
    fn a_corrupt_record_closes_the_ring_instead_of_crashing_the_receiver() {
        let (seg, mut p, mut c) = pair(4096);
        p.send(b"fine", SendMode::RELIABLE, None).expect("send");
        let mut out = Vec::new();
        assert_eq!(c.try_recv(&mut out), Poll::Message);
        // A hostile sender commits a record that claims to run past the end.
        let next = c.head;
        // SAFETY: test-only scribbling over the ring's data area, which this
        // test owns; the offset is a record boundary inside the ring.
        unsafe {
            let h = seg.as_ptr().add(RING_CONTROL_BYTES + next as usize) as *mut RecordHeader;
            (*h).len = 1 << 30;
            (*h).flags = 0;
            (*(h as *const AtomicU64)).store(c.ring.stamp(next), Ordering::Release);
        }
        assert_eq!(c.try_recv(&mut out), Poll::Closed);
        assert_eq!(c.try_recv(&mut out), Poll::Closed, "stays closed");
        assert_eq!(
            p.send(b"more", SendMode::RELIABLE, None),
            Err(SendError::PeerGone)
        );
    }

    #[test]
    fn a_consumer_that_took_everything_never_holds_up_the_largest_record() {
        // The consumer publishes its head lazily. Whatever it took, and
        // wherever the ring stands, once it has taken every message (and
        // polls no more), a non-blocking send of the largest record fits.
        let capacity = 4096;
        let (_seg, mut p, mut c) = pair(capacity);
        let largest = vec![7u8; capacity / 4 - RECORD_HEADER_BYTES];
        let mut out = Vec::new();
        for round in 0..2000usize {
            let size = [0, 1, 48, 49, 200, 333, 700, 900][round % 8];
            let count = 1 + round % 3;
            for _ in 0..count {
                p.send(
                    &vec![round as u8; size],
                    SendMode::RELIABLE_NONBLOCKING,
                    None,
                )
                .expect("a few small messages fit");
            }
            for _ in 0..count {
                assert_eq!(c.try_recv(&mut out), Poll::Message);
                assert_eq!(out, vec![round as u8; size]);
            }
            assert_eq!(
                p.send(&largest, SendMode::RELIABLE_NONBLOCKING, None),
                Ok(()),
                "round {round}: the producer waits on bytes the consumer took"
            );
            assert_eq!(c.try_recv(&mut out), Poll::Message);
            assert_eq!(out, largest);
        }
    }

    #[test]
    fn after_a_burst_quick_polls_leave_the_ring_alone_for_a_while() {
        let (_seg, mut p, mut c) = pair(1 << 16);
        p.look_every = 0;
        let mut out = Vec::new();
        let ring_sized = vec![3u8; HOT_SLOT_MAX_PAYLOAD + 1];
        let send = |p: &mut Producer, m: &[u8]| p.send(m, SendMode::RELIABLE_NONBLOCKING, None);
        // One message at a time (a request, a reply): never held.
        for _ in 0..3 {
            send(&mut p, &ring_sized).expect("fits");
            assert_eq!(c.poll(&mut out, Check::Quick), Poll::Message);
            assert_eq!(c.poll(&mut out, Check::Quick), Poll::Empty);
        }
        send(&mut p, &ring_sized).expect("fits");
        assert_eq!(c.poll(&mut out, Check::Quick), Poll::Message, "not held");
        assert_eq!(c.poll(&mut out, Check::Quick), Poll::Empty);
        // A burst of two taken, an empty ring found, one more message sent.
        let burst_then_one = |p: &mut Producer, c: &mut Consumer, out: &mut Vec<u8>| {
            for _ in 0..2 {
                send(p, &ring_sized).expect("fits");
            }
            for _ in 0..2 {
                assert_eq!(c.poll(out, Check::Quick), Poll::Message);
            }
            assert_eq!(c.poll(out, Check::Quick), Poll::Empty);
            send(p, &ring_sized).expect("fits");
        };
        // After a burst, quick polls hold off.
        burst_then_one(&mut p, &mut c, &mut out);
        for i in 0..STREAM_HOLD_POLLS {
            assert_eq!(c.poll(&mut out, Check::Quick), Poll::Empty, "poll {i}");
        }
        assert_eq!(
            c.poll(&mut out, Check::Quick),
            Poll::Message,
            "the hold ends"
        );
        assert_eq!(out, ring_sized);
        // While held, a thorough poll still takes a record, and a quick one
        // still takes the hot slot's message.
        burst_then_one(&mut p, &mut c, &mut out);
        assert_eq!(c.poll(&mut out, Check::Quick), Poll::Empty, "held");
        assert_eq!(c.poll(&mut out, Check::Full), Poll::Message);
        assert_eq!(c.poll(&mut out, Check::Full), Poll::Empty);
        send(&mut p, b"small").expect("fits");
        assert_eq!(
            c.poll(&mut out, Check::Quick),
            Poll::Message,
            "from the slot"
        );
        assert_eq!(out, b"small");
    }

    #[test]
    fn only_lines_wholly_read_are_evicted() {
        let lines = |from, to| whole_lines(from, to).collect::<Vec<_>>();
        assert_eq!(lines(0, 64), vec![0]);
        assert_eq!(lines(0, 63), Vec::<u64>::new());
        assert_eq!(
            lines(16, 128),
            vec![64],
            "the first line was partly read before"
        );
        assert_eq!(lines(64, 208), vec![64, 128]);
        assert_eq!(lines(80, 96), Vec::<u64>::new());
        assert_eq!(lines(5, 5), Vec::<u64>::new());
        let far = (1 << 40) + 48;
        assert_eq!(lines(far, far + 80), vec![far + 16]);
    }

    #[test]
    fn old_payload_where_a_header_goes_never_looks_committed() {
        // Lap one leaves, at every record boundary inside a record's
        // payload, the number that would have been lap two's commit word
        // there without the ring's key: position + 1.
        let capacity = 4096u64;
        let (_seg, mut p, mut c) = pair(capacity as usize);
        let mut out = Vec::new();
        let record = 1024u64;
        let payload_len = record as usize - RECORD_HEADER_BYTES;
        for r in 0..capacity / record {
            let mut payload = vec![0u8; payload_len];
            for at_record in (RECORD_ALIGN as u64..record).step_by(RECORD_ALIGN) {
                let at = (at_record as usize) - RECORD_HEADER_BYTES;
                let next_lap = capacity + r * record + at_record;
                payload[at..at + 8].copy_from_slice(&(next_lap + 1).to_ne_bytes());
            }
            p.send(&payload, SendMode::RELIABLE_NONBLOCKING, None)
                .expect("fits");
            assert_eq!(c.try_recv(&mut out), Poll::Message);
        }
        // Lap two: one message of two lines (too large for the hot slot),
        // so the head moves onto old payload.
        let two_lines = vec![1u8; HOT_SLOT_MAX_PAYLOAD + 1];
        p.send(&two_lines, SendMode::RELIABLE_NONBLOCKING, None)
            .expect("fits");
        assert_eq!(c.try_recv(&mut out), Poll::Message);
        assert_eq!(out, two_lines);
        assert_eq!(c.head, capacity + record_bytes(two_lines.len()));
        assert_eq!(
            c.try_recv(&mut out),
            Poll::Empty,
            "old payload taken for a record"
        );
        p.send(b"next", SendMode::RELIABLE_NONBLOCKING, None)
            .expect("fits");
        assert_eq!(c.try_recv(&mut out), Poll::Message);
        assert_eq!(out, b"next");
    }

    /// Message `k` of the ordering tests: its number in its first bytes.
    fn numbered(k: u32, size: usize) -> Vec<u8> {
        let mut m = vec![k as u8; size];
        let n = size.min(4);
        m[..n].copy_from_slice(&k.to_le_bytes()[..n]);
        m
    }

    #[test]
    fn messages_keep_their_order_between_the_hot_slot_and_the_ring() {
        // Sizes on both sides of the slot's limit and fragmented ones, in
        // bursts of different lengths, the consumer taking some, all or
        // none in between: each arrives once, in order, and both the slot
        // and the ring were used.
        for look_every in [0, HOT_LOOK_EVERY] {
            mixed_order(look_every);
        }
    }

    fn mixed_order(look_every: u32) {
        let (_seg, mut p, mut c) = pair(4096);
        p.look_every = look_every;
        let sizes = [
            0,
            3,
            64,
            HOT_SLOT_MAX_PAYLOAD,
            HOT_SLOT_MAX_PAYLOAD + 1,
            300,
            2500,
        ];
        let mut out = Vec::new();
        let (mut sent, mut got) = (0u32, 0u32);
        let take = |c: &mut Consumer, got: &mut u32, out: &mut Vec<u8>| {
            let polled = c.try_recv(out);
            if polled == Poll::Message {
                let size = sizes[*got as usize % sizes.len()];
                assert_eq!(*out, numbered(*got, size), "message {got}");
                *got += 1;
            }
            polled
        };
        let mut hot_used = 0;
        for round in 0..3000u32 {
            for _ in 0..1 + round % 5 {
                let size = sizes[sent as usize % sizes.len()];
                let before = p.hot_last;
                match p.send(&numbered(sent, size), SendMode::RELIABLE_NONBLOCKING, None) {
                    Ok(()) => sent += 1,
                    Err(SendError::WouldBlock) => break,
                    Err(e) => panic!("send: {e}"),
                }
                hot_used += u32::from(p.hot_last != before);
            }
            let takes = if round % 7 == 0 { u32::MAX } else { round % 3 };
            for _ in 0..takes {
                if take(&mut c, &mut got, &mut out) != Poll::Message {
                    break;
                }
            }
        }
        while got < sent {
            assert_eq!(take(&mut c, &mut got, &mut out), Poll::Message);
        }
        assert_eq!(c.try_recv(&mut out), Poll::Empty);
        let least = if look_every == 0 { 100 } else { 5 };
        assert!(hot_used > least, "the slot took {hot_used} messages");
        assert!(p.tail > 100_000, "the ring took {} bytes", p.tail);
    }

    #[test]
    fn a_concurrent_stream_keeps_its_order_across_the_hot_slot_and_the_ring() {
        // A sender thread that looks for a read ring at every send and
        // pauses now and then (so the stream switches between slot and ring
        // as often as it can) and a receiver spinning in another: every
        // message once, in order.
        const N: u32 = 200_000;
        let (_seg, mut p, mut c) = pair(4096);
        p.look_every = 0;
        let size = |k: u32| (k as usize * 37) % (2 * HOT_SLOT_MAX_PAYLOAD);
        let sender = std::thread::spawn(move || {
            let mut hot_used = 0u32;
            for k in 0..N {
                let before = p.hot_last;
                p.send(&numbered(k, size(k)), SendMode::RELIABLE, None)
                    .expect("send");
                hot_used += u32::from(p.hot_last != before);
                // Now and then the receiver catches up, so the next send
                // may go to the slot while the ring is being read.
                if k % 4 == 0 {
                    for _ in 0..k % 200 {
                        std::hint::spin_loop();
                    }
                }
            }
            hot_used
        });
        let mut out = Vec::new();
        let give_up = Instant::now() + Duration::from_secs(60);
        for k in 0..N {
            loop {
                match c.try_recv(&mut out) {
                    Poll::Message => break,
                    Poll::Empty => {
                        assert!(Instant::now() < give_up, "stuck at message {k}");
                        std::hint::spin_loop();
                    }
                    Poll::Closed => panic!("closed at message {k}"),
                }
            }
            assert_eq!(out, numbered(k, size(k)), "message {k}");
        }
        let hot_used = sender.join().expect("sender");
        assert!(
            hot_used > N / 100,
            "{hot_used} of {N} messages went through the slot"
        );
    }

    #[test]
    fn a_request_and_reply_exchange_stays_in_the_hot_slot() {
        let (_seg, mut p, mut c) = pair(4096);
        let mut out = Vec::new();
        for k in 0..1000 {
            p.send(&numbered(k, 64), SendMode::RELIABLE, None)
                .expect("send");
            assert_eq!(c.try_recv(&mut out), Poll::Message);
            assert_eq!(out, numbered(k, 64));
        }
        assert_eq!((p.tail, p.hot_last), (0, 1000), "no record in the ring");
        // A burst falls back to the ring; once the consumer has caught up
        // (and said so by finding the ring empty), the slot takes over again.
        for k in 1000..1010 {
            p.send(&numbered(k, 64), SendMode::RELIABLE, None)
                .expect("send");
        }
        assert_eq!(p.hot_last, 1001, "only the first of the burst in the slot");
        for k in 1000..1010 {
            assert_eq!(c.try_recv(&mut out), Poll::Message);
            assert_eq!(out, numbered(k, 64));
        }
        assert_eq!(c.try_recv(&mut out), Poll::Empty);
        // The producer looks again within HOT_LOOK_EVERY sends.
        let mut k = 1010;
        while p.hot_last == 1001 {
            assert!(k <= 1010 + HOT_LOOK_EVERY, "not back in the slot");
            p.send(&numbered(k, 64), SendMode::RELIABLE, None)
                .expect("send");
            assert_eq!(c.try_recv(&mut out), Poll::Message);
            assert_eq!(out, numbered(k, 64));
            // A receiver waiting for the next request finds the ring
            // empty, and publishes its head.
            assert_eq!(c.try_recv(&mut out), Poll::Empty);
            k += 1;
        }
        assert_eq!(p.hot_last, u64::from(k), "the last one went to the slot");
    }

    #[test]
    fn a_message_left_in_the_hot_slot_arrives_before_the_ring_reports_closed() {
        let (_seg, mut p, mut c) = pair(4096);
        p.send(b"last words", SendMode::RELIABLE, None)
            .expect("send");
        drop(p);
        let mut out = Vec::new();
        assert_eq!(c.try_recv(&mut out), Poll::Message);
        assert_eq!(out, b"last words");
        assert_eq!(c.try_recv(&mut out), Poll::Closed);
    }

    #[test]
    fn a_hot_slot_that_claims_too_much_closes_the_ring() {
        let (_seg, mut p, mut c) = pair(4096);
        // A hostile sender commits a message longer than the slot.
        let h = c.ring.hot();
        h.len
            .store(HOT_SLOT_MAX_PAYLOAD as u32 + 1, Ordering::Relaxed);
        h.commit.store(c.ring.hot_stamp(1), Ordering::Release);
        let mut out = Vec::new();
        assert_eq!(c.try_recv(&mut out), Poll::Closed);
        assert_eq!(
            p.send(b"more", SendMode::RELIABLE, None),
            Err(SendError::PeerGone)
        );
    }

    #[test]
    fn an_endless_fragmented_message_is_cut_off_at_the_limit() {
        let (seg, _p, mut c) = pair(4096);
        // Records flagged MORE forever would grow the receiver's buffer
        // without bound; simulate one whose total would exceed the limit.
        c.partial = vec![0; MAX_MESSAGE_BYTES];
        // SAFETY: as above; position 0 is the first record.
        unsafe {
            let h = seg.as_ptr().add(RING_CONTROL_BYTES) as *mut RecordHeader;
            (*h).len = 16;
            (*h).flags = RECORD_MORE;
            (*(h as *const AtomicU64)).store(c.ring.stamp(0), Ordering::Release);
        }
        let mut out = Vec::new();
        assert_eq!(c.try_recv(&mut out), Poll::Closed);
    }
}
