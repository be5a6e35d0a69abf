//! The listener on a real loopback socket with a small router: every limit provoked by a raw
//! TCP client. Timeouts are short; each wait allows several times its bound.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

use super::*;

/// Long enough for any close the listener owes us, on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(10);

fn limits() -> ListenerLimits {
    ListenerLimits {
        header_timeout: Duration::from_secs(1),
        body_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(2),
        max_connections: 100,
        max_connections_per_ip: 100,
    }
}

fn router() -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/thread",
            get(|| async { std::thread::current().name().unwrap_or("?").to_string() }),
        )
        .route(
            "/who",
            get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(2500)).await;
                "done\n"
            }),
        )
        .route(
            "/hang",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                "never\n"
            }),
        )
        .route(
            "/echo",
            post(|headers: HeaderMap, req: Request| async move {
                match crate::api::read_body(&headers, req.into_body(), 1024).await {
                    Ok(b) => b.into_response(),
                    Err(e) => e.into_response(),
                }
            }),
        )
}

struct Server {
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    self_checks: SelfChecks,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    kill: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(limits: ListenerLimits) -> Server {
        // Two serving threads: the limits hold across both.
        let listeners = bind("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let addr = listeners[0].local_addr().unwrap();
        let metrics = Arc::new(Metrics::new());
        let self_checks = SelfChecks::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let kill = CancellationToken::new();
        let done = {
            let (metrics, checks, kill) = (metrics.clone(), self_checks.clone(), kill.clone());
            tokio::spawn(async move {
                let shutdown = async {
                    let _ = stopped.await;
                };
                serve(
                    listeners,
                    router(),
                    limits,
                    &metrics,
                    checks,
                    shutdown,
                    kill,
                )
                .await
                .expect("serving threads");
            })
        };
        Server {
            addr,
            metrics,
            self_checks,
            stop: Some(stop),
            kill,
            done,
        }
    }

    fn metric(&self, line: &str) -> bool {
        self.metrics.render().lines().any(|l| l == line)
    }
}

async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{source}:0").parse().unwrap()).unwrap();
    s.connect(to).await.unwrap()
}

/// One request on `s`; the answer's status line and body (the answer has a Content-Length).
async fn request(s: &mut TcpStream, req: &str) -> (String, String) {
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(PATIENCE, s.read(&mut chunk))
            .await
            .expect("no answer")
            .unwrap();
        assert!(
            n > 0,
            "closed before the answer: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .expect("a content-length");
            if body.len() >= len {
                let status = head.lines().next().unwrap_or_default().to_string();
                return (status, body.to_string());
            }
        }
    }
}

const GET_HEALTHZ: &str = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";

/// Waits until the server closes `s` (EOF or reset); panics if it stays open.
async fn assert_closed(s: &mut TcpStream, what: &str) {
    let mut rest = Vec::new();
    match tokio::time::timeout(PATIENCE, s.read_to_end(&mut rest)).await {
        Ok(_) => {}
        Err(_) => panic!("{what}: still open after {PATIENCE:?}"),
    }
}

#[tokio::test]
async fn a_silent_connection_and_a_partial_head_are_closed_after_the_header_timeout() {
    let server = Server::start(limits()).await;
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let mut partial = TcpStream::connect(server.addr).await.unwrap();
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert_closed(&mut silent, "a silent connection").await;
    assert_closed(&mut partial, "a partial head").await;
    assert!(server.metric("fnlet_connection_timeouts_total{reason=\"header\"} 2"));
}

#[tokio::test]
async fn a_kept_alive_connection_serves_requests_then_closes_when_idle() {
    let server = Server::start(limits()).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    for _ in 0..3 {
        let (status, body) = request(&mut s, GET_HEALTHZ).await;
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("HTTP/1.1 200 OK", "ok\n")
        );
    }
    assert_closed(&mut s, "an idle keep-alive connection").await;
    assert!(server.metric("fnlet_connection_timeouts_total{reason=\"idle\"} 1"));
    assert!(server.metric("fnlet_connections_open 0"));
}

#[tokio::test]
async fn connections_are_spread_over_the_serving_threads_and_each_served_on_one() {
    let server = Server::start(limits()).await;
    let mut seen = std::collections::BTreeSet::new();
    // The kernel picks a socket by the connection's addresses: 32 connections all landing on
    // one of two sockets has a chance of 2^-31.
    for _ in 0..32 {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        let (_, first) = request(&mut s, "GET /thread HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let (_, again) = request(&mut s, "GET /thread HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(first, again, "one connection, two threads");
        seen.insert(first);
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["fnlet-http-0", "fnlet-http-1"]
    );
}

#[test]
fn an_address_in_use_is_refused_as_with_one_socket() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    for threads in [1, 4] {
        let e = bind(addr, threads).expect_err("bound a port in use");
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{threads} threads");
    }
    // And the other way round: a group holding the port keeps a later plain bind out.
    let group = bind("127.0.0.1:0".parse().unwrap(), 3).unwrap();
    let port = group[0].local_addr().unwrap();
    assert!(group.iter().all(|l| l.local_addr().unwrap() == port));
    assert!(std::net::TcpListener::bind(port).is_err());
    assert!(bind(port, 2).is_err());
}

