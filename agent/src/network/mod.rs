//! Functions' outbound network ("egress"): the policy types, and the host side that carries
//! it out (a bridge, a veth per instance, fnlet's own nftables tables).

pub mod forward;
mod link;
pub mod nfnl;
pub mod nft;
pub mod policy;
pub mod resolve;

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use isolate::PreparedSandbox;

use crate::config::NetworkConfig;
use policy::{Dest, Egress};

/// What failed while giving an instance its network, naming the step.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("netlink: {step}: {message}")]
    Netlink { step: &'static str, message: String },
    #[error("nft: {message}")]
    Nft { message: String },
    #[error("running {tool}: {source} (is it installed?)")]
    Tool {
        tool: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("tc: {message}")]
    Tc { message: String },
    #[error(
        "network.range {range} overlaps the host's route to {route} (on {dev}): pick another range in the config"
    )]
    RangeClash {
        range: Ipv4Net,
        route: Ipv4Net,
        dev: String,
    },
    #[error("network.range: {0}")]
    Range(String),
    #[error("no free address left in network.range {0}")]
    Exhausted(Ipv4Net),
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("in the sandbox's network namespace: {0}")]
    Sandbox(#[from] isolate::IsolateError),
}

/// A function's network as the agent runs it: only for egress other than "none".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionNetwork {
    pub function: String,
    pub egress: Egress,
    pub rate_mbit: Option<u32>,
    pub max_connections: u32,
}

impl FunctionNetwork {
    /// The function's network from its manifest and the agent's defaults; None for "none".
    pub fn of(
        function: &str,
        manifest: Option<&policy::NetworkManifest>,
        config: &NetworkConfig,
    ) -> Option<FunctionNetwork> {
        let spec = manifest
            .and_then(|m| m.egress.as_ref())
            .unwrap_or(&config.default_egress);
        // Both were checked when parsed: a bad one here means no network, never more.
        let egress = spec.parse().ok().filter(|e| !e.is_none())?;
        Some(FunctionNetwork {
            function: function.to_string(),
            egress,
            rate_mbit: manifest.and_then(|m| m.rate_mbit),
            max_connections: manifest
                .and_then(|m| m.max_connections)
                .unwrap_or(config.max_connections),
        })
    }
}

/// The file bound at /etc/resolv.conf in instances with egress.
pub fn resolv_conf_path(state_dir: &Path) -> PathBuf {
    state_dir.join("resolv.conf")
}

/// How long a resolved host name rule is trusted before it is resolved again.
const RESOLVE_EVERY: Duration = Duration::from_secs(60);

/// The host side of functions' egress: the bridge, fnlet's nftables tables, the address pool.
/// Nothing on the host changes until the first instance with egress is prepared; [`Network::stop`]
/// removes it all, and [`Network::reap_stale`] what a crashed agent left.
pub struct Network {
    bridge: String,
    range: Ipv4Net,
    gateway: Ipv4Net,
    resolv_conf: PathBuf,
    /// `network.dns` (port 53): host names in rules are resolved with these when set.
    dns: Vec<SocketAddr>,
    runtime: tokio::runtime::Handle,
    state: Mutex<State>,
    /// nf_tables over netlink, for instances' entries (open while the network is up).
    nftables: Mutex<Option<nfnl::Nftables>>,
    forwarding: forward::Forwarding,
    /// Leases given back, released by the cleanup thread.
    cleanup: Mutex<Option<std::sync::mpsc::Sender<Released>>>,
    cleanup_done: Mutex<Option<std::thread::JoinHandle<()>>>,
}

#[derive(Default)]
struct State {
    up: Option<Up>,
    used: HashSet<Ipv4Addr>,
    next: u32,
    /// Function -> the rules installed for it, and when its names were resolved.
    installed: HashMap<String, (FunctionNetwork, nft::Allow, Instant)>,
    /// Function -> its instances holding a lease (alive, or being released).
    leases: HashMap<String, usize>,
    /// Functions removed, or whose active version has no egress: their chains and counters go
    /// once their last lease is released. Kept until a version with egress is active again,
    /// so that a sandbox of an old version still being prepared cannot leave them behind.
    retired: HashSet<String>,
}

struct Up {
    host: rtnetlink::Handle,
    bridge_index: u32,
}

