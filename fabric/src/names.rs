//! The name table: which mailbox bound which address, and who resolves to
//! whom.
//!
//! Matching rules for an address `a` against a binding `b`:
//! - a port id matches nothing here (ports are resolved by the mailbox
//!   registry);
//! - a name in `a` must equal `b`'s name;
//! - a service in `a` must overlap `b`'s service range (same type);
//! - `/node` in `a` restricts to bindings on the local node, and a binding
//!   with `/node` scope is invisible to other nodes.
//!
//! `{t,i}` and a bare name are *anycast* (one binder: local ones first, then
//! round-robin); `{t,l,u}` (with or without a name) is *multicast* (every
//! binder, each port once).

use crate::addr::{Address, PortId, Scope, Service};

/// Most bindings one node's table holds.
pub const MAX_BINDINGS: usize = 1 << 16;

/// One entry: `port` bound `address` (a named form, never a port id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    pub address: Address,
    pub port: PortId,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("a port id cannot be bound; bind a service like {{8080,1,1}} or a name")]
    PortNotBindable,
    #[error("{address} is already bound by this mailbox")]
    AlreadyBound { address: String },
    #[error("{address} is not bound by this mailbox")]
    NotBound { address: String },
    #[error("the name table is full ({MAX_BINDINGS} bindings)")]
    Full,
}

/// Whether `query` resolves to the mailbox that made `binding`, seen from
/// `local_node`.
pub fn matches(query: &Address, binding: &Binding, local_node: u32) -> bool {
    let Address::Named {
        name: qn,
        service: qs,
        scope: qscope,
    } = query
    else {
        return false;
    };
    let Address::Named {
        name: bn,
        service: bs,
        scope: bscope,
    } = &binding.address
    else {
        return false;
    };
    let local = binding.port.node == local_node;
    if (*qscope == Scope::Node || *bscope == Scope::Node) && !local {
        return false;
    }
    if qn.is_some() && qn != bn {
        return false;
    }
    match (qs, bs) {
        (Some(q), Some(b)) => q.range().overlaps(&b.range()),
        (Some(_), None) => false,
        (None, _) => true,
    }
}

/// Whether sending to `query` reaches every match (multicast) or one.
pub fn is_multicast(query: &Address) -> bool {
    matches!(
        query,
        Address::Named {
            service: Some(Service::Range(_)),
            ..
        }
    )
}

/// A node's view of the bindings.
#[derive(Default)]
pub struct NameTable {
    local_node: u32,
    bindings: Vec<Binding>,
    round_robin: usize,
}

