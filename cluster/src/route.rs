//! Which host runs a function: rendezvous (highest random weight) ranking of the live hosts by
//! a stable hash, and bounded-load selection over that ranking.
//!
//! **Ranking.** Each host gets a weight for the function, [`weight`]: seahash 4.1
//! (`seahash::hash`) of the node id's UTF-8 bytes, one `0x00` byte, and the function name's
//! UTF-8 bytes. Hosts rank by weight, highest first; equal weights by node id, bytewise
//! ascending. Every host computes the same ranking from the same member list, whatever order it
//! holds it in. When a host joins, it takes first place for about 1/(N+1) of the functions and
//! nothing else moves; when one leaves, only the functions it ranked first for move.
//!
//! **Bounded load** (Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing with Bounded Loads";
//! HAProxy's `hash-balance-factor`): with `n` hosts carrying `total` calls in flight, the
//! capacity of a host is `ceil(factor × (total + 1) / n)` — the mean counts the call being
//! placed. The call goes to the first host in rank order whose load, counting this call, stays
//! within capacity (`load + 1 <= capacity`). Such a host always exists when `factor >= 1`, so
//! no host ever carries more than `factor` times the mean, and a function stays on its first
//! host until that host is loaded past the others.

/// The hash input separator: node ids and function names hold no NUL byte, so
/// `(node, function)` pairs map to distinct inputs.
const SEPARATOR: u8 = 0x00;

/// The rendezvous weight of `node_id` for `function`: seahash of `node_id ++ 0x00 ++ function`.
pub fn weight(node_id: &str, function: &str) -> u64 {
    let mut input = Vec::with_capacity(node_id.len() + 1 + function.len());
    input.extend_from_slice(node_id.as_bytes());
    input.push(SEPARATOR);
    input.extend_from_slice(function.as_bytes());
    seahash::hash(&input)
}

/// The hosts ranked for `function`, best first; each host once, whatever the input order or
/// repeats.
pub fn rank<'a>(function: &str, hosts: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let mut ranked: Vec<(u64, &str)> = hosts
        .into_iter()
        .map(|h| (weight(h, function), h))
        .collect();
    ranked.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    ranked.dedup_by(|a, b| a.1 == b.1);
    ranked.into_iter().map(|(_, h)| h).collect()
}

/// How far above the mean a host's load may go, in percent (125: HAProxy's
/// `hash-balance-factor 125`, 1.25 times the mean).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct BalanceFactor(u32);

/// A balance factor below 100 % leaves calls nowhere to go.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the balance factor is a percentage of the mean load of at least 100, not {0}")]
pub struct BadBalanceFactor(pub u32);

impl BalanceFactor {
    /// 1.25 times the mean.
    pub const DEFAULT: BalanceFactor = BalanceFactor(125);

    /// A factor of `percent` / 100; at least 100.
    pub fn new(percent: u32) -> Result<Self, BadBalanceFactor> {
        if percent < 100 {
            Err(BadBalanceFactor(percent))
        } else {
            Ok(BalanceFactor(percent))
        }
    }

    /// The factor in percent.
    pub fn percent(self) -> u32 {
        self.0
    }
}

impl Default for BalanceFactor {
    fn default() -> Self {
        BalanceFactor::DEFAULT
    }
}

/// A live host and its calls in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host<'a> {
    /// Its node id.
    pub id: &'a str,
    /// Calls it is running now.
    pub load: u32,
}

/// Where a call goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick<'a> {
    /// The host's node id.
    pub host: &'a str,
    /// Its place in the ranking: 0 for the function's first host.
    pub rank: usize,
    /// The capacity each host had for this call: `ceil(factor × (total + 1) / n)`.
    pub capacity: u64,
}

/// The capacity of each of `hosts` hosts carrying `total_load` calls, for one more call:
/// `ceil(factor × (total_load + 1) / hosts)`. `hosts` must not be 0.
pub fn capacity(total_load: u64, hosts: usize, factor: BalanceFactor) -> u64 {
    let num = u128::from(factor.0) * (u128::from(total_load) + 1);
    let den = 100 * hosts.max(1) as u128;
    u64::try_from(num.div_ceil(den)).unwrap_or(u64::MAX)
}

