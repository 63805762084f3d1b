//! The RDMA link: one sender→receiver link over a reliable-connected queue
//! pair, for node links where an RDMA device exists.
//!
//! The protocol is written against [`Verbs`], the handful of operations it
//! issues (register memory, post a send or a receive, poll completions),
//! so that it is tested without hardware against [`LoopbackVerbs`] — which
//! behaves like an RC queue pair, including failing a send that finds no
//! receive posted — and runs against ibverbs (`rdma-sys`, cargo feature
//! `rdma`) where a device exists. No RDMA device was available where this
//! was written: the ibverbs backend is built and compile-checked only.
//!
//! - **Memory registration.** Each end registers two regions once, at
//!   setup: its receive slots and its send slots. Messages are copied into
//!   a send slot (never registered per message: registration costs a
//!   system call and pins pages) and out of a receive slot.
//! - **Credits.** The receiver posts all its slots; the sender starts with
//!   one credit per slot and spends one per send, so it never sends into a
//!   missing receive (on RC hardware that is a receiver-not-ready error).
//!   The receiver reposts a slot once the application has taken its
//!   message, and returns credits in batches of a quarter of the slots in
//!   a small credit message, cumulative so that only the latest counts.
//!   Credit messages have receives of their own at the sender
//!   ([`CREDIT_RECEIVES`]); the sender tells, in each data message's
//!   immediate value, how many credit messages it has taken, so the
//!   receiver never has more of them in flight than the sender has
//!   receives for.
//! - **Fragments.** A message larger than a slot is sent as several, the
//!   last without [`FLAG_MORE`]; an unreliable message must fit one slot,
//!   and is dropped (and counted) when there is no credit.
//! - **Peer death** surfaces as an error from [`Verbs::poll`] (on hardware:
//!   a flushed or retry-exceeded completion): the sender gets `PeerGone`,
//!   the receiver drains what arrived and then reports the sender gone.

#[cfg(feature = "rdma")]
pub mod ibverbs;

use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};

use crate::ring::{SendError, SendMode, MAX_MESSAGE_BYTES};
use crate::transport::{next_wait, LinkRx, LinkTx, RecvError, Transport};

/// Receives a sender posts for credit messages.
pub const CREDIT_RECEIVES: usize = 2;
/// Largest slot: big enough to amortise a work request, small enough that
/// a few of them fit a modest registration.
pub const MAX_SLOT_BYTES: usize = 64 << 10;
/// Smallest slot.
pub const MIN_SLOT_BYTES: usize = 256;
/// Slots a link's capacity is cut into (while slots stay within bounds).
pub const SLOTS_PER_CAPACITY: usize = 16;
/// Fewest slots a link has.
pub const MIN_SLOTS: usize = 4;

/// Longest single wait for completions, so a blocked end still returns
/// credits and notices its deadline.
const WAIT_STEP: Duration = Duration::from_millis(50);
/// Slot header: `[u32 len][u8 flags][3 bytes zero]`.
const SLOT_HEADER_BYTES: usize = 8;
/// More fragments of this message follow.
pub const FLAG_MORE: u8 = 1;
/// A credit message: its length field is the cumulative credit count.
const FLAG_CREDIT: u8 = 2;

/// Which queue a completion came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Send,
    Recv,
}

/// A work completion, as the protocol needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub wr_id: u64,
    pub op: Op,
    /// Bytes received (receives only).
    pub len: usize,
    /// The immediate value the send carried (receives only).
    pub imm: u32,
}

/// The verbs the protocol issues on one end of a queue pair.
pub trait Verbs: Send + 'static {
    /// Registers `region` (which the caller keeps alive and in place until
    /// [`Verbs::deregister`]); returns its key.
    fn register(&mut self, region: &mut [u8]) -> io::Result<u32>;
    fn deregister(&mut self, key: u32);
    /// Posts a receive into `len` bytes at `offset` of region `key`.
    fn post_recv(&mut self, wr_id: u64, key: u32, offset: usize, len: usize) -> io::Result<()>;
    /// Posts a send of `len` bytes at `offset` of region `key`, with an
    /// immediate value.
    fn post_send(
        &mut self,
        wr_id: u64,
        key: u32,
        offset: usize,
        len: usize,
        imm: u32,
    ) -> io::Result<()>;
    /// Appends ready completions to `out`, waiting up to `wait` for the
    /// first. An error means the connection is gone (after every
    /// completion that preceded it was returned).
    fn poll(&mut self, out: &mut Vec<Completion>, wait: Duration) -> io::Result<()>;
}

