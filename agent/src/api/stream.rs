//! InvokeWithResponseStream (`POST /2021-11-15/functions/{name}/response-streaming-invocations`):
//! the function's output as it comes, in the `application/vnd.amazon.eventstream` framing the
//! AWS SDKs read: a `PayloadChunk` event per piece of output, then one `InvokeComplete` with
//! `ErrorCode`, `ErrorDetails` and `LogResult`.
//!
//! A Lambda-mode function that streams (`Lambda-Runtime-Function-Response-Mode: streaming`)
//! has its chunks passed on as its runtime sends them; one that answers buffered gets one
//! chunk; an exec-mode function's stdout is passed on as it writes it. A call refused before
//! it ran (not found, throttled, no capacity) is answered as the Invoke API answers it; once
//! the status has gone out, every error is the `InvokeComplete` event's.

use std::sync::Arc;

use aws_smithy_eventstream::frame::write_message_to;
use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::App;
use super::lambda::{InvokeQuery, LambdaError, Prepared, function_error_payload, set_header};
use crate::instance::InvokeError;
use crate::instance::runtime_api::StreamFrame;
use crate::router::{Failure, Invocation, InvokeRequest, Payload};

/// The response's content type.
pub const EVENT_STREAM: &str = "application/vnd.amazon.eventstream";

/// The largest payload one `PayloadChunk` carries; larger pieces of output are split (event
/// stream decoders refuse messages of 16 MB and more).
const MAX_CHUNK: usize = 256 * 1024;

/// `POST /2021-11-15/functions/{name}/response-streaming-invocations`.
pub async fn invoke_stream(
    State(app): State<Arc<App>>,
    Path(raw_name): Path<String>,
    Query(q): Query<InvokeQuery>,
    req: Request,
) -> Response {
    let id = super::invocation_id(req.extensions());
    let mut resp = match inner(&app, &raw_name, q, req, &id).await {
        Ok(r) => r,
        Err(e) => e.response(&id),
    };
    super::stamp_host(&app.node_id, &mut resp);
    resp
}

/// How the call stood when the status went out.
enum Start {
    /// It ended (a Lambda function answered, buffered or by starting its stream; or it failed).
    Done(Result<Invocation, Failure>),
    /// An exec function wrote its first output.
    First(Bytes),
}

async fn inner(
    app: &Arc<App>,
    raw_name: &str,
    q: InvokeQuery,
    req: Request,
    id: &str,
) -> Result<Response, LambdaError> {
    let Prepared {
        name,
        arn,
        pinned,
        qualifier,
        executed,
        invocation_type,
        want_tail,
        body,
        client_context,
        ..
    } = super::lambda::prepare(app, raw_name, q, req).await?;
    let headers = |status: StatusCode| {
        let mut r = status.into_response();
        set_header(&mut r, "x-amzn-requestid", id);
        set_header(&mut r, "x-amz-executed-version", &executed.to_string());
        r
    };
    match invocation_type.as_str() {
        "RequestResponse" => {}
        "DryRun" => return Ok(headers(StatusCode::NO_CONTENT)),
        other => {
            return Err(LambdaError::invalid(format!(
                "1 validation error detected: Value '{other}' at 'invocationType' failed to satisfy constraint: Member must satisfy enum value set: [RequestResponse, DryRun]"
            )));
        }
    }
    let (stdout, mut chunks) = mpsc::channel::<Bytes>(8);
    let router = app.router.clone();
    let request_id = id.to_string();
    // Owned by the task that writes the answer: a caller who hangs up drops it, as with any
    // invocation (an exec sandbox is killed; a Lambda call runs to its end in its own task).
    let mut call = Box::pin(async move {
        router
            .invoke(InvokeRequest {
                name: &name,
                body,
                request_id: &request_id,
                want_tail,
                client_context,
                env: Vec::new(),
                version: pinned,
                qualifier: qualifier.as_deref(),
                stdout: Some(stdout),
            })
            .await
    });
    let start = tokio::select! {
        biased;
        r = &mut call => Start::Done(r),
        Some(c) = chunks.recv() => Start::First(c),
    };
    // Refused before it ran: a status of its own, as the Invoke API answers.
    if let Start::Done(Err(f)) = &start
        && function_error_payload(&f.error, id).is_none()
    {
        return Err(super::lambda::service_error(&f.error, &arn));
    }
    let (events, body) = mpsc::channel::<Bytes>(4);
    let id = id.to_string();
    tokio::spawn(async move {
        tokio::select! {
            () = pump(start, call, chunks, &events, want_tail, &id, &arn) => {}
            // The caller hung up: the call is dropped with this task.
            () = events.closed() => {}
        }
    });
    let mut r = headers(StatusCode::OK);
    set_header(&mut r, "content-type", EVENT_STREAM);
    let stream = tokio_stream::wrappers::ReceiverStream::new(body);
    let stream = futures_util::StreamExt::map(stream, Ok::<_, std::convert::Infallible>);
    Ok(r.map(|_| axum::body::Body::from_stream(stream)))
}

