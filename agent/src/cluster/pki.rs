//! The cluster's trust: a CA that `fnlet cluster init` makes on one host (its key never leaves
//! that host), node certificates issued from joiners' CSRs (their keys never leave them), and
//! the rustls configurations that accept only this CA's certificates.
//!
//! Files under `<state dir>/cluster/`: `ca.pem` (every node), `ca.key` (the init host only,
//! 0600), `node.key` (0600) and `node.pem` (this node's certificate, naming its node id), and
//! `keys.key` (0600, every node: the cluster's sealing key for access key secrets, made by
//! init and handed to joiners, see `cluster::access_keys`).
//!
//! A node certificate names its node id as its one DNS subject alternative name, so a peer's
//! id is read from the certificate its TLS handshake proved, never from what it claims. It is
//! valid for `node_cert_validity` (a year by default); past 2/3 of that the node renews it for
//! the same key ([`ClusterDir::renewal_csr`], [`ClusterDir::store_renewed`]; the exchange is in
//! `node.rs`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

/// ALPN of agent-to-agent connections: membership datagrams, catalog, bundles, forwarding.
pub const ALPN_PEER: &[u8] = b"fnlet-peer/1";
/// ALPN of QUIC callers invoking functions.
pub const ALPN_INVOKE: &[u8] = b"fnlet-invoke/1";