/// An RDMA device node links can use, and how two ends of a queue pair on
/// it are connected: each side opens an end ([`RdmaDevice::open`]), tells
/// the other its [`RdmaEnd::address`] (the node link's TCP handshake
/// carries it), and connects to the other's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RdmaDevice {
    /// An ibverbs device, by name (cargo feature `rdma`).
    #[cfg(feature = "rdma")]
    Ibverbs(String),
    /// In-memory queue pairs ([`LoopbackVerbs`]) between nodes that run in
    /// one process: the node-link logic over RDMA, tested without hardware.
    Loopback,
}

/// Which RDMA device a node's links use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum RdmaMode {
    /// The first ibverbs device, if this build has the `rdma` feature and
    /// the machine a device; otherwise TCP.
    #[default]
    Auto,
    /// TCP only.
    Off,
    /// This device.
    Use(RdmaDevice),
}

impl RdmaMode {
    /// The device to use, or why there is none.
    pub fn resolve(&self) -> Result<RdmaDevice, String> {
        match self {
            RdmaMode::Off => Err(RDMA_OFF.to_string()),
            RdmaMode::Use(d) => Ok(d.clone()),
            RdmaMode::Auto => RdmaDevice::detect(),
        }
    }
}

/// Why a node has no RDMA device when it was told not to use one.
pub const RDMA_OFF: &str = "off";

/// The first byte of an end's address: which kind of device it is on.
#[cfg_attr(not(feature = "rdma"), allow(dead_code))]
const ADDRESS_IBVERBS: u8 = 1;
const ADDRESS_LOOPBACK: u8 = 2;

impl RdmaDevice {
    /// The first ibverbs device of this machine, or why there is none.
    pub fn detect() -> Result<RdmaDevice, String> {
        #[cfg(feature = "rdma")]
        {
            ibverbs::devices()
                .into_iter()
                .next()
                .map(RdmaDevice::Ibverbs)
                .ok_or_else(|| "no RDMA device on this machine".to_string())
        }
        #[cfg(not(feature = "rdma"))]
        {
            Err("built without the `rdma` cargo feature".to_string())
        }
    }

    /// The name status output shows.
    pub fn name(&self) -> String {
        match self {
            #[cfg(feature = "rdma")]
            RdmaDevice::Ibverbs(name) => name.clone(),
            RdmaDevice::Loopback => "loopback (in-process)".to_string(),
        }
    }

    /// Opens an end of a new queue pair for a link of about
    /// `capacity_bytes`, not connected yet.
    pub fn open(&self, capacity_bytes: usize) -> io::Result<RdmaEnd> {
        match self {
            #[cfg(feature = "rdma")]
            RdmaDevice::Ibverbs(name) => {
                let (_, slots) = geometry(capacity_bytes);
                let verbs = ibverbs::IbvVerbs::open(name, (slots + CREDIT_RECEIVES + 1) as u32)?;
                let info = verbs.info()?;
                let mut address = vec![ADDRESS_IBVERBS];
                address.extend_from_slice(&info.encode());
                Ok(RdmaEnd {
                    verbs: DeviceVerbs::Ibverbs(verbs),
                    address,
                    info: Some(info),
                })
            }
            RdmaDevice::Loopback => {
                let _ = capacity_bytes;
                let (verbs, a) = LoopbackVerbs::unconnected();
                let mut address = vec![ADDRESS_LOOPBACK];
                address.extend_from_slice(&a.to_le_bytes());
                Ok(RdmaEnd {
                    verbs: DeviceVerbs::Loopback(verbs),
                    address,
                    #[cfg(feature = "rdma")]
                    info: None,
                })
            }
        }
    }
}

/// One end of a queue pair, opened and not yet connected.
pub struct RdmaEnd {
    verbs: DeviceVerbs,
    address: Vec<u8>,
    #[cfg(feature = "rdma")]
    info: Option<ibverbs::QpInfo>,
}

impl RdmaEnd {
    /// What the peer needs to connect its end to this one.
    pub fn address(&self) -> &[u8] {
        &self.address
    }

    /// Connects to the peer's end at `peer` (its [`RdmaEnd::address`]).
    pub fn connect(self, peer: &[u8]) -> io::Result<DeviceVerbs> {
        let mismatch = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "the peer's RDMA address is of another kind of device",
            )
        };
        #[cfg(feature = "rdma")]
        let RdmaEnd {
            mut verbs, info, ..
        } = self;
        #[cfg(not(feature = "rdma"))]
        let RdmaEnd { mut verbs, .. } = self;
        match (&mut verbs, peer.split_first()) {
            #[cfg(feature = "rdma")]
            (DeviceVerbs::Ibverbs(v), Some((&ADDRESS_IBVERBS, rest))) => {
                let peer = ibverbs::QpInfo::decode(rest).ok_or_else(mismatch)?;
                v.connect(info.as_ref().ok_or_else(mismatch)?, &peer)?;
            }
            (DeviceVerbs::Loopback(v), Some((&ADDRESS_LOOPBACK, rest))) => {
                let a = u64::from_le_bytes(rest.try_into().map_err(|_| mismatch())?);
                v.connect_to(a)?;
            }
            _ => return Err(mismatch()),
        }
        Ok(verbs)
    }
}

