//! The QUIC endpoint: one UDP socket per agent for peers (ALPN `fnlet-peer/1`) and QUIC
//! callers (ALPN `fnlet-invoke/1`), and one reused connection per peer, dialled on demand and
//! re-dialled when it is gone (corrosion's transport keeps the same shape).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

use super::pki::{self, Credentials, PkiError};

/// How long a dial may take before the peer counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Keep-alives hold NAT and conntrack state open and let a dead path show within the idle
/// timeout even when no call is running.
const KEEP_ALIVE: Duration = Duration::from_secs(2);
const IDLE_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("QUIC configuration: {0}")]
    Config(String),
    #[error("binding UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("dialling {peer} at {addr}: {reason}")]
    Connect {
        peer: String,
        addr: SocketAddr,
        reason: String,
    },
}

/// Transport parameters shared by both sides: datagrams on (SWIM), keep-alive, idle timeout.
fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_idle_timeout(IDLE_TIMEOUT.try_into().ok());
    t.datagram_receive_buffer_size(Some(1 << 20));
    Arc::new(t)
}

/// The endpoint's server side, showing this node's certificate.
fn server_config(creds: &Credentials) -> Result<quinn::ServerConfig, TransportError> {
    let quic = QuicServerConfig::try_from(pki::server_config(creds)?)
        .map_err(|e| TransportError::Config(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(transport_config());
    Ok(server)
}

/// A QUIC client configuration from a rustls one.
pub fn client_config(tls: rustls::ClientConfig) -> Result<quinn::ClientConfig, TransportError> {
    let quic =
        QuicClientConfig::try_from(tls).map_err(|e| TransportError::Config(e.to_string()))?;
    let mut c = quinn::ClientConfig::new(Arc::new(quic));
    c.transport_config(transport_config());
    Ok(c)
}

/// This agent's QUIC endpoint and its connections to peers.
pub struct Transport {
    pub endpoint: quinn::Endpoint,
    pub node_id: String,
    /// This node's side of the connections it dials; replaced when its certificate is renewed.
    peer_client: Mutex<quinn::ClientConfig>,
    /// One connection per peer node id.
    conns: Mutex<HashMap<String, quinn::Connection>>,
    /// Serialises dials per peer, so concurrent callers share one connection.
    dialling: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Told of every connection this side dials: the peer sends datagrams and opens streams
    /// on it too, so someone must read them.
    dialled: Mutex<Option<tokio::sync::mpsc::UnboundedSender<(String, quinn::Connection)>>>,
}

impl Transport {
    /// Binds `addr` (UDP) and serves TLS with this node's certificate.
    pub fn bind(addr: SocketAddr, creds: &Credentials) -> Result<Transport, TransportError> {
        let endpoint = quinn::Endpoint::server(server_config(creds)?, addr)
            .map_err(|source| TransportError::Bind { addr, source })?;
        Ok(Transport {
            endpoint,
            node_id: creds.node_id.clone(),
            peer_client: Mutex::new(client_config(pki::peer_client_config(creds)?)?),
            conns: Mutex::new(HashMap::new()),
            dialling: Mutex::new(HashMap::new()),
            dialled: Mutex::new(None),
        })
    }

    /// Shows `creds` (a renewed certificate) on every connection from now on, accepted and
    /// dialled; connections already open keep the certificate they were made with.
    pub fn reload(&self, creds: &Credentials) -> Result<(), TransportError> {
        let server = server_config(creds)?;
        let client = client_config(pki::peer_client_config(creds)?)?;
        self.endpoint.set_server_config(Some(server));
        *self.peer_client.lock().unwrap_or_else(|p| p.into_inner()) = client;
        Ok(())
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The live connection to `peer` at `addr`, dialled if there is none. The peer's
    /// certificate must name `peer`.
    pub async fn connect(
        &self,
        peer: &str,
        addr: SocketAddr,
    ) -> Result<quinn::Connection, TransportError> {
        if let Some(c) = self.cached(peer, addr) {
            return Ok(c);
        }
        let gate = {
            let mut d = self.dialling.lock().unwrap_or_else(|p| p.into_inner());
            d.entry(peer.to_string()).or_default().clone()
        };
        let _one_dial = gate.lock().await;
        if let Some(c) = self.cached(peer, addr) {
            return Ok(c);
        }
        let fail = |reason: String| TransportError::Connect {
            peer: peer.to_string(),
            addr,
            reason,
        };
        let connecting = self
            .endpoint
            .connect_with(
                self.peer_client
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone(),
                addr,
                peer,
            )
            .map_err(|e| fail(e.to_string()))?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| fail(format!("no answer within {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| fail(e.to_string()))?;
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer.to_string(), conn.clone());
        if let Some(tx) = self
            .dialled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let _ = tx.send((peer.to_string(), conn.clone()));
        }
        Ok(conn)
    }

    /// Where to hear of the connections this side dials (see `dialled`).
    pub fn on_dial(&self) -> tokio::sync::mpsc::UnboundedReceiver<(String, quinn::Connection)> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        *self.dialled.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        rx
    }

    fn cached(&self, peer: &str, addr: SocketAddr) -> Option<quinn::Connection> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        match conns.get(peer) {
            Some(c) if c.close_reason().is_none() && c.remote_address() == addr => Some(c.clone()),
            Some(_) => {
                conns.remove(peer);
                None
            }
            None => None,
        }
    }

    /// Keeps a connection a peer dialled to us, so replies reuse it.
    pub fn adopt(&self, peer: &str, conn: &quinn::Connection) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let live = conns.get(peer).is_some_and(|c| c.close_reason().is_none());
        if !live {
            conns.insert(peer.to_string(), conn.clone());
        }
    }

    /// Forgets the connection to `peer` (declared down) and hands it back to be closed: the
    /// next call to it dials afresh.
    pub fn take_peer(&self, peer: &str) -> Option<quinn::Connection> {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(peer)
    }

    /// Every live peer connection with its node id.
    pub fn connections(&self) -> Vec<(String, quinn::Connection)> {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, c)| c.close_reason().is_none())
            .map(|(k, c)| (k.clone(), c.clone()))
            .collect()
    }
}

