//! Addresses: the three schemes of the seed, and one string form for each.
//!
//! | form | meaning |
//! | --- | --- |
//! | `7:3012345` | port id `node:port`: the random id a mailbox gets at open |
//! | `{8080,3}` | service instance: anycast to one binder of type 8080 covering 3 |
//! | `{8080,1,9}` | service range: multicast to every binder overlapping 1..=9 |
//! | `printer` | symbolic name |
//! | `printer@{8080,1,1}` | a name together with a service (the seed's form) |
//!
//! Any non-port form may end in `/node` to restrict it to the local node;
//! without the suffix the scope is the cluster. The grammar is strict —
//! decimal numbers without leading zeros, no spaces, names matching
//! `[A-Za-z_][A-Za-z0-9_.-]*` (at most [`NAME_MAX_BYTES`]) — so that every
//! address has exactly one spelling: `parse(print(a)) == a` and
//! `print(parse(s)) == s`.

use std::fmt;
use std::str::FromStr;

/// Longest symbolic name, in bytes.
pub const NAME_MAX_BYTES: usize = 64;

/// The random id of one mailbox: which node it lives on, and its port there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortId {
    pub node: u32,
    pub port: u32,
}

/// Where a binding is visible, and how far a lookup reaches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Every node of the cluster (the default).
    #[default]
    Cluster,
    /// Only the node the mailbox lives on.
    Node,
}

/// `{type, lower, upper}`, inclusive on both ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceRange {
    pub ty: u32,
    pub lower: u32,
    pub upper: u32,
}

impl ServiceRange {
    /// A range; `lower` must not exceed `upper`.
    pub fn new(ty: u32, range: std::ops::RangeInclusive<u32>) -> Result<Self, AddrError> {
        let (lower, upper) = (*range.start(), *range.end());
        if lower > upper {
            return Err(AddrError::EmptyRange { lower, upper });
        }
        Ok(ServiceRange { ty, lower, upper })
    }

    /// The single instance `{ty, instance}` as a range.
    pub const fn instance(ty: u32, instance: u32) -> Self {
        ServiceRange {
            ty,
            lower: instance,
            upper: instance,
        }
    }

    /// Whether the two ranges share a type and at least one instance.
    pub const fn overlaps(&self, other: &ServiceRange) -> bool {
        self.ty == other.ty && self.lower <= other.upper && other.lower <= self.upper
    }
}

/// A validated symbolic name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

impl Name {
    /// Checks `s` against the name grammar.
    pub fn new(s: &str) -> Result<Self, AddrError> {
        let mut p = Parser::new(s);
        let name = p.name()?;
        p.end()?;
        Ok(name)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The service part of an address, remembering which of the two forms it
/// was written in (`{t,i}` is anycast, `{t,l,u}` multicast).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Service {
    /// `{type,instance}`: one binder covering the instance.
    Instance { ty: u32, instance: u32 },
    /// `{type,lower,upper}`: every binder overlapping the range.
    Range(ServiceRange),
}

impl Service {
    pub const fn range(&self) -> ServiceRange {
        match *self {
            Service::Instance { ty, instance } => ServiceRange::instance(ty, instance),
            Service::Range(r) => r,
        }
    }
}

/// Any address a mailbox can bind (not port ids) or send to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Address {
    /// A mailbox's port id.
    Port(PortId),
    /// A symbolic name, a service, or both; with a scope.
    Named {
        name: Option<Name>,
        service: Option<Service>,
        scope: Scope,
    },
}

impl Address {
    /// `{ty, lower..=upper}` in cluster scope.
    pub fn service(ty: u32, range: std::ops::RangeInclusive<u32>) -> Result<Self, AddrError> {
        Ok(Address::Named {
            name: None,
            service: Some(Service::Range(ServiceRange::new(ty, range)?)),
            scope: Scope::Cluster,
        })
    }

    /// The name alone, in cluster scope.
    pub fn name(name: &str) -> Result<Self, AddrError> {
        Ok(Address::Named {
            name: Some(Name::new(name)?),
            service: None,
            scope: Scope::Cluster,
        })
    }

    pub fn scope(&self) -> Scope {
        match self {
            Address::Port(_) => Scope::Node,
            Address::Named { scope, .. } => *scope,
        }
    }
}

/// A bad address or name; [`AddrError::Syntax`] names the byte offset.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error("bad address {input:?} at byte {pos}: expected {expected}, found {found}")]
    Syntax {
        input: String,
        pos: usize,
        expected: &'static str,
        found: String,
    },
    #[error("empty service range: lower {lower} > upper {upper}")]
    EmptyRange { lower: u32, upper: u32 },
}

impl fmt::Display for PortId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.node, self.port)
    }
}

