//! The eBPF mailbox path: one socket per mailbox, demultiplexed in the kernel.
//!
//! Every mailbox on this path owns one TCP loopback socket ([`Endpoint`]).
//! [`EbpfFabric`] (inside `fabricd`, or inside a test) loads the sk_msg
//! program of `fabric-ebpf`, puts each mailbox socket into the program's
//! SOCKHASH under the mailbox's port, and records who owns it (port and
//! tenant) in the socket's own storage (`BPF_MAP_TYPE_SK_STORAGE`: sk_msg
//! programs may not read socket cookies, and storage dies with its socket). From then on a send is one
//! `sendmsg`: the program checks the frame, stamps the true source and
//! tenant into its header, applies the tenant policy and redirects the frame
//! straight into the receiver's socket. There is no broker on the data path.
//!
//! What the kernel does not give, this module adds in user space:
//!
//! - **Flow control.** A socket's ingress queue has no bound a sender would
//!   feel, so a reliable sender may have at most `window_bytes` of frames
//!   unconsumed at one receiver; the receiver returns credit
//!   ([`EBPF_CTL_CREDIT`]) each time a quarter window has been consumed.
//!   Unreliable frames that find no credit are dropped at the sender and
//!   counted, so nothing is ever lost silently in the kernel.
//! - **Framing.** A frame is one header and at most [`FRAGMENT_BYTES`] of
//!   payload, written by one `sendmsg`, which the kernel handles as one
//!   sk_msg and enqueues whole; larger messages travel as fragments
//!   ([`FLAG_MORE`]) and are joined again per source.
//! - **Liveness.** The hub (the fabric's own socket, kept under the reserved
//!   key) receives every frame whose port has no socket and answers "no such
//!   mailbox"; a mailbox that waits on a peer asks the hub to watch it
//!   ([`EBPF_CTL_WATCH`]) and hears [`EBPF_CTL_GONE`] when the peer's socket
//!   closes, after everything the peer sent.
//!
//! The hub learns that a socket closed from the other end of its loopback
//! connection, which the fabric keeps: it sees end-of-file the moment the
//! mailbox's process closes the socket or dies. One thread serves the hub:
//! an io_uring loop with a poll on the hub socket and one on each far end
//! (new far ends are announced to it through an eventfd).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, IoSlice, Read};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aya::maps::{HashMap as BpfHashMap, MapData, SkStorage, SockHash};
use aya::programs::SkMsg;
use aya::Ebpf;
use io_uring::{opcode, types, IoUring};
use rustc_hash::{FxHashMap, FxHashSet};
use zerocopy::{FromBytes, IntoBytes};

use crate::futex::DEFAULT_SPIN;
use crate::ring::{SendError, SendMode, MAX_MESSAGE_BYTES};
use crate::transport::{next_wait, LinkRx, LinkTx, RecvError, Transport};
use crate::uring::Waker;
use crate::wire::{
    EbpfControl, EbpfSource, TenantPair, WireHeader, WirePort, EBPF_CONTROL_BYTES, EBPF_CTL_CREDIT,
    EBPF_CTL_DENIED, EBPF_CTL_GONE, EBPF_CTL_NO_SUCH_MAILBOX, EBPF_CTL_WATCH, EBPF_HUB_NODE,
    EBPF_HUB_PORT, EBPF_SOURCE_HUB, FLAG_CONTROL, FLAG_DENIED, FLAG_EARLY, FLAG_MORE,
    FLAG_RELIABLE, WIRE_HEADER_BYTES,
};

/// The hub's key in the mailbox map.
pub const HUB: WirePort = WirePort {
    node: EBPF_HUB_NODE,
    port: EBPF_HUB_PORT,
};

/// Largest payload of one frame. A `sendmsg` of up to 32 KiB becomes one
/// sk_msg even when the kernel falls back to single pages (it takes at most
/// 9 of the 17 scatterlist slots), so a frame is never split, and frames of
/// different senders never interleave inside a receiver's queue.
pub const FRAGMENT_BYTES: usize = (32 << 10) - WIRE_HEADER_BYTES;

/// A `sched_yield` that took longer than this ran another task.
const YIELD_RAN_OTHERS: Duration = Duration::from_micros(2);
/// Spins in a row interrupted by another task on this core that mean the
/// peer shares the core.
const CROWDED_SPINS: u32 = 8;
/// Receives that block at once after that (then a spin tries again: the
/// peer may have moved).
const SPIN_SKIPS: u32 = 1024;

/// Frames up to this size are sent from one contiguous copy.
const SMALL_FRAME_BYTES: usize = 512;

/// Default receive window per sender→receiver pair.
pub const DEFAULT_WINDOW_BYTES: usize = 256 << 10;

/// Smallest window: four minimal frames.
pub const MIN_WINDOW_BYTES: usize = 4 * (WIRE_HEADER_BYTES + 64);

/// Most mailbox sockets one fabric holds (the maps' size).
pub const MAX_MAILBOXES: usize = 65_536;

/// Why the eBPF path is not available.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error(
        "loading BPF programs needs root or CAP_BPF and CAP_NET_ADMIN (running as uid {uid}): {detail}"
    )]
    NoPermission { uid: u32, detail: String },
    #[error("the kernel refused the sk_msg program or its maps: {0}")]
    Kernel(String),
    #[error("loopback sockets for the hub: {0}")]
    Io(#[from] io::Error),
}

/// Map key wrappers: aya reads keys as plain bytes.
#[derive(Clone, Copy)]
#[repr(transparent)]
struct PortKey(WirePort);
// SAFETY: WirePort is repr(C), two u32s, no padding (zerocopy checks that);
// every bit pattern is valid.
unsafe impl aya::Pod for PortKey {}
#[derive(Clone, Copy)]
#[repr(transparent)]
struct SourceValue(EbpfSource);
// SAFETY: as above; EbpfSource is repr(C) without padding.
unsafe impl aya::Pod for SourceValue {}
#[derive(Clone, Copy)]
#[repr(transparent)]
struct PairKey(TenantPair);
// SAFETY: as above; TenantPair is two u32s.
unsafe impl aya::Pod for PairKey {}

