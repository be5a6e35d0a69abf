//! One runtime connection to the Runtime API. Every warm invocation makes two requests here, a
//! `GET .../invocation/next` and a buffered `POST .../invocation/{id}/response`, and hyper's
//! connection machinery (its dispatcher, the body channel between the connection and the
//! handler, the service call, a header map each way) cost more than the work they carry
//! (BENCHMARKS.md, Lambda runs 18-20; what leaving it saved: run 31). So a plain request, its
//! whole head and `Content-Length` body in hand, is framed here on httparse (hyper's own
//! parser) and answered by the same [`super::runtime_api`] handlers. Anything else (a chunked
//! or streamed body, an `Expect` other than `100-continue`, HTTP/1.0, `Connection: close` or
//! `Upgrade`, a body over the response limit, a head that does not parse, a request cut off)
//! goes to hyper with the bytes already read, and the connection stays with hyper from then
//! on: what hyper handles well, we do not redo.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http::{HeaderName, HeaderValue, Method, Request, header};
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::roaming::{Roam, RoamingStream};
use super::runtime_api::{
    Invocation, Route, RuntimeApi, buffered_response, dispatch, handout, request_id, route,
};

/// A head longer than this is hyper's to judge (runtime clients send a few hundred bytes).
const MAX_HEAD: usize = 16 * 1024;
/// Headers a request may have to be framed here; more go to hyper.
const MAX_HEADERS: usize = 32;
/// Answers up to this size go out in one buffer; larger bodies are written beside their head.
const COPY_BODY_UNDER: usize = 16 * 1024;

/// Serves one runtime connection until it closes.
pub(super) async fn serve<S: Roam + Send + 'static>(
    mut io: RoamingStream<S>,
    api: Arc<RuntimeApi>,
) {
    let mut buf = BytesMut::with_capacity(4096);
    let mut out = Vec::with_capacity(1024);
    loop {
        let plain = loop {
            match frame(&buf, api.max_response) {
                Framing::Complete(plain) => break plain,
                Framing::Partial => {}
                // Room for the whole body at once: no growing by small steps.
                Framing::Body { whole } => buf.reserve(whole.saturating_sub(buf.len())),
                Framing::Hyper => return hyper_rest(io, buf.freeze(), api).await,
            }
            match io.read_buf(&mut buf).await {
                // Closed between requests: done.
                Ok(0) if buf.is_empty() => return,
                // Cut off inside a request: hyper makes of it what it makes of any (a
                // response's body reports the cut, which the invocation is told about).
                Ok(0) => return hyper_rest(io, buf.freeze(), api).await,
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!("runtime API connection: {e}");
                    return;
                }
            }
        };
        if plain.expects_continue {
            // The body is not sent until it is asked for (curl does so for large bodies unless
            // told not to).
            if let Err(e) = io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await {
                tracing::debug!("runtime API connection: {e}");
                return;
            }
            let whole = plain.head_len + plain.content_length;
            buf.reserve(whole.saturating_sub(buf.len()));
            while buf.len() < whole {
                match io.read_buf(&mut buf).await {
                    // Cut off inside the body: hyper is given it as it came.
                    Ok(0) => return hyper_rest(io, buf.freeze(), api).await,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!("runtime API connection: {e}");
                        return;
                    }
                }
            }
        }
        let head = buf.split_to(plain.head_len).freeze();
        let body = buf.split_to(plain.content_length).freeze();
        let path = std::str::from_utf8(&head[plain.path.clone()]).unwrap_or_default();
        let written = match route(path) {
            // The two requests of every warm call answered without a header map.
            Route::Next if plain.method == Method::GET => match handout(&api).await {
                Ok(event) => write_event(&mut io, &mut out, event).await,
                Err(refused) => write_answer(&mut io, &mut out, refused).await,
            },
            Route::Response(id) if plain.method == Method::POST && !plain.names_mode => {
                match buffered_response(&api, &request_id(id), body).await {
                    Ok(()) => io.write_all(ACCEPTED).await,
                    Err(refused) => write_answer(&mut io, &mut out, refused).await,
                }
            }
            _ => {
                let answer = dispatch(&api, request(&head, &plain, body)).await;
                write_answer(&mut io, &mut out, answer).await
            }
        };
        if let Err(e) = written {
            tracing::debug!("runtime API connection: {e}");
            return;
        }
    }
}