impl NameTable {
    pub fn new(local_node: u32) -> Self {
        NameTable {
            local_node,
            bindings: Vec::new(),
            round_robin: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.bindings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bindings.is_empty()
    }

    pub fn bindings(&self) -> &[Binding] {
        &self.bindings
    }

    /// Adds a binding of `address` by `port`.
    pub fn bind(&mut self, address: Address, port: PortId) -> Result<Binding, NameError> {
        if matches!(address, Address::Port(_)) {
            return Err(NameError::PortNotBindable);
        }
        if self
            .bindings
            .iter()
            .any(|b| b.port == port && b.address == address)
        {
            return Err(NameError::AlreadyBound {
                address: address.to_string(),
            });
        }
        if self.bindings.len() >= MAX_BINDINGS {
            return Err(NameError::Full);
        }
        let b = Binding { address, port };
        self.bindings.push(b.clone());
        Ok(b)
    }

    /// Removes one binding of `address` by `port`.
    pub fn unbind(&mut self, address: &Address, port: PortId) -> Result<Binding, NameError> {
        match self
            .bindings
            .iter()
            .position(|b| b.port == port && &b.address == address)
        {
            Some(i) => Ok(self.bindings.swap_remove(i)),
            None => Err(NameError::NotBound {
                address: address.to_string(),
            }),
        }
    }

    /// Removes every binding of `port` (its mailbox closed or died).
    pub fn withdraw(&mut self, port: PortId) -> Vec<Binding> {
        let (gone, kept) = std::mem::take(&mut self.bindings)
            .into_iter()
            .partition(|b| b.port == port);
        self.bindings = kept;
        gone
    }

    /// The ports `query` reaches now: all matches for multicast, one for
    /// anycast (local first, round-robin among equals). A port id resolves
    /// to itself; the caller checks that it exists.
    pub fn lookup(&mut self, query: &Address) -> Vec<PortId> {
        self.lookup_counted(query).0
    }

    /// [`NameTable::lookup`], plus how many distinct ports matched.
    pub fn lookup_counted(&mut self, query: &Address) -> (Vec<PortId>, usize) {
        if let Address::Port(p) = query {
            return (vec![*p], 1);
        }
        let mut ports: Vec<PortId> = self
            .bindings
            .iter()
            .filter(|b| matches(query, b, self.local_node))
            .map(|b| b.port)
            .collect();
        ports.sort_unstable();
        ports.dedup();
        let candidates = ports.len();
        if is_multicast(query) || candidates <= 1 {
            return (ports, candidates);
        }
        let local: Vec<PortId> = ports
            .iter()
            .copied()
            .filter(|p| p.node == self.local_node)
            .collect();
        let pool = if local.is_empty() { ports } else { local };
        self.round_robin = self.round_robin.wrapping_add(1);
        (vec![pool[self.round_robin % pool.len()]], candidates)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Address {
        s.parse().unwrap()
    }
    const P1: PortId = PortId { node: 1, port: 10 };
    const P2: PortId = PortId { node: 1, port: 20 };
    const REMOTE: PortId = PortId { node: 2, port: 30 };

    #[test]
    fn seed_binding_resolves() {
        let mut t = NameTable::new(1);
        t.bind(a("printer@{8080,1,1}"), P1).unwrap();
        assert_eq!(t.lookup(&a("printer@{8080,1,1}")), vec![P1]);
        assert_eq!(t.lookup(&a("printer")), vec![P1]);
        assert_eq!(t.lookup(&a("{8080,1}")), vec![P1]);
        assert_eq!(t.lookup(&a("{8080,0,5}")), vec![P1]);
        assert!(t.lookup(&a("{8080,2}")).is_empty());
        assert!(t.lookup(&a("scanner@{8080,1,1}")).is_empty());
        assert!(t.lookup(&a("{8081,1}")).is_empty());
    }

    #[test]
    fn anycast_picks_one_multicast_all_local_first() {
        let mut t = NameTable::new(1);
        t.bind(a("{1,0,9}"), P1).unwrap();
        t.bind(a("{1,5,15}"), P2).unwrap();
        t.bind(a("{1,0,100}"), REMOTE).unwrap();
        assert_eq!(t.lookup(&a("{1,0,100}")), vec![P1, P2, REMOTE]);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10 {
            let r = t.lookup(&a("{1,7}"));
            assert_eq!(r.len(), 1);
            seen.insert(r[0]);
        }
        assert_eq!(
            seen,
            [P1, P2].into_iter().collect(),
            "anycast round-robins over local binders only"
        );
        assert_eq!(t.lookup(&a("{1,50}")), vec![REMOTE]);
        assert!(t.lookup(&a("{1,50}/node")).is_empty());
    }

    #[test]
    fn bind_errors_and_withdraw() {
        let mut t = NameTable::new(1);
        assert_eq!(t.bind(a("1:2"), P1), Err(NameError::PortNotBindable));
        t.bind(a("x"), P1).unwrap();
        assert!(matches!(
            t.bind(a("x"), P1),
            Err(NameError::AlreadyBound { .. })
        ));
        t.bind(a("x"), P2).unwrap();
        t.bind(a("{3,3}"), P1).unwrap();
        assert!(matches!(
            t.unbind(&a("y"), P1),
            Err(NameError::NotBound { .. })
        ));
        let gone = t.withdraw(P1);
        assert_eq!(gone.len(), 2);
        assert_eq!(t.lookup(&a("x")), vec![P2]);
        assert!(t.lookup(&a("{3,3}")).is_empty());
    }

    #[test]
    fn node_scoped_binding_is_invisible_remotely() {
        let remote_binding = Binding {
            address: a("{5,5}/node"),
            port: REMOTE,
        };
        assert!(!matches(&a("{5,5}"), &remote_binding, 1));
        assert!(matches(&a("{5,5}"), &remote_binding, 2));
    }
}
