//! One instance's nftables entries, added and deleted over netlink from the agent itself: one
//! batch (one transaction, as `nft -f` sends it) on a socket kept open, instead of a process
//! that would first read the whole ruleset. The messages come from netlink-packet-netfilter;
//! the tables and the functions' chains are still nft scripts (nft.rs), made once.

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST, NLMSG_ERROR, NetlinkBuffer, NetlinkMessage,
};
use netlink_packet_netfilter::nftables::{
    DataAttribute, ListAttribute, NfTablesMessage, SetElementAttribute, SetElementList,
    SetElementMessage, Verdict, VerdictAttribute,
};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use super::NetworkError;

/// nfgenmsg's res_id of batch messages: the subsystem the batch is for.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// IFNAMSIZ: an interface name in a set key takes 16 bytes, zero-padded.
const IFNAMSIZ: usize = 16;
/// How long the kernel may take to answer a batch.
const REPLY_WITHIN: Duration = Duration::from_secs(5);

/// Whether the entries go in or out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Add,
    Delete,
}

/// A netlink socket to nf_tables in the namespace it was opened in.
pub struct Nftables {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

fn io(step: &'static str) -> impl FnOnce(std::io::Error) -> NetworkError {
    move |e| NetworkError::Netlink {
        step,
        message: e.to_string(),
    }
}

impl Nftables {
    pub fn open() -> Result<Nftables, NetworkError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(io("opening nf_tables"))?;
        socket.bind_auto().map_err(io("opening nf_tables"))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(io("opening nf_tables"))?;
        Ok(Nftables {
            socket,
            seq: 0,
            buf: Vec::with_capacity(16 << 10),
        })
    }

    /// Adds or deletes the entries that tie one instance (its address and host-side veth
    /// `port`) to its function, in one transaction: `out`, `back` and `deny` in `inet TABLE`
    /// map the address to the function's chains; `ports` in `bridge TABLE` pairs the port with
    /// the address. The same entries as [`super::nft::instance`] writes as a script.
    pub fn instance(
        &mut self,
        op: Op,
        table: &str,
        function: &str,
        addr: Ipv4Addr,
        port: &str,
    ) -> Result<(), NetworkError> {
        let batch = instance_batch(op, table, function, addr, port)?;
        self.send_batch(batch)
    }

    /// Sends the messages between a batch begin and end, each asking for an ack, and waits
    /// for every ack; the first error the kernel reports fails the whole transaction.
    fn send_batch(&mut self, messages: Vec<NetfilterMessage>) -> Result<(), NetworkError> {
        let control = |m: ControlMessage| {
            NetfilterMessage::new(
                NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES),
                m,
            )
        };
        let first = self.seq.wrapping_add(1);
        let count = messages.len() as u32;
        let mut out = Vec::new();
        let all = std::iter::once((control(ControlMessage::BatchBegin), false))
            .chain(messages.into_iter().map(|m| (m, true)))
            .chain(std::iter::once((control(ControlMessage::BatchEnd), false)));
        for (m, ack) in all {
            let create = matches!(
                &m.inner,
                netlink_packet_netfilter::NetfilterMessageInner::NfTables(
                    NfTablesMessage::NewSetElement(_)
                )
            );
            let mut msg = NetlinkMessage::from(m);
            msg.header.flags = NLM_F_REQUEST
                | if ack { NLM_F_ACK } else { 0 }
                | if create { NLM_F_CREATE } else { 0 };
            self.seq = self.seq.wrapping_add(1);
            msg.header.sequence_number = self.seq;
            msg.finalize();
            let at = out.len();
            out.resize(at + msg.buffer_len(), 0);
            msg.serialize(&mut out[at..]);
        }
        // The messages of a batch go in one datagram: the kernel reads a batch from one skb.
        self.socket
            .send(&out, 0)
            .map_err(io("sending to nf_tables"))?;
        // Batch begin is seq `first`, batch end `first + count + 1`: the acked messages are
        // those between. An error may name any of them (a refused batch names its begin).
        let within = |seq: u32, lo: u32, hi: u32| {
            if lo <= hi {
                (lo..=hi).contains(&seq)
            } else {
                seq >= lo || seq <= hi
            }
        };
        let (lo, hi) = (first.wrapping_add(1), first.wrapping_add(count));
        let end = hi.wrapping_add(1);
        let mut acked = 0u32;
        let deadline = Instant::now() + REPLY_WITHIN;
        while acked < count {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            let mut fds = [nix::poll::PollFd::new(
                self.socket.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let ready = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms))
                .map_err(|e| io("waiting for nf_tables")(e.into()))?;
            if ready == 0 {
                return Err(NetworkError::Netlink {
                    step: "waiting for nf_tables",
                    message: format!("no answer within {REPLY_WITHIN:?}"),
                });
            }
            self.buf.clear();
            self.socket
                .recv(&mut self.buf, 0)
                .map_err(io("reading from nf_tables"))?;
            let mut at = 0;
            while at < self.buf.len() {
                let Ok(nl) = NetlinkBuffer::new_checked(&self.buf[at..]) else {
                    break;
                };
                let len = nl.length() as usize;
                let seq = nl.sequence_number();
                // Answers to an earlier batch that failed part-way are passed over.
                let ours = within(seq, first, end);
                if ours && nl.message_type() == NLMSG_ERROR {
                    let code = nl
                        .payload()
                        .get(..4)
                        .and_then(|b| <[u8; 4]>::try_from(b).ok())
                        .map_or(0, i32::from_ne_bytes);
                    if code != 0 {
                        // (An error of this batch: what is left of its answers is passed
                        // over by the next.)
                        return Err(NetworkError::Nft {
                            message: format!(
                                "nf_tables refused the instance's entries: {}",
                                std::io::Error::from_raw_os_error(-code)
                            ),
                        });
                    }
                    if within(seq, lo, hi) {
                        acked += 1;
                    }
                }
                at += len.next_multiple_of(4).max(16);
            }
        }
        Ok(())
    }
}

