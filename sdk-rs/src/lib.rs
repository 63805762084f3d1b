//! The Nefele Rust SDK.
//!
//! A [`Mailbox`] is how a program talks: it has a port id, binds service
//! ranges and names, and sends to addresses that do not say where the
//! receiver runs.
//!
//! ```no_run
//! use std::time::Duration;
//! # fn main() -> Result<(), nefele::Error> {
//! let node = nefele::Node::embedded()?;              // or a running fabricd
//! let mut printer = node.mailbox()?.bound("printer@{8080,1,1}")?;
//! let mut worker = node.mailbox()?;
//! if worker.service_exists("printer@{8080,1,1}", Duration::from_secs(10))? {
//!     worker.send("printer@{8080,1,1}", b"{inside, total}")?;
//! }
//! let msg = printer.recv()?;
//! assert_eq!(msg.data, b"{inside, total}");
//! # Ok(()) }
//! ```
//!
//! Without an embedded node, [`Mailbox::open`] finds the local `fabricd`
//! through `$NEFELE_FABRICD_SOCKET` or the default path, and fails with an
//! error that says how to start one. [`r#async::AsyncMailbox`] is the tokio
//! variant.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use fabric::addr::{AddrError, Address, Name, PortId, Scope, Service, ServiceRange};
pub use fabric::client::Error;
pub use fabric::daemon::SOCKET_ENV;
pub use fabric::ring::{SendError, SendMode, MAX_MESSAGE_BYTES};

pub mod r#async;
pub mod process;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Anything that names an address: a string in the one address syntax
/// (`"printer@{8080,1,1}"`), an [`Address`], or a [`PortId`].
pub trait ToAddress {
    fn to_address(&self) -> Result<Address, AddrError>;
}

impl ToAddress for str {
    fn to_address(&self) -> Result<Address, AddrError> {
        self.parse()
    }
}
impl ToAddress for &str {
    fn to_address(&self) -> Result<Address, AddrError> {
        self.parse()
    }
}
impl ToAddress for String {
    fn to_address(&self) -> Result<Address, AddrError> {
        self.parse()
    }
}
impl ToAddress for Address {
    fn to_address(&self) -> Result<Address, AddrError> {
        Ok(self.clone())
    }
}
impl ToAddress for PortId {
    fn to_address(&self) -> Result<Address, AddrError> {
        Ok(Address::Port(*self))
    }
}

/// A received message and who sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub from: PortId,
    pub data: Vec<u8>,
}

/// A mailbox; see the crate docs.
pub struct Mailbox {
    inner: fabric::client::Mailbox,
}

impl Mailbox {
    /// Opens a mailbox on the local `fabricd` (`$NEFELE_FABRICD_SOCKET` or
    /// the default path).
    pub fn open() -> Result<Mailbox> {
        Ok(Mailbox {
            inner: fabric::client::Mailbox::open()?,
        })
    }

    /// Opens a mailbox on the `fabricd` listening at `socket`.
    pub fn open_at(socket: impl AsRef<Path>) -> Result<Mailbox> {
        Ok(Mailbox {
            inner: fabric::client::Mailbox::open_at(socket.as_ref())?,
        })
    }

    /// Opens a pollable mailbox on the local `fabricd`: it receives on the
    /// eBPF path, and an epoll loop or tokio can wait on it through one fd
    /// ([`Mailbox::pollable_fd`]); its blocking receives wait on its socket
    /// and its shared-memory rings together. Needs `fabricd` with the eBPF
    /// path (running as root).
    pub fn open_pollable() -> Result<Mailbox> {
        Ok(Mailbox {
            inner: fabric::client::Mailbox::open_pollable()?,
        })
    }

    /// [`Mailbox::open_pollable`] on the `fabricd` listening at `socket`.
    pub fn open_pollable_at(socket: impl AsRef<Path>) -> Result<Mailbox> {
        Ok(Mailbox {
            inner: fabric::client::Mailbox::open_pollable_at(socket.as_ref())?,
        })
    }

