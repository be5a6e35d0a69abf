//! Host capacity: what live instances hold of this host. Each live instance commits its memory
//! limit, its cpus and one instance slot for as long as it lives ([`Commitment`]); a commit that
//! would go past the host's capacity is refused with the resource that is short, and the
//! registry then evicts idle instances of other functions (pool `Registry::commit`).

use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::config::CapacityConfig;

/// The agent's descriptors one live Lambda instance holds (measured with 1,000: its Runtime API
/// listener and connection, three pipes, two pidfds and its peak-memory file).
pub const FDS_PER_INSTANCE: u64 = 8;

/// How many live instances an open-file limit of `nofile` holds, beside 1,024 connections and
/// 512 descriptors for logs and the store.
pub fn instances_within(nofile: u64) -> u64 {
    nofile.saturating_sub(1024 + 512) / FDS_PER_INSTANCE
}

/// What one instance commits while it lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Need {
    pub memory_bytes: u64,
    /// Thousandths of a cpu.
    pub cpu_millis: u64,
}

impl Need {
    pub fn of(memory_mb: u64, cpus: f64) -> Need {
        Need {
            memory_bytes: memory_mb << 20,
            cpu_millis: (cpus * 1000.0).round().max(1.0) as u64,
        }
    }
}

/// Amounts of each resource: a host's capacity, or what is committed of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Amounts {
    pub memory_bytes: u64,
    pub cpu_millis: u64,
    pub instances: u64,
}

impl Amounts {
    /// The capacity `config` gives a host with `mem_total` bytes of memory and `cores` cpus.
    pub fn for_host(config: &CapacityConfig, mem_total: u64, cores: u64) -> Amounts {
        let memory_bytes = if config.memory_mb > 0 {
            config.memory_mb << 20
        } else {
            let share = u128::from(mem_total) * u128::from(config.memory_percent) / 100;
            u64::try_from(share)
                .unwrap_or(u64::MAX)
                .saturating_sub(config.memory_reserve_mb << 20)
        };
        Amounts {
            memory_bytes,
            cpu_millis: cores.max(1) * 1000 * u64::from(config.cpu_percent) / 100,
            instances: config.max_instances,
        }
    }

    /// This host's capacity: MemTotal from /proc/meminfo, the cpus this process may use.
    pub fn of_this_host(config: &CapacityConfig) -> Amounts {
        let mem_total = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| mem_total(&t))
            .unwrap_or_else(|| {
                tracing::warn!(
                    "MemTotal not readable from /proc/meminfo: capacity.memory_mb applies alone"
                );
                0
            });
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        Amounts::for_host(config, mem_total, cores)
    }
}

/// MemTotal in bytes from /proc/meminfo's text.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// Why an instance cannot be committed: the resource that is short, in the config key's terms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Shortfall {
    #[error(
        "host memory capacity reached: live instances' limits hold {} of {} MiB (capacity.memory_mb / memory_percent) and this instance needs {} MiB",
        committed >> 20, capacity >> 20, need >> 20
    )]
    Memory {
        need: u64,
        committed: u64,
        capacity: u64,
    },
    #[error(
        "host cpu capacity reached: live instances hold {:.2} of {:.2} cpus (capacity.cpu_percent) and this instance needs {:.2}",
        *committed as f64 / 1000.0, *capacity as f64 / 1000.0, *need as f64 / 1000.0
    )]
    Cpu {
        need: u64,
        committed: u64,
        capacity: u64,
    },
    #[error(
        "host instance limit reached: {committed} instances live of capacity.max_instances {capacity}"
    )]
    Instances { committed: u64, capacity: u64 },
}

impl Shortfall {
    /// The resource that is short: memory, cpu or instances.
    pub fn resource(&self) -> &'static str {
        match self {
            Shortfall::Memory { .. } => "memory",
            Shortfall::Cpu { .. } => "cpu",
            Shortfall::Instances { .. } => "instances",
        }
    }
}

/// The host's capacity and what live instances have committed of it.
#[derive(Debug)]
pub struct Capacity {
    capacity: Amounts,
    committed: Mutex<Amounts>,
    /// Told when a commitment is released: a caller waiting for room tries again.
    pub released: tokio::sync::Notify,
}

impl Capacity {
    pub fn new(capacity: Amounts) -> Capacity {
        Capacity {
            capacity,
            committed: Mutex::new(Amounts::default()),
            released: tokio::sync::Notify::new(),
        }
    }

    /// Room for everything (unit tests, the CLI's sandbox).
    pub fn unlimited() -> Capacity {
        Capacity::new(Amounts {
            memory_bytes: u64::MAX,
            cpu_millis: u64::MAX,
            instances: u64::MAX,
        })
    }

    pub fn capacity(&self) -> Amounts {
        self.capacity
    }

