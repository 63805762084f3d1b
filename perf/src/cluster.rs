//! A 3-node cluster inside this process, for `spawn` and `pi`: each node
//! is a network namespace (joined to the others by veth pairs on a bridge
//! in a hub namespace, as `ci/cluster.sh` does) holding one embedded
//! `fabricd` and `procmgrd`, whose threads — and so the processes they
//! start — live in that namespace. Node links cross the veths; nothing
//! is shared but the filesystem. Removed again on drop, also after a
//! failure. Needs root.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use fabric::netns::{inside, ip};

const HUB: &str = "nefele-perf-hub";
const PORT: u16 = 7200;

fn ns_name(i: u32) -> String {
    format!("nefele-perf-n{i}")
}

fn addr(i: u32) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([10, 80, 0, i as u8], PORT))
}

/// The namespaces, removed on drop (after the nodes, declared first in
/// [`LocalCluster`]).
struct Namespaces(u32);

impl Namespaces {
    fn remove(n: u32) {
        for ns in (1..=n).map(ns_name).chain([HUB.to_string()]) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &ns])
                .output();
        }
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        Self::remove(self.0);
    }
}

pub struct LocalCluster {
    nodes: Vec<nefele::Node>,
    _ns: Namespaces,
}

impl LocalCluster {
    /// Starts `n` nodes and waits (at most 10 s) until each sees all.
    pub fn start(n: u32) -> Result<LocalCluster> {
        if !nix::unistd::Uid::effective().is_root() {
            bail!("the cluster measurements need root: they create network namespaces");
        }
        Namespaces::remove(n);
        let ns = Namespaces(n);
        ip(&["netns", "add", HUB])?;
        ip(&["-n", HUB, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", HUB, "link", "set", "br0", "up"])?;
        let mut nodes = Vec::new();
        for i in 1..=n {
            let name = ns_name(i);
            ip(&["netns", "add", &name])?;
            let hub_end = format!("npv{i}");
            ip(&[
                "link", "add", &hub_end, "netns", HUB, "type", "veth", "peer", "name", "eth0",
                "netns", &name,
            ])?;
            ip(&["-n", HUB, "link", "set", &hub_end, "master", "br0", "up"])?;
            ip(&[
                "-n",
                &name,
                "addr",
                "add",
                &format!("10.80.0.{i}/24"),
                "brd",
                "+",
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &name, "link", "set", "eth0", "up"])?;
            ip(&["-n", &name, "link", "set", "lo", "up"])?;
            let mut cc = fabric::cluster::ClusterConfig::new("nefele-perf-cluster", addr(i));
            cc.broadcast = false;
            cc.seeds = vec![addr(1)];
            let node = inside(&name, || -> Result<nefele::Node> {
                let node = nefele::Node::embedded_member(cc)?;
                procmgr::daemon::ProcMgr::open(node.socket_path())?
                    .discard_stdout()
                    .spawn_thread()?;
                Ok(node)
            })??;
            nodes.push(node);
        }
        let t0 = Instant::now();
        for node in &nodes {
            let mut mb = node.mailbox()?;
            loop {
                let alive = mb.nodes()?.nodes.iter().filter(|m| m.alive).count();
                if alive == n as usize {
                    break;
                }
                if t0.elapsed() > Duration::from_secs(10) {
                    bail!("the {n} nodes did not see each other within 10 s");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(LocalCluster { nodes, _ns: ns })
    }

    /// With `enabled`: a 3-node cluster and a process-manager client on its
    /// node 1, for the measurements that compare it with one node.
    pub fn three_with_client(
        enabled: bool,
    ) -> Result<Option<(LocalCluster, procmgr::client::ProcClient)>> {
        if !enabled {
            return Ok(None);
        }
        let c = LocalCluster::start(3)?;
        let client = c.client(1)?;
        Ok(Some((c, client)))
    }

    /// A process-manager client on node `i` (1-based).
    pub fn client(&self, i: u32) -> Result<procmgr::client::ProcClient> {
        let node = &self.nodes[i as usize - 1];
        Ok(procmgr::client::ProcClient::open_at(node.socket_path())?)
    }
}
