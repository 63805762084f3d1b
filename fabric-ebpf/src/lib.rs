//! eBPF programs (sk_msg demux, source stamping, tenant policy). Not built yet: see the fabric-ebpf issue.
//!
//! This crate is an empty placeholder that keeps the workspace layout fixed;
//! it exports nothing and claims nothing.