/// What a finished instance gives back.
struct Released {
    function: String,
    addr: Ipv4Addr,
    host_if: String,
}

/// One instance's network: released (veth, firewall entries, conntrack entries, address) when
/// dropped, which [`PreparedSandbox::attach`] does once the sandbox has ended.
pub struct Lease {
    released: Option<Released>,
    network: Arc<Network>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(r) = self.released.take() {
            self.network.give_back(r);
        }
    }
}

/// A bridge name: 1-8 of a-z and 0-9, starting with a letter (instances' veths are
/// `NAME-N`, which must fit the kernel's 15 characters).
pub fn valid_bridge_name(name: &str) -> bool {
    let b = name.as_bytes();
    (1..=8).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

/// The instances' range: an IPv4 network of /12 to /26 written without host bits.
pub fn parse_range(text: &str) -> Result<Ipv4Net, String> {
    let net: Ipv4Net = text
        .parse()
        .map_err(|_| format!("{text:?} is not an IPv4 network like 100.72.0.0/16"))?;
    if net.trunc() != net {
        return Err(format!(
            "{text:?} has host bits set: the network is {}",
            net.trunc()
        ));
    }
    if !(12..=26).contains(&net.prefix_len()) {
        return Err(format!("{text:?} must be a /12 to /26"));
    }
    Ok(net)
}

impl Network {
    /// The network as configured (`config` was checked when loaded); changes nothing on the
    /// host. Needs a tokio runtime (netlink runs on it).
    pub fn new(config: &NetworkConfig, state_dir: &Path) -> Result<Arc<Network>, NetworkError> {
        let range = parse_range(&config.range).map_err(NetworkError::Range)?;
        let first = range.hosts().next().unwrap_or(range.network());
        let gateway = Ipv4Net::new(first, range.prefix_len()).unwrap_or(range);
        let resolv_conf = resolv_conf_path(state_dir);
        write_file(&resolv_conf, &resolv_conf_text(&config.dns))?;
        let net = Arc::new(Network {
            bridge: config.bridge.clone(),
            range,
            gateway,
            resolv_conf,
            dns: config
                .dns
                .iter()
                .filter_map(|d| d.parse::<Ipv4Addr>().ok())
                .map(|a| SocketAddr::from((a, 53)))
                .collect(),
            runtime: tokio::runtime::Handle::current(),
            state: Mutex::new(State::default()),
            nftables: Mutex::new(None),
            forwarding: forward::Forwarding::host(state_dir),
            cleanup: Mutex::new(None),
            cleanup_done: Mutex::new(None),
        });
        let (tx, rx) = std::sync::mpsc::channel::<Released>();
        let worker = Arc::downgrade(&net);
        let done = std::thread::Builder::new()
            .name("fnlet-net-cleanup".into())
            .spawn(move || {
                while let Ok(r) = rx.recv() {
                    let Some(net) = worker.upgrade() else { break };
                    net.release(r);
                }
            })
            .map_err(|source| NetworkError::Tool {
                tool: "a cleanup thread",
                source,
            })?;
        *net.cleanup.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        *net.cleanup_done.lock().unwrap_or_else(|p| p.into_inner()) = Some(done);
        Ok(net)
    }

    /// The file bound at /etc/resolv.conf in instances with egress.
    pub fn resolv_conf(&self) -> &Path {
        &self.resolv_conf
    }

    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The bridge's own address (the instances' gateway).
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway.addr()
    }

    /// Whether network.range overlaps a route of the host (said at start; instances with egress
    /// are refused while it does).
    pub fn check_range(&self) -> Result<(), NetworkError> {
        check_routes(self.range, &self.bridge)
    }

    /// Removes what a crashed agent left: its tables, veths, bridge and conntrack entries.
    /// Blocking; call before the first instance is prepared.
    pub fn reap_stale(&self) -> Result<usize, NetworkError> {
        let mut removed = 0;
        if self.has_tables() {
            nft::apply(&nft::delete_tables(&self.bridge))?;
            removed += 1;
        }
        let bridge = self.bridge.clone();
        let prefix = format!("{bridge}-");
        removed += self.runtime.block_on(async {
            let (conn, h, _) =
                rtnetlink::new_connection().map_err(|source| NetworkError::Tool {
                    tool: "netlink",
                    source,
                })?;
            let task = tokio::spawn(conn);
            let mut n = 0;
            let r = async {
                for name in link::names_with_prefix(&h, &prefix).await? {
                    link::delete(&h, &name).await?;
                    n += 1;
                }
                if link::index(&h, &bridge).await?.is_some() {
                    link::delete(&h, &bridge).await?;
                    n += 1;
                }
                Ok::<_, NetworkError>(n)
            }
            .await;
            task.abort();
            r
        })?;
        if removed > 0 {
            flush_conntrack(&self.range.to_string());
        }
        self.restore_forwarding();
        Ok(removed)
    }

    /// Puts net.ipv4.ip_forward back as this agent (or a crashed one) found it.
    fn restore_forwarding(&self) {
        match self.forwarding.restore() {
            Ok(forward::Restored::Nothing) => {}
            Ok(forward::Restored::PutBack(v)) => {
                tracing::info!("put net.ipv4.ip_forward back to {v}, as it was found")
            }
            Ok(forward::Restored::Changed(v)) => tracing::info!(
                "net.ipv4.ip_forward was changed to {v} since the agent turned it on: left as it is"
            ),
            Err(e) => tracing::warn!("putting net.ipv4.ip_forward back: {e}"),
        }
    }

    fn has_tables(&self) -> bool {
        std::process::Command::new("nft")
            .args(["list", "table", "inet", &self.bridge])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Removes the bridge and the tables (at agent stop, after every instance ended).
    pub fn stop(&self) -> Result<(), NetworkError> {
        // Leases still being released go first.
        drop(
            self.cleanup
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        if let Some(t) = self
            .cleanup_done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = t.join();
        }
        let was_up = self
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .up
            .take()
            .is_some();
        *self.nftables.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if was_up {
            self.reap_stale()?;
        }
        Ok(())
    }

    /// Brings the bridge and the tables up (once).
    fn ensure_up(&self, state: &mut State) -> Result<(), NetworkError> {
        if state.up.is_some() {
            return Ok(());
        }
        check_routes(self.range, &self.bridge)?;
        nft::apply(&format!(
            "{}{}",
            nft::delete_tables(&self.bridge),
            nft::tables(&self.bridge, &self.bridge, self.range)
        ))?;
        let (conn, host, _) = {
            let _g = self.runtime.enter();
            rtnetlink::new_connection().map_err(|source| NetworkError::Tool {
                tool: "netlink",
                source,
            })?
        };
        self.runtime.spawn(conn);
        let bridge = self.bridge.clone();
        let gateway = self.gateway;
        let bridge_index = self.runtime.block_on(async {
            link::delete(&host, &bridge).await?;
            link::bridge(&host, &bridge, gateway).await
        })?;
        // No IPv6 on the bridge: instances are IPv4 only.
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", self.bridge),
            "1",
        );
        // Instances' packets are routed out of the host: forwarding must be on. What it was
        // is recorded first and put back when the network goes.
        if let Some(was) = self.forwarding.turn_on()? {
            tracing::info!(
                "turned on net.ipv4.ip_forward (it was {was}; put back at stop): functions with egress are routed out"
            );
        }
        *self.nftables.lock().unwrap_or_else(|p| p.into_inner()) = Some(nfnl::Nftables::open()?);
        tracing::info!(bridge = %self.bridge, range = %self.range, "function network up");
        state.up = Some(Up { host, bridge_index });
        Ok(())
    }

    /// Installs or refreshes a function's chains when its rules changed or its names are due
    /// to be resolved again.
    fn ensure_function(&self, state: &mut State, f: &FunctionNetwork) -> Result<(), NetworkError> {
        if let Some((installed, _, at)) = state.installed.get(&f.function)
            && installed == f
            && (at.elapsed() < RESOLVE_EVERY || !has_names(&f.egress))
        {
            return Ok(());
        }
        // The same rules as installed: a name that fails to resolve now keeps what it had.
        let previous = state
            .installed
            .get(&f.function)
            .filter(|(i, _, _)| i == f)
            .map(|(_, a, _)| a);
        let allow = allow_of(&f.egress, &self.dns, previous);
        let same = state
            .installed
            .get(&f.function)
            .is_some_and(|(i, a, _)| i == f && *a == allow);
        if !same {
            nft::apply(&nft::function(
                &self.bridge,
                &f.function,
                &allow,
                f.max_connections,
            ))?;
        }
        state
            .installed
            .insert(f.function.clone(), (f.clone(), allow, Instant::now()));
        Ok(())
    }

    /// Gives a prepared sandbox its network: a veth pair with an address from the pool, on the
    /// bridge, the function's rules, its rate limit. Blocking (netlink, nft and tc); called
    /// while the sandbox is prepared, off any caller's path. The lease goes with the sandbox.
    pub fn attach(
        self: &Arc<Self>,
        f: &FunctionNetwork,
        sandbox: &mut PreparedSandbox,
    ) -> Result<(), NetworkError> {
        let (addr, host_if, host, bridge_index) = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            self.ensure_up(&mut state)?;
            self.ensure_function(&mut state, f)?;
            let addr = self.allocate(&mut state)?;
            let up = state.up.as_ref().ok_or(NetworkError::Netlink {
                step: "bringing the network up",
                message: "not up".into(),
            })?;
            let host_if = format!(
                "{}-{:x}",
                self.bridge,
                u32::from(addr) - u32::from(self.range.network())
            );
            let r = (addr, host_if, up.host.clone(), up.bridge_index);
            *state.leases.entry(f.function.clone()).or_default() += 1;
            r
        };
        // From here the lease releases whatever part was made, however this ends.
        let lease = Lease {
            released: Some(Released {
                function: f.function.clone(),
                addr,
                host_if: host_if.clone(),
            }),
            network: self.clone(),
        };
        let runtime = self.runtime.clone();
        let inside = sandbox.in_netns(|| {
            // New links in the sandbox get no IPv6 (its eth0 is moved in below).
            let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
            let _g = runtime.enter();
            rtnetlink::new_connection()
        })?;
        let (conn, inside, _) = inside.map_err(|source| NetworkError::Tool {
            tool: "netlink",
            source,
        })?;
        let made = self.runtime.block_on(async {
            let task = tokio::spawn(conn);
            let r = link::InstanceLink {
                host: &host,
                inside: &inside,
                pid: sandbox.pid(),
                host_if: &host_if,
                bridge_index,
                addr: Ipv4Net::new(addr, self.range.prefix_len()).unwrap_or(self.range),
                gateway: self.gateway.addr(),
            }
            .create()
            .await;
            task.abort();
            r
        });
        made?;
        self.instance_entries(nfnl::Op::Add, &f.function, addr, &host_if)?;
        if let Some(rate) = f.rate_mbit {
            rate_limit(&host_if, sandbox.pid(), rate)?;
        }
        sandbox.attach(Box::new(lease));
        Ok(())
    }

    /// Adds or deletes one instance's nftables entries (one transaction over netlink).
    fn instance_entries(
        &self,
        op: nfnl::Op,
        function: &str,
        addr: Ipv4Addr,
        host_if: &str,
    ) -> Result<(), NetworkError> {
        let mut nf = self.nftables.lock().unwrap_or_else(|p| p.into_inner());
        let nf = nf.as_mut().ok_or(NetworkError::Netlink {
            step: "changing an instance's nftables entries",
            message: "the network is not up".into(),
        })?;
        nf.instance(op, &self.bridge, function, addr, host_if)
    }

    fn allocate(&self, state: &mut State) -> Result<Ipv4Addr, NetworkError> {
        // Hosts after the gateway; round robin, so an address is reused as late as possible.
        let base = u32::from(self.gateway.addr()) + 1;
        let count = u32::from(self.range.broadcast()) - base;
        for _ in 0..count {
            let a = Ipv4Addr::from(base + state.next % count);
            state.next = state.next.wrapping_add(1);
            if state.used.insert(a) {
                return Ok(a);
            }
        }
        Err(NetworkError::Exhausted(self.range))
    }

    fn give_back(self: &Arc<Self>, r: Released) {
        let tx = self
            .cleanup
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let r = match tx {
            Some(tx) => match tx.send(r) {
                Ok(()) => return,
                Err(e) => e.0,
            },
            None => r,
        };
        // Stopped: release on a thread of its own (netlink blocks on the runtime, which the
        // dropping thread may be part of).
        let net = self.clone();
        let _ = std::thread::Builder::new()
            .name("fnlet-net-release".into())
            .spawn(move || net.release(r));
    }

    /// Undoes one instance's network: veth (and with it the peer), firewall entries,
    /// conntrack entries, then the address goes back to the pool.
    fn release(&self, r: Released) {
        let host = self
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .up
            .as_ref()
            .map(|u| u.host.clone());
        if let Some(host) = host
            && let Err(e) = self.runtime.block_on(link::delete(&host, &r.host_if))
        {
            tracing::warn!(link = %r.host_if, "removing an instance's veth: {e}");
        }
        if let Err(e) = self.instance_entries(nfnl::Op::Delete, &r.function, r.addr, &r.host_if) {
            tracing::debug!(addr = %r.addr, "removing an instance's firewall entries: {e}");
        }
        release_conntrack(r.addr);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.used.remove(&r.addr);
        let left = match state.leases.get_mut(&r.function) {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n
            }
            None => 0,
        };
        if left == 0 {
            state.leases.remove(&r.function);
            if state.retired.contains(&r.function) {
                self.remove_function(&mut state, &r.function);
            }
        }
    }

    /// Says what egress the active version of `function` has; None when it has none or the
    /// function was removed. A function without egress keeps no chains or counters: they go
    /// now, or once its last instance's network is released. A changed policy needs nothing
    /// here: the chains are replaced when the new version's first instance is attached.
    pub fn set_function(&self, function: &str, net: Option<&FunctionNetwork>) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if net.is_some() {
            state.retired.remove(function);
            return;
        }
        state.retired.insert(function.to_string());
        if !state.leases.contains_key(function) {
            self.remove_function(&mut state, function);
        }
    }

    /// Deletes a function's chains and counters, if installed (no instance refers to them).
    fn remove_function(&self, state: &mut State, function: &str) {
        if state.installed.remove(function).is_none() || state.up.is_none() {
            return;
        }
        match nft::apply(&nft::delete_function(&self.bridge, function)) {
            Ok(()) => tracing::info!(function, "removed the function's egress rules"),
            Err(e) => tracing::warn!(function, "removing the function's egress rules: {e}"),
        }
    }

    /// Addresses in use (instances alive or being released).
    pub fn in_use(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .used
            .len()
    }

    /// Per-function counters (bytes out and in, connections, denied attempts); empty before
    /// the network is up.
    pub fn counters(&self) -> nft::Counters {
        if self
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .up
            .is_none()
        {
            return Default::default();
        }
        nft::counters(&self.bridge).unwrap_or_default()
    }
}