    /// The fd an event loop waits on for a pollable mailbox: readable when
    /// a message (from this node or another) or a control event waits.
    /// Drain with [`Mailbox::try_recv`] until it returns `None` before
    /// waiting again (only a receive that found nothing arms it). `None` if
    /// the mailbox is not pollable.
    pub fn pollable_fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.pollable_fd()
    }

    /// Binds `address` and returns the mailbox, for chaining:
    /// `Mailbox::open()?.bound("printer@{8080,1,1}")?`.
    pub fn bound(mut self, address: impl ToAddress) -> Result<Mailbox> {
        self.bind(address)?;
        Ok(self)
    }

    /// Binds a service range, a name, or both (`printer@{8080,1,1}`).
    pub fn bind(&mut self, address: impl ToAddress) -> Result<()> {
        self.inner.bind(&address.to_address()?)
    }

    /// Removes a binding.
    pub fn unbind(&mut self, address: impl ToAddress) -> Result<()> {
        self.inner.unbind(&address.to_address()?)
    }

    /// This mailbox's port id.
    pub fn port(&self) -> PortId {
        self.inner.port()
    }

    /// The ports `address` reaches now.
    pub fn lookup(&mut self, address: impl ToAddress) -> Result<Vec<PortId>> {
        self.inner.lookup(&address.to_address()?)
    }

    /// Waits until a binding matching `address` exists, at most `timeout`.
    pub fn service_exists(&mut self, address: impl ToAddress, timeout: Duration) -> Result<bool> {
        self.inner.service_exists(&address.to_address()?, timeout)
    }

    /// Sends reliably: in order, no loss, no duplicates; blocks while the
    /// receiver is full; fails if nobody is bound or the receiver died.
    pub fn send(&mut self, to: impl ToAddress, data: &[u8]) -> Result<()> {
        self.inner.send(&to.to_address()?, data)
    }

    /// Sends reliably without blocking: a full receiver gives
    /// [`SendError::WouldBlock`] (see [`Error::send_error`]).
    pub fn try_send(&mut self, to: impl ToAddress, data: &[u8]) -> Result<()> {
        self.inner
            .send_with(&to.to_address()?, data, SendMode::RELIABLE_NONBLOCKING)
    }

    /// Sends with an explicit mode, e.g. [`SendMode::UNRELIABLE`] (dropped and
    /// counted in [`Mailbox::dropped`] when the receiver is full).
    pub fn send_with(&mut self, to: impl ToAddress, data: &[u8], mode: SendMode) -> Result<()> {
        self.inner.send_with(&to.to_address()?, data, mode)
    }

    /// Sends to a port id: the fastest path (no resolution at all).
    #[inline]
    pub fn send_to_port(&mut self, to: PortId, data: &[u8], mode: SendMode) -> Result<()> {
        self.inner.send_to_port(to, data, mode)
    }

    /// Unreliable messages this mailbox dropped because receivers were full.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped()
    }

    /// First messages that reached this mailbox on the eBPF path: a
    /// sender's first message to a mailbox goes there at once, before the
    /// ring between them exists (when the node has the eBPF path; set
    /// `NEFELE_EARLY_EBPF=0` to turn that off). Its later ones take the
    /// ring, and arrive after it.
    pub fn early_received(&self) -> u64 {
        self.inner.early_received()
    }

    /// Puts this mailbox in `tenant` on the eBPF path (root only; everyone
    /// else is in the tenant of their uid). The tenant policy of that path
    /// applies to its messages there.
    pub fn join_tenant(&mut self, tenant: u32) -> Result<()> {
        self.inner.join_tenant(tenant)
    }

    /// Lets mailboxes of tenant `src` send to mailboxes of tenant `dst` on
    /// the eBPF path (`allow`), or withdraws that (root only; what
    /// `fabricd allow|revoke` does).
    pub fn set_tenant_policy(&mut self, src: u32, dst: u32, allow: bool) -> Result<()> {
        self.inner.set_tenant_policy(src, dst, allow)
    }

    /// Waits for the next message.
    pub fn recv(&mut self) -> Result<Message> {
        let mut data = Vec::new();
        loop {
            if let Some(from) = self.inner.recv_into(&mut data, None)? {
                return Ok(Message { from, data });
            }
        }
    }

    /// Waits for the next message at most `timeout`.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<Message>> {
        let mut data = Vec::new();
        Ok(self
            .inner
            .recv_into(&mut data, Some(Instant::now() + timeout))?
            .map(|from| Message { from, data }))
    }

    /// Returns a message if one is waiting.
    pub fn try_recv(&mut self) -> Result<Option<Message>> {
        let mut data = Vec::new();
        Ok(self
            .inner
            .try_recv_into(&mut data)?
            .map(|from| Message { from, data }))
    }

    /// Receives into a caller's buffer (no allocation once it is large
    /// enough); `None` when `deadline` passes first.
    #[inline]
    pub fn recv_into(
        &mut self,
        buf: &mut Vec<u8>,
        deadline: Option<Instant>,
    ) -> Result<Option<PortId>> {
        self.inner.recv_into(buf, deadline)
    }

    /// How long receives and blocked sends spin before they park.
    pub fn set_spin(&mut self, spin: Duration) {
        self.inner.set_spin(spin);
    }

    /// Whether messages to mailboxes on other nodes may take a direct link
    /// of this mailbox's own instead of the daemons' node links (on unless
    /// `NEFELE_DIRECT_LINKS=0`; see `fabric::direct`).
    pub fn set_direct_links(&mut self, on: bool) {
        self.inner.set_direct_links(on);
    }

    /// The node daemon's counters.
    pub fn daemon_stats(&mut self) -> Result<fabric::proto::Stats> {
        self.inner.daemon_stats()
    }

    /// The cluster's nodes (state and capacity) as this node sees them.
    pub fn nodes(&mut self) -> Result<fabric::proto::NodeList> {
        self.inner.nodes()
    }
}

