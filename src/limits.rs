//! Hand-written rather than `governor`: a failure budget needs `give_back` (taken before the
//! attempt, returned on success), which GCRA limiters have no operation for, and every rule here
//! runs on the injected clock.
//!
//! Per-client throttling in memory: token buckets per (route, client IP) and per username for
//! failed password logins, and the client address itself (`X-Forwarded-For` is believed only
//! from `trusted_proxies`). Memory is bounded: at `max_entries` the table sheds buckets that
//! carry no state (refilled), then the least recently used.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, PoisonError};

use ipnet::IpNet;

use crate::clock::UnixTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Tokens added per minute; 0 turns the limit off.
    pub per_minute: u32,
    /// Bucket size: how many requests may come at once.
    pub burst: u32,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: UnixTime,
}

/// Token buckets keyed by `K`, one per key, bounded to `max_entries`.
pub struct Buckets<K> {
    rate: Rate,
    max_entries: usize,
    table: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    pub fn new(rate: Rate, max_entries: usize) -> Self {
        Self {
            rate,
            max_entries: max_entries.max(1),
            table: Mutex::new(HashMap::new()),
        }
    }

    fn refilled(&self, bucket: Bucket, now: UnixTime) -> Bucket {
        let elapsed = now.saturating_sub(bucket.updated) as f64;
        let tokens = (bucket.tokens + elapsed * f64::from(self.rate.per_minute) / 60.0)
            .min(f64::from(self.rate.burst));
        Bucket {
            tokens,
            updated: now.max(bucket.updated),
        }
    }

    /// Seconds until a token is available.
    fn wait(&self, bucket: Bucket) -> u64 {
        let missing = 1.0 - bucket.tokens;
        ((missing * 60.0 / f64::from(self.rate.per_minute)).ceil() as u64).max(1)
    }

    /// Takes one token for `key`, or says how many seconds until one is available.
    pub fn take(&self, key: &K, now: UnixTime) -> Result<(), u64> {
        if self.rate.per_minute == 0 {
            return Ok(());
        }
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let full = Bucket {
            tokens: f64::from(self.rate.burst),
            updated: now,
        };
        let bucket = table.get(key).map_or(full, |b| self.refilled(*b, now));
        if bucket.tokens < 1.0 {
            return Err(self.wait(bucket));
        }
        {
            if !table.contains_key(key) && table.len() >= self.max_entries {
                self.shed(&mut table, now);
            }
            table.insert(
                key.clone(),
                Bucket {
                    tokens: bucket.tokens - 1.0,
                    ..bucket
                },
            );
        }
        Ok(())
    }

    /// Returns the token a `take` spent, for limits that count only failures: the token is
    /// taken before the attempt (so parallel attempts cannot all pass a check) and given back
    /// when the attempt succeeds.
    pub fn give_back(&self, key: &K) {
        if self.rate.per_minute == 0 {
            return;
        }
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(bucket) = table.get_mut(key) {
            bucket.tokens = (bucket.tokens + 1.0).min(f64::from(self.rate.burst));
        }
    }

    /// Frees room: first the buckets that have refilled (they hold no information), then, if
    /// the table is still full (a flood of distinct clients), the least recently used half.
    fn shed(&self, table: &mut HashMap<K, Bucket>, now: UnixTime) {
        let burst = f64::from(self.rate.burst);
        table.retain(|_, b| self.refilled(*b, now).tokens < burst);
        if table.len() >= self.max_entries {
            let mut times: Vec<UnixTime> = table.values().map(|b| b.updated).collect();
            let middle = times.len() / 2;
            let (_, cutoff, _) = times.select_nth_unstable(middle);
            let cutoff = *cutoff;
            table.retain(|_, b| b.updated > cutoff);
        }
    }