fn has_names(e: &Egress) -> bool {
    matches!(e, Egress::Rules(r) if r.iter().any(|r| matches!(r.dest, Dest::Host(_))))
}

/// The rules with host names resolved (IPv4 answers only): with the resolvers of
/// `network.dns` when set (those the instances are given), else the host's resolver. A name
/// that does not exist or has no IPv4 address allows nothing; one that cannot be resolved now
/// (no resolver answered) keeps its addresses in `previous` (the same rules as installed).
fn allow_of(e: &Egress, dns: &[SocketAddr], previous: Option<&nft::Allow>) -> nft::Allow {
    match e {
        Egress::None => nft::Allow::Rules(Vec::new()),
        Egress::All => nft::Allow::All,
        Egress::Rules(rules) => nft::Allow::Rules(
            rules
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let nets = match &r.dest {
                        Dest::Net(n) => vec![*n],
                        Dest::Host(h) => match resolve_host(h, r.port.unwrap_or(0), dns) {
                            Some(v) => v.into_iter().map(Ipv4Net::from).collect(),
                            None => match previous {
                                Some(nft::Allow::Rules(p)) => {
                                    p.get(i).map(|(n, _)| n.clone()).unwrap_or_default()
                                }
                                _ => Vec::new(),
                            },
                        },
                    };
                    (nets, r.port)
                })
                .collect(),
        ),
    }
}

