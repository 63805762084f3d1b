//! The transports under test, each as an [`Endpoint`] pair: the parent's
//! end (the measuring side) and the child's end (the echoing or counting
//! side, in its own process unless the transport is in-process).
//!
//! Every transport moves the same thing: `size`-byte messages, copied from
//! a caller's buffer on send and into one on receive (iceoryx2 instead loans
//! its sample ahead, as its own benchmark does).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nefele::{Mailbox, PortId, SendMode};

/// One side of a message exchange.
pub trait Endpoint {
    fn send(&mut self, msg: &[u8]) -> Result<()>;
    /// Receives one message of the benchmark's size into `buf`.
    fn recv(&mut self, buf: &mut Vec<u8>) -> Result<()>;
}

/// A fabric mailbox talking to one peer port.
pub struct FabricEnd {
    pub mailbox: Mailbox,
    pub peer: Option<PortId>,
}

impl Endpoint for FabricEnd {
    #[inline]
    fn send(&mut self, msg: &[u8]) -> Result<()> {
        let peer = self.peer.context("no peer yet")?;
        self.mailbox.send_to_port(peer, msg, SendMode::RELIABLE)?;
        Ok(())
    }
    #[inline]
    fn recv(&mut self, buf: &mut Vec<u8>) -> Result<()> {
        let from = self
            .mailbox
            .recv_into(buf, None)?
            .context("receive timed out")?;
        // Replies go to whoever sent last (a fresh mailbox each round for
        // fabric-first).
        self.peer = Some(from);
        Ok(())
    }
}

/// A mailbox socket of the eBPF path talking to one peer port.
pub struct EbpfEnd {
    endpoint: fabric::ebpf::Endpoint,
    peer: fabric::wire::WirePort,
}

impl EbpfEnd {
    pub fn new(
        mut endpoint: fabric::ebpf::Endpoint,
        peer: fabric::wire::WirePort,
        park: bool,
    ) -> Self {
        if park {
            endpoint.set_spin(Duration::ZERO);
        }
        EbpfEnd { endpoint, peer }
    }
}

impl Endpoint for EbpfEnd {
    #[inline]
    fn send(&mut self, msg: &[u8]) -> Result<()> {
        self.endpoint
            .send(self.peer, msg, SendMode::RELIABLE, None)?;
        Ok(())
    }
    #[inline]
    fn recv(&mut self, buf: &mut Vec<u8>) -> Result<()> {
        // Blocking without a timeout (as the tcp and uds ends do): the hub
        // reports the peer's death, which ends the wait.
        if !self.endpoint.recv_from_peer(self.peer, buf, None)? {
            bail!("ebpf-skmsg: a receive without a deadline returned empty");
        }
        Ok(())
    }
}

/// A byte stream (TCP or Unix) carrying fixed-size messages.
pub struct StreamEnd<S: Read + Write> {
    pub stream: S,
    pub size: usize,
}

impl<S: Read + Write> Endpoint for StreamEnd<S> {
    #[inline]
    fn send(&mut self, msg: &[u8]) -> Result<()> {
        self.stream.write_all(msg)?;
        Ok(())
    }
    #[inline]
    fn recv(&mut self, buf: &mut Vec<u8>) -> Result<()> {
        buf.resize(self.size, 0);
        self.stream.read_exact(buf)?;
        Ok(())
    }
}

pub fn tcp_listen() -> Result<TcpListener> {
    Ok(TcpListener::bind("127.0.0.1:0")?)
}

pub fn tcp_accept(l: &TcpListener, size: usize) -> Result<StreamEnd<TcpStream>> {
    let (s, _) = l.accept()?;
    s.set_nodelay(true)?;
    Ok(StreamEnd { stream: s, size })
}

pub fn tcp_connect(port: u16, size: usize) -> Result<StreamEnd<TcpStream>> {
    let s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_nodelay(true)?;
    Ok(StreamEnd { stream: s, size })
}

pub fn uds_accept(l: &UnixListener, size: usize) -> Result<StreamEnd<UnixStream>> {
    Ok(StreamEnd {
        stream: l.accept()?.0,
        size,
    })
}

pub fn uds_connect(path: &str, size: usize) -> Result<StreamEnd<UnixStream>> {
    Ok(StreamEnd {
        stream: UnixStream::connect(path)?,
        size,
    })
}

/// The floor: one cache line bounced between two cores, nothing else. A
/// "message" is the shared counter moving on by one; its size is ignored.
/// Both sides run the same code: send writes `seen + 1`, receive waits for
/// the peer's `seen + 1`.
pub struct FloorEnd {
    map: memmap2::MmapRaw,
    seen: u64,
}

impl FloorEnd {
    pub fn new(fd: std::os::fd::OwnedFd) -> Result<Self> {
        let file = std::fs::File::from(fd);
        let map = memmap2::MmapOptions::new().len(4096).map_raw(&file)?;
        Ok(FloorEnd { map, seen: 0 })
    }