/// The host for a call to `function`: the first in rank order whose load, counting this call,
/// is within capacity. `None` only when `hosts` is empty. A host listed twice counts once, with
/// the larger of its loads.
pub fn pick<'a>(function: &str, hosts: &[Host<'a>], factor: BalanceFactor) -> Option<Pick<'a>> {
    let mut loads: std::collections::BTreeMap<&'a str, u32> = std::collections::BTreeMap::new();
    for h in hosts {
        let l = loads.entry(h.id).or_default();
        *l = (*l).max(h.load);
    }
    let total: u64 = loads.values().map(|&l| u64::from(l)).sum();
    let capacity = capacity(total, loads.len(), factor);
    rank(function, loads.keys().copied())
        .into_iter()
        .enumerate()
        .find(|(_, h)| u64::from(loads[h]) < capacity)
        .map(|(rank, host)| Pick {
            host,
            rank,
            capacity,
        })
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn weights_are_pinned() {
        // The exact values: every host (and any other implementation) must compute these.
        assert_eq!(weight("node-a", "hello"), seahash::hash(b"node-a\0hello"));
        // seahash's own reference vector: the crate still computes seahash.
        assert_eq!(seahash::hash(b"to be or not to be"), 1988685042348123509);
        assert_eq!(weight("node-a", "hello"), 0x95a0_596a_2e87_190b);
        assert_eq!(weight("node-b", "hello"), 0x2ecf_6618_c713_dc07);
        assert_ne!(weight("ab", "c"), weight("a", "bc"));
    }

    #[test]
    fn capacity_counts_the_call_being_placed() {
        let f = BalanceFactor::DEFAULT;
        // No load, 4 hosts: mean 1/4, capacity ceil(1.25/4) = 1.
        assert_eq!(capacity(0, 4, f), 1);
        // 10 calls on 4 hosts: ceil(1.25 * 11 / 4) = ceil(3.4375) = 4.
        assert_eq!(capacity(10, 4, f), 4);
        assert_eq!(capacity(7, 2, BalanceFactor::new(100).unwrap()), 4);
        assert!(BalanceFactor::new(99).is_err());
        assert_eq!(
            capacity(u64::MAX, 1, BalanceFactor::new(u32::MAX).unwrap()),
            u64::MAX
        );
    }

    #[test]
    fn the_first_host_takes_calls_until_it_is_loaded_past_the_others() {
        let ids = ["a", "b", "c", "d"];
        let order = rank("f", ids);
        let mut loads: BTreeMap<&str, u32> = ids.iter().map(|&i| (i, 0)).collect();
        let hosts = |loads: &BTreeMap<&'static str, u32>| {
            loads
                .iter()
                .map(|(&id, &load)| Host { id, load })
                .collect::<Vec<_>>()
        };
        let p = pick("f", &hosts(&loads), BalanceFactor::DEFAULT).unwrap();
        assert_eq!((p.host, p.rank), (order[0], 0));
        // 3 calls on the first host, none elsewhere: capacity ceil(1.25 * 4 / 4) = 2, so the
        // next call goes to the second host.
        loads.insert(order[0], 3);
        let p = pick("f", &hosts(&loads), BalanceFactor::DEFAULT).unwrap();
        assert_eq!((p.host, p.rank, p.capacity), (order[1], 1, 2));
        assert_eq!(pick("f", &[], BalanceFactor::DEFAULT), None);
    }

    fn node_ids(n: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = Vec<String>> {
        proptest::collection::btree_set("[a-z][a-z0-9-]{0,11}", n)
            .prop_map(|s| s.into_iter().collect())
    }

    const NAMES: usize = 10_000;

    fn function_names() -> Vec<String> {
        (0..NAMES).map(|i| format!("fn-{i}")).collect()
    }

    /// Whether the share moved is within 5 standard deviations of `p` over `NAMES` names.
    fn near(moved: usize, p: f64) -> bool {
        let share = moved as f64 / NAMES as f64;
        let sigma = (p * (1.0 - p) / NAMES as f64).sqrt();
        (share - p).abs() <= 5.0 * sigma
    }

    proptest! {
        /// Same inputs, same answers, whatever order (and repeats) the hosts come in; every
        /// host is ranked once.
        #[test]
        fn ranking_and_picks_ignore_host_order(
            ids in node_ids(1..=12),
            loads in proptest::collection::vec(0u32..20, 12),
            function in "[a-z0-9-]{1,20}",
            seed in any::<u64>(),
        ) {
            let hosts: Vec<Host> = ids.iter().zip(&loads).map(|(id, &load)| Host { id, load }).collect();
            let mut shuffled = hosts.clone();
            let mut s = seed;
            for i in (1..shuffled.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (s >> 33) as usize % (i + 1));
            }
            shuffled.extend_from_slice(&hosts[..hosts.len() / 2]);
            let a = rank(&function, hosts.iter().map(|h| h.id));
            let b = rank(&function, shuffled.iter().map(|h| h.id));
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(a.len(), ids.len());
            prop_assert_eq!(a.iter().copied().collect::<BTreeSet<&str>>(), ids.iter().map(String::as_str).collect::<BTreeSet<&str>>());
            prop_assert_eq!(
                pick(&function, &hosts, BalanceFactor::DEFAULT),
                pick(&function, &shuffled, BalanceFactor::DEFAULT)
            );
        }

        /// The pick is the first host in rank order within capacity, the capacity is
        /// ceil(factor × mean) with the mean counting the call, and one always exists.
        #[test]
        fn the_bound_holds(
            ids in node_ids(1..=10),
            loads in proptest::collection::vec(0u32..50, 10),
            factor in 100u32..300,
            function in "[a-z0-9-]{1,20}",
        ) {
            let factor = BalanceFactor::new(factor).unwrap();
            let hosts: Vec<Host> = ids.iter().zip(&loads).map(|(id, &load)| Host { id, load }).collect();
            let p = pick(&function, &hosts, factor).unwrap();
            let total: u64 = hosts.iter().map(|h| u64::from(h.load)).sum();
            let mean = (total + 1) as f64 / hosts.len() as f64;
            prop_assert_eq!(p.capacity as f64, (f64::from(factor.percent()) / 100.0 * mean - 1e-9).ceil());
            let load = |id: &str| u64::from(hosts.iter().find(|h| h.id == id).unwrap().load);
            let with_this_call = load(p.host) + 1;
            prop_assert!(with_this_call <= p.capacity);
            let ranked = rank(&function, hosts.iter().map(|h| h.id));
            prop_assert_eq!(ranked[p.rank], p.host);
            for h in &ranked[..p.rank] {
                prop_assert!(load(h) + 1 > p.capacity, "{} was within capacity", h);
            }
        }

        /// Placing calls one after another (none finishing) never loads a host past
        /// ceil(factor × mean).
        #[test]
        fn placed_calls_stay_within_the_bound(
            ids in node_ids(2..=8),
            functions in proptest::collection::vec("[a-c]{1,2}", 1..300),
        ) {
            let mut loads: BTreeMap<&str, u32> = ids.iter().map(|i| (i.as_str(), 0)).collect();
            for (placed, f) in functions.iter().enumerate() {
                let hosts: Vec<Host> = loads.iter().map(|(&id, &load)| Host { id, load }).collect();
                let p = pick(f, &hosts, BalanceFactor::DEFAULT).unwrap();
                *loads.get_mut(p.host).unwrap() += 1;
                let bound = capacity(placed as u64, ids.len(), BalanceFactor::DEFAULT);
                prop_assert!(loads.values().all(|&l| u64::from(l) <= bound));
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// A host joining N hosts takes about 1/(N+1) of 10,000 functions, and only functions
        /// move to it; a host leaving moves exactly the functions it ranked first for.
        #[test]
        fn joins_and_leaves_move_about_one_nth(ids in node_ids(2..=10)) {
            let names = function_names();
            let (joiner, before) = ids.split_last().unwrap();
            let first = |hosts: &[String], f: &str| rank(f, hosts.iter().map(String::as_str))[0].to_owned();
            let mut moved = 0;
            for f in &names {
                let was = first(before, f);
                let now = first(&ids, f);
                if was != now {
                    prop_assert_eq!(&now, joiner);
                    moved += 1;
                }
            }
            let p = 1.0 / ids.len() as f64;
            prop_assert!(near(moved, p), "{} of {} moved, expected about {:.0}", moved, NAMES, p * NAMES as f64);

            // The leaver: the first host of the list.
            let (leaver, after) = ids.split_first().unwrap();
            for f in &names {
                let was = first(&ids, f);
                let now = first(after, f);
                prop_assert!(was == now || was == *leaver, "{} moved from {} to {}", f, was, now);
            }
        }
    }
}