    pub fn committed(&self) -> Amounts {
        *self.committed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits `need` for one instance, or says which resource is short.
    pub fn try_commit(self: &Arc<Self>, need: Need) -> Result<Commitment, Shortfall> {
        let mut c = self.committed.lock().unwrap_or_else(|p| p.into_inner());
        let cap = &self.capacity;
        if c.instances >= cap.instances {
            return Err(Shortfall::Instances {
                committed: c.instances,
                capacity: cap.instances,
            });
        }
        if c.memory_bytes.saturating_add(need.memory_bytes) > cap.memory_bytes {
            return Err(Shortfall::Memory {
                need: need.memory_bytes,
                committed: c.memory_bytes,
                capacity: cap.memory_bytes,
            });
        }
        if c.cpu_millis.saturating_add(need.cpu_millis) > cap.cpu_millis {
            return Err(Shortfall::Cpu {
                need: need.cpu_millis,
                committed: c.cpu_millis,
                capacity: cap.cpu_millis,
            });
        }
        c.memory_bytes += need.memory_bytes;
        c.cpu_millis += need.cpu_millis;
        c.instances += 1;
        Ok(Commitment {
            capacity: self.clone(),
            need,
        })
    }

    /// Whether `need` fits now without committing it, counting `freeable` (what evicting idle
    /// instances would give back) as free.
    pub fn fits_with(&self, need: Need, freeable: Amounts) -> bool {
        let c = self.committed();
        let cap = &self.capacity;
        c.instances.saturating_sub(freeable.instances) < cap.instances
            && c.memory_bytes
                .saturating_sub(freeable.memory_bytes)
                .saturating_add(need.memory_bytes)
                <= cap.memory_bytes
            && c.cpu_millis
                .saturating_sub(freeable.cpu_millis)
                .saturating_add(need.cpu_millis)
                <= cap.cpu_millis
    }

    /// Whether `need` could ever fit (on an empty host).
    pub fn fits_at_all(&self, need: Need) -> bool {
        need.memory_bytes <= self.capacity.memory_bytes
            && need.cpu_millis <= self.capacity.cpu_millis
            && self.capacity.instances > 0
    }

    fn release(&self, need: Need) {
        {
            let mut c = self.committed.lock().unwrap_or_else(|p| p.into_inner());
            c.memory_bytes = c.memory_bytes.saturating_sub(need.memory_bytes);
            c.cpu_millis = c.cpu_millis.saturating_sub(need.cpu_millis);
            c.instances = c.instances.saturating_sub(1);
        }
        self.released.notify_waiters();
    }
}

/// One live instance's share of the host, given back when dropped.
#[derive(Debug)]
pub struct Commitment {
    capacity: Arc<Capacity>,
    need: Need,
}

impl Drop for Commitment {
    fn drop(&mut self) {
        self.capacity.release(self.need);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_a_share_of_memtotal_less_the_reserve() {
        let c = CapacityConfig::default();
        let a = Amounts::for_host(&c, 24 << 30, 2);
        assert_eq!(a.memory_bytes, (24u64 << 30) * 9 / 10 - (512 << 20));
        assert_eq!(a.cpu_millis, 32_000);
        assert_eq!(a.instances, 2048);
        let fixed = CapacityConfig {
            memory_mb: 256,
            ..c.clone()
        };
        assert_eq!(
            Amounts::for_host(&fixed, 24 << 30, 2).memory_bytes,
            256 << 20
        );
        // A host smaller than the reserve has no room rather than a wrapped-around one.
        assert_eq!(Amounts::for_host(&c, 256 << 20, 1).memory_bytes, 0);
        assert_eq!(
            mem_total("MemTotal:       24576000 kB\nMemFree: 1 kB\n"),
            Some(24_576_000 * 1024)
        );
        assert_eq!(mem_total("nothing"), None);
        // systemd's LimitNOFILE=1048576 holds the default 2,048; 20,000 holds 2,308.
        assert!(instances_within(1_048_576) > 2048);
        assert_eq!(instances_within(20_000), 2308);
        assert_eq!(instances_within(1000), 0);
    }

    #[test]
    fn commitments_are_refused_past_capacity_and_given_back_on_drop() {
        let cap = Arc::new(Capacity::new(Amounts {
            memory_bytes: 100 << 20,
            cpu_millis: 1500,
            instances: 3,
        }));
        let a = cap.try_commit(Need::of(64, 0.5)).unwrap();
        let err = cap.try_commit(Need::of(64, 0.5)).unwrap_err();
        assert_eq!(err.resource(), "memory");
        assert!(err.to_string().contains("64 of 100 MiB"), "{err}");
        let b = cap.try_commit(Need::of(32, 1.0)).unwrap();
        let err = cap.try_commit(Need::of(1, 0.01)).unwrap_err();
        assert_eq!(err.resource(), "cpu", "{err}");
        drop(a);
        let c = cap.try_commit(Need::of(16, 0.01)).unwrap();
        let d = cap.try_commit(Need::of(16, 0.01)).unwrap();
        let err = cap.try_commit(Need::of(16, 0.01)).unwrap_err();
        assert_eq!(err.resource(), "instances", "{err}");
        assert_eq!(cap.committed().instances, 3);
        drop((b, c, d));
        assert_eq!(cap.committed(), Amounts::default());
        assert!(!cap.fits_at_all(Need::of(128, 0.1)));
        // Not committing: what evicting would free counts as free.
        let full = Arc::new(Capacity::new(Amounts {
            memory_bytes: 128 << 20,
            cpu_millis: 4000,
            instances: 10,
        }));
        let held = full.try_commit(Need::of(96, 1.0)).unwrap();
        assert!(!full.fits_with(Need::of(64, 1.0), Amounts::default()));
        assert!(full.fits_with(Need::of(32, 1.0), Amounts::default()));
        let one_idle = Amounts {
            memory_bytes: 96 << 20,
            cpu_millis: 1000,
            instances: 1,
        };
        assert!(full.fits_with(Need::of(64, 1.0), one_idle));
        assert!(!full.fits_with(Need::of(160, 1.0), one_idle));
        assert_eq!(full.committed().instances, 1);
        drop(held);
    }
}
