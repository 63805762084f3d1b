//! The name table: which mailbox bound which address, and who resolves to
//! whom.
//!
//! Matching rules for an address `a` against a binding `b`:
//! - a port id matches nothing here (ports are resolved by the mailbox
//!   registry);
//! - a name in `a` must equal `b`'s name;
//! - a service in `a` must overlap `b`'s service range (same type);
//! - `/node` in `a` restricts to bindings on the local node, and a binding
//!   with `/node` scope is invisible to other nodes;
//! - a name resolves within the caller's tenant: an address that names one
//!   reaches only bindings made in the caller's tenant or in
//!   [`SYSTEM_TENANT`] (root's, where system services such as `procmgrd`
//!   bind). Service numbers are cluster-wide: `{8080,1}` reaches a binder
//!   of any tenant (the tenant policy then decides whether a message may
//!   pass).
//!
//! `{t,i}` and a bare name are *anycast* (one binder: local ones first, then
//! round-robin); `{t,l,u}` (with or without a name) is *multicast* (every
//! binder, each port once).

use crate::addr::{Address, PortId, Scope, Service};

/// Most bindings one node's table holds.
pub const MAX_BINDINGS: usize = 1 << 16;

/// The tenant whose names every tenant resolves: root's (uid 0).
pub const SYSTEM_TENANT: u32 = 0;

/// One entry: `port`, a mailbox of `tenant`, bound `address` (a named
/// form, never a port id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    pub address: Address,
    pub port: PortId,
    pub tenant: u32,
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

