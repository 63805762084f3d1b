//! The conformance suite against every transport: the local ones, the
//! reliable remote link on loopback, and the whole remote path between two
//! network namespaces (needs root; CI runs as root) — a mailbox on one node
//! sending to a mailbox on another over a direct link of its own, and
//! through both daemons and their node link, over TCP and over the RDMA
//! link on the in-process loopback device.
use fabric::conformance_suite;

conformance_suite!(fabric_shm, fabric::transport::ShmTransport);
conformance_suite!(fabric_inproc, fabric::transport::InprocTransport);
conformance_suite!(fabric_remote_link, fabric::remote::TcpTransport);
conformance_suite!(fabric_remote, cluster_pair::ClusterTransport::DIRECT);
conformance_suite!(fabric_remote_gateway, cluster_pair::ClusterTransport::TCP);
conformance_suite!(
    fabric_remote_rdma_loopback,
    cluster_pair::ClusterTransport::RDMA_LOOPBACK
);
conformance_suite!(rdma_loopback, fabric::rdma::LoopbackRdmaTransport);
conformance_suite!(ebpf_skmsg, fabric::ebpf::EbpfTransport);

mod cluster_pair {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use fabric::addr::PortId;
    use fabric::client::{Error, Mailbox};
    use fabric::cluster::ClusterConfig;
    use fabric::daemon::{Config, Daemon};
    use fabric::netns::{inside, ip};
    use fabric::rdma::{RdmaDevice, RdmaMode};
    use fabric::ring::{SendError, SendMode};
    use fabric::transport::{LinkRx, LinkTx, RecvError, Transport};

    /// Links from a mailbox on node 1 to one on node 2, each node a daemon
    /// of this process living in its own network namespace, their node
    /// links on the RDMA device `rdma` asks for (or TCP).
    pub struct ClusterTransport {
        rdma: RdmaMode,
        /// The sender uses a direct link (it sends from node 1's namespace,
        /// where node 2's address is reachable), not the daemons' path.
        direct: bool,
    }

    impl ClusterTransport {
        pub const DIRECT: ClusterTransport = ClusterTransport {
            rdma: RdmaMode::Off,
            direct: true,
        };
        pub const TCP: ClusterTransport = ClusterTransport {
            rdma: RdmaMode::Off,
            direct: false,
        };
        pub const RDMA_LOOPBACK: ClusterTransport = ClusterTransport {
            rdma: RdmaMode::Use(RdmaDevice::Loopback),
            direct: false,
        };
    }

    /// Two namespaces joined by a veth pair; deleted on drop.
    struct Namespaces([String; 2]);

    impl Namespaces {
        fn create() -> std::io::Result<Namespaces> {
            assert!(
                nix::unistd::Uid::effective().is_root(),
                "the remote conformance checks need root (network namespaces); CI runs as root"
            );
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let k = NEXT.fetch_add(1, Ordering::SeqCst);
            let id = std::process::id();
            let ns = Namespaces([
                format!("nefele-conf-{id}-{k}-1"),
                format!("nefele-conf-{id}-{k}-2"),
            ]);
            for n in &ns.0 {
                ip(&["netns", "add", n])?;
            }
            ip(&[
                "link", "add", "nc0", "netns", &ns.0[0], "type", "veth", "peer", "name", "nc0",
                "netns", &ns.0[1],
            ])?;
            for (i, n) in ns.0.iter().enumerate() {
                ip(&[
                    "-n",
                    n,
                    "addr",
                    "add",
                    &format!("10.79.0.{}/24", i + 1),
                    "dev",
                    "nc0",
                ])?;
                ip(&["-n", n, "link", "set", "nc0", "up"])?;
                ip(&["-n", n, "link", "set", "lo", "up"])?;
            }
            Ok(ns)
        }
    }

    impl Pair {
        /// Node `i`'s counters (0 is node 1).
        pub fn stats(&self, i: usize) -> fabric::proto::Stats {
            self.daemons[i].stats()
        }