/// The batch's messages for one instance's entries.
fn instance_batch(
    op: Op,
    table: &str,
    function: &str,
    addr: Ipv4Addr,
    port: &str,
) -> Result<Vec<NetfilterMessage>, NetworkError> {
    if port.len() >= IFNAMSIZ {
        return Err(NetworkError::Netlink {
            step: "naming the instance's port",
            message: format!("{port:?} is longer than an interface name"),
        });
    }
    let element = |family, set: &str, key: Vec<u8>, chain: Option<String>| {
        let mut attrs = vec![SetElementAttribute::Key(DataAttribute::Value(key))];
        if let Some(chain) = chain.filter(|_| op == Op::Add) {
            attrs.push(SetElementAttribute::Data(DataAttribute::Verdict(vec![
                VerdictAttribute::Code(Verdict::Goto),
                VerdictAttribute::Chain(chain),
            ])));
        }
        let list = SetElementMessage {
            attributes: vec![
                SetElementList::Table(table.to_string()),
                SetElementList::Set(set.to_string()),
                SetElementList::Elements(vec![ListAttribute::Element(attrs)]),
            ],
        };
        NetfilterMessage::new(
            NetfilterHeader::new(family, 0, 0),
            match op {
                Op::Add => NfTablesMessage::NewSetElement(list),
                Op::Delete => NfTablesMessage::DeleteSetElement(list),
            },
        )
    };
    let ip = addr.octets().to_vec();
    // `ifname . ipv4_addr`: the name in IFNAMSIZ bytes, then the address.
    let mut port_key = vec![0u8; IFNAMSIZ];
    port_key[..port.len()].copy_from_slice(port.as_bytes());
    port_key.extend_from_slice(&addr.octets());
    let inet = NetfilterProtoFamily::Inet;
    Ok(vec![
        element(inet, "out", ip.clone(), Some(format!("out_{function}"))),
        element(inet, "back", ip.clone(), Some(format!("back_{function}"))),
        element(inet, "deny", ip, Some(format!("no_{function}"))),
        element(NetfilterProtoFamily::Bridge, "ports", port_key, None),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Needs root: in a network namespace of the test thread's own (nothing outside it
    /// changes), loads the tables with nft, adds an instance's entries over netlink, checks
    /// that nft lists exactly what its own script would have added, and deletes them again.
    #[test]
    fn instance_entries_over_netlink_are_what_nft_would_add() {
        let done = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare a network namespace (this test needs root)");
            let range = "100.72.0.0/16".parse().unwrap();
            let mut script = super::super::nft::tables("fnlet0", "fnlet0", range);
            script +=
                &super::super::nft::function("fnlet0", "f-1", &super::super::nft::Allow::All, 8);
            super::super::nft::apply(&script).expect("nft loads the tables");
            let list = || {
                let out = Command::new("nft")
                    .args(["list", "ruleset"])
                    .output()
                    .expect("nft");
                String::from_utf8_lossy(&out.stdout).into_owned()
            };
            let addr: Ipv4Addr = "100.72.0.9".parse().unwrap();
            let mut nf = Nftables::open().expect("netlink");
            nf.instance(Op::Add, "fnlet0", "f-1", addr, "fnlet0-9")
                .expect("add");
            let added = list();
            // Adding twice is fine (as `nft add element`).
            nf.instance(Op::Add, "fnlet0", "f-1", addr, "fnlet0-9")
                .expect("add again");
            nf.instance(Op::Delete, "fnlet0", "f-1", addr, "fnlet0-9")
                .expect("delete");
            let deleted = list();
            // A missing entry: the kernel's error, named.
            let missing = nf.instance(Op::Delete, "fnlet0", "f-1", addr, "fnlet0-9");
            // And the socket still serves the next batch.
            nf.instance(Op::Add, "fnlet0", "f-1", addr, "fnlet0-9")
                .expect("add after an error");
            (added, deleted, missing.map_err(|e| e.to_string()), list())
        });
        let (added, deleted, missing, again) = done.join().unwrap();
        for e in [
            "100.72.0.9 : goto out_f-1",
            "100.72.0.9 : goto back_f-1",
            "100.72.0.9 : goto no_f-1",
            "\"fnlet0-9\" . 100.72.0.9",
        ] {
            assert!(added.contains(e), "{e} missing:\n{added}");
            assert!(!deleted.contains(e), "{e} still there:\n{deleted}");
            assert!(again.contains(e), "{e} missing:\n{again}");
        }
        let err = missing.expect_err("deleting a missing entry");
        assert!(err.contains("No such file"), "{err}");
    }

    #[test]
    fn a_port_name_longer_than_an_interface_name_is_refused() {
        let a = "100.72.0.9".parse().unwrap();
        assert!(instance_batch(Op::Add, "t", "f", a, "a-name-of-16-chr").is_err());
        assert_eq!(
            instance_batch(Op::Add, "t", "f", a, "fnlet0-9")
                .unwrap()
                .len(),
            4
        );
    }
}
