//! The UDP listeners' session table: one entry per client address, bounded, with the
//! entries kept in order of last activity so that the idle ones expire and, when the
//! table is full, the longest idle one makes room, both in O(log n).
//!
//! Activity is a datagram from the client (recorded here) or a reply from the backend
//! (recorded by the flow's relay task, outside the table, and read through `replied`
//! when an entry is about to go): an entry whose reply is newer than its place in the
//! order is moved instead of removed.
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub(super) struct FlowTable<V> {
    max: usize,
    entries: HashMap<SocketAddr, (Instant, V)>,
    /// `(last activity known to the table, client)`, oldest first.
    by_age: BTreeSet<(Instant, SocketAddr)>,
}

impl<V> FlowTable<V> {
    /// A table of at most `max` flows (at least one).
    pub(super) fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            entries: HashMap::new(),
            by_age: BTreeSet::new(),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn contains(&self, client: SocketAddr) -> bool {
        self.entries.contains_key(&client)
    }

    /// The flow of `client`, marked active at `now`.
    pub(super) fn touch(&mut self, client: SocketAddr, now: Instant) -> Option<&V> {
        let (seen, value) = self.entries.get_mut(&client)?;
        if *seen != now {
            self.by_age.remove(&(*seen, client));
            self.by_age.insert((now, client));
            *seen = now;
        }
        Some(value)
    }

    /// Add the flow of `client` (replacing one it had). A full table first gives up its
    /// longest idle flow, which is returned.
    pub(super) fn insert(
        &mut self,
        client: SocketAddr,
        value: V,
        now: Instant,
        replied: impl Fn(&V) -> Option<Instant>,
    ) -> Option<(SocketAddr, V)> {
        let replaced = self.remove(client);
        let evicted = if replaced.is_none() && self.entries.len() >= self.max {
            self.oldest(&replied)
                .and_then(|(_, c)| self.remove(c).map(|v| (c, v)))
        } else {
            None
        };
        self.entries.insert(client, (now, value));
        self.by_age.insert((now, client));
        evicted
    }

    /// Remove and return the flows idle for `idle` or longer at `now`.
    pub(super) fn expire(
        &mut self,
        now: Instant,
        idle: Duration,
        replied: impl Fn(&V) -> Option<Instant>,
    ) -> Vec<(SocketAddr, V)> {
        let mut expired = Vec::new();
        while let Some((seen, client)) = self.oldest(&replied) {
            if now.saturating_duration_since(seen) < idle {
                break;
            }
            if let Some(value) = self.remove(client) {
                expired.push((client, value));
            }
        }
        expired
    }

    /// Remove and return the flows `keep` refuses.
    pub(super) fn retain(&mut self, keep: impl Fn(&V) -> bool) -> Vec<(SocketAddr, V)> {
        let gone: Vec<SocketAddr> = self
            .entries
            .iter()
            .filter(|(_, (_, v))| !keep(v))
            .map(|(c, _)| *c)
            .collect();
        gone.into_iter()
            .filter_map(|c| self.remove(c).map(|v| (c, v)))
            .collect()
    }

    fn remove(&mut self, client: SocketAddr) -> Option<V> {
        let (seen, value) = self.entries.remove(&client)?;
        self.by_age.remove(&(seen, client));
        Some(value)
    }

    /// The longest idle flow, counting replies: a front entry with a newer reply moves to
    /// its reply's place first. Replies only move forward, so this ends after at most
    /// one move per entry.
    fn oldest(
        &mut self,
        replied: &impl Fn(&V) -> Option<Instant>,
    ) -> Option<(Instant, SocketAddr)> {
        loop {
            let (seen, client) = *self.by_age.first()?;
            let entry = self.entries.get_mut(&client)?;
            match replied(&entry.1).filter(|r| *r > seen) {
                Some(reply) => {
                    self.by_age.remove(&(seen, client));
                    self.by_age.insert((reply, client));
                    entry.0 = reply;
                }
                None => return Some((seen, client)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;

    use super::*;

    fn client(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    /// A flow whose backend last replied at the time in the cell, if ever (the relay
    /// task's clock, shared the way the gateway shares it).
    type Flow = Rc<Cell<Option<Instant>>>;

    fn flow() -> Flow {
        Rc::default()
    }

    fn replied(f: &Flow) -> Option<Instant> {
        f.get()
    }

    #[test]
    fn a_full_table_evicts_the_longest_idle_flow_not_the_oldest_created() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut table = FlowTable::new(3);
        let third = flow();
        for port in 1..=3 {
            let f = if port == 3 { Rc::clone(&third) } else { flow() };
            assert!(table
                .insert(client(port), f, at(port.into()), replied)
                .is_none());
        }
        // The first flow is the oldest, but active again: the second is the longest idle.
        assert!(table.touch(client(1), at(10)).is_some());
        let (evicted, _) = table.insert(client(4), flow(), at(11), replied).unwrap();
        assert_eq!(evicted, client(2));
        assert_eq!(table.len(), 3);
        assert!(table.touch(client(2), at(12)).is_none());
        // A backend's reply counts as activity too: the third flow, silent since 3 ms but
        // answered at 20 ms, stays; the first (10 ms) goes.
        third.set(Some(at(20)));
        let (evicted, _) = table.insert(client(5), flow(), at(21), replied).unwrap();
        assert_eq!(evicted, client(1));
        // A client already in the table replaces its own flow and evicts nobody.
        assert!(table.insert(client(5), flow(), at(22), replied).is_none());
        assert_eq!(table.len(), 3);
    }

    #[test]
    fn idle_flows_expire_and_active_ones_stay() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let idle = Duration::from_millis(100);
        let mut table = FlowTable::new(10);
        for port in 1..=4 {
            table.insert(client(port), flow(), at(0), replied);
        }
        table.touch(client(2), at(50));
        table.touch(client(3), at(0)).unwrap().set(Some(at(60)));
        assert!(table.expire(at(99), idle, replied).is_empty());
        let mut gone: Vec<SocketAddr> = table
            .expire(at(100), idle, replied)
            .into_iter()
            .map(|(c, _)| c)
            .collect();
        gone.sort();
        assert_eq!(gone, [client(1), client(4)]);
        assert_eq!(table.len(), 2);
        let gone: Vec<SocketAddr> = table
            .expire(at(155), idle, replied)
            .into_iter()
            .map(|(c, _)| c)
            .collect();
        assert_eq!(gone, [client(2)]);
        assert_eq!(table.expire(at(160), idle, replied).len(), 1);
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn retain_removes_what_it_refuses_from_both_indexes() {
        let now = Instant::now();
        let mut table = FlowTable::new(4);
        for port in 1..=4 {
            table.insert(client(port), port, now, |_| None);
        }
        let mut gone: Vec<u16> = table
            .retain(|p| p % 2 == 0)
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        gone.sort_unstable();
        assert_eq!(gone, [1, 3]);
        assert_eq!(table.len(), 2);
        assert_eq!(table.by_age.len(), 2);
        // Room for two more without evicting.
        assert!(table.insert(client(5), 5, now, |_| None).is_none());
        assert!(table.insert(client(6), 6, now, |_| None).is_none());
        assert!(table.insert(client(7), 7, now, |_| None).is_some());
    }
}