/// The verbs of whichever device a node link runs on.
pub enum DeviceVerbs {
    #[cfg(feature = "rdma")]
    Ibverbs(ibverbs::IbvVerbs),
    Loopback(LoopbackVerbs),
}

impl Verbs for DeviceVerbs {
    fn register(&mut self, region: &mut [u8]) -> io::Result<u32> {
        match self {
            #[cfg(feature = "rdma")]
            DeviceVerbs::Ibverbs(v) => v.register(region),
            DeviceVerbs::Loopback(v) => v.register(region),
        }
    }

    fn deregister(&mut self, key: u32) {
        match self {
            #[cfg(feature = "rdma")]
            DeviceVerbs::Ibverbs(v) => v.deregister(key),
            DeviceVerbs::Loopback(v) => v.deregister(key),
        }
    }

    fn post_recv(&mut self, wr_id: u64, key: u32, offset: usize, len: usize) -> io::Result<()> {
        match self {
            #[cfg(feature = "rdma")]
            DeviceVerbs::Ibverbs(v) => v.post_recv(wr_id, key, offset, len),
            DeviceVerbs::Loopback(v) => v.post_recv(wr_id, key, offset, len),
        }
    }

    fn post_send(
        &mut self,
        wr_id: u64,
        key: u32,
        offset: usize,
        len: usize,
        imm: u32,
    ) -> io::Result<()> {
        match self {
            #[cfg(feature = "rdma")]
            DeviceVerbs::Ibverbs(v) => v.post_send(wr_id, key, offset, len, imm),
            DeviceVerbs::Loopback(v) => v.post_send(wr_id, key, offset, len, imm),
        }
    }

    fn poll(&mut self, out: &mut Vec<Completion>, wait: Duration) -> io::Result<()> {
        match self {
            #[cfg(feature = "rdma")]
            DeviceVerbs::Ibverbs(v) => v.poll(out, wait),
            DeviceVerbs::Loopback(v) => v.poll(out, wait),
        }
    }
}

/// Slot geometry for a link whose buffer should hold about
/// `capacity_bytes`.
/// Many small slots rather than few large ones: like a ring, the link
/// should hold many small messages.
fn geometry(capacity_bytes: usize) -> (usize, usize) {
    let slot = (capacity_bytes / SLOTS_PER_CAPACITY).clamp(MIN_SLOT_BYTES, MAX_SLOT_BYTES);
    let slots = (capacity_bytes / slot).max(MIN_SLOTS);
    (slot, slots)
}

/// One registered region of `count` slots of `slot_bytes`.
struct Slots {
    mem: Box<[u8]>,
    key: u32,
    slot_bytes: usize,
}

impl Slots {
    fn new<V: Verbs>(verbs: &mut V, count: usize, slot_bytes: usize) -> io::Result<Slots> {
        let mut mem = vec![0u8; count * slot_bytes].into_boxed_slice();
        let key = verbs.register(&mut mem)?;
        Ok(Slots {
            mem,
            key,
            slot_bytes,
        })
    }

    fn slot(&mut self, i: usize) -> &mut [u8] {
        &mut self.mem[i * self.slot_bytes..(i + 1) * self.slot_bytes]
    }

