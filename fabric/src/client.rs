//! The fabric client: one [`Mailbox`] is one control connection to the node's
//! `fabricd` plus the rings it sends and receives on.
//!
//! The data path never involves the daemon: a send writes into the ring to
//! its receiver (created on first send), a receive polls the mailbox's rings
//! and parks on its doorbell. The control path (bind, lookup, subscriptions,
//! ring hand-over) is a protobuf request/response over the control socket;
//! events the daemon pushes (a new ring, a binding appeared or went) are
//! handled whenever the mailbox next looks, which it does cheaply by
//! watching a counter in the doorbell.
//!
//! Mailboxes of the same process exchange messages through rings in
//! anonymous memory handed over in-process ([`crate::transport::InprocTransport`]).

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use prost::Message as _;
use rustc_hash::FxHashMap;

use crate::addr::{AddrError, Address, PortId};
use crate::ctlsock::{self, Packet};
use crate::daemon::{self, SOCKET_ENV};
use crate::direct::DirectLinks;
use crate::ebpf::Endpoint;
use crate::futex::{Check, DEFAULT_SPIN};
use crate::names::{self, Binding};
use crate::proto::{self, event, request, response, server_message, ErrorCode};
use crate::ring::{poll_fair, Consumer, Doorbell, Found, Producer, SendError, SendMode};
use crate::segment::Segment;
use crate::transport::InprocTransport;
use crate::uring::{FutexOrFd, FutexWatch};
use crate::wire::WirePort;

/// Most addresses a mailbox keeps resolved (each costs one subscription).
pub const MAX_CACHED_ADDRESSES: usize = 256;

/// Set to `0` to open mailboxes without a socket on the eBPF path: their
/// first message to a receiver then waits for the ring, and first
/// messages to them are sent again on their rings.
pub const EARLY_EBPF_ENV: &str = "NEFELE_EARLY_EBPF";

/// How long a send to a name waits for this node's table to catch up when
/// the binder it picked is gone: a mailbox on another node that closed
/// moments ago can still be listed here (its withdrawal travels from its
/// node), and the mailbox that took the name over not yet.
pub const REBIND_WAIT: Duration = Duration::from_secs(2);

