//! Resolving the host names of egress rules with the configured resolvers (`network.dns`), the
//! ones instances are given, so that a rule allows what the function's own lookups find. A
//! plain DNS query for A records over UDP (simple-dns writes and reads the packets), each
//! resolver in turn; without `network.dns` the host's resolver (getaddrinfo) is used instead.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use simple_dns::rdata::RData;
use simple_dns::{CLASS, Name, Packet, PacketFlag, Question, RCODE, TYPE};

/// How long one resolver has to answer before the next is asked.
pub const PER_SERVER: Duration = Duration::from_secs(2);

/// Why a name did not resolve.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("{name:?} is not a name a DNS query can carry: {message}")]
    Name { name: String, message: String },
    #[error("asking {server}: {source}")]
    Io {
        server: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{server} did not answer within {:?}", PER_SERVER)]
    Timeout { server: SocketAddr },
    #[error("{server} answered {rcode:?}")]
    Refused { server: SocketAddr, rcode: RCODE },
    #[error("no resolver to ask")]
    NoServer,
}

/// The IPv4 addresses of `host`, from the first of `servers` that answers (an empty answer is
/// an answer: the name has no A record). Blocking: up to [`PER_SERVER`] per resolver.
pub fn resolve(host: &str, servers: &[SocketAddr]) -> Result<Vec<Ipv4Addr>, ResolveError> {
    let mut last = ResolveError::NoServer;
    for server in servers {
        match query(host, *server, PER_SERVER) {
            Ok(addrs) => return Ok(addrs),
            Err(e @ ResolveError::Name { .. }) => return Err(e),
            Err(e) => {
                tracing::debug!(host, %server, "resolving an egress rule: {e}");
                last = e;
            }
        }
    }
    Err(last)
}

/// One A query to one server over UDP.
fn query(host: &str, server: SocketAddr, wait: Duration) -> Result<Vec<Ipv4Addr>, ResolveError> {
    let bad_name = |e: simple_dns::SimpleDnsError| ResolveError::Name {
        name: host.to_string(),
        message: e.to_string(),
    };
    let io = |source| ResolveError::Io { server, source };
    let mut id = [0u8; 2];
    // A random id: an answer must match it (and come from the server: the socket is connected).
    getrandom::fill(&mut id).map_err(|e| io(std::io::Error::other(e.to_string())))?;
    let id = u16::from_ne_bytes(id);
    let mut packet = Packet::new_query(id);
    packet.set_flags(PacketFlag::RECURSION_DESIRED);
    packet.questions.push(Question::new(
        Name::new(host).map_err(bad_name)?,
        TYPE::A.into(),
        CLASS::IN.into(),
        false,
    ));
    let bytes = packet.build_bytes_vec().map_err(bad_name)?;
    let local: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).map_err(io)?;
    socket.connect(server).map_err(io)?;
    socket.send(&bytes).map_err(io)?;
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ResolveError::Timeout { server });
        }
        socket.set_read_timeout(Some(left)).map_err(io)?;
        let n = match socket.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ResolveError::Timeout { server });
            }
            Err(e) => return Err(io(e)),
        };
        // Anything else (garbage, another id, a query) is skipped: the answer may still come.
        let Ok(answer) = Packet::parse(&buf[..n]) else {
            continue;
        };
        if answer.id() != id || !answer.has_flags(PacketFlag::RESPONSE) {
            continue;
        }
        return match answer.rcode() {
            RCODE::NoError => Ok(addresses(host, &answer)),
            // The name does not exist: nothing to allow, as an answer.
            RCODE::NameError => Ok(Vec::new()),
            rcode => Err(ResolveError::Refused { server, rcode }),
        };
    }
}

