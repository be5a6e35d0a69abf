//! systemd integration: readiness, status and the watchdog over the notify socket, and logs to
//! the journal with their fields kept. Outside systemd every call here does nothing and logs go
//! to stderr.
//!
//! Pure Rust on purpose: `sd-notify` and `tracing-journald` each send one datagram on a unix
//! socket (`$NOTIFY_SOCKET`, /run/systemd/journal/socket), which is all the protocols are. The
//! `systemd` crate would need libsystemd-dev and pkg-config at build time, link libsystemd.so.0
//! at run time (a package dependency, and no static or musl build) and bring LGPL code, for
//! nothing the agent uses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

use crate::api::listener::SelfChecks;

/// Whether stderr is the journal: systemd sets `JOURNAL_STREAM=<dev>:<inode>` of the stream it
/// connects a service's stdout/stderr to. Checking the inode (not just the variable) keeps a
/// child whose stderr was redirected elsewhere, or a shell started from a service, on stderr.
fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    // dev_t and ino_t are u64 here, not on every target.
    #[allow(clippy::unnecessary_cast)]
    let matches = |st: nix::sys::stat::FileStat| st.st_dev as u64 == dev && st.st_ino as u64 == ino;
    nix::sys::stat::fstat(std::io::stderr()).is_ok_and(matches)
}

/// The log filter: `FNLET_LOG` (`info`, `debug`, `fnlet=debug,hyper=warn`: a default level and
/// levels per module path), else `default_level`. Targets, not tracing's `EnvFilter`: the same
/// syntax minus span and field filters, and no regex engine compiled into the binary.
fn log_filter(default_level: &str) -> Targets {
    let spec = std::env::var("FNLET_LOG").ok();
    let (targets, refused) = parse_log_filter(spec.as_deref(), default_level);
    if let Some(e) = refused {
        eprintln!("fnlet: FNLET_LOG={spec:?} is not a log filter ({e}): using {default_level}");
    }
    targets
}

/// `spec` as a filter, else `default_level` (and why `spec` was refused).
fn parse_log_filter(spec: Option<&str>, default_level: &str) -> (Targets, Option<String>) {
    let fallback = || {
        default_level
            .parse()
            .unwrap_or_else(|_| Targets::new().with_default(tracing::Level::INFO))
    };
    match spec.map(str::trim) {
        Some(spec) if !spec.is_empty() => match spec.parse() {
            Ok(targets) => (targets, None),
            Err(e) => (fallback(), Some(e.to_string())),
        },
        _ => (fallback(), None),
    }
}

/// Sets up logging: `FNLET_LOG` (see [`log_filter`]) or `default_level`. When stderr is the journal,
/// events go over the native journal protocol instead, each field its own journal field
/// (`FUNCTION`, `VERSION`, `REQUEST_ID`, `STREAM`, `INSTANCE`, ... plus the fields of enclosing
/// spans), so `journalctl -u fnlet FUNCTION=hello` works. Returns whether the journal is used.
pub fn init_logging(default_level: &str) -> bool {
    let filter = || log_filter(default_level);
    if stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer
                    // Our field names are short and ours: no `F_` prefix.
                    .with_field_prefix(None)
                    .with_syslog_identifier("fnlet".into())
                    // info is informational (6), not notice (5): one line per invocation.
                    .with_priority_mappings(tracing_journald::PriorityMappings {
                        info: tracing_journald::Priority::Informational,
                        debug: tracing_journald::Priority::Debug,
                        ..tracing_journald::PriorityMappings::new()
                    });
                tracing_subscriber::registry()
                    .with(layer.with_filter(filter()))
                    .init();
                return true;
            }
            Err(e) => {
                // stderr still reaches the journal, as plain lines.
                eprintln!("fnlet: the journal socket is not usable ({e}): logging to stderr");
            }
        }
    }
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Colour codes only for a terminal, not into a file or a pipe.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_filter(filter()),
        )
        .init();
    false
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("notifying systemd: {e}");
    }
}

/// READY=1 with a one-line STATUS=.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// STATUS= alone (shown by `systemctl status`).
pub fn status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