/// A request head as framed here; it stays in the bytes it came in.
struct Plain {
    method: Method,
    /// Where the request target is in the head.
    path: std::ops::Range<usize>,
    head_len: usize,
    content_length: usize,
    /// `Expect: 100-continue`: the body comes after the interim answer.
    expects_continue: bool,
    /// It names a response mode (`Lambda-Runtime-Function-Response-Mode`), which the
    /// general handler reads.
    names_mode: bool,
}

/// The runtime's 202 for an answer it posted, as [`super::runtime_api`] makes it.
const ACCEPTED: &[u8] = b"HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n{\"status\":\"OK\"}";

enum Framing {
    /// The head, and (unless it asked to continue) the whole body, are in the buffer.
    Complete(Plain),
    /// More bytes are needed.
    Partial,
    /// The head is here; the body is not, and the request ends at `whole` bytes.
    Body { whole: usize },
    /// Not a plain request: hyper serves it, and the rest of the connection.
    Hyper,
}

/// Frames the request at the start of `buf`, if it is a plain one.
fn frame(buf: &[u8], max_body: usize) -> Framing {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Framing::Partial,
        _ => return Framing::Hyper,
    };
    if req.version != Some(1) {
        return Framing::Hyper;
    }
    let method = match req.method {
        Some("GET") => Method::GET,
        Some("POST") => Method::POST,
        _ => return Framing::Hyper,
    };
    // The origin form without a query, as runtime clients send: the rest is hyper's to parse.
    let Some(path) = req.path.filter(|p| p.starts_with('/') && !p.contains('?')) else {
        return Framing::Hyper;
    };
    // httparse's target is a slice of `buf`: its place, to find it again.
    let Some(path_at) = (path.as_ptr() as usize).checked_sub(buf.as_ptr() as usize) else {
        return Framing::Hyper;
    };
    let path = path_at..path_at + path.len();
    let mut content_length = None;
    let mut expects_continue = false;
    let mut names_mode = false;
    for h in req.headers.iter() {
        // httparse checked the name; a value a header map would refuse is hyper's to judge.
        if !h
            .value
            .iter()
            .all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f))
        {
            return Framing::Hyper;
        }
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            // Digits only, as hyper reads it (`parse` alone would take a sign).
            let n = std::str::from_utf8(h.value)
                .ok()
                .map(str::trim)
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<usize>().ok());
            match (n, content_length) {
                (Some(n), None) => content_length = Some(n),
                // Unreadable, or given twice: hyper decides (and refuses what is ambiguous).
                _ => return Framing::Hyper,
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"upgrade")
        {
            return Framing::Hyper;
        } else if name.eq_ignore_ascii_case(b"connection") {
            if !h.value.eq_ignore_ascii_case(b"keep-alive") {
                return Framing::Hyper;
            }
        } else if name.eq_ignore_ascii_case(b"expect") {
            if !h.value.eq_ignore_ascii_case(b"100-continue") {
                return Framing::Hyper;
            }
            expects_continue = true;
        } else if name.eq_ignore_ascii_case(b"lambda-runtime-function-response-mode") {
            names_mode = true;
        }
    }
    let content_length = content_length.unwrap_or(0);
    if content_length > max_body || (method == Method::GET && content_length > 0) {
        return Framing::Hyper;
    }
    // Asked to continue with the body already here: the client did not wait, nothing to ask.
    let expects_continue = expects_continue && content_length > 0 && buf.len() == head_len;
    if !expects_continue && buf.len() < head_len + content_length {
        return Framing::Body {
            whole: head_len + content_length,
        };
    }
    Framing::Complete(Plain {
        method,
        path,
        head_len,
        content_length,
        expects_continue,
        names_mode,
    })
}

/// The request for the general handler, its header map made from the head.
fn request(head: &[u8], plain: &Plain, body: Bytes) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(body));
    *req.method_mut() = plain.method.clone();
    if let Ok(uri) = std::str::from_utf8(&head[plain.path.clone()])
        .unwrap_or_default()
        .parse()
    {
        *req.uri_mut() = uri;
    }
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut slots);
    // The same bytes parsed once already: this cannot fail.
    if parsed.parse(head).is_ok() {
        let headers = req.headers_mut();
        headers.reserve(parsed.headers.len());
        for h in parsed.headers.iter() {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(h.name.as_bytes()),
                HeaderValue::from_bytes(h.value),
            ) {
                headers.append(name, value);
            }
        }
    }
    req
}

