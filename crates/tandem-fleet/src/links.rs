//! The fleet's links (each engine's NIC and its host-to-GPU PCIe link), each the sim's own
//! processor-sharing [`SharedLink`], and the transfers running over them.
//!
//! A P→D pull crosses two links at once, as in the sim (`engine/transfer.rs` and
//! `engine/reads.rs`): the prefill engine's NIC answers the read and the decode engine's NIC takes
//! it in, each shared with that engine's other transfers; the pull is through when both are. A
//! host-tier load crosses one link. The loop learns when to look again from [`Links::next_check`]:
//! each link's next finish carries a version, so a check made stale by a later start is skipped.

use std::collections::HashMap;

use tandem_sim::link::SharedLink;

#[derive(Debug)]
struct Link {
    link: SharedLink,
    /// Bumped whenever the link's flows change; a check for an older version is stale.
    version: u64,
}

/// A transfer: how many of its links still move bytes, and what it is for.
#[derive(Debug)]
struct Transfer<T> {
    pending: u32,
    tag: T,
}

#[derive(Debug)]
pub(crate) struct Links<T> {
    links: Vec<Link>,
    transfers: HashMap<u64, Transfer<T>>,
    next_id: u64,
}

impl<T> Links<T> {
    pub(crate) fn new() -> Self {
        Links {
            links: Vec::new(),
            transfers: HashMap::new(),
            next_id: 0,
        }
    }

    /// A new link of `bytes_per_sec`; returns its index.
    pub(crate) fn add(&mut self, bytes_per_sec: f64) -> usize {
        self.links.push(Link {
            link: SharedLink::new(bytes_per_sec),
            version: 0,
        });
        self.links.len() - 1
    }

    /// Start moving `bytes` over every link in `over` at `now`. Returns the tags of transfers
    /// that finished by `now` (a zero-byte one finishes at once), and the links whose next finish
    /// changed (the caller schedules [`Self::next_check`] for them).
    pub(crate) fn start(&mut self, now: f64, over: &[usize], bytes: u64, tag: T) -> Started<T> {
        let id = self.next_id;
        self.next_id += 1;
        self.transfers.insert(
            id,
            Transfer {
                pending: over.len() as u32,
                tag,
            },
        );
        let mut out = Started {
            done: Vec::new(),
            changed: Vec::new(),
        };
        if over.is_empty() {
            out.done.extend(self.transfers.remove(&id).map(|t| t.tag));
            return out;
        }
        for &l in over {
            let finished = self.links[l].link.start(now, id, bytes);
            self.links[l].version += 1;
            out.changed.push(l);
            self.finish_flows(finished, &mut out.done);
        }
        out
    }

    /// Account link `l` up to `now` if `version` is current; returns finished transfers' tags.
    pub(crate) fn check(&mut self, now: f64, l: usize, version: u64) -> Option<Vec<T>> {
        if self.links[l].version != version {
            return None;
        }
        let link = &mut self.links[l].link;
        let mut finished = link.advance(now);
        // Late in a run a flow's last bytes can take less than one ulp of the clock: its
        // finish then rounds to `now`, `advance(now)` cannot move, and the check would repeat
        // at the same instant forever. One ulp more finishes it.
        if finished.is_empty() && link.next_finish().is_some_and(|t| t <= now) {
            finished = link.advance(now.next_up());
        }
        self.links[l].version += 1;
        let mut done = Vec::new();
        self.finish_flows(finished, &mut done);
        Some(done)
    }

    /// When link `l` next finishes a flow, with the version that check must carry.
    pub(crate) fn next_check(&self, l: usize) -> Option<(f64, u64)> {
        let link = &self.links[l];
        link.link.next_finish().map(|t| (t, link.version))
    }

    fn finish_flows(&mut self, flows: Vec<u64>, done: &mut Vec<T>) {
        for f in flows {
            let Some(t) = self.transfers.get_mut(&f) else {
                continue;
            };
            t.pending = t.pending.saturating_sub(1);
            if t.pending == 0 {
                done.extend(self.transfers.remove(&f).map(|t| t.tag));
            }
        }
    }
}

/// What [`Links::start`] changed.
#[derive(Debug)]
pub(crate) struct Started<T> {
    pub done: Vec<T>,
    pub changed: Vec<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transfer_over_two_links_ends_when_the_slower_share_does() {
        let mut l = Links::new();
        let a = l.add(10.0);
        let b = l.add(10.0);
        // Another flow already shares `b`: the two-link transfer gets half of b.
        let s = l.start(0.0, &[b], 10, "other");
        assert!(s.done.is_empty());
        let s = l.start(0.0, &[a, b], 10, "pull");
        assert!(s.done.is_empty());
        // a alone: done at 1.0; b shared: both flows done at 2.0.
        let (ta, va) = l.next_check(a).unwrap();
        assert!((ta - 1.0).abs() < 1e-9);
        assert_eq!(l.check(ta, a, va).unwrap(), Vec::<&str>::new());
        let (tb, vb) = l.next_check(b).unwrap();
        assert!((tb - 2.0).abs() < 1e-9);
        let mut done = l.check(tb, b, vb).unwrap();
        done.sort();
        assert_eq!(done, ["other", "pull"]);
        // A stale check is ignored.
        assert!(l.check(3.0, b, vb).is_none());
        let s = l.start(3.0, &[a], 0, "empty");
        assert_eq!(s.done, ["empty"]);
    }

    #[test]
    fn a_flow_shorter_than_the_clocks_resolution_still_finishes() {
        // 1 byte at 1 TB/s takes 1e-12 s, below one ulp of t = 1e6 s (1.2e-10 s): its finish
        // rounds to the start, and the check there must still finish it.
        let mut l = Links::new();
        let a = l.add(1e12);
        let s = l.start(1e6, &[a], 1, "tiny");
        assert!(s.done.is_empty());
        let (t, v) = l.next_check(a).unwrap();
        assert_eq!(t, 1e6);
        assert_eq!(l.check(t, a, v).unwrap(), ["tiny"]);
        assert!(l.next_check(a).is_none());
    }
}