struct Maps {
    mailboxes: SockHash<MapData, PortKey>,
    sources: SkStorage<MapData, SourceValue>,
    port_tenant: BpfHashMap<MapData, PortKey, u32>,
    policy: BpfHashMap<MapData, PairKey, u32>,
    denied: BpfHashMap<MapData, u32, u64>,
}

/// One mailbox socket as the fabric knows it.
struct Registered {
    port: WirePort,
    /// The far end of the mailbox's loopback connection: end-of-file on it
    /// means the mailbox socket closed.
    far_end: TcpStream,
}

struct Shared {
    maps: Mutex<Maps>,
    listener: TcpListener,
    /// Serialises connect + accept so each mailbox gets its own far end.
    connecting: Mutex<()>,
    /// Far ends the hub loop has not begun to watch yet.
    far_ends: Waker<RawFd>,
    registered: Mutex<HashMap<RawFd, Registered>>,
    live: Mutex<HashSet<WirePort>>,
    /// port → ports to tell when it goes.
    watchers: Mutex<HashMap<WirePort, HashSet<WirePort>>>,
    stop: AtomicBool,
    /// Keeps the program loaded and attached.
    _bpf: Mutex<Ebpf>,
}

/// The loaded eBPF path of one host (one per `fabricd`).
pub struct EbpfFabric {
    shared: Arc<Shared>,
    hub: Option<JoinHandle<()>>,
}

/// Completion tags of the hub loop; any other is a far end's fd.
const HUB_TOKEN: u64 = u64::MAX;
const WAKE_TOKEN: u64 = u64::MAX - 1;
/// Submission queue entries of the hub loop's ring.
const HUB_RING_ENTRIES: u32 = 256;

fn kernel(e: impl std::fmt::Display) -> Unavailable {
    Unavailable::Kernel(e.to_string())
}

impl EbpfFabric {
    /// Loads and attaches the program and starts the hub. Without the rights
    /// it says so ([`Unavailable::NoPermission`]); callers run without the
    /// eBPF path then.
    pub fn load() -> Result<EbpfFabric, Unavailable> {
        let mut bpf = Ebpf::load(fabric_ebpf::object()).map_err(|e| {
            let uid = nix::unistd::Uid::effective().as_raw();
            let detail = e.to_string();
            if uid != 0 || detail.contains("EPERM") || detail.contains("ermission") {
                Unavailable::NoPermission { uid, detail }
            } else {
                Unavailable::Kernel(detail)
            }
        })?;
        let mut take = |name: &str| {
            bpf.take_map(name)
                .ok_or_else(|| Unavailable::Kernel(format!("map {name} missing from the object")))
        };
        let mailboxes: SockHash<MapData, PortKey> = take(fabric_ebpf::MAP_MAILBOXES)?
            .try_into()
            .map_err(kernel)?;
        let sources = take(fabric_ebpf::MAP_SOURCES)?.try_into().map_err(kernel)?;
        let port_tenant = take(fabric_ebpf::MAP_PORT_TENANT)?
            .try_into()
            .map_err(kernel)?;
        let policy = take(fabric_ebpf::MAP_POLICY)?.try_into().map_err(kernel)?;
        let denied = take(fabric_ebpf::MAP_DENIED)?.try_into().map_err(kernel)?;
        let program: &mut SkMsg = bpf
            .program_mut(fabric_ebpf::PROGRAM)
            .ok_or_else(|| Unavailable::Kernel("program missing from the object".into()))?
            .try_into()
            .map_err(kernel)?;
        program.load().map_err(kernel)?;
        program.attach(mailboxes.fd()).map_err(kernel)?;
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let shared = Arc::new(Shared {
            maps: Mutex::new(Maps {
                mailboxes,
                sources,
                port_tenant,
                policy,
                denied,
            }),
            listener,
            connecting: Mutex::new(()),
            far_ends: Waker::new()?,
            registered: Mutex::new(HashMap::new()),
            live: Mutex::new(HashSet::new()),
            watchers: Mutex::new(HashMap::new()),
            stop: AtomicBool::new(false),
            _bpf: Mutex::new(bpf),
        });
        let hub = Endpoint::new(
            shared.register(HUB, 0, EBPF_SOURCE_HUB)?,
            HUB,
            DEFAULT_WINDOW_BYTES,
        );
        let s = shared.clone();
        let hub = std::thread::Builder::new()
            .name("nefele-ebpf-hub".into())
            .spawn(move || s.run_hub(hub))?;
        Ok(EbpfFabric {
            shared,
            hub: Some(hub),
        })
    }

