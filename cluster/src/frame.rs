//! The wire frames on QUIC streams (ALPNs `fnlet-peer/1` and `fnlet-invoke/1`): their byte
//! format and limits, the incremental [`Decoder`], the encoder ([`Frame::encode`]), which frame
//! may come next on a stream ([`Expect`]), and the QUIC application error codes ([`ErrorCode`]).
//!
//! A frame is a 12-byte header, then `meta` (UTF-8 JSON), then `body` (raw bytes):
//!
//! ```text
//! offset 0   version   u8      1
//! offset 1   kind      u8      see Kind
//! offset 2   reserved  u16     0
//! offset 4   meta_len  u32 BE  at most 64 KiB
//! offset 8   body_len  u32 BE  at most the decoder's limit; 0 for kinds without a body
//! offset 12  meta, then body
//! ```
//!
//! `cluster/FRAMES.md` documents every frame byte by byte, with an example each (checked by a
//! test against this code).

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::Sha256Hash;
use crate::catalog::{Delta, Digest};

/// The frame format version this crate speaks.
pub const VERSION: u8 = 1;

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 12;

/// Largest `meta` part of a frame, in bytes (64 KiB).
pub const MAX_META_LEN: u32 = 64 * 1024;

/// Default largest `body` (6 MiB: Lambda's synchronous payload limit, the agent's default
/// `limits.max_request_mb`).
pub const DEFAULT_MAX_BODY: u32 = 6 * 1024 * 1024;

/// ALPN of connections between agents.
pub const ALPN_PEER: &[u8] = b"fnlet-peer/1";

/// ALPN of connections from QUIC callers (`fnlet invoke --quic`).
pub const ALPN_INVOKE: &[u8] = b"fnlet-invoke/1";

/// Hops a call may make: a call forwarded once (hops = 1) runs where it lands or is refused
/// with [`ErrorCode::HOP_LIMIT`]; it is never forwarded again.
pub const MAX_HOPS: u8 = 1;

/// Which of the two protocols a connection speaks (from its negotiated ALPN).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alpn {
    /// `fnlet-peer/1`: between agents.
    Peer,
    /// `fnlet-invoke/1`: QUIC callers.
    Invoke,
}

impl Alpn {
    /// The ALPN protocol id.
    pub fn protocol(self) -> &'static [u8] {
        match self {
            Alpn::Peer => ALPN_PEER,
            Alpn::Invoke => ALPN_INVOKE,
        }
    }

    /// The protocol for a negotiated ALPN id, if it is one of ours.
    pub fn from_protocol(id: &[u8]) -> Option<Alpn> {
        match id {
            ALPN_PEER => Some(Alpn::Peer),
            ALPN_INVOKE => Some(Alpn::Invoke),
            _ => None,
        }
    }
}

/// A QUIC application error code: why a connection was closed (or a stream reset), or why a
/// request was refused (in an [`ErrorFrame`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ErrorCode(pub u64);

impl ErrorCode {
    /// A clean close.
    pub const NO_ERROR: ErrorCode = ErrorCode(0x0);
    /// A frame's version byte is not [`VERSION`].
    pub const BAD_VERSION: ErrorCode = ErrorCode(0x100);
    /// A frame's meta or body is over its limit.
    pub const FRAME_TOO_LARGE: ErrorCode = ErrorCode(0x101);
    /// A frame is malformed: unknown kind, reserved bits set, bad JSON, a bad field.
    pub const BAD_FRAME: ErrorCode = ErrorCode(0x102);
    /// A well-formed frame where it may not come (wrong ALPN, wrong place in the exchange).
    pub const UNEXPECTED_FRAME: ErrorCode = ErrorCode(0x103);
    /// A stream ended inside a frame or before its exchange was complete.
    pub const TRUNCATED: ErrorCode = ErrorCode(0x104);
    /// A join token was refused, or a peer's certificate does not match its claimed node id.
    pub const UNAUTHORIZED: ErrorCode = ErrorCode(0x105);
    /// The host refuses the call: it is at its concurrency limit.
    pub const BUSY: ErrorCode = ErrorCode(0x106);
    /// No such function (or bundle) here.
    pub const NOT_FOUND: ErrorCode = ErrorCode(0x107);
    /// A forwarded call would be forwarded again ([`MAX_HOPS`]).
    pub const HOP_LIMIT: ErrorCode = ErrorCode(0x108);
    /// The call's deadline passed before it could run.
    pub const DEADLINE_EXCEEDED: ErrorCode = ErrorCode(0x109);
    /// The host failed for a reason of its own (logged there, not sent).
    pub const INTERNAL: ErrorCode = ErrorCode(0x10a);
    /// The host is shutting down and takes no new work.
    pub const SHUTTING_DOWN: ErrorCode = ErrorCode(0x10b);

    const NAMES: [(ErrorCode, &'static str); 13] = [
        (Self::NO_ERROR, "NO_ERROR"),
        (Self::BAD_VERSION, "BAD_VERSION"),
        (Self::FRAME_TOO_LARGE, "FRAME_TOO_LARGE"),
        (Self::BAD_FRAME, "BAD_FRAME"),
        (Self::UNEXPECTED_FRAME, "UNEXPECTED_FRAME"),
        (Self::TRUNCATED, "TRUNCATED"),
        (Self::UNAUTHORIZED, "UNAUTHORIZED"),
        (Self::BUSY, "BUSY"),
        (Self::NOT_FOUND, "NOT_FOUND"),
        (Self::HOP_LIMIT, "HOP_LIMIT"),
        (Self::DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
        (Self::INTERNAL, "INTERNAL"),
        (Self::SHUTTING_DOWN, "SHUTTING_DOWN"),
    ];

    /// The code's name (`BAD_FRAME`), if it is one of ours.
    pub fn name(self) -> Option<&'static str> {
        Self::NAMES
            .iter()
            .find(|(c, _)| *c == self)
            .map(|(_, n)| *n)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "{n} (0x{:x})", self.0),
            None => write!(f, "0x{:x}", self.0),
        }
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A frame's kind: byte 1 of its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Kind {
    /// A call: meta [`InvokeRequest`], body the payload.
    InvokeRequest = 0x01,
    /// The start of an answer: meta [`ResponseHead`], body its first bytes.
    ResponseHead = 0x02,
    /// A chunk of a body: no meta, body the bytes.
    Data = 0x03,
    /// The end of a body: meta [`End`] (maybe an error trailer), no body.
    End = 0x04,
    /// A refusal: meta [`ErrorFrame`], no body.
    Error = 0x05,
    /// A catalog digest (anti-entropy request): meta [`Digest`].
    CatalogDigest = 0x10,
    /// Catalog entries: meta [`Delta`].
    CatalogDelta = 0x11,
    /// A bundle wanted, by hash: meta [`BundleRequest`].
    BundleRequest = 0x12,
    /// The start of a bundle: meta [`BundleHead`]; its bytes follow in Data frames, then End.
    BundleHead = 0x13,
    /// Schedule ticks a host asks to fire: meta [`ScheduleClaim`]; answered with the
    /// schedules' catalog entries.
    ScheduleClaim = 0x14,
    /// A host asking to join: meta [`JoinRequest`].
    JoinRequest = 0x20,
    /// A joining host's certificate and peers: meta [`JoinResponse`].
    JoinResponse = 0x21,
    /// A member asking for a new certificate before its own expires: meta [`RenewRequest`].
    RenewRequest = 0x22,
    /// A member's new certificate: meta [`RenewResponse`].
    RenewResponse = 0x23,
}

impl Kind {
    /// Every kind, in byte order.
    pub const ALL: [Kind; 14] = [
        Kind::InvokeRequest,
        Kind::ResponseHead,
        Kind::Data,
        Kind::End,
        Kind::Error,
        Kind::CatalogDigest,
        Kind::CatalogDelta,
        Kind::BundleRequest,
        Kind::BundleHead,
        Kind::ScheduleClaim,
        Kind::JoinRequest,
        Kind::JoinResponse,
        Kind::RenewRequest,
        Kind::RenewResponse,
    ];

    /// The kind for a header byte.
    pub fn from_byte(b: u8) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| *k as u8 == b)
    }

    /// Whether frames of this kind carry a body.
    pub fn has_body(self) -> bool {
        matches!(self, Kind::InvokeRequest | Kind::ResponseHead | Kind::Data)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Which part of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The JSON meta.
    Meta,
    /// The raw body.
    Body,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Part::Meta => "meta",
            Part::Body => "body",
        })
    }
}

/// How a call came into the cluster: which of the agent's front doors the host running it
/// passes it through, so the caller gets what that door answers.
///
/// JSON: `{"kind":"exec"}`, `{"kind":"invoke_api"}`, `{"kind":"auto"}`, or
/// `{"kind":"function_url","method":..,"path":..,"query":..,"source_ip":..}` (`query` and
/// `source_ip` optional); no other fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "EntryJson", into = "EntryJson")]
pub enum InvokeEntry {
    /// `POST /fn/NAME` (exec mode): the payload is the function's stdin.
    Exec,
    /// The Lambda Invoke API (`POST /2015-03-31/functions/NAME/invocations`): the payload is
    /// the event.
    InvokeApi,
    /// The function's own door, picked by the host that runs it: the Invoke API for a
    /// Lambda-mode function, exec otherwise (what `fnlet invoke` does).
    Auto,
    /// A function URL (`METHOD /fn/NAME/PATH?QUERY`): the host builds the function URL event
    /// from these, the request's headers and the payload.
    FunctionUrl {
        /// The HTTP method.
        method: String,
        /// The path after the function's URL prefix, starting with `/`, percent-encoded as
        /// received.
        path: String,
        /// The raw query string, without `?` (may be empty).
        query: String,
        /// The address the request came from (the event's `sourceIp`), when the sender is a
        /// peer passing on a call it received; a QUIC caller's own address counts for it.
        source_ip: Option<IpAddr>,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum EntryKind {
    Exec,
    InvokeApi,
    Auto,
    FunctionUrl,
}

/// [`InvokeEntry`] as JSON: serde's internally tagged enums let unknown fields through on unit
/// variants, so the fields are checked here.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryJson {
    kind: EntryKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    query: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source_ip: Option<IpAddr>,
}

impl TryFrom<EntryJson> for InvokeEntry {
    type Error = &'static str;