/// Writes `answer` as an HTTP/1.1 response with a `Content-Length` body.
async fn write_answer<S: Roam>(
    io: &mut RoamingStream<S>,
    out: &mut Vec<u8>,
    answer: axum::response::Response,
) -> io::Result<()> {
    let (parts, body) = answer.into_parts();
    // The handlers' bodies are whole (an event, an error's JSON, a 202's status).
    let body = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => return Err(io::Error::other(e)),
    };
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        parts
            .status
            .canonical_reason()
            .unwrap_or("Unknown")
            .as_bytes(),
    );
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    send(io, out, &body).await
}

/// Writes `/next`'s answer: the event and its `Lambda-Runtime-*` headers
/// ([`Invocation::each_header`]; a value a header cannot carry is left out).
async fn write_event<S: Roam>(
    io: &mut RoamingStream<S>,
    out: &mut Vec<u8>,
    event: Invocation,
) -> io::Result<()> {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n");
    event.each_header(|name, value| {
        // What `HeaderValue::from_str` takes (visible ASCII and tab), as hyper's path does.
        if value
            .bytes()
            .all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
        {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    });
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(event.body.len()).as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    send(io, out, &event.body).await
}

/// Writes the head in `out`, then `body`: copied behind the head when small, beside it
/// (vectored) when large.
async fn send<S: Roam>(
    io: &mut RoamingStream<S>,
    out: &mut Vec<u8>,
    body: &[u8],
) -> io::Result<()> {
    if body.len() < COPY_BODY_UNDER {
        out.extend_from_slice(body);
        return io.write_all(out).await;
    }
    write_both(io, out, body).await
}

/// Writes `head` then `body`, vectored: a large event is not copied behind its head.
async fn write_both<S: Roam>(
    io: &mut RoamingStream<S>,
    head: &[u8],
    body: &[u8],
) -> io::Result<()> {
    let (mut head, mut body) = (head, body);
    while !head.is_empty() {
        let n = io
            .write_vectored(&[io::IoSlice::new(head), io::IoSlice::new(body)])
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_head = n.min(head.len());
        head = &head[from_head..];
        body = &body[n - from_head..];
    }
    io.write_all(body).await
}

/// Hands the connection to hyper, `read` (bytes already taken off the socket) first.
async fn hyper_rest<S: Roam + Send + 'static>(
    io: RoamingStream<S>,
    read: Bytes,
    api: Arc<RuntimeApi>,
) {
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        // Boxed once: hyper would move the request's future on its way in.
        let answer = Box::pin(dispatch_owned(api.clone(), req));
        async move { Ok::<_, std::convert::Infallible>(answer.await) }
    });
    let io = Rewind { read, io };
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .await
    {
        tracing::debug!("runtime API connection: {e}");
    }
}

async fn dispatch_owned(
    api: Arc<RuntimeApi>,
    req: Request<hyper::body::Incoming>,
) -> axum::response::Response {
    dispatch(&api, req).await
}

/// A stream with bytes already read off it put back in front.
struct Rewind<S> {
    read: Bytes,
    io: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::sync::oneshot;
    use tokio_util::sync::CancellationToken;

    use super::super::runtime_api::{Reply, RuntimeHandle, serve};
    use super::{Framing, MAX_HEAD, frame};