/// How long a node certificate is valid by default (`cluster.node_cert_validity_s` on the CA
/// holder); a node renews it from the CA holder once past 2/3 of its lifetime.
pub const NODE_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// How far before its issue a certificate's validity starts, for clocks a little behind:
/// 5 minutes, or a tenth of a short lifetime.
const BACKDATE: Duration = Duration::from_secs(5 * 60);
/// How long the cluster CA is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("making a certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("{path}: not a PEM {what}")]
    Pem { path: PathBuf, what: &'static str },
    #[error("the certificate request is not valid: {0}")]
    BadCsr(String),
    #[error("the certificate names no node id (one DNS subject alternative name)")]
    NoNodeId,
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("TLS verifier: {0}")]
    Verifier(#[from] rustls::client::VerifierBuilderError),
    #[error("this host holds no cluster CA key: run `fnlet cluster init` here, or join a cluster")]
    NotCaHolder,
    #[error(
        "this host is not in a cluster yet: run `fnlet cluster init`, or start the agent with --join"
    )]
    NoCluster,
    #[error("the certificate's validity cannot be read")]
    BadValidity,
    #[error("the new certificate {0}")]
    WrongCert(&'static str),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The sha256 of a certificate's DER, lowercase hex: what a join token pins.
pub fn cert_sha256(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Whether `id` can name a node: it becomes a DNS name in the node's certificate.
pub fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 63
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
        && !id.ends_with('-')
}

/// The cluster's files in a state dir.
#[derive(Debug, Clone)]
pub struct ClusterDir {
    pub dir: PathBuf,
    /// How long the node certificates this host issues (as CA holder) are valid.
    pub node_cert_validity: Duration,
}

impl ClusterDir {
    pub fn new(state_dir: &Path) -> ClusterDir {
        ClusterDir {
            dir: state_dir.join("cluster"),
            node_cert_validity: NODE_CERT_VALIDITY,
        }
    }

    /// Node certificates this host issues are valid for `validity` (`cluster.node_cert_validity_s`).
    pub fn with_node_cert_validity(mut self, validity: Duration) -> ClusterDir {
        self.node_cert_validity = validity;
        self
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn node_key(&self) -> PathBuf {
        self.dir.join("node.key")
    }
    pub fn node_cert(&self) -> PathBuf {
        self.dir.join("node.pem")
    }
    /// The cluster's access key sealing key.
    pub fn sealing_key(&self) -> PathBuf {
        self.dir.join("keys.key")
    }

    /// Whether this node has joined a cluster (or made one): it holds a node certificate.
    pub fn is_member(&self) -> bool {
        self.node_cert().exists() && self.node_key().exists() && self.ca_cert().exists()
    }

    pub fn is_ca_holder(&self) -> bool {
        self.ca_key().exists() && self.ca_cert().exists()
    }

    fn create(&self) -> Result<(), PkiError> {
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io(&self.dir))
    }

    /// Makes the cluster CA and this node's certificate under it. Refuses to replace an
    /// existing CA (every node's trust hangs on it).
    pub fn init(&self, node_id: &str) -> Result<(), PkiError> {
        if self.is_ca_holder() {
            return Ok(());
        }
        self.create()?;
        let ca_key = KeyPair::generate()?;
        let ca_params = ca_params()?;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        write_secret(&self.ca_key(), ca_key.serialize_pem().as_bytes())?;
        write_file(&self.ca_cert(), ca_cert.pem().as_bytes())?;
        let (node_key, csr) = node_key_and_csr(node_id)?;
        let issuer = Issuer::new(ca_params, ca_key);
        let cert = sign_csr(&issuer, &csr, node_id, self.node_cert_validity)?;
        self.store_node(&node_key.serialize_pem(), &cert)
    }

    /// This node's certificate (DER).
    pub fn node_cert_der(&self) -> Result<CertificateDer<'static>, PkiError> {
        first_cert(&self.node_cert())
    }

    /// A CSR for this node's own key (which stays the same across renewals), naming `node_id`.
    pub fn renewal_csr(&self, node_id: &str) -> Result<String, PkiError> {
        let key = KeyPair::from_pem(&read(&self.node_key())?)?;
        csr_for(&key, node_id)
    }

    /// Keeps a renewed certificate for this node's key: checked first to name `node_id`, to be
    /// for this node's key and to be this CA's, then written in place of the old one (one
    /// rename: the key does not change).
    pub fn store_renewed(&self, node_id: &str, cert_pem: &str) -> Result<(), PkiError> {
        use rustls::pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|_| PkiError::WrongCert("is not PEM"))?;
        if cert_node_id(&der)? != node_id {
            return Err(PkiError::WrongCert("names another node"));
        }
        let key = KeyPair::from_pem(&read(&self.node_key())?)?;
        if cert_public_key(&der)? != rcgen::PublicKeyData::subject_public_key_info(&key) {
            return Err(PkiError::WrongCert("is for another key"));
        }
        let ca = self.ca_der()?;
        let verifier = AnyNodeOf::new(ca)?;
        verifier
            .verify_server_cert(
                &der,
                &[],
                &ServerName::try_from(node_id.to_string())
                    .map_err(|_| PkiError::WrongCert("names no DNS name"))?,
                &[],
                UnixTime::now(),
            )
            .map_err(|_| PkiError::WrongCert("is not a valid certificate of this cluster's CA"))?;
        write_file(&self.node_cert(), cert_pem.as_bytes())
    }

    /// Keeps this node's key and certificate (and, when joining, the CA's certificate).
    pub fn store_node(&self, key_pem: &str, cert_pem: &str) -> Result<(), PkiError> {
        self.create()?;
        write_secret(&self.node_key(), key_pem.as_bytes())?;
        write_file(&self.node_cert(), cert_pem.as_bytes())
    }

    pub fn store_ca_cert(&self, pem: &str) -> Result<(), PkiError> {
        self.create()?;
        write_file(&self.ca_cert(), pem.as_bytes())
    }

    /// The CA as an issuer, on the host that holds its key.
    pub fn issuer(&self) -> Result<Issuer<'static, KeyPair>, PkiError> {
        if !self.is_ca_holder() {
            return Err(PkiError::NotCaHolder);
        }
        let key_pem = read(&self.ca_key())?;
        let key = KeyPair::from_pem(&key_pem)?;
        let cert_pem = read(&self.ca_cert())?;
        Ok(Issuer::from_ca_cert_pem(&cert_pem, key)?)
    }

    pub fn ca_der(&self) -> Result<CertificateDer<'static>, PkiError> {
        first_cert(&self.ca_cert())
    }

    /// This node's credentials for rustls: its certificate chain (node, CA) and key.
    pub fn node_credentials(&self) -> Result<Credentials, PkiError> {
        if !self.is_member() {
            return Err(PkiError::NoCluster);
        }
        let node = first_cert(&self.node_cert())?;
        let ca = self.ca_der()?;
        let key_pem = read(&self.node_key())?;
        let key = KeyPair::from_pem(&key_pem)?;
        let node_id = cert_node_id(&node)?;
        Ok(Credentials {
            chain: vec![node, ca.clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            ca,
            node_id,
        })
    }
}

/// What this node shows and trusts in TLS.
pub struct Credentials {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
    pub ca: CertificateDer<'static>,
    /// The node id its certificate names.
    pub node_id: String,
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(io(path))
}

