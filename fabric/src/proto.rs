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

impl From<&crate::names::Binding> for Binding {
    fn from(b: &crate::names::Binding) -> Self {
        Binding {
            address: b.address.to_string(),
            port: Some(b.port.into()),
            tenant: b.tenant,
        }
    }
}

impl TryFrom<Binding> for crate::names::Binding {
    type Error = addr::AddrError;

    fn try_from(b: Binding) -> Result<Self, Self::Error> {
        Ok(crate::names::Binding {
            address: b.address.parse()?,
            port: b.port.unwrap_or_default().into(),
            tenant: b.tenant,
        })
    }
}