    /// The Runtime API with a 1,024-byte response limit, and its address.
    fn start() -> (RuntimeHandle, std::net::SocketAddr, CancellationToken) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let stop = CancellationToken::new();
        let handle = serve(l, stop.clone(), 1024).unwrap();
        (handle, addr, stop)
    }

    async fn send_event(
        h: &RuntimeHandle,
        id: &str,
        body: &'static str,
    ) -> oneshot::Receiver<Reply> {
        let (mut e, rx) = super::super::runtime_api::tests::event(id, body);
        // Not a header's value: left out, as hyper's path leaves it out.
        e.invocation.cognito_identity = Some("not\r\nsafe".into());
        h.events.send(e).await.unwrap();
        rx
    }

    /// A raw runtime connection that reads answers one at a time, whatever arrives together.
    struct Raw {
        tcp: TcpStream,
        buf: Vec<u8>,
    }

    /// One answer: status, headers (lowercase names) and body.
    struct Answer {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Answer {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        }
    }

    impl Raw {
        async fn connect(addr: std::net::SocketAddr) -> Raw {
            Raw {
                tcp: TcpStream::connect(addr).await.unwrap(),
                buf: Vec::new(),
            }
        }

        async fn write(&mut self, bytes: &[u8]) {
            self.tcp.write_all(bytes).await.unwrap();
        }

        /// Writes `bytes` one at a time, each on its own, so the server sees every split.
        async fn trickle(&mut self, bytes: &[u8]) {
            for b in bytes {
                self.tcp.write_all(&[*b]).await.unwrap();
                self.tcp.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
        }

        async fn answer(&mut self) -> Answer {
            tokio::time::timeout(Duration::from_secs(10), self.answer_inner())
                .await
                .expect("an answer within 10 s")
        }

        async fn answer_inner(&mut self) -> Answer {
            loop {
                let mut slots = [httparse::EMPTY_HEADER; 32];
                let mut r = httparse::Response::new(&mut slots);
                if let httparse::Status::Complete(n) = r.parse(&self.buf).unwrap() {
                    let status = r.code.unwrap();
                    let headers: Vec<(String, String)> = r
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_ascii_lowercase(),
                                String::from_utf8(h.value.to_vec()).unwrap(),
                            )
                        })
                        .collect();
                    let len: usize = headers
                        .iter()
                        .find(|(n, _)| n == "content-length")
                        .map(|(_, v)| v.parse().unwrap())
                        .unwrap_or(0);
                    if self.buf.len() >= n + len {
                        let body = self.buf[n..n + len].to_vec();
                        self.buf.drain(..n + len);
                        return Answer {
                            status,
                            headers,
                            body,
                        };
                    }
                }
                let mut chunk = [0u8; 4096];
                let n = self.tcp.read(&mut chunk).await.unwrap();
                assert!(n > 0, "the connection closed before a whole answer");
                self.buf.extend_from_slice(&chunk[..n]);
            }
        }

        /// True once the server has closed the connection (after any answers still unread).
        async fn closed(&mut self) -> bool {
            let mut chunk = [0u8; 4096];
            matches!(
                tokio::time::timeout(Duration::from_secs(10), self.tcp.read(&mut chunk)).await,
                Ok(Ok(0)) | Ok(Err(_))
            )
        }
    }

    const NEXT: &[u8] = b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\nhost: x\r\n\r\n";

    fn post(id: &str, body: &str) -> Vec<u8> {
        format!(
            "POST /2018-06-01/runtime/invocation/{id}/response HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    fn response_body(r: Reply) -> Vec<u8> {
        match r {
            Reply::Response(b) => b.to_vec(),
            other => panic!("not a response: {other:?}"),
        }
    }

    /// What [`frame`] makes of `req` with a 1,024-byte body limit.
    fn framed(req: &[u8]) -> String {
        match frame(req, 1024) {
            Framing::Complete(p) => format!(
                "{} {} body {}{}{}",
                p.method,
                std::str::from_utf8(&req[p.path]).unwrap(),
                p.content_length,
                if p.expects_continue { " continue" } else { "" },
                if p.names_mode { " mode" } else { "" },
            ),
            Framing::Partial => "partial".into(),
            Framing::Body { whole } => format!("body to {whole}"),
            Framing::Hyper => "hyper".into(),
        }
    }

    #[test]
    fn what_is_framed_here_and_what_goes_to_hyper() {
        let next = "GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(
            framed(next.as_bytes()),
            "GET /2018-06-01/runtime/invocation/next body 0"
        );
        assert_eq!(framed(&next.as_bytes()[..30]), "partial");
        let post = "POST /r HTTP/1.1\r\ncontent-length: 3\r\nLambda-Runtime-Function-Response-Mode: buffered\r\n\r\n";
        assert_eq!(
            framed(format!("{post}abc").as_bytes()),
            "POST /r body 3 mode"
        );
        assert_eq!(
            framed(format!("{post}ab").as_bytes()),
            format!("body to {}", post.len() + 3)
        );
        let cont = "POST /r HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-Continue\r\n\r\n";
        assert_eq!(framed(cont.as_bytes()), "POST /r body 3 continue");
        // The client did not wait: nothing to ask for.
        assert_eq!(framed(format!("{cont}abc").as_bytes()), "POST /r body 3");
        for other in [
            "GET /r HTTP/1.0\r\n\r\n",
            "PUT /r HTTP/1.1\r\n\r\n",
            "HEAD /r HTTP/1.1\r\n\r\n",
            "GET http://x/r HTTP/1.1\r\n\r\n",
            "GET /r?x=1 HTTP/1.1\r\n\r\n",
            "GET /r HTTP/1.1\r\nContent-Length: 1\r\n\r\nx",
            "POST /r HTTP/1.1\r\nContent-Length: 1025\r\n\r\n",
            "POST /r HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
            "POST /r HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST /r HTTP/1.1\r\nContent-Length: +1\r\n\r\nx",
            "POST /r HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /r HTTP/1.1\r\nConnection: close\r\n\r\n",
            "GET /r HTTP/1.1\r\nUpgrade: h2c\r\n\r\n",
            "POST /r HTTP/1.1\r\nExpect: something\r\n\r\n",
            "GET /r HTTP/1.1\r\nX-Bad: a\x7fb\r\n\r\n",
            "NOT HTTP\r\n\r\n",
        ] {
            assert_eq!(framed(other.as_bytes()), "hyper", "{other:?}");
        }
        // A head that never ends is hyper's past the limit.
        let long = format!("GET /r HTTP/1.1\r\nX-Long: {}", "a".repeat(MAX_HEAD));
        assert_eq!(framed(long.as_bytes()), "hyper");
        assert_eq!(
            framed(b"GET /r HTTP/1.1\r\nConnection: Keep-Alive\r\n\r\n"),
            "GET /r body 0"
        );
    }

    #[tokio::test]
    async fn plain_requests_split_pipelined_and_continued_are_framed_by_hand() {
        let (h, addr, stop) = start();
        let mut raw = Raw::connect(addr).await;

        // A head that arrives a byte at a time.
        let rx = send_event(&h, "req-1", "{\"n\":1}").await;
        raw.trickle(NEXT).await;
        let a = raw.answer().await;
        assert_eq!(a.status, 200);
        assert_eq!(a.header("lambda-runtime-aws-request-id"), Some("req-1"));
        assert_eq!(
            a.header("lambda-runtime-deadline-ms"),
            Some("1700000000000")
        );
        assert_eq!(a.header("content-type"), Some("application/json"));
        assert_eq!(
            a.header("lambda-runtime-invoked-function-arn"),
            Some("arn:aws:lambda:us-east-1:000000000000:function:f")
        );
        assert_eq!(a.header("lambda-runtime-trace-id"), Some("Root=1-0-0"));
        assert_eq!(
            a.header("lambda-runtime-client-context"),
            Some("{\"custom\":{}}")
        );
        assert_eq!(a.header("lambda-runtime-cognito-identity"), None);
        assert_eq!(a.body, b"{\"n\":1}");
        // Framed here, not by hyper (which adds a `date`).
        assert_eq!(a.header("date"), None);
        // A body that waits for 100 Continue, as libcurl sends large ones.
        raw.write(
            b"POST /2018-06-01/runtime/invocation/req-1/response HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
        )
        .await;
        let interim = raw.answer().await;
        assert_eq!(interim.status, 100);
        raw.write(b"hello").await;
        let a = raw.answer().await;
        assert_eq!((a.status, &a.body[..]), (202, &br#"{"status":"OK"}"#[..]));
        assert_eq!(response_body(rx.await.unwrap()), b"hello");

        // The next request and the answer to it in one write, and the one after that too.
        let rx2 = send_event(&h, "req-2", "two").await;
        let mut both = NEXT.to_vec();
        both.extend(post("req-2", "{\"two\":2}"));
        both.extend_from_slice(NEXT);
        raw.write(&both).await;
        let a = raw.answer().await;
        assert_eq!((a.status, &a.body[..]), (200, &b"two"[..]));
        let a = raw.answer().await;
        assert_eq!(a.status, 202);
        assert_eq!(a.header("date"), None);
        assert_eq!(response_body(rx2.await.unwrap()), b"{\"two\":2}");
        // The third request (the pipelined /next) is parked until an event comes.
        let rx3 = send_event(&h, "req-3", "three").await;
        let a = raw.answer().await;
        assert_eq!(a.header("lambda-runtime-aws-request-id"), Some("req-3"));
        // A response with a body split across writes, its head and body apart.
        let p = post("req-3", "{\"three\":3}");
        let (head, body) = p.split_at(p.len() - 4);
        raw.write(head).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        raw.write(body).await;
        assert_eq!(raw.answer().await.status, 202);
        assert_eq!(response_body(rx3.await.unwrap()), b"{\"three\":3}");

        // Lambda's errors come back framed the same way.
        raw.write(&post("nobody", "x")).await;
        let a = raw.answer().await;
        assert_eq!(a.status, 400);
        let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(v["errorType"], "InvalidRequestID");
        // A header the general handler reads reaches it from the head framed here.
        raw.write(
            b"POST /2018-06-01/runtime/invocation/x/response HTTP/1.1\r\nLambda-Runtime-Function-Response-Mode: sideways\r\nContent-Length: 1\r\n\r\nx",
        )
        .await;
        let a = raw.answer().await;
        assert_eq!((a.status, a.header("date")), (400, None));
        let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(v["errorType"], "InvalidFunctionResponseMode");
        raw.write(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(raw.answer().await.status, 404);
        raw.write(
            b"POST /2018-06-01/runtime/invocation/next HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        assert_eq!(raw.answer().await.status, 405);
        stop.cancel();
    }

    #[tokio::test]
    async fn anything_else_goes_to_hyper_with_what_was_read() {
        let (h, addr, stop) = start();

        // A chunked response after a plain /next: hyper takes the connection from the bytes
        // already read, and keeps serving it.
        let mut raw = Raw::connect(addr).await;
        let rx = send_event(&h, "req-1", "one").await;
        raw.write(NEXT).await;
        assert_eq!(raw.answer().await.status, 200);
        raw.write(
            b"POST /2018-06-01/runtime/invocation/req-1/response HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
        )
        .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        raw.write(b"2\r\nde\r\n0\r\n\r\n").await;
        let a = raw.answer().await;
        assert_eq!(a.status, 202);
        // Hyper's answer now (it adds a `date`; the framing here does not).
        assert!(a.header("date").is_some());
        assert_eq!(response_body(rx.await.unwrap()), b"abcde");
        let rx = send_event(&h, "req-2", "two").await;
        raw.write(NEXT).await;
        let a = raw.answer().await;
        assert_eq!((a.status, &a.body[..]), (200, &b"two"[..]));
        assert_eq!(a.header("lambda-runtime-aws-request-id"), Some("req-2"));
        assert_eq!(a.header("lambda-runtime-cognito-identity"), None);
        assert!(a.header("lambda-runtime-client-context").is_some());
        raw.write(&post("req-2", "2")).await;
        assert_eq!(raw.answer().await.status, 202);
        assert_eq!(response_body(rx.await.unwrap()), b"2");

        // A response over the limit: hyper reads what the limit allows, the invocation is told.
        let rx = send_event(&h, "req-3", "three").await;
        raw.write(NEXT).await;
        assert_eq!(raw.answer().await.status, 200);
        raw.write(&post("req-3", &"x".repeat(2000))).await;
        assert_eq!(raw.answer().await.status, 413);
        assert!(matches!(rx.await.unwrap(), Reply::TooLarge { limit: 1024 }));

        // A response cut off inside its body: the invocation hears of it.
        let mut cut = Raw::connect(addr).await;
        let rx = send_event(&h, "req-4", "four").await;
        cut.write(NEXT).await;
        assert_eq!(cut.answer().await.status, 200);
        cut.write(
            b"POST /2018-06-01/runtime/invocation/req-4/response HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly some",
        )
        .await;
        cut.tcp.shutdown().await.unwrap();
        match rx.await.unwrap() {
            Reply::Error { error_type, .. } => assert_eq!(error_type, "Runtime.TruncatedResponse"),
            other => panic!("{other:?}"),
        }

        // Not HTTP at all: hyper's 400, and the connection closed.
        let mut junk = Raw::connect(addr).await;
        junk.write(b"HELLO THERE\r\n\r\n").await;
        assert_eq!(junk.answer().await.status, 400);
        assert!(junk.closed().await);

        // HTTP/1.0 and `Connection: close` are hyper's: answered, then closed.
        for req in [
            &b"GET /nowhere HTTP/1.0\r\n\r\n"[..],
            &b"GET /nowhere HTTP/1.1\r\nConnection: close\r\n\r\n"[..],
        ] {
            let mut once = Raw::connect(addr).await;
            once.write(req).await;
            assert_eq!(once.answer().await.status, 404);
            assert!(once.closed().await);
        }
        stop.cancel();
    }
}