    fn try_from(e: EntryJson) -> Result<Self, &'static str> {
        let url_fields =
            e.method.is_some() || e.path.is_some() || e.query.is_some() || e.source_ip.is_some();
        match e.kind {
            EntryKind::Exec | EntryKind::InvokeApi | EntryKind::Auto if url_fields => {
                Err("method, path, query and source_ip are for function_url entries only")
            }
            EntryKind::Exec => Ok(InvokeEntry::Exec),
            EntryKind::InvokeApi => Ok(InvokeEntry::InvokeApi),
            EntryKind::Auto => Ok(InvokeEntry::Auto),
            EntryKind::FunctionUrl => Ok(InvokeEntry::FunctionUrl {
                method: e.method.ok_or("a function_url entry needs a method")?,
                path: e.path.ok_or("a function_url entry needs a path")?,
                query: e.query.unwrap_or_default(),
                source_ip: e.source_ip,
            }),
        }
    }
}

impl From<InvokeEntry> for EntryJson {
    fn from(e: InvokeEntry) -> Self {
        let bare = |kind| EntryJson {
            kind,
            method: None,
            path: None,
            query: None,
            source_ip: None,
        };
        match e {
            InvokeEntry::Exec => bare(EntryKind::Exec),
            InvokeEntry::InvokeApi => bare(EntryKind::InvokeApi),
            InvokeEntry::Auto => bare(EntryKind::Auto),
            InvokeEntry::FunctionUrl {
                method,
                path,
                query,
                source_ip,
            } => EntryJson {
                kind: EntryKind::FunctionUrl,
                method: Some(method),
                path: Some(path),
                query: (!query.is_empty()).then_some(query),
                source_ip,
            },
        }
    }
}

/// Headers the Invoke API reads that an InvokeRequest carries as fields of its own
/// (`log_tail`, `client_context`): an `invoke_api` request's `headers` may not repeat them.
pub const INVOKE_API_FIELD_HEADERS: [&str; 2] = ["x-amz-log-type", "x-amz-client-context"];

/// Meta of an InvokeRequest frame: one call. The body is the payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvokeRequest {
    /// The function's name.
    pub function: String,
    /// Invoke API only: `$LATEST` or a version number; absent: the active version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qualifier: Option<String>,
    /// The request id (the same on every host the call passes).
    pub request_id: String,
    /// When the caller stops waiting, Unix milliseconds.
    pub deadline_ms: u64,
    /// How many times the call was forwarded already (0 from a caller, 1 from a peer).
    #[serde(default)]
    pub hops: u8,
    /// How the call came in.
    pub entry: InvokeEntry,
    /// The request's headers, in order, as `[name, value]`: what the caller authorised the
    /// call with (`authorization`, SigV4's `x-amz-*`), and for a function URL what the
    /// function sees.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
    /// Invoke API only: the caller wants the log tail (`X-Amz-Log-Type: Tail`).
    #[serde(default)]
    pub log_tail: bool,
    /// Invoke API only: the client context (`X-Amz-Client-Context`, decoded JSON text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_context: Option<String>,
}

/// Meta of a ResponseHead frame: the start of an answer. The body is its first bytes (maybe
/// none); Data frames carry the rest; an End frame closes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseHead {
    /// The HTTP status the caller gets.
    pub status: u16,
    /// Headers for the caller, in order, as `[name, value]`.
    pub headers: Vec<(String, String)>,
    /// The node id of the host that ran the call (`x-fnlet-host`).
    pub host: String,
}

/// An error after an answer started: what Lambda puts in a streamed response's trailers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndError {
    /// The error's kind (e.g. `Runtime.ExitError`, `Sandbox.Timedout`).
    pub kind: String,
    /// What happened.
    pub message: String,
}

/// Meta of an End frame: the body is complete, or (with `error`) cut short.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct End {
    /// Set when the body was cut short.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<EndError>,
}

/// Meta of an Error frame: a request refused before any answer started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorFrame {
    /// Why, as an [`ErrorCode`] (`BUSY`, `NOT_FOUND`, `HOP_LIMIT`, ...).
    pub code: ErrorCode,
    /// For people.
    pub message: String,
}

/// Meta of a BundleRequest frame: a bundle wanted, by its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleRequest {
    /// The bundle's SHA-256 (from the catalog).
    pub sha256: Sha256Hash,
}

/// Meta of a ScheduleClaim frame: schedule ticks the sending host (the schedule's owner as it
/// sees the cluster) asks to fire. The answerer grants each claim whose schedule has no tick
/// recorded from `from_ms` on, by recording `tick_ms` fired by the sender in its catalog (so
/// it never fires those ticks itself), and answers with its catalog entry of every schedule
/// claimed (CatalogDelta frames, then End): a claim was granted when the entry records
/// `tick_ms` fired by the sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleClaim {
    /// The claims, at most [`MAX_CLAIMS`].
    pub claims: Vec<Claim>,
}

/// Most claims in one ScheduleClaim frame.
pub const MAX_CLAIMS: usize = 256;

/// One schedule's ticks claimed: from `from_ms` to `tick_ms` (Unix milliseconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claim {
    /// The schedule's id (its catalog key is `schedule:ID`).
    pub schedule: String,
    /// The first tick claimed.
    pub from_ms: u64,
    /// The last tick claimed (what the record will hold).
    pub tick_ms: u64,
}

/// Meta of a BundleHead frame: the bundle's bytes follow in Data frames, then End.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleHead {
    /// The bundle's SHA-256, as requested.
    pub sha256: Sha256Hash,
    /// The bundle's size in bytes: the Data frames carry exactly this many.
    pub size: u64,
}

/// Meta of a JoinRequest frame: a host asking to join with a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The token's id.
    pub token_id: String,
    /// The token's secret.
    pub token_secret: String,
    /// The node id the host will have (the certificate names it).
    pub node_id: String,
    /// A PEM certificate signing request for the host's key.
    pub csr_pem: String,
}

/// A cluster member a joined host dials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seed {
    /// Its node id.
    pub id: String,
    /// Its peer address.
    pub addr: SocketAddr,
}

/// Meta of a JoinResponse frame: the joined host's certificate and whom to dial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinResponse {
    /// The host's certificate (PEM), naming its node id, signed by the cluster CA.
    pub cert_pem: String,
    /// The cluster CA's certificate (PEM); its SHA-256 is the one in the token.
    pub ca_pem: String,
    /// Members to dial.
    pub members: Vec<Seed>,
    /// The cluster's key for sealing access key secrets in the catalog. It is sent only on
    /// the join's stream, after the token checked out, to a joiner that verified the answerer
    /// against the CA its token pins.
    pub sealing_key: SealingKey,
}

/// The cluster's access key sealing key: 32 bytes (a ChaCha20-Poly1305 key), 64 lowercase hex
/// characters in JSON. `Debug` does not show it, and it is wiped from memory when dropped.
#[derive(Clone)]
pub struct SealingKey([u8; SealingKey::LEN]);

impl SealingKey {
    /// Its length in bytes.
    pub const LEN: usize = 32;

    /// The key of these bytes.
    pub fn new(bytes: [u8; SealingKey::LEN]) -> SealingKey {
        SealingKey(bytes)
    }

    /// The key's bytes.
    pub fn expose(&self) -> &[u8; SealingKey::LEN] {
        &self.0
    }
}

impl Drop for SealingKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealingKey(..)")
    }
}

/// Compared in constant time.
impl PartialEq for SealingKey {
    fn eq(&self, other: &SealingKey) -> bool {
        subtle::ConstantTimeEq::ct_eq(&self.0[..], &other.0[..]).into()
    }
}

impl Eq for SealingKey {}

impl Serialize for SealingKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text = zeroize::Zeroizing::new(hex::encode(self.0));
        s.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for SealingKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = zeroize::Zeroizing::new(String::deserialize(d)?);
        let mut key = SealingKey([0; SealingKey::LEN]);
        // The error never quotes the text: it is a secret.
        if text.len() != 2 * SealingKey::LEN
            || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            || hex::decode_to_slice(text.as_bytes(), &mut key.0).is_err()
        {
            return Err(serde::de::Error::custom(
                "sealing_key: 64 lowercase hex characters (32 bytes)",
            ));
        }
        Ok(key)
    }
}

/// Meta of a RenewRequest frame: a member (its certificate names it) asking the CA holder
/// for a new certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// A PEM certificate signing request for the member's (new) key.
    pub csr_pem: String,
}

/// Meta of a RenewResponse frame: the member's new certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewResponse {
    /// The new certificate (PEM), naming the node id the requester's certificate names.
    pub cert_pem: String,
}