/// The A records of `host` in an answer, following the CNAMEs the answer holds.
fn addresses(host: &str, answer: &Packet<'_>) -> Vec<Ipv4Addr> {
    let norm = |n: &Name<'_>| n.to_string().trim_end_matches('.').to_ascii_lowercase();
    let mut names = vec![host.trim_end_matches('.').to_ascii_lowercase()];
    // A chain is at most as long as the answer.
    for _ in 0..answer.answers.len() {
        let more: Vec<String> = answer
            .answers
            .iter()
            .filter(|rr| names.contains(&norm(&rr.name)))
            .filter_map(|rr| match &rr.rdata {
                RData::CNAME(c) => Some(norm(&c.0)),
                _ => None,
            })
            .filter(|n| !names.contains(n))
            .collect();
        if more.is_empty() {
            break;
        }
        names.extend(more);
    }
    let mut out: Vec<Ipv4Addr> = answer
        .answers
        .iter()
        .filter(|rr| names.contains(&norm(&rr.name)))
        .filter_map(|rr| match &rr.rdata {
            RData::A(a) => Some(Ipv4Addr::from(a.address)),
            _ => None,
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// dnsmasq on 127.0.0.1 and a port of the test's own, answering from `--address` and
    /// `--cname` only (no upstream, no hosts file); stopped when dropped.
    struct Dnsmasq(std::process::Child, SocketAddr);

    impl Dnsmasq {
        fn start(args: &[&str]) -> Dnsmasq {
            // dnsmasq binds UDP and TCP on its port and exits when either is taken (the other
            // tests' agents listen on loopback TCP ports): a port free in both, and another one
            // if dnsmasq still lost the race.
            for _ in 0..5 {
                if let Some(d) = Dnsmasq::try_start(args) {
                    return d;
                }
            }
            panic!("dnsmasq never answered on a free loopback port (5 tries)");
        }

        fn try_start(args: &[&str]) -> Option<Dnsmasq> {
            let port = (0..20)
                .find_map(|_| {
                    let tcp = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
                    let port = tcp.local_addr().ok()?.port();
                    UdpSocket::bind(("127.0.0.1", port)).ok().map(|_| port)
                })
                .expect("a loopback port free for TCP and UDP");
            let mut child = Command::new("dnsmasq")
                .args([
                    "--keep-in-foreground",
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                    "--listen-address=127.0.0.1",
                    "--user=root",
                    "--pid-file=",
                ])
                .arg(format!("--port={port}"))
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("dnsmasq (scripts/install-deps.sh installs dnsmasq-base)");
            let server: SocketAddr = ([127, 0, 0, 1], port).into();
            // Answering once bound.
            let deadline = Instant::now() + Duration::from_secs(10);
            while query("ready.test", server, Duration::from_millis(200)).is_err() {
                if Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
                    let _ = child.kill();
                    let _ = child.wait();
                    return None;
                }
            }
            Some(Dnsmasq(child, server))
        }
    }

    impl Drop for Dnsmasq {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn names_resolve_with_the_given_servers_only() {
        let d = Dnsmasq::start(&[
            "--address=/db.test/192.0.2.7",
            "--host-record=multi.test,192.0.2.8",
            "--host-record=multi.test,192.0.2.9",
            "--cname=alias.test,multi.test",
            "--address=/ready.test/192.0.2.1",
        ]);
        assert_eq!(
            resolve("db.test", &[d.1]).unwrap(),
            vec![Ipv4Addr::new(192, 0, 2, 7)]
        );
        assert_eq!(
            resolve("ALIAS.test", &[d.1]).unwrap(),
            vec![Ipv4Addr::new(192, 0, 2, 8), Ipv4Addr::new(192, 0, 2, 9)]
        );
        // A server that does not answer is passed over for the next.
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let silent_addr = silent.local_addr().unwrap();
        assert_eq!(
            resolve("db.test", &[silent_addr, d.1]).unwrap(),
            vec![Ipv4Addr::new(192, 0, 2, 7)]
        );
        assert!(matches!(
            resolve("db.test", &[silent_addr]),
            Err(ResolveError::Timeout { .. })
        ));
    }

    #[test]
    fn a_name_with_no_record_allows_nothing() {
        // --local: answered from local records only, of which it has none: NXDOMAIN.
        let d = Dnsmasq::start(&["--address=/ready.test/192.0.2.1", "--local=/nothing.test/"]);
        assert_eq!(
            resolve("nothing.test", &[d.1]).unwrap(),
            Vec::<Ipv4Addr>::new()
        );
        // A name that exists but has no A record (only an AAAA).
        let d = Dnsmasq::start(&[
            "--address=/ready.test/192.0.2.1",
            "--host-record=six.test,2001:db8::6",
            "--local=/six.test/",
        ]);
        assert_eq!(resolve("six.test", &[d.1]).unwrap(), Vec::<Ipv4Addr>::new());
    }
}