impl fmt::Display for ServiceRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{{},{},{}}}", self.ty, self.lower, self.upper)
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Service::Instance { ty, instance } => write!(f, "{{{ty},{instance}}}"),
            Service::Range(r) => r.fmt(f),
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Port(p) => p.fmt(f),
            Address::Named {
                name,
                service,
                scope,
            } => {
                match (name, service) {
                    (Some(n), Some(s)) => write!(f, "{n}@{s}")?,
                    (Some(n), None) => n.fmt(f)?,
                    (None, Some(s)) => s.fmt(f)?,
                    (None, None) => unreachable!("an Address::Named has a name or a service"),
                }
                if *scope == Scope::Node {
                    f.write_str("/node")?;
                }
                Ok(())
            }
        }
    }
}

impl FromStr for PortId {
    type Err = AddrError;
    fn from_str(s: &str) -> Result<Self, AddrError> {
        let mut p = Parser::new(s);
        let port = p.port_id()?;
        p.end()?;
        Ok(port)
    }
}

impl FromStr for Address {
    type Err = AddrError;
    fn from_str(s: &str) -> Result<Self, AddrError> {
        let mut p = Parser::new(s);
        let a = p.address()?;
        p.end()?;
        Ok(a)
    }
}

/// A strict recursive-descent parser over bytes (the grammar is ASCII).
struct Parser<'a> {
    input: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Self {
        Parser { input, pos: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.input.as_bytes().get(self.pos).copied()
    }

    fn fail<T>(&self, expected: &'static str) -> Result<T, AddrError> {
        let found = match self.input[self.pos..].chars().next() {
            Some(c) => format!("{c:?}"),
            None => "end of input".to_string(),
        };
        Err(AddrError::Syntax {
            input: self.input.to_string(),
            pos: self.pos,
            expected,
            found,
        })
    }

    fn eat(&mut self, b: u8, expected: &'static str) -> Result<(), AddrError> {
        if self.peek() == Some(b) {
            self.pos += 1;
            Ok(())
        } else {
            self.fail(expected)
        }
    }

    fn end(&self) -> Result<(), AddrError> {
        if self.pos == self.input.len() {
            Ok(())
        } else {
            self.fail("end of address")
        }
    }

    /// A decimal u32 without sign, spaces or leading zeros.
    fn number(&mut self, expected: &'static str) -> Result<u32, AddrError> {
        let start = self.pos;
        match self.peek() {
            Some(b'0') => {
                self.pos += 1;
                if matches!(self.peek(), Some(b'0'..=b'9')) {
                    return self.fail("no leading zeros");
                }
                return Ok(0);
            }
            Some(b'1'..=b'9') => {}
            _ => return self.fail(expected),
        }
        let mut value: u32 = 0;
        while let Some(d @ b'0'..=b'9') = self.peek() {
            value = match value
                .checked_mul(10)
                .and_then(|v| v.checked_add(u32::from(d - b'0')))
            {
                Some(v) => v,
                None => {
                    self.pos = start;
                    return self.fail("a number that fits in 32 bits");
                }
            };
            self.pos += 1;
        }
        Ok(value)
    }

    fn name(&mut self) -> Result<Name, AddrError> {
        let start = self.pos;
        match self.peek() {
            Some(b'A'..=b'Z' | b'a'..=b'z' | b'_') => self.pos += 1,
            _ => return self.fail("a name starting with a letter or '_'"),
        }
        while let Some(b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-') = self.peek() {
            if self.pos - start == NAME_MAX_BYTES {
                return self.fail("a name of at most 64 bytes");
            }
            self.pos += 1;
        }
        Ok(Name(self.input[start..self.pos].to_string()))
    }

    fn port_id(&mut self) -> Result<PortId, AddrError> {
        let node = self.number("a node number")?;
        self.eat(b':', "':' between node and port")?;
        let port = self.number("a port number")?;
        Ok(PortId { node, port })
    }

    fn service(&mut self) -> Result<Service, AddrError> {
        self.eat(b'{', "'{'")?;
        let ty = self.number("a service type")?;
        self.eat(b',', "',' after the service type")?;
        let lower_at = self.pos;
        let lower = self.number("an instance number")?;
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(Service::Instance {
                ty,
                instance: lower,
            });
        }
        self.eat(b',', "',' or '}' after the instance")?;
        let upper = self.number("the upper bound of the range")?;
        self.eat(b'}', "'}'")?;
        if lower > upper {
            self.pos = lower_at;
            return self.fail("lower bound <= upper bound");
        }
        Ok(Service::Range(ServiceRange { ty, lower, upper }))
    }

    fn address(&mut self) -> Result<Address, AddrError> {
        let (name, service) = match self.peek() {
            Some(b'0'..=b'9') => return Ok(Address::Port(self.port_id()?)),
            Some(b'{') => (None, Some(self.service()?)),
            Some(b'A'..=b'Z' | b'a'..=b'z' | b'_') => {
                let name = self.name()?;
                let service = if self.peek() == Some(b'@') {
                    self.pos += 1;
                    Some(self.service()?)
                } else {
                    None
                };
                (Some(name), service)
            }
            _ => return self.fail("a port id, '{', or a name"),
        };
        let scope = if self.peek() == Some(b'/') {
            self.pos += 1;
            let at = self.pos;
            if self.input[at..].starts_with("node") {
                self.pos += 4;
                Scope::Node
            } else {
                return self.fail("'node' after '/' (cluster scope is written without a suffix)");
            }
        } else {
            Scope::Cluster
        };
        Ok(Address::Named {
            name,
            service,
            scope,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn seed_address_parses() {
        let a: Address = "printer@{8080,1,1}".parse().unwrap();
        assert_eq!(
            a,
            Address::Named {
                name: Some(Name::new("printer").unwrap()),
                service: Some(Service::Range(ServiceRange {
                    ty: 8080,
                    lower: 1,
                    upper: 1
                })),
                scope: Scope::Cluster,
            }
        );
        assert_eq!(a.to_string(), "printer@{8080,1,1}");
    }

    #[test]
    fn every_form_parses() {
        for s in [
            "0:0",
            "7:3012345",
            "{8080,3}",
            "{8080,1,9}",
            "printer",
            "a.b-c_d",
            "x@{1,2}",
            "{1,2,3}/node",
            "n/node",
        ] {
            let a: Address = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(a.to_string(), s);
        }
    }

    #[test]
    fn errors_name_position_and_expectation() {
        let e = "printer@{8080;1,1}".parse::<Address>().unwrap_err();
        assert_eq!(e.to_string(), "bad address \"printer@{8080;1,1}\" at byte 13: expected ',' after the service type, found ';'");
        let e = "{1,5,2}".parse::<Address>().unwrap_err();
        assert!(matches!(e, AddrError::Syntax { pos: 3, .. }), "{e}");
        let e = "{1,01}".parse::<Address>().unwrap_err();
        assert!(
            matches!(
                e,
                AddrError::Syntax {
                    pos: 4,
                    expected: "no leading zeros",
                    ..
                }
            ),
            "{e}"
        );
        let e = "{99999999999,1}".parse::<Address>().unwrap_err();
        assert!(matches!(e, AddrError::Syntax { pos: 1, .. }), "{e}");
        let e = "{1,1}/cluster".parse::<Address>().unwrap_err();
        assert!(matches!(e, AddrError::Syntax { pos: 6, .. }), "{e}");
        let e = "".parse::<Address>().unwrap_err();
        assert!(e.to_string().contains("found end of input"), "{e}");
        let e = "printer ".parse::<Address>().unwrap_err();
        assert!(
            matches!(
                e,
                AddrError::Syntax {
                    pos: 7,
                    expected: "end of address",
                    ..
                }
            ),
            "{e}"
        );
        assert!(Name::new(&"a".repeat(65)).is_err());
        assert!(Name::new(&"a".repeat(64)).is_ok());
    }

    fn arb_name() -> impl Strategy<Value = Name> {
        "[A-Za-z_][A-Za-z0-9_.-]{0,20}".prop_map(|s| Name::new(&s).unwrap())
    }

    fn arb_service() -> impl Strategy<Value = Service> {
        prop_oneof![
            (any::<u32>(), any::<u32>())
                .prop_map(|(ty, instance)| Service::Instance { ty, instance }),
            (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(ty, a, b)| Service::Range(
                ServiceRange {
                    ty,
                    lower: a.min(b),
                    upper: a.max(b)
                }
            )),
        ]
    }

    fn arb_address() -> impl Strategy<Value = Address> {
        prop_oneof![
            (any::<u32>(), any::<u32>())
                .prop_map(|(node, port)| Address::Port(PortId { node, port })),
            (
                proptest::option::of(arb_name()),
                proptest::option::of(arb_service()),
                any::<bool>()
            )
                .prop_filter("name or service", |(n, s, _)| n.is_some() || s.is_some())
                .prop_map(|(name, service, node)| Address::Named {
                    name,
                    service,
                    scope: if node { Scope::Node } else { Scope::Cluster }
                }),
        ]
    }

    proptest! {
        #[test]
        fn print_then_parse_is_identity(a in arb_address()) {
            let s = a.to_string();
            prop_assert_eq!(s.parse::<Address>().unwrap(), a);
        }

        #[test]
        fn parse_then_print_is_identity(s in "[a-z0-9{},@/:._-]{0,24}") {
            if let Ok(a) = s.parse::<Address>() {
                prop_assert_eq!(a.to_string(), s);
            }
        }

        #[test]
        fn overlap_is_symmetric(a in arb_service(), b in arb_service()) {
            prop_assert_eq!(a.range().overlaps(&b.range()), b.range().overlaps(&a.range()));
        }
    }
}
