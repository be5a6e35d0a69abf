//! Links and addresses over rtnetlink: the bridge, and each instance's veth pair.

use std::net::Ipv4Addr;

use futures_util::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth};
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
};

use super::NetworkError;

fn nl(step: &'static str) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    move |e| NetworkError::Netlink {
        step,
        message: e.to_string(),
    }
}

/// The index of link `name`, if it exists.
pub async fn index(h: &Handle, name: &str) -> Result<Option<u32>, NetworkError> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(l)) => Ok(Some(l.header.index)),
        Ok(None) => Ok(None),
        // ENODEV: no such link.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -nix::libc::ENODEV => Ok(None),
        Err(e) => Err(nl("looking up a link")(e)),
    }
}

/// Every link whose name starts with `prefix`.
pub async fn names_with_prefix(h: &Handle, prefix: &str) -> Result<Vec<String>, NetworkError> {
    let mut links = h.link().get().execute();
    let mut out = Vec::new();
    while let Some(l) = links.try_next().await.map_err(nl("listing links"))? {
        for a in &l.attributes {
            if let rtnetlink::packet_route::link::LinkAttribute::IfName(n) = a
                && n.starts_with(prefix)
            {
                out.push(n.clone());
            }
        }
    }
    Ok(out)
}

/// Deletes link `name`; a missing one is fine.
pub async fn delete(h: &Handle, name: &str) -> Result<(), NetworkError> {
    if let Some(i) = index(h, name).await? {
        match h.link().del(i).execute().await {
            Ok(()) => {}
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -nix::libc::ENODEV => {}
            Err(e) => return Err(nl("deleting a link")(e)),
        }
    }
    Ok(())
}

/// Creates the bridge with the gateway address and brings it up; returns its index.
///
/// The bridge gets a MAC address of its own: one the kernel chose would follow the lowest MAC
/// among its ports, changing as instances' veths come and go, and an instance that had just
/// learnt the gateway's MAC would send to one nobody answers any more (its connection hangs
/// until its neighbour entry expires, tens of seconds).
pub async fn bridge(h: &Handle, name: &str, gateway: Ipv4Net) -> Result<u32, NetworkError> {
    h.link()
        .add(LinkBridge::new(name).address(bridge_mac().to_vec()).build())
        .execute()
        .await
        .map_err(nl("creating the bridge"))?;
    let i = index(h, name).await?.ok_or(NetworkError::Netlink {
        step: "creating the bridge",
        message: "the bridge vanished".into(),
    })?;
    h.address()
        .add(i, gateway.addr().into(), gateway.prefix_len())
        .execute()
        .await
        .map_err(nl("addressing the bridge"))?;
    h.link()
        .set(LinkUnspec::new_with_index(i).up().build())
        .execute()
        .await
        .map_err(nl("bringing the bridge up"))?;
    Ok(i)
}

/// A random, locally administered unicast MAC (first byte xxxxxx10).
fn bridge_mac() -> [u8; 6] {
    let mut mac: [u8; 6] = rand::random();
    mac[0] = (mac[0] & 0xfc) | 0x02;
    mac
}

/// One instance's link: `host_if` on the bridge in the host's namespace, its peer `eth0` in
/// the sandbox's (`inside`, a connection opened there) with `addr`, up, and a default route
/// through the bridge.
pub struct InstanceLink<'a> {
    pub host: &'a Handle,
    pub inside: &'a Handle,
    pub pid: u32,
    pub host_if: &'a str,
    pub bridge_index: u32,
    pub addr: Ipv4Net,
    pub gateway: Ipv4Addr,
}

