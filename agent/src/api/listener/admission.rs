//! Which accepted connections are served: at most `max_connections` open, and at most
//! `max_connections_per_ip` from one client address (one /64 for IPv6, where a client has
//! that many addresses). The agent's own health self-check always gets in.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;

/// Why a connection was closed at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    MaxConnections,
    PerIp,
}

impl Refusal {
    pub const ALL: [Refusal; 2] = [Refusal::MaxConnections, Refusal::PerIp];

    /// The `reason` label of `fnlet_connections_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::PerIp => "per_ip",
        }
    }

    /// The config key that sets the limit.
    pub fn key(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "limits.max_connections",
            Refusal::PerIp => "limits.max_connections_per_ip",
        }
    }
}

/// What one client address counts as: IPv4 addresses (IPv4-mapped IPv6 ones too) one by one,
/// IPv6 ones by their /64.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: u64,
    per_client: HashMap<IpAddr, u64>,
}

/// Open connections, in all and by client address.
#[derive(Debug)]
pub struct Admission {
    max_total: u64,
    max_per_client: u64,
    counts: Mutex<Counts>,
    /// The agent's own self-check connections, by their source address: let in past the
    /// limits, so a full table does not get the agent restarted by the systemd watchdog.
    self_checks: SelfChecks,
    open: Gauge,
}

/// An open connection; dropping it frees its place.
#[derive(Debug)]
pub struct Admitted {
    admission: Arc<Admission>,
    client: IpAddr,
}

impl Admission {
    pub fn new(
        max_total: u64,
        max_per_client: u64,
        self_checks: SelfChecks,
        open: Gauge,
    ) -> Arc<Admission> {
        Arc::new(Admission {
            max_total,
            max_per_client,
            counts: Mutex::default(),
            self_checks,
            open,
        })
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        // The counts stay consistent under a panic elsewhere: each update is one statement.
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a place for a connection from `peer`, or says why there is none.
    pub fn admit(self: &Arc<Self>, peer: SocketAddr) -> Result<Admitted, Refusal> {
        let client = client_key(peer.ip());
        let exempt = self.self_checks.contains(peer);
        let mut c = self.counts();
        let from_client = c.per_client.get(&client).copied().unwrap_or(0);
        if !exempt {
            if c.total >= self.max_total {
                return Err(Refusal::MaxConnections);
            }
            if from_client >= self.max_per_client {
                return Err(Refusal::PerIp);
            }
        }
        c.total += 1;
        c.per_client.insert(client, from_client + 1);
        drop(c);
        self.open.inc();
        Ok(Admitted {
            admission: self.clone(),
            client,
        })
    }

    /// Open connections now.
    pub fn open(&self) -> u64 {
        self.counts().total
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut c = self.admission.counts();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_client.get_mut(&self.client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_client.remove(&self.client);
            }
        }
        drop(c);
        self.admission.open.dec();
    }
}

/// Source addresses of the agent's own self-checks in progress (see
/// `systemd::self_check`): shared by the watchdog, which adds its socket's address before it
/// connects, and the listener, which lets those in whatever the limits.
#[derive(Debug, Clone, Default)]
pub struct SelfChecks(Arc<Mutex<HashSet<SocketAddr>>>);

/// A self-check's pass; dropping it ends it.
#[derive(Debug)]
pub struct SelfCheckPass {
    checks: SelfChecks,
    from: SocketAddr,
}

impl SelfChecks {
    fn set(&self) -> MutexGuard<'_, HashSet<SocketAddr>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lets connections from `from` in until the pass is dropped.
    pub fn pass(&self, from: SocketAddr) -> SelfCheckPass {
        self.set().insert(from);
        SelfCheckPass {
            checks: self.clone(),
            from,
        }
    }

    fn contains(&self, peer: SocketAddr) -> bool {
        self.set().contains(&peer)
    }
}

impl Drop for SelfCheckPass {
    fn drop(&mut self) {
        self.checks.set().remove(&self.from);
    }
}

/// At most one log line per `every` for a recurring event, counting what it left out.
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    last: Option<Instant>,
    since: u64,
}

