//! Request bodies that stall are cut: no byte for `body_timeout` while the agent waits for one
//! ends the body with [`BodyTimeout`], which the API answers with 408.
//!
//! The clock runs only while the body is being read and nothing comes: time the handler spends
//! elsewhere (before it reads, or between chunks) does not count, and a large upload on a slow
//! but steady link is never cut.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use tokio::time::{Instant, Sleep};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body sent nothing for this long.
#[derive(Debug, thiserror::Error)]
#[error("the request body sent nothing for {} s", .0.as_secs_f64())]
pub struct BodyTimeout(pub Duration);

/// The [`BodyTimeout`] behind a body error, however deeply wrapped.
pub fn body_timeout<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a BodyTimeout> {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if let Some(t) = e.downcast_ref::<BodyTimeout>() {
            return Some(t);
        }
        cur = e.source();
    }
    None
}

/// `inner`, ended with [`BodyTimeout`] when it stalls. After the timeout the inner body is
/// dropped, which tells hyper the rest is not wanted (it closes the connection after the
/// answer) and leaves nothing for the refused-body drain to read.
pub struct TimedBody<B> {
    inner: Option<B>,
    timeout: Duration,
    /// Armed when a poll finds nothing; made at the first such poll (a body that is there at
    /// once, or never read, needs no timer).
    sleep: Option<Pin<Box<Sleep>>>,
    waiting: bool,
    timeouts: Counter,
}

impl<B> TimedBody<B> {
    pub fn new(inner: B, timeout: Duration, timeouts: Counter) -> TimedBody<B> {
        TimedBody {
            inner: Some(inner),
            timeout,
            sleep: None,
            waiting: false,
            timeouts,
        }
    }
}

impl<B> Body for TimedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        if let Poll::Ready(frame) = Pin::new(inner).poll_frame(cx) {
            this.waiting = false;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if !this.waiting {
            let deadline = Instant::now() + this.timeout;
            match this.sleep.as_mut() {
                Some(s) => s.as_mut().reset(deadline),
                None => this.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            this.waiting = true;
        }
        let expired = this
            .sleep
            .as_mut()
            .is_some_and(|s| s.as_mut().poll(cx).is_ready());
        if !expired {
            return Poll::Pending;
        }
        this.inner = None;
        this.sleep = None;
        this.timeouts.inc();
        Poll::Ready(Some(Err(Box::new(BodyTimeout(this.timeout)))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Some(b) => b.size_hint(),
            None => SizeHint::with_exact(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    const T: Duration = Duration::from_secs(30);

    type Chunk = Result<Frame<Bytes>, std::io::Error>;
    type ChannelBody = http_body_util::StreamBody<tokio_stream::wrappers::ReceiverStream<Chunk>>;

    /// A body whose chunks come from a channel: the test decides when (and whether) they come.
    fn channel_body() -> (tokio::sync::mpsc::Sender<Chunk>, ChannelBody) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        (tx, body)
    }

    fn chunk(s: &'static str) -> Chunk {
        Ok(Frame::data(Bytes::from_static(s.as_bytes())))
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stalls_ends_with_the_timeout() {
        let (tx, body) = channel_body();
        let counter = Counter::default();
        let mut b = TimedBody::new(body, T, counter.clone());
        tx.send(chunk("ab")).await.unwrap();
        let first = b.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "ab");
        let started = Instant::now();
        let err = b.frame().await.unwrap().unwrap_err();
        assert_eq!(
            started.elapsed(),
            T,
            "cut after exactly body_timeout of silence"
        );
        assert!(body_timeout(&*err).is_some(), "{err}");
        assert_eq!(counter.get(), 1);
        assert!(b.is_end_stream());
        assert!(b.frame().await.is_none());
        assert!(tx.is_closed(), "the stalled body was dropped");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_steady_body_is_never_cut() {
        let (tx, body) = channel_body();
        let mut b = TimedBody::new(body, T, Counter::default());
        tokio::spawn(async move {
            for _ in 0..10 {
                tokio::time::sleep(T - Duration::from_secs(1)).await;
                tx.send(chunk("x")).await.unwrap();
            }
        });
        let all = (&mut b).collect().await.unwrap().to_bytes();
        assert_eq!(all, "xxxxxxxxxx");
    }

    #[tokio::test(start_paused = true)]
    async fn time_the_reader_spends_elsewhere_does_not_count() {
        let (tx, body) = channel_body();
        let mut b = TimedBody::new(body, T, Counter::default());
        tx.send(chunk("a")).await.unwrap();
        b.frame().await.unwrap().unwrap();
        // The handler is busy for longer than the timeout before it reads on ...
        tokio::time::sleep(T * 3).await;
        tx.send(chunk("b")).await.unwrap();
        let next = b.frame().await.unwrap().unwrap();
        assert_eq!(next.into_data().unwrap(), "b");
        drop(tx);
        assert!(b.frame().await.is_none());
    }

    #[test]
    fn the_timeout_is_found_through_the_api_wrappers() {
        // What read_body sees: Limited's box around axum's error around the timeout.
        let e: BoxError = Box::new(axum::Error::new(BodyTimeout(T)));
        assert_eq!(body_timeout(&*e).map(|t| t.0), Some(T));
        let other: BoxError = Box::new(axum::Error::new(std::io::Error::other("reset")));
        assert!(body_timeout(&*other).is_none());
    }
}
