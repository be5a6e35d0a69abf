//! A TCP stream that follows the thread serving it: registered with the event loop of the HTTP
//! thread that polls it, and moved to another's (one `epoll_ctl` out, one in) when a call on
//! that thread takes its instance. A Lambda instance's Runtime API connection is driven by
//! whichever call holds the instance; polled from another thread's loop, each of its events
//! would wake that thread first and this one through it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::api::listener::serving_thread;

pub struct RoamingStream {
    tcp: Option<TcpStream>,
    /// The HTTP thread whose loop `tcp` is registered with; None: the agent's shared runtime.
    home: Option<usize>,
}

impl RoamingStream {
    pub fn new(tcp: TcpStream) -> RoamingStream {
        RoamingStream {
            tcp: Some(tcp),
            home: serving_thread(),
        }
    }

    /// The stream, registered with this thread's loop if this is an HTTP thread. Polled from
    /// the shared runtime (a forwarded call, an async event) it stays where it is.
    fn settle(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        let here = serving_thread();
        if here.is_some()
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
        self.get_mut().settle()?.poll_read(cx, buf)
    }
}

impl AsyncWrite for RoamingStream {
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