/// One frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A call and its payload.
    InvokeRequest {
        /// The call.
        meta: InvokeRequest,
        /// The payload.
        payload: Bytes,
    },
    /// The start of an answer and its first bytes.
    ResponseHead {
        /// Status, headers, host.
        meta: ResponseHead,
        /// The first bytes of the answer's body (maybe none).
        body: Bytes,
    },
    /// A chunk of a body.
    Data(Bytes),
    /// The end of a body.
    End(End),
    /// A refusal.
    Error(ErrorFrame),
    /// A catalog digest.
    CatalogDigest(Digest),
    /// Catalog entries.
    CatalogDelta(Delta),
    /// A bundle wanted.
    BundleRequest(BundleRequest),
    /// The start of a bundle.
    BundleHead(BundleHead),
    /// Schedule ticks a host asks to fire.
    ScheduleClaim(ScheduleClaim),
    /// A host asking to join.
    JoinRequest(JoinRequest),
    /// A joining host's certificate and peers.
    JoinResponse(JoinResponse),
    /// A member asking for a new certificate.
    RenewRequest(RenewRequest),
    /// A member's new certificate.
    RenewResponse(RenewResponse),
}

/// A frame could not be decoded, encoded, or came where it may not. Every variant has the
/// [`ErrorCode`] to close the connection with ([`FrameError::code`]).
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The version byte is not [`VERSION`].
    #[error("frame version {found} is not spoken here (version {VERSION} is)")]
    BadVersion {
        /// The version byte received.
        found: u8,
    },
    /// The kind byte is not a [`Kind`].
    #[error("unknown frame kind 0x{found:02x}")]
    UnknownKind {
        /// The kind byte received.
        found: u8,
    },
    /// The reserved header bytes are not zero.
    #[error("reserved header bytes are 0x{found:04x}; they must be zero")]
    Reserved {
        /// Their value.
        found: u16,
    },
    /// The meta or body is over its limit (seen in the header, before it is read).
    #[error("{kind} frame: {part} of {len} bytes is over the limit of {limit}")]
    TooLarge {
        /// The frame's kind.
        kind: Kind,
        /// Meta or body.
        part: Part,
        /// Its length.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// The frame has a part its kind does not carry (a body on an End, a meta on a Data).
    #[error("{kind} frame carries no {part}, but has {len} bytes of it")]
    Unwanted {
        /// The frame's kind.
        kind: Kind,
        /// Meta or body.
        part: Part,
        /// Its length.
        len: u64,
    },
    /// The meta is not the JSON its kind calls for.
    #[error("{kind} frame: bad meta: {source}")]
    BadMeta {
        /// The frame's kind.
        kind: Kind,
        /// What serde_json found.
        #[source]
        source: serde_json::Error,
    },
    /// A meta field has a value it may not have.
    #[error("{kind} frame: {field}: {reason}")]
    Invalid {
        /// The frame's kind.
        kind: Kind,
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A frame where it may not come.
    #[error("{got} frame where {expected} may come")]
    Unexpected {
        /// The frame's kind.
        got: Kind,
        /// What may come there.
        expected: &'static str,
    },
    /// The stream ended inside a frame.
    #[error("the stream ended {buffered} bytes into a frame")]
    Truncated {
        /// Bytes of the unfinished frame.
        buffered: usize,
    },
    /// The stream ended before its exchange was complete.
    #[error("the stream ended before {expected}")]
    Incomplete {
        /// What was still to come.
        expected: &'static str,
    },
    /// A bundle's frames do not match what was asked or announced.
    #[error("bundle {sha256}: {reason}")]
    Bundle {
        /// The bundle asked for.
        sha256: Sha256Hash,
        /// What does not match.
        reason: String,
    },
}

impl FrameError {
    /// The QUIC application error code to close the connection with.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::BadVersion { .. } => ErrorCode::BAD_VERSION,
            FrameError::TooLarge { .. } => ErrorCode::FRAME_TOO_LARGE,
            FrameError::UnknownKind { .. }
            | FrameError::Reserved { .. }
            | FrameError::Unwanted { .. }
            | FrameError::BadMeta { .. }
            | FrameError::Invalid { .. }
            | FrameError::Bundle { .. } => ErrorCode::BAD_FRAME,
            FrameError::Unexpected { .. } => ErrorCode::UNEXPECTED_FRAME,
            FrameError::Truncated { .. } | FrameError::Incomplete { .. } => ErrorCode::TRUNCATED,
        }
    }
}

/// Checks on a meta beyond its JSON shape.
trait Meta: Serialize + DeserializeOwned {
    const KIND: Kind;
    fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        Ok(())
    }
}

/// Names and ids: 1 to 256 bytes, no control characters.
fn name(field: &'static str, v: &str) -> Result<(), (&'static str, &'static str)> {
    if v.is_empty() {
        Err((field, "must not be empty"))
    } else if v.len() > 256 {
        Err((field, "must be at most 256 bytes"))
    } else if v.chars().any(char::is_control) {
        Err((field, "must not contain control characters"))
    } else {
        Ok(())
    }
}

/// Header lists: names are HTTP tokens (RFC 9110 5.1), values hold none of the control
/// characters HTTP forbids (NUL to US but tab, and DEL).
fn header_list(
    field: &'static str,
    h: &[(String, String)],
) -> Result<(), (&'static str, &'static str)> {
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    for (n, v) in h {
        if n.is_empty() || !n.bytes().all(tchar) {
            return Err((field, "header names must be HTTP tokens"));
        }
        if v.bytes().any(|b| (b < b' ' && b != b'\t') || b == 0x7f) {
            return Err((field, "header values must not contain control characters"));
        }
    }
    Ok(())
}

/// Part of a URL as sent: printable ASCII, none of `except`.
fn url_part(v: &str, except: &[u8]) -> bool {
    v.bytes()
        .all(|b| b.is_ascii_graphic() && !except.contains(&b))
}

impl Meta for InvokeRequest {
    const KIND: Kind = Kind::InvokeRequest;
    fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        name("function", &self.function)?;
        name("request_id", &self.request_id)?;
        header_list("headers", &self.headers)?;
        if let Some(q) = &self.qualifier {
            name("qualifier", q)?;
        }
        if self.entry == InvokeEntry::InvokeApi {
            if self.headers.iter().any(|(n, _)| {
                INVOKE_API_FIELD_HEADERS
                    .iter()
                    .any(|f| n.eq_ignore_ascii_case(f))
            }) {
                return Err((
                    "headers",
                    "x-amz-log-type and x-amz-client-context travel as log_tail and client_context",
                ));
            }
        } else if self.qualifier.is_some() {
            return Err(("qualifier", "is for invoke_api entries only"));
        } else if self.log_tail {
            return Err(("log_tail", "is for invoke_api entries only"));
        } else if self.client_context.is_some() {
            return Err(("client_context", "is for invoke_api entries only"));
        }
        if let InvokeEntry::FunctionUrl {
            method,
            path,
            query,
            ..
        } = &self.entry
        {
            if method.is_empty()
                || method.len() > 32
                || !method.bytes().all(|b| b.is_ascii_alphabetic())
            {
                return Err(("entry.method", "must be an HTTP method (letters only)"));
            }
            if !path.starts_with('/') || !url_part(path, b"?#") {
                return Err((
                    "entry.path",
                    "must start with / and be printable ASCII without ? or #",
                ));
            }
            if !url_part(query, b"#") {
                return Err(("entry.query", "must be printable ASCII without #"));
            }
        }
        Ok(())
    }
}
impl Meta for ResponseHead {
    const KIND: Kind = Kind::ResponseHead;
    fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if !(100..=599).contains(&self.status) {
            return Err(("status", "must be an HTTP status (100 to 599)"));
        }
        header_list("headers", &self.headers)?;
        name("host", &self.host)
    }
}
impl Meta for End {
    const KIND: Kind = Kind::End;
}
impl Meta for ErrorFrame {
    const KIND: Kind = Kind::Error;
}
impl Meta for Digest {
    const KIND: Kind = Kind::CatalogDigest;
}
impl Meta for Delta {
    const KIND: Kind = Kind::CatalogDelta;
}
impl Meta for BundleRequest {
    const KIND: Kind = Kind::BundleRequest;
}
impl Meta for BundleHead {
    const KIND: Kind = Kind::BundleHead;
}
impl Meta for ScheduleClaim {
    const KIND: Kind = Kind::ScheduleClaim;
    fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if self.claims.is_empty() {
            return Err(("claims", "must hold at least one claim"));
        }
        if self.claims.len() > MAX_CLAIMS {
            return Err(("claims", "holds more than 256 claims"));
        }
        for c in &self.claims {
            name("claims.schedule", &c.schedule)?;
            if c.from_ms > c.tick_ms {
                return Err(("claims.from_ms", "must not be after tick_ms"));
            }
        }
        Ok(())
    }
}
impl Meta for JoinRequest {
    const KIND: Kind = Kind::JoinRequest;
    fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        name("token_id", &self.token_id)?;
        name("token_secret", &self.token_secret)?;
        name("node_id", &self.node_id)?;
        if !self.csr_pem.contains("-----BEGIN CERTIFICATE REQUEST-----") {
            return Err(("csr_pem", "must be a PEM certificate request"));
        }
        Ok(())
    }
}
impl Meta for JoinResponse {
    const KIND: Kind = Kind::JoinResponse;
    fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if !self.cert_pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(("cert_pem", "must be a PEM certificate"));
        }
        if !self.ca_pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(("ca_pem", "must be a PEM certificate"));
        }
        for m in &self.members {
            name("members.id", &m.id)?;
        }
        Ok(())
    }
}

impl Meta for RenewRequest {
    const KIND: Kind = Kind::RenewRequest;
    fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if !self.csr_pem.contains("-----BEGIN CERTIFICATE REQUEST-----") {
            return Err(("csr_pem", "must be a PEM certificate request"));
        }
        Ok(())
    }
}
impl Meta for RenewResponse {
    const KIND: Kind = Kind::RenewResponse;
    fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if !self.cert_pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(("cert_pem", "must be a PEM certificate"));
        }
        Ok(())
    }
}