    pub fn len(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The routes with a per-IP budget of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    Login,
    Register,
    Activate,
    Verify,
}

/// The per-IP limits of all throttled routes.
pub type IpLimits = Buckets<(Route, IpAddr)>;

/// The client's address: the peer, or — only when the peer is a trusted proxy — the nearest
/// address in `X-Forwarded-For` that is not itself a trusted proxy.
pub fn client_ip(
    peer: Option<SocketAddr>,
    forwarded_for: &[&str],
    trusted_proxies: &[IpNet],
) -> Option<IpAddr> {
    let peer = peer?.ip();
    let trusted = |ip: &IpAddr| trusted_proxies.iter().any(|net| net.contains(ip));
    if !trusted(&peer) {
        return Some(peer);
    }
    let hops: Vec<IpAddr> = forwarded_for
        .iter()
        .flat_map(|header| header.split(','))
        .filter_map(|hop| hop.trim().parse().ok())
        .collect();
    hops.iter()
        .rev()
        .find(|ip| !trusted(ip))
        .or(hops.first())
        .copied()
        .or(Some(peer))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: Rate = Rate {
        per_minute: 30,
        burst: 10,
    };

    #[test]
    fn a_burst_then_one_token_every_two_seconds() {
        let buckets = Buckets::new(RATE, 100);
        for _ in 0..10 {
            assert_eq!(buckets.take(&"a", 1000), Ok(()));
        }
        assert_eq!(buckets.take(&"a", 1000), Err(2));
        assert_eq!(buckets.take(&"b", 1000), Ok(()), "keys are independent");
        assert_eq!(buckets.take(&"a", 1001), Err(1));
        assert_eq!(buckets.take(&"a", 1002), Ok(()));
        assert_eq!(buckets.take(&"a", 1002), Err(2));
        assert_eq!(buckets.take(&"a", 1000 + 60), Ok(()), "refilled");
    }

    #[test]
    fn a_token_given_back_can_be_taken_again_but_never_beyond_the_burst() {
        let buckets = Buckets::new(
            Rate {
                per_minute: 30,
                burst: 1,
            },
            100,
        );
        assert_eq!(buckets.take(&"a", 0), Ok(()));
        assert_eq!(buckets.take(&"a", 0), Err(2));
        buckets.give_back(&"a");
        buckets.give_back(&"a");
        assert_eq!(buckets.take(&"a", 0), Ok(()));
        assert_eq!(buckets.take(&"a", 0), Err(2));
    }

    #[test]
    fn zero_per_minute_turns_the_limit_off() {
        let buckets = Buckets::new(
            Rate {
                per_minute: 0,
                burst: 0,
            },
            10,
        );
        for _ in 0..1000 {
            assert_eq!(buckets.take(&"a", 0), Ok(()));
        }
        assert!(buckets.is_empty());
    }

    #[test]
    fn a_flood_of_distinct_clients_stays_bounded() {
        let buckets = Buckets::new(RATE, 1000);
        for i in 0..100_000u32 {
            let _ = buckets.take(&i, u64::from(i / 100));
            assert!(buckets.len() <= 1000);
        }
        // The most recent client keeps its state.
        let last = 99_999u32;
        for _ in 0..9 {
            let _ = buckets.take(&last, 999);
        }
        assert!(buckets.take(&last, 999).is_err());
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let proxy: SocketAddr = "10.0.0.1:5000".parse().expect("addr");
        let stranger: SocketAddr = "203.0.113.9:5000".parse().expect("addr");
        let trusted: Vec<IpNet> = vec!["10.0.0.0/24".parse().expect("net")];
        let xff = ["198.51.100.7, 10.0.0.2"];
        assert_eq!(
            client_ip(Some(stranger), &xff, &trusted),
            Some(stranger.ip())
        );
        assert_eq!(
            client_ip(Some(proxy), &xff, &trusted),
            "198.51.100.7".parse().ok()
        );
        assert_eq!(
            client_ip(Some(proxy), &["garbage"], &trusted),
            Some(proxy.ip())
        );
        assert_eq!(client_ip(Some(proxy), &xff, &[]), Some(proxy.ip()));
        // A client cannot hide behind a forged left-most entry.
        let spoofed = ["1.2.3.4, 198.51.100.7"];
        assert_eq!(
            client_ip(Some(proxy), &spoofed, &trusted),
            "198.51.100.7".parse().ok()
        );
    }
}