/// [`matches`] for a caller in `tenant`: a query that names a name sees
/// only the bindings of its own tenant and of [`SYSTEM_TENANT`].
pub fn visible(query: &Address, binding: &Binding, local_node: u32, tenant: u32) -> bool {
    let named = matches!(query, Address::Named { name: Some(_), .. });
    matches(query, binding, local_node)
        && (!named || binding.tenant == tenant || binding.tenant == SYSTEM_TENANT)
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

    /// Adds a binding of `address` by `port`, a mailbox of `tenant`.
    pub fn bind(
        &mut self,
        address: Address,
        port: PortId,
        tenant: u32,
    ) -> Result<Binding, NameError> {
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
        let b = Binding {
            address,
            port,
            tenant,
        };
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

    /// Moves every binding of `port` to `tenant` (its mailbox moved there),
    /// returning each as it was and as it is now.
    pub fn retenant(&mut self, port: PortId, tenant: u32) -> Vec<(Binding, Binding)> {
        let mut moved = Vec::new();
        for b in self.bindings.iter_mut() {
            if b.port == port && b.tenant != tenant {
                let old = b.clone();
                b.tenant = tenant;
                moved.push((old, b.clone()));
            }
        }
        moved
    }

    /// The ports `query` reaches now for a caller in `tenant` (see
    /// [`visible`]): all matches for multicast, one for anycast (local
    /// first, round-robin among equals). A port id resolves to itself; the
    /// caller checks that it exists.
    pub fn lookup(&mut self, query: &Address, tenant: u32) -> Vec<PortId> {
        self.lookup_counted(query, tenant).0
    }

    /// [`NameTable::lookup`], plus how many distinct ports matched.
    pub fn lookup_counted(&mut self, query: &Address, tenant: u32) -> (Vec<PortId>, usize) {
        if let Address::Port(p) = query {
            return (vec![*p], 1);
        }
        let mut ports: Vec<PortId> = self
            .bindings
            .iter()
            .filter(|b| visible(query, b, self.local_node, tenant))
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
    /// The tenant of the tests that are not about tenants.
    const T: u32 = 1000;

    #[test]
    fn seed_binding_resolves() {
        let mut t = NameTable::new(1);
        t.bind(a("printer@{8080,1,1}"), P1, T).unwrap();
        assert_eq!(t.lookup(&a("printer@{8080,1,1}"), T), vec![P1]);
        assert_eq!(t.lookup(&a("printer"), T), vec![P1]);
        assert_eq!(t.lookup(&a("{8080,1}"), T), vec![P1]);
        assert_eq!(t.lookup(&a("{8080,0,5}"), T), vec![P1]);
        assert!(t.lookup(&a("{8080,2}"), T).is_empty());
        assert!(t.lookup(&a("scanner@{8080,1,1}"), T).is_empty());
        assert!(t.lookup(&a("{8081,1}"), T).is_empty());
    }

    #[test]
    fn anycast_picks_one_multicast_all_local_first() {
        let mut t = NameTable::new(1);
        t.bind(a("{1,0,9}"), P1, T).unwrap();
        t.bind(a("{1,5,15}"), P2, T).unwrap();
        t.bind(a("{1,0,100}"), REMOTE, T).unwrap();
        assert_eq!(t.lookup(&a("{1,0,100}"), T), vec![P1, P2, REMOTE]);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10 {
            let r = t.lookup(&a("{1,7}"), T);
            assert_eq!(r.len(), 1);
            seen.insert(r[0]);
        }
        assert_eq!(
            seen,
            [P1, P2].into_iter().collect(),
            "anycast round-robins over local binders only"
        );
        assert_eq!(t.lookup(&a("{1,50}"), T), vec![REMOTE]);
        assert!(t.lookup(&a("{1,50}/node"), T).is_empty());
    }

    #[test]
    fn bind_errors_and_withdraw() {
        let mut t = NameTable::new(1);
        assert_eq!(t.bind(a("1:2"), P1, T), Err(NameError::PortNotBindable));
        t.bind(a("x"), P1, T).unwrap();
        assert!(matches!(
            t.bind(a("x"), P1, T),
            Err(NameError::AlreadyBound { .. })
        ));
        t.bind(a("x"), P2, T).unwrap();
        t.bind(a("{3,3}"), P1, T).unwrap();
        assert!(matches!(
            t.unbind(&a("y"), P1),
            Err(NameError::NotBound { .. })
        ));
        let gone = t.withdraw(P1);
        assert_eq!(gone.len(), 2);
        assert_eq!(t.lookup(&a("x"), T), vec![P2]);
        assert!(t.lookup(&a("{3,3}"), T).is_empty());
    }

    #[test]
    fn node_scoped_binding_is_invisible_remotely() {
        let remote_binding = Binding {
            address: a("{5,5}/node"),
            port: REMOTE,
            tenant: T,
        };
        assert!(!matches(&a("{5,5}"), &remote_binding, 1));
        assert!(matches(&a("{5,5}"), &remote_binding, 2));
    }

    #[test]
    fn names_resolve_within_the_callers_tenant_and_the_system_one() {
        let mut t = NameTable::new(1);
        let system = PortId { node: 1, port: 40 };
        t.bind(a("printer@{8080,1,1}"), P1, 7).unwrap();
        t.bind(a("printer@{8080,2,2}"), P2, 8).unwrap();
        t.bind(a("procmgr@{9,1,1}"), system, SYSTEM_TENANT).unwrap();
        assert_eq!(t.lookup(&a("printer"), 7), vec![P1]);
        assert_eq!(t.lookup(&a("printer@{8080,0,9}"), 8), vec![P2]);
        assert!(t.lookup(&a("printer"), 9).is_empty());
        // Service numbers are cluster-wide, whoever bound them.
        assert_eq!(t.lookup(&a("{8080,0,9}"), 9), vec![P1, P2]);
        assert_eq!(t.lookup(&a("procmgr@{9,1}"), 7), vec![system]);
        // A mailbox that moves takes its names with it.
        let moved = t.retenant(P1, 8);
        assert_eq!(moved.len(), 1);
        assert_eq!((moved[0].0.tenant, moved[0].1.tenant), (7, 8));
        assert!(t.lookup(&a("printer"), 7).is_empty());
        assert_eq!(t.lookup(&a("printer@{8080,0,9}"), 8), vec![P1, P2]);
        assert!(t.retenant(P1, 8).is_empty(), "nothing left to move");
    }
}