    fn word(&self) -> &AtomicU64 {
        // SAFETY: the mapping is 4096 bytes, page aligned, and only ever
        // accessed through this atomic.
        unsafe { &*(self.map.as_mut_ptr() as *const AtomicU64) }
    }
}

impl Endpoint for FloorEnd {
    #[inline]
    fn send(&mut self, _msg: &[u8]) -> Result<()> {
        self.seen += 1;
        self.word().store(self.seen, Ordering::Release);
        Ok(())
    }
    #[inline]
    fn recv(&mut self, _buf: &mut Vec<u8>) -> Result<()> {
        let want = self.seen + 1;
        spin_until(|| self.word().load(Ordering::Acquire) == want, "floor peer")?;
        self.seen = want;
        Ok(())
    }
}

/// Spins until `ready`, failing after [`PEER_TIMEOUT`] (a dead peer).
#[inline]
pub fn spin_until(mut ready: impl FnMut() -> bool, peer: &str) -> Result<()> {
    let mut spins: u32 = 0;
    let mut deadline: Option<std::time::Instant> = None;
    while !ready() {
        std::hint::spin_loop();
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(1 << 16) {
            let now = std::time::Instant::now();
            if *deadline.get_or_insert(now + PEER_TIMEOUT) < now {
                bail!("{peer} stopped answering for {PEER_TIMEOUT:?}");
            }
        }
    }
    Ok(())
}

/// How long a spinning side waits for a silent peer before giving up.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(10);

/// iceoryx2 publish-subscribe: one service each way, the next sample
/// loaned before waiting for the peer (as in iceoryx2's own benchmark).
pub struct IceoryxEnd {
    // Field order matters: ports before the services before the node.
    publisher: iceoryx2::port::publisher::Publisher<iceoryx2::service::ipc::Service, [u8], ()>,
    subscriber: iceoryx2::port::subscriber::Subscriber<iceoryx2::service::ipc::Service, [u8], ()>,
    next: Option<iceoryx2::sample_mut::SampleMut<iceoryx2::service::ipc::Service, [u8], ()>>,
    _services: Vec<
        iceoryx2::service::port_factory::publish_subscribe::PortFactory<
            iceoryx2::service::ipc::Service,
            [u8],
            (),
        >,
    >,
    _node: iceoryx2::node::Node<iceoryx2::service::ipc::Service>,
    size: usize,
}

impl IceoryxEnd {
    /// `name` identifies the run; the parent publishes on `name-a2b`.
    pub fn new(name: &str, parent: bool, size: usize, buffer: usize) -> Result<Self> {
        use iceoryx2::prelude::*;
        set_log_level(LogLevel::Error);
        let node = NodeBuilder::new()
            .create::<ipc::Service>()
            .map_err(|e| anyhow::anyhow!("iceoryx2 node: {e:?}"))?;
        let open = |dir: &str| -> Result<_> {
            let svc =
                ServiceName::new(&format!("{name}-{dir}")).map_err(|e| anyhow::anyhow!("{e:?}"))?;
            node.service_builder(&svc)
                .publish_subscribe::<[u8]>()
                .max_publishers(1)
                .max_subscribers(1)
                .history_size(0)
                .subscriber_max_buffer_size(buffer)
                .enable_safe_overflow(false)
                .open_or_create()
                .map_err(|e| anyhow::anyhow!("iceoryx2 service {dir}: {e:?}"))
        };
        let (a2b, b2a) = (open("a2b")?, open("b2a")?);
        let (out, inn) = if parent { (&a2b, &b2a) } else { (&b2a, &a2b) };
        let publisher = out
            .publisher_builder()
            .initial_max_slice_len(size.max(1))
            .backpressure_strategy(
                iceoryx2::port::backpressure_strategy::BackpressureStrategy::RetryUntilDelivered,
            )
            .create()
            .map_err(|e| anyhow::anyhow!("iceoryx2 publisher: {e:?}"))?;
        let subscriber = inn
            .subscriber_builder()
            .create()
            .map_err(|e| anyhow::anyhow!("iceoryx2 subscriber: {e:?}"))?;
        let mut me = IceoryxEnd {
            publisher,
            subscriber,
            next: None,
            _services: vec![a2b, b2a],
            _node: node,
            size,
        };
        me.loan()?;
        Ok(me)
    }

    fn loan(&mut self) -> Result<()> {
        let s = self
            .publisher
            .loan_slice_uninit(self.size.max(1))
            .map_err(|e| anyhow::anyhow!("iceoryx2 loan: {e:?}"))?;
        // SAFETY (of the benchmark's content only): as in iceoryx2's own
        // benchmark, the payload bytes are not written; u8 has no invalid
        // bit patterns and the shared memory is initialised by iceoryx2.
        self.next = Some(unsafe { s.assume_init() });
        Ok(())
    }