/// A rule's host name resolved; None when it could not be (logged).
fn resolve_host(host: &str, port: u16, dns: &[SocketAddr]) -> Option<Vec<Ipv4Addr>> {
    let found = if dns.is_empty() {
        (host, port)
            .to_socket_addrs()
            .map(|addrs| {
                let mut v: Vec<Ipv4Addr> = addrs
                    .filter_map(|a| match a.ip() {
                        std::net::IpAddr::V4(v4) => Some(v4),
                        _ => None,
                    })
                    .collect();
                v.sort();
                v.dedup();
                v
            })
            .map_err(|e| e.to_string())
    } else {
        resolve::resolve(host, dns).map_err(|e| e.to_string())
    };
    match found {
        Ok(v) => {
            if v.is_empty() {
                tracing::warn!(
                    host,
                    "egress rule: the name has no IPv4 address: it allows nothing"
                );
            }
            Some(v)
        }
        Err(e) => {
            tracing::warn!(host, "egress rule: resolving failed: {e}");
            None
        }
    }
}

/// Refuses a range that overlaps one of the host's IPv4 routes (main table, /proc/net/route),
/// other than the default route and our own bridge's.
fn check_routes(range: Ipv4Net, bridge: &str) -> Result<(), NetworkError> {
    let text = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 || f[0] == bridge {
            continue;
        }
        let hex = |s: &str| {
            u32::from_str_radix(s, 16)
                .ok()
                .map(|v| Ipv4Addr::from(v.swap_bytes()))
        };
        let (Some(dest), Some(mask)) = (hex(f[1]), hex(f[7])) else {
            continue;
        };
        let prefix = u32::from(mask).count_ones() as u8;
        if prefix == 0 {
            continue;
        }
        let Ok(route) = Ipv4Net::new(dest, prefix) else {
            continue;
        };
        if route.contains(&range.network()) || range.contains(&route.network()) {
            return Err(NetworkError::RangeClash {
                range,
                route,
                dev: f[0].to_string(),
            });
        }
    }
    Ok(())
}

