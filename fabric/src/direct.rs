//! Direct links: a mailbox's own TCP connections to mailboxes on other
//! nodes, so that a remote message costs what a TCP message costs.
//!
//! Through the daemons, a message to another node wakes three threads: the
//! sender's gateway (which drains the sender's ring), the receiving node's
//! link loop (which fills the receiver's ring), and the receiver. A direct
//! link wakes only the receiver. It is a [`RemoteTx`]/[`RemoteRx`] pair, so
//! it keeps their guarantees (order, no loss, no duplicates across
//! reconnects, a window that pushes back on the sender):
//!
//! - The sender asks its daemon to connect; where node links run over TCP,
//!   the daemon answers with the receiving node's node-link address instead
//!   of a ring. The sender connects there and says, in its HELLO, which
//!   mailbox it is and which it wants.
//! - The receiving node's daemon reads that HELLO and hands the connection
//!   (SCM_RIGHTS, like a ring) to the receiver's process, which answers it
//!   when it next looks at its events. The sender waits for that answer as
//!   long as it takes, like a sender to a full ring.
//! - The receiver polls its links with its rings and parks on their sockets
//!   and its doorbell together (io_uring, see [`FutexOrFd`]).
//! - A node that is lost ends the links with it: its daemon tells the
//!   mailboxes ([`proto::NodeLost`](crate::proto::NodeLost)); a blocked
//!   sender asks (see [`GiveUp`]) while it waits and fails with `PeerGone`.
//!
//! A sender that cannot reach the other node's address (it lives in
//! another network namespace than its daemon, say) uses the daemons' path.
//! `NEFELE_DIRECT_LINKS=0` (or [`crate::client::Mailbox::set_direct_links`])
//! turns direct links off.

use std::os::fd::{AsRawFd as _, BorrowedFd, RawFd};
use std::sync::atomic::AtomicU32;
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use rustc_hash::FxHashMap;

use crate::addr::PortId;
use crate::remote::{LinkIdentity, PendingConnection, RemoteRx, RemoteTx};
use crate::transport::{LinkRx as _, LinkTx as _};
use crate::uring::FutexOrFd;

/// Set to `0` to keep every remote message on the daemons' path.
pub const DIRECT_LINKS_ENV: &str = "NEFELE_DIRECT_LINKS";

/// Which connection of which sender a direct link is: the sender's node,
/// mailbox incarnation and link number (a sender that starts over with a
/// new link starts its sequence numbers over).
type LinkKey = (u32, u64, u64);

/// A mailbox's direct links, both ways.
pub(crate) struct DirectLinks {
    pub enabled: bool,
    /// This mailbox's incarnation in the HELLOs of its links.
    incarnation: u64,
    next_link: u64,
    out: FxHashMap<PortId, RemoteTx>,
    pub inbound: Inbound,
    /// What a receive parks on once there are links in.
    pub wait: Option<WaitSet>,
    /// Nodes reported lost since a link to them was last made.
    lost_nodes: Vec<u32>,
    /// Unreliable messages dropped by links that are gone.
    dropped_by_gone: u64,
}

/// The receiving ends, polled in turn.
#[derive(Default)]
pub(crate) struct Inbound {
    links: Vec<InLink>,
    next: usize,
}

struct InLink {
    from: PortId,
    key: LinkKey,
    rx: RemoteRx,
    /// Its sender's daemon said the sender is gone (killed: it could not
    /// say so itself): the link ends once its connection has closed.
    sender_gone: bool,
}

/// An epoll set of the inbound links' sockets (and a pollable mailbox's
/// eBPF socket), and the ring that parks on it and on the doorbell.
pub(crate) struct WaitSet {
    epoll: Epoll,
    waiter: FutexOrFd,
    /// The links' connections in `epoll` (and in a pollable mailbox's set).
    registered: Vec<(RawFd, u64)>,
}

impl DirectLinks {
    pub fn new() -> DirectLinks {
        DirectLinks {
            enabled: std::env::var(DIRECT_LINKS_ENV).map_or(true, |v| v != "0"),
            incarnation: rand::random::<u64>() | 1,
            next_link: 0,
            out: FxHashMap::default(),
            inbound: Inbound::default(),
            wait: None,
            lost_nodes: Vec::new(),
            dropped_by_gone: 0,
        }
    }

    /// Who a new link of mailbox `me` to a node of incarnation
    /// `to_incarnation` says it is.
    pub fn identity(&mut self, me: PortId, to_incarnation: u64) -> LinkIdentity {
        self.next_link += 1;
        LinkIdentity {
            node: me.node,
            incarnation: self.incarnation,
            link: self.next_link,
            to_incarnation,
        }
    }

    pub fn has_out(&self, to: &PortId) -> bool {
        self.out.contains_key(to)
    }

    /// The link to `to`, taken out while it sends (its sender then asks
    /// the mailbox whether to give up); [`DirectLinks::put_back`] returns it.
    pub fn take(&mut self, to: &PortId) -> Option<RemoteTx> {
        self.out.remove(to)
    }

    pub fn put_back(&mut self, to: PortId, tx: RemoteTx) {
        self.out.insert(to, tx);
    }

    /// Lets a link whose receiver is gone go (keeping its count of drops),
    /// without the goodbye a closing sender waits on.
    pub fn retire(&mut self, tx: RemoteTx) {
        self.dropped_by_gone += tx.dropped();
        tx.abandon();
    }

    /// Unreliable messages the links to other nodes dropped.
    pub fn dropped(&self) -> u64 {
        self.dropped_by_gone + self.out.values().map(|tx| tx.dropped()).sum::<u64>()
    }