/// Errors of the fabric client; each says what the caller can do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no fabricd is listening at {path} ({cause}); start one with `fabricd --socket {path}`, \
         point {SOCKET_ENV} at a running one, or use an embedded node"
    )]
    NoDaemon {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("no mailbox is bound to {0}")]
    NoSuchMailbox(String),
    // The reason is part of the message (not a chained source), so it is
    // printed once however the error is formatted.
    #[error("sending to {to}: {reason}{}", detail_suffix(.detail))]
    Send {
        to: PortId,
        reason: SendError,
        /// What the daemon said, when it refused (the tenants a denial
        /// was between, say).
        detail: Option<String>,
    },
    #[error(transparent)]
    Address(#[from] AddrError),
    #[error("fabricd refused the request: {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("the connection to fabricd was lost; the mailbox is unusable")]
    DaemonGone,
    #[error("control protocol error: {0}")]
    Protocol(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// `detail` as the end of a send error's message.
fn detail_suffix(detail: &Option<String>) -> String {
    detail
        .as_ref()
        .map(|d| format!(": {d}"))
        .unwrap_or_default()
}

impl Error {
    /// A send error with nothing more to say.
    fn send(to: PortId, reason: SendError) -> Error {
        Error::Send {
            to,
            reason,
            detail: None,
        }
    }

    /// The transport-level send error, if this is one.
    pub fn send_error(&self) -> Option<&SendError> {
        match self {
            Error::Send { reason, .. } => Some(reason),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where a process-local mailbox receives rings from other mailboxes of the
/// same process.
struct LocalInbox {
    doorbell: Arc<Doorbell>,
    pending: Mutex<(bool, Vec<(PortId, Consumer)>)>,
    /// Its mailbox's tenant as the mailbox knows it ([`Mailbox::tenant`]):
    /// mailboxes of one process share rings without the daemon only
    /// within one tenant; across tenants they connect through fabricd,
    /// which applies the tenant policy.
    tenant: Mutex<Option<u32>>,
}

fn local_registry() -> &'static Mutex<HashMap<PortId, Arc<LocalInbox>>> {
    static REG: OnceLock<Mutex<HashMap<PortId, Arc<LocalInbox>>>> = OnceLock::new();
    REG.get_or_init(Default::default)
}

struct Inbound {
    from: PortId,
    consumer: Consumer,
    /// No record taken from it yet, and its sender may have sent first
    /// messages on the eBPF path (see [`first_messages_first`]).
    fresh: bool,
}

/// A mailbox: a port id, the addresses it binds, and its message queues.
pub struct Mailbox {
    sock: OwnedFd,
    port: PortId,
    ring_capacity_bytes: usize,
    doorbell: Arc<Doorbell>,
    local: Arc<LocalInbox>,
    seen_notices: u32,
    /// Blocking receives so far that could start with
    /// [`Mailbox::spin_on_rings`] (a count for its periodic skip).
    ring_only_receives: u32,
    next_id: u64,
    inbound: Vec<Inbound>,
    next_inbound: usize,
    /// Rings whose sender has an older ring in `inbound` (it lost that
    /// one to a revoke of the tenant policy and was let in again): each
    /// waits until the older ring is drained and closed, which keeps the
    /// pair's order.
    successors: Vec<Inbound>,
    /// Rings to peers.
    outbound: Outbound<Producer>,
    resolved: HashMap<Address, Vec<PortId>>,
    subscribed: Vec<Address>,
    /// The current bindings matching this mailbox's subscriptions, kept up
    /// to date by topology events.
    known_bindings: Vec<Binding>,
    spin: Duration,
    buf: Vec<u8>,
    /// This mailbox's socket on the eBPF path, once it has one: it receives
    /// there if it is pollable, and sends there to pollable receivers.
    ebpf: Option<EbpfSide>,
    /// Receivers the daemon said take their messages on the eBPF path.
    ebpf_peers: rustc_hash::FxHashSet<PortId>,
    /// Receivers whose ring the tenant policy closed, until a new ring is
    /// made: messages to them wait for it (none goes through the kernel
    /// first, which would pass what is still in the old ring).
    revoked: rustc_hash::FxHashSet<PortId>,
    /// Links of its own to and from mailboxes on other nodes.
    direct: DirectLinks,
    /// Whether a receive looks at its sockets (eBPF, direct links) before
    /// its rings: after a message from one kind, the other goes first.
    sockets_first: bool,
    /// Rings in `inbound` that are `fresh`.
    fresh_rings: usize,
    /// First messages that came on the eBPF socket of a mailbox that takes
    /// its messages on rings.
    early_received: u64,
}

/// A mailbox's rings to its receivers. The one it sent to last is looked
/// at first: a sender that talks to one peer at a time (a reply, a stream,
/// a round trip) skips the hash lookup, which is a good part of the cost
/// of a send.
struct Outbound<T> {
    rings: Vec<(PortId, T)>,
    /// Where each receiver's ring is in `rings`; FxHash because a send to
    /// another peer than the last one looks here.
    index: FxHashMap<PortId, usize>,
    /// Where the ring last sent on is (may be out of range when empty).
    last: usize,
}

impl<T> Default for Outbound<T> {
    fn default() -> Self {
        Outbound {
            rings: Vec::new(),
            index: FxHashMap::default(),
            last: 0,
        }
    }
}

impl<T> Outbound<T> {
    #[inline]
    fn get_mut(&mut self, to: &PortId) -> Option<&mut T> {
        if self.rings.get(self.last).is_none_or(|(p, _)| p != to) {
            self.last = *self.index.get(to)?;
        }
        Some(&mut self.rings[self.last].1)
    }

    fn insert(&mut self, to: PortId, ring: T) {
        match self.index.get(&to) {
            Some(&i) => self.rings[i].1 = ring,
            None => {
                self.index.insert(to, self.rings.len());
                self.rings.push((to, ring));
            }
        }
    }

    fn remove(&mut self, to: &PortId) {
        let Some(i) = self.index.remove(to) else {
            return;
        };
        self.rings.swap_remove(i);
        if let Some((moved, _)) = self.rings.get(i) {
            self.index.insert(*moved, i);
        }
    }
}

/// The eBPF half of a mailbox.
struct EbpfSide {
    endpoint: Endpoint,
    /// Messages to this mailbox arrive on `endpoint` (and on rings from
    /// other nodes' gateways). Otherwise only first messages do, sent
    /// before their ring existed.
    receives: bool,
    /// Parks on the doorbell and the socket together (a receiving side;
    /// any other parks on the doorbell alone: see [`Mailbox::recv_into`]).
    waiter: Option<FutexOrFd>,
    /// What [`Mailbox::pollable_fd`] is, for a receiving side.
    poll_set: Option<PollSet>,
    tenant: u32,
}

/// A pollable mailbox's fd: an epoll set holding its eBPF socket and a
/// [`FutexWatch`] on its doorbell, so that it turns readable for messages
/// on either path (rings from other nodes wake the doorbell, not the
/// socket) and for control events. A receive that finds nothing leaves the
/// watch armed and the sleep announced (senders then wake the futex);
/// the next receive ends it and reaps the watch, so the fd is quiet again.
struct PollSet {
    epoll: nix::sys::epoll::Epoll,
    watch: FutexWatch,
    parked: Option<crate::ring::Parking>,
}

impl PollSet {
    fn new(socket: std::os::fd::RawFd) -> std::io::Result<PollSet> {
        use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
        use std::os::fd::{AsRawFd as _, BorrowedFd};
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let watch = FutexWatch::new()?;
        // SAFETY: both fds are open for the duration of the calls (the
        // socket is the endpoint's, which outlives this set).
        let (socket, ring) = unsafe {
            (
                BorrowedFd::borrow_raw(socket),
                BorrowedFd::borrow_raw(watch.as_raw_fd()),
            )
        };
        epoll.add(socket, EpollEvent::new(EpollFlags::EPOLLIN, 0))?;
        epoll.add(ring, EpollEvent::new(EpollFlags::EPOLLIN, 1))?;
        Ok(PollSet {
            epoll,
            watch,
            parked: None,
        })
    }
}

/// A receive without a deadline first spins on its rings alone, while they
/// are the only place a message can come from, for at most this many
/// rounds (each a `pause` and a look at every ring: ~25 ns with one ring
/// here; one look for a mailbox whose spin is zero), before it looks
/// everywhere (see [`Mailbox::recv_into`]).
pub const RING_ONLY_POLLS: u32 = 48;
/// Every this many receives without a deadline, one skips the rings-only
/// spin, so that what the full receive looks at only now and then (a
/// first message on the socket whose sender died before its ring came)
/// is not held up by a busy ring.
pub const FULL_RECEIVE_EVERY: u32 = 64;

enum Wake {
    Notice,
    Message(usize),
    Closed(usize),
    /// A message on the eBPF path or a direct link.
    From(PortId),
}

fn ring_wake(found: Found) -> Wake {
    match found {
        Found::Message(i) => Wake::Message(i),
        Found::Closed(i) => Wake::Closed(i),
    }
}

/// Keeps each sender's order across its switch from the eBPF path to its
/// ring. A sender's first message to us goes on the eBPF path, then it
/// asks for the ring; and since the kernel delivers a redirected message
/// before the sender's `sendmsg` returns, everything it sent there is in
/// our socket by the time its first ring record is visible. So before the
/// first record of a new ring is taken, the socket is read out and the
/// sender's messages from it go first. Returns the sender of such a
/// message (in `out`), if there is one.
fn first_messages_first(
    inbound: &mut [Inbound],
    fresh_rings: &mut usize,
    endpoint: &mut Endpoint,
    out: &mut Vec<u8>,
) -> std::io::Result<Option<PortId>> {
    for ring in inbound.iter_mut().filter(|i| i.fresh) {
        if !ring.consumer.has_record() {
            continue;
        }
        let sender = WirePort {
            node: ring.from.node,
            port: ring.from.port,
        };
        if endpoint.recv_arrived_from(sender, out)?.is_some() {
            return Ok(Some(ring.from));
        }
        ring.fresh = false;
        *fresh_rings -= 1;
    }
    Ok(None)
}

/// How a mailbox reaches a receiver.
enum Route {
    Ring,
    Ebpf,
    Direct,
}

impl Mailbox {
    /// Opens a mailbox on the daemon at the default socket path
    /// ([`daemon::default_socket_path`]).
    pub fn open() -> Result<Mailbox> {
        Self::open_at(&daemon::default_socket_path())
    }

    /// Opens a mailbox on the daemon listening at `path`.
    pub fn open_at(path: &Path) -> Result<Mailbox> {
        let early = std::env::var_os(EARLY_EBPF_ENV).is_none_or(|v| v != "0");
        Self::open_at_with(path, early)
    }

    /// [`Mailbox::open_at`], with or without a socket on the eBPF path for
    /// first messages (`early`; see [`EARLY_EBPF_ENV`]), whatever the
    /// environment says.
    pub fn open_at_with(path: &Path, early: bool) -> Result<Mailbox> {
        let sock = ctlsock::connect(path).map_err(|cause| Error::NoDaemon {
            path: path.to_path_buf(),
            cause,
        })?;
        let mut me = Mailbox {
            sock,
            port: PortId { node: 0, port: 0 },
            ring_capacity_bytes: 0,
            doorbell: Arc::new(Doorbell::new(Segment::anonymous(
                crate::ring::DOORBELL_BYTES,
            )?)?),
            local: Arc::new(LocalInbox {
                doorbell: Arc::new(Doorbell::new(Segment::anonymous(
                    crate::ring::DOORBELL_BYTES,
                )?)?),
                pending: Mutex::new((false, Vec::new())),
                tenant: Mutex::new(None),
            }),
            seen_notices: 0,
            ring_only_receives: 0,
            next_id: 1,
            inbound: Vec::new(),
            next_inbound: 0,
            successors: Vec::new(),
            outbound: Outbound::default(),
            resolved: HashMap::new(),
            subscribed: Vec::new(),
            known_bindings: Vec::new(),
            spin: DEFAULT_SPIN,
            buf: Vec::new(),
            ebpf: None,
            ebpf_peers: Default::default(),
            revoked: Default::default(),
            direct: DirectLinks::new(),
            sockets_first: true,
            fresh_rings: 0,
            early_received: 0,
        };
        let (body, fds) = me.call(request::Body::Open(proto::Open {
            pid: std::process::id(),
            early,
        }))?;
        let response::Body::Opened(opened) = body else {
            return Err(Error::Protocol("expected Opened".into()));
        };
        let mut fds = fds.into_iter();
        let bell_fd = fds
            .next()
            .ok_or_else(|| Error::Protocol("Opened without a doorbell fd".into()))?;
        me.doorbell = Arc::new(Doorbell::new(Segment::from_fd(bell_fd)?)?);
        me.seen_notices = me.doorbell.notices();
        me.port = opened
            .port
            .ok_or_else(|| Error::Protocol("Opened without a port".into()))?
            .into();
        me.ring_capacity_bytes = opened.ring_capacity_bytes as usize;
        if let (Some(window), Some(socket)) = (opened.ebpf_window_bytes, fds.next()) {
            me.adopt_ebpf_socket(socket, window, opened.ebpf_tenant)?;
        }
        me.local = Arc::new(LocalInbox {
            doorbell: me.doorbell.clone(),
            pending: Mutex::new((false, Vec::new())),
            tenant: Mutex::new(me.tenant()),
        });
        lock(local_registry()).insert(me.port, me.local.clone());
        Ok(me)
    }

    /// Opens a pollable mailbox on the daemon at `path`: it takes its
    /// messages on the eBPF path, through one socket ([`Mailbox::pollable_fd`])
    /// that an epoll loop or tokio can wait on, and its blocking receive
    /// waits on that socket and its rings together (io_uring). Needs the
    /// eBPF path on the node (`fabricd` running as root).
    pub fn open_pollable_at(path: &Path) -> Result<Mailbox> {
        Self::open_pollable_in(path, None)
    }

    /// [`Mailbox::open_pollable_at`] on the default daemon.
    pub fn open_pollable() -> Result<Mailbox> {
        Self::open_pollable_at(&daemon::default_socket_path())
    }

    /// [`Mailbox::open_pollable_at`] in `tenant` (honoured for root only;
    /// everyone else is in the tenant of their uid).
    pub fn open_pollable_in(path: &Path, tenant: Option<u32>) -> Result<Mailbox> {
        let mut me = Self::open_at(path)?;
        // Senders in this process must not hand it in-process rings, which
        // it would not read: they go through the daemon like everyone.
        lock(local_registry()).remove(&me.port);
        me.open_ebpf(true, tenant)?;
        Ok(me)
    }

    /// The fd an event loop (epoll, tokio) waits on for a pollable
    /// mailbox: it turns readable when a message or a control event waits,
    /// whichever path it came by (the eBPF socket from this node, a ring
    /// from another node's daemon). Receive with
    /// [`Mailbox::try_recv_into`] until it returns `None` before waiting
    /// again: only a receive that found nothing arms it (and messages
    /// already read from the socket are buffered in the mailbox). `None`
    /// for a mailbox that is not pollable.
    pub fn pollable_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd as _;
        self.ebpf
            .as_ref()
            .and_then(|e| e.poll_set.as_ref())
            .map(|p| p.epoll.0.as_raw_fd())
    }

    /// Ends a sleep announced for [`Mailbox::pollable_fd`] and takes the
    /// watch's completions, so the fd stops being readable for them.
    #[inline]
    fn unpark(&mut self) {
        if let Some(p) = self.ebpf.as_mut().and_then(|e| e.poll_set.as_mut()) {
            p.parked = None;
            p.watch.reap();
        }
    }

    /// For a pollable mailbox whose receive found nothing: announces the
    /// sleep and arms the watch (the caller then looks once more). Returns
    /// whether it did.
    fn arm_pollable(&mut self) -> Result<bool> {
        let Some(p) = self.ebpf.as_mut().and_then(|e| e.poll_set.as_mut()) else {
            return Ok(false);
        };
        let parked = self.doorbell.park();
        p.watch.arm(parked.word(), parked.seen())?;
        p.parked = Some(parked);
        Ok(true)
    }

    /// Puts this mailbox in `tenant` on the eBPF path (honoured for root
    /// only; everyone else is in the tenant of their uid), giving it its
    /// socket there if it has none. Its sends on that path carry that
    /// tenant, stamped by the kernel.
    pub fn join_tenant(&mut self, tenant: u32) -> Result<()> {
        self.open_ebpf(false, Some(tenant))
    }

    /// This mailbox's tenant on the eBPF path, once it has a socket there.
    pub fn tenant(&self) -> Option<u32> {
        self.ebpf.as_ref().map(|e| e.tenant)
    }

    /// Asks for this mailbox's socket on the eBPF path, or, if it has one
    /// (see [`EARLY_EBPF_ENV`]), for what changes on it: its tenant, or
    /// taking all of its messages there (`receive`).
    fn open_ebpf(&mut self, receive: bool, tenant: Option<u32>) -> Result<()> {
        let body = request::Body::EbpfOpen(proto::EbpfOpen { receive, tenant });
        let (body, fds) = match self.ebpf.as_ref() {
            Some(side) => {
                let socket = side.endpoint.socket().try_clone()?;
                self.call_attached(body, &[socket.as_fd()])?
            }
            None => self.call(body)?,
        };
        let response::Body::EbpfOpened(opened) = body else {
            return Err(Error::Protocol("expected EbpfOpened".into()));
        };
        // The tenant as this mailbox knew it (none known before it had a
        // socket: it may have been in its uid's, or moved now).
        let before = self.tenant();
        if let Some(fd) = fds.into_iter().next() {
            self.adopt_ebpf_socket(fd, opened.window_bytes, opened.tenant)?;
        }
        let side = self
            .ebpf
            .as_mut()
            .ok_or_else(|| Error::Protocol("EbpfOpened without a socket".into()))?;
        side.tenant = opened.tenant;
        if receive && !side.receives {
            side.receives = true;
            side.poll_set = Some(PollSet::new(side.endpoint.as_raw_fd())?);
            side.waiter = Some(FutexOrFd::new()?);
        }
        *lock(&self.local.tenant) = Some(opened.tenant);
        if before != Some(opened.tenant) {
            self.leave_local_rings();
            self.resubscribe()?;
        }
        Ok(())
    }

    fn adopt_ebpf_socket(&mut self, fd: OwnedFd, window_bytes: u32, tenant: u32) -> Result<()> {
        let port = WirePort {
            node: self.port.node,
            port: self.port.port,
        };
        let mut endpoint =
            Endpoint::from_socket(std::net::TcpStream::from(fd), port, window_bytes as usize);
        // The mailbox's own wait spins; the endpoint's receives only look.
        endpoint.set_spin(Duration::ZERO);
        self.ebpf = Some(EbpfSide {
            endpoint,
            receives: false,
            waiter: None,
            poll_set: None,
            tenant,
        });
        Ok(())
    }

    /// Sends a first message to `to` on this mailbox's eBPF socket, before
    /// asking for the ring: it arrives in one kernel hop, while the ring is
    /// being made. When it went (CLOCK_MONOTONIC ns), if it did.
    fn send_early(&mut self, to: PortId, msg: &[u8], mode: SendMode) -> Option<u64> {
        let side = self.ebpf.as_mut()?;
        // Mailboxes of this process share rings without the daemon.
        if to.node != self.port.node || lock(local_registry()).contains_key(&to) {
            return None;
        }
        let dst = WirePort {
            node: to.node,
            port: to.port,
        };
        let at = crate::futex::monotonic_ns();
        side.endpoint.send_early(dst, msg, mode).then_some(at)
    }

    /// Sends to `to` on the eBPF path fail from now on: it is gone.
    fn forget_early_peer(&mut self, to: PortId) {
        if let Some(side) = self.ebpf.as_mut() {
            side.endpoint.mark_gone(WirePort {
                node: to.node,
                port: to.port,
            });
        }
    }

    /// A first message sent to `to` on the eBPF path did not arrive (the
    /// daemon said so): it takes none of `to`'s window.
    fn early_lost(&mut self, to: PortId, len: usize) {
        if let Some(side) = self.ebpf.as_mut() {
            let dst = WirePort {
                node: to.node,
                port: to.port,
            };
            side.endpoint.early_lost(dst, len);
        }
    }

    /// First messages that came on this mailbox's eBPF socket while it
    /// takes its messages on rings (sent before their ring existed).
    pub fn early_received(&self) -> u64 {
        self.early_received
    }

    /// Sends to a receiver on the eBPF path, opening this mailbox's socket
    /// there first if it has none.
    /// The outer error is about opening the socket; the inner one is the
    /// send's own.
    fn send_ebpf(
        &mut self,
        to: PortId,
        msg: &[u8],
        mode: SendMode,
        deadline: Option<Instant>,
    ) -> Result<std::result::Result<(), SendError>> {
        if self.ebpf.is_none() {
            self.open_ebpf(false, None)?;
        }
        let side = self.ebpf.as_mut().expect("opened above");
        let dst = WirePort {
            node: to.node,
            port: to.port,
        };
        Ok(side.endpoint.send(dst, msg, mode, deadline))
    }

    /// This mailbox's port id.
    pub fn port(&self) -> PortId {
        self.port
    }

    /// How long a receive or a blocked send spins before parking.
    pub fn set_spin(&mut self, spin: Duration) {
        self.spin = spin;
    }

    /// Binds a service range, a name, or both, e.g. `printer@{8080,1,1}`.
    pub fn bind(&mut self, address: &Address) -> Result<()> {
        self.call_ok(request::Body::Bind(proto::Bind {
            address: address.to_string(),
        }))
    }

    /// Removes a binding made with [`Mailbox::bind`].
    pub fn unbind(&mut self, address: &Address) -> Result<()> {
        self.call_ok(request::Body::Unbind(proto::Unbind {
            address: address.to_string(),
        }))
    }

    /// The ports `address` reaches now (one for anycast, all for multicast).
    pub fn lookup(&mut self, address: &Address) -> Result<Vec<PortId>> {
        Ok(self.lookup_counted(address)?.0)
    }

    fn lookup_counted(&mut self, address: &Address) -> Result<(Vec<PortId>, usize)> {
        let (body, _) = self.call(request::Body::Lookup(proto::Lookup {
            address: address.to_string(),
        }))?;
        match body {
            response::Body::Lookup(l) => Ok((
                l.ports.into_iter().map(Into::into).collect(),
                l.candidates as usize,
            )),
            _ => Err(Error::Protocol("expected a lookup reply".into())),
        }
    }

    /// The daemon's counters.
    pub fn daemon_stats(&mut self) -> Result<proto::Stats> {
        let (body, _) = self.call(request::Body::Stats(proto::GetStats {}))?;
        match body {
            response::Body::Stats(s) => Ok(*s),
            _ => Err(Error::Protocol("expected stats".into())),
        }
    }

    /// Lets mailboxes of tenant `src` send to mailboxes of tenant `dst` on
    /// the eBPF path (`allow`), or withdraws that: one direction, root
    /// only, and it needs the node's eBPF path. Senders that were refused
    /// before may send again at once.
    pub fn set_tenant_policy(&mut self, src: u32, dst: u32, allow: bool) -> Result<()> {
        self.call_ok(request::Body::TenantPolicy(proto::TenantPolicy {
            src_tenant: src,
            dst_tenant: dst,
            allow,
        }))
    }

    /// The cluster's nodes as this node sees them (just this one on a
    /// single node), by node id.
    pub fn nodes(&mut self) -> Result<proto::NodeList> {
        let (body, _) = self.call(request::Body::Nodes(proto::ListNodes {}))?;
        match body {
            response::Body::Nodes(n) => Ok(n),
            _ => Err(Error::Protocol("expected a node list".into())),
        }
    }

    /// Every binding the node knows (in a cluster, with the other nodes'
    /// cluster-scope ones).
    pub fn bindings(&mut self) -> Result<Vec<Binding>> {
        let (body, _) = self.call(request::Body::Bindings(proto::ListBindings {}))?;
        let response::Body::Bindings(list) = body else {
            return Err(Error::Protocol("expected a binding list".into()));
        };
        list.bindings
            .into_iter()
            .map(|b| Ok(Binding::try_from(b)?))
            .collect()
    }

    /// The pid of the process serving this mailbox's daemon (from the
    /// control socket's peer credentials): what `nefele down` signals.
    pub fn daemon_pid(&self) -> Result<u32> {
        let cred =
            nix::sys::socket::getsockopt(&self.sock, nix::sys::socket::sockopt::PeerCredentials)
                .map_err(|e| Error::Io(e.into()))?;
        Ok(cred.pid() as u32)
    }

    /// Unreliable messages this mailbox's sends dropped so far (all peers).
    pub fn dropped(&self) -> u64 {
        self.outbound
            .rings
            .iter()
            .map(|(_, p)| p.dropped())
            .sum::<u64>()
            + self.ebpf.as_ref().map_or(0, |e| e.endpoint.dropped())
            + self.direct.dropped()
    }

    /// Waits until something bound to `address` exists, at most `timeout`.
    /// Returns as soon as the binding appears (a topology subscription), not
    /// by polling.
    pub fn service_exists(&mut self, address: &Address, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        if let Address::Port(_) = address {
            return Ok(!self.lookup(address)?.is_empty());
        }
        // Subscribing delivers the current matches before its reply.
        self.subscribe(address)?;
        loop {
            self.drain_events()?;
            let node = self.port.node;
            if self
                .known_bindings
                .iter()
                .any(|b| names::matches(address, b, node))
            {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            self.wait_for_event(deadline)?;
        }
    }

    /// Waits until the daemon has something to say on the control socket,
    /// at most until `deadline`.
    fn wait_for_event(&mut self, deadline: Instant) -> Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = [nix::poll::PollFd::new(
            self.sock.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
        match nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(ms)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
            Err(e) => Err(Error::Io(e.into())),
        }
    }

    /// Sends `msg` to `to` (reliable, blocking): to one binder for anycast,
    /// to each for multicast. Sending to nobody is an error.
    pub fn send(&mut self, to: &Address, msg: &[u8]) -> Result<()> {
        self.send_with(to, msg, SendMode::RELIABLE)
    }

    /// Sends with an explicit [`SendMode`] (unreliable, or non-blocking).
    ///
    /// A binder that turns out to be gone when the send reaches it (it
    /// closed or died) is no binder any more: a multicast that reached
    /// others is done. When none was reached and this node's table still
    /// lists a gone one (its withdrawal has not arrived from its node), the
    /// send waits for the table to catch up, at most [`REBIND_WAIT`], and a
    /// binder that appears meanwhile (one that took the name over) gets the
    /// message; otherwise it fails as the send to the gone one did.
    pub fn send_with(&mut self, to: &Address, msg: &[u8], mode: SendMode) -> Result<()> {
        if let Address::Port(p) = to {
            return self.send_to_port(*p, msg, mode);
        }
        let mut gone: Vec<PortId> = Vec::new();
        let mut rebind: Option<(Instant, Error)> = None;
        loop {
            self.poll_events()?;
            let mut ports = match self.resolved.get(to) {
                Some(p) => p.clone(),
                None => self.resolve(to)?,
            };
            ports.retain(|p| !gone.contains(p));
            if ports.is_empty() {
                // A gone binder still in the table: its withdrawal is on
                // its way, and perhaps a successor's binding.
                let stale = self.known_bindings.iter().any(|b| gone.contains(&b.port));
                match rebind {
                    Some((until, _)) if stale && Instant::now() < until => {
                        self.resolved.remove(to);
                        self.wait_for_event(until)?;
                        self.drain_events()?;
                        continue;
                    }
                    Some((_, e)) => return Err(e),
                    None => return Err(Error::NoSuchMailbox(to.to_string())),
                }
            }
            let mut delivered = false;
            let (mut gone_err, mut other_err) = (None, None);
            for &p in &ports {
                match self.send_to_port(p, msg, mode) {
                    Ok(()) => delivered = true,
                    Err(e) => {
                        self.resolved.remove(to);
                        let binder_gone = matches!(
                            e.send_error(),
                            Some(SendError::PeerGone | SendError::NoSuchMailbox)
                        );
                        if binder_gone {
                            gone.push(p);
                            gone_err.get_or_insert(e);
                        } else {
                            other_err.get_or_insert(e);
                        }
                    }
                }
            }
            if let Some(e) = other_err {
                return Err(e);
            }
            match gone_err {
                Some(e) if !delivered => {
                    let until = rebind
                        .as_ref()
                        .map_or(Instant::now() + REBIND_WAIT, |r| r.0);
                    rebind = Some((until, e));
                }
                _ => return Ok(()),
            }
        }
    }

    /// Sends to a port id directly: the fastest path.
    #[inline]
    pub fn send_to_port(&mut self, to: PortId, msg: &[u8], mode: SendMode) -> Result<()> {
        self.send_to_port_until(to, msg, mode, None)
    }

    /// [`Mailbox::send_to_port`] that gives up with [`SendError::Timeout`]
    /// at `deadline` if the receiver stays full.
    #[inline]
    pub fn send_to_port_until(
        &mut self,
        to: PortId,
        msg: &[u8],
        mode: SendMode,
        deadline: Option<Instant>,
    ) -> Result<()> {
        let sent = match self.outbound.get_mut(&to) {
            Some(producer) => match producer.send(msg, mode, deadline) {
                Err(SendError::Denied) => {
                    // The tenant policy closed this ring: ask fabricd
                    // again, which refuses (and counts) or, if allowed
                    // again by now, makes a new ring (which the receiver
                    // takes after the old one).
                    self.outbound.remove(&to);
                    self.revoked.insert(to);
                    self.connect_and_send(to, msg, mode, deadline)?
                }
                sent => sent,
            },
            None if self.ebpf_peers.contains(&to) => self.send_ebpf(to, msg, mode, deadline)?,
            None if self.direct.has_out(&to) => self.send_direct(to, msg, mode, deadline),
            None => self.connect_and_send(to, msg, mode, deadline)?,
        };
        match sent {
            Ok(()) => Ok(()),
            Err(source) => {
                if source == SendError::PeerGone {
                    self.outbound.remove(&to);
                }
                Err(Error::send(to, source))
            }
        }
    }

    /// A send to `to` with no way there yet: asks fabricd (see
    /// [`Mailbox::connect`]), sending the message through the kernel first
    /// if the eBPF path takes it and no earlier ring to `to` was revoked.
    /// The outer error is the request's; the inner one the send's.
    fn connect_and_send(
        &mut self,
        to: PortId,
        msg: &[u8],
        mode: SendMode,
        deadline: Option<Instant>,
    ) -> Result<Result<(), SendError>> {
        let early_sent = if self.revoked.contains(&to) {
            None
        } else {
            self.send_early(to, msg, mode)
        };
        let early = early_sent.is_some();
        let (route, reached) = match self.connect(to, early_sent.unwrap_or(0)) {
            Err(Error::Refused {
                code: ErrorCode::ErrorGone,
                ..
            }) => {
                // It closed after the first message reached it,
                // as a ring message would have reached its ring.
                // The next send reports it gone.
                self.forget_early_peer(to);
                return Ok(Ok(()));
            }
            Err(e) => {
                if early {
                    self.early_lost(to, msg.len());
                }
                return Err(match e {
                    Error::Refused {
                        code: ErrorCode::ErrorDenied,
                        message,
                    } => Error::Send {
                        to,
                        reason: SendError::Denied,
                        detail: Some(message),
                    },
                    e => e,
                });
            }
            Ok(r) => r,
        };
        if early && reached {
            return Ok(Ok(()));
        }
        if early {
            // It went nowhere (the receiver has no socket there, or the
            // tenant policy): it goes again now.
            self.early_lost(to, msg.len());
        }
        Ok(match route {
            Route::Ring => self
                .outbound
                .get_mut(&to)
                .expect("connected just above")
                .send(msg, mode, deadline),
            Route::Ebpf => self.send_ebpf(to, msg, mode, deadline)?,
            Route::Direct => self.send_direct(to, msg, mode, deadline),
        })
    }

    /// Receives the next message into `out` (replacing its contents), waiting
    /// until `deadline` (forever if `None`). Returns the sender's port, or
    /// `None` on timeout. Without a deadline it first spins on its rings
    /// alone (at most [`RING_ONLY_POLLS`] rounds) while nothing else can
    /// bring a message; it then spins on everything for the rest of its
    /// spin time and parks.
    pub fn recv_into(
        &mut self,
        out: &mut Vec<u8>,
        deadline: Option<Instant>,
    ) -> Result<Option<PortId>> {
        if deadline.is_none() {
            if let Some(from) = self.spin_on_rings(out) {
                return Ok(Some(from));
            }
        }
        self.unpark();
        let mut armed = false;
        // Thorough polls of this receive (see `look_at_socket` below).
        let mut thorough_polls = 0u32;
        loop {
            let seen = self.seen_notices;
            // Direct links' sockets join the sets this waits on.
            let socket = self.ebpf.as_ref().filter(|e| e.receives);
            let pollable = self.ebpf.as_ref().and_then(|e| e.poll_set.as_ref());
            self.direct.sync_wait(
                socket.map(|e| e.endpoint.as_raw_fd()),
                pollable.map(|p| &p.epoll),
            )?;
            let Mailbox {
                doorbell,
                inbound,
                next_inbound,
                spin,
                ebpf,
                direct,
                sockets_first,
                fresh_rings,
                early_received,
                ..
            } = self;
            let DirectLinks {
                inbound: direct_in,
                wait: direct_wait,
                ..
            } = direct;
            // A pollable mailbox also receives on its socket, and parks on
            // socket and doorbell together (io_uring); any other parks on
            // the doorbell's futex.
            let (mut socket, receives, mut waiter) = match ebpf.as_mut() {
                Some(EbpfSide {
                    endpoint,
                    waiter,
                    receives,
                    ..
                }) => {
                    let fd = endpoint.as_raw_fd();
                    (Some(endpoint), *receives, waiter.as_mut().map(|w| (w, fd)))
                }
                None => (None, false, None),
            };
            let mut socket_error = None;
            let woke = doorbell.wait_until_parking(
                *spin,
                deadline,
                |check| {
                    let mut from_socket =
                        |endpoint: &mut Endpoint, out: &mut Vec<u8>| match endpoint
                            .recv(out, Some(Instant::now()))
                        {
                            Ok(Some(d)) => {
                                *early_received += u64::from(!receives);
                                Some(Wake::From(PortId {
                                    node: d.src.node,
                                    port: d.src.port,
                                }))
                            }
                            Ok(None) => None,
                            Err(e) => {
                                socket_error = Some(e);
                                Some(Wake::Notice)
                            }
                        };
                    if check == Check::Full && doorbell.notices() != seen {
                        // The notice may bring a sender's new ring, which
                        // takes long to map, while that sender's first
                        // message waits in the socket already: it goes first.
                        return socket
                            .as_mut()
                            .and_then(|endpoint| from_socket(endpoint, out))
                            .or(Some(Wake::Notice));
                    }
                    if *fresh_rings > 0 {
                        if let Some(endpoint) = socket.as_mut() {
                            match first_messages_first(inbound, fresh_rings, endpoint, out) {
                                Ok(Some(from)) => {
                                    *early_received += u64::from(!receives);
                                    return Some(Wake::From(from));
                                }
                                Ok(None) => {}
                                Err(e) => {
                                    socket_error = Some(e);
                                    return Some(Wake::Notice);
                                }
                            }
                        }
                    }
                    // A mailbox that takes its messages on rings hears of a
                    // first message on its socket from a notice (above: the
                    // sender's Connect rings its doorbell); it also looks
                    // in every 64th thorough poll, for a first message
                    // whose sender died before its Connect.
                    let look_at_socket = receives || {
                        thorough_polls += u32::from(check == Check::Full);
                        check == Check::Full && thorough_polls.is_multiple_of(64)
                    };
                    // Rings and sockets take turns at going first, so that
                    // a busy one cannot starve the other.
                    if !*sockets_first {
                        let found =
                            poll_fair(inbound, next_inbound, out, check, |i| &mut i.consumer);
                        if let Some(f) = found {
                            return Some(ring_wake(f));
                        }
                    }
                    if let Some(endpoint) = socket.as_mut().filter(|_| look_at_socket) {
                        if let Some(wake) = from_socket(endpoint, out) {
                            return Some(wake);
                        }
                    }
                    if !direct_in.is_empty() {
                        if let Some(from) = direct_in.poll(out) {
                            return Some(Wake::From(from));
                        }
                    }
                    if !*sockets_first {
                        return None;
                    }
                    poll_fair(inbound, next_inbound, out, check, |i| &mut i.consumer).map(ring_wake)
                },
                |epoch, seen, slice| match waiter.as_mut() {
                    _ if direct_wait.is_some() => {
                        let w = direct_wait.as_mut().expect("matched");
                        if let Err(e) = w.park(epoch, seen, slice) {
                            eprintln!("fabric: io_uring wait failed ({e}); waiting on the futex");
                            crate::futex::wait(
                                epoch,
                                seen,
                                Some(slice.min(Duration::from_millis(1))),
                            );
                        }
                    }
                    Some((w, fd)) => {
                        if let Err(e) = w.wait(epoch, seen, *fd, slice) {
                            // Fall back to a short plain futex wait.
                            eprintln!("fabric: io_uring wait failed ({e}); waiting on the futex");
                            crate::futex::wait(
                                epoch,
                                seen,
                                Some(slice.min(Duration::from_millis(1))),
                            );
                        }
                    }
                    None => crate::futex::wait(epoch, seen, Some(slice)),
                },
            );
            if let Some(e) = socket_error {
                return Err(Error::Io(e));
            }
            match woke {
                // A pollable mailbox arms its fd, then looks once more: a
                // message that came in between is seen now, a later one
                // makes the fd readable.
                None if !armed && self.arm_pollable()? => armed = true,
                None => return Ok(None),
                Some(Wake::From(from)) => {
                    self.sockets_first = false;
                    return Ok(Some(from));
                }
                Some(Wake::Message(i)) => {
                    self.sockets_first = true;
                    return Ok(Some(self.inbound[i].from));
                }
                Some(Wake::Closed(i)) => {
                    let closed = self.inbound.swap_remove(i);
                    self.fresh_rings -= usize::from(closed.fresh);
                    if let Some(s) = self.successors.iter().position(|s| s.from == closed.from) {
                        let next = self.successors.swap_remove(s);
                        self.fresh_rings += usize::from(next.fresh);
                        self.inbound.push(next);
                    }
                }
                Some(Wake::Notice) => self.drain_events()?,
            }
        }
    }

    /// Whether a ring from `from` is attached and still open (as of the
    /// last receive): once its sender is gone and everything it sent has
    /// been received, it is not.
    pub fn has_ring_from(&self, from: PortId) -> bool {
        self.inbound.iter().any(|i| i.from == from)
            || self.direct.is_from(from)
            || self.successors.iter().any(|i| i.from == from)
    }

    /// Whether messages to mailboxes on other nodes may go over direct links
    /// of this mailbox's own (see [`crate::direct`]); on unless
    /// `NEFELE_DIRECT_LINKS=0`. Links made already stay.
    pub fn set_direct_links(&mut self, on: bool) {
        self.direct.enabled = on;
    }

    /// Receives without waiting.
    pub fn try_recv_into(&mut self, out: &mut Vec<u8>) -> Result<Option<PortId>> {
        self.recv_into(out, Some(Instant::now()))
    }

    /// After a move to another tenant, closes the rings it shares with
    /// mailboxes of its own process (no daemon sees those): their senders'
    /// next sends, and its own, connect through fabricd, which applies the
    /// tenant policy (or share memory again if the tenants now match).
    /// What was sent before is still delivered.
    fn leave_local_rings(&mut self) {
        // Rings handed over but not yet taken are all from this process.
        for (_, consumer) in &lock(&self.local.pending).1 {
            consumer.revoke();
        }
        let registry = lock(local_registry());
        for ring in self.inbound.iter().chain(&self.successors) {
            if registry.contains_key(&ring.from) {
                ring.consumer.revoke();
            }
        }
        let local: Vec<PortId> = self
            .outbound
            .rings
            .iter()
            .map(|(to, _)| *to)
            .filter(|to| registry.contains_key(to))
            .collect();
        drop(registry);
        for to in local {
            self.outbound.remove(&to);
            self.revoked.insert(to);
        }
    }

    /// Takes its subscriptions again, after a move to another tenant,
    /// whose names it sees instead: what it knew of the bindings goes, and
    /// the daemon sends what it sees now.
    fn resubscribe(&mut self) -> Result<()> {
        let addresses = std::mem::take(&mut self.subscribed);
        for a in &addresses {
            self.call_ok(request::Body::Unsubscribe(proto::Unsubscribe {
                address: a.to_string(),
            }))?;
        }
        self.known_bindings.clear();
        self.resolved.clear();
        for a in &addresses {
            self.subscribe(a)?;
        }
        Ok(())
    }

    fn subscribe(&mut self, address: &Address) -> Result<()> {
        if self.subscribed.contains(address) {
            return Ok(());
        }
        self.call_ok(request::Body::Subscribe(proto::Subscribe {
            address: address.to_string(),
        }))?;
        self.subscribed.push(address.clone());
        Ok(())
    }

    /// Looks `to` up and, while the cache has room, keeps the answer; the
    /// subscription taken for it invalidates it when bindings change.
    /// Anycast answers with several candidates are not kept: each send picks
    /// again, so round-robin over binders keeps working.
    fn resolve(&mut self, to: &Address) -> Result<Vec<PortId>> {
        let cacheable =
            self.subscribed.len() < MAX_CACHED_ADDRESSES || self.subscribed.contains(to);
        if cacheable {
            self.subscribe(to)?;
        }
        // The subscription delivered every current match (and events keep
        // them current), so the answer is often known without asking.
        let node = self.port.node;
        let mut known: Vec<PortId> = self
            .known_bindings
            .iter()
            .filter(|b| names::matches(to, b, node))
            .map(|b| b.port)
            .collect();
        known.sort_unstable();
        known.dedup();
        let (ports, candidates) =
            if cacheable && (known.len() == 1 || (names::is_multicast(to) && !known.is_empty())) {
                let n = known.len();
                (known, n)
            } else {
                self.lookup_counted(to)?
            };
        if cacheable && !ports.is_empty() && (names::is_multicast(to) || candidates == 1) {
            self.resolved.insert(to.clone(), ports.clone());
        }
        Ok(ports)
    }

    /// Sends on the direct link to `to`; a blocked send gives up when
    /// `to`'s node is reported lost.
    fn send_direct(
        &mut self,
        to: PortId,
        msg: &[u8],
        mode: SendMode,
        deadline: Option<Instant>,
    ) -> std::result::Result<(), SendError> {
        // A node reported lost since the last send has ended the link.
        let _ = self.poll_events();
        let Some(mut tx) = self.direct.take(&to) else {
            return Err(SendError::PeerGone);
        };
        let sent = tx.send_or_give_up(msg, mode, deadline, &mut || self.direct_lost(to.node));
        if sent == Err(SendError::PeerGone) {
            self.direct.retire(tx);
        } else {
            self.direct.put_back(to, tx);
        }
        sent
    }

    /// Whether `node` has been reported lost (events are handled first).
    fn direct_lost(&mut self, node: u32) -> bool {
        let _ = self.poll_events();
        self.direct.is_lost(node)
    }

    /// A direct link to `to` through its node's link listener at `addr`
    /// (`Ok(false)`: not reachable from here).
    fn connect_direct(&mut self, to: PortId, c: &proto::Connected) -> Result<bool> {
        let addr: std::net::SocketAddr = c
            .direct_addr
            .parse()
            .map_err(|_| Error::Protocol(format!("bad node address {:?}", c.direct_addr)))?;
        self.direct.found_again(to.node);
        let identity = self.direct.identity(self.port, c.to_incarnation);
        let window = c.ring_capacity_bytes as usize;
        let ends = (self.port, to);
        // The daemon holds each connection of the link too, so that what
        // this process wrote is still sent if it is killed.
        let ctl = self.sock.try_clone()?;
        let notice = proto::Request {
            id: 0,
            body: Some(request::Body::DirectConnection(proto::DirectConnection {
                to: Some(to.into()),
            })),
        }
        .encode_to_vec();
        let hand_over = Box::new(move |conn: BorrowedFd<'_>| {
            // A daemon that is gone cannot hold it; the link goes on.
            let _ = ctlsock::send(ctl.as_fd(), &notice, &[conn]);
        });
        let made = crate::remote::RemoteTx::connect_direct(
            addr,
            window,
            identity,
            ends,
            &mut || self.direct_lost(to.node),
            hand_over,
        );
        match made {
            Ok(tx) => {
                self.direct.put_back(to, tx);
                Ok(true)
            }
            Err(Ok(_unreachable)) => Ok(false),
            Err(Err(reason)) => Err(Error::send(to, reason)),
        }
    }

    /// A ring to `to`, the daemon's word that `to` receives on the eBPF
    /// path, or a direct link; and whether a first message sent to `to` on
    /// the eBPF path just before arrived.
    fn connect(&mut self, to: PortId, early_sent_ns: u64) -> Result<(Route, bool)> {
        // Mailboxes of this process on this node share memory directly; a
        // port of another node goes through the daemons even from here.
        let tenant = self.tenant();
        let local = if to.node == self.port.node {
            lock(local_registry())
                .get(&to)
                .filter(|inbox| *lock(&inbox.tenant) == tenant)
                .cloned()
        } else {
            None
        };
        let mut reached = false;
        let producer = if let Some(inbox) = local {
            let seg = InprocTransport::ring_segment(self.ring_capacity_bytes)?;
            let consumer = Consumer::attach(seg.clone())?;
            {
                let mut pending = lock(&inbox.pending);
                if pending.0 {
                    return Err(Error::send(to, SendError::PeerGone));
                }
                pending.1.push((self.port, consumer));
            }
            inbox.doorbell.notice();
            Producer::attach(seg, inbox.doorbell.clone())?
        } else {
            let mut direct = self.direct.enabled && to.node != self.port.node;
            let (body, mut fds) = loop {
                let (body, fds) = self.call(request::Body::Connect(proto::Connect {
                    to: Some(to.into()),
                    direct,
                    early_sent_ns,
                }))?;
                match &body {
                    response::Body::Connected(c) if !c.direct_addr.is_empty() => {
                        if self.connect_direct(to, c)? {
                            return Ok((Route::Direct, false));
                        }
                        // Not reachable from here: through the daemons.
                        direct = false;
                    }
                    _ => break (body, fds),
                }
            };
            let response::Body::Connected(c) = &body else {
                return Err(Error::Protocol("expected Connected".into()));
            };
            reached = c.early_reached;
            if c.ebpf {
                self.ebpf_peers.insert(to);
                return Ok((Route::Ebpf, reached));
            }
            if fds.len() != 2 {
                return Err(Error::Protocol("expected Connected with two fds".into()));
            }
            let bell = fds.pop().expect("two fds");
            let ring = fds.pop().expect("two fds");
            let doorbell = Arc::new(Doorbell::new(Segment::from_fd(bell)?)?);
            Producer::attach(Arc::new(Segment::from_fd_populated(ring)?), doorbell)?
        };
        self.revoked.remove(&to);
        self.outbound.insert(to, producer);
        Ok((Route::Ring, reached))
    }

    /// The first part of a blocking receive's spin, while rings are the
    /// only place a message can come from (this mailbox takes nothing on
    /// its socket, no ring waits for first messages sent there, no direct
    /// link, no pending notice): polls just the rings, for at most
    /// [`RING_ONLY_POLLS`] rounds (about a microsecond), and leaves
    /// everything else to the full receive after it. A mailbox answering
    /// a peer calls its receive right after its own send and then waits a
    /// round trip; in that wait the full receive's other sources cost the
    /// answer 10–40 ns per round trip on this kind of host (a two-thread
    /// ping-pong, the echo side's receive measured with and without the
    /// full machinery: see `perf/NOTES.md`, "Blocking receives").
    #[inline]
    fn spin_on_rings(&mut self, out: &mut Vec<u8>) -> Option<PortId> {
        // Every so often the full receive runs anyway, for what it looks at
        // only now and then (a first message on the socket whose sender
        // died before its ring came).
        self.ring_only_receives = self.ring_only_receives.wrapping_add(1);
        let only_rings = !self.ring_only_receives.is_multiple_of(FULL_RECEIVE_EVERY)
            && self.fresh_rings == 0
            && !self.inbound.is_empty()
            && self.direct.inbound.is_empty()
            && self
                .ebpf
                .as_ref()
                .is_none_or(|e| !e.receives && e.poll_set.is_none());
        if !only_rings {
            return None;
        }
        // A mailbox that must not spin (a zero spin: the blocking path)
        // still takes a message that is there already.
        let rounds = if self.spin.is_zero() {
            1
        } else {
            RING_ONLY_POLLS
        };
        for _ in 0..rounds {
            if self.doorbell.notices() != self.seen_notices {
                return None;
            }
            match poll_fair(
                &mut self.inbound,
                &mut self.next_inbound,
                out,
                Check::Quick,
                |i| &mut i.consumer,
            ) {
                Some(Found::Message(i)) => {
                    self.sockets_first = true;
                    return Some(self.inbound[i].from);
                }
                // A quick poll reports a ring closed only when its sender
                // broke the protocol (a gone sender shows as empty); the
                // full receive drops it.
                Some(Found::Closed(_)) => return None,
                None => std::hint::spin_loop(),
            }
        }
        None
    }

    /// Handles pending events if the daemon (or a local sender) rang.
    #[inline]
    fn poll_events(&mut self) -> Result<()> {
        if self.doorbell.notices() != self.seen_notices {
            self.drain_events()?;
        }
        Ok(())
    }

    fn drain_events(&mut self) -> Result<()> {
        self.seen_notices = self.doorbell.notices();
        let adopted = std::mem::take(&mut lock(&self.local.pending).1);
        for (from, consumer) in adopted {
            self.inbound.push(Inbound {
                from,
                consumer,
                fresh: false,
            });
        }
        let mut buf = std::mem::take(&mut self.buf);
        let result = loop {
            match ctlsock::recv(self.sock.as_fd(), &mut buf, true) {
                Ok(Packet::Empty) => break Ok(()),
                Ok(Packet::Closed) => break Err(Error::DaemonGone),
                Err(e) => break Err(Error::Io(e)),
                Ok(Packet::Data { len, fds }) => match proto::ServerMessage::decode(&buf[..len]) {
                    Ok(proto::ServerMessage {
                        body: Some(server_message::Body::Event(ev)),
                    }) => self.handle_event(ev, fds)?,
                    Ok(_) => {
                        break Err(Error::Protocol(
                            "unexpected response outside a request".into(),
                        ))
                    }
                    Err(e) => break Err(Error::Protocol(e.to_string())),
                },
            }
        };
        self.buf = buf;
        result
    }

    fn handle_event(&mut self, ev: proto::Event, mut fds: Vec<OwnedFd>) -> Result<()> {
        match ev.body {
            Some(event::Body::RingAttached(r)) => {
                let from: PortId = r
                    .from
                    .ok_or_else(|| Error::Protocol("RingAttached without a sender".into()))?
                    .into();
                let fd = fds
                    .pop()
                    .ok_or_else(|| Error::Protocol("RingAttached without a ring fd".into()))?;
                let consumer = Consumer::attach(Arc::new(Segment::from_fd_populated(fd)?))?;
                // Its sender may have sent first messages on the eBPF path.
                let fresh = self.ebpf.is_some();
                let ring = Inbound {
                    from,
                    consumer,
                    fresh,
                };
                if self.inbound.iter().any(|i| i.from == from) {
                    self.successors.push(ring);
                } else {
                    self.fresh_rings += usize::from(fresh);
                    self.inbound.push(ring);
                }
            }
            Some(event::Body::Topology(t)) => {
                let Some(Ok(binding)) = t.binding.map(Binding::try_from) else {
                    return Ok(());
                };
                let node = self.port.node;
                self.resolved
                    .retain(|query, _| !names::matches(query, &binding, node));
                if !t.published {
                    self.known_bindings.retain(|p| p != &binding);
                } else if !self.known_bindings.contains(&binding) {
                    self.known_bindings.push(binding);
                }
            }
            Some(event::Body::DirectLink(d)) => {
                let from: PortId = d
                    .from
                    .ok_or_else(|| Error::Protocol("DirectLink without a sender".into()))?
                    .into();
                let fd = fds
                    .pop()
                    .ok_or_else(|| Error::Protocol("DirectLink without a connection".into()))?;
                let hello = crate::remote::Hello {
                    window_bytes: d.window_bytes,
                    identity: crate::remote::LinkIdentity {
                        node: d.node,
                        incarnation: d.incarnation,
                        link: d.link,
                        to_incarnation: d.to_incarnation,
                    },
                };
                let p = crate::remote::PendingConnection::from_handoff(fd, hello)?;
                // A connection that breaks now is made again by its sender.
                let key = (d.node, d.incarnation, d.link);
                if let Err(e) = self.direct.adopt(from, key, p, d.answered) {
                    eprintln!("fabric: a direct link from {from} broke at once: {e}");
                }
            }
            Some(event::Body::NodeLost(n)) => self.direct.node_lost(n.node),
            Some(event::Body::DirectEnded(d)) => {
                if let Some(from) = d.from {
                    self.direct.sender_gone(from.into());
                }
            }
            None => {}
        }
        Ok(())
    }

    fn call_ok(&mut self, body: request::Body) -> Result<()> {
        match self.call(body)?.0 {
            response::Body::Ok(_) => Ok(()),
            _ => Err(Error::Protocol("expected ok".into())),
        }
    }

    /// One request/response round trip; events that arrive first are handled.
    fn call(&mut self, body: request::Body) -> Result<(response::Body, Vec<OwnedFd>)> {
        self.call_attached(body, &[])
    }

    /// [`Mailbox::call`] with fds attached to the request.
    fn call_attached(
        &mut self,
        body: request::Body,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(response::Body, Vec<OwnedFd>)> {
        let id = self.next_id;
        self.next_id += 1;
        let bytes = proto::Request {
            id,
            body: Some(body),
        }
        .encode_to_vec();
        ctlsock::send(self.sock.as_fd(), &bytes, fds).map_err(|e| match e.raw_os_error() {
            Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN) => Error::DaemonGone,
            _ => Error::Io(e),
        })?;
        let mut buf = std::mem::take(&mut self.buf);
        let result = loop {
            let (len, fds) = match ctlsock::recv(self.sock.as_fd(), &mut buf, false) {
                Ok(Packet::Data { len, fds }) => (len, fds),
                Ok(Packet::Empty) => continue,
                Ok(Packet::Closed) => break Err(Error::DaemonGone),
                Err(e) => break Err(Error::Io(e)),
            };
            match proto::ServerMessage::decode(&buf[..len]) {
                Ok(proto::ServerMessage {
                    body: Some(server_message::Body::Event(ev)),
                }) => {
                    if let Err(e) = self.handle_event(ev, fds) {
                        break Err(e);
                    }
                }
                Ok(proto::ServerMessage {
                    body: Some(server_message::Body::Response(r)),
                }) if r.id == id => {
                    break match r.body {
                        Some(response::Body::Error(e)) => {
                            let code =
                                ErrorCode::try_from(e.code).unwrap_or(ErrorCode::ErrorUnspecified);
                            if code == ErrorCode::ErrorNoSuchMailbox {
                                Err(Error::NoSuchMailbox(e.message))
                            } else {
                                Err(Error::Refused {
                                    code,
                                    message: e.message,
                                })
                            }
                        }
                        Some(b) => Ok((b, fds)),
                        None => Err(Error::Protocol("empty response".into())),
                    };
                }
                Ok(_) => break Err(Error::Protocol("response out of order".into())),
                Err(e) => break Err(Error::Protocol(e.to_string())),
            }
        };
        self.buf = buf;
        result
    }
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        lock(local_registry()).remove(&self.port);
        let orphans = {
            let mut pending = lock(&self.local.pending);
            pending.0 = true;
            std::mem::take(&mut pending.1)
        };
        drop(orphans);
        // Closing the socket tells the daemon; it withdraws our bindings and
        // flags our rings.
        let _ = nix::sys::socket::shutdown(self.sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(port: u32) -> PortId {
        PortId { node: 1, port }
    }

    #[test]
    fn outbound_finds_every_ring_after_inserts_replacements_and_removals() {
        let mut rings = Outbound::default();
        for p in 1..=5 {
            rings.insert(port(p), p * 10);
        }
        // The last used one, then others, then the last one again.
        assert_eq!(rings.get_mut(&port(5)), Some(&mut 50));
        assert_eq!(rings.get_mut(&port(2)), Some(&mut 20));
        assert_eq!(rings.get_mut(&port(2)), Some(&mut 20));
        rings.insert(port(2), 21);
        assert_eq!(rings.get_mut(&port(2)), Some(&mut 21));
        // Removing the remembered one, and one whose place another takes.
        rings.remove(&port(2));
        assert_eq!(rings.get_mut(&port(2)), None);
        rings.remove(&port(1));
        rings.remove(&port(9));
        for (p, v) in [(3, 30), (4, 40), (5, 50), (3, 30)] {
            assert_eq!(rings.get_mut(&port(p)), Some(&mut { v }), "port {p}");
        }
        assert_eq!(rings.get_mut(&port(1)), None);
        assert_eq!(rings.rings.len(), 3);
        rings.remove(&port(3));
        rings.remove(&port(4));
        rings.remove(&port(5));
        assert_eq!(rings.get_mut(&port(5)), None);
    }
}