    fn write(&mut self, i: usize, flags: u8, payload: &[u8]) -> usize {
        let s = self.slot(i);
        s[..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        s[4] = flags;
        s[5..8].fill(0);
        s[SLOT_HEADER_BYTES..SLOT_HEADER_BYTES + payload.len()].copy_from_slice(payload);
        SLOT_HEADER_BYTES + payload.len()
    }

    /// (flags, payload) of slot `i`, if it holds a well-formed message of
    /// `got` bytes.
    fn read(&mut self, i: usize, got: usize) -> Option<(u8, &[u8])> {
        let s = self.slot(i);
        let len = u32::from_le_bytes(s[..4].try_into().ok()?) as usize;
        let flags = s[4];
        if flags & FLAG_CREDIT != 0 {
            return Some((flags, &s[..4]));
        }
        (SLOT_HEADER_BYTES + len <= got.min(s.len()))
            .then(|| (flags, &s[SLOT_HEADER_BYTES..SLOT_HEADER_BYTES + len]))
    }
}

/// The sending end.
pub struct RdmaTx<V: Verbs> {
    verbs: V,
    send: Slots,
    /// Send slots free for reuse (their sends completed).
    free: VecDeque<usize>,
    credit_recv: Slots,
    /// Data credits: receives the peer has posted that we have not used.
    credits: usize,
    /// Cumulative credits the peer has returned, as last heard.
    returned: u32,
    /// Credit messages taken (and their receives reposted), cumulative:
    /// every data message tells the receiver.
    credit_msgs_taken: u32,
    dropped: u64,
    peer_gone: bool,
    completions: Vec<Completion>,
    max_message_bytes: usize,
}

/// The receiving end.
pub struct RdmaRx<V: Verbs> {
    verbs: V,
    recv: Slots,
    /// Completed receives not yet handed to the application, in order.
    ready: VecDeque<(usize, usize)>,
    partial: Vec<u8>,
    credit_send: Slots,
    /// Slots reposted since the link began (what credit messages carry).
    reposted: u32,
    /// The value the last credit message carried.
    reported: u32,
    credit_msgs_sent: u32,
    /// What the sender said it has taken of them.
    credit_msgs_taken: u32,
    credit_send_free: bool,
    slots: usize,
    gone: bool,
    completions: Vec<Completion>,
}

impl<V: Verbs> RdmaTx<V> {
    /// The sending end over `verbs` for a link of about `capacity_bytes`
    /// (both ends must agree on it).
    pub fn new(mut verbs: V, capacity_bytes: usize) -> io::Result<Self> {
        let (slot, slots) = geometry(capacity_bytes);
        let send = Slots::new(&mut verbs, slots, slot)?;
        let credit_recv = Slots::new(&mut verbs, CREDIT_RECEIVES, SLOT_HEADER_BYTES)?;
        for i in 0..CREDIT_RECEIVES {
            verbs.post_recv(
                i as u64,
                credit_recv.key,
                i * SLOT_HEADER_BYTES,
                SLOT_HEADER_BYTES,
            )?;
        }
        Ok(RdmaTx {
            verbs,
            send,
            free: (0..slots).collect(),
            credit_recv,
            credits: slots,
            returned: 0,
            credit_msgs_taken: 0,
            dropped: 0,
            peer_gone: false,
            completions: Vec::new(),
            max_message_bytes: MAX_MESSAGE_BYTES,
        })
    }

    /// Lets reliable messages be `extra` bytes longer than
    /// [`MAX_MESSAGE_BYTES`]: room for a node link's routing header.
    pub fn allow_header(mut self, extra: usize) -> Self {
        self.max_message_bytes = MAX_MESSAGE_BYTES + extra;
        self
    }

    fn max_fragment(&self) -> usize {
        self.send.slot_bytes - SLOT_HEADER_BYTES
    }

    /// Takes in completions (waiting up to `wait` for one): freed send
    /// slots and returned credits.
    fn pump(&mut self, wait: Duration) -> Result<(), SendError> {
        let mut c = std::mem::take(&mut self.completions);
        c.clear();
        let polled = self.verbs.poll(&mut c, wait);
        for done in &c {
            match done.op {
                Op::Send => self.free.push_back(done.wr_id as usize),
                Op::Recv => {
                    let i = done.wr_id as usize;
                    if let Some((flags, body)) = self.credit_recv.read(i, done.len) {
                        if flags & FLAG_CREDIT != 0 {
                            let total = u32::from_le_bytes(body.try_into().unwrap_or([0; 4]));
                            let fresh = total.wrapping_sub(self.returned);
                            self.returned = total;
                            self.credits += fresh as usize;
                        }
                    }
                    self.credit_msgs_taken = self.credit_msgs_taken.wrapping_add(1);
                    if self
                        .verbs
                        .post_recv(
                            i as u64,
                            self.credit_recv.key,
                            i * SLOT_HEADER_BYTES,
                            SLOT_HEADER_BYTES,
                        )
                        .is_err()
                    {
                        self.peer_gone = true;
                    }
                }
            }
        }
        self.completions = c;
        if polled.is_err() {
            self.peer_gone = true;
        }
        if self.peer_gone {
            return Err(SendError::PeerGone);
        }
        Ok(())
    }