/// Writes the call's output as `PayloadChunk` events while it runs, then its `InvokeComplete`.
async fn pump(
    start: Start,
    mut call: std::pin::Pin<Box<impl Future<Output = Result<Invocation, Failure>>>>,
    mut chunks: mpsc::Receiver<Bytes>,
    events: &mpsc::Sender<Bytes>,
    want_tail: bool,
    request_id: &str,
    arn: &str,
) {
    let result = match start {
        Start::Done(r) => r,
        Start::First(c) => {
            send_chunk(events, c).await;
            loop {
                tokio::select! {
                    biased;
                    Some(c) = chunks.recv() => send_chunk(events, c).await,
                    r = &mut call => break r,
                }
            }
        }
    };
    // The call is over: what its stdout still held.
    while let Ok(c) = chunks.try_recv() {
        send_chunk(events, c).await;
    }
    let mut after = crate::router::AfterAnswer::default();
    let (error, log_tail) = match result {
        Ok(Invocation {
            body,
            log_tail,
            after: a,
            ..
        }) => {
            after = a;
            match body {
                Payload::Full(b) => {
                    send_chunk(events, b).await;
                    (None, log_tail)
                }
                Payload::Stream {
                    mut frames,
                    released,
                    ..
                } => {
                    let mut failed = None;
                    while let Some(f) = frames.recv().await {
                        match f {
                            StreamFrame::Data(d) => send_chunk(events, d).await,
                            StreamFrame::Error { error_type, body } => {
                                failed = Some((error_type, String::from_utf8_lossy(&body).into()));
                            }
                        }
                    }
                    let settled = match released {
                        Some(r) => r.await.ok(),
                        None => None,
                    };
                    let (agent_error, tail) = match settled {
                        Some(s) => (s.error, Some(s.log_tail)),
                        None => (None, None),
                    };
                    // What the agent saw (a timeout kills the instance, which cuts the stream
                    // off) says more than the cut-off stream.
                    let error = agent_error
                        .map(|e| error_code(&e, request_id, arn))
                        .or(failed);
                    (error, tail)
                }
            }
        }
        Err(f) => (Some(error_code(&f.error, request_id, arn)), f.log_tail),
    };
    let log_tail = log_tail.filter(|_| want_tail);
    let _ = events
        .send(invoke_complete(error, log_tail.as_deref()))
        .await;
    // What is left (the next prepared sandbox) is done once the answer is out.
    drop(after);
}

/// `ErrorCode` and `ErrorDetails` for an invocation that failed: the function's error type and
/// its error payload, or the Lambda error type and message of a failure that was not the
/// function's.
fn error_code(e: &InvokeError, request_id: &str, arn: &str) -> (String, String) {
    match function_error_payload(e, request_id) {
        Some(payload) => {
            let code = match e {
                InvokeError::Handler { error_type, .. }
                | InvokeError::InitFailed { error_type, .. } => Some(error_type.clone()),
                _ => serde_json::from_slice::<serde_json::Value>(&payload)
                    .ok()
                    .and_then(|v| v.get("errorType")?.as_str().map(str::to_string)),
            };
            (
                code.unwrap_or_else(|| "Unhandled".into()),
                String::from_utf8_lossy(&payload).into_owned(),
            )
        }
        None => {
            let l = super::lambda::service_error(e, arn);
            (l.error_type.to_string(), l.message)
        }
    }
}

/// Sends `data` as `PayloadChunk` events (none for no data).
async fn send_chunk(events: &mpsc::Sender<Bytes>, data: Bytes) {
    let mut at = 0;
    while at < data.len() {
        let end = data.len().min(at + MAX_CHUNK);
        let m = event(
            "PayloadChunk",
            "application/octet-stream",
            data.slice(at..end),
        );
        if events.send(m).await.is_err() {
            return;
        }
        at = end;
    }
}

/// The `InvokeComplete` event.
fn invoke_complete(error: Option<(String, String)>, log_tail: Option<&str>) -> Bytes {
    let mut body = serde_json::Map::new();
    if let Some((code, details)) = error {
        body.insert("ErrorCode".into(), code.into());
        body.insert("ErrorDetails".into(), details.into());
    }
    if let Some(t) = log_tail {
        body.insert(
            "LogResult".into(),
            base64::engine::general_purpose::STANDARD.encode(t).into(),
        );
    }
    let payload = serde_json::Value::Object(body).to_string();
    event("InvokeComplete", "application/json", Bytes::from(payload))
}