fn first_cert(path: &Path) -> Result<CertificateDer<'static>, PkiError> {
    use rustls::pki_types::pem::PemObject;
    let pem = read(path)?;
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|_| PkiError::Pem {
        path: path.to_path_buf(),
        what: "certificate",
    })
}

/// Writes `data` to `path` through a temporary file and a rename, mode 0644.
fn write_file(path: &Path, data: &[u8]) -> Result<(), PkiError> {
    write_mode(path, data, 0o644)
}

/// Like `write_file`, mode 0600 from the start.
fn write_secret(path: &Path, data: &[u8]) -> Result<(), PkiError> {
    write_mode(path, data, 0o600)
}

fn write_mode(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(data).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

fn ca_params() -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "fnlet cluster CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::minutes(5);
    p.not_after = now + CA_VALIDITY;
    Ok(p)
}

/// A fresh key for this node and a CSR naming `node_id` (PEM). The key stays here.
pub fn node_key_and_csr(node_id: &str) -> Result<(KeyPair, String), PkiError> {
    let key = KeyPair::generate()?;
    let csr = csr_for(&key, node_id)?;
    Ok((key, csr))
}

fn csr_for(key: &KeyPair, node_id: &str) -> Result<String, PkiError> {
    let mut p = CertificateParams::new(vec![node_id.to_string()])?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node_id);
    p.distinguished_name = dn;
    Ok(p.serialize_request(key)?.pem()?)
}

/// When a certificate should be renewed: past 2/3 of its lifetime (`not_before` to
/// `not_after`), as Unix seconds.
pub fn renew_at(der: &[u8]) -> Result<i64, PkiError> {
    let (from, until) = cert_validity(der)?;
    Ok(from + (until - from) * 2 / 3)
}

/// A certificate's `not_before` and `not_after`, Unix seconds.
pub fn cert_validity(der: &[u8]) -> Result<(i64, i64), PkiError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| PkiError::BadValidity)?;
    let v = cert.validity();
    let (from, until) = (v.not_before.timestamp(), v.not_after.timestamp());
    if until <= from {
        return Err(PkiError::BadValidity);
    }
    Ok((from, until))
}

/// A certificate's subject public key info (DER).
fn cert_public_key(der: &[u8]) -> Result<Vec<u8>, PkiError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| PkiError::NoNodeId)?;
    Ok(cert.public_key().raw.to_vec())
}

/// Issues a node certificate for `node_id` from a CSR. Only the CSR's public key is taken:
/// the names, usages and validity are the CA's choice, never the requester's.
pub fn sign_csr(
    issuer: &Issuer<'_, KeyPair>,
    csr_pem: &str,
    node_id: &str,
    validity: Duration,
) -> Result<String, PkiError> {
    if !valid_node_id(node_id) {
        return Err(PkiError::BadCsr(format!(
            "node id {node_id:?}: 1-63 of a-z 0-9 -, not starting or ending with -"
        )));
    }
    let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| PkiError::BadCsr(e.to_string()))?;
    let mut p = CertificateParams::new(vec![node_id.to_string()])?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node_id);
    p.distinguished_name = dn;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - BACKDATE.min(validity / 10);
    p.not_after = now + validity;
    p.use_authority_key_identifier_extension = true;
    csr.params = p;
    Ok(csr.signed_by(issuer)?.pem())
}

/// The node id a certificate names: its one DNS subject alternative name.
pub fn cert_node_id(der: &[u8]) -> Result<String, PkiError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| PkiError::NoNodeId)?;
    let san = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .ok_or(PkiError::NoNodeId)?;
    let mut names = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::DNSName(d) => Some(d.to_string()),
        _ => None,
    });
    match (names.next(), names.next()) {
        (Some(id), None) if valid_node_id(&id) => Ok(id),
        _ => Err(PkiError::NoNodeId),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, PkiError> {
    let mut r = RootCertStore::empty();
    r.add(ca.clone())?;
    Ok(Arc::new(r))
}

/// The server side of this node's QUIC endpoint: it shows its certificate; a client may show
/// one (peers must, and it must be this CA's) or none (a joiner, or a QUIC caller).
pub fn server_config(creds: &Credentials) -> Result<rustls::ServerConfig, PkiError> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(&creds.ca)?, provider())
            .allow_unauthenticated()
            .build()?;
    let mut c = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            creds.chain.clone(),
            PrivateKeyDer::Pkcs8(creds.key.clone_key()),
        )?;
    c.alpn_protocols = vec![ALPN_PEER.to_vec(), ALPN_INVOKE.to_vec()];
    // No 0-RTT: replayable early data has no place in membership or invocation.
    c.max_early_data_size = 0;
    Ok(c)
}

