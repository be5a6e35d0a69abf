//! This agent as a cluster member: the QUIC endpoint's accept loop, the membership task that
//! drives foca over QUIC datagrams, the join handshake (both sides) and the members table.
//!
//! Connections are told apart by ALPN and certificate: `fnlet-peer/1` with a certificate of
//! this cluster is a peer (SWIM datagrams, frame streams); `fnlet-peer/1` without one may only
//! ask to join; `fnlet-invoke/1` is a QUIC caller.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fnlet_cluster::Sha256Hash;
use fnlet_cluster::frame::{self, Alpn, ErrorCode, Expect, Frame, Limits, Seed};
use fnlet_cluster::load::{LoadReport, PeerLoads, ReportTiming, Reporter, Ticket};
use fnlet_cluster::membership::{
    MemberEvent, MemberInfo, MemberState, Membership, NodeIdentity, foca_config,
};
use fnlet_cluster::token::{JoinToken, StoredToken};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::pki::{self, ClusterDir, PkiError};
use super::transport::{self, Transport, TransportError};
use super::wire::{self, FrameReader, WireError};
use crate::metrics::Metrics;

/// How stale the members table readers see may get when nothing changed.
const REFRESH: Duration = Duration::from_millis(100);

/// How long a member waits for the CA holder's answer to a join it passed on (the joiner
/// waits 15 s for the whole).
const RELAYED_JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the SWIM leave may take to go out at shutdown.
const LEAVE_FLUSH: Duration = Duration::from_secs(1);
/// How long a member declared down has to close its connection itself (as a host that leaves
/// does) before this host closes it.
const LEAVE_CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Every this many re-announce ticks, members declared down are announced to again.
const RECONNECT_EVERY: u32 = 2;