    pub fn is_lost(&self, node: u32) -> bool {
        self.lost_nodes.contains(&node)
    }

    /// `node` is a live member again (its daemon gave out its address).
    pub fn found_again(&mut self, node: u32) {
        self.lost_nodes.retain(|&n| n != node);
    }

    /// Ends the links with `node`: senders to it fail, what came from it
    /// and was not received is gone with it.
    pub fn node_lost(&mut self, node: u32) {
        if !self.lost_nodes.contains(&node) {
            self.lost_nodes.push(node);
        }
        let gone: Vec<PortId> = self
            .out
            .keys()
            .filter(|to| to.node == node)
            .copied()
            .collect();
        for to in gone {
            if let Some(tx) = self.out.remove(&to) {
                self.retire(tx);
            }
        }
        let (gone, kept) = std::mem::take(&mut self.inbound.links)
            .into_iter()
            .partition(|l| l.from.node == node);
        self.inbound.links = kept;
        for l in gone {
            l.rx.abandon();
        }
    }

    /// Takes a connection from `from` that the daemon handed over: a new
    /// link, or the sender's new connection for one it has. Its HELLO is
    /// answered now, so the sender goes on, unless the daemon `answered`
    /// it already (see [`PendingConnection::answer_fresh`]).
    pub fn adopt(
        &mut self,
        from: PortId,
        key: LinkKey,
        p: PendingConnection,
        answered: bool,
    ) -> std::io::Result<()> {
        if let Some(l) = self
            .inbound
            .links
            .iter_mut()
            .find(|l| l.from == from && l.key == key)
        {
            return l.rx.adopt_newer(p, answered);
        }
        let rx = RemoteRx::adopted(p, answered)?;
        self.inbound.links.push(InLink {
            from,
            key,
            rx,
            sender_gone: false,
        });
        Ok(())
    }

    /// `from` is gone: its links end when their connections have closed
    /// (what they hold is still received).
    pub fn sender_gone(&mut self, from: PortId) {
        for l in self.inbound.links.iter_mut().filter(|l| l.from == from) {
            l.sender_gone = true;
        }
    }

    /// Whether a link from `from` is open.
    pub fn is_from(&self, from: PortId) -> bool {
        self.inbound.links.iter().any(|l| l.from == from)
    }

    /// Keeps the wait set (and a pollable mailbox's set `pollable`) holding
    /// the links' current connections; `socket` is the mailbox's eBPF
    /// socket if it receives there. The fd to park on, once links exist.
    pub fn sync_wait(
        &mut self,
        socket: Option<RawFd>,
        pollable: Option<&Epoll>,
    ) -> std::io::Result<Option<RawFd>> {
        if self.inbound.links.is_empty() && self.wait.is_none() {
            return Ok(None);
        }
        if self.wait.is_none() {
            let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
            if let Some(fd) = socket {
                add(&epoll, fd)?;
            }
            self.wait = Some(WaitSet {
                epoll,
                waiter: FutexOrFd::new()?,
                registered: Vec::new(),
            });
        }
        let set = self.wait.as_mut().expect("made above");
        let current = || self.inbound.links.iter().filter_map(|l| l.rx.connection());
        if !current().eq(set.registered.iter().copied()) {
            let now: Vec<(RawFd, u64)> = current().collect();
            // Closed connections left the sets by themselves; a number in
            // use again must be registered anew.
            for e in std::iter::once(&set.epoll).chain(pollable) {
                for &(fd, _) in &set.registered {
                    // SAFETY: only named for the call; an fd not open or not
                    // registered makes it fail, which is ignored.
                    let _ = e.delete(unsafe { BorrowedFd::borrow_raw(fd) });
                }
                for &(fd, _) in &now {
                    add(e, fd)?;
                }
            }
            set.registered = now;
        }
        Ok(Some(set.epoll.0.as_raw_fd()))
    }
}

/// Adds `fd` (open: a link's socket) to `epoll` for reading.
fn add(epoll: &Epoll, fd: RawFd) -> std::io::Result<()> {
    // SAFETY: `fd` is open for the duration of the call.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    match epoll.add(fd, EpollEvent::new(EpollFlags::EPOLLIN, 0)) {
        Err(nix::errno::Errno::EEXIST) => Ok(()),
        r => r.map_err(Into::into),
    }
}

impl Inbound {
    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// The next message waiting on any link, links taken in turn, into
    /// `out`; its sender. Links whose senders have finished are dropped.
    pub fn poll(&mut self, out: &mut Vec<u8>) -> Option<PortId> {
        let n = self.links.len();
        for k in 0..n {
            let i = (self.next + k) % n;
            match self.links[i].rx.recv(out, Some(Instant::now())) {
                Ok(true) => {
                    self.next = (i + 1) % n;
                    return Some(self.links[i].from);
                }
                Ok(false)
                    if !(self.links[i].sender_gone && self.links[i].rx.connection().is_none()) => {}
                // Its sender is gone and everything it sent was received.
                Ok(false) | Err(_) => {
                    self.links.swap_remove(i);
                    self.next = 0;
                    // The indices moved: look again next time.
                    return None;
                }
            }
        }
        None
    }
}

impl WaitSet {
    /// Parks until the doorbell's `epoch` moves from `seen`, a link's socket
    /// (or the eBPF socket) is readable, or `slice` passes.
    pub fn park(&mut self, epoch: &AtomicU32, seen: u32, slice: Duration) -> std::io::Result<()> {
        let fd = self.epoll.0.as_raw_fd();
        self.waiter.wait(epoch, seen, fd, slice)
    }
}