/// A single-node fabric running inside this process: for tests, demos and
/// single-machine use. Child processes reach it through the environment
/// from [`Node::env`]. Dropping it stops the daemon.
pub struct Node {
    daemon: fabric::daemon::Daemon,
    dir: PathBuf,
}

impl Node {
    /// Starts an embedded `fabricd` on a private socket.
    pub fn embedded() -> Result<Node> {
        Self::embedded_with(fabric::ring::DEFAULT_RING_CAPACITY_BYTES)
    }

    /// [`Node::embedded`] with rings of `ring_capacity_bytes`.
    pub fn embedded_with(ring_capacity_bytes: usize) -> Result<Node> {
        Self::start(fabric::daemon::Config {
            ring_capacity_bytes,
            ..Default::default()
        })
    }

    /// An embedded node that joins (or founds) the cluster `cluster`
    /// describes, as node [`fabric::cluster::node_id_for`] its address.
    pub fn embedded_member(cluster: fabric::cluster::ClusterConfig) -> Result<Node> {
        Self::start(fabric::daemon::Config {
            node_id: fabric::cluster::node_id_for(cluster.listen),
            cluster: Some(cluster),
            ..Default::default()
        })
    }

    /// Starts `cfg` on a private socket (its `socket_path` is replaced).
    fn start(cfg: fabric::daemon::Config) -> Result<Node> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "nefele-embedded-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let cfg = fabric::daemon::Config {
            socket_path: dir.join("fabricd.sock"),
            ..cfg
        };
        let daemon = fabric::daemon::Daemon::start(cfg)
            .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))?;
        Ok(Node { daemon, dir })
    }

    pub fn socket_path(&self) -> &Path {
        self.daemon.socket_path()
    }

    /// The environment variable that points a child process at this node.
    pub fn env(&self) -> (&'static str, &Path) {
        (SOCKET_ENV, self.socket_path())
    }

    /// Opens a mailbox on this node.
    pub fn mailbox(&self) -> Result<Mailbox> {
        Mailbox::open_at(self.socket_path())
    }

    /// The daemon's counters, read directly.
    pub fn stats(&self) -> fabric::proto::Stats {
        self.daemon.stats()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
