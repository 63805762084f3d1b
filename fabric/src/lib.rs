//! The Nefele message fabric ("Hermodr").
//!
//! - [`addr`]: the three address schemes and their one string form each;
//! - [`ring`], [`futex`], [`segment`]: the shared-memory ring a sender and a
//!   receiver exchange messages through, and how each side waits;
//! - [`transport`]: the transport trait, its backends, and the conformance
//!   suite every backend must pass;
//! - [`proto`]: the control-plane messages (protobuf) between clients and
//!   `fabricd`;
//! - [`names`]: the name table (bindings, lookups, subscriptions);
//! - [`ebpf`]: the eBPF mailbox path (sk_msg demux, source stamping,
//!   tenant policy) and its loader;
//! - [`uring`]: io_uring waits on a futex and a socket together;
//! - [`daemon`]: `fabricd`, the node daemon;
//! - [`client`]: the in-process client library the SDKs are built on;
//! - [`cluster`]: membership, capacity gossip and the replicated name table;
//!   [`remote`]: the reliable TCP link node links are made of.

pub mod addr;
pub mod futex;
pub mod ring;
pub mod segment;

pub use fabric_wire as wire;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod conformance;
mod ctlserver;
pub mod ctlsock;
pub mod daemon;
pub mod direct;
pub mod ebpf;
mod forward;
mod inbound;
pub mod names;
pub mod netns;
mod outbound;
pub mod proto;
pub mod rdma;
pub mod remote;
pub mod ringpool;
pub mod transport;
pub mod uring;
