//! The edge of [`crate::link::SharedLink`]: one task per engine NIC that owns the pure model,
//! sleeps until the next transfer finishes, and wakes its waiter.
//!
//! A decode engine's pulls all go through its own link (the NIC it reads into), and a prefill
//! engine answers reads through its link (the NIC it is read from), so concurrent reads share
//! bandwidth at both ends as the timing model says, while each read's fixed cost (`c_xfer`) stays
//! its own.

use std::collections::HashMap;

use tokio::sync::{mpsc, oneshot};

use super::SimClock;
use crate::link::SharedLink;

struct Start {
    bytes: u64,
    done: oneshot::Sender<()>,
}

/// A cheap handle to a link task; the task ends when every handle is dropped.
#[derive(Clone, Debug)]
pub struct LinkHandle {
    tx: mpsc::UnboundedSender<Start>,
}

impl LinkHandle {
    /// Spawn the task of a link of `bytes_per_sec` (simulated time).
    pub fn spawn(bytes_per_sec: f64, clock: SimClock) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(SharedLink::new(bytes_per_sec), clock, rx));
        LinkHandle { tx }
    }

    /// Move `bytes` over the link: returns when they are through, sharing the link with every
    /// transfer that overlaps. Dropping the future gives its share back to the others.
    pub async fn transfer(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let (done, rx) = oneshot::channel();
        if self.tx.send(Start { bytes, done }).is_err() {
            return; // the engine is stopping; nothing waits for this transfer
        }
        let _ = rx.await;
    }
}

async fn run(mut link: SharedLink, clock: SimClock, mut rx: mpsc::UnboundedReceiver<Start>) {
    let mut waiters: HashMap<u64, oneshot::Sender<()>> = HashMap::new();
    let mut next_id = 0u64;
    loop {
        // Waiters that went away free their share.
        let gone: Vec<u64> = waiters
            .iter()
            .filter(|(_, w)| w.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            waiters.remove(&id);
            wake(&mut waiters, link.cancel(clock.now(), id));
        }
        let next = link.next_finish();
        tokio::select! {
            cmd = rx.recv() => {
                let Some(Start { bytes, done }) = cmd else { return };
                next_id += 1;
                waiters.insert(next_id, done);
                wake(&mut waiters, link.start(clock.now(), next_id, bytes));
            }
            _ = tokio::time::sleep_until(clock.instant_at(next.unwrap_or(0.0))), if next.is_some() => {
                // Account up to the scheduled finish even if the timer woke late, so the link's
                // books follow simulated time rather than timer jitter.
                let at = clock.now().max(next.unwrap_or(0.0));
                wake(&mut waiters, link.advance(at));
            }
        }
    }
}

fn wake(waiters: &mut HashMap<u64, oneshot::Sender<()>>, done: Vec<u64>) {
    for id in done {
        if let Some(w) = waiters.remove(&id) {
            let _ = w.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn concurrent_transfers_share_and_small_ones_do_not_queue() {
        let clock = SimClock::new(1.0);
        let link = LinkHandle::spawn(10e9, clock);
        // Eight 1 GB reads at once: together about 8·b/B = 0.8 s, each of them.
        let t0 = clock.now();
        let reads = (0..8).map(|_| {
            let l = link.clone();
            async move {
                l.transfer(1_000_000_000).await;
                clock.now() - t0
            }
        });
        let took = futures::future::join_all(reads).await;
        for t in &took {
            assert!((t - 0.8).abs() < 2e-3, "{took:?}");
        }
        // A 10 GB transfer running, then a 1 MB one: the small one is through in about twice
        // its own time, not after the large one.
        let big = {
            let l = link.clone();
            tokio::spawn(async move { l.transfer(10_000_000_000).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let t1 = clock.now();
        link.transfer(1_000_000).await;
        let small = clock.now() - t1;
        assert!(small < 2e-3, "small read took {small} s behind a large one");
        big.await.unwrap();
    }
}