fn parse_meta<M: Meta>(meta: &[u8]) -> Result<M, FrameError> {
    // An empty meta reads as `{}` (End without an error is sent that way).
    let json = if meta.is_empty() {
        b"{}".as_slice()
    } else {
        meta
    };
    let m: M = serde_json::from_slice(json).map_err(|source| FrameError::BadMeta {
        kind: M::KIND,
        source,
    })?;
    m.validate()
        .map_err(|(field, reason)| FrameError::Invalid {
            kind: M::KIND,
            field,
            reason,
        })?;
    Ok(m)
}

fn meta_json<M: Meta>(m: &M) -> Result<Vec<u8>, FrameError> {
    m.validate()
        .map_err(|(field, reason)| FrameError::Invalid {
            kind: M::KIND,
            field,
            reason,
        })?;
    serde_json::to_vec(m).map_err(|source| FrameError::BadMeta {
        kind: M::KIND,
        source,
    })
}

impl Frame {
    /// The frame's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Frame::InvokeRequest { .. } => Kind::InvokeRequest,
            Frame::ResponseHead { .. } => Kind::ResponseHead,
            Frame::Data(_) => Kind::Data,
            Frame::End(_) => Kind::End,
            Frame::Error(_) => Kind::Error,
            Frame::CatalogDigest(_) => Kind::CatalogDigest,
            Frame::CatalogDelta(_) => Kind::CatalogDelta,
            Frame::BundleRequest(_) => Kind::BundleRequest,
            Frame::BundleHead(_) => Kind::BundleHead,
            Frame::ScheduleClaim(_) => Kind::ScheduleClaim,
            Frame::JoinRequest(_) => Kind::JoinRequest,
            Frame::JoinResponse(_) => Kind::JoinResponse,
            Frame::RenewRequest(_) => Kind::RenewRequest,
            Frame::RenewResponse(_) => Kind::RenewResponse,
        }
    }

    /// The frame's bytes.
    pub fn encode(&self) -> Result<Bytes, FrameError> {
        let (head, body) = self.encode_parts()?;
        let mut out = BytesMut::with_capacity(head.len() + body.len());
        out.put(head);
        out.put(body);
        Ok(out.freeze())
    }

    /// The frame's bytes in two parts, header and meta, then the body (shared, not copied):
    /// write both, in order, to send a large body without copying it.
    pub fn encode_parts(&self) -> Result<(Bytes, Bytes), FrameError> {
        let empty = Bytes::new();
        let (meta, body) = match self {
            Frame::InvokeRequest { meta, payload } => (meta_json(meta)?, payload),
            Frame::ResponseHead { meta, body } => (meta_json(meta)?, body),
            Frame::Data(body) => (Vec::new(), body),
            Frame::End(End { error: None }) => (Vec::new(), &empty),
            Frame::End(m) => (meta_json(m)?, &empty),
            Frame::Error(m) => (meta_json(m)?, &empty),
            Frame::CatalogDigest(m) => (meta_json(m)?, &empty),
            Frame::CatalogDelta(m) => (meta_json(m)?, &empty),
            Frame::BundleRequest(m) => (meta_json(m)?, &empty),
            Frame::BundleHead(m) => (meta_json(m)?, &empty),
            Frame::ScheduleClaim(m) => (meta_json(m)?, &empty),
            Frame::JoinRequest(m) => (meta_json(m)?, &empty),
            Frame::JoinResponse(m) => (meta_json(m)?, &empty),
            Frame::RenewRequest(m) => (meta_json(m)?, &empty),
            Frame::RenewResponse(m) => (meta_json(m)?, &empty),
        };
        let kind = self.kind();
        let too_large = |part, len: usize, limit: u64| FrameError::TooLarge {
            kind,
            part,
            len: len as u64,
            limit,
        };
        if meta.len() > MAX_META_LEN as usize {
            return Err(too_large(Part::Meta, meta.len(), MAX_META_LEN.into()));
        }
        let body_len = u32::try_from(body.len())
            .map_err(|_| too_large(Part::Body, body.len(), u32::MAX.into()))?;
        let mut head = BytesMut::with_capacity(HEADER_LEN + meta.len());
        head.put_u8(VERSION);
        head.put_u8(kind as u8);
        head.put_u16(0);
        // Fits: checked against MAX_META_LEN above.
        head.put_u32(meta.len() as u32);
        head.put_u32(body_len);
        head.put_slice(&meta);
        Ok((head.freeze(), body.clone()))
    }

    fn from_parts(kind: Kind, meta: &[u8], body: Bytes) -> Result<Frame, FrameError> {
        Ok(match kind {
            Kind::InvokeRequest => Frame::InvokeRequest {
                meta: parse_meta(meta)?,
                payload: body,
            },
            Kind::ResponseHead => Frame::ResponseHead {
                meta: parse_meta(meta)?,
                body,
            },
            Kind::Data => {
                if !meta.is_empty() {
                    return Err(FrameError::Unwanted {
                        kind,
                        part: Part::Meta,
                        len: meta.len() as u64,
                    });
                }
                Frame::Data(body)
            }
            Kind::End => Frame::End(parse_meta(meta)?),
            Kind::Error => Frame::Error(parse_meta(meta)?),
            Kind::CatalogDigest => Frame::CatalogDigest(parse_meta(meta)?),
            Kind::CatalogDelta => Frame::CatalogDelta(parse_meta(meta)?),
            Kind::BundleRequest => Frame::BundleRequest(parse_meta(meta)?),
            Kind::BundleHead => Frame::BundleHead(parse_meta(meta)?),
            Kind::ScheduleClaim => Frame::ScheduleClaim(parse_meta(meta)?),
            Kind::JoinRequest => Frame::JoinRequest(parse_meta(meta)?),
            Kind::JoinResponse => Frame::JoinResponse(parse_meta(meta)?),
            Kind::RenewRequest => Frame::RenewRequest(parse_meta(meta)?),
            Kind::RenewResponse => Frame::RenewResponse(parse_meta(meta)?),
        })
    }
}

/// What a decoder accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest body, in bytes. An InvokeRequest's body is the whole payload, so this is at
    /// least the agent's request limit.
    pub max_body: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body: DEFAULT_MAX_BODY,
        }
    }
}

/// An incremental frame decoder for one stream: push the bytes read, take frames out.
///
/// ```
/// use fnlet_cluster::frame::{Decoder, Frame, Limits};
/// let bytes = Frame::Data("hello".into()).encode()?;
/// let mut d = Decoder::new(Limits::default());
/// d.push(&bytes[..5]);
/// assert_eq!(d.next_frame()?, None);
/// d.push(&bytes[5..]);
/// assert_eq!(d.next_frame()?, Some(Frame::Data("hello".into())));
/// d.finish()?; // the stream ended on a frame boundary
/// # Ok::<(), fnlet_cluster::frame::FrameError>(())
/// ```
///
/// A header over the limits is an error as soon as its 12 bytes are in, before the rest is
/// read, so the buffer never holds more than one frame within the limits plus the last push.
/// After an error the stream is done: close the connection with [`FrameError::code`].
#[derive(Debug)]
pub struct Decoder {
    buf: BytesMut,
    limits: Limits,
}

impl Decoder {
    /// A decoder with these limits.
    pub fn new(limits: Limits) -> Self {
        Decoder {
            buf: BytesMut::new(),
            limits,
        }
    }

    /// Adds bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes pushed but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame, `None` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if let Some(&v) = self.buf.first()
            && v != VERSION
        {
            return Err(FrameError::BadVersion { found: v });
        }
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let mut h = &self.buf[..HEADER_LEN];
        let _version = h.get_u8();
        let kind_byte = h.get_u8();
        let reserved = h.get_u16();
        let meta_len = h.get_u32();
        let body_len = h.get_u32();
        let kind =
            Kind::from_byte(kind_byte).ok_or(FrameError::UnknownKind { found: kind_byte })?;
        if reserved != 0 {
            return Err(FrameError::Reserved { found: reserved });
        }
        if meta_len > MAX_META_LEN {
            return Err(FrameError::TooLarge {
                kind,
                part: Part::Meta,
                len: meta_len.into(),
                limit: MAX_META_LEN.into(),
            });
        }
        if body_len != 0 && !kind.has_body() {
            return Err(FrameError::Unwanted {
                kind,
                part: Part::Body,
                len: body_len.into(),
            });
        }
        if body_len > self.limits.max_body {
            return Err(FrameError::TooLarge {
                kind,
                part: Part::Body,
                len: body_len.into(),
                limit: self.limits.max_body.into(),
            });
        }
        let total = HEADER_LEN + meta_len as usize + body_len as usize;
        if self.buf.len() < total {
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        let mut frame = self.buf.split_to(total);
        frame.advance(HEADER_LEN);
        let meta = frame.split_to(meta_len as usize);
        Frame::from_parts(kind, &meta, frame.freeze()).map(Some)
    }

    /// The stream ended: an error if it ended inside a frame.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated {
                buffered: self.buf.len(),
            })
        }
    }
}

/// Which frames may come next on a stream, from the side reading it. Feed it every frame
/// read ([`Expect::check`]) and the end of the stream ([`Expect::finish`]).
///
/// The exchanges (requester → answerer):
///
/// | request | answer |
/// |---|---|
/// | InvokeRequest | ResponseHead, Data\*, End — or Error |
/// | CatalogDigest+ | CatalogDelta\*, End — or Error |
/// | BundleRequest | BundleHead, Data\* (exactly `size` bytes), End — or Error |
/// | ScheduleClaim | CatalogDelta\*, End — or Error |
/// | JoinRequest | JoinResponse — or Error |
/// | RenewRequest | RenewResponse — or Error |
///
/// Each request opens a bidirectional stream, and the requester finishes its side after the
/// request. Gossip goes on unidirectional streams of CatalogDelta frames. On `fnlet-invoke/1`
/// only InvokeRequest may open a stream.
#[derive(Debug, Clone)]
pub struct Expect {
    state: State,
}