impl InstanceLink<'_> {
    /// One request on the host's socket, two on the sandbox's: the pair is made with its peer
    /// already in the sandbox and named `eth0`, and the host's end already on the bridge and
    /// up (one RTM_NEWLINK; the peer cannot be brought up in it: a veth opens only once it has
    /// its peer, after the request). Then, in the sandbox, eth0's index is looked up, and eth0
    /// up, its address and the default route go in one exchange (sent together; the kernel
    /// takes them in order).
    pub async fn create(&self) -> Result<(), NetworkError> {
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name("eth0".to_string())
            .setns_by_pid(self.pid)
            .build();
        let pair = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(self.host_if.to_string())
            .controller(self.bridge_index)
            .up()
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        self.host
            .link()
            .add(pair)
            .execute()
            .await
            .map_err(nl("creating the veth pair"))?;

        let n = self.inside;
        let inner = index(n, "eth0")
            .await?
            .ok_or_else(|| NetworkError::Netlink {
                step: "finding eth0 in the sandbox",
                message: "the veth's peer is not there".into(),
            })?;
        let up = n
            .link()
            .set(LinkUnspec::new_with_index(inner).up().build())
            .execute();
        let address = n
            .address()
            .add(inner, self.addr.addr().into(), self.addr.prefix_len())
            .execute();
        let route = n
            .route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(self.gateway)
                    .build(),
            )
            .execute();
        let (u, a, r) = futures_util::join!(up, address, route);
        u.map_err(nl("bringing eth0 up"))?;
        a.map_err(nl("addressing eth0"))?;
        r.map_err(nl("adding the default route"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs root: in network namespaces of the test's own (a thread's, standing for the
    /// host, and one of `unshare --net sleep` standing for the sandbox), makes an instance's
    /// link and checks what each side sees.
    #[test]
    fn an_instance_link_is_made_in_one_request_per_side() {
        let done = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare a network namespace (this test needs root)");
            let mut sandbox = std::process::Command::new("unshare")
                .args(["--net", "sleep", "30"])
                .spawn()
                .expect("unshare (util-linux)");
            let pid = sandbox.id();
            let ns = format!("/proc/{pid}/ns/net");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while std::fs::read_link(&ns).ok()
                == std::fs::read_link("/proc/thread-self/ns/net").ok()
            {
                assert!(std::time::Instant::now() < deadline, "unshare never ran");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let made = rt.block_on(async {
                let (conn, host, _) = rtnetlink::new_connection().unwrap();
                tokio::spawn(conn);
                let gateway: Ipv4Net = "100.72.0.1/16".parse().unwrap();
                let bridge_index = bridge(&host, "fnlet0", gateway).await?;
                let inside_ns = std::fs::File::open(&ns).unwrap();
                let handle = tokio::runtime::Handle::current();
                let (conn, inside, _) = std::thread::scope(|s| {
                    s.spawn(|| {
                        let _g = handle.enter();
                        nix::sched::setns(&inside_ns, nix::sched::CloneFlags::CLONE_NEWNET)
                            .unwrap();
                        rtnetlink::new_connection()
                    })
                    .join()
                    .unwrap()
                })
                .unwrap();
                tokio::spawn(conn);
                InstanceLink {
                    host: &host,
                    inside: &inside,
                    pid,
                    host_if: "fnlet0-9",
                    bridge_index,
                    addr: "100.72.0.9/16".parse().unwrap(),
                    gateway: gateway.addr(),
                }
                .create()
                .await
            });
            let ip = |args: &[&str]| {
                let o = std::process::Command::new("ip")
                    .args(args)
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&o.stdout).into_owned()
            };
            let bridge_mac = || {
                ip(&["-br", "link", "show", "fnlet0"])
                    .split_whitespace()
                    .nth(2)
                    .unwrap_or_default()
                    .to_string()
            };
            let mut macs = vec![bridge_mac()];
            let host_side = ip(&["-d", "link", "show", "fnlet0-9"]);
            for mac in ["02:00:00:00:00:01", "00:00:00:00:00:01"] {
                let st = std::process::Command::new("sh")
                    .args([
                        "-c",
                        &format!("ip link add fnlet0-p address {mac} type veth peer name fnlet0-q && ip link set fnlet0-p master fnlet0"),
                    ])
                    .status()
                    .unwrap();
                assert!(st.success());
                macs.push(bridge_mac());
                let _ = std::process::Command::new("ip")
                    .args(["link", "del", "fnlet0-p"])
                    .status();
                macs.push(bridge_mac());
            }
            let inside = std::process::Command::new("nsenter")
                .arg(format!("--net={ns}"))
                .args(["--", "sh", "-c", "ip -br addr; ip route"])
                .output()
                .unwrap();
            let _ = sandbox.kill();
            let _ = sandbox.wait();
            (
                made,
                host_side,
                String::from_utf8_lossy(&inside.stdout).into_owned(),
                macs,
            )
        });
        let (made, host_side, inside, macs) = done.join().unwrap();
        // The bridge kept its own MAC while a port came and went (ports' are random).
        assert!(macs.iter().all(|m| m == &macs[0]), "{macs:?}");
        assert_eq!(
            u8::from_str_radix(&macs[0][..2], 16).unwrap() & 3,
            2,
            "{macs:?}"
        );
        made.expect("the instance's link");
        assert!(host_side.contains("master fnlet0"), "{host_side}");
        assert!(host_side.contains(",UP"), "{host_side}");
        assert!(inside.contains("eth0@"), "{inside}");
        assert!(inside.contains("100.72.0.9/16"), "{inside}");
        assert!(
            inside.contains("default via 100.72.0.1 dev eth0"),
            "{inside}"
        );
    }
}