/// Caps an instance's bandwidth each way with a token bucket (tc tbf) on both ends of its
/// veth: the host's end shapes what goes to the instance, the instance's `eth0` what it sends
/// (set from the host; the instance cannot change it). Ingress policing would keep it all on
/// the host side, but needs the act_police module, which not every kernel has.
fn rate_limit(host_if: &str, pid: u32, mbit: u32) -> Result<(), NetworkError> {
    // Burst: 10 ms at the rate, at least 32 KiB.
    let burst = (u64::from(mbit) * 1_000_000 / 8 / 100).max(32 << 10);
    let tbf = |dev: &str| {
        format!("qdisc add dev {dev} root tbf rate {mbit}mbit burst {burst} latency 50ms")
    };
    tc(std::process::Command::new("tc").args(tbf(host_if).split(' ')))?;
    tc(std::process::Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .args(["--", "tc"])
        .args(tbf("eth0").split(' ')))
}

fn tc(cmd: &mut std::process::Command) -> Result<(), NetworkError> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .output()
        .map_err(|source| NetworkError::Tool { tool: "tc", source })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetworkError::Tc {
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Deletes the conntrack entries of `source` (an address or a network), with conntrack(8).
/// Without it the entries expire by their own timeouts; said once.
fn flush_conntrack(source: &str) {
    static MISSING: std::sync::Once = std::sync::Once::new();
    let r = std::process::Command::new("conntrack")
        .args(["-D", "-s", source])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    if let Err(e) = r {
        MISSING.call_once(|| {
            tracing::warn!("conntrack(8) could not run ({e}): finished instances' connection tracking entries expire by their own timeouts instead of being removed (install the conntrack package)");
        });
    }
}

/// A finished instance's conntrack entries, all but those in TIME_WAIT: the remote end of such
/// a connection may still hold it (a server that closed first), and while the entry lives the
/// masquerade does not hand the same source port to another instance's connection to that
/// server, which the server would refuse as an old duplicate. TIME_WAIT entries expire by
/// themselves within two minutes (nf_conntrack_tcp_timeout_time_wait); the rest (established
/// connections the function left, UDP flows) would otherwise linger up to days.
fn release_conntrack(addr: Ipv4Addr) {
    let out = std::process::Command::new("conntrack")
        .args(["-L", "-s", &addr.to_string()])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output();
    let Ok(out) = out else {
        return flush_conntrack(&addr.to_string());
    };
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines().filter(|l| !l.contains(" TIME_WAIT ")) {
        let mut args = vec!["-D".to_string()];
        let proto = line.split_whitespace().next().unwrap_or("");
        if !proto.is_empty() {
            args.extend(["-p".into(), proto.into()]);
        }
        // The original direction's tuple: the first of each key.
        for (key, flag) in [
            ("src=", "-s"),
            ("dst=", "-d"),
            ("sport=", "--sport"),
            ("dport=", "--dport"),
        ] {
            if let Some(v) = line.split_whitespace().find_map(|f| f.strip_prefix(key)) {
                args.extend([flag.to_string(), v.to_string()]);
            }
        }
        let _ = std::process::Command::new("conntrack")
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn write_file(path: &Path, text: &str) -> Result<(), NetworkError> {
    std::fs::write(path, text).map_err(|source| NetworkError::Write {
        path: path.into(),
        source,
    })
}

/// /etc/resolv.conf for instances: the configured resolvers, else the host's. A host whose
/// resolv.conf names only loopback resolvers (a local stub: systemd-resolved's 127.0.0.53,
/// dnsmasq on 127.0.0.1) is asked for its upstream servers instead (systemd-resolved's
/// /run/systemd/resolve/resolv.conf): an instance cannot reach the host's loopback.
pub fn resolv_conf_text(configured: &[String]) -> String {
    let mut servers: Vec<String> = configured.to_vec();
    let mut note = "network.dns";
    if servers.is_empty() {
        note = "/etc/resolv.conf";
        servers = nameservers(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default());
        if servers.is_empty() {
            note = "/run/systemd/resolve/resolv.conf (the host's own resolver is a loopback stub)";
            servers = nameservers(
                &std::fs::read_to_string("/run/systemd/resolve/resolv.conf").unwrap_or_default(),
            );
        }
        if servers.is_empty() {
            tracing::warn!(
                "the host has no resolver instances can reach (only loopback ones): set [network] dns for names to resolve in functions"
            );
        }
    }
    let mut text = format!("# Written by fnlet from {note}.\n");
    for s in servers.iter().take(3) {
        text.push_str(&format!("nameserver {s}\n"));
    }
    text.push_str("options timeout:2 attempts:2\n");
    text
}

/// Non-loopback IPv4 nameservers of a resolv.conf.
fn nameservers(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
        .filter(|a| !a.is_loopback() && !a.is_unspecified())
        .map(|a| a.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_resolvers_are_not_handed_to_instances() {
        assert_eq!(
            nameservers("nameserver 127.0.0.53\nnameserver 192.0.2.53\nnameserver ::1\n"),
            vec!["192.0.2.53"]
        );
        let t = resolv_conf_text(&["198.51.100.1".into()]);
        assert!(t.contains("nameserver 198.51.100.1\n"), "{t}");
    }

    #[test]
    fn a_name_that_cannot_be_resolved_now_keeps_its_addresses() {
        // A resolver that never answers.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let dns = [silent.local_addr().unwrap()];
        let e = policy::EgressSpec::Rules(vec!["10.0.0.0/8:5432".into(), "db.test:5432".into()])
            .parse()
            .unwrap();
        let net = |n: &str| -> Ipv4Net { n.parse().unwrap() };
        let before = nft::Allow::Rules(vec![
            (vec![net("10.0.0.0/8")], Some(5432)),
            (vec![net("192.0.2.7/32")], Some(5432)),
        ]);
        assert_eq!(allow_of(&e, &dns, Some(&before)), before);
        // Never resolved: it allows nothing.
        assert_eq!(
            allow_of(&e, &dns, None),
            nft::Allow::Rules(vec![
                (vec![net("10.0.0.0/8")], Some(5432)),
                (vec![], Some(5432))
            ])
        );
    }

    #[test]
    fn function_network_comes_from_the_manifest_or_the_default() {
        let config = NetworkConfig::default();
        assert_eq!(FunctionNetwork::of("f", None, &config), None);
        let m = policy::NetworkManifest {
            egress: Some(policy::EgressSpec::Word("all".into())),
            rate_mbit: Some(5),
            max_connections: None,
        };
        let n = FunctionNetwork::of("f", Some(&m), &config).unwrap();
        assert_eq!(
            (n.egress, n.rate_mbit, n.max_connections),
            (Egress::All, Some(5), 1024)
        );
        let open = NetworkConfig {
            default_egress: policy::EgressSpec::Word("all".into()),
            ..Default::default()
        };
        assert!(FunctionNetwork::of("f", None, &open).is_some());
    }
}
