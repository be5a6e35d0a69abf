//! The agent's HTTP listener against clients that hang on or crowd in: the real binary, raw
//! TCP from chosen loopback addresses (127.0.0.2 and up; the agent listens on 127.0.0.1). A
//! partial head, a silent connection, an idle keep-alive connection and a short body are cut by
//! their timeouts; past the connection limits new connections are closed at accept, counted in
//! /metrics, and everyone else is still served.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::agent::{Agent, Fixture, Settings};

/// How long a close the agent owes us may take: several times every timeout set below.
const PATIENCE: Duration = Duration::from_secs(15);

fn settings(limits: &str) -> Settings {
    Settings {
        limits_extra: limits.to_string(),
        ..Settings::default()
    }
}

fn agent_addr(agent: &Agent) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, agent.port))
}

/// A connection to the agent from `source` (any 127.0.0.0/8 address).
fn connect_from(source: [u8; 4], agent: &Agent) -> TcpStream {
    let s =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let from = SocketAddr::from((Ipv4Addr::from(source), 0));
    s.bind(&from.into())
        .unwrap_or_else(|e| panic!("bind {from}: {e}"));
    s.connect(&agent_addr(agent).into())
        .unwrap_or_else(|e| panic!("connect from {from}: {e}"));
    let s = TcpStream::from(s);
    s.set_read_timeout(Some(PATIENCE)).expect("read timeout");
    s
}

/// An HTTP/1.1 answer as it came over the wire.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: String,
}

/// Sends `req` and reads one answer (it has a Content-Length); None when the agent closed the
/// connection first.
fn exchange(s: &mut TcpStream, req: &[u8]) -> Option<Answer> {
    // A refused connection may already be reset: that is "closed" too.
    if s.write_all(req).is_err() {
        return None;
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!(
                    "no answer in {PATIENCE:?}: {:?}",
                    String::from_utf8_lossy(&buf)
                )
            }
            Err(_) => return None,
        }
        let text = String::from_utf8_lossy(&buf).into_owned();
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or_else(|| panic!("no content-length: {head}"));
        if body.len() >= len {
            let status = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("status line: {head}"));
            return Some(Answer {
                status,
                body: body.to_string(),
            });
        }
    }
}

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: fnlet\r\n\r\n";

/// Whether the agent closes `s` within PATIENCE (EOF or reset; what it sends first is read
/// and thrown away).
fn closed(s: &mut TcpStream) -> bool {
    let mut chunk = [0u8; 8192];
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        match s.read(&mut chunk) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
    false
}

/// One line of /metrics, fetched on a connection of its own from 127.0.0.1.
fn metric(agent: &Agent, name: &str) -> Option<u64> {
    let mut s = connect_from([127, 0, 0, 1], agent);
    let a = exchange(
        &mut s,
        b"GET /metrics HTTP/1.1\r\nHost: fnlet\r\nConnection: close\r\n\r\n",
    )
    .expect("/metrics answers");
    a.body.lines().find_map(|l| {
        let (n, v) = l.rsplit_once(' ')?;
        (n == name).then(|| v.parse().ok())?
    })
}

#[test]
fn hanging_clients_are_cut_by_the_header_idle_and_body_timeouts() {
    let agent = Agent::start_with(
        "listener-timeouts",
        settings("header_timeout_s = 1\nidle_timeout_s = 2\nbody_timeout_s = 1\n"),
    );
    let echo = Fixture::sh("echo", "public = true", "cat");
    agent.deploy(echo.path());
    assert!(
        agent.log().contains("open-file limit"),
        "the agent says what open-file limit it has:\n{}",
        agent.log()
    );

    let mut silent = connect_from([127, 0, 0, 2], &agent);
    let mut partial = connect_from([127, 0, 0, 2], &agent);
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .expect("send a partial head");
    let mut kept = connect_from([127, 0, 0, 2], &agent);
    let a = exchange(&mut kept, HEALTHZ).expect("a whole request is answered");
    assert_eq!((a.status, a.body.as_str()), (200, "ok\n"));
    // A body shorter than its Content-Length, to a public function.
    let mut short = connect_from([127, 0, 0, 2], &agent);
    let a = exchange(
        &mut short,
        b"POST /fn/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly ten b",
    )
    .expect("the short body is answered");
    assert_eq!(a.status, 408, "{a:?}");
    let v: serde_json::Value = serde_json::from_str(&a.body).expect("a JSON error");
    assert_eq!(v["error"]["kind"], "request_timeout", "{v}");

    assert!(closed(&mut silent), "a silent connection stays open");
    assert!(closed(&mut partial), "a partial head stays open");
    assert!(
        closed(&mut kept),
        "an idle keep-alive connection stays open"
    );
    assert!(
        closed(&mut short),
        "the connection of a cut body stays open"
    );

    let count = |reason: &str| {
        metric(
            &agent,
            &format!("fnlet_connection_timeouts_total{{reason=\"{reason}\"}}"),
        )
        .unwrap_or(0)
    };
    assert!(count("header") >= 2, "header timeouts: {}", count("header"));
    assert!(count("idle") >= 1, "idle timeouts: {}", count("idle"));
    assert_eq!(count("body"), 1);
    // The agent still serves.
    assert_eq!(agent.invoke("echo", b"still here").text(), "still here");
}