/// How often a host that knows no live peer announces itself to its seeds again.
const REANNOUNCE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Wire(#[from] WireError),
    /// Its messages name the join token already.
    #[error(transparent)]
    Token(#[from] fnlet_cluster::token::TokenError),
    #[error(transparent)]
    Keys(#[from] crate::auth::KeyStoreError),
    #[error("{0}")]
    Join(String),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A member as `fnlet members` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MemberRow {
    pub id: String,
    pub addr: SocketAddr,
    /// alive, suspect, down, left
    pub state: &'static str,
    pub incarnation: u16,
    pub generation: u64,
    /// Round-trip time of this host's connection to it, when one is open.
    pub rtt_ms: Option<f64>,
    /// In-flight calls, as routing sees them: this host's running calls; for a peer, what it
    /// last reported plus the calls this host forwarded to it since, and never less than the
    /// calls this host forwarded to it that are still running (cluster/src/load.rs).
    pub load: u32,
    /// What the peer last reported (LoadReport datagrams), while that counts; none for this
    /// host.
    pub reported_load: Option<u32>,
    /// Calls this host forwarded to the peer that are still running.
    pub forwarded: u32,
    pub this_host: bool,
}

/// The join tokens the CA holder has made: only their secrets' hashes, and the node ids each
/// admitted (a token admits a node id once: a replayed join is refused).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct TokenBook {
    tokens: Vec<BookEntry>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct BookEntry {
    stored: StoredToken,
    #[serde(default)]
    admitted: Vec<String>,
}

pub struct Node {
    pub id: String,
    pub advertise: SocketAddr,
    pub generation: u64,
    pub transport: Arc<Transport>,
    pub(super) dir: ClusterDir,
    pub(super) metrics: Arc<Metrics>,
    /// The catalog, kept in step with the store and the peers.
    pub(super) replica: super::replica::Replica,
    /// The cluster's access key sealer (`cluster/keys.key`); `None` on a host that joined
    /// before access keys were the cluster's: its keys stay its own.
    pub(super) sealer: Option<crate::auth::keys::Sealer>,
    /// One access key made to match the catalog at a time (see `access_keys`).
    pub(super) key_sync: Mutex<()>,
    /// The membership table as the membership task last saw it (other hosts only).
    members: RwLock<Vec<MemberInfo>>,
    /// Hosts that said they were leaving (they closed their connection as they left), until
    /// they come back.
    left: Mutex<std::collections::HashSet<String>>,
    datagrams: mpsc::Sender<(String, bytes::Bytes)>,
    tokens: Mutex<()>,
    /// When the members table was last copied out of foca.
    refreshed: Mutex<Option<Instant>>,
    /// The peers' loads: their reports, and the calls this host forwarded to them.
    loads: Mutex<PeerLoads>,
    /// Peers that refused a call for want of room (BUSY), and until when new calls pass them
    /// over.
    full: Mutex<std::collections::HashMap<String, Instant>>,
    /// Told when a member comes up or goes down, and at the first catalog sync (the
    /// scheduler works out again which schedules this host owns).
    pub members_changed: Arc<tokio::sync::Notify>,
    /// A digest swap with a peer has completed since this agent started.
    synced: std::sync::atomic::AtomicBool,
    pub stop: CancellationToken,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> ClusterError + '_ {
    move |source| ClusterError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Node {
    /// Starts this agent's membership: binds the endpoint, starts the accept loop and the
    /// membership task, and announces itself to `seeds`.
    pub fn start(
        dir: ClusterDir,
        listen: SocketAddr,
        advertise: SocketAddr,
        seeds: Vec<Seed>,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> Result<Arc<Node>, ClusterError> {
        let creds = dir.node_credentials()?;
        let transport = Arc::new(Transport::bind(listen, &creds)?);
        // A listen port of 0 is chosen now: advertise what was bound.
        let advertise = if advertise.port() == 0 {
            transport
                .local_addr()
                .map_err(|e| ClusterError::Join(format!("reading the bound address: {e}")))?
        } else {
            advertise
        };
        // Each run of the agent is a new SWIM identity, so a restarted host replaces its old
        // run at once instead of waiting to be declared down.
        let generation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let (tx, rx) = mpsc::channel(1024);
        let replica =
            super::replica::Replica::open(&creds.node_id, &dir.dir).map_err(ClusterError::Join)?;
        let sealer = super::access_keys::open_sealer(&dir)?;
        let node = Arc::new(Node {
            id: creds.node_id.clone(),
            advertise,
            generation,
            transport,
            dir,
            metrics,
            replica,
            sealer,
            key_sync: Mutex::new(()),
            members: RwLock::new(Vec::new()),
            left: Mutex::new(std::collections::HashSet::new()),
            datagrams: tx,
            tokens: Mutex::new(()),
            loads: Mutex::new(PeerLoads::new()),
            full: Mutex::new(Default::default()),
            refreshed: Mutex::new(None),
            members_changed: Arc::new(tokio::sync::Notify::new()),
            synced: std::sync::atomic::AtomicBool::new(false),
            stop,
        });
        let mut seeds = seeds;
        seeds.extend(node.known_members());
        seeds.retain(|s| s.id != node.id);
        seeds.sort_by(|a, b| a.id.cmp(&b.id));
        seeds.dedup_by(|a, b| a.id == b.id);
        tokio::spawn(node.clone().accept_loop());
        tokio::spawn(node.clone().sync_loop());
        {
            // Connections this side dials carry the peer's datagrams and streams too.
            let node = node.clone();
            let mut dialled = node.transport.on_dial();
            tokio::spawn(async move {
                while let Some((peer, conn)) = dialled.recv().await {
                    tokio::spawn(node.clone().serve_peer(peer, conn));
                }
            });
        }
        tokio::spawn(node.clone().membership_loop(rx, seeds));
        tokio::spawn(node.clone().renew_loop());
        tracing::info!(node = %node.id, peer_listen = %listen, advertise = %node.advertise, "cluster endpoint ready");
        Ok(node)
    }

    /// The last of shutdown: closes every connection saying this host leaves (peers show it
    /// as left, not down) and waits briefly for the closes to go out.
    pub async fn close(&self) {
        // The membership task sends the SWIM leave first (it has been told to stop).
        let _ = tokio::time::timeout(LEAVE_FLUSH, self.datagrams.closed()).await;
        self.transport.endpoint.close(
            quinn::VarInt::from_u64(ErrorCode::SHUTTING_DOWN.0).unwrap_or(quinn::VarInt::MAX),
            b"leaving",
        );
        let _ =
            tokio::time::timeout(Duration::from_secs(1), self.transport.endpoint.wait_idle()).await;
    }

    /// The members table, this host first (running `own_load` calls).
    pub fn members(&self, own_load: u32) -> Vec<MemberRow> {
        let ttl = self.load_timing().ttl;
        let now = Instant::now();
        let loads = self.loads.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut rows = vec![MemberRow {
            id: self.id.clone(),
            addr: self.advertise,
            state: "alive",
            incarnation: 0,
            generation: self.generation,
            rtt_ms: None,
            load: own_load,
            reported_load: None,
            forwarded: 0,
            this_host: true,
        }];
        let conns: HashMap<String, quinn::Connection> =
            self.transport.connections().into_iter().collect();
        let left = self.left.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let members = self.members.read().unwrap_or_else(|p| p.into_inner());
        for m in members.iter() {
            // A host that closed its connection saying it leaves has left, whether or not
            // SWIM has heard of its leave yet (its gossip can take a while to reach everyone).
            let state = match m.state {
                _ if left.contains(&m.identity.id) => "left",
                MemberState::Alive => "alive",
                MemberState::Suspect => "suspect",
                MemberState::Down => "down",
            };
            let view = loads.view(&m.identity.id, now, ttl);
            rows.push(MemberRow {
                id: m.identity.id.clone(),
                addr: m.identity.addr,
                state,
                incarnation: m.incarnation,
                generation: m.identity.generation,
                rtt_ms: conns
                    .get(&m.identity.id)
                    .map(|c| c.rtt().as_secs_f64() * 1000.0),
                load: view.load,
                reported_load: view.reported,
                forwarded: view.forwarded,
                this_host: false,
            });
        }
        rows[1..].sort_by(|a, b| a.id.cmp(&b.id));
        rows
    }

    /// Hosts alive or suspect (not down), other than this one.
    pub fn live_peers(&self) -> Vec<NodeIdentity> {
        self.members
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|m| m.state != MemberState::Down)
            .map(|m| m.identity.clone())
            .collect()
    }

    /// How long a peer that refused a call for want of room is passed over.
    const FULL_FOR: Duration = Duration::from_secs(2);

    /// Notes that `peer` refused a call for want of room: new calls pass it over for a while.
    pub fn mark_full(&self, peer: &str) {
        self.full
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer.to_string(), Instant::now() + Self::FULL_FOR);
    }

    /// Where a call to `function` should run: the first live host in the function's
    /// rendezvous ranking whose in-flight load is within the bound (ceil(1.25 x mean)). Loads
    /// are as this host sees them: its own running calls, and each peer's reported load
    /// combined with the calls this host forwarded to it (see [`MemberRow::load`]). Hosts
    /// without room for the call are passed over (capacity spill): this one when `room_here`
    /// is false, peers that refused a call for want of room in the last seconds; when no host
    /// is left, the ranking over all of them decides. `None`: here.
    pub fn pick(&self, function: &str, own_load: u32, room_here: bool) -> Option<NodeIdentity> {
        let now = Instant::now();
        let full: std::collections::HashSet<String> = {
            let mut full = self.full.lock().unwrap_or_else(|p| p.into_inner());
            full.retain(|_, until| *until > now);
            full.keys().cloned().collect()
        };
        // A suspect gets no new calls: only members answering their probes.
        let peers: Vec<NodeIdentity> = self
            .members
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|m| m.state == MemberState::Alive)
            .map(|m| m.identity.clone())
            .collect();
        if peers.is_empty() {
            return None;
        }
        let ttl = self.load_timing().ttl;
        let mut hosts = vec![fnlet_cluster::route::Host {
            id: self.id.as_str(),
            load: own_load,
        }];
        {
            let loads = self.loads.lock().unwrap_or_else(|p| p.into_inner());
            hosts.extend(peers.iter().map(|p| fnlet_cluster::route::Host {
                id: p.id.as_str(),
                load: loads.view(&p.id, now, ttl).load,
            }));
        }
        let roomy: Vec<_> = hosts
            .iter()
            .filter(|h| {
                if h.id == self.id {
                    room_here
                } else {
                    !full.contains(h.id)
                }
            })
            .copied()
            .collect();
        let candidates = if roomy.is_empty() { &hosts } else { &roomy };
        let chosen = fnlet_cluster::route::pick(
            function,
            candidates,
            fnlet_cluster::route::BalanceFactor::DEFAULT,
        )?;
        peers.iter().find(|p| p.id == chosen.host).cloned()
    }

    /// Counts a call forwarded to `peer` until the returned guard is dropped.
    pub fn forwarding(self: &Arc<Self>, peer: &str) -> Forwarding {
        let ticket = self
            .loads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forward_started(peer);
        Forwarding {
            node: self.clone(),
            peer: peer.to_string(),
            ticket,
        }
    }

    /// How often loads are reported and how long a report counts, for the cluster's size.
    fn load_timing(&self) -> ReportTiming {
        let hosts = self.members.read().unwrap_or_else(|p| p.into_inner()).len() + 1;
        ReportTiming::for_cluster(hosts)
    }

    /// A peer's LoadReport datagram.
    fn load_reported(&self, peer: &str, report: LoadReport) {
        let kept = self
            .loads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .received(peer, report, Instant::now());
        if kept {
            self.metrics.peer_load(peer, report.load);
        }
    }

    /// Reports this host's calls in flight to its peers (cluster/src/load.rs): when the count
    /// changes, at most once per interval, and every refresh period while it is above zero.
    pub fn start_load_reports(self: &Arc<Self>, registry: Arc<crate::pool::Registry>) {
        let node = self.clone();
        tokio::spawn(async move {
            let mut reporter = Reporter::new(node.generation);
            loop {
                let timing = node.load_timing();
                let load = u32::try_from(registry.running_total()).unwrap_or(u32::MAX);
                if let Some(report) = reporter.poll(load, Instant::now(), &timing) {
                    let sent = node.send_load(report);
                    node.metrics.own_load(report.load, sent);
                }
                // A change that comes while one is owed is picked up at the timeout.
                let settled = reporter.is_settled(load);
                let next = reporter.poll_timeout(load, &timing);
                let timer = async {
                    match next {
                        Some(at) => tokio::time::sleep_until(at.into()).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = node.stop.cancelled() => break,
                    _ = registry.load_changed.notified(), if settled => {}
                    _ = timer => {}
                }
            }
        });
    }

    /// Sends `report` to every live member this host has a connection to; how many it went to.
    fn send_load(&self, report: LoadReport) -> u64 {
        let data = bytes::Bytes::copy_from_slice(&report.encode());
        let live: std::collections::HashSet<String> =
            self.live_peers().into_iter().map(|m| m.id).collect();
        let mut sent = 0;
        for (peer, conn) in self.transport.connections() {
            if !live.contains(&peer) {
                continue;
            }
            match conn.send_datagram(data.clone()) {
                Ok(()) => sent += 1,
                Err(e) => tracing::debug!(peer = %peer, "load report: {e}"),
            }
        }
        sent
    }

    fn is_alive(&self, id: &str) -> bool {
        id == self.id || self.live_peers().iter().any(|m| m.id == id)
    }

    /// Members to dial at the next start: every member seen, kept in the state dir.
    fn known_members(&self) -> Vec<Seed> {
        let path = self.dir.dir.join("members.json");
        std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn remember_members(&self) {
        let seeds: Vec<Seed> = self
            .members
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|m| Seed {
                id: m.identity.id.clone(),
                addr: m.identity.addr,
            })
            .collect();
        let path = self.dir.dir.join("members.json");
        let tmp = path.with_extension("tmp");
        let written = serde_json::to_vec(&seeds)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::warn!("keeping the members list in {}: {e}", path.display());
        }
    }

    async fn accept_loop(self: Arc<Self>) {
        loop {
            let incoming = tokio::select! {
                i = self.transport.endpoint.accept() => i,
                _ = self.stop.cancelled() => break,
            };
            let Some(incoming) = incoming else { break };
            let node = self.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                match incoming.await {
                    Ok(conn) => node.serve_connection(conn).await,
                    Err(e) => {
                        node.metrics.handshake_failure(handshake_reason(&e));
                        tracing::info!(%remote, "refused a QUIC connection: {e}");
                    }
                }
            });
        }
    }

    async fn serve_connection(self: Arc<Self>, conn: quinn::Connection) {
        let alpn = transport::alpn(&conn).and_then(|a| Alpn::from_protocol(&a));
        match (alpn, transport::peer_node_id(&conn)) {
            (Some(Alpn::Peer), Some(peer)) => {
                self.transport.adopt(&peer, &conn);
                self.serve_peer(peer, conn).await;
            }
            (Some(Alpn::Peer), None) => self.serve_joiner(conn).await,
            (Some(Alpn::Invoke), _) => match self.replica.app() {
                Some(app) => {
                    let metrics = self.metrics.clone();
                    super::invoke::serve_connection(app, conn, move || metrics.bad_frame()).await
                }
                None => conn.close(
                    quinn::VarInt::from_u64(ErrorCode::SHUTTING_DOWN.0)
                        .unwrap_or(quinn::VarInt::MAX),
                    b"the agent is not serving",
                ),
            },
            (None, _) => conn.close(quinn::VarInt::from_u32(0x100), b"unknown ALPN"),
        }
    }

    /// A peer's connection: SWIM datagrams to the membership task, frame streams served.
    async fn serve_peer(self: Arc<Self>, peer: String, conn: quinn::Connection) {
        let datagrams = {
            let (node, peer, conn) = (self.clone(), peer.clone(), conn.clone());
            async move {
                loop {
                    match conn.read_datagram().await {
                        Ok(d) if fnlet_cluster::load::is_fnlet_datagram(&d) => {
                            match LoadReport::decode(&d) {
                                Ok(report) => node.load_reported(&peer, report),
                                Err(e) => {
                                    // A bad datagram is a bad frame: the connection goes.
                                    node.metrics.bad_frame();
                                    tracing::warn!(peer = %peer, code = %e.code(), "closing the connection: {e}");
                                    let reason = e.to_string();
                                    conn.close(
                                        quinn::VarInt::from_u64(e.code().0)
                                            .unwrap_or(quinn::VarInt::MAX),
                                        &reason.as_bytes()[..reason.len().min(200)],
                                    );
                                    break;
                                }
                            }
                        }
                        Ok(d) => {
                            if node.datagrams.try_send((peer.clone(), d)).is_err() {
                                // The membership task is behind: a lost SWIM packet is what
                                // SWIM is built to survive.
                                node.metrics.swim_dropped();
                            }
                        }
                        Err(quinn::ConnectionError::ApplicationClosed(c))
                            if c.error_code.into_inner() == ErrorCode::SHUTTING_DOWN.0 =>
                        {
                            tracing::info!(peer = %peer, "member left");
                            node.loads
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .forget_report(&peer);
                            node.left
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(peer.clone());
                            break;
                        }
                        Err(_) => break,
                    }
                }
            }
        };
        let streams = {
            let (node, peer, conn) = (self.clone(), peer.clone(), conn.clone());
            async move {
                // The API for the peer's calls: made at its first call, kept for the rest.
                let api: Arc<std::sync::OnceLock<super::invoke::Api>> = Arc::default();
                while let Ok((send, recv)) = conn.accept_bi().await {
                    let (node, peer, conn, api) =
                        (node.clone(), peer.clone(), conn.clone(), api.clone());
                    tokio::spawn(async move {
                        node.serve_peer_stream(&peer, &conn, send, recv, &api).await;
                    });
                }
            }
        };
        let gossip = {
            let (node, peer, conn) = (self.clone(), peer.clone(), conn.clone());
            async move {
                while let Ok(recv) = conn.accept_uni().await {
                    let (node, peer, conn) = (node.clone(), peer.clone(), conn.clone());
                    tokio::spawn(async move { node.serve_gossip(&peer, &conn, recv).await });
                }
            }
        };
        tokio::join!(datagrams, streams, gossip);
    }

    async fn serve_peer_stream(
        self: &Arc<Self>,
        peer: &str,
        conn: &quinn::Connection,
        mut send: quinn::SendStream,
        recv: quinn::RecvStream,
        api: &std::sync::OnceLock<super::invoke::Api>,
    ) {
        let limits = match self.replica.app() {
            Some(app) => super::invoke::request_limits(&app.config),
            None => Limits::default(),
        };
        let mut reader = FrameReader::new(recv, limits, Expect::request(Alpn::Peer));
        let served = match reader.next().await {
            Ok(Some(Frame::InvokeRequest { meta, payload })) => {
                match self.replica.app() {
                    Some(app) => {
                        let caller = super::invoke::Caller::Peer {
                            node_id: peer.to_string(),
                            conn: conn.clone(),
                        };
                        let api = api.get_or_init(|| super::invoke::Api::new(app)).clone();
                        let served =
                            super::invoke::serve_invoke(api, send, meta, payload, caller).await;
                        if served == super::invoke::Served::BadFrame {
                            self.metrics.bad_frame();
                        }
                    }
                    None => {
                        wire::refuse(&mut send, ErrorCode::SHUTTING_DOWN, "the agent is stopping")
                            .await
                    }
                }
                return;
            }
            Ok(Some(Frame::CatalogDigest(d))) => self.serve_digest(d, &mut reader, &mut send).await,
            Ok(Some(Frame::BundleRequest(r))) => self.serve_bundle(r, &mut send).await,
            Ok(Some(Frame::JoinRequest(r))) => {
                self.serve_relayed_join(peer, &r, &mut send).await;
                Ok(())
            }
            Ok(Some(Frame::RenewRequest(r))) => {
                self.serve_renew(peer, &r, &mut send).await;
                Ok(())
            }
            Ok(Some(other)) => {
                wire::refuse(
                    &mut send,
                    ErrorCode::NOT_FOUND,
                    format!("{:?} frames are not served by this agent yet", other.kind()),
                )
                .await;
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = served
            && wire::close_for(conn, &e, peer)
        {
            self.metrics.bad_frame();
        }
    }

    /// A host without a certificate: one stream, one JoinRequest.
    async fn serve_joiner(self: Arc<Self>, conn: quinn::Connection) {
        let remote = conn.remote_address();
        let Ok(Ok((mut send, recv))) =
            tokio::time::timeout(Duration::from_secs(10), conn.accept_bi()).await
        else {
            return;
        };
        let mut reader = FrameReader::new(recv, Limits::default(), Expect::join_request());
        let req = match reader.next().await {
            Ok(Some(Frame::JoinRequest(r))) => r,
            Ok(_) => return,
            Err(e) => {
                if wire::close_for(&conn, &e, &remote.to_string()) {
                    self.metrics.bad_frame();
                }
                return;
            }
        };
        match self.admit_or_relay(&req).await {
            Ok(answer) => {
                tracing::info!(node = %req.node_id, %remote, "admitted a new member");
                if wire::send(&mut send, &Frame::JoinResponse(answer))
                    .await
                    .is_ok()
                {
                    let _ = send.finish();
                    // Let the answer arrive before the connection goes.
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
                }
            }
            Err(why) => {
                self.metrics.handshake_failure("join_refused");
                tracing::warn!(node = %req.node_id, %remote, "refused a join: {why}");
                wire::refuse(&mut send, ErrorCode::UNAUTHORIZED, why).await;
                let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
            }
        }
    }

    /// A join asked of this host: decided here on the CA holder; elsewhere passed on to the
    /// live members in turn until the CA holder answers (the others say they cannot), so a
    /// host may join through any member.
    async fn admit_or_relay(
        &self,
        req: &frame::JoinRequest,
    ) -> Result<frame::JoinResponse, String> {
        if self.dir.is_ca_holder() {
            return self.admit(req);
        }
        let mut last = "no live member holds the cluster CA".to_string();
        for peer in self.live_peers() {
            let conn = match self.transport.connect(&peer.id, peer.addr).await {
                Ok(c) => c,
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            match relay_join(&conn, req).await {
                Ok(answer) => return Ok(answer),
                // The CA holder's verdict is the answer.
                Err(WireError::Refused { code, message }) if code == ErrorCode::UNAUTHORIZED => {
                    return Err(message);
                }
                Err(e) => {
                    tracing::debug!(peer = %peer.id, "passing on a join: {e}");
                    last = format!("{}: {e}", peer.id);
                }
            }
        }
        Err(format!(
            "this member does not hold the cluster CA and could not reach the one that does ({last})"
        ))
    }

    /// A join another member passes on (see [`Node::admit_or_relay`]): decided if this host
    /// holds the CA, else NOT_FOUND (the member asks another).
    async fn serve_relayed_join(
        &self,
        peer: &str,
        req: &frame::JoinRequest,
        send: &mut quinn::SendStream,
    ) {
        if !self.refer_unless_ca_holder(send).await {
            return;
        }
        match self.admit(req) {
            Ok(answer) => {
                tracing::info!(node = %req.node_id, via = peer, "admitted a new member");
                if wire::send(send, &Frame::JoinResponse(answer)).await.is_ok() {
                    let _ = send.finish();
                }
            }
            Err(why) => {
                self.metrics.handshake_failure("join_refused");
                tracing::warn!(node = %req.node_id, via = peer, "refused a join: {why}");
                wire::refuse(send, ErrorCode::UNAUTHORIZED, why).await;
            }
        }
    }

    /// True on the CA holder; elsewhere answers NOT_FOUND, which sends the asking member on
    /// to another (joins passed on and renewals are both decided by the CA holder alone).
    async fn refer_unless_ca_holder(&self, send: &mut quinn::SendStream) -> bool {
        if self.dir.is_ca_holder() {
            return true;
        }
        wire::refuse(
            send,
            ErrorCode::NOT_FOUND,
            "this member does not hold the cluster CA",
        )
        .await;
        false
    }

    /// A member's RenewRequest: signed on the CA holder, for the node id the member's
    /// certificate (this connection's) names; elsewhere NOT_FOUND (the member asks another).
    async fn serve_renew(
        &self,
        peer: &str,
        req: &frame::RenewRequest,
        send: &mut quinn::SendStream,
    ) {
        if !self.refer_unless_ca_holder(send).await {
            return;
        }
        let signed = self.dir.issuer().and_then(|issuer| {
            pki::sign_csr(&issuer, &req.csr_pem, peer, self.dir.node_cert_validity)
        });
        match signed {
            Ok(cert_pem) => {
                tracing::info!(peer, "renewed a member's certificate");
                let answer = Frame::RenewResponse(frame::RenewResponse { cert_pem });
                if wire::send(send, &answer).await.is_ok() {
                    let _ = send.finish();
                }
            }
            Err(e) => {
                tracing::warn!(peer, "refused to renew a member's certificate: {e}");
                wire::refuse(send, ErrorCode::UNAUTHORIZED, e.to_string()).await;
            }
        }
    }

    /// Renews this node's certificate once it is past 2/3 of its lifetime: a CSR for its key
    /// to the CA holder (itself, or each live member in turn until the holder answers), the
    /// answer checked and kept in the state dir, and shown on new connections from then on.
    async fn renew_loop(self: Arc<Self>) {
        loop {
            let (renew_at, expires) = match self
                .dir
                .node_cert_der()
                .and_then(|der| Ok((pki::renew_at(&der)?, pki::cert_validity(&der)?.1)))
            {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!("reading this node's certificate: {e}");
                    return;
                }
            };
            self.metrics.cert_expiry(expires);
            let wait = renew_at.saturating_sub(i64::try_from(unix_now()).unwrap_or(i64::MAX));
            if wait > 0 {
                // Checked again at least hourly: a clock that jumps is noticed.
                let wait = Duration::from_secs(u64::try_from(wait).unwrap_or(0).min(3600));
                tokio::select! {
                    _ = tokio::time::sleep(wait) => continue,
                    _ = self.stop.cancelled() => return,
                }
            }
            match self.renew().await {
                Ok(()) => {
                    self.metrics.cert_renewal("ok");
                    tracing::info!(node = %self.id, "renewed this node's certificate");
                }
                Err(e) => {
                    self.metrics.cert_renewal("failed");
                    // Tried again soon: a twentieth of what is left, between 1 s and 5 min.
                    let left = expires.saturating_sub(i64::try_from(unix_now()).unwrap_or(0));
                    let retry =
                        Duration::from_secs((u64::try_from(left).unwrap_or(0) / 20).clamp(1, 300));
                    tracing::warn!(
                        retry_in = ?retry,
                        "renewing this node's certificate (it expires at {expires}, Unix seconds): {e}"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(retry) => {}
                        _ = self.stop.cancelled() => return,
                    }
                }
            }
        }
    }

    /// One renewal of this node's certificate.
    async fn renew(&self) -> Result<(), ClusterError> {
        let csr = self.dir.renewal_csr(&self.id)?;
        let cert_pem = if self.dir.is_ca_holder() {
            pki::sign_csr(
                &self.dir.issuer()?,
                &csr,
                &self.id,
                self.dir.node_cert_validity,
            )?
        } else {
            self.renewal_from_ca_holder(&csr).await?
        };
        self.dir.store_renewed(&self.id, &cert_pem)?;
        let creds = self.dir.node_credentials()?;
        self.transport.reload(&creds)?;
        Ok(())
    }

    /// Asks each live member in turn for a certificate for `csr` until the CA holder answers.
    async fn renewal_from_ca_holder(&self, csr: &str) -> Result<String, ClusterError> {
        let mut last = "no live member holds the cluster CA".to_string();
        for peer in self.live_peers() {
            let conn = match self.transport.connect(&peer.id, peer.addr).await {
                Ok(c) => c,
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            let request = Frame::RenewRequest(frame::RenewRequest {
                csr_pem: csr.to_string(),
            });
            let asked = async {
                let (mut send, recv) = conn.open_bi().await?;
                wire::send(&mut send, &request).await?;
                send.finish()?;
                let expect = Expect::answer_to(&request).expect("a RenewRequest has an answer");
                let mut reader = FrameReader::new(recv, Limits::default(), expect);
                reader.next().await
            };
            match tokio::time::timeout(RELAYED_JOIN_TIMEOUT, asked).await {
                Ok(Ok(Some(Frame::RenewResponse(r)))) => return Ok(r.cert_pem),
                Ok(Ok(Some(Frame::Error(e)))) if e.code == ErrorCode::NOT_FOUND => {
                    last = format!("{}: {}", peer.id, e.message);
                }
                // The CA holder's word is final.
                Ok(Ok(Some(Frame::Error(e)))) => {
                    return Err(ClusterError::Join(format!(
                        "the CA holder ({}) refused: {}",
                        peer.id, e.message
                    )));
                }
                Ok(Ok(_)) => last = format!("{}: no answer", peer.id),
                Ok(Err(e)) => {
                    wire::close_for(&conn, &e, &peer.id);
                    last = format!("{}: {e}", peer.id);
                }
                Err(_) => last = format!("{}: no answer within {RELAYED_JOIN_TIMEOUT:?}", peer.id),
            }
        }
        Err(ClusterError::Join(format!(
            "no member renewed this node's certificate ({last})"
        )))
    }

    /// Checks a join request against the token book and issues the certificate.
    fn admit(&self, req: &frame::JoinRequest) -> Result<frame::JoinResponse, String> {
        if !pki::valid_node_id(&req.node_id) {
            return Err(format!(
                "node id {:?}: 1-63 of a-z 0-9 -, not starting or ending with -",
                req.node_id
            ));
        }
        if self.is_alive(&req.node_id) {
            return Err(format!(
                "node id {:?} is alive in the cluster: a second host cannot take it (pick another --node-id)",
                req.node_id
            ));
        }
        let issuer = self.dir.issuer().map_err(|e| e.to_string())?;
        {
            let _one_at_a_time = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
            let mut book = self.token_book().map_err(|e| e.to_string())?;
            let entry = book
                .tokens
                .iter_mut()
                .find(|t| t.stored.id == req.token_id)
                .ok_or("unknown join token (made by another cluster, or never)")?;
            entry
                .stored
                .verify(&req.token_id, &req.token_secret, unix_now())
                .map_err(|e| e.to_string())?;
            if entry.admitted.iter().any(|n| n == &req.node_id) {
                return Err(format!(
                    "this token already admitted {:?}: a join is not replayed (make a new token with `fnlet cluster token`)",
                    req.node_id
                ));
            }
            entry.admitted.push(req.node_id.clone());
            self.save_token_book(&book).map_err(|e| e.to_string())?;
        }
        let cert_pem = pki::sign_csr(
            &issuer,
            &req.csr_pem,
            &req.node_id,
            self.dir.node_cert_validity,
        )
        .map_err(|e| e.to_string())?;
        let ca_pem = std::fs::read_to_string(self.dir.ca_cert()).map_err(|e| e.to_string())?;
        let mut members = vec![Seed {
            id: self.id.clone(),
            addr: self.advertise,
        }];
        members.extend(self.live_peers().into_iter().map(|m| Seed {
            id: m.id,
            addr: m.addr,
        }));
        Ok(frame::JoinResponse {
            cert_pem,
            ca_pem,
            members,
            sealing_key: self.sealing_key_for_joiner()?,
        })
    }

    fn token_book_path(&self) -> std::path::PathBuf {
        self.dir.dir.join("tokens.json")
    }

    fn token_book(&self) -> Result<TokenBook, ClusterError> {
        let path = self.token_book_path();
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| ClusterError::Join(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TokenBook::default()),
            Err(e) => Err(io(&path)(e)),
        }
    }

    fn save_token_book(&self, book: &TokenBook) -> Result<(), ClusterError> {
        let path = self.token_book_path();
        let tmp = path.with_extension("tmp");
        let bytes =
            serde_json::to_vec_pretty(book).map_err(|e| ClusterError::Join(e.to_string()))?;
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io(&tmp))?;
            f.write_all(&bytes).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
        }
        std::fs::rename(&tmp, &path).map_err(io(&path))
    }

    /// A new join token, valid for `ttl` (on the CA holder).
    pub fn make_token(&self, ttl: Duration) -> Result<JoinToken, ClusterError> {
        if !self.dir.is_ca_holder() {
            return Err(PkiError::NotCaHolder.into());
        }
        let _one_at_a_time = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        let mut random = [0u8; fnlet_cluster::token::RANDOM_LEN];
        getrandom::fill(&mut random)
            .map_err(|e| ClusterError::Join(format!("no randomness for a token: {e}")))?;
        let ca = self.dir.ca_der()?;
        let token = JoinToken::new(random, Sha256Hash::of(&ca), unix_now() + ttl.as_secs());
        let mut book = self.token_book()?;
        // Expired tokens are of no use to anyone: drop them as new ones are made.
        let now = unix_now();
        book.tokens.retain(|t| t.stored.expires_at > now);
        book.tokens.push(BookEntry {
            stored: token.stored(),
            admitted: Vec::new(),
        });
        self.save_token_book(&book)?;
        Ok(token)
    }

    /// The membership task: foca driven by datagrams, timers and announces.
    async fn membership_loop(
        self: Arc<Self>,
        mut datagrams: mpsc::Receiver<(String, bytes::Bytes)>,
        seeds: Vec<Seed>,
    ) {
        let me = NodeIdentity::new(self.id.clone(), self.advertise, self.generation);
        let size = NonZeroU32::new((seeds.len() + 1).max(3) as u32).unwrap_or(NonZeroU32::MIN);
        let rng = <rand::rngs::StdRng as rand::SeedableRng>::from_rng(&mut rand::rng());
        let mut swim = Membership::new(me, foca_config(size), rng);
        let announce = |swim: &mut Membership<rand::rngs::StdRng>| {
            for s in &seeds {
                if let Err(e) =
                    swim.announce(NodeIdentity::new(s.id.clone(), s.addr, 0), Instant::now())
                {
                    tracing::debug!(seed = %s.id, "announce: {e}");
                }
            }
        };
        announce(&mut swim);
        let mut tuned_for = size;
        let mut ticks: u32 = 0;
        let mut reannounce = tokio::time::interval(REANNOUNCE);
        reannounce.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.drain(&mut swim);
            // Suspicion time and gossip fan-out follow the cluster's size (at least 3, so a
            // small cluster does not suspect on every lost packet).
            let known = u32::try_from(swim.members().count() + 1)
                .unwrap_or(u32::MAX)
                .max(3);
            if let Some(n) = NonZeroU32::new(known)
                && n != tuned_for
                && swim.set_cluster_size(n)
            {
                tracing::debug!(hosts = n.get(), "membership tuned for the cluster's size");
                tuned_for = n;
            }
            let next = swim.poll_timeout();
            let timer = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.stop.cancelled() => {
                    let _ = swim.leave(Instant::now());
                    self.send_leave(&mut swim).await;
                    self.drain(&mut swim);
                    break;
                }
                d = datagrams.recv() => {
                    let Some((from, data)) = d else { break };
                    if let Err(e) = swim.handle_datagram(&from, &data, Instant::now()) {
                        self.metrics.bad_frame();
                        tracing::debug!(peer = %from, "SWIM packet refused: {e}");
                    }
                }
                _ = timer => {
                    if let Err(e) = swim.handle_timeout(Instant::now()) {
                        tracing::debug!("SWIM timer: {e}");
                    }
                }
                _ = reannounce.tick() => {
                    if swim.live().next().is_none() {
                        announce(&mut swim);
                    }
                    // Members declared down (not left) are asked again now and then, as Serf
                    // reconnects to failed members: after a partition heals, two sides that
                    // each hold the other down (and a host that renewed itself meanwhile)
                    // find each other without waiting for a probe that never comes.
                    ticks = ticks.wrapping_add(1);
                    if ticks.is_multiple_of(RECONNECT_EVERY) {
                        let left = self.left.lock().unwrap_or_else(|p| p.into_inner()).clone();
                        let down: Vec<NodeIdentity> = swim
                            .members()
                            .filter(|m| {
                                m.state == MemberState::Down && !left.contains(&m.identity.id)
                            })
                            .map(|m| m.identity)
                            .collect();
                        for m in down {
                            if let Err(e) = swim.announce(m.clone(), Instant::now()) {
                                tracing::debug!(peer = %m.id, "announce to a down member: {e}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// Sends the SWIM leave before [`Node::close`] closes the connections (which it waits for
    /// this task to end to do): queued here rather than in spawned tasks, and given until
    /// their connections have sent them, at most [`LEAVE_FLUSH`].
    async fn send_leave(&self, swim: &mut Membership<rand::rngs::StdRng>) {
        let deadline = tokio::time::Instant::now() + LEAVE_FLUSH;
        let mut queued = Vec::new();
        while let Some((to, data)) = swim.poll_transmit() {
            let Ok(Ok(conn)) =
                tokio::time::timeout_at(deadline, self.transport.connect(&to.id, to.addr)).await
            else {
                continue;
            };
            let space = conn.datagram_send_buffer_space();
            if conn.send_datagram(data).is_ok() {
                queued.push((conn, space));
            }
        }
        // A datagram leaves the buffer once it is in a packet on the wire.
        while queued
            .iter()
            .any(|(c, space)| c.close_reason().is_none() && c.datagram_send_buffer_space() < *space)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Sends what foca wants sent, acts on its events and refreshes the members table.
    fn drain(self: &Arc<Self>, swim: &mut Membership<rand::rngs::StdRng>) {
        while let Some((to, data)) = swim.poll_transmit() {
            let node = self.clone();
            tokio::spawn(async move {
                match node.transport.connect(&to.id, to.addr).await {
                    Ok(conn) => {
                        if let Err(e) = conn.send_datagram(data) {
                            tracing::debug!(peer = %to.id, "SWIM datagram: {e}");
                        }
                    }
                    Err(e) => tracing::debug!(peer = %to.id, "SWIM: {e}"),
                }
            });
        }
        let mut changed = false;
        while let Some(ev) = swim.poll_event() {
            changed = true;
            if let MemberEvent::Up(id) | MemberEvent::Replaced { new: id, .. } = &ev {
                // Back: no longer "left".
                self.left
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id.id);
            }
            match ev {
                MemberEvent::Up(id) => {
                    tracing::info!(peer = %id.id, addr = %id.addr, "member up");
                    self.spawn_sync(id);
                }
                MemberEvent::Down(id) => {
                    tracing::warn!(peer = %id.id, addr = %id.addr, "member down");
                    self.loads
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .forget_report(&id.id);
                    // Calls in flight to it fail soon, not after an idle timeout; a restart of
                    // it is dialled afresh at once. The old connection is closed a little
                    // later: a host that leaves sends its SWIM leave first and closes its
                    // connections (SHUTTING_DOWN, which shows it as left) just after; closing
                    // ours first would lose that close, and show it down.
                    if let Some(conn) = self.transport.take_peer(&id.id) {
                        tokio::spawn(async move {
                            if tokio::time::timeout(LEAVE_CLOSE_GRACE, conn.closed())
                                .await
                                .is_err()
                            {
                                conn.close(
                                    quinn::VarInt::from_u64(ErrorCode::NO_ERROR.0)
                                        .unwrap_or(quinn::VarInt::MAX),
                                    b"declared down",
                                );
                            }
                        });
                    }
                }
                MemberEvent::Replaced { old, new } => {
                    tracing::info!(peer = %new.id, old_generation = old.generation, generation = new.generation, "member restarted");
                    self.spawn_sync(new);
                }
                MemberEvent::Joined => tracing::info!("joined the cluster"),
                MemberEvent::Alone => tracing::warn!("no other member is alive"),
                MemberEvent::Rejoined(me) => {
                    tracing::warn!(
                        generation = me.generation,
                        "the cluster had declared this host down; rejoined"
                    )
                }
                MemberEvent::Defunct => tracing::error!("this host cannot rejoin the cluster"),
            }
        }
        // The table is copied out for readers when something changed, and otherwise at most
        // every REFRESH (suspicions come with no event): not after every packet.
        let due = self
            .refreshed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none_or(|t| t.elapsed() >= REFRESH);
        if !changed && !due {
            return;
        }
        *self.refreshed.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        let members: Vec<MemberInfo> = swim.members().collect();
        for state in [MemberState::Alive, MemberState::Suspect, MemberState::Down] {
            let n = members.iter().filter(|m| m.state == state).count();
            self.metrics.members(state_name(state), n as i64);
        }
        *self.members.write().unwrap_or_else(|p| p.into_inner()) = members;
        if changed {
            self.remember_members();
            self.members_changed.notify_one();
        }
    }
}

impl Node {
    /// A digest swap with a member that just came up: what either missed converges.
    fn spawn_sync(self: &Arc<Self>, peer: NodeIdentity) {
        let node = self.clone();
        tokio::spawn(async move {
            match node.sync_with(&peer.id, peer.addr).await {
                Ok(_) => node.mark_synced(),
                Err(e) => tracing::debug!(peer = %peer.id, "catalog sync: {e}"),
            }
        });
    }

    /// A digest swap completed: this host's catalog holds what a live peer had.
    pub(super) fn mark_synced(&self) {
        if !self.synced.swap(true, std::sync::atomic::Ordering::SeqCst) {
            self.members_changed.notify_one();
        }
    }

    /// Whether a digest swap with a peer has completed since this agent started.
    pub fn has_synced(&self) -> bool {
        self.synced.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The ids of the hosts alive or suspect, this one included.
    pub fn live_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.live_peers().into_iter().map(|p| p.id).collect();
        ids.push(self.id.clone());
        ids
    }
}

/// One forwarded call in flight (see [`Node::forwarding`]).
pub struct Forwarding {
    node: Arc<Node>,
    peer: String,
    ticket: Ticket,
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        self.node
            .loads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forward_ended(&self.peer, self.ticket);
    }
}

fn state_name(s: MemberState) -> &'static str {
    match s {
        MemberState::Alive => "alive",
        MemberState::Suspect => "suspect",
        MemberState::Down => "down",
    }
}

/// Passes a join on to a peer on a stream of its connection; the peer's answer.
async fn relay_join(
    conn: &quinn::Connection,
    req: &frame::JoinRequest,
) -> Result<frame::JoinResponse, WireError> {
    let (mut send, recv) = conn.open_bi().await?;
    let request = Frame::JoinRequest(req.clone());
    wire::send(&mut send, &request).await?;
    send.finish()?;
    let expect = Expect::answer_to(&request).expect("a JoinRequest has an answer");
    let mut reader = FrameReader::new(recv, Limits::default(), expect);
    let answer = tokio::time::timeout(RELAYED_JOIN_TIMEOUT, reader.next())
        .await
        .map_err(|_| WireError::Timeout(RELAYED_JOIN_TIMEOUT))??;
    match answer {
        Some(Frame::JoinResponse(r)) => Ok(r),
        Some(Frame::Error(e)) => Err(WireError::Refused {
            code: e.code,
            message: e.message,
        }),
        // The answer's Expect allows nothing else, and no answer at all is TRUNCATED.
        _ => Err(WireError::Refused {
            code: ErrorCode::INTERNAL,
            message: "the stream ended without an answer".into(),
        }),
    }
}

/// Why a QUIC handshake failed, as a metric label.
fn handshake_reason(e: &quinn::ConnectionError) -> &'static str {
    let text = e.to_string();
    if text.contains("certificate") || text.contains("Certificate") || text.contains("CA") {
        "certificate"
    } else if text.contains("timed out") {
        "timeout"
    } else {
        "other"
    }
}

/// Joins a cluster: asks each seed in turn, pinning the CA by the token's hash, and keeps the
/// certificate it is given. Returns the members to dial.
pub async fn join(
    dir: &ClusterDir,
    node_id: &str,
    seeds: &[SocketAddr],
    token: &str,
) -> Result<Vec<Seed>, ClusterError> {
    let token: JoinToken = token.trim().parse()?;
    token.check_expiry(unix_now())?;
    let (key, csr_pem) = pki::node_key_and_csr(node_id)?;
    let tls = pki::join_client_config(&token.ca_sha256.to_string())?;
    let client = transport::client_config(tls)?;
    let mut last = String::from("no seed to join (--join ADDR:PORT)");
    for &seed in seeds {
        let bind: SocketAddr = if seed.is_ipv6() {
            "[::]:0".parse().expect("constant address")
        } else {
            "0.0.0.0:0".parse().expect("constant address")
        };
        let endpoint = match quinn::Endpoint::client(bind) {
            Ok(e) => e,
            Err(e) => {
                last = format!("{seed}: a UDP socket: {e}");
                continue;
            }
        };
        let attempt = async {
            let conn = endpoint
                .connect_with(client.clone(), seed, "fnlet-join")
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            let request = Frame::JoinRequest(frame::JoinRequest {
                token_id: token.id.clone(),
                token_secret: token.secret.expose().to_string(),
                node_id: node_id.to_string(),
                csr_pem: csr_pem.clone(),
            });
            wire::send(&mut send, &request)
                .await
                .map_err(|e| e.to_string())?;
            let _ = send.finish();
            let expect = Expect::answer_to(&request).ok_or("no answer expected")?;
            let mut reader = FrameReader::new(recv, Limits::default(), expect);
            let answer = reader.next().await.map_err(|e| e.to_string())?;
            conn.close(0u32.into(), b"joined");
            match answer {
                Some(Frame::JoinResponse(r)) => Ok(r),
                Some(Frame::Error(e)) => Err(format!("refused: {}", e.message)),
                _ => Err("no answer".to_string()),
            }
        };
        match tokio::time::timeout(Duration::from_secs(15), attempt).await {
            Ok(Ok(answer)) => {
                use rustls::pki_types::pem::PemObject;
                let ca =
                    rustls::pki_types::CertificateDer::from_pem_slice(answer.ca_pem.as_bytes())
                        .map_err(|_| {
                            ClusterError::Join("the CA in the answer is not PEM".into())
                        })?;
                token.check_ca(&ca)?;
                // The answer carries the cluster's access key sealing key. It came on a TLS
                // 1.3 connection whose server proved a certificate of the CA the token pins
                // (join_client_config: PinnedCa finds the CA by the token's sha256 in the
                // server's chain and checks the server's certificate against it; rustls checks
                // the handshake signature with that certificate's key), so only a member of
                // this cluster could have sent it; a member that passed the join on had it
                // from the CA holder over a mutual-TLS peer connection. Kept before the node
                // certificate: a host with a certificate has the key too.
                dir.store_ca_cert(&answer.ca_pem)?;
                super::access_keys::store_sealing_key(dir, &answer.sealing_key)?;
                dir.store_node(&key.serialize_pem(), &answer.cert_pem)?;
                let creds = dir.node_credentials()?;
                if creds.node_id != node_id {
                    return Err(ClusterError::Join(format!(
                        "the certificate names {:?}, not {node_id:?}",
                        creds.node_id
                    )));
                }
                tracing::info!(%seed, node = node_id, "joined the cluster");
                return Ok(answer.members);
            }
            Ok(Err(e)) => last = format!("{seed}: {e}"),
            Err(_) => last = format!("{seed}: no answer within 15 s"),
        }
        tracing::warn!("joining through {last}");
    }
    Err(ClusterError::Join(format!("could not join: {last}")))
}