/// The client side towards a peer: its certificate must be this CA's and name the node id
/// dialled (the server name); this node shows its own.
pub fn peer_client_config(creds: &Credentials) -> Result<rustls::ClientConfig, PkiError> {
    let mut c = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(&creds.ca)?)
        .with_client_auth_cert(
            creds.chain.clone(),
            PrivateKeyDer::Pkcs8(creds.key.clone_key()),
        )?;
    c.alpn_protocols = vec![ALPN_PEER.to_vec()];
    c.enable_early_data = false;
    Ok(c)
}

/// The client side of a QUIC caller (`fnlet invoke --quic`): the agent's certificate must be
/// this CA's; any node id will do.
pub fn caller_client_config(
    ca: &CertificateDer<'static>,
) -> Result<rustls::ClientConfig, PkiError> {
    let verifier = AnyNodeOf::new(ca.clone())?;
    let mut c = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    c.alpn_protocols = vec![ALPN_INVOKE.to_vec()];
    Ok(c)
}

/// The client side of a joiner: it has no certificate yet and knows the CA only by the hash
/// in its token. The server's chain must end in a CA with that hash, and its certificate be
/// signed by it.
pub fn join_client_config(ca_sha256: &str) -> Result<rustls::ClientConfig, PkiError> {
    let verifier = PinnedCa {
        ca_sha256: ca_sha256.to_ascii_lowercase(),
    };
    let mut c = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    c.alpn_protocols = vec![ALPN_PEER.to_vec()];
    Ok(c)
}

/// Verifies a server certificate against one CA, for whatever node id it names.
#[derive(Debug)]
struct AnyNodeOf {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
}

impl AnyNodeOf {
    fn new(ca: CertificateDer<'static>) -> Result<AnyNodeOf, PkiError> {
        let inner =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots(&ca)?, provider())
                .build()?;
        Ok(AnyNodeOf { inner })
    }
}

