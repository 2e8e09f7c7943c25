//! Connections per source (`limits.max_connections_per_ip`): one address
//! must not take every place of `limits.max_connections`, which relay
//! clients and users share. An IPv6 source is its /64, the smallest
//! block a site is given: one host can pick any address in it.

use std::net::IpAddr;
use std::sync::Arc;

use dashmap::DashMap;

/// Open connections of each source.
#[derive(Debug)]
pub struct Peers {
    max: usize,
    open: DashMap<Source, usize>,
}

/// Where connections come from, for counting: an IPv4 address, or the
/// /64 of an IPv6 one.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Source(IpAddr);

impl Source {
    fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let block = u128::from(v6) & !((1u128 << 64) - 1);
                Source(IpAddr::V6(block.into()))
            }
            v4 => Source(v4),
        }
    }
}

/// One connection's place among its source's; given back when dropped.
#[derive(Debug)]
pub struct PeerSlot {
    peers: Arc<Peers>,
    source: Source,
}

impl Peers {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: DashMap::new(),
        })
    }

    /// A place for one more connection from `ip`, if its source has
    /// fewer than the maximum open.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<PeerSlot> {
        let source = Source::of(ip);
        let mut open = self.open.entry(source).or_insert(0);
        if *open >= self.max {
            return None;
        }
        *open += 1;
        Some(PeerSlot {
            peers: self.clone(),
            source,
        })
    }

    /// Sources with a connection open.
    #[cfg(test)]
    fn sources(&self) -> usize {
        self.open.len()
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let open = &self.peers.open;
        if let Some(mut n) = open.get_mut(&self.source) {
            *n = n.saturating_sub(1);
        }
        // Sources without a connection are forgotten: the map holds only
        // the sources of open connections.
        open.remove_if(&self.source, |_, n| *n == 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_source_has_its_own_count_and_ipv6_counts_by_64() {
        let peers = Peers::new(2);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let a1 = peers.admit(ip("192.0.2.1")).unwrap();
        let a2 = peers.admit(ip("192.0.2.1")).unwrap();
        assert!(peers.admit(ip("192.0.2.1")).is_none(), "a third");
        // The same address, mapped into IPv6 by a dual-stack listener.
        assert!(peers.admit(ip("::ffff:192.0.2.1")).is_none());
        let _b = peers.admit(ip("192.0.2.2")).unwrap();
        drop(a1);
        let _a3 = peers.admit(ip("192.0.2.1")).unwrap();
        drop(a2);

        let _c1 = peers.admit(ip("2001:db8:1:2::1")).unwrap();
        let _c2 = peers.admit(ip("2001:db8:1:2:ffff::9")).unwrap();
        assert!(
            peers.admit(ip("2001:db8:1:2:abcd::1")).is_none(),
            "the same /64"
        );
        let _d = peers.admit(ip("2001:db8:1:3::1")).unwrap();
        assert_eq!(peers.sources(), 4);
        drop((_a3, _b, _c1, _c2, _d));
        assert_eq!(peers.sources(), 0, "no connection, no entry");
    }
}
