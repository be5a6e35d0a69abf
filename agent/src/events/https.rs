//! The HTTP(S) client that POSTs destination records to URLs. `https://` URLs are verified
//! as any TLS client verifies them (the server's name against its certificate, the chain
//! against trust anchors): the system's trust store (rustls-native-certs reads
//! /etc/ssl/certs and friends) and, for destinations behind a private CA, the PEM file of
//! `[events] destination_ca_file`.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

pub(crate) type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum HttpsError {
    #[error("events.destination_ca_file {path}: {message}")]
    CaFile { path: String, message: String },
    #[error("the TLS client for https:// destinations: {0}")]
    Tls(String),
    #[error(
        "no trust anchors for https:// destinations: the system has none ({0}) and \
         events.destination_ca_file is not set"
    )]
    NoRoots(String),
}

/// The certificates of a PEM file (one or more `CERTIFICATE` blocks).
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, HttpsError> {
    let err = |message: String| HttpsError::CaFile {
        path: path.display().to_string(),
        message,
    };
    let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| err(format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(err("holds no PEM CERTIFICATE block".into()));
    }
    Ok(certs)
}

/// A client for `http://` and `https://` destination URLs.
pub fn client(ca_file: Option<&Path>) -> Result<HttpClient, HttpsError> {
    let mut roots = rustls::RootCertStore::empty();
    let system = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(system.certs);
    if let Some(path) = ca_file {
        for cert in read_ca_file(path)? {
            roots.add(cert).map_err(|e| HttpsError::CaFile {
                path: path.display().to_string(),
                message: format!("a certificate is not a usable trust anchor: {e}"),
            })?;
        }
    } else if added == 0 {
        // Without anchors every https:// destination would fail at each try; say so at start.
        let why = system
            .errors
            .first()
            .map_or_else(|| "no certificates found".to_string(), ToString::to_string);
        tracing::warn!("{}", HttpsError::NoRoots(why));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| HttpsError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_must_hold_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let err = read_ca_file(&path).unwrap_err().to_string();
        assert!(err.contains("events.destination_ca_file"), "{err}");
        assert!(err.contains("no PEM CERTIFICATE"), "{err}");
        let err = read_ca_file(&dir.path().join("missing.pem"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.pem"), "{err}");

        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(&path, cert.pem()).unwrap();
        assert_eq!(read_ca_file(&path).unwrap().len(), 1);
        assert!(client(Some(&path)).is_ok());
    }
}