    /// A socket for the mailbox `port` of `tenant`: sends on it are stamped
    /// with that port and tenant, and frames for `port` arrive on it.
    pub fn endpoint(
        &self,
        port: WirePort,
        tenant: u32,
        window_bytes: usize,
    ) -> io::Result<Endpoint> {
        if port == HUB {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "port 0 is the hub's",
            ));
        }
        Ok(Endpoint::new(
            self.shared.register(port, tenant, 0)?,
            port,
            window_bytes,
        ))
    }

    /// Lets `src` tenant's mailboxes send to `dst` tenant's (one way).
    pub fn allow(&self, src: u32, dst: u32) -> io::Result<()> {
        let mut maps = self.shared.maps.lock().expect("maps");
        maps.policy
            .insert(PairKey(TenantPair { src, dst }), 1, 0)
            .map_err(io::Error::other)
    }

    /// Withdraws an [`allow`](Self::allow).
    pub fn revoke(&self, src: u32, dst: u32) -> io::Result<()> {
        let mut maps = self.shared.maps.lock().expect("maps");
        match maps.policy.remove(&PairKey(TenantPair { src, dst })) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(io::Error::other(e)),
        }
    }

    /// Whether the tenant policy lets `src` tenant's mailboxes reach `dst`
    /// tenant's: the same test the program makes.
    pub fn permits(&self, src: u32, dst: u32) -> bool {
        if src == dst {
            return true;
        }
        let maps = self.shared.maps.lock().expect("maps");
        maps.policy
            .get(&PairKey(TenantPair { src, dst }), 0)
            .is_ok_and(|v| v != 0)
    }

    /// Moves the mailbox socket `sock`, registered for `port`, to `tenant`.
    /// Fails if `sock` is not the socket of `port`.
    pub fn retag(&self, sock: &impl AsRawFd, port: WirePort, tenant: u32) -> io::Result<()> {
        let mut maps = self.shared.maps.lock().expect("maps");
        let mut source = maps
            .sources
            .get(sock, 0)
            .map_err(|_| io::Error::other("not a mailbox socket of this node"))?;
        if source.0.port != port {
            return Err(io::Error::other("that socket belongs to another mailbox"));
        }
        source.0.tenant = tenant;
        maps.sources
            .insert(sock, source, 0)
            .map_err(io::Error::other)?;
        maps.port_tenant
            .insert(PortKey(port), tenant, 0)
            .map_err(io::Error::other)
    }

    /// Messages the tenant policy dropped, per source tenant.
    pub fn denied(&self) -> Vec<(u32, u64)> {
        let maps = self.shared.maps.lock().expect("maps");
        let mut v: Vec<(u32, u64)> = maps.denied.iter().filter_map(Result::ok).collect();
        v.sort_unstable();
        v
    }

    /// Mailbox sockets registered now (the hub's included).
    pub fn mailboxes(&self) -> usize {
        self.shared.live.lock().expect("live").len()
    }
}

impl Drop for EbpfFabric {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.far_ends.kick();
        if let Some(h) = self.hub.take() {
            let _ = h.join();
        }
    }
}

