//! A stream (TCP, or the Unix socket pair behind an instance's Runtime API port) that follows
//! the thread serving it: registered with the event loop of the HTTP
//! thread that polls it, and moved to another's (one `epoll_ctl` out, one in) when a call on
//! that thread takes its instance. A Lambda instance's Runtime API connection is driven by
//! whichever call holds the instance; polled from another thread's loop, each of its events
//! would wake that thread first and this one through it.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::api::listener::serving_thread;

/// A tokio stream that can leave the event loop it is registered with for the current one.
pub trait Roam: AsyncRead + AsyncWrite + Unpin + Sized {
    fn reregister(self) -> io::Result<Self>;
}

impl Roam for TcpStream {
    fn reregister(self) -> io::Result<Self> {
        TcpStream::from_std(self.into_std()?)
    }
}

impl Roam for UnixStream {
    fn reregister(self) -> io::Result<Self> {
        UnixStream::from_std(self.into_std()?)
    }
}

pub struct RoamingStream<S = TcpStream> {
    tcp: Option<S>,
    /// The HTTP thread whose loop `tcp` is registered with; None: the agent's shared runtime.
    home: Option<usize>,
    /// `home`, for the pool to read: a call prefers an idle instance whose connection is
    /// already on its own thread (no move, no `epoll_ctl`).
    shared: Arc<Home>,
}

/// Where a [`RoamingStream`] is registered, readable from other threads.
#[derive(Debug)]
pub struct Home(AtomicUsize);

const NO_HOME: usize = usize::MAX;

impl Default for Home {
    fn default() -> Home {
        Home(AtomicUsize::new(NO_HOME))
    }
}

impl Home {
    pub fn get(&self) -> Option<usize> {
        Some(self.0.load(Ordering::Relaxed)).filter(|&t| t != NO_HOME)
    }

    fn set(&self, thread: Option<usize>) {
        self.0.store(thread.unwrap_or(NO_HOME), Ordering::Relaxed);
    }
}

impl<S: Roam> RoamingStream<S> {
    pub fn new(tcp: S, shared: Arc<Home>) -> RoamingStream<S> {
        let home = serving_thread();
        shared.set(home);
        RoamingStream {
            tcp: Some(tcp),
            home,
            shared,
        }
    }

    /// The stream, registered with this thread's loop if this is an HTTP thread. Polled from
    /// the shared runtime (a forwarded call, an async event) it stays where it is.
    fn settle(&mut self) -> io::Result<Pin<&mut S>> {
        let here = serving_thread();
        if here.is_some()
            && here != self.home
            && let Some(registered) = self.tcp.take()
        {
            // Readiness is not lost: registering a ready socket reports it at once.
            self.tcp = Some(registered.reregister()?);
            self.home = here;
            self.shared.set(here);
        }
        match self.tcp.as_mut() {
            Some(tcp) => Ok(Pin::new(tcp)),
            None => Err(io::Error::other(
                "the connection was lost moving between threads",
            )),
        }
    }
}

impl<S: Roam> AsyncRead for RoamingStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut().settle()?.poll_read(cx, buf)
    }
}

impl<S: Roam> AsyncWrite for RoamingStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().settle()?.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().settle()?.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().settle()?.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().settle()?.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::api::listener::{ListenerLimits, SelfChecks, bind, serve};
    use crate::metrics::Metrics;

    /// One stream, used by calls on two HTTP threads in turn: each exchange works, and each
    /// happens with the stream registered with the calling thread's loop.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_moves_to_the_loop_of_each_thread_that_uses_it() {
        let far = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let near = tokio::net::TcpStream::connect(far.local_addr().unwrap())
            .await
            .unwrap();
        let (mut echo, _) = far.accept().unwrap();
        // The far end echoes every byte, until the stream closes.
        let echoer = std::thread::spawn(move || {
            let mut b = [0u8; 1];
            while echo.read_exact(&mut b).is_ok() {
                if echo.write_all(&b).is_err() {
                    break;
                }
            }
        });
        // Made on the shared runtime, as an instance started by the reaper would be.
        let home = Arc::new(Home::default());
        let stream = RoamingStream::new(near, home.clone());
        assert_eq!((stream.home, home.get()), (None, None));
        let stream = Arc::new(tokio::sync::Mutex::new(stream));
        let app = axum::Router::new().route(
            "/roam",
            axum::routing::get(move || {
                let stream = stream.clone();
                async move {
                    let mut s = stream.lock().await;
                    s.write_all(b"x").await.unwrap();
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b).await.unwrap();
                    assert_eq!(&b, b"x");
                    format!("{:?} {:?} {:?}", serving_thread(), s.home, s.shared.get())
                }
            }),
        );
        let listeners = bind("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let addr = listeners[0].local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let limits = ListenerLimits {
                header_timeout: Duration::from_secs(10),
                body_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_secs(10),
                max_connections: 100,
                max_connections_per_ip: 100,
            };
            let metrics = Metrics::new();
            let shutdown = async {
                let _ = stopped.await;
            };
            serve(
                listeners,
                app,
                limits,
                &metrics,
                SelfChecks::default(),
                shutdown,
                CancellationToken::new(),
            )
            .await
            .expect("serving threads")
        });
        // A new connection per call: no pool.
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let mut answers = std::collections::BTreeSet::new();
        // 32 connections over two threads: both take the stream (a chance of 2^-31 not).
        for _ in 0..32 {
            let r = client
                .get(format!("http://{addr}/roam"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            answers.insert(r.text().await.unwrap());
        }
        assert_eq!(
            answers.into_iter().collect::<Vec<_>>(),
            ["Some(0) Some(0) Some(0)", "Some(1) Some(1) Some(1)"]
        );
        let _ = stop.send(());
        drop(server.await.unwrap());
        echoer.join().unwrap();
    }
}
