//! fnlet-peer-client: a stranger on an agent's QUIC endpoint, for tests/cluster.rs. It
//! connects without a client certificate, offering one ALPN, opens one bidirectional stream,
//! sends the given bytes, finishes the stream, and reports how the connection ended.
//!
//! Usage: `fnlet-peer-client ADDR:PORT ALPN HEX`
//!
//! It prints one JSON object on stdout:
//! - `{"outcome":"closed","code":N,"reason":"..."}`: the agent closed the connection with
//!   application error code N;
//! - `{"outcome":"transport_error","code":N,"reason":"..."}`: a QUIC transport error (a TLS
//!   alert is `0x100 + alert`: a refused ALPN is 0x178);
//! - `{"outcome":"open","answer":"HEX"}`: still open 5 s after the stream ended, with what the
//!   agent wrote on the stream;
//! - `{"outcome":"other","error":"..."}`.
//!
//! The agent's certificate is not checked: what is tested is how the agent treats the
//! stranger, not who the agent is. Exit status 2 on bad usage.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde_json::json;

/// How long the handshake, and then the wait for the agent's close, may take.
const PATIENCE: Duration = Duration::from_secs(5);

/// Accepts any server certificate (see the module comment); signatures are still checked, so
/// the TLS handshake itself is a real one.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// How a connection ended, as the JSON report.
fn report(e: &quinn::ConnectionError) -> serde_json::Value {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => json!({
            "outcome": "closed",
            "code": c.error_code.into_inner(),
            "reason": String::from_utf8_lossy(&c.reason),
        }),
        quinn::ConnectionError::ConnectionClosed(c) => json!({
            "outcome": "transport_error",
            "code": u64::from(c.error_code),
            "reason": String::from_utf8_lossy(&c.reason),
        }),
        other => json!({"outcome": "other", "error": other.to_string()}),
    }
}

async fn run(addr: SocketAddr, alpn: &str, payload: Vec<u8>) -> Result<serde_json::Value, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.as_bytes().to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let bind: SocketAddr = if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = quinn::Endpoint::client(bind).map_err(|e| format!("UDP socket: {e}"))?;
    let connecting = endpoint
        .connect_with(quinn::ClientConfig::new(Arc::new(quic)), addr, "fnlet")
        .map_err(|e| e.to_string())?;
    let conn = match tokio::time::timeout(PATIENCE, connecting).await {
        Err(_) => return Ok(json!({"outcome": "other", "error": "handshake timed out"})),
        Ok(Err(e)) => return Ok(report(&e)),
        Ok(Ok(c)) => c,
    };
    // The agent may close the connection before the stream is even opened (that is an
    // answer too): the stream's own errors are not the report, the connection's end is.
    let mut answer = Vec::new();
    if let Ok((mut send, mut recv)) = conn.open_bi().await
        && send.write_all(&payload).await.is_ok()
        && send.finish().is_ok()
    {
        let read = tokio::time::timeout(PATIENCE, recv.read_to_end(1 << 20)).await;
        if let Ok(Ok(bytes)) = read {
            answer = bytes;
        }
    }
    match tokio::time::timeout(PATIENCE, conn.closed()).await {
        Ok(e) => Ok(report(&e)),
        Err(_) => {
            conn.close(0u32.into(), b"done");
            Ok(json!({"outcome": "open", "answer": hex(&answer)}))
        }
    }
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match args.as_slice() {
        [addr, alpn, payload] => addr
            .parse::<SocketAddr>()
            .ok()
            .zip(unhex(payload))
            .map(|(a, p)| (a, alpn.clone(), p)),
        _ => None,
    };
    let Some((addr, alpn, payload)) = parsed else {
        eprintln!("usage: fnlet-peer-client ADDR:PORT ALPN HEX");
        return std::process::ExitCode::from(2);
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fnlet-peer-client: tokio: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let out = rt
        .block_on(run(addr, &alpn, payload))
        .unwrap_or_else(|e| json!({"outcome": "other", "error": e}));
    println!("{out}");
    std::process::ExitCode::SUCCESS
}