impl Throttle {
    pub fn new(every: Duration) -> Throttle {
        Throttle {
            every,
            last: None,
            since: 0,
        }
    }

    /// The event happened; Some(times it happened since the last line, this one included)
    /// when a line is due.
    pub fn hit(&mut self, now: Instant) -> Option<u64> {
        self.since += 1;
        if self.last.is_some_and(|l| now < l + self.every) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.since))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn admission(total: u64, per: u64) -> (Arc<Admission>, SelfChecks, Gauge) {
        let checks = SelfChecks::default();
        let open = Gauge::default();
        (
            Admission::new(total, per, checks.clone(), open.clone()),
            checks,
            open,
        )
    }

    #[test]
    fn clients_are_counted_by_address_and_ipv6_by_slash_64() {
        assert_eq!(
            client_key("10.1.2.3".parse().unwrap()),
            "10.1.2.3".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client_key("::ffff:10.1.2.3".parse().unwrap()),
            "10.1.2.3".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client_key("2001:db8:1:2:aaaa:bbbb:cccc:dddd".parse().unwrap()),
            "2001:db8:1:2::".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn a_client_past_its_limit_is_refused_and_others_are_not() {
        let (a, _, open) = admission(10, 2);
        let one = a.admit(addr("127.0.0.2:1000")).unwrap();
        let _two = a.admit(addr("127.0.0.2:1001")).unwrap();
        assert_eq!(a.admit(addr("127.0.0.2:1002")).unwrap_err(), Refusal::PerIp);
        // Another port of the same /64 is the same client.
        let _v6 = a.admit(addr("[2001:db8::1]:1")).unwrap();
        let _v6b = a.admit(addr("[2001:db8::2]:1")).unwrap();
        assert_eq!(
            a.admit(addr("[2001:db8::3]:1")).unwrap_err(),
            Refusal::PerIp
        );
        let _other = a.admit(addr("127.0.0.1:5")).unwrap();
        assert_eq!(open.get(), 5);
        drop(one);
        let _again = a.admit(addr("127.0.0.2:1003")).unwrap();
        assert_eq!(a.open(), 5);
        assert_eq!(open.get(), 5);
    }

    #[test]
    fn past_the_total_everyone_is_refused_until_one_closes() {
        let (a, _, open) = admission(3, 10);
        let held: Vec<_> = (0..3)
            .map(|i| a.admit(addr(&format!("127.0.0.{}:80", i + 2))).unwrap())
            .collect();
        assert_eq!(
            a.admit(addr("127.0.0.9:80")).unwrap_err(),
            Refusal::MaxConnections
        );
        drop(held);
        assert_eq!(a.open(), 0);
        assert_eq!(open.get(), 0);
        assert!(
            a.counts().per_client.is_empty(),
            "freed clients are forgotten"
        );
        assert!(a.admit(addr("127.0.0.9:80")).is_ok());
    }

    #[test]
    fn a_self_check_gets_in_past_both_limits_while_its_pass_lasts() {
        let (a, checks, _) = admission(1, 1);
        let _full = a.admit(addr("127.0.0.1:1")).unwrap();
        let me = addr("127.0.0.1:40000");
        assert!(a.admit(me).is_err());
        let pass = checks.pass(me);
        let admitted = a.admit(me).unwrap();
        assert_eq!(a.open(), 2);
        drop(pass);
        drop(admitted);
        assert!(a.admit(me).is_err(), "the pass is gone");
        assert_eq!(a.open(), 1);
    }

    #[test]
    fn the_throttle_logs_once_per_period_with_the_count_since() {
        let t0 = Instant::now();
        let mut t = Throttle::new(Duration::from_secs(10));
        assert_eq!(t.hit(t0), Some(1));
        for i in 1..=4 {
            assert_eq!(t.hit(t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(t.hit(t0 + Duration::from_secs(10)), Some(5));
        assert_eq!(t.hit(t0 + Duration::from_secs(11)), None);
        assert_eq!(t.hit(t0 + Duration::from_secs(100)), Some(2));
    }
}