/// One event message: `:event-type`, `:content-type` and `:message-type: event`, then the
/// payload, framed with its prelude and CRCs.
fn event(event_type: &'static str, content_type: &'static str, payload: Bytes) -> Bytes {
    let header = |name: &'static str, value: &'static str| {
        Header::new(name, HeaderValue::String(value.into()))
    };
    let len = payload.len();
    let m = Message::new(payload)
        .add_header(header(":event-type", event_type))
        .add_header(header(":content-type", content_type))
        .add_header(header(":message-type", "event"));
    let mut out = Vec::with_capacity(len + 128);
    // Fails only for headers over 128 KB or payloads over 4 GB: neither is made here.
    write_message_to(&m, &mut out).expect("an event of at most MAX_CHUNK bytes");
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_smithy_eventstream::frame::read_message_from;

    fn headers(m: &Message) -> Vec<(String, String)> {
        m.headers()
            .iter()
            .map(|h| {
                let v = h.value().as_string().map(|s| s.as_str().to_string());
                (h.name().as_str().to_string(), v.unwrap_or_default())
            })
            .collect()
    }

    fn crc(b: &[u8]) -> u32 {
        // CRC-32 (IEEE), bit by bit: the checksum the framing carries, computed here without
        // the crate under test.
        let mut c = !0u32;
        for &byte in b {
            c ^= u32::from(byte);
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0xEDB8_8320
                } else {
                    c >> 1
                };
            }
        }
        !c
    }

    #[test]
    fn a_chunk_is_framed_with_lengths_and_crcs() {
        let b = event("PayloadChunk", "application/octet-stream", "hello".into());
        let total = u32::from_be_bytes(b[0..4].try_into().unwrap()) as usize;
        let headers_len = u32::from_be_bytes(b[4..8].try_into().unwrap()) as usize;
        assert_eq!(total, b.len());
        // Each string header: name length (1), name, type 7 (1), value length (2), value.
        let h = |n: &str, v: &str| 1 + n.len() + 1 + 2 + v.len();
        assert_eq!(
            headers_len,
            h(":event-type", "PayloadChunk")
                + h(":content-type", "application/octet-stream")
                + h(":message-type", "event")
        );
        assert_eq!(
            u32::from_be_bytes(b[8..12].try_into().unwrap()),
            crc(&b[0..8])
        );
        assert_eq!(&b[12 + headers_len..total - 4], b"hello");
        assert_eq!(
            u32::from_be_bytes(b[total - 4..].try_into().unwrap()),
            crc(&b[..total - 4])
        );
        assert_eq!(b[12] as usize, ":event-type".len());
        assert_eq!(&b[13..24], b":event-type");
        assert_eq!(b[24], 7, "string header type");

        let m = read_message_from(&b[..]).unwrap();
        assert_eq!(&m.payload()[..], b"hello");
        assert_eq!(
            headers(&m),
            [
                (":event-type".into(), "PayloadChunk".into()),
                (":content-type".into(), "application/octet-stream".into()),
                (":message-type".into(), "event".into()),
            ]
        );
        // A flipped payload byte fails the message CRC.
        let mut bad = b.to_vec();
        bad[12 + headers_len] ^= 1;
        assert!(read_message_from(&bad[..]).is_err());
    }

    /// A known message: the CRC-32 of "123456789" is 0xCBF43926 (the check value of the
    /// IEEE polynomial), so the bit-by-bit CRC above is the standard one.
    #[test]
    fn the_reference_crc_is_crc32() {
        assert_eq!(crc(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn invoke_complete_carries_the_error_and_the_log() {
        let b = invoke_complete(
            Some((
                "Sandbox.Timedout".into(),
                "{\"errorMessage\":\"late\"}".into(),
            )),
            Some("START\nEND\n"),
        );
        let m = read_message_from(&b[..]).unwrap();
        assert_eq!(headers(&m)[0].1, "InvokeComplete");
        assert_eq!(headers(&m)[1].1, "application/json");
        let v: serde_json::Value = serde_json::from_slice(m.payload()).unwrap();
        assert_eq!(v["ErrorCode"], "Sandbox.Timedout");
        assert_eq!(v["ErrorDetails"], "{\"errorMessage\":\"late\"}");
        let log = base64::engine::general_purpose::STANDARD
            .decode(v["LogResult"].as_str().unwrap())
            .unwrap();
        assert_eq!(log, b"START\nEND\n");
        let ok = invoke_complete(None, None);
        assert_eq!(
            read_message_from(&ok[..]).unwrap().payload().as_ref(),
            b"{}"
        );
    }

    #[tokio::test]
    async fn large_output_is_split_into_chunks() {
        let (tx, mut rx) = mpsc::channel(8);
        let data = Bytes::from(vec![7u8; MAX_CHUNK * 2 + 10]);
        send_chunk(&tx, data.clone()).await;
        send_chunk(&tx, Bytes::new()).await;
        drop(tx);
        let mut got = Vec::new();
        while let Some(b) = rx.recv().await {
            got.extend_from_slice(read_message_from(&b[..]).unwrap().payload());
        }
        assert_eq!(got, data);
    }
}