impl Shared {
    /// A connected loopback pair; the near end goes into the maps for `port`.
    fn register(&self, port: WirePort, tenant: u32, flags: u32) -> io::Result<TcpStream> {
        let (near, far) = {
            let _one_at_a_time = self.connecting.lock().expect("connecting");
            let near = TcpStream::connect(self.listener.local_addr()?)?;
            let (far, from) = self.listener.accept()?;
            if from != near.local_addr()? {
                return Err(io::Error::other(
                    "someone else connected to the fabric's loopback listener",
                ));
            }
            (near, far)
        };
        near.set_nodelay(true)?;
        {
            let mut live = self.live.lock().expect("live");
            if !live.insert(port) {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("port {}:{} already has a socket", port.node, port.port),
                ));
            }
        }
        let result = (|| -> Result<(), aya::maps::MapError> {
            let mut maps = self.maps.lock().expect("maps");
            maps.sources.insert(
                &near,
                SourceValue(EbpfSource {
                    port,
                    tenant,
                    flags,
                }),
                0,
            )?;
            maps.port_tenant.insert(PortKey(port), tenant, 0)?;
            maps.mailboxes
                .insert(PortKey(port), near.as_fd().as_raw_fd(), 0)
        })();
        if let Err(e) = result {
            self.forget(port);
            return Err(io::Error::other(e));
        }
        // The hub only reads it to see end-of-file; never wait there.
        far.set_nonblocking(true)?;
        let fd = far.as_raw_fd();
        self.registered
            .lock()
            .expect("registered")
            .insert(fd, Registered { port, far_end: far });
        self.far_ends.ready(fd);
        Ok(near)
    }

    fn forget(&self, port: WirePort) {
        let mut maps = self.maps.lock().expect("maps");
        let _ = maps.port_tenant.remove(&PortKey(port));
        // The SOCKHASH entry and the socket's storage went with the socket.
        drop(maps);
        self.live.lock().expect("live").remove(&port);
    }

    fn run_hub(&self, mut hub: Endpoint) {
        if let Err(e) = self.hub_loop(&mut hub) {
            eprintln!("fabric: eBPF hub: io_uring: {e}; the hub stops");
        }
    }

    /// The hub's io_uring loop: a poll on the hub socket, one on each far
    /// end (re-armed after each completion, so a far end has at most one in
    /// flight, and none once it is forgotten), and a read on the eventfd
    /// through which new far ends and the stop are announced.
    fn hub_loop(&self, hub: &mut Endpoint) -> io::Result<()> {
        // Where the eventfd read lands: declared before the ring, so it is
        // dropped after it and never freed under a read in flight.
        let mut wake_buf = Box::new([0u8; 8]);
        let mut ring = IoUring::new(HUB_RING_ENTRIES)?;
        let readable = |fd: RawFd, token: u64| {
            opcode::PollAdd::new(types::Fd(fd), (libc::POLLIN | libc::POLLRDHUP) as u32)
                .build()
                .user_data(token)
        };
        let push = |ring: &mut IoUring, sqe: io_uring::squeue::Entry| {
            // SAFETY: a poll points at no memory; the eventfd read lands in
            // `wake_buf`, which outlives the ring (see above).
            unsafe { crate::uring::push_entry(ring, &sqe) }
        };
        let hub_fd = hub.sock.as_raw_fd();
        push(&mut ring, readable(hub_fd, HUB_TOKEN));
        push(
            &mut ring,
            self.far_ends.read_entry(&mut wake_buf, WAKE_TOKEN),
        );
        while !self.stop.load(Ordering::Relaxed) {
            for fd in self.far_ends.take() {
                push(&mut ring, readable(fd, fd as u64));
            }
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
            let done: Vec<(u64, i32)> = ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (token, result) in done {
                match token {
                    HUB_TOKEN if result < 0 => {
                        return Err(io::Error::from_raw_os_error(-result));
                    }
                    HUB_TOKEN => {
                        self.serve_hub(hub);
                        push(&mut ring, readable(hub_fd, HUB_TOKEN));
                    }
                    WAKE_TOKEN => {
                        push(
                            &mut ring,
                            self.far_ends.read_entry(&mut wake_buf, WAKE_TOKEN),
                        );
                    }
                    fd => {
                        if self.check_far_end(hub, fd as RawFd) {
                            push(&mut ring, readable(fd as RawFd, fd));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Answers everything queued on the hub socket.
    fn serve_hub(&self, hub: &mut Endpoint) {
        loop {
            match hub.next_frame(Some(Instant::now())) {
                Ok(Some((h, r))) => {
                    let payload = hub.rbuf[r].to_vec();
                    self.answer(hub, &h, &payload)
                }
                Ok(None) => return,
                Err(e) => {
                    eprintln!("fabric: eBPF hub: {e}");
                    return;
                }
            }
        }
    }

    fn answer(&self, hub: &mut Endpoint, h: &WireHeader, payload: &[u8]) {
        if h.src == HUB {
            return; // our own reply to a mailbox that has gone since
        }
        if h.flags & FLAG_EARLY != 0 {
            // Its sender hears from its daemon whether it arrived.
            return;
        }
        if h.flags & FLAG_DENIED != 0 {
            // The kernel counted it; the sender hears why it went nowhere.
            if h.flags & FLAG_CONTROL == 0 {
                let frame_bytes = (WIRE_HEADER_BYTES + payload.len()) as u64;
                let _ = hub.send_control(h.src, EBPF_CTL_DENIED, h.dst, frame_bytes);
            }
            return;
        }
        let ctl = control(h, payload);
        if h.dst == HUB {
            if let Some(c) = ctl.filter(|c| c.kind == EBPF_CTL_WATCH) {
                let alive = self.live.lock().expect("live").contains(&c.port);
                if alive {
                    self.watchers
                        .lock()
                        .expect("watchers")
                        .entry(c.port)
                        .or_default()
                        .insert(h.src);
                    // It may have gone between the check and the insert.
                    if self.live.lock().expect("live").contains(&c.port) {
                        return;
                    }
                }
                let _ = hub.send_control(h.src, EBPF_CTL_GONE, c.port, 0);
            }
            return;
        }
        // A frame for a port without a socket. Control traffic to a gone
        // mailbox (credit, say) needs no answer; data does.
        if ctl.is_none() {
            let _ = hub.send_control(h.src, EBPF_CTL_NO_SUCH_MAILBOX, h.dst, 0);
        }
    }

    /// Looks whether the far end `fd` reached end-of-file (its mailbox
    /// socket closed) and if so forgets it and tells its watchers. Whether
    /// it is still watched.
    fn check_far_end(&self, hub: &mut Endpoint, fd: RawFd) -> bool {
        let mut registered = self.registered.lock().expect("registered");
        let Some(r) = registered.get_mut(&fd) else {
            return false;
        };
        let mut scratch = [0u8; 256];
        let closed = match (&r.far_end).read(&mut scratch) {
            Ok(0) => true,
            Ok(_) => false, // nothing should arrive here; ignore it
            Err(e) => {
                e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted
            }
        };
        if !closed {
            return true;
        }
        let r = registered.remove(&fd).expect("present");
        drop(registered);
        self.forget(r.port);
        let watchers = self.watchers.lock().expect("watchers").remove(&r.port);
        for w in watchers.into_iter().flatten() {
            let _ = hub.send_control(w, EBPF_CTL_GONE, r.port, 0);
        }
        // `r` drops here, closing the far end: its poll has completed.
        false
    }
}

fn control(h: &WireHeader, payload: &[u8]) -> Option<EbpfControl> {
    if h.flags & FLAG_CONTROL == 0 || payload.len() != EBPF_CONTROL_BYTES {
        return None;
    }
    EbpfControl::read_from_bytes(payload).ok()
}

/// Per destination: how much we sent and how much the receiver consumed.
#[derive(Default)]
struct Credit {
    sent: u64,
    consumed: u64,
    /// The hub watches the destination for us.
    watching: bool,
}

/// Per source: what we consumed and reported, and a message being joined.
#[derive(Default)]
struct Intake {
    consumed: u64,
    reported: u64,
    partial: Vec<u8>,
}

/// A message delivered to an [`Endpoint`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The sender, as the kernel stamped it.
    pub src: WirePort,
    /// The sender's tenant, as the kernel stamped it.
    pub tenant: u32,
}

/// What the endpoint's inbox holds besides whole messages.
enum Event {
    /// A whole message, and the bytes of its last frame (not yet credited).
    Message(Delivery, Vec<u8>, u64),
    Gone(WirePort),
}

/// One mailbox's socket on the eBPF path: frames out, frames in, credit
/// and liveness bookkeeping. Used by one thread at a time.
pub struct Endpoint {
    sock: TcpStream,
    port: WirePort,
    window_bytes: usize,
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    inbox: VecDeque<Event>,
    // FxHash: these are looked up several times per message.
    credit: FxHashMap<WirePort, Credit>,
    intake: FxHashMap<WirePort, Intake>,
    /// Destinations known to be gone, with the error a send gets.
    dead: FxHashMap<WirePort, SendError>,
    /// Destinations whose tenant refused a message of ours since the last
    /// send to them reported it.
    refused: FxHashSet<WirePort>,
    /// Watched peers whose departure a receive has reported.
    departed: FxHashSet<WirePort>,
    dropped: u64,
    /// The socket's `SO_RCVTIMEO` now, in milliseconds (0: none).
    receive_timeout_ms: u32,
    /// How long a receive polls before it blocks.
    spin: Duration,
    /// Receives left that block at once, because recent spins found their
    /// peer on this core.
    spin_skips: u32,
    /// Spins in a row that another task on this core interrupted.
    crowded_spins: u32,
}

/// How long a blocked sender or receiver sleeps between looks at its
/// socket; wake-ups come through `poll`, this only bounds a missed one.
const WAIT_STEP: Duration = Duration::from_millis(100);

impl Endpoint {
    fn new(sock: TcpStream, port: WirePort, window_bytes: usize) -> Endpoint {
        Endpoint {
            sock,
            port,
            window_bytes: window_bytes.max(MIN_WINDOW_BYTES),
            rbuf: vec![0; 4 * (FRAGMENT_BYTES + WIRE_HEADER_BYTES)],
            rstart: 0,
            rend: 0,
            inbox: VecDeque::new(),
            credit: FxHashMap::default(),
            intake: FxHashMap::default(),
            dead: FxHashMap::default(),
            refused: FxHashSet::default(),
            departed: FxHashSet::default(),
            dropped: 0,
            receive_timeout_ms: 0,
            spin: DEFAULT_SPIN,
            spin_skips: 0,
            crowded_spins: 0,
        }
    }

    /// An endpoint around a mailbox socket the fabric registered for `port`
    /// and handed over (through `SCM_RIGHTS`, or inherited by a child).
    pub fn from_socket(sock: TcpStream, port: WirePort, window_bytes: usize) -> Endpoint {
        Endpoint::new(sock, port, window_bytes)
    }

    /// The mailbox socket itself (to hand it over).
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// This mailbox's port.
    pub fn port(&self) -> WirePort {
        self.port
    }

    /// The socket, for `poll`/epoll/tokio: readable when frames wait.
    pub fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Unreliable messages dropped for want of credit so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Largest payload per frame for this window: a quarter window at most,
    /// so that credit returns before a sender runs dry.
    fn fragment_bytes(&self) -> usize {
        (self.window_bytes / 4 - WIRE_HEADER_BYTES).min(FRAGMENT_BYTES)
    }

    /// Writes one frame with one `sendmsg`. The kernel stamps `src` and
    /// `tenant`; what we put there does not matter.
    fn write_frame(&self, dst: WirePort, flags: u8, payload: &[u8]) -> Result<(), SendError> {
        let h = WireHeader::new(self.port, dst, 0, payload.len() as u32, flags, 0);
        let total = WIRE_HEADER_BYTES + payload.len();
        let fd = self.sock.as_raw_fd();
        let no_signal = nix::sys::socket::MsgFlags::MSG_NOSIGNAL;
        loop {
            // A small frame is copied into one buffer (a plain send is
            // cheaper than gathering two pieces); a large one is gathered.
            let sent = if total <= SMALL_FRAME_BYTES {
                let mut frame = [0u8; SMALL_FRAME_BYTES];
                frame[..WIRE_HEADER_BYTES].copy_from_slice(h.as_bytes());
                frame[WIRE_HEADER_BYTES..total].copy_from_slice(payload);
                sys_send(fd, &frame[..total], no_signal)
            } else {
                let iov = [IoSlice::new(h.as_bytes()), IoSlice::new(payload)];
                nix::sys::socket::sendmsg::<()>(fd, &iov, &[], no_signal, None)
            };
            return match sent {
                Ok(n) if n == total => Ok(()),
                // A short write would split a frame; the kernel does not
                // do that for frames of this size.
                Ok(_) => Err(SendError::PeerGone),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EACCES) => Err(SendError::Denied),
                Err(_) => Err(SendError::PeerGone),
            };
        }
    }

    fn send_control(
        &self,
        dst: WirePort,
        kind: u32,
        port: WirePort,
        value: u64,
    ) -> Result<(), SendError> {
        let c = EbpfControl {
            kind,
            reserved: 0,
            port,
            value,
        };
        self.write_frame(dst, FLAG_CONTROL, c.as_bytes())
    }

    /// The next frame, waiting until `deadline` (`None`: forever): its
    /// header and where its payload lies in `rbuf` (valid until the next
    /// call).
    fn next_frame(
        &mut self,
        deadline: Option<Instant>,
    ) -> io::Result<Option<(WireHeader, Range<usize>)>> {
        loop {
            let avail = self.rend - self.rstart;
            if avail >= WIRE_HEADER_BYTES {
                let h = WireHeader::read_from_bytes(
                    &self.rbuf[self.rstart..self.rstart + WIRE_HEADER_BYTES],
                )
                .expect("exact size");
                let len = h.len as usize;
                if !h.is_valid() || len > FRAGMENT_BYTES {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a frame the kernel program should not have passed",
                    ));
                }
                if avail >= WIRE_HEADER_BYTES + len {
                    let p = self.rstart + WIRE_HEADER_BYTES;
                    self.rstart = p + len;
                    return Ok(Some((h, p..p + len)));
                }
            }
            if self.rstart > 0 {
                self.rbuf.copy_within(self.rstart..self.rend, 0);
                self.rend -= self.rstart;
                self.rstart = 0;
            }
            // Spin first (non-blocking receives, yielding the core in
            // between so a peer on the same core can run), as the rings
            // do: a wake-up costs far more than a short spin.
            if self.spin_skips > 0 {
                self.spin_skips -= 1;
            } else if !self.spin.is_zero() && deadline.is_none_or(|d| d > Instant::now()) {
                if let Some(n) = self.spin_receive()? {
                    self.rend += n;
                    continue;
                }
            }
            // Then one blocking receive (with the socket's receive timeout
            // as the bound) rather than try, poll, receive: one system call
            // per wake-up.
            let wait = match deadline {
                None => Some(Duration::ZERO),
                Some(_) => next_wait(deadline, WAIT_STEP),
            };
            let flags = match wait {
                Some(w) => {
                    self.set_receive_timeout(w)?;
                    nix::sys::socket::MsgFlags::empty()
                }
                None => nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            };
            match sys_recv(self.sock.as_raw_fd(), &mut self.rbuf[self.rend..], flags) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the fabric closed this mailbox's socket",
                    ))
                }
                Ok(n) => self.rend += n,
                Err(nix::errno::Errno::EAGAIN) if wait.is_none() => return Ok(None),
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Receives without blocking for up to `spin`; `None` if nothing came.
    fn spin_receive(&mut self) -> io::Result<Option<usize>> {
        // The clock is read only once the first receive found nothing.
        let mut until = None;
        loop {
            match sys_recv(
                self.sock.as_raw_fd(),
                &mut self.rbuf[self.rend..],
                nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the fabric closed this mailbox's socket",
                    ))
                }
                Ok(n) => {
                    self.crowded_spins = 0;
                    return Ok(Some(n));
                }
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
            let now = Instant::now();
            if now >= *until.get_or_insert(now + self.spin) {
                return Ok(None);
            }
            std::thread::yield_now();
            // Another task ran on this core meanwhile. When that keeps
            // happening, the peer shares this core: spinning only takes
            // turns with it, which costs more than sleeping until it sends,
            // so the next receives block at once.
            if now.elapsed() > YIELD_RAN_OTHERS {
                self.crowded_spins += 1;
                if self.crowded_spins >= CROWDED_SPINS {
                    self.crowded_spins = 0;
                    self.spin_skips = SPIN_SKIPS;
                }
                return Ok(None);
            }
        }
    }

    /// How long a receive polls before it blocks (default
    /// [`DEFAULT_SPIN`]; zero: block at once).
    pub fn set_spin(&mut self, spin: Duration) {
        self.spin = spin;
    }

    /// Sets `SO_RCVTIMEO` (whole milliseconds, at least one; zero: none)
    /// if it changed.
    fn set_receive_timeout(&mut self, wait: Duration) -> io::Result<()> {
        let ms = if wait.is_zero() {
            0
        } else {
            wait.as_millis().clamp(1, u32::MAX as u128) as u32
        };
        if self.receive_timeout_ms != ms {
            self.sock
                .set_read_timeout((ms > 0).then(|| Duration::from_millis(ms as u64)))?;
            self.receive_timeout_ms = ms;
        }
        Ok(())
    }

    /// Files a control message: it updates the books.
    fn on_control(&mut self, h: &WireHeader, c: EbpfControl) {
        match c.kind {
            EBPF_CTL_CREDIT => {
                // Only from those we send to (credit may cross tenants).
                if let Some(cr) = self.credit.get_mut(&h.src) {
                    cr.consumed = cr.consumed.max(c.value).min(cr.sent);
                }
            }
            EBPF_CTL_DENIED => {
                // That frame never reached it: it takes no window.
                if let Some(cr) = self.credit.get_mut(&c.port) {
                    cr.sent = cr.sent.saturating_sub(c.value).max(cr.consumed);
                }
                self.refused.insert(c.port);
            }
            EBPF_CTL_GONE => {
                self.dead.insert(c.port, SendError::PeerGone);
                self.inbox.push_back(Event::Gone(c.port));
            }
            EBPF_CTL_NO_SUCH_MAILBOX => {
                let known = self
                    .credit
                    .get(&c.port)
                    .is_some_and(|cr| cr.watching || cr.consumed > 0);
                self.dead.entry(c.port).or_insert(if known {
                    SendError::PeerGone
                } else {
                    SendError::NoSuchMailbox
                });
            }
            _ => {}
        }
    }

    /// Files a data frame whose payload is `rbuf[r]`: joined to its
    /// message, which goes to the inbox once whole.
    fn on_data(&mut self, h: &WireHeader, r: Range<usize>) {
        let intake = self.intake.entry(h.src).or_default();
        let payload = &self.rbuf[r];
        if intake.partial.len() + payload.len() > MAX_MESSAGE_BYTES {
            // Only a sender outside our SDK could do this; drop its message.
            intake.partial = Vec::new();
            return;
        }
        intake.partial.extend_from_slice(payload);
        // A frame counts against the sender's window until it is consumed:
        // a fragment once it is joined (a message larger than the window
        // must be able to arrive), a last frame once its message is taken.
        let frame_bytes = (WIRE_HEADER_BYTES + payload.len()) as u64;
        if h.flags & FLAG_MORE != 0 {
            intake.consumed += frame_bytes;
            self.grant(h.src);
        } else {
            let msg = std::mem::take(&mut intake.partial);
            self.inbox.push_back(Event::Message(
                Delivery {
                    src: h.src,
                    tenant: h.tenant,
                },
                msg,
                frame_bytes,
            ));
        }
    }

    /// Reads one frame (until `deadline`) and files it. `Ok(false)` if
    /// nothing came.
    fn pump(&mut self, deadline: Option<Instant>) -> io::Result<bool> {
        let Some((h, r)) = self.next_frame(deadline)? else {
            return Ok(false);
        };
        match control(&h, &self.rbuf[r.clone()]) {
            Some(c) => self.on_control(&h, c),
            None => self.on_data(&h, r),
        }
        Ok(true)
    }

    /// Counts a consumed frame of `src` and returns credit when due.
    fn consumed(&mut self, src: WirePort, frame_bytes: u64) {
        self.intake.entry(src).or_default().consumed += frame_bytes;
        self.grant(src);
    }

    /// Reports consumption to `src` once a quarter window has been consumed.
    fn grant(&mut self, src: WirePort) {
        let quarter = (self.window_bytes / 4) as u64;
        let Some(i) = self.intake.get_mut(&src) else {
            return;
        };
        if i.consumed - i.reported >= quarter {
            i.reported = i.consumed;
            let v = i.consumed;
            let _ = self.send_control(src, EBPF_CTL_CREDIT, src, v);
        }
    }

    /// Asks the hub to tell us when `port` goes.
    fn watch(&mut self, port: WirePort) -> Result<(), SendError> {
        let cr = self.credit.entry(port).or_default();
        if !cr.watching {
            cr.watching = true;
            self.send_control(HUB, EBPF_CTL_WATCH, port, 0)?;
        }
        Ok(())
    }

    /// Waits until `bytes` more may go to `dst`; `Ok(false)` if the caller
    /// must not wait (`wait == false`) and there is no room.
    fn wait_credit(
        &mut self,
        dst: WirePort,
        bytes: usize,
        wait: bool,
        deadline: Option<Instant>,
    ) -> Result<bool, SendError> {
        let window = self.window_bytes as u64;
        let fits = |s: &Self| {
            s.credit
                .get(&dst)
                .is_none_or(|c| c.sent - c.consumed + bytes as u64 <= window)
        };
        if fits(self) {
            return Ok(true);
        }
        // Take in what has arrived, then wait if we must.
        while self
            .pump(Some(Instant::now()))
            .map_err(|_| SendError::PeerGone)?
        {}
        self.failure(dst)?;
        if fits(self) {
            return Ok(true);
        }
        if !wait {
            return Ok(false);
        }
        self.watch(dst)?;
        loop {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(SendError::Timeout);
            }
            self.pump(deadline).map_err(|_| SendError::PeerGone)?;
            self.failure(dst)?;
            if fits(self) {
                return Ok(true);
            }
        }
    }

    /// The error a send to `dst` gets now, if any: gone for good, or
    /// refused by the tenant policy (reported once per refusal report).
    fn failure(&mut self, dst: WirePort) -> Result<(), SendError> {
        if let Some(e) = self.dead.get(&dst) {
            return Err(e.clone());
        }
        if self.refused.remove(&dst) {
            return Err(SendError::Denied);
        }
        Ok(())
    }

    /// Sends `msg` to `dst`; the same contract as a ring's send, except
    /// that a refusal (no such mailbox, the tenant policy) comes back from
    /// the kernel and the hub after the message left: a later send to the
    /// same destination reports it.
    pub fn send(
        &mut self,
        dst: WirePort,
        msg: &[u8],
        mode: SendMode,
        deadline: Option<Instant>,
    ) -> Result<(), SendError> {
        self.failure(dst)?;
        let frag = self.fragment_bytes();
        if !mode.reliable {
            if msg.len() > frag {
                return Err(SendError::TooLarge {
                    len: msg.len(),
                    max: frag,
                });
            }
            if !self.wait_credit(dst, WIRE_HEADER_BYTES + msg.len(), false, None)? {
                self.dropped += 1;
                return Ok(());
            }
            return self.put(dst, 0, msg);
        }
        if msg.len() > MAX_MESSAGE_BYTES {
            return Err(SendError::TooLarge {
                len: msg.len(),
                max: MAX_MESSAGE_BYTES,
            });
        }
        // A destination we never heard from yet may not exist: look at the
        // replies that came back, so "no such mailbox" shows on the next send.
        if self
            .credit
            .get(&dst)
            .is_some_and(|c| c.sent > 0 && c.consumed == 0)
        {
            while self
                .pump(Some(Instant::now()))
                .map_err(|_| SendError::PeerGone)?
            {}
            self.failure(dst)?;
        }
        let mut chunks = msg.chunks(frag.max(1)).peekable();
        let mut first = true;
        if msg.is_empty() {
            if !self.wait_credit(dst, WIRE_HEADER_BYTES, mode.blocking, deadline)? {
                return Err(SendError::WouldBlock);
            }
            return self.put(dst, FLAG_RELIABLE, &[]);
        }
        while let Some(chunk) = chunks.next() {
            let flags = FLAG_RELIABLE
                | if chunks.peek().is_some() {
                    FLAG_MORE
                } else {
                    0
                };
            let may_wait = mode.blocking || !first;
            if !self.wait_credit(dst, WIRE_HEADER_BYTES + chunk.len(), may_wait, deadline)? {
                return Err(SendError::WouldBlock);
            }
            first = false;
            self.put(dst, flags, chunk)?;
        }
        Ok(())
    }

    /// Sends a mailbox's first message to `dst`, before it asks its daemon
    /// for a ring (see [`FLAG_EARLY`]): one frame, never waiting. `false`
    /// if it cannot go this way (too large, or no room in the window).
    pub fn send_early(&mut self, dst: WirePort, msg: &[u8], mode: SendMode) -> bool {
        if msg.len() > self.fragment_bytes()
            || self.failure(dst).is_err()
            || !matches!(
                self.wait_credit(dst, WIRE_HEADER_BYTES + msg.len(), false, None),
                Ok(true)
            )
        {
            return false;
        }
        let flags = FLAG_EARLY | if mode.reliable { FLAG_RELIABLE } else { 0 };
        self.put(dst, flags, msg).is_ok()
    }

    /// Sends to `dst` fail with [`SendError::PeerGone`] from now on.
    pub fn mark_gone(&mut self, dst: WirePort) {
        self.dead.insert(dst, SendError::PeerGone);
    }

    /// A message [`send_early`](Self::send_early) sent to `dst` did not
    /// arrive (its daemon said so): it takes no window there.
    pub fn early_lost(&mut self, dst: WirePort, msg_len: usize) {
        if let Some(c) = self.credit.get_mut(&dst) {
            c.sent = c
                .sent
                .saturating_sub((WIRE_HEADER_BYTES + msg_len) as u64)
                .max(c.consumed);
        }
    }

    fn put(&mut self, dst: WirePort, flags: u8, payload: &[u8]) -> Result<(), SendError> {
        self.write_frame(dst, flags, payload)?;
        self.credit.entry(dst).or_default().sent += (WIRE_HEADER_BYTES + payload.len()) as u64;
        Ok(())
    }

    /// The next whole message, from anyone, until `deadline`.
    pub fn recv(
        &mut self,
        out: &mut Vec<u8>,
        deadline: Option<Instant>,
    ) -> io::Result<Option<Delivery>> {
        self.recv_from(None, out, deadline)
            .map(|r| r.and_then(Result::ok))
    }

    /// The oldest message from `peer` that has arrived, without waiting:
    /// everything in the socket is read (and queued) to find it.
    pub fn recv_arrived_from(
        &mut self,
        peer: WirePort,
        out: &mut Vec<u8>,
    ) -> io::Result<Option<Delivery>> {
        Ok(self
            .recv_from(Some(peer), out, Some(Instant::now()))?
            .and_then(Result::ok))
    }

    /// The next message from `peer` (others stay queued) until `deadline`:
    /// `Ok(false)` on timeout, `Err(PeerGone)` once `peer` is gone and
    /// everything it sent has been received. The first call asks the hub
    /// to watch `peer`.
    pub fn recv_from_peer(
        &mut self,
        peer: WirePort,
        out: &mut Vec<u8>,
        deadline: Option<Instant>,
    ) -> Result<bool, RecvError> {
        if self.departed.contains(&peer) {
            return Err(RecvError::PeerGone);
        }
        let got = match self.watch(peer) {
            Ok(()) => self.recv_from(Some(peer), out, deadline),
            Err(_) => Ok(Some(Err(peer))),
        };
        match got {
            Ok(Some(Ok(_))) => Ok(true),
            Ok(None) => Ok(false),
            Ok(Some(Err(_))) | Err(_) => {
                self.departed.insert(peer);
                Err(RecvError::PeerGone)
            }
        }
    }

    /// The next message (from `from` only, if given; other events stay
    /// queued), or `Err(port)` when the watched `from` is gone and
    /// everything it sent has been received.
    fn recv_from(
        &mut self,
        from: Option<WirePort>,
        out: &mut Vec<u8>,
        deadline: Option<Instant>,
    ) -> io::Result<Option<Result<Delivery, WirePort>>> {
        loop {
            let pos = self.inbox.iter().position(|e| match (e, from) {
                (_, None) => true,
                (Event::Message(d, _, _), Some(f)) => d.src == f,
                (Event::Gone(p), Some(f)) => *p == f,
            });
            if let Some(i) = pos {
                match self.inbox.remove(i).expect("present") {
                    Event::Message(d, m, frame_bytes) => {
                        *out = m;
                        self.consumed(d.src, frame_bytes);
                        return Ok(Some(Ok(d)));
                    }
                    Event::Gone(p) if from == Some(p) => return Ok(Some(Err(p))),
                    Event::Gone(_) => continue,
                }
            }
            // Past the deadline: one last look without waiting.
            let wait_until = match deadline {
                Some(d) if Instant::now() >= d => Some(Instant::now()),
                d => d,
            };
            let Some((h, r)) = self.next_frame(wait_until)? else {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(None);
                }
                continue;
            };
            if let Some(c) = control(&h, &self.rbuf[r.clone()]) {
                self.on_control(&h, c);
                continue;
            }
            // The common case: a whole message for us, nothing queued ahead
            // of it from its sender; straight from the socket buffer.
            let whole = h.flags & FLAG_MORE == 0
                && from.is_none_or(|f| f == h.src)
                && self.intake.get(&h.src).is_none_or(|i| i.partial.is_empty());
            if whole {
                out.clear();
                out.extend_from_slice(&self.rbuf[r.clone()]);
                self.consumed(h.src, (WIRE_HEADER_BYTES + r.len()) as u64);
                return Ok(Some(Ok(Delivery {
                    src: h.src,
                    tenant: h.tenant,
                })));
            }
            self.on_data(&h, r);
        }
    }
}