#[tokio::test]
async fn a_request_in_flight_outlasts_every_timeout() {
    // /slow answers after more than the idle and twice the header timeout.
    let server = Server::start(limits()).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let (status, body) = request(&mut s, "GET /slow HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(
        (status.as_str(), body.as_str()),
        ("HTTP/1.1 200 OK", "done\n")
    );
}

#[tokio::test]
async fn a_stalled_body_is_answered_408_and_the_connection_closed() {
    let server = Server::start(limits()).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    // A whole body still works.
    let (status, body) = request(
        &mut s,
        "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    assert_eq!(
        (status.as_str(), body.as_str()),
        ("HTTP/1.1 200 OK", "hello")
    );
    let (status, body) = request(
        &mut s,
        "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc",
    )
    .await;
    assert_eq!(status, "HTTP/1.1 408 Request Timeout", "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["kind"], "request_timeout", "{v}");
    assert_closed(&mut s, "the connection of a cut body").await;
    assert!(server.metric("fnlet_connection_timeouts_total{reason=\"body\"} 1"));
}

#[tokio::test]
async fn handlers_see_the_client_address() {
    let server = Server::start(limits()).await;
    let mut s = connect_from("127.0.0.3", server.addr).await;
    let me = s.local_addr().unwrap();
    let (_, body) = request(&mut s, "GET /who HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(body, me.to_string());
}

#[tokio::test]
async fn a_client_past_its_limit_is_closed_at_accept_and_others_are_served() {
    let server = Server::start(ListenerLimits {
        max_connections_per_ip: 3,
        idle_timeout: PATIENCE * 3,
        ..limits()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = connect_from("127.0.0.2", server.addr).await;
        // Answered: admitted, and kept open.
        request(&mut s, GET_HEALTHZ).await;
        held.push(s);
    }
    let mut extra = connect_from("127.0.0.2", server.addr).await;
    assert_closed(&mut extra, "a connection past the per-client limit").await;
    let mut other = connect_from("127.0.0.1", server.addr).await;
    let (status, _) = request(&mut other, GET_HEALTHZ).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(server.metric("fnlet_connections_refused_total{reason=\"per_ip\"} 1"));
    assert!(server.metric("fnlet_connections_open 4"));
    // One closes: the client gets a place again.
    drop(held.pop());
    for _ in 0..100 {
        if server.metric("fnlet_connections_open 3") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut again = connect_from("127.0.0.2", server.addr).await;
    request(&mut again, GET_HEALTHZ).await;
}

#[tokio::test]
async fn past_max_connections_only_the_self_check_gets_in() {
    let server = Server::start(ListenerLimits {
        max_connections: 2,
        idle_timeout: PATIENCE * 3,
        ..limits()
    })
    .await;
    let mut held = Vec::new();
    for source in ["127.0.0.2", "127.0.0.3"] {
        let mut s = connect_from(source, server.addr).await;
        request(&mut s, GET_HEALTHZ).await;
        held.push(s);
    }
    let mut extra = connect_from("127.0.0.4", server.addr).await;
    assert_closed(&mut extra, "a connection past max_connections").await;
    assert!(server.metric("fnlet_connections_refused_total{reason=\"max_connections\"} 1"));
    crate::systemd::self_check(server.addr, &server.self_checks)
        .await
        .expect("the self-check gets in past the limit");
}

#[tokio::test]
async fn http2_with_prior_knowledge_is_served() {
    let server = Server::start(limits()).await;
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/who", server.addr))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let peer: SocketAddr = String::from_utf8_lossy(&body).parse().unwrap();
    assert_eq!(peer.ip(), IpAddr::from([127, 0, 0, 1]));
}

#[tokio::test]
async fn shutdown_lets_requests_in_flight_finish_and_closes_idle_connections() {
    let mut server = Server::start(ListenerLimits {
        idle_timeout: PATIENCE * 3,
        ..limits()
    })
    .await;
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    request(&mut idle, GET_HEALTHZ).await;
    let mut busy = TcpStream::connect(server.addr).await.unwrap();
    busy.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // The slow request is in flight before the shutdown begins.
    for _ in 0..100 {
        if server.metric("fnlet_connections_open 2") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = server.stop.take().unwrap().send(());
    assert_closed(&mut idle, "an idle connection at shutdown").await;
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, busy.read_to_end(&mut answer))
        .await
        .expect("the slow answer")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 200 OK") && answer.ends_with("done\n"),
        "{answer}"
    );
    tokio::time::timeout(PATIENCE, &mut server.done)
        .await
        .expect("serve returns once every connection closed")
        .unwrap();
    // No new connection is taken.
    assert!(TcpStream::connect(server.addr).await.is_err());
}

#[tokio::test]
async fn after_the_grace_and_the_kill_connections_still_open_are_dropped() {
    let mut server = Server::start(limits()).await;
    // A request that never ends, as an invocation the kill failed to end would not.
    let mut stuck = TcpStream::connect(server.addr).await.unwrap();
    stuck
        .write_all(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = server.stop.take().unwrap().send(());
    // Shutdown waits for it ...
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !server.done.is_finished(),
        "serve waits for the request in flight"
    );
    // ... until the kill, and the time to write answers after it, are over.
    server.kill.cancel();
    tokio::time::timeout(WRITE_AFTER_KILL + PATIENCE, &mut server.done)
        .await
        .expect("serve gives up on the connection")
        .unwrap();
    assert_closed(&mut stuck, "a connection still open after the kill").await;
}