    /// Waits until a credit and a send slot are free; `WouldBlock` for a
    /// non-blocking caller.
    fn wait_for_credit(
        &mut self,
        nonblocking: bool,
        deadline: Option<Instant>,
    ) -> Result<(), SendError> {
        loop {
            if self.credits > 0 && !self.free.is_empty() {
                return Ok(());
            }
            if nonblocking {
                self.pump(Duration::ZERO)?;
                if self.credits > 0 && !self.free.is_empty() {
                    return Ok(());
                }
                return Err(SendError::WouldBlock);
            }
            let wait = next_wait(deadline, WAIT_STEP).ok_or(SendError::Timeout)?;
            self.pump(wait)?;
        }
    }

    fn send_fragment(&mut self, flags: u8, payload: &[u8]) -> Result<(), SendError> {
        let i = self.free.pop_front().expect("a free slot was checked");
        let len = self.send.write(i, flags, payload);
        self.credits -= 1;
        let off = i * self.send.slot_bytes;
        if self
            .verbs
            .post_send(i as u64, self.send.key, off, len, self.credit_msgs_taken)
            .is_err()
        {
            self.peer_gone = true;
            return Err(SendError::PeerGone);
        }
        Ok(())
    }
}

impl<V: Verbs> LinkTx for RdmaTx<V> {
    fn send(
        &mut self,
        msg: &[u8],
        mode: SendMode,
        deadline: Option<Instant>,
    ) -> Result<(), SendError> {
        if self.peer_gone {
            return Err(SendError::PeerGone);
        }
        self.pump(Duration::ZERO)?;
        let frag = self.max_fragment();
        if !mode.reliable {
            if msg.len() > frag {
                return Err(SendError::TooLarge {
                    len: msg.len(),
                    max: frag,
                });
            }
            if self.credits == 0 || self.free.is_empty() {
                self.dropped += 1;
                return Ok(());
            }
            return self.send_fragment(0, msg);
        }
        if msg.len() > self.max_message_bytes {
            return Err(SendError::TooLarge {
                len: msg.len(),
                max: self.max_message_bytes,
            });
        }
        let pieces = msg.len().div_ceil(frag).max(1);
        for k in 0..pieces {
            let chunk = &msg[(k * frag).min(msg.len())..((k + 1) * frag).min(msg.len())];
            // Only the first fragment may refuse: later ones wait, so a
            // message is never left half sent.
            self.wait_for_credit(
                k == 0 && !mode.blocking,
                if k == 0 { deadline } else { None },
            )?;
            self.send_fragment(if k + 1 < pieces { FLAG_MORE } else { 0 }, chunk)?;
        }
        Ok(())
    }

    fn dropped(&self) -> u64 {
        self.dropped
    }
}

impl<V: Verbs> RdmaRx<V> {
    /// The receiving end over `verbs` for a link of about `capacity_bytes`.
    pub fn new(mut verbs: V, capacity_bytes: usize) -> io::Result<Self> {
        let (slot, slots) = geometry(capacity_bytes);
        let recv = Slots::new(&mut verbs, slots, slot)?;
        for i in 0..slots {
            verbs.post_recv(i as u64, recv.key, i * slot, slot)?;
        }
        let credit_send = Slots::new(&mut verbs, 1, SLOT_HEADER_BYTES)?;
        Ok(RdmaRx {
            verbs,
            recv,
            ready: VecDeque::new(),
            partial: Vec::new(),
            credit_send,
            reposted: 0,
            reported: 0,
            credit_msgs_sent: 0,
            credit_msgs_taken: 0,
            credit_send_free: true,
            slots,
            gone: false,
            completions: Vec::new(),
        })
    }

    fn pump(&mut self, wait: Duration) {
        let mut c = std::mem::take(&mut self.completions);
        c.clear();
        let polled = self.verbs.poll(&mut c, wait);
        for done in &c {
            match done.op {
                Op::Send => self.credit_send_free = true,
                Op::Recv => {
                    // The sender's count of credit messages it has taken
                    // (wrapping): only ever moves forward.
                    if done.imm.wrapping_sub(self.credit_msgs_taken) as i32 > 0 {
                        self.credit_msgs_taken = done.imm;
                    }
                    self.ready.push_back((done.wr_id as usize, done.len));
                }
            }
        }
        self.completions = c;
        if polled.is_err() {
            self.gone = true;
        }
    }

    /// Reposts slot `i` and returns credits when a batch is due.
    fn repost(&mut self, i: usize) {
        let slot = self.recv.slot_bytes;
        if self
            .verbs
            .post_recv(i as u64, self.recv.key, i * slot, slot)
            .is_err()
        {
            self.gone = true;
            return;
        }
        self.reposted = self.reposted.wrapping_add(1);
        self.return_credits();
    }

