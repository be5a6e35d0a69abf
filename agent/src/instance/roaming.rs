//! A TCP stream that follows the thread serving it: registered with the event loop of the HTTP
//! thread that polls it, and moved to another's (one `epoll_ctl` out, one in) when a call on
//! that thread takes its instance. A Lambda instance's Runtime API connection is driven by
//! whichever call holds the instance; polled from another thread's loop, each of its events
//! would wake that thread first and this one through it.
//!
//! Between invocations it is in no loop at all ([`parking`]): the runtime's next `/next`
//! arrives right after each answer and waits there until the next invocation, which reads it.

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::api::listener::serving_thread;

pub struct RoamingStream {
    tcp: Option<TcpStream>,
    /// Out of every event loop while its instance waits for work ([`parking`]).
    detached: Option<std::net::TcpStream>,
    /// The HTTP thread whose loop `tcp` is registered with; None: the agent's shared runtime.
    home: Option<usize>,
}

thread_local! {
    static PARKING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` (the last poll of an idle instance's connections) with every stream that finds
/// nothing to read taken out of its event loop until it is polled again. Otherwise the
/// runtime's next `/next`, which waits until an invocation comes, would wake the thread that
/// last served it for nothing: one wake-up and two context switches per invocation.
pub fn parking<T>(f: impl FnOnce() -> T) -> T {
    PARKING.with(|p| p.set(true));
    let out = f();
    PARKING.with(|p| p.set(false));
    out
}

impl RoamingStream {
    pub fn new(tcp: TcpStream) -> RoamingStream {
        RoamingStream {
            tcp: Some(tcp),
            detached: None,
            home: serving_thread(),
        }
    }

    /// Out of the event loop (`epoll_ctl` DEL); [`RoamingStream::settle`] puts it back.
    fn detach(&mut self) {
        if let Some(tcp) = self.tcp.take() {
            match tcp.into_std() {
                Ok(std) => self.detached = Some(std),
                Err(e) => tracing::debug!("runtime API connection: deregistering: {e}"),
            }
        }
    }

    /// A write straight to the socket while it is out of the loop (a fresh registration would
    /// wait for the loop to report it writable: the runtime's 202, written while parking,
    /// would then wait for the next invocation). None: registered, or the socket is full (it
    /// is registered then, to be woken when it drains).
    fn write_detached(
        &mut self,
        write: impl FnOnce(&mut std::net::TcpStream) -> io::Result<usize>,
    ) -> Option<io::Result<usize>> {
        let std = self.detached.as_mut()?;
        match write(std) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => None,
            done => Some(done),
        }
    }

    /// The stream, registered with this thread's loop if this is an HTTP thread. Polled from
    /// the shared runtime (a forwarded call, an async event) it stays where it is.
    fn settle(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        let here = serving_thread();
        if let Some(std) = self.detached.take() {
            // Readiness is not lost: registering a ready socket reports it at once.
            self.tcp = Some(TcpStream::from_std(std)?);
            self.home = here;
        } else if here.is_some()
            && here != self.home
            && let Some(registered) = self.tcp.take()
        {
            // Readiness is not lost: registering a ready socket reports it at once.
            self.tcp = Some(TcpStream::from_std(registered.into_std()?)?);
            self.home = here;
        }
        match self.tcp.as_mut() {
            Some(tcp) => Ok(Pin::new(tcp)),
            None => Err(io::Error::other(
                "the connection was lost moving between threads",
            )),
        }
    }
}

impl AsyncRead for RoamingStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let parking = PARKING.with(Cell::get);
        if parking && this.detached.is_some() {
            // Stays out until an invocation drives it (which polls it first: woken below).
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let read = this.settle()?.poll_read(cx, buf);
        if read.is_pending() && parking {
            this.detach();
            // No event will wake it now: marked to be polled at the next drive instead
            // (the parking poll's own waker wakes nobody).
            cx.waker().wake_by_ref();
        }
        read
    }
}

impl AsyncWrite for RoamingStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(written) = this.write_detached(|s| io::Write::write(s, buf)) {
            return Poll::Ready(written);
        }
        this.settle()?.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(written) = this.write_detached(|s| io::Write::write_vectored(s, bufs)) {
            return Poll::Ready(written);
        }
        this.settle()?.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.detached.is_some() {
            // A TCP socket has nothing to flush.
            return Poll::Ready(Ok(()));
        }
        this.settle()?.poll_flush(cx)
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

    struct CountWakes(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Parked with nothing to read, a stream leaves the event loop (the peer's next request
    /// wakes no thread) and asks to be polled at the next drive; a write while out goes out
    /// at once; the next drive reads what came meanwhile.
    #[tokio::test]
    async fn a_parked_stream_leaves_the_loop_and_comes_back_with_what_arrived() {
        let far = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let near = tokio::net::TcpStream::connect(far.local_addr().unwrap())
            .await
            .unwrap();
        let (mut peer, _) = far.accept().unwrap();
        let mut stream = RoamingStream::new(near);
        let wakes = Arc::new(CountWakes(Default::default()));
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut buf = [0u8; 8];
        parking(|| {
            let mut rb = ReadBuf::new(&mut buf);
            assert!(
                Pin::new(&mut stream)
                    .poll_read(&mut cx, &mut rb)
                    .is_pending()
            );
        });
        assert!(stream.detached.is_some() && stream.tcp.is_none());
        assert_eq!(wakes.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        parking(|| {
            let w = Pin::new(&mut stream).poll_write(&mut cx, b"202");
            assert!(matches!(w, Poll::Ready(Ok(3))), "{w:?}");
            // Polled again while parking: still out, and no read is tried.
            let mut rb = ReadBuf::new(&mut buf);
            assert!(
                Pin::new(&mut stream)
                    .poll_read(&mut cx, &mut rb)
                    .is_pending()
            );
        });
        assert!(stream.detached.is_some());
        let mut got = [0u8; 3];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"202");
        peer.write_all(b"next").unwrap();
        let mut got = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut got))
            .await
            .expect("the request that came while parked")
            .unwrap();
        assert_eq!(&got, b"next");
        assert!(stream.detached.is_none() && stream.tcp.is_some());
    }

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
        let stream = RoamingStream::new(near);
        assert_eq!(stream.home, None);
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
                    format!("{:?} {:?}", serving_thread(), s.home)
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
            ["Some(0) Some(0)", "Some(1) Some(1)"]
        );
        let _ = stop.send(());
        drop(server.await.unwrap());
        echoer.join().unwrap();
    }
}