#[derive(Debug, Clone)]
enum State {
    Request {
        alpn: Alpn,
        join_only: bool,
    },
    MoreDigests,
    Gossip,
    InvokeAnswer {
        started: bool,
    },
    DeltaAnswer {
        started: bool,
    },
    BundleAnswer {
        sha256: Sha256Hash,
        size: Option<u64>,
        received: u64,
    },
    JoinAnswer,
    RenewAnswer,
    Done,
}

impl Expect {
    /// The accepting side of a bidirectional stream on `alpn`: one request.
    pub fn request(alpn: Alpn) -> Self {
        Expect {
            state: State::Request {
                alpn,
                join_only: false,
            },
        }
    }

    /// The accepting side of a stream from a peer without a cluster certificate: only a
    /// JoinRequest.
    pub fn join_request() -> Self {
        Expect {
            state: State::Request {
                alpn: Alpn::Peer,
                join_only: true,
            },
        }
    }

    /// The accepting side of a unidirectional stream from a peer: catalog deltas (gossip).
    pub fn gossip() -> Self {
        Expect {
            state: State::Gossip,
        }
    }

    /// The requesting side, after sending `request`: its answer. `None` if `request` is not a
    /// request.
    pub fn answer_to(request: &Frame) -> Option<Self> {
        let state = match request {
            Frame::InvokeRequest { .. } => State::InvokeAnswer { started: false },
            Frame::CatalogDigest(_) | Frame::ScheduleClaim(_) => {
                State::DeltaAnswer { started: false }
            }
            Frame::BundleRequest(r) => State::BundleAnswer {
                sha256: r.sha256,
                size: None,
                received: 0,
            },
            Frame::JoinRequest(_) => State::JoinAnswer,
            Frame::RenewRequest(_) => State::RenewAnswer,
            _ => return None,
        };
        Some(Expect { state })
    }

    /// Whether the exchange is complete: the request (or the answer's last frame) is in.
    pub fn is_complete(&self) -> bool {
        matches!(self.state, State::Done | State::MoreDigests | State::Gossip)
    }

    /// Checks the next frame read from the stream.
    pub fn check(&mut self, frame: &Frame) -> Result<(), FrameError> {
        let got = frame.kind();
        let unexpected = |expected| Err(FrameError::Unexpected { got, expected });
        self.state = match (&self.state, frame) {
            (
                State::Request {
                    join_only: true, ..
                },
                Frame::JoinRequest(_),
            ) => State::Done,
            (
                State::Request {
                    join_only: true, ..
                },
                _,
            ) => {
                return unexpected("only a JoinRequest (the peer has no cluster certificate)");
            }
            (State::Request { .. }, Frame::InvokeRequest { .. }) => State::Done,
            (
                State::Request {
                    alpn: Alpn::Invoke, ..
                },
                _,
            ) => {
                return unexpected("an InvokeRequest (fnlet-invoke/1 carries calls only)");
            }
            (State::Request { .. }, Frame::CatalogDigest(_)) => State::MoreDigests,
            (
                State::Request { .. },
                Frame::BundleRequest(_)
                | Frame::ScheduleClaim(_)
                | Frame::JoinRequest(_)
                | Frame::RenewRequest(_),
            ) => State::Done,
            (State::Request { .. }, _) => {
                return unexpected(
                    "a request (InvokeRequest, CatalogDigest, BundleRequest, ScheduleClaim, JoinRequest, RenewRequest)",
                );
            }
            (State::MoreDigests, Frame::CatalogDigest(_)) => State::MoreDigests,
            (State::MoreDigests, _) => {
                return unexpected("only more CatalogDigest frames, then the end of the stream");
            }
            (State::Gossip, Frame::CatalogDelta(_)) => State::Gossip,
            (State::Gossip, _) => return unexpected("only CatalogDelta frames (gossip)"),
            (State::InvokeAnswer { started: false }, Frame::ResponseHead { .. }) => {
                State::InvokeAnswer { started: true }
            }
            (State::InvokeAnswer { started: false }, Frame::Error(_)) => State::Done,
            (State::InvokeAnswer { started: false }, _) => {
                return unexpected("a ResponseHead or an Error");
            }
            (State::InvokeAnswer { started: true }, Frame::Data(_)) => {
                State::InvokeAnswer { started: true }
            }
            (State::InvokeAnswer { started: true }, Frame::End(_)) => State::Done,
            (State::InvokeAnswer { started: true }, _) => return unexpected("a Data or an End"),
            (State::DeltaAnswer { .. }, Frame::CatalogDelta(_)) => {
                State::DeltaAnswer { started: true }
            }
            (State::DeltaAnswer { .. }, Frame::End(_)) => State::Done,
            (State::DeltaAnswer { started: false }, Frame::Error(_)) => State::Done,
            (State::DeltaAnswer { .. }, _) => return unexpected("a CatalogDelta or an End"),
            (
                State::BundleAnswer {
                    sha256, size: None, ..
                },
                f,
            ) => match f {
                Frame::BundleHead(h) if h.sha256 == *sha256 => State::BundleAnswer {
                    sha256: *sha256,
                    size: Some(h.size),
                    received: 0,
                },
                Frame::BundleHead(h) => {
                    return Err(FrameError::Bundle {
                        sha256: *sha256,
                        reason: format!("the answer is for bundle {}", h.sha256),
                    });
                }
                Frame::Error(_) => State::Done,
                _ => return unexpected("a BundleHead or an Error"),
            },
            (
                State::BundleAnswer {
                    sha256,
                    size: Some(size),
                    received,
                },
                f,
            ) => {
                let (sha256, size, received) = (*sha256, *size, *received);
                match f {
                    Frame::Data(d) => {
                        let received = received.saturating_add(d.len() as u64);
                        if received > size {
                            return Err(FrameError::Bundle {
                                sha256,
                                reason: format!(
                                    "{received} bytes sent, more than the {size} announced"
                                ),
                            });
                        }
                        State::BundleAnswer {
                            sha256,
                            size: Some(size),
                            received,
                        }
                    }
                    Frame::End(End { error: None }) if received != size => {
                        return Err(FrameError::Bundle {
                            sha256,
                            reason: format!(
                                "{received} bytes sent, fewer than the {size} announced"
                            ),
                        });
                    }
                    Frame::End(_) => State::Done,
                    _ => return unexpected("a Data or an End"),
                }
            }
            (State::JoinAnswer, Frame::JoinResponse(_) | Frame::Error(_)) => State::Done,
            (State::JoinAnswer, _) => return unexpected("a JoinResponse or an Error"),
            (State::RenewAnswer, Frame::RenewResponse(_) | Frame::Error(_)) => State::Done,
            (State::RenewAnswer, _) => return unexpected("a RenewResponse or an Error"),
            (State::Done, _) => return unexpected("nothing (the exchange is complete)"),
        };
        Ok(())
    }