/// `send(2)` as a bare system call. glibc's wrapper marks a cancellation
/// point around it (a locked instruction on each side), which on this path
/// is a noticeable part of a message's user-space cost.
fn sys_send(fd: RawFd, buf: &[u8], flags: nix::sys::socket::MsgFlags) -> nix::Result<usize> {
    // SAFETY: `buf` is valid for reads of its length; no address is passed.
    let n = unsafe {
        libc::syscall(
            libc::SYS_sendto,
            fd,
            buf.as_ptr(),
            buf.len(),
            flags.bits(),
            std::ptr::null::<libc::sockaddr>(),
            0 as libc::socklen_t,
        )
    };
    nix::errno::Errno::result(n).map(|n| n as usize)
}

/// `recv(2)` as a bare system call (see [`sys_send`]).
fn sys_recv(fd: RawFd, buf: &mut [u8], flags: nix::sys::socket::MsgFlags) -> nix::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length; no address is asked.
    let n = unsafe {
        libc::syscall(
            libc::SYS_recvfrom,
            fd,
            buf.as_mut_ptr(),
            buf.len(),
            flags.bits(),
            std::ptr::null_mut::<libc::sockaddr>(),
            std::ptr::null_mut::<libc::socklen_t>(),
        )
    };
    nix::errno::Errno::result(n).map(|n| n as usize)
}