/// The node id a connection's other side proved with its certificate, if it showed one.
pub fn peer_node_id(conn: &quinn::Connection) -> Option<String> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    pki::cert_node_id(certs.first()?).ok()
}

/// The ALPN a connection agreed on.
pub fn alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::pki::{ClusterDir, node_key_and_csr, sign_csr};

    /// A second node's credentials issued by `ca`'s CA.
    fn member(ca: &ClusterDir, dir: &std::path::Path, id: &str) -> Credentials {
        let c = ClusterDir::new(dir);
        let (key, csr) = node_key_and_csr(id).unwrap();
        let cert = sign_csr(
            &ca.issuer().unwrap(),
            &csr,
            id,
            crate::cluster::pki::NODE_CERT_VALIDITY,
        )
        .unwrap();
        c.store_ca_cert(&std::fs::read_to_string(ca.ca_cert()).unwrap())
            .unwrap();
        c.store_node(&key.serialize_pem(), &cert).unwrap();
        c.node_credentials().unwrap()
    }

    /// Accepts every connection (a handshake goes on only once accepted); the first one that
    /// completes is reported.
    async fn serve_one(t: Arc<Transport>) -> Option<(Option<String>, Option<Vec<u8>>)> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            while let Some(incoming) = t.endpoint.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Ok(conn) = incoming.await {
                        let _ = tx.send((peer_node_id(&conn), alpn(&conn))).await;
                        // Held open until the test ends.
                        conn.closed().await;
                    }
                });
            }
        });
        rx.recv().await
    }

    #[tokio::test]
    async fn peers_of_one_ca_connect_and_know_each_other() {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let ca = ClusterDir::new(d1.path());
        ca.init("alpha").unwrap();
        let alpha = Arc::new(
            Transport::bind(
                "127.0.0.1:0".parse().unwrap(),
                &ca.node_credentials().unwrap(),
            )
            .unwrap(),
        );
        let beta_creds = member(&ca, d2.path(), "beta");
        let beta = Transport::bind("127.0.0.1:0".parse().unwrap(), &beta_creds).unwrap();
        let server = tokio::spawn(serve_one(alpha.clone()));
        let conn = beta
            .connect("alpha", alpha.local_addr().unwrap())
            .await
            .unwrap();
        assert_eq!(peer_node_id(&conn).as_deref(), Some("alpha"));
        let (seen, proto) = server.await.unwrap().unwrap();
        assert_eq!(seen.as_deref(), Some("beta"));
        assert_eq!(proto.as_deref(), Some(pki::ALPN_PEER));
        // Reused, not dialled again.
        let again = beta
            .connect("alpha", alpha.local_addr().unwrap())
            .await
            .unwrap();
        assert_eq!(again.stable_id(), conn.stable_id());
        // Dialling alpha's address under another name fails: the cert names alpha.
        let wrong = beta.connect("gamma", alpha.local_addr().unwrap()).await;
        assert!(wrong.is_err());
    }

    /// The certificate the other side showed.
    fn peer_cert(conn: &quinn::Connection) -> Vec<u8> {
        conn.peer_identity()
            .unwrap()
            .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
            .unwrap()[0]
            .to_vec()
    }

    #[tokio::test]
    async fn a_renewed_certificate_is_shown_on_new_connections_both_ways() {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let ca = ClusterDir::new(d1.path());
        ca.init("alpha").unwrap();
        let alpha = Arc::new(
            Transport::bind(
                "127.0.0.1:0".parse().unwrap(),
                &ca.node_credentials().unwrap(),
            )
            .unwrap(),
        );
        member(&ca, d2.path(), "beta");
        let beta_dir = ClusterDir::new(d2.path());
        let beta = Transport::bind(
            "127.0.0.1:0".parse().unwrap(),
            &beta_dir.node_credentials().unwrap(),
        )
        .unwrap();
        let (tx, mut seen_by_alpha) = tokio::sync::mpsc::unbounded_channel();
        let server = alpha.clone();
        tokio::spawn(async move {
            while let Some(incoming) = server.endpoint.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Ok(conn) = incoming.await {
                        let _ = tx.send(peer_cert(&conn));
                        conn.closed().await;
                    }
                });
            }
        });
        let addr = alpha.local_addr().unwrap();
        let first = beta.connect("alpha", addr).await.unwrap();
        let beta_first = beta_dir.node_cert_der().unwrap().to_vec();
        assert_eq!(seen_by_alpha.recv().await.unwrap(), beta_first);
        let alpha_first = ca.node_cert_der().unwrap().to_vec();
        assert_eq!(peer_cert(&first), alpha_first);

        // Both renew (same keys, new certificates) and reload, without a restart.
        let issuer = ca.issuer().unwrap();
        for (dir, t, id) in [(&ca, &*alpha, "alpha"), (&beta_dir, &beta, "beta")] {
            let csr = dir.renewal_csr(id).unwrap();
            let cert = sign_csr(&issuer, &csr, id, Duration::from_secs(3600)).unwrap();
            dir.store_renewed(id, &cert).unwrap();
            t.reload(&dir.node_credentials().unwrap()).unwrap();
        }
        let (alpha_new, beta_new) = (
            ca.node_cert_der().unwrap().to_vec(),
            beta_dir.node_cert_der().unwrap().to_vec(),
        );
        assert_ne!(alpha_new, alpha_first);
        assert_ne!(beta_new, beta_first);
        // The open connection goes on; a new one shows the new certificates, both ways.
        assert!(first.close_reason().is_none());
        beta.take_peer("alpha");
        let second = beta.connect("alpha", addr).await.unwrap();
        assert_ne!(second.stable_id(), first.stable_id());
        assert_eq!(peer_cert(&second), alpha_new);
        assert_eq!(seen_by_alpha.recv().await.unwrap(), beta_new);
    }

    #[tokio::test]
    async fn another_clusters_node_is_refused() {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let ours = ClusterDir::new(d1.path());
        ours.init("alpha").unwrap();
        let theirs = ClusterDir::new(d2.path());
        theirs.init("mallory").unwrap();
        let alpha = Arc::new(
            Transport::bind(
                "127.0.0.1:0".parse().unwrap(),
                &ours.node_credentials().unwrap(),
            )
            .unwrap(),
        );
        let mallory = Transport::bind(
            "127.0.0.1:0".parse().unwrap(),
            &theirs.node_credentials().unwrap(),
        )
        .unwrap();
        let server = tokio::spawn(serve_one(alpha.clone()));
        let r = mallory.connect("alpha", alpha.local_addr().unwrap()).await;
        assert!(r.is_err(), "mallory's CA does not vouch for alpha");
        // And alpha refuses mallory's certificate as a client.
        let r = tokio::time::timeout(Duration::from_secs(2), server).await;
        if let Ok(Ok(Some((seen, _)))) = r {
            assert_eq!(seen, None, "a foreign certificate was accepted");
        }
    }

    #[tokio::test]
    async fn a_joiner_pins_the_ca_by_its_hash() {
        let d1 = tempfile::tempdir().unwrap();
        let ca = ClusterDir::new(d1.path());
        ca.init("alpha").unwrap();
        let alpha = Arc::new(
            Transport::bind(
                "127.0.0.1:0".parse().unwrap(),
                &ca.node_credentials().unwrap(),
            )
            .unwrap(),
        );
        let pin = pki::cert_sha256(&ca.ca_der().unwrap());
        let joiner = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let server = tokio::spawn(serve_one(alpha.clone()));
        let good = client_config(pki::join_client_config(&pin).unwrap()).unwrap();
        let conn = joiner
            .connect_with(good, alpha.local_addr().unwrap(), "join")
            .unwrap()
            .await
            .unwrap();
        assert_eq!(peer_node_id(&conn).as_deref(), Some("alpha"));
        let (seen, _) = server.await.unwrap().unwrap();
        assert_eq!(seen, None, "a joiner shows no certificate");
        let wrong = client_config(pki::join_client_config(&"0".repeat(64)).unwrap()).unwrap();
        let r = joiner
            .connect_with(wrong, alpha.local_addr().unwrap(), "join")
            .unwrap()
            .await;
        assert!(r.is_err(), "a token pinning another CA must not connect");
    }
}