#[test]
fn a_flood_from_one_address_is_refused_past_its_limit_while_others_are_served() {
    let agent = Agent::start_with("listener-per-ip", settings("max_connections_per_ip = 50\n"));
    let echo = Fixture::sh("echo", "public = true", "cat");
    agent.deploy(echo.path());
    let started = Instant::now();

    // 50 connections from 127.0.0.2, each answered: they hold its places.
    let held: Vec<TcpStream> = (0..50)
        .map(|i| {
            let mut s = connect_from([127, 0, 0, 2], &agent);
            let a = exchange(&mut s, HEALTHZ)
                .unwrap_or_else(|| panic!("connection {i} of 50 was refused"));
            assert_eq!(a.status, 200);
            s
        })
        .collect();
    // 150 more from the same address: each closed at accept.
    let mut flood: Vec<TcpStream> = (0..150)
        .map(|_| connect_from([127, 0, 0, 2], &agent))
        .collect();
    for (i, s) in flood.iter_mut().enumerate() {
        assert!(
            exchange(s, HEALTHZ).is_none() && closed(s),
            "connection {} from 127.0.0.2 was served past max_connections_per_ip",
            51 + i
        );
    }
    // Everyone else is served meanwhile: health, and a function.
    let mut other = connect_from([127, 0, 0, 1], &agent);
    assert_eq!(exchange(&mut other, HEALTHZ).map(|a| a.status), Some(200));
    let mut third = connect_from([127, 0, 0, 3], &agent);
    assert_eq!(exchange(&mut third, HEALTHZ).map(|a| a.status), Some(200));
    assert_eq!(agent.invoke("echo", b"served").text(), "served");

    assert_eq!(
        metric(&agent, "fnlet_connections_refused_total{reason=\"per_ip\"}"),
        Some(150)
    );
    assert_eq!(
        metric(
            &agent,
            "fnlet_connections_refused_total{reason=\"max_connections\"}"
        ),
        Some(0)
    );
    let open = metric(&agent, "fnlet_connections_open").expect("the open-connections gauge");
    assert!(open >= 52, "{open} connections open, 52 at least are");
    // Logged, at most once per 10 s.
    let warnings = agent
        .log()
        .lines()
        .filter(|l| l.contains("limits.max_connections_per_ip reached"))
        .count();
    let most = 1 + started.elapsed().as_secs() as usize / 10;
    assert!(
        (1..=most).contains(&warnings),
        "{warnings} refusal warnings in {:?}:\n{}",
        started.elapsed(),
        agent.log()
    );
    drop(flood);
    drop(held);
}

#[test]
fn past_max_connections_new_ones_are_closed_until_some_close() {
    let agent = Agent::start_with("listener-max", settings("max_connections = 40\n"));
    // Fill every place (the test client's pooled connection may hold one already).
    let mut held = Vec::new();
    let mut first_refused = None;
    for _ in 0..50 {
        let mut s = connect_from([127, 0, 0, 3], &agent);
        match exchange(&mut s, HEALTHZ) {
            Some(a) => {
                assert_eq!(a.status, 200);
                held.push(s);
            }
            None => {
                first_refused = Some(s);
                break;
            }
        }
    }
    assert!(
        first_refused.is_some() && (35..=40).contains(&held.len()),
        "{} connections served, none refused, with max_connections = 40",
        held.len()
    );
    // Full: connections from anywhere are closed at accept.
    for source in [[127, 0, 0, 4], [127, 0, 0, 1]] {
        for _ in 0..10 {
            let mut s = connect_from(source, &agent);
            assert!(
                exchange(&mut s, HEALTHZ).is_none() && closed(&mut s),
                "served past max_connections"
            );
        }
    }
    assert!(
        agent.log().contains("limits.max_connections reached"),
        "{}",
        agent.log()
    );
    // Places free up as connections close.
    drop(held);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut s = connect_from([127, 0, 0, 1], &agent);
        if exchange(&mut s, HEALTHZ).is_some_and(|a| a.status == 200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still refusing after the clients left"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let refused = metric(
        &agent,
        "fnlet_connections_refused_total{reason=\"max_connections\"}",
    )
    .expect("the refusal counter");
    assert!(refused >= 21, "{refused} refusals counted");
    let echo = Fixture::sh("echo", "public = true", "cat");
    agent.deploy(echo.path());
    assert_eq!(agent.invoke("echo", b"back").text(), "back");
}
