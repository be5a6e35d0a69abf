//! Reading out request bodies the agent refused, so the client gets to read the answer.
//!
//! When the agent answers before it has read the body (401, 413 on Content-Length, 413 past the
//! limit), hyper closes the connection with the rest of the body unread. A client still writing
//! it (most HTTP clients, fnlet's own included, send no `Expect: 100-continue`) then fails with
//! EPIPE or a reset instead of reading the 401 or 413. Like nginx's lingering close, a refused
//! body is read and thrown away in the background, for a bounded time and size.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use futures_util::StreamExt;
use hyper::body::{Frame, SizeHint};

/// Most bytes thrown away per refused request; past it the connection is closed.
const DRAIN_MAX_BYTES: u64 = 1 << 30;
/// Longest a refused body is read; a slower client sees the connection closed.
const DRAIN_MAX_TIME: Duration = Duration::from_secs(10);

/// Middleware (`axum::middleware::map_request`): wraps every request body.
pub async fn drain_refused_bodies(req: Request) -> Request {
    wrap(req)
}

/// [`drain_refused_bodies`], for a request that skips the router ([`super::hot`]).
pub fn wrap(req: Request) -> Request {
    req.map(|b| Body::new(DrainOnDrop(Some(b))))
}

/// A request body that, dropped before its end, is read to the end in the background.
struct DrainOnDrop(Option<Body>);

impl HttpBody for DrainOnDrop {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        match self.get_mut().0.as_mut() {
            Some(b) => Pin::new(b).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.0.as_ref().map(|b| b.size_hint()).unwrap_or_default()
    }
}

impl Drop for DrainOnDrop {
    fn drop(&mut self) {
        let Some(body) = self.0.take() else { return };
        if body.is_end_stream() {
            return;
        }
        // Dropped outside the runtime (never, in the server): let the connection close.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(drain(body));
        }
    }
}

async fn drain(body: Body) {
    let mut data = body.into_data_stream();
    let mut read = 0u64;
    let _ = tokio::time::timeout(DRAIN_MAX_TIME, async {
        while let Some(Ok(chunk)) = data.next().await {
            read += chunk.len() as u64;
            if read > DRAIN_MAX_BYTES {
                break;
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A body that records whether it was read to its end.
    fn tracked(chunks: usize) -> (Body, Arc<AtomicBool>) {
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let stream = futures_util::stream::iter(
            (0..chunks).map(|_| Ok::<_, std::io::Error>(Bytes::from_static(b"xxxx"))),
        )
        .chain(futures_util::stream::once(async move {
            d.store(true, Ordering::SeqCst);
            Ok(Bytes::new())
        }));
        (Body::from_stream(stream), done)
    }

    #[tokio::test]
    async fn a_dropped_body_is_read_to_its_end() {
        let (body, done) = tracked(1000);
        drop(DrainOnDrop(Some(body)));
        for _ in 0..100 {
            if done.load(Ordering::SeqCst) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the refused body was not drained");
    }

    #[tokio::test]
    async fn a_read_body_passes_through() {
        use http_body_util::BodyExt;
        let (body, done) = tracked(3);
        let all = DrainOnDrop(Some(body)).collect().await.unwrap().to_bytes();
        assert_eq!(&all[..], b"xxxxxxxxxxxx");
        assert!(done.load(Ordering::SeqCst));
    }
}
