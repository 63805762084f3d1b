//! Control-plane messages (generated from `proto/control.proto` by prost at
//! build time) and their conversions to the address types.

#![allow(clippy::all, missing_docs)]

include!(concat!(env!("OUT_DIR"), "/nefele.fabric.v1.rs"));

use crate::addr;

impl From<addr::PortId> for PortId {
    fn from(p: addr::PortId) -> Self {
        PortId {
            node: p.node,
            port: p.port,
        }
    }
}

impl From<PortId> for addr::PortId {
    fn from(p: PortId) -> Self {
        addr::PortId {
            node: p.node,
            port: p.port,
        }
    }
}
