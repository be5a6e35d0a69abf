//! A destination URL served by a test: it keeps every record POSTed to it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// An HTTP destination served by the test: every POSTed record, in arrival order.
pub struct Sink {
    pub url: String,
    records: Arc<Mutex<Vec<Value>>>,
}

impl Sink {
    pub fn start() -> Sink {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the sink");
        let url = format!("http://{}/records", listener.local_addr().expect("addr"));
        let records = Arc::new(Mutex::new(Vec::new()));
        let kept = records.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let kept = kept.clone();
                std::thread::spawn(move || serve(conn, &kept));
            }
        });
        Sink { url, records }
    }

    /// An `https://localhost:PORT/records` sink with a certificate of its own CA; returns the
    /// sink and that CA's certificate (PEM) for the client to trust.
    pub fn start_tls() -> (Sink, String) {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::new()).expect("CA params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fnlet test sink CA");
        let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().expect("server key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .expect("server params")
            .signed_by(&key, &issuer)
            .expect("server certificate");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .expect("server TLS config");
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the sink");
        let port = listener.local_addr().expect("addr").port();
        let url = format!("https://localhost:{port}/records");
        let records = Arc::new(Mutex::new(Vec::new()));
        let kept = records.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let Ok(tls) = rustls::ServerConnection::new(config.clone()) else {
                    continue;
                };
                let kept = kept.clone();
                std::thread::spawn(move || serve(rustls::StreamOwned::new(tls, conn), &kept));
            }
        });
        (Sink { url, records }, ca.pem())
    }

    pub fn records(&self) -> Vec<Value> {
        self.records.lock().expect("sink lock").clone()
    }

    /// Waits (up to `limit`) until `pred` holds for the records.
    pub fn wait(&self, limit: Duration, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let started = Instant::now();
        loop {
            let r = self.records();
            if pred(&r) {
                return r;
            }
            assert!(
                started.elapsed() < limit,
                "{what}: not within {limit:?}; {} records: {:#?}",
                r.len(),
                r.iter().rev().take(5).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// One connection: requests (keep-alive) with a Content-Length body, each answered 200.
fn serve(conn: impl Read + Write, kept: &Mutex<Vec<Value>>) {
    let mut reader = BufReader::new(conn);
    loop {
        let mut len = 0usize;
        let mut line = String::new();
        let mut first = true;
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" && !first {
                break;
            }
            first = false;
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let v: Value = serde_json::from_slice(&body).unwrap_or_else(
            |e| json!({ "not_json": e.to_string(), "raw": String::from_utf8_lossy(&body) }),
        );
        kept.lock().expect("sink lock").push(v);
        let writer = reader.get_mut();
        if writer
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .and_then(|()| writer.flush())
            .is_err()
        {
            return;
        }
    }
}