/// STOPPING=1: the agent is draining; systemd shows "deactivating".
pub fn stopping(status: &str) {
    notify(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// Where the agent can reach its own API: the listen address, with an unspecified IP
/// (0.0.0.0, ::) replaced by loopback.
fn self_address(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// Under systemd (RuntimeDirectory=fnlet), writes `endpoint` there: the URL the CLI on this host
/// should use (see `cli::client::RUNTIME_ENDPOINT_FILE`). systemd removes it when the agent stops.
pub fn publish_endpoint(listen: SocketAddr) {
    let Some(dir) = std::env::var_os("RUNTIME_DIRECTORY") else {
        return;
    };
    let Some(first) = dir
        .to_str()
        .and_then(|d| d.split(':').next())
        .map(String::from)
    else {
        return;
    };
    let path = std::path::Path::new(&first).join("endpoint");
    let url = format!("http://{}\n", self_address(listen));
    if let Err(e) = std::fs::write(&path, url) {
        tracing::warn!(path = %path.display(), "cannot publish the API endpoint: {e}");
    }
}

/// One `GET /healthz` over TCP to our own listener: proves the runtime schedules tasks, the
/// accept loop runs and a handler answers, not merely that some thread is alive. The socket is
/// bound first and its address given a pass in `checks`: the listener lets it in even when
/// clients fill every connection slot (which is theirs to do, not a wedged agent).
pub async fn self_check(listen: SocketAddr, checks: &SelfChecks) -> Result<(), String> {
    let addr = self_address(listen);
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .and_then(|s| s.bind(SocketAddr::new(addr.ip(), 0)).map(|()| s))
    .map_err(|e| format!("socket for {addr}: {e}"))?;
    let from = socket
        .local_addr()
        .map_err(|e| format!("socket for {addr}: {e}"))?;
    let _pass = checks.pass(from);
    let mut s = socket
        .connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: fnlet\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)
        .await
        .map_err(|e| format!("read: {e}"))?;
    if &head == b"HTTP/1.1 200" {
        Ok(())
    } else {
        Err(format!("answered {:?}", String::from_utf8_lossy(&head)))
    }
}

/// With `WatchdogSec=` set, pings systemd every half period, each time only after a
/// [`self_check`] succeeded; a wedged runtime or listener misses the pings and systemd restarts
/// the agent (`Restart=on-failure`). While draining the listener is closed: the ping then only
/// proves the runtime runs. `summary` refreshes STATUS= when it changes. Without a watchdog
/// this still refreshes STATUS= every 10 s.
pub fn spawn_watchdog(
    listen: SocketAddr,
    checks: SelfChecks,
    draining: CancellationToken,
    summary: impl Fn() -> String + Send + 'static,
) {
    let watchdog = sd_notify::watchdog_enabled();
    let period = watchdog.map_or(Duration::from_secs(10), |w| w / 2);
    let check_timeout = watchdog.map_or(Duration::from_secs(5), |w| {
        (w / 4).min(Duration::from_secs(5))
    });
    if let Some(w) = watchdog {
        tracing::info!(
            watchdog_s = w.as_secs_f64(),
            "systemd watchdog on: pinging after each self-check of the API"
        );
    }
    tokio::spawn(async move {
        let mut last = String::new();
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            if draining.is_cancelled() {
                if watchdog.is_some() {
                    notify(&[NotifyState::Watchdog]);
                }
                continue;
            }
            if watchdog.is_some() {
                match tokio::time::timeout(check_timeout, self_check(listen, &checks)).await {
                    Ok(Ok(())) => notify(&[NotifyState::Watchdog]),
                    Ok(Err(e)) => tracing::warn!("self-check failed, watchdog not pinged: {e}"),
                    Err(_) => tracing::warn!(
                        timeout_s = check_timeout.as_secs_f64(),
                        "self-check timed out, watchdog not pinged"
                    ),
                }
            }
            let now = summary();
            if now != last {
                status(&now);
                last = now;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use tracing::level_filters::LevelFilter;

    #[test]
    fn log_filter_reads_levels_per_module() {
        let (t, refused) = super::parse_log_filter(Some("fnlet=debug,hyper=warn,info"), "info");
        assert!(refused.is_none());
        assert!(t.would_enable("fnlet::router", &tracing::Level::DEBUG));
        assert!(!t.would_enable("hyper::proto", &tracing::Level::INFO));
        assert!(t.would_enable("axum", &tracing::Level::INFO));
        assert!(!t.would_enable("axum", &tracing::Level::DEBUG));
    }

    #[test]
    fn log_filter_refuses_nonsense_and_keeps_the_default() {
        let (t, refused) = super::parse_log_filter(Some("fnlet=loud"), "warn");
        assert!(refused.is_some());
        assert_eq!(t.default_level(), Some(LevelFilter::WARN));
        let (t, refused) = super::parse_log_filter(None, "debug");
        assert!(refused.is_none());
        assert_eq!(t.default_level(), Some(LevelFilter::DEBUG));
    }

    use super::*;

    #[test]
    fn self_address_uses_loopback_for_wildcards() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(self_address(a("0.0.0.0:8740")), a("127.0.0.1:8740"));
        assert_eq!(self_address(a("[::]:1")), a("[::1]:1"));
        assert_eq!(self_address(a("10.1.2.3:80")), a("10.1.2.3:80"));
    }

    #[tokio::test]
    async fn self_check_wants_a_200() {
        async fn serve_once(answer: &'static [u8]) -> SocketAddr {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = [0u8; 256];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer).await;
            });
            addr
        }
        let ok = serve_once(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n").await;
        let checks = SelfChecks::default();
        self_check(ok, &checks).await.unwrap();
        let bad = serve_once(b"HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        assert!(self_check(bad, &checks).await.unwrap_err().contains("503"));
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert!(self_check(closed, &checks).await.is_err());
    }

    #[test]
    fn without_journal_stream_stderr_is_not_the_journal() {
        // The test runner's stderr is a pipe or a tty, never the inode JOURNAL_STREAM names
        // (unset here unless the tests run under systemd, where it names another stream).
        if std::env::var_os("JOURNAL_STREAM").is_none() {
            assert!(!stderr_is_journal());
        }
    }
}
