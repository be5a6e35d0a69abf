//! Links and addresses over rtnetlink: the bridge, and each instance's veth pair.

use std::net::Ipv4Addr;

use futures_util::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, RouteMessageBuilder};

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
pub async fn bridge(h: &Handle, name: &str, gateway: Ipv4Net) -> Result<u32, NetworkError> {
    h.link()
        .add(LinkBridge::new(name).build())
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
    pub async fn create(&self) -> Result<(), NetworkError> {
        let h = self.host;
        // The peer's name only has to be unique on the host until it moves.
        let peer = format!("{}p", self.host_if);
        h.link()
            .add(LinkVeth::new(self.host_if, &peer).build())
            .execute()
            .await
            .map_err(nl("creating the veth pair"))?;
        let missing = |step| NetworkError::Netlink {
            step,
            message: "the veth vanished".into(),
        };
        let peer_index = index(h, &peer)
            .await?
            .ok_or_else(|| missing("creating the veth pair"))?;
        h.link()
            .set(
                LinkUnspec::new_with_index(peer_index)
                    .setns_by_pid(self.pid)
                    .build(),
            )
            .execute()
            .await
            .map_err(nl("moving the veth into the sandbox"))?;
        let host_index = index(h, self.host_if)
            .await?
            .ok_or_else(|| missing("creating the veth pair"))?;
        h.link()
            .set(
                LinkUnspec::new_with_index(host_index)
                    .controller(self.bridge_index)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(nl("attaching the veth to the bridge"))?;

        let n = self.inside;
        let inner = index(n, &peer)
            .await?
            .ok_or_else(|| missing("finding the veth in the sandbox"))?;
        n.address()
            .add(inner, self.addr.addr().into(), self.addr.prefix_len())
            .execute()
            .await
            .map_err(nl("addressing eth0"))?;
        n.link()
            .set(
                LinkUnspec::new_with_index(inner)
                    .name("eth0".to_string())
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(nl("bringing eth0 up"))?;
        n.route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(self.gateway)
                    .build(),
            )
            .execute()
            .await
            .map_err(nl("adding the default route"))?;
        Ok(())
    }
}
