//! The cluster: agents that join each other over QUIC with mutual TLS. `pki` holds the trust
//! (the cluster CA, node certificates, rustls configurations).

pub mod access_keys;
pub mod invoke;
pub mod node;
pub mod pki;
pub mod replica;
pub mod transport;
pub mod wire;