    /// Whether the peer's subscriber is connected to our publisher.
    pub fn connected(&self) -> bool {
        use iceoryx2::port::update_connections::UpdateConnections;
        use iceoryx2::service::port_factory::PortFactory;
        self.publisher.update_connections().is_ok()
            && self
                ._services
                .iter()
                .all(|s| s.dynamic_config().number_of_subscribers() >= 1)
    }
}

impl Endpoint for IceoryxEnd {
    #[inline]
    fn send(&mut self, _msg: &[u8]) -> Result<()> {
        let s = self.next.take().context("no loaned sample")?;
        s.send()
            .map_err(|e| anyhow::anyhow!("iceoryx2 send: {e:?}"))?;
        self.loan()
    }
    #[inline]
    fn recv(&mut self, buf: &mut Vec<u8>) -> Result<()> {
        let mut got = None;
        let subscriber = &self.subscriber;
        spin_until(
            || match subscriber.receive() {
                Ok(Some(sample)) => {
                    got = Some(Ok(sample.payload().first().copied().unwrap_or(0)));
                    true
                }
                Ok(None) => false,
                Err(e) => {
                    got = Some(Err(anyhow::anyhow!("iceoryx2 receive: {e:?}")));
                    true
                }
            },
            "iceoryx2 peer",
        )?;
        buf.clear();
        buf.push(got.expect("set when ready")?);
        Ok(())
    }
}

/// Waits until `ready` holds, at most `timeout`.
pub fn wait_for(timeout: Duration, what: &str, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    while !ready() {
        if std::time::Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Both directions of the fabric's remote link: a reliable TCP link each way.
/// Dropped as declared, sending half first (the measuring side closes its
/// halves the other way round: see `measure`).
pub struct RemoteLinkEnd {
    pub tx: fabric::remote::RemoteTx,
    pub rx: fabric::remote::RemoteRx,
}

impl RemoteLinkEnd {
    /// Listens on `me`, connects to the peer listening on `peer`: each side
    /// accepts the other's sender while its own connects.
    pub fn pair(
        me: std::net::SocketAddr,
        peer: std::net::SocketAddr,
        window_bytes: usize,
    ) -> Result<Self> {
        let mut rx = fabric::remote::RemoteRx::bind(me)?;
        let acceptor = std::thread::spawn(move || -> Result<fabric::remote::RemoteRx> {
            if !rx.accept_sender(Some(std::time::Instant::now() + PEER_TIMEOUT))? {
                bail!("the peer's sender did not connect within {PEER_TIMEOUT:?}");
            }
            Ok(rx)
        });
        let tx = fabric::remote::RemoteTx::connect(peer, window_bytes)?;
        let rx = acceptor
            .join()
            .map_err(|_| anyhow::anyhow!("acceptor panicked"))??;
        Ok(RemoteLinkEnd { tx, rx })
    }
}

impl Endpoint for RemoteLinkEnd {
    #[inline]
    fn send(&mut self, msg: &[u8]) -> Result<()> {
        use fabric::transport::LinkTx as _;
        self.tx.send(msg, SendMode::RELIABLE, None)?;
        Ok(())
    }
    #[inline]
    fn recv(&mut self, buf: &mut Vec<u8>) -> Result<()> {
        use fabric::transport::LinkRx as _;
        if !self
            .rx
            .recv(buf, Some(std::time::Instant::now() + PEER_TIMEOUT))?
        {
            bail!("remote peer stopped answering for {PEER_TIMEOUT:?}");
        }
        Ok(())
    }
}

/// Two private network namespaces joined by a veth pair, for the remote
/// measurements; removed again on drop (also after a failure).
pub struct NetnsPair;

pub const NS_A: &str = "nefele-perf-a";
pub const NS_B: &str = "nefele-perf-b";
pub const ADDR_A: [u8; 4] = [10, 78, 0, 1];
pub const ADDR_B: [u8; 4] = [10, 78, 0, 2];

use fabric::netns::ip;

impl NetnsPair {
    pub fn create() -> Result<Self> {
        if !nix::unistd::Uid::effective().is_root() {
            bail!("--remote needs root: it creates two network namespaces");
        }
        Self::remove();
        let me = NetnsPair;
        ip(&["netns", "add", NS_A])?;
        ip(&["netns", "add", NS_B])?;
        ip(&[
            "link", "add", "nperf-a", "netns", NS_A, "type", "veth", "peer", "name", "nperf-b",
            "netns", NS_B,
        ])?;
        for (ns, dev, addr) in [
            (NS_A, "nperf-a", "10.78.0.1/24"),
            (NS_B, "nperf-b", "10.78.0.2/24"),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(me)
    }

    /// Moves the calling thread into namespace A.
    pub fn enter_a(&self) -> Result<()> {
        let f = std::fs::File::open(format!("/run/netns/{NS_A}"))?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)?;
        Ok(())
    }

    fn remove() {
        for ns in [NS_A, NS_B] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .output();
        }
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        Self::remove();
    }
}