fn named(end_entity: &CertificateDer<'_>) -> Result<ServerName<'static>, rustls::Error> {
    let id = cert_node_id(end_entity).map_err(|e| rustls::Error::General(e.to_string()))?;
    ServerName::try_from(id).map_err(|e| rustls::Error::General(e.to_string()))
}

impl ServerCertVerifier for AnyNodeOf {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = named(end_entity)?;
        self.inner
            .verify_server_cert(end_entity, intermediates, &name, ocsp, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A joiner's verifier: the CA is the chain's certificate whose sha256 the token pins.
#[derive(Debug)]
struct PinnedCa {
    ca_sha256: String,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| cert_sha256(c) == self.ca_sha256)
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the server's CA is not the one the join token pins (sha256 {})",
                    self.ca_sha256
                ))
            })?
            .clone()
            .into_owned();
        let verifier = AnyNodeOf::new(ca).map_err(|e| rustls::Error::General(e.to_string()))?;
        // The joiner checks the CA in the join's answer against the token itself.
        verifier.verify_server_cert(end_entity, &[], server_name, ocsp, now)
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
            &provider().signature_verification_algorithms,
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
            &provider().signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_dns_labels() {
        assert!(valid_node_id("host-1"));
        assert!(valid_node_id("a"));
        for bad in ["", "-a", "a-", "Host", "a.b", "a_b", &"x".repeat(64)] {
            assert!(!valid_node_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn init_issues_a_node_cert_naming_the_node() {
        let d = tempfile::tempdir().unwrap();
        let c = ClusterDir::new(d.path());
        assert!(!c.is_member());
        c.init("alpha").unwrap();
        assert!(c.is_member() && c.is_ca_holder());
        let creds = c.node_credentials().unwrap();
        assert_eq!(creds.node_id, "alpha");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(c.ca_key()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A second init keeps the CA: every node's trust hangs on it.
        let before = std::fs::read(c.ca_cert()).unwrap();
        c.init("alpha").unwrap();
        assert_eq!(std::fs::read(c.ca_cert()).unwrap(), before);
        server_config(&creds).unwrap();
        peer_client_config(&creds).unwrap();
    }

    #[test]
    fn the_ca_decides_the_name_not_the_csr() {
        let d = tempfile::tempdir().unwrap();
        let c = ClusterDir::new(d.path());
        c.init("ca-host").unwrap();
        let issuer = c.issuer().unwrap();
        // The CSR asks for "mallory"; the CA issues for the id it approved.
        let (_key, csr) = node_key_and_csr("mallory").unwrap();
        let pem = sign_csr(&issuer, &csr, "beta", NODE_CERT_VALIDITY).unwrap();
        use rustls::pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(cert_node_id(&der).unwrap(), "beta");
        assert!(matches!(
            sign_csr(&issuer, "not a csr", "beta", NODE_CERT_VALIDITY),
            Err(PkiError::BadCsr(_))
        ));
        assert!(matches!(
            sign_csr(&issuer, &csr, "Bad Id", NODE_CERT_VALIDITY),
            Err(PkiError::BadCsr(_))
        ));
    }

    #[test]
    fn a_renewed_certificate_keeps_the_key_and_is_checked_before_it_is_kept() {
        let d = tempfile::tempdir().unwrap();
        let ca = ClusterDir::new(d.path()).with_node_cert_validity(Duration::from_secs(30));
        ca.init("alpha").unwrap();
        // A 30 s certificate, valid from 3 s before its issue: renewed 2/3 of 33 s in.
        let der = ca.node_cert_der().unwrap();
        let (from, until) = cert_validity(&der).unwrap();
        assert_eq!(until - from, 33);
        assert_eq!(renew_at(&der).unwrap(), from + 22);
        // A member's renewal: a CSR for its own key, signed by the CA.
        let m = tempfile::tempdir().unwrap();
        let member = ClusterDir::new(m.path());
        let (key, csr) = node_key_and_csr("beta").unwrap();
        let issuer = ca.issuer().unwrap();
        let first = sign_csr(&issuer, &csr, "beta", Duration::from_secs(30)).unwrap();
        member.store_ca_cert(&read(&ca.ca_cert()).unwrap()).unwrap();
        member.store_node(&key.serialize_pem(), &first).unwrap();
        let key_before = std::fs::read(member.node_key()).unwrap();
        let csr = member.renewal_csr("beta").unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        let renewed = sign_csr(&issuer, &csr, "beta", Duration::from_secs(30)).unwrap();
        member.store_renewed("beta", &renewed).unwrap();
        assert_eq!(read(&member.node_cert()).unwrap(), renewed);
        assert_ne!(renewed, first);
        assert_eq!(std::fs::read(member.node_key()).unwrap(), key_before);
        assert_eq!(member.node_credentials().unwrap().node_id, "beta");
        // Refused: another node's name, another key, another CA.
        let other_name = sign_csr(&issuer, &csr, "gamma", Duration::from_secs(30)).unwrap();
        assert!(matches!(
            member.store_renewed("beta", &other_name),
            Err(PkiError::WrongCert("names another node"))
        ));
        let (_, other_csr) = node_key_and_csr("beta").unwrap();
        let other_key = sign_csr(&issuer, &other_csr, "beta", Duration::from_secs(30)).unwrap();
        assert!(matches!(
            member.store_renewed("beta", &other_key),
            Err(PkiError::WrongCert("is for another key"))
        ));
        let o = tempfile::tempdir().unwrap();
        let other_ca = ClusterDir::new(o.path());
        other_ca.init("zeta").unwrap();
        let foreign = sign_csr(
            &other_ca.issuer().unwrap(),
            &csr,
            "beta",
            NODE_CERT_VALIDITY,
        )
        .unwrap();
        assert!(matches!(
            member.store_renewed("beta", &foreign),
            Err(PkiError::WrongCert(_))
        ));
        assert_eq!(read(&member.node_cert()).unwrap(), renewed);
    }

    #[test]
    fn a_node_without_the_ca_key_cannot_issue() {
        let d = tempfile::tempdir().unwrap();
        let c = ClusterDir::new(d.path());
        assert!(matches!(c.issuer(), Err(PkiError::NotCaHolder)));
        assert!(matches!(c.node_credentials(), Err(PkiError::NoCluster)));
    }
}