    fn return_credits(&mut self) {
        let due = self.reposted.wrapping_sub(self.reported) as usize;
        let in_flight = self.credit_msgs_sent.wrapping_sub(self.credit_msgs_taken) as usize;
        if due == 0
            || due < (self.slots / 4).max(1)
            || !self.credit_send_free
            || in_flight >= CREDIT_RECEIVES
        {
            return;
        }
        let s = self.credit_send.slot(0);
        s[..4].copy_from_slice(&self.reposted.to_le_bytes());
        s[4] = FLAG_CREDIT;
        s[5..8].fill(0);
        if self
            .verbs
            .post_send(0, self.credit_send.key, 0, SLOT_HEADER_BYTES, 0)
            .is_ok()
        {
            self.credit_send_free = false;
            self.credit_msgs_sent = self.credit_msgs_sent.wrapping_add(1);
            self.reported = self.reposted;
        }
    }
}

impl<V: Verbs> LinkRx for RdmaRx<V> {
    fn recv(&mut self, out: &mut Vec<u8>, deadline: Option<Instant>) -> Result<bool, RecvError> {
        loop {
            while let Some((i, got)) = self.ready.pop_front() {
                let Some((flags, body)) = self.recv.read(i, got) else {
                    // A malformed message: the sender broke the protocol.
                    self.gone = true;
                    self.ready.clear();
                    break;
                };
                let more = flags & FLAG_MORE != 0;
                if more || !self.partial.is_empty() {
                    self.partial.extend_from_slice(body);
                } else {
                    out.clear();
                    out.extend_from_slice(body);
                }
                self.repost(i);
                if !more {
                    if !self.partial.is_empty() {
                        out.clear();
                        std::mem::swap(out, &mut self.partial);
                    }
                    return Ok(true);
                }
            }
            if self.gone {
                return Err(RecvError::PeerGone);
            }
            // Credits owed but held back (no credit-message slot yet).
            self.return_credits();
            let Some(wait) = next_wait(deadline, WAIT_STEP) else {
                return Ok(false);
            };
            self.pump(wait);
        }
    }
}

impl<V: Verbs> Drop for RdmaTx<V> {
    fn drop(&mut self) {
        self.verbs.deregister(self.send.key);
        self.verbs.deregister(self.credit_recv.key);
    }
}

impl<V: Verbs> Drop for RdmaRx<V> {
    fn drop(&mut self) {
        self.verbs.deregister(self.recv.key);
        self.verbs.deregister(self.credit_send.key);
    }
}

/// One end of an in-memory reliable-connected queue pair: what the
/// protocol is tested against. It keeps RC's rules: in-order delivery, a
/// send that finds no posted receive fails the connection (a
/// receiver-not-ready error), and a closed peer ends the connection after
/// what it sent.
pub struct LoopbackVerbs {
    regions: Vec<Option<(*mut u8, usize)>>,
    posted: VecDeque<(u64, u32, usize, usize)>,
    done: VecDeque<Completion>,
    /// `None` until connected (an end opened on [`RdmaDevice::Loopback`]).
    to_peer: Option<LoopbackSender>,
    from_peer: std::sync::mpsc::Receiver<(Vec<u8>, u32)>,
    /// This end's address while it waits for a peer to connect to it.
    listed_as: Option<u64>,
    broken: bool,
}

type LoopbackSender = std::sync::mpsc::Sender<(Vec<u8>, u32)>;

/// Loopback ends waiting for their peer, by address: how an end opened in
/// one node of this process finds the one opened in another.
fn loopback_waiting(
) -> std::sync::MutexGuard<'static, std::collections::HashMap<u64, LoopbackSender>> {
    static WAITING: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<u64, LoopbackSender>>,
    > = std::sync::OnceLock::new();
    WAITING
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

// SAFETY: the raw pointers name regions the owning link keeps alive and in
// place between register and deregister; the end is used by one thread at
// a time (it moves with its link).
unsafe impl Send for LoopbackVerbs {}

impl LoopbackVerbs {
    /// Two connected ends.
    pub fn pair() -> (LoopbackVerbs, LoopbackVerbs) {
        let (a_tx, b_rx) = std::sync::mpsc::channel();
        let (b_tx, a_rx) = std::sync::mpsc::channel();
        (
            Self::end(Some(a_tx), a_rx, None),
            Self::end(Some(b_tx), b_rx, None),
        )
    }

    fn end(
        to_peer: Option<LoopbackSender>,
        from_peer: std::sync::mpsc::Receiver<(Vec<u8>, u32)>,
        listed_as: Option<u64>,
    ) -> LoopbackVerbs {
        LoopbackVerbs {
            regions: Vec::new(),
            posted: VecDeque::new(),
            done: VecDeque::new(),
            to_peer,
            from_peer,
            listed_as,
            broken: false,
        }
    }