    /// The stream's receiving side ended: an error if the exchange is not complete.
    pub fn finish(&self) -> Result<(), FrameError> {
        let expected = match &self.state {
            State::Done | State::MoreDigests | State::Gossip => return Ok(()),
            State::Request { .. } => "a request",
            State::InvokeAnswer { started: false } => "a ResponseHead or an Error",
            State::InvokeAnswer { started: true } => "the End of the answer",
            State::DeltaAnswer { .. } => "the End of the catalog deltas",
            State::BundleAnswer { size: None, .. } => "a BundleHead or an Error",
            State::BundleAnswer { .. } => "the rest of the bundle and its End",
            State::JoinAnswer => "a JoinResponse or an Error",
            State::RenewAnswer => "a RenewResponse or an Error",
        };
        Err(FrameError::Incomplete { expected })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;
    use crate::catalog::{Catalog, FunctionRecord};
    use crate::hlc::ntp64;

    /// One frame of each kind, in [`Kind::ALL`] order: the examples FRAMES.md documents.
    pub(super) fn examples() -> Vec<Frame> {
        let sha = Sha256Hash::of(b"bundle");
        let mut cat = Catalog::new("node-a").unwrap();
        let delta = cat
            .put_function(
                "hello",
                FunctionRecord {
                    version: 3,
                    manifest: serde_json::json!({"name": "hello"}),
                    bundle_sha256: sha,
                    size: 6,
                    deployed_by: "node-a".into(),
                    deployed_at_ms: 1_767_225_600_000,
                },
                ntp64(Duration::from_secs(1_767_225_600)),
            )
            .unwrap();
        vec![
            Frame::InvokeRequest {
                meta: InvokeRequest {
                    function: "hello".into(),
                    qualifier: None,
                    request_id: "r-1".into(),
                    deadline_ms: 1_767_225_630_000,
                    hops: 1,
                    entry: InvokeEntry::InvokeApi,
                    headers: vec![("content-type".into(), "application/json".into())],
                    log_tail: false,
                    client_context: None,
                },
                payload: Bytes::from_static(b"{\"n\":1}"),
            },
            Frame::ResponseHead {
                meta: ResponseHead {
                    status: 200,
                    headers: vec![("content-type".into(), "text/plain".into())],
                    host: "node-b".into(),
                },
                body: Bytes::from_static(b"hi"),
            },
            Frame::Data(Bytes::from_static(b"hello")),
            Frame::End(End { error: None }),
            Frame::Error(ErrorFrame {
                code: ErrorCode::BUSY,
                message: "busy".into(),
            }),
            Frame::CatalogDigest(cat.digest()),
            Frame::CatalogDelta(delta),
            Frame::BundleRequest(BundleRequest { sha256: sha }),
            Frame::BundleHead(BundleHead {
                sha256: sha,
                size: 6,
            }),
            Frame::ScheduleClaim(ScheduleClaim {
                claims: vec![Claim {
                    schedule: "hello-1a2b3c4d".into(),
                    from_ms: 1_764_900_000_000,
                    tick_ms: 1_764_900_001_000,
                }],
            }),
            Frame::JoinRequest(JoinRequest {
                token_id: "0a1b2c3d".into(),
                token_secret: "00112233445566778899aabbccddeeff".into(),
                node_id: "node-c".into(),
                csr_pem:
                    "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n"
                        .into(),
            }),
            Frame::JoinResponse(JoinResponse {
                cert_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
                ca_pem: "-----BEGIN CERTIFICATE-----\nMIIC\n-----END CERTIFICATE-----\n".into(),
                members: vec![Seed {
                    id: "node-a".into(),
                    addr: "10.0.0.1:8741".parse().unwrap(),
                }],
                sealing_key: SealingKey::new(std::array::from_fn(|i| i as u8)),
            }),
            Frame::RenewRequest(RenewRequest {
                csr_pem:
                    "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n"
                        .into(),
            }),
            Frame::RenewResponse(RenewResponse {
                cert_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
            }),
        ]
    }

    /// FRAMES.md's examples: each `### 0xNN Name` section's ```hex block (`#` starts a comment).
    fn documented_examples() -> Vec<(u8, String, Vec<u8>)> {
        let doc = include_str!("../FRAMES.md");
        let mut out = Vec::new();
        let mut section: Option<(u8, String)> = None;
        let mut hex_block: Option<String> = None;
        // Only the "## Frames" part: datagrams have their own section (load.rs checks it).
        let mut in_frames = false;
        for line in doc.lines() {
            if hex_block.is_none()
                && let Some(h) = line.strip_prefix("## ")
            {
                in_frames = h.trim() == "Frames";
                section = None;
                continue;
            }
            if !in_frames {
                continue;
            }
            if let Some(text) = &mut hex_block {
                if line.trim() == "```" {
                    let (kind, name) = section
                        .clone()
                        .expect("a hex block outside a frame section");
                    out.push((kind, name, hex::decode(&*text).expect("hex block")));
                    hex_block = None;
                } else {
                    let code = line.split('#').next().unwrap_or("");
                    text.extend(code.chars().filter(|c| !c.is_whitespace()));
                }
            } else if line.trim() == "```hex" {
                hex_block = Some(String::new());
            } else if let Some(h) = line.strip_prefix("### 0x") {
                let (byte, name) = h.split_once(' ').expect("### 0xNN Name");
                section = Some((
                    u8::from_str_radix(byte, 16).unwrap(),
                    name.trim().to_owned(),
                ));
            }
        }
        out
    }

    #[test]
    fn frames_md_examples_decode_to_the_frames_they_name() {
        let documented = documented_examples();
        let expected = examples();
        assert_eq!(documented.len(), Kind::ALL.len(), "one example per kind");
        for ((byte, name, bytes), want) in documented.iter().zip(&expected) {
            let kind = Kind::from_byte(*byte).unwrap_or_else(|| panic!("0x{byte:02x} {name}"));
            assert_eq!(kind.to_string(), *name, "section 0x{byte:02x}");
            assert_eq!(kind, want.kind(), "sections in kind order");
            let got = decode_all(bytes, Limits::default())
                .unwrap_or_else(|e| panic!("FRAMES.md {name}: {e}"));
            assert_eq!(got, vec![want.clone()], "FRAMES.md {name}");
            assert_eq!(
                want.encode().unwrap().to_vec(),
                *bytes,
                "encoder bytes for {name}"
            );
        }
    }

    fn decode_all(bytes: &[u8], limits: Limits) -> Result<Vec<Frame>, FrameError> {
        let mut d = Decoder::new(limits);
        d.push(bytes);
        let mut out = Vec::new();
        while let Some(f) = d.next_frame()? {
            out.push(f);
        }
        d.finish()?;
        Ok(out)
    }

    fn header(version: u8, kind: u8, reserved: u16, meta: u32, body: u32) -> Vec<u8> {
        let mut h = vec![version, kind];
        h.extend(reserved.to_be_bytes());
        h.extend(meta.to_be_bytes());
        h.extend(body.to_be_bytes());
        h
    }

    #[test]
    fn every_example_round_trips_whole_and_byte_by_byte() {
        let frames = examples();
        assert_eq!(
            frames.iter().map(Frame::kind).collect::<Vec<_>>(),
            Kind::ALL
        );
        let mut stream = Vec::new();
        for f in &frames {
            let bytes = f.encode().unwrap();
            assert_eq!(bytes[0], VERSION);
            assert_eq!(bytes[1], f.kind() as u8);
            assert_eq!(
                decode_all(&bytes, Limits::default()).unwrap(),
                vec![f.clone()]
            );
            let (head, body) = f.encode_parts().unwrap();
            assert_eq!([head, body].concat(), bytes.to_vec());
            stream.extend_from_slice(&bytes);
        }
        let mut d = Decoder::new(Limits::default());
        let mut got = Vec::new();
        for b in &stream {
            d.push(std::slice::from_ref(b));
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        d.finish().unwrap();
        assert_eq!(got, frames);
    }

    fn err(bytes: &[u8]) -> FrameError {
        decode_all(bytes, Limits { max_body: 100 }).unwrap_err()
    }

    #[test]
    fn bad_headers_are_refused_with_their_codes() {
        let e = err(b"GET / HTTP/1.1\r\n");
        assert!(matches!(e, FrameError::BadVersion { found: b'G' }), "{e}");
        assert_eq!(e.code(), ErrorCode::BAD_VERSION);
        // The version is checked on the first byte, before a whole header is in.
        let mut d = Decoder::new(Limits::default());
        d.push(&[2]);
        assert_eq!(d.next_frame().unwrap_err().code(), ErrorCode::BAD_VERSION);

        let e = err(&header(1, 0x7f, 0, 0, 0));
        assert!(matches!(e, FrameError::UnknownKind { found: 0x7f }), "{e}");
        assert_eq!(e.code(), ErrorCode::BAD_FRAME);
        let e = err(&header(1, Kind::Data as u8, 1, 0, 0));
        assert!(matches!(e, FrameError::Reserved { found: 1 }), "{e}");
        assert_eq!(e.code(), ErrorCode::BAD_FRAME);
    }

    #[test]
    fn oversized_parts_are_refused_from_the_header_alone() {
        for (h, part) in [
            (
                header(1, Kind::CatalogDelta as u8, 0, MAX_META_LEN + 1, 0),
                Part::Meta,
            ),
            (header(1, Kind::Data as u8, 0, 0, 101), Part::Body),
        ] {
            let mut d = Decoder::new(Limits { max_body: 100 });
            d.push(&h);
            let e = d.next_frame().unwrap_err();
            assert!(
                matches!(e, FrameError::TooLarge { part: p, .. } if p == part),
                "{e}"
            );
            assert_eq!(e.code(), ErrorCode::FRAME_TOO_LARGE);
        }
        // At the limit is fine.
        let mut ok = header(1, Kind::Data as u8, 0, 0, 100);
        ok.extend([7u8; 100]);
        assert_eq!(decode_all(&ok, Limits { max_body: 100 }).unwrap().len(), 1);
        // The encoder refuses a meta over the limit.
        let big = Frame::Error(ErrorFrame {
            code: ErrorCode::INTERNAL,
            message: "x".repeat(MAX_META_LEN as usize),
        });
        assert_eq!(big.encode().unwrap_err().code(), ErrorCode::FRAME_TOO_LARGE);
    }

    #[test]
    fn parts_a_kind_does_not_carry_are_refused() {
        let mut e = header(1, Kind::End as u8, 0, 0, 3);
        e.extend(b"abc");
        let e = err(&e);
        assert!(
            matches!(
                e,
                FrameError::Unwanted {
                    part: Part::Body,
                    ..
                }
            ),
            "{e}"
        );
        let mut d = header(1, Kind::Data as u8, 0, 2, 0);
        d.extend(b"{}");
        let e = err(&d);
        assert!(
            matches!(
                e,
                FrameError::Unwanted {
                    part: Part::Meta,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(e.code(), ErrorCode::BAD_FRAME);
    }

    fn with_meta(kind: Kind, meta: &str) -> Vec<u8> {
        let mut f = header(1, kind as u8, 0, meta.len() as u32, 0);
        f.extend(meta.as_bytes());
        f
    }

    #[test]
    fn bad_meta_is_refused_naming_what_is_wrong() {
        let cases = [
            (Kind::BundleRequest, "{\"sha256\":", "EOF"),
            (
                Kind::BundleRequest,
                "{\"sha256\":\"00\"}",
                "64 lowercase hex",
            ),
            (
                Kind::Error,
                "{\"code\":262,\"message\":\"x\",\"extra\":1}",
                "unknown field `extra`",
            ),
            (
                Kind::ResponseHead,
                "{\"status\":700,\"headers\":[],\"host\":\"a\"}",
                "status",
            ),
            (
                Kind::ResponseHead,
                "{\"status\":200,\"headers\":[[\"a\"]],\"host\":\"a\"}",
                "length 1",
            ),
            (Kind::JoinRequest, "{}", "missing field"),
            (
                Kind::InvokeRequest,
                "{\"function\":\"\",\"request_id\":\"r\",\"deadline_ms\":1,\"entry\":{\"kind\":\"exec\"}}",
                "function: must not be empty",
            ),
            (
                Kind::InvokeRequest,
                "{\"function\":\"f\",\"request_id\":\"r\",\"deadline_ms\":1,\"entry\":{\"kind\":\"exec\",\"x\":1}}",
                "unknown field",
            ),
            (
                Kind::InvokeRequest,
                "{\"function\":\"f\",\"request_id\":\"r\",\"deadline_ms\":1,\"entry\":{\"kind\":\"exec\",\"path\":\"/\"}}",
                "for function_url entries only",
            ),
            (
                Kind::InvokeRequest,
                "{\"function\":\"f\",\"request_id\":\"r\",\"deadline_ms\":1,\"entry\":{\"kind\":\"function_url\",\"path\":\"/\"}}",
                "needs a method",
            ),
            (
                Kind::InvokeRequest,
                "{\"function\":\"f\",\"request_id\":\"r\",\"deadline_ms\":1,\"entry\":{\"kind\":\"function_url\",\"method\":\"GET\",\"path\":\"/\",\"headers\":[]}}",
                "unknown field `headers`",
            ),
            (
                Kind::InvokeRequest,
                "{\"function\":\"f\",\"request_id\":\"r\",\"deadline_ms\":1,\"entry\":{\"kind\":\"function_url\",\"method\":\"GET\",\"path\":\"/a b\"}}",
                "entry.path",
            ),
            (
                Kind::InvokeRequest,
                "{\"function\":\"f\",\"request_id\":\"r\",\"deadline_ms\":1,\"entry\":{\"kind\":\"function_url\",\"method\":\"GET\",\"path\":\"/\",\"query\":\"a#b\"}}",
                "entry.query",
            ),
            (
                Kind::InvokeRequest,
                "{\"function\":\"f\",\"request_id\":\"r\",\"deadline_ms\":1,\"entry\":{\"kind\":\"function_url\",\"method\":\"GET\",\"path\":\"/\",\"source_ip\":\"nowhere\"}}",
                "invalid IP address",
            ),
            (
                Kind::InvokeRequest,
                "{\"function\":\"f\",\"request_id\":\"r\",\"deadline_ms\":1,\"entry\":{\"kind\":\"exec\"},\"headers\":[[\"bad name\",\"v\"]]}",
                "header names must be HTTP tokens",
            ),
            (
                Kind::InvokeRequest,
                "{\"function\":\"f\",\"request_id\":\"r\",\"deadline_ms\":1,\"entry\":{\"kind\":\"exec\"},\"headers\":[[\"x\",\"a\\r\\nb: c\"]]}",
                "header values must not contain control characters",
            ),
            (
                Kind::InvokeRequest,
                "{\"function\":\"f\",\"request_id\":\"r\",\"deadline_ms\":1,\"entry\":{\"kind\":\"exec\"},\"qualifier\":\"3\"}",
                "qualifier: is for invoke_api entries only",
            ),
            (
                Kind::InvokeRequest,
                "{\"function\":\"f\",\"request_id\":\"r\",\"deadline_ms\":1,\"entry\":{\"kind\":\"auto\"},\"log_tail\":true}",
                "log_tail: is for invoke_api entries only",
            ),
            (
                Kind::InvokeRequest,
                "{\"function\":\"f\",\"request_id\":\"r\",\"deadline_ms\":1,\"entry\":{\"kind\":\"invoke_api\"},\"headers\":[[\"X-Amz-Log-Type\",\"Tail\"]]}",
                "travel as log_tail and client_context",
            ),
            (
                Kind::ResponseHead,
                "{\"status\":200,\"headers\":[[\"a\",\"\\u0000\"]],\"host\":\"a\"}",
                "control characters",
            ),
            (Kind::End, "\"not an object\"", "invalid type"),
            (Kind::End, "{\"error\":\"\u{0}\"}", "control character"),
        ];
        for (kind, meta, want) in cases {
            let e = err(&with_meta(kind, meta));
            assert_eq!(e.code(), ErrorCode::BAD_FRAME, "{e}");
            assert!(e.to_string().contains(want), "{kind} {meta}: {e}");
        }
        // Invalid UTF-8 in the meta.
        let meta = b"{\"code\":1,\"message\":\"\xff\xfe\xfd\xfc\"}";
        let mut f = header(1, Kind::Error as u8, 0, meta.len() as u32, 0);
        f.extend(meta);
        assert_eq!(err(&f).code(), ErrorCode::BAD_FRAME);
        // An empty meta is `{}`: fine for End, missing fields elsewhere.
        assert_eq!(
            decode_all(&header(1, Kind::End as u8, 0, 0, 0), Limits::default()).unwrap(),
            vec![Frame::End(End::default())]
        );
        assert!(
            err(&header(1, Kind::Error as u8, 0, 0, 0))
                .to_string()
                .contains("missing field")
        );
        // The encoder validates as the decoder does.
        let bad = Frame::ResponseHead {
            meta: ResponseHead {
                status: 42,
                headers: vec![],
                host: "a".into(),
            },
            body: Bytes::new(),
        };
        assert!(matches!(
            bad.encode(),
            Err(FrameError::Invalid {
                field: "status",
                ..
            })
        ));
    }

    #[test]
    fn a_stream_ending_inside_a_frame_is_truncated() {
        let bytes = examples()[0].encode().unwrap();
        for cut in [1, HEADER_LEN - 1, HEADER_LEN, bytes.len() - 1] {
            let e = decode_all(&bytes[..cut], Limits::default()).unwrap_err();
            assert!(
                matches!(e, FrameError::Truncated { buffered } if buffered == cut),
                "{e}"
            );
            assert_eq!(e.code(), ErrorCode::TRUNCATED);
        }
    }

    #[test]
    fn error_codes_are_distinct_and_named() {
        let mut seen = std::collections::BTreeSet::new();
        for (c, n) in ErrorCode::NAMES {
            assert!(seen.insert(c.0), "{n} repeats 0x{:x}", c.0);
            assert_eq!(c.name(), Some(n));
            assert!(c.0 == 0 || (0x100..0x200).contains(&c.0));
        }
        assert_eq!(
            ErrorCode::FRAME_TOO_LARGE.to_string(),
            "FRAME_TOO_LARGE (0x101)"
        );
        assert_eq!(ErrorCode(0x1ff).to_string(), "0x1ff");
        assert_eq!(Alpn::from_protocol(b"fnlet-peer/1"), Some(Alpn::Peer));
        assert_eq!(
            Alpn::from_protocol(Alpn::Invoke.protocol()),
            Some(Alpn::Invoke)
        );
        assert_eq!(Alpn::from_protocol(b"h3"), None);
    }

    fn ex(kind: Kind) -> Frame {
        examples().into_iter().find(|f| f.kind() == kind).unwrap()
    }

    fn run(mut e: Expect, frames: &[Frame]) -> Result<Expect, FrameError> {
        for f in frames {
            e.check(f)?;
        }
        Ok(e)
    }

    #[test]
    fn answers_must_come_in_order() {
        use Kind::*;
        let invoke = Expect::answer_to(&ex(InvokeRequest)).unwrap();
        let done = run(
            invoke.clone(),
            &[ex(ResponseHead), ex(Data), ex(Data), ex(End)],
        )
        .unwrap();
        assert!(done.is_complete());
        done.finish().unwrap();
        run(invoke.clone(), &[ex(Error)]).unwrap().finish().unwrap();
        for bad in [
            vec![ex(Data)],
            vec![ex(ResponseHead), ex(ResponseHead)],
            vec![ex(ResponseHead), ex(End), ex(Data)],
            vec![ex(ResponseHead), ex(Error)],
            vec![ex(CatalogDelta)],
        ] {
            let e = run(invoke.clone(), &bad).unwrap_err();
            assert_eq!(e.code(), ErrorCode::UNEXPECTED_FRAME, "{bad:?}: {e}");
        }
        let e = run(invoke, &[ex(ResponseHead), ex(Data)])
            .unwrap()
            .finish()
            .unwrap_err();
        assert_eq!(e.code(), ErrorCode::TRUNCATED);
        assert!(e.to_string().contains("End"), "{e}");

        let sync = Expect::answer_to(&ex(CatalogDigest)).unwrap();
        run(sync.clone(), &[ex(CatalogDelta), ex(CatalogDelta), ex(End)])
            .unwrap()
            .finish()
            .unwrap();
        run(sync.clone(), &[ex(End)]).unwrap().finish().unwrap();
        assert!(run(sync, &[ex(CatalogDelta), ex(Error)]).is_err());

        let join = Expect::answer_to(&ex(JoinRequest)).unwrap();
        run(join.clone(), &[ex(JoinResponse)])
            .unwrap()
            .finish()
            .unwrap();
        assert!(run(join.clone(), &[ex(JoinResponse), ex(JoinResponse)]).is_err());
        assert!(join.finish().is_err());
        let renew = Expect::answer_to(&ex(RenewRequest)).unwrap();
        run(renew.clone(), &[ex(RenewResponse)])
            .unwrap()
            .finish()
            .unwrap();
        run(renew.clone(), &[ex(Error)]).unwrap().finish().unwrap();
        assert!(run(renew.clone(), &[ex(JoinResponse)]).is_err());
        assert!(renew.finish().is_err());
        assert!(Expect::answer_to(&ex(Data)).is_none());
    }

    #[test]
    fn bundle_answers_carry_the_announced_bytes_of_the_asked_bundle() {
        let sha = Sha256Hash::of(b"bundle");
        let asked =
            Expect::answer_to(&Frame::BundleRequest(BundleRequest { sha256: sha })).unwrap();
        let head = Frame::BundleHead(BundleHead {
            sha256: sha,
            size: 6,
        });
        let data = |s: &'static [u8]| Frame::Data(Bytes::from_static(s));
        let end = Frame::End(End::default());
        run(
            asked.clone(),
            &[head.clone(), data(b"bun"), data(b"dle"), end.clone()],
        )
        .unwrap()
        .finish()
        .unwrap();
        let short = run(asked.clone(), &[head.clone(), data(b"bun"), end.clone()]).unwrap_err();
        assert!(short.to_string().contains("fewer than the 6"), "{short}");
        let long = run(asked.clone(), &[head.clone(), data(b"bundle!")]).unwrap_err();
        assert!(long.to_string().contains("more than the 6"), "{long}");
        assert_eq!(long.code(), ErrorCode::BAD_FRAME);
        // A sender giving up midway says so in the End.
        let aborted = Frame::End(End {
            error: Some(EndError {
                kind: "Io".into(),
                message: "disk".into(),
            }),
        });
        run(asked.clone(), &[head, data(b"bun"), aborted]).unwrap();
        let other = Frame::BundleHead(BundleHead {
            sha256: Sha256Hash::of(b"other"),
            size: 6,
        });
        let e = run(asked.clone(), &[other]).unwrap_err();
        assert!(e.to_string().contains("the answer is for bundle"), "{e}");
        run(asked, &[ex(Kind::Error)]).unwrap().finish().unwrap();
    }

    #[test]
    fn the_sealing_key_is_hex_on_the_wire_and_never_shown() {
        let key = SealingKey::new([0xab; SealingKey::LEN]);
        assert_eq!(format!("{key:?}"), "SealingKey(..)");
        let json = serde_json::to_string(&key).unwrap();
        assert_eq!(json, format!("\"{}\"", "ab".repeat(32)));
        assert_eq!(serde_json::from_str::<SealingKey>(&json).unwrap(), key);
        assert_ne!(key, SealingKey::new([0xac; SealingKey::LEN]));
        // Wrong length, upper case, not hex: refused, and the error does not quote it.
        for bad in [
            "ab".repeat(31),
            "AB".repeat(32),
            "zz".repeat(32),
            "ab".repeat(33),
        ] {
            let err = serde_json::from_str::<SealingKey>(&format!("\"{bad}\"")).unwrap_err();
            assert!(!err.to_string().contains(&bad[..8]), "{err}");
            assert!(err.to_string().contains("64 lowercase hex"), "{err}");
        }
        // A JoinResponse without one is refused: it is not optional.
        let f = examples()
            .into_iter()
            .find(|f| matches!(f, Frame::JoinResponse(_)))
            .unwrap();
        let Frame::JoinResponse(r) = f else {
            unreachable!()
        };
        let mut v = serde_json::to_value(&r).unwrap();
        v.as_object_mut().unwrap().remove("sealing_key");
        assert!(serde_json::from_value::<JoinResponse>(v).is_err());
    }

    #[test]
    fn requests_are_checked_against_the_alpn_and_the_peer() {
        use Kind::*;
        let peer = Expect::request(Alpn::Peer);
        for k in [
            InvokeRequest,
            BundleRequest,
            ScheduleClaim,
            JoinRequest,
            RenewRequest,
        ] {
            let e = run(peer.clone(), &[ex(k)]).unwrap();
            assert!(e.is_complete());
            assert_eq!(
                run(e, &[ex(k)]).unwrap_err().code(),
                ErrorCode::UNEXPECTED_FRAME
            );
        }
        run(peer.clone(), &[ex(CatalogDigest), ex(CatalogDigest)])
            .unwrap()
            .finish()
            .unwrap();
        assert!(run(peer.clone(), &[ex(CatalogDigest), ex(InvokeRequest)]).is_err());
        for k in [
            Data,
            End,
            ResponseHead,
            CatalogDelta,
            JoinResponse,
            RenewResponse,
        ] {
            assert!(run(peer.clone(), &[ex(k)]).is_err(), "{k}");
        }
        assert_eq!(peer.finish().unwrap_err().code(), ErrorCode::TRUNCATED);

        let invoke = Expect::request(Alpn::Invoke);
        run(invoke.clone(), &[ex(InvokeRequest)])
            .unwrap()
            .finish()
            .unwrap();
        for k in [CatalogDigest, BundleRequest, JoinRequest, RenewRequest] {
            let e = run(invoke.clone(), &[ex(k)]).unwrap_err();
            assert!(e.to_string().contains("fnlet-invoke/1"), "{e}");
        }

        let stranger = Expect::join_request();
        run(stranger.clone(), &[ex(JoinRequest)]).unwrap();
        for k in [InvokeRequest, CatalogDigest, BundleRequest, RenewRequest] {
            let e = run(stranger.clone(), &[ex(k)]).unwrap_err();
            assert!(e.to_string().contains("no cluster certificate"), "{e}");
        }

        let gossip = Expect::gossip();
        run(gossip.clone(), &[ex(CatalogDelta), ex(CatalogDelta)])
            .unwrap()
            .finish()
            .unwrap();
        assert!(run(gossip, &[ex(InvokeRequest)]).is_err());
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        let text = "[a-zA-Z0-9 ./_-]{1,20}";
        let token = "[a-zA-Z0-9!#$%&'*+.^_`|~-]{1,20}";
        let value = "[^\\p{Cc}]{0,30}";
        let headers = proptest::collection::vec((token, value), 0..5);
        let body = proptest::collection::vec(any::<u8>(), 0..300).prop_map(Bytes::from);
        let url_entry = (
            "[A-Z]{3,7}",
            "/[a-z/%0-9]{0,10}",
            "[!-\"$-~]{0,20}",
            proptest::option::of(any::<std::net::IpAddr>()),
        )
            .prop_map(
                |(method, path, query, source_ip)| InvokeEntry::FunctionUrl {
                    method,
                    path,
                    query,
                    source_ip,
                },
            );
        // The Invoke API's own fields go with an invoke_api entry only.
        let entry = prop_oneof![
            Just(InvokeEntry::Exec).prop_map(|e| (e, None, false, None)),
            Just(InvokeEntry::Auto).prop_map(|e| (e, None, false, None)),
            url_entry.prop_map(|e| (e, None, false, None)),
            (
                proptest::option::of(text),
                any::<bool>(),
                proptest::option::of(".{0,40}")
            )
                .prop_map(|(q, t, c)| (InvokeEntry::InvokeApi, q, t, c)),
        ];
        prop_oneof![
            (
                text,
                text,
                any::<u64>(),
                any::<u8>(),
                entry,
                headers.clone(),
                body.clone()
            )
                .prop_map(
                    |(
                        function,
                        request_id,
                        deadline_ms,
                        hops,
                        (entry, qualifier, log_tail, client_context),
                        headers,
                        payload,
                    )| {
                        // What log_tail and client_context carry is not repeated as a header.
                        let headers = match entry {
                            InvokeEntry::InvokeApi => headers
                                .into_iter()
                                .filter(|(n, _): &(String, String)| {
                                    !INVOKE_API_FIELD_HEADERS
                                        .iter()
                                        .any(|f| n.eq_ignore_ascii_case(f))
                                })
                                .collect(),
                            _ => headers,
                        };
                        Frame::InvokeRequest {
                            meta: InvokeRequest {
                                function,
                                qualifier,
                                request_id,
                                deadline_ms,
                                hops,
                                entry,
                                headers,
                                log_tail,
                                client_context,
                            },
                            payload,
                        }
                    }
                ),
            (100u16..600, headers, text, body.clone()).prop_map(|(status, headers, host, body)| {
                Frame::ResponseHead {
                    meta: ResponseHead {
                        status,
                        headers,
                        host,
                    },
                    body,
                }
            }),
            body.prop_map(Frame::Data),
            proptest::option::of((text, ".{0,40}")).prop_map(|e| Frame::End(End {
                error: e.map(|(kind, message)| EndError { kind, message })
            })),
            (any::<u64>(), ".{0,40}").prop_map(|(c, message)| Frame::Error(ErrorFrame {
                code: ErrorCode(c),
                message
            })),
            (any::<[u8; 32]>(), any::<u64>()).prop_map(|(h, size)| Frame::BundleHead(BundleHead {
                sha256: Sha256Hash(h),
                size
            })),
        ]
    }

    proptest! {
        /// Frames survive encoding and decoding whatever the read boundaries.
        #[test]
        fn frames_round_trip_across_any_split(frames in proptest::collection::vec(arb_frame(), 1..6), cuts in proptest::collection::vec(1usize..64, 1..20)) {
            let mut stream = Vec::new();
            for f in &frames { stream.extend_from_slice(&f.encode().unwrap()); }
            let mut d = Decoder::new(Limits::default());
            let mut got = Vec::new();
            let mut at = 0;
            let mut i = 0;
            while at < stream.len() {
                let n = cuts[i % cuts.len()].min(stream.len() - at);
                d.push(&stream[at..at + n]);
                at += n;
                i += 1;
                while let Some(f) = d.next_frame().unwrap() { got.push(f); }
            }
            d.finish().unwrap();
            prop_assert_eq!(got, frames);
        }

        /// Arbitrary bytes never panic the decoder, and never make it buffer more than one
        /// frame within the limits.
        #[test]
        fn garbage_is_an_error_or_needs_more(bytes in proptest::collection::vec(any::<u8>(), 0..200), first in 0u8..3) {
            let mut d = Decoder::new(Limits { max_body: 64 });
            let mut input = vec![first];
            input.extend(bytes);
            d.push(&input);
            loop {
                match d.next_frame() {
                    Ok(Some(_)) => continue,
                    Ok(None) => {
                        prop_assert!(d.buffered() <= HEADER_LEN + MAX_META_LEN as usize + 64);
                        break;
                    }
                    Err(e) => {
                        prop_assert!(e.code().name().is_some());
                        break;
                    }
                }
            }
        }
    }
}
