//! Frames over QUIC streams: reading with the protocol crate's decoder, writing with its
//! encoder, and closing a connection with the named error code when a peer sends a bad frame.

use bytes::Bytes;
use fnlet_cluster::frame::{Decoder, ErrorCode, Expect, Frame, FrameError, Limits};

/// How much is read from a stream at once.
const READ_CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    #[error("reading the stream: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("writing the stream: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("the stream was closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
    #[error("the connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("the peer refused: {message} ({code})")]
    Refused { code: ErrorCode, message: String },
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
    /// This side could not make its answer.
    #[error("{0}")]
    Local(String),
}

impl WireError {
    /// The QUIC code to close the connection with, when the fault is the peer's frame.
    pub fn close_code(&self) -> Option<ErrorCode> {
        match self {
            WireError::Frame(e) => Some(e.code()),
            _ => None,
        }
    }
}

/// Frames read from one receiving stream, checked against what may come next.
pub struct FrameReader {
    recv: quinn::RecvStream,
    decoder: Decoder,
    expect: Expect,
    ended: bool,
}

impl FrameReader {
    pub fn new(recv: quinn::RecvStream, limits: Limits, expect: Expect) -> FrameReader {
        FrameReader {
            recv,
            decoder: Decoder::new(limits),
            expect,
            ended: false,
        }
    }

    /// The next frame; `None` once the peer finished the stream where a sequence may end.
    pub async fn next(&mut self) -> Result<Option<Frame>, WireError> {
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                self.expect.check(&frame)?;
                return Ok(Some(frame));
            }
            if self.ended {
                self.decoder.finish()?;
                self.expect.finish()?;
                return Ok(None);
            }
            match self.recv.read_chunk(READ_CHUNK, true).await? {
                Some(chunk) => self.decoder.push(&chunk.bytes),
                None => self.ended = true,
            }
        }
    }

    /// Whether the sequence read so far is complete (nothing more is owed).
    pub fn is_complete(&self) -> bool {
        self.expect.is_complete()
    }
}

/// Writes one frame.
pub async fn send(stream: &mut quinn::SendStream, frame: &Frame) -> Result<(), WireError> {
    let (head, body) = frame.encode_parts()?;
    let mut parts = [head, body];
    stream.write_all_chunks(&mut parts).await?;
    Ok(())
}

/// Writes an Error frame and finishes the stream.
pub async fn refuse(stream: &mut quinn::SendStream, code: ErrorCode, message: impl Into<String>) {
    let frame = Frame::Error(fnlet_cluster::frame::ErrorFrame {
        code,
        message: message.into(),
    });
    if send(stream, &frame).await.is_ok() {
        let _ = stream.finish();
    }
}

/// Closes `conn` for a bad frame: the peer learns the code, the agent logs it and goes on.
pub fn close_for(conn: &quinn::Connection, err: &WireError, peer: &str) -> bool {
    let Some(code) = err.close_code() else {
        return false;
    };
    tracing::warn!(peer, code = %code, "closing the connection: {err}");
    let reason = err.to_string();
    let reason = reason.as_bytes();
    conn.close(
        quinn::VarInt::from_u64(code.0).unwrap_or(quinn::VarInt::MAX),
        &reason[..reason.len().min(200)],
    );
    true
}

/// An empty body, for frames that have none.
pub fn no_body() -> Bytes {
    Bytes::new()
}