    /// An end not connected yet, and the address its peer connects to
    /// (from this process only).
    pub fn unconnected() -> (LoopbackVerbs, u64) {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut waiting = loopback_waiting();
        let address = loop {
            let a = rand::random::<u64>();
            if a != 0 && !waiting.contains_key(&a) {
                break a;
            }
        };
        waiting.insert(address, tx);
        (Self::end(None, rx, Some(address)), address)
    }

    /// Connects this end to the one at `peer` (which must connect back to
    /// this one's address for messages to flow both ways).
    pub fn connect_to(&mut self, peer: u64) -> io::Result<()> {
        if self.to_peer.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "this loopback end is already connected",
            ));
        }
        let tx = loopback_waiting().remove(&peer).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no loopback RDMA end waits at address {peer:#x} in this process"),
            )
        })?;
        self.to_peer = Some(tx);
        Ok(())
    }

    fn region(&mut self, key: u32, offset: usize, len: usize) -> io::Result<&mut [u8]> {
        let Some(Some((ptr, size))) = self.regions.get(key as usize).copied() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "unregistered region",
            ));
        };
        if offset + len > size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "outside the region",
            ));
        }
        // SAFETY: registered by the owner, which keeps it alive and in
        // place until deregistered (see `Verbs::register`).
        Ok(unsafe { std::slice::from_raw_parts_mut(ptr.add(offset), len) })
    }

    /// Matches arrived messages with posted receives, in order.
    fn deliver(&mut self, msg: Vec<u8>, imm: u32) -> io::Result<()> {
        let Some((wr_id, key, offset, len)) = self.posted.pop_front() else {
            self.broken = true;
            return Err(io::Error::other(
                "receiver not ready: a send found no posted receive",
            ));
        };
        if msg.len() > len {
            self.broken = true;
            return Err(io::Error::other("a message longer than the posted receive"));
        }
        self.region(key, offset, msg.len())?.copy_from_slice(&msg);
        self.done.push_back(Completion {
            wr_id,
            op: Op::Recv,
            len: msg.len(),
            imm,
        });
        Ok(())
    }
}

impl Verbs for LoopbackVerbs {
    fn register(&mut self, region: &mut [u8]) -> io::Result<u32> {
        self.regions.push(Some((region.as_mut_ptr(), region.len())));
        Ok(self.regions.len() as u32 - 1)
    }

    fn deregister(&mut self, key: u32) {
        if let Some(r) = self.regions.get_mut(key as usize) {
            *r = None;
        }
    }

    fn post_recv(&mut self, wr_id: u64, key: u32, offset: usize, len: usize) -> io::Result<()> {
        self.region(key, offset, len)?;
        self.posted.push_back((wr_id, key, offset, len));
        Ok(())
    }

    fn post_send(
        &mut self,
        wr_id: u64,
        key: u32,
        offset: usize,
        len: usize,
        imm: u32,
    ) -> io::Result<()> {
        if self.broken {
            return Err(io::ErrorKind::ConnectionReset.into());
        }
        let bytes = self.region(key, offset, len)?.to_vec();
        self.to_peer
            .as_ref()
            .ok_or(io::ErrorKind::NotConnected)?
            .send((bytes, imm))
            .map_err(|_| io::Error::from(io::ErrorKind::ConnectionReset))?;
        self.done.push_back(Completion {
            wr_id,
            op: Op::Send,
            len,
            imm,
        });
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<Completion>, wait: Duration) -> io::Result<()> {
        let deadline = Instant::now() + wait;
        loop {
            loop {
                match self.from_peer.try_recv() {
                    Ok((m, imm)) => self.deliver(m, imm)?,
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                        self.broken = true;
                        break;
                    }
                }
            }
            if !self.done.is_empty() {
                out.extend(self.done.drain(..));
                return Ok(());
            }
            if self.broken {
                return Err(io::ErrorKind::ConnectionReset.into());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            match self.from_peer.recv_timeout(left) {
                Ok((m, imm)) => self.deliver(m, imm)?,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => return Ok(()),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => self.broken = true,
            }
        }
    }
}

impl Drop for LoopbackVerbs {
    /// An end nobody connected to leaves the list (its peer's handshake
    /// failed, or never came).
    fn drop(&mut self) {
        if let Some(a) = self.listed_as {
            loopback_waiting().remove(&a);
        }
    }
}

/// RDMA links over [`LoopbackVerbs`], for the conformance suite.
#[derive(Default)]
pub struct LoopbackRdmaTransport;