        /// Waits (bounded) until both nodes report `want` node-link halves
        /// over RDMA: the links did not quietly fall back to TCP.
        fn expect_rdma_links(&self, want: u32) {
            let t0 = Instant::now();
            loop {
                let have: Vec<u32> = self.daemons.iter().map(|d| d.stats().rdma_links).collect();
                if have.iter().all(|&n| n == want) {
                    return;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(5),
                    "node-link halves over RDMA: {have:?}, want {want} on each node"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    impl Drop for Namespaces {
        fn drop(&mut self) {
            for n in &self.0 {
                let _ = ip(&["netns", "del", n]);
            }
        }
    }

    /// Both daemons (dropped before their namespaces) and their sockets.
    pub struct Pair {
        daemons: Vec<Daemon>,
        _dir: tempfile::TempDir,
        ns: Namespaces,
    }

    pub fn start_pair(
        ring_capacity_bytes: usize,
        rdma: [RdmaMode; 2],
    ) -> std::io::Result<(Pair, [std::path::PathBuf; 2])> {
        let ns = Namespaces::create()?;
        let dir = tempfile::tempdir()?;
        let addr =
            |i: u32| -> std::net::SocketAddr { format!("10.79.0.{i}:7000").parse().unwrap() };
        let mut daemons = Vec::new();
        let mut sockets = Vec::new();
        for i in 1..=2u32 {
            let socket = dir.path().join(format!("n{i}.sock"));
            let mut cc = ClusterConfig::new("conformance", addr(i));
            cc.broadcast = false;
            cc.seeds = vec![addr(1)];
            cc.link_window_bytes = ring_capacity_bytes;
            cc.rdma = rdma[i as usize - 1].clone();
            let cfg = Config {
                socket_path: socket.clone(),
                node_id: i,
                ring_capacity_bytes,
                cluster: Some(cc),
                ..Config::default()
            };
            let d = inside(&ns.0[i as usize - 1], || Daemon::start(cfg))?
                .map_err(std::io::Error::other)?;
            daemons.push(d);
            sockets.push(socket);
        }
        let pair = Pair {
            daemons,
            _dir: dir,
            ns,
        };
        // Both nodes see each other (bounded).
        let t0 = Instant::now();
        for s in &sockets {
            let mut mb = Mailbox::open_at(s).map_err(std::io::Error::other)?;
            while mb
                .nodes()
                .map_err(std::io::Error::other)?
                .nodes
                .iter()
                .filter(|n| n.alive)
                .count()
                < 2
            {
                if t0.elapsed() > Duration::from_secs(10) {
                    return Err(std::io::Error::other(
                        "the two nodes did not meet within 10 s",
                    ));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = pair.daemons.len();
        Ok((pair, [sockets[0].clone(), sockets[1].clone()]))
    }

    pub struct Tx {
        mb: Mailbox,
        to: PortId,
        /// Sends from node 1's namespace (a direct link's connection is
        /// made there).
        direct: bool,
        checked_direct: bool,
        pair: Arc<Pair>,
    }

    pub struct Rx {
        mb: Mailbox,
        from: PortId,
        seen_ring: bool,
        /// Node-link halves each node must report over RDMA once a message
        /// has arrived (checked on the first one).
        rdma_links: Option<u32>,
        pair: Arc<Pair>,
    }

    impl Transport for ClusterTransport {
        const NAME: &'static str = "fabric-remote";
        type Tx = Tx;
        type Rx = Rx;

        /// Rings of `ring_capacity_bytes` at both ends and a node link whose
        /// window is as large.
        fn link(&self, ring_capacity_bytes: usize) -> std::io::Result<(Tx, Rx)> {
            let (pair, [s1, s2]) =
                start_pair(ring_capacity_bytes, [self.rdma.clone(), self.rdma.clone()])?;
            let pair = Arc::new(pair);
            let mut tx_mb = Mailbox::open_at(&s1).map_err(std::io::Error::other)?;
            tx_mb.set_direct_links(self.direct);
            let rx_mb = Mailbox::open_at(&s2).map_err(std::io::Error::other)?;
            let from = tx_mb.port();
            Ok((
                Tx {
                    to: rx_mb.port(),
                    mb: tx_mb,
                    direct: self.direct,
                    checked_direct: false,
                    pair: pair.clone(),
                },
                Rx {
                    from,
                    mb: rx_mb,
                    seen_ring: false,
                    // Both directions: each node's gateway and its incoming
                    // link.
                    rdma_links: (self.rdma != RdmaMode::Off).then_some(2),
                    pair,
                },
            ))
        }
    }

    impl LinkTx for Tx {
        fn send(
            &mut self,
            msg: &[u8],
            mode: SendMode,
            deadline: Option<Instant>,
        ) -> Result<(), SendError> {
            let sent = if self.direct {
                let (mb, to) = (&mut self.mb, self.to);
                inside(&self.pair.ns.0[0], || {
                    mb.send_to_port_until(to, msg, mode, deadline)
                })
                .expect("entering node 1's namespace")
            } else {
                self.mb.send_to_port_until(self.to, msg, mode, deadline)
            };
            match sent {
                Ok(()) => {
                    // The link is the sender's own: node 2 handed it over.
                    if self.direct && !self.checked_direct {
                        assert_eq!(self.pair.stats(1).direct_links_in, 1, "a direct link");
                        self.checked_direct = true;
                    }
                    Ok(())
                }
                Err(Error::Send { reason, .. }) => Err(reason),
                Err(Error::NoSuchMailbox(_)) => Err(SendError::PeerGone),
                Err(e) => panic!("sending across the cluster: {e}"),
            }
        }

        fn dropped(&self) -> u64 {
            self.mb.dropped()
        }
    }

    impl LinkRx for Rx {
        /// The sender is gone once the ring from it has been seen and has
        /// ended (everything it sent received).
        fn recv(
            &mut self,
            out: &mut Vec<u8>,
            deadline: Option<Instant>,
        ) -> Result<bool, RecvError> {
            loop {
                let step = Instant::now() + Duration::from_millis(10);
                let until = deadline.map_or(step, |d| d.min(step));
                match self.mb.recv_into(out, Some(until)) {
                    Ok(Some(from)) => {
                        assert_eq!(from, self.from, "a message from a stranger");
                        if let Some(want) = self.rdma_links.take() {
                            self.pair.expect_rdma_links(want);
                        }
                        self.seen_ring = true;
                        return Ok(true);
                    }
                    Ok(None) => {}
                    Err(_) => return Err(RecvError::PeerGone),
                }
                if self.mb.has_ring_from(self.from) {
                    self.seen_ring = true;
                } else if self.seen_ring {
                    return Err(RecvError::PeerGone);
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(false);
                }
            }
        }
    }
}

/// RDMA is chosen per node link at run time: a node offers it only if it
/// has a device, and takes it only if it has one of the same kind.
mod rdma_choice {
    use std::time::{Duration, Instant};

    use super::cluster_pair::start_pair;
    use fabric::rdma::{RdmaDevice, RdmaMode};
    use fabric::ring::SendMode;

    /// A message each way between a mailbox on node 1 and one on node 2.
    fn ping_pong(s1: &std::path::Path, s2: &std::path::Path) {
        let mut a = fabric::client::Mailbox::open_at(s1).expect("mailbox on node 1");
        let mut b = fabric::client::Mailbox::open_at(s2).expect("mailbox on node 2");
        let deadline = Some(Instant::now() + Duration::from_secs(10));
        let mut got = Vec::new();
        a.send_to_port_until(b.port(), b"ping", SendMode::RELIABLE, deadline)
            .expect("send 1 -> 2");
        assert_eq!(
            b.recv_into(&mut got, deadline).expect("recv"),
            Some(a.port())
        );
        assert_eq!(got, b"ping");
        b.send_to_port_until(a.port(), b"pong", SendMode::RELIABLE, deadline)
            .expect("send 2 -> 1");
        assert_eq!(
            a.recv_into(&mut got, deadline).expect("recv"),
            Some(b.port())
        );
        assert_eq!(got, b"pong");
    }

    /// What node `socket` says its link to `node` runs over.
    fn link_to(socket: &std::path::Path, node: u32) -> String {
        let mut mb = fabric::client::Mailbox::open_at(socket).expect("mailbox");
        let nodes = mb.nodes().expect("nodes").nodes;
        nodes
            .into_iter()
            .find(|n| n.node == node)
            .map(|n| n.link)
            .unwrap_or_default()
    }

    #[test]
    fn a_node_without_the_device_gets_tcp_links_both_ways() {
        let (pair, [s1, s2]) = start_pair(
            256 << 10,
            [RdmaMode::Use(RdmaDevice::Loopback), RdmaMode::Off],
        )
        .expect("two nodes");
        assert_eq!(pair.stats(0).rdma, "loopback (in-process)");
        assert_eq!(pair.stats(1).rdma, "off");
        ping_pong(&s1, &s2);
        assert_eq!(
            (pair.stats(0).rdma_links, pair.stats(1).rdma_links),
            (0, 0),
            "node 2 has no device, so neither direction may run over RDMA"
        );
        assert_eq!(
            (link_to(&s1, 2), link_to(&s2, 1)),
            ("tcp".into(), "tcp".into())
        );
    }

    #[test]
    fn nodes_with_the_device_say_their_links_run_over_it() {
        let rdma = RdmaMode::Use(RdmaDevice::Loopback);
        let (pair, [s1, s2]) = start_pair(256 << 10, [rdma.clone(), rdma]).expect("two nodes");
        ping_pong(&s1, &s2);
        assert_eq!(
            (pair.stats(0).rdma_links, pair.stats(1).rdma_links),
            (2, 2),
            "each node: its gateway and its incoming link"
        );
        assert_eq!(
            (link_to(&s1, 2), link_to(&s2, 1)),
            ("rdma".into(), "rdma".into())
        );
    }
}