/// The sending half of an eBPF link: a mailbox socket and its destination.
pub struct EbpfTx {
    endpoint: Endpoint,
    dst: WirePort,
}

impl LinkTx for EbpfTx {
    fn send(
        &mut self,
        msg: &[u8],
        mode: SendMode,
        deadline: Option<Instant>,
    ) -> Result<(), SendError> {
        self.endpoint.send(self.dst, msg, mode, deadline)
    }
    fn dropped(&self) -> u64 {
        self.endpoint.dropped()
    }
}

/// The receiving half of an eBPF link.
pub struct EbpfRx {
    endpoint: Endpoint,
    src: WirePort,
}

impl LinkRx for EbpfRx {
    fn recv(&mut self, out: &mut Vec<u8>, deadline: Option<Instant>) -> Result<bool, RecvError> {
        self.endpoint.recv_from_peer(self.src, out, deadline)
    }
}

/// Links over the eBPF path, all on one fabric loaded in this process
/// (needs root: CI runs as root).
#[derive(Default)]
pub struct EbpfTransport;

impl EbpfTransport {
    /// The process-wide fabric the links use.
    pub fn fabric() -> &'static EbpfFabric {
        static FABRIC: OnceLock<EbpfFabric> = OnceLock::new();
        FABRIC.get_or_init(|| {
            EbpfFabric::load().unwrap_or_else(|e| panic!("the eBPF path: {e} (run as root)"))
        })
    }

    /// A fresh port on node 1.
    pub fn fresh_port() -> WirePort {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        WirePort {
            node: 1,
            port: ((std::process::id() << 12) ^ NEXT.fetch_add(1, Ordering::Relaxed)).max(1),
        }
    }
}

impl Transport for EbpfTransport {
    const NAME: &'static str = "ebpf-skmsg";
    type Tx = EbpfTx;
    type Rx = EbpfRx;

    fn link(&self, ring_capacity_bytes: usize) -> io::Result<(EbpfTx, EbpfRx)> {
        let f = Self::fabric();
        let (a, b) = (Self::fresh_port(), Self::fresh_port());
        let tx = f.endpoint(a, 0, ring_capacity_bytes)?;
        let rx = f.endpoint(b, 0, ring_capacity_bytes)?;
        Ok((
            EbpfTx {
                endpoint: tx,
                dst: b,
            },
            EbpfRx {
                endpoint: rx,
                src: a,
            },
        ))
    }
}