impl Transport for LoopbackRdmaTransport {
    const NAME: &'static str = "rdma-loopback";
    type Tx = RdmaTx<LoopbackVerbs>;
    type Rx = RdmaRx<LoopbackVerbs>;

    fn link(&self, ring_capacity_bytes: usize) -> io::Result<(Self::Tx, Self::Rx)> {
        let (a, b) = LoopbackVerbs::pair();
        Ok((
            RdmaTx::new(a, ring_capacity_bytes)?,
            RdmaRx::new(b, ring_capacity_bytes)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_ends_connect_by_address_like_a_device() {
        let cap = 64 << 10;
        let (a, b) = (
            RdmaDevice::Loopback.open(cap).unwrap(),
            RdmaDevice::Loopback.open(cap).unwrap(),
        );
        let (a_addr, b_addr) = (a.address().to_vec(), b.address().to_vec());
        assert_ne!(a_addr, b_addr);
        // The receiving end connects first and posts its receives before
        // the sender hears its address, as a node link's handshake does.
        let mut rx = RdmaRx::new(b.connect(&a_addr).unwrap(), cap).unwrap();
        let mut tx = RdmaTx::new(a.connect(&b_addr).unwrap(), cap).unwrap();
        let big = vec![7u8; cap / 4]; // several slots, within the credits
        for m in [&b"hello"[..], &big] {
            tx.send(m, SendMode::RELIABLE, None).unwrap();
            let mut out = Vec::new();
            assert!(rx.recv(&mut out, None).unwrap());
            assert_eq!(out, m);
        }
        // An address taken, unknown, or of another kind of device.
        let c = RdmaDevice::Loopback.open(cap).unwrap();
        assert_eq!(
            c.connect(&b_addr).err().map(|e| e.kind()),
            Some(io::ErrorKind::NotFound)
        );
        let d = RdmaDevice::Loopback.open(cap).unwrap();
        assert_eq!(
            d.connect(&[ADDRESS_IBVERBS, 1, 2]).err().map(|e| e.kind()),
            Some(io::ErrorKind::InvalidData)
        );
        // A peer that goes away ends the link.
        drop(rx);
        let gone = (0..1000).find_map(|_| tx.send(b"x", SendMode::RELIABLE, None).err());
        assert_eq!(gone, Some(SendError::PeerGone));
    }

    #[test]
    fn modes_resolve_to_a_device_or_a_reason() {
        assert_eq!(RdmaMode::Off.resolve(), Err(RDMA_OFF.to_string()));
        assert_eq!(
            RdmaMode::Use(RdmaDevice::Loopback).resolve(),
            Ok(RdmaDevice::Loopback)
        );
        // This machine has no RDMA device (and a build without the feature
        // never has one): Auto says why.
        let auto = RdmaMode::Auto.resolve();
        #[cfg(not(feature = "rdma"))]
        assert_eq!(
            auto,
            Err("built without the `rdma` cargo feature".to_string())
        );
        #[cfg(feature = "rdma")]
        let _ = auto;
    }

    #[test]
    fn geometry_has_room_for_a_header_and_enough_slots() {
        for cap in [4096, 16 << 10, 1 << 20, 64 << 20] {
            let (slot, slots) = geometry(cap);
            assert!(slot > SLOT_HEADER_BYTES && slot <= MAX_SLOT_BYTES);
            assert!(slots >= MIN_SLOTS);
        }
    }

    #[test]
    fn loopback_refuses_a_send_without_a_posted_receive() {
        let (mut a, mut b) = LoopbackVerbs::pair();
        let mut mem = vec![1u8; 16];
        let key = a.register(&mut mem).unwrap();
        a.post_send(1, key, 0, 16, 0).unwrap();
        let mut out = Vec::new();
        assert!(b.poll(&mut out, Duration::from_millis(10)).is_err(), "RNR");
    }

    #[test]
    fn credits_never_let_the_sender_overrun_the_receiver() {
        // A receiver that never receives: the sender runs out of credits
        // (no RNR error from the loopback), then refuses without blocking.
        let (mut tx, _rx) = LoopbackRdmaTransport.link(4096).unwrap();
        let mut sent = 0;
        while tx
            .send(&[5u8; 100], SendMode::RELIABLE_NONBLOCKING, None)
            .is_ok()
        {
            sent += 1;
            assert!(sent <= 64);
        }
        assert_eq!(sent, geometry(4096).1);
        assert_eq!(
            tx.send(&[5u8; 100], SendMode::RELIABLE_NONBLOCKING, None),
            Err(SendError::WouldBlock)
        );
    }
}
