//! The Nefele process manager.
//!
//! `procmgrd` runs once per node and rides on the fabric: it binds
//! `procmgr@{1000,N,N}` (N: its node id) and answers protobuf requests
//! (spawn, wait, kill, list) sent to it over mailboxes, like any
//! application. [`client::ProcClient`] is the caller's side, used by the
//! SDKs and the `nefele` CLI.
//!
//! - [`pid`]: global pids (node, generation, local pid) and wait statuses;
//! - [`daemon`]: the service, placing processes over the cluster's nodes;
//! - [`ship`]: programs fetched from the spawning node when missing;
//! - [`cgroup`]: per-process limits;
//! - [`client`]: blocking calls to it.

pub mod cgroup;
pub mod client;
pub mod daemon;
pub mod pid;
pub mod ship;

/// Generated from `proto/procmgr.proto`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/nefele.procmgr.v1.rs"));
}

/// The service type procmgrd binds; the instance is its node id.
pub const SERVICE_TYPE: u32 = 1000;

/// Environment variable a spawned process finds its own global pid in.
pub const PID_ENV: &str = "NEFELE_PID";

/// The address of the procmgrd of `node`: `procmgr@{1000,node,node}`.
pub fn service_address(node: u32) -> fabric::addr::Address {
    format!("procmgr@{{{SERVICE_TYPE},{node},{node}}}")
        .parse()
        .expect("a well-formed address")
}
