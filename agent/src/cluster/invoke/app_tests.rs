//! End to end in one process: a real agent (store, router, sandboxes, the API's own router)
//! served on a real QUIC endpoint, each answer compared with the same call made through the
//! HTTP router. Needs root (sandboxes and cgroups), like the integration tests; the Lambda case
//! needs the fixtures built by scripts/build-fixtures.sh.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use fnlet_cluster::frame::{self, Alpn, Expect, Frame, InvokeEntry, InvokeRequest};
use http::{Request, StatusCode};
use http_body_util::BodyExt as _;
use isolate::{Isolator, IsolatorConfig};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use super::*;
use crate::api::App;
use crate::cluster::pki::{self, ClusterDir, node_key_and_csr, sign_csr};
use crate::cluster::transport::{self, Transport};
use crate::cluster::wire::FrameReader;
use crate::config::Config;
use crate::logs::Logs;
use crate::metrics::Metrics;
use crate::pool::Registry;
use crate::router::Router;
use crate::store::Store;

pub(crate) const TOKEN: &str = "0123456789abcdef0123456789abcdef";

/// An agent in this process, as node "alpha", with its QUIC endpoint serving calls.
pub(crate) struct TestAgent {
    pub(crate) app: Arc<App>,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) cluster: ClusterDir,
    transport: Arc<Transport>,
    pub(crate) addr: SocketAddr,
}

impl TestAgent {
    pub(crate) async fn start(test: &str) -> TestAgent {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test runs functions in sandboxes: run it as root"
        );
        let dir = tempfile::Builder::new()
            .prefix("fnlet-unit-")
            .tempdir()
            .unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        let mut config = Config {
            state_dir: state.clone(),
            ..Config::default()
        };
        config.sandbox.cgroup_root = format!("fnlet-unit-{}-{test}", std::process::id());
        // Uids of their own per test and process, away from the integration tests' (100M to
        // 740M): FNV-1a of both into one of a million slots of 64.
        let key = format!("{}-{test}", std::process::id());
        let h = key.bytes().fold(0x811c_9dc5_u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
        config.sandbox.uid_base = 900_000_000 + (h % 1_000_000) * 64;
        config.sandbox.uid_count = 64;
        config.sandbox.prepare_ahead = false;
        config.limits.queue_timeout_ms = 200;
        config.cluster.node_id = "alpha".into();
        let isolator = Isolator::new(IsolatorConfig {
            cgroup_root: config.sandbox.cgroup_root.clone(),
            cgroup_mode: config.cgroup_mode(),
            best_effort_limits: true,
            ..Default::default()
        })
        .expect("preparing sandboxes");
        let store = Store::open(&state, config.sandbox.uid_base, config.sandbox.uid_count).unwrap();
        let logs = Logs::open(&state.join("logs"), 1 << 20).unwrap();
        let router = Router {
            registry: Arc::new(Registry::default()),
            isolator: Arc::new(isolator),
            logs: Arc::new(logs),
            metrics: Arc::new(Metrics::new()),
            queue_timeout: Duration::from_millis(config.limits.queue_timeout_ms),
            max_response: (config.limits.max_response_mb << 20) as usize,
            draining: CancellationToken::new(),
            kill: CancellationToken::new(),
            prepare_ahead: false,
            config: Arc::new(config.clone()),
            instances: tokio_util::task::TaskTracker::new(),
            network: None,
        };
        let router = Arc::new(router);
        let events = crate::events::Events::open(router.clone(), &config.events, None).unwrap();
        let app = Arc::new(App {
            events,
            keys: Arc::new(crate::auth::KeyStore::open(&state).unwrap()),
            cgroup_version: router.isolator.cgroup_version().to_string(),
            cgroup_root: router.isolator.cgroup_root(),
            unenforced_limits: Vec::new(),
            node_id: config.node_id(),
            config,
            store: Arc::new(store),
            router,
            token: TOKEN.into(),
            started: Instant::now(),
            cluster: std::sync::OnceLock::new(),
            scheduler: Arc::default(),
            updates: Default::default(),
        });
        let cluster = ClusterDir::new(&state);
        cluster.init("alpha").unwrap();
        let transport = Arc::new(
            Transport::bind(
                "127.0.0.1:0".parse().unwrap(),
                &cluster.node_credentials().unwrap(),
            )
            .unwrap(),
        );
        tokio::spawn(accept(app.clone(), transport.clone()));
        let addr = transport.local_addr().unwrap();
        TestAgent {
            app,
            dir,
            cluster,
            transport,
            addr,
        }
    }

    /// Deploys a bundle folder through the admin API.
    pub(crate) async fn deploy(&self, bundle: &Path) {
        let req = Request::post("/v1/functions")
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("content-type", "application/gzip")
            .body(Body::from(tar_gz(bundle)))
            .unwrap();
        let a = self.http(req).await;
        assert_eq!(a.status, 201, "{}", a.text());
    }

    /// A call through the HTTP API's router, as the listener hands it over.
    async fn http(&self, mut req: Request<Body>) -> Answer {
        let from: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        req.extensions_mut().insert(ConnectInfo(from));
        let r = crate::api::app(self.app.clone())
            .oneshot(req)
            .await
            .unwrap();
        Answer::read(r).await
    }

    /// A QUIC caller's connection.
    async fn client(&self) -> (quinn::Endpoint, quinn::Connection) {
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let ca = self.cluster.ca_der().unwrap();
        let cfg = transport::client_config(pki::caller_client_config(&ca).unwrap()).unwrap();
        let conn = ep
            .connect_with(cfg, self.addr, "fnlet")
            .unwrap()
            .await
            .unwrap();
        (ep, conn)
    }

    /// A peer's connection, as node "beta".
    async fn peer(&self) -> (Transport, quinn::Connection) {
        let d = self.dir.path().join("beta");
        let c = ClusterDir::new(&d);
        let (key, csr) = node_key_and_csr("beta").unwrap();
        let cert = sign_csr(
            &self.cluster.issuer().unwrap(),
            &csr,
            "beta",
            pki::NODE_CERT_VALIDITY,
        )
        .unwrap();
        c.store_ca_cert(&std::fs::read_to_string(self.cluster.ca_cert()).unwrap())
            .unwrap();
        c.store_node(&key.serialize_pem(), &cert).unwrap();
        let t = Transport::bind(
            "127.0.0.1:0".parse().unwrap(),
            &c.node_credentials().unwrap(),
        )
        .unwrap();
        let conn = t.connect("alpha", self.addr).await.unwrap();
        (t, conn)
    }

    /// Stops what runs and removes the sandboxes' cgroups.
    pub(crate) async fn finish(self) {
        self.transport.endpoint.close(0u32.into(), b"done");
        self.app.router.draining.cancel();
        self.app.router.kill.cancel();
        self.app
            .router
            .stop_instances(Duration::from_secs(10))
            .await;
        let isolator = &self.app.router.isolator;
        isolator.reap_stale().unwrap();
        isolator.remove_root().unwrap();
    }
}

/// A test that fails half-way leaves no sandbox and no cgroup behind either.
impl Drop for TestAgent {
    fn drop(&mut self) {
        self.app.router.draining.cancel();
        self.app.router.kill.cancel();
        let isolator = &self.app.router.isolator;
        let _ = isolator.reap_stale();
        let _ = isolator.remove_root();
    }
}

/// The accept loop node.rs runs: callers' connections to `serve_connection`, peers' streams
/// read and handed to `serve_invoke`.
async fn accept(app: Arc<App>, transport: Arc<Transport>) {
    while let Some(incoming) = transport.endpoint.accept().await {
        let app = app.clone();
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            let alpn = transport::alpn(&conn).and_then(|a| Alpn::from_protocol(&a));
            match (alpn, transport::peer_node_id(&conn)) {
                (Some(Alpn::Invoke), _) => serve_connection(app, conn, || {}).await,
                (Some(Alpn::Peer), Some(node_id)) => {
                    let api = Api::new(app.clone());
                    while let Ok((send, recv)) = conn.accept_bi().await {
                        let limits = request_limits(&app.config);
                        let mut reader =
                            FrameReader::new(recv, limits, Expect::request(Alpn::Peer));
                        let Ok(Some(Frame::InvokeRequest { meta, payload })) = reader.next().await
                        else {
                            continue;
                        };
                        let caller = Caller::Peer {
                            node_id: node_id.clone(),
                            conn: conn.clone(),
                        };
                        tokio::spawn(serve_invoke(api.clone(), send, meta, payload, caller));
                    }
                }
                _ => {}
            }
        });
    }
}

/// An answer as a caller sees it; the request id headers apart (each call has its own).
#[derive(Debug, PartialEq)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    request_ids: Vec<String>,
    body: Bytes,
}

impl Answer {
    async fn read(r: http::Response<Body>) -> Answer {
        let (parts, body) = r.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        let mut headers = Vec::new();
        let mut request_ids = Vec::new();
        for (n, v) in &parts.headers {
            let v = v.to_str().unwrap().to_string();
            match n.as_str() {
                "x-fnlet-request-id" | "x-amzn-requestid" => request_ids.push(n.to_string()),
                _ => headers.push((n.to_string(), v)),
            }
        }
        headers.sort();
        request_ids.sort();
        Answer {
            status: parts.status.as_u16(),
            headers,
            request_ids,
            body,
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

async fn quic(conn: &quinn::Connection, call: InvokeCall) -> Answer {
    let r = super::call(conn, call, frame::DEFAULT_MAX_BODY)
        .await
        .unwrap_or_else(|e| panic!("the call failed: {e}"));
    Answer::read(r).await
}

fn call_of(
    function: &str,
    entry: InvokeEntry,
    headers: &[(&str, &str)],
    payload: &str,
) -> InvokeCall {
    InvokeCall {
        request: InvokeRequest {
            function: function.into(),
            qualifier: None,
            request_id: "r-from-the-caller".into(),
            deadline_ms: deadline_in(Duration::from_secs(60)),
            hops: 0,
            entry,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            log_tail: false,
            client_context: None,
        },
        payload: Bytes::from(payload.to_string()),
    }
}

fn post(uri: &str, headers: &[(&str, &str)], body: &str) -> Request<Body> {
    let mut r = Request::post(uri);
    for (n, v) in headers {
        r = r.header(*n, *v);
    }
    r.body(Body::from(body.to_string())).unwrap()
}

/// A bundle folder holding fnlet.toml and an executable run.sh of `script`.
pub(crate) fn sh_bundle(dir: &Path, name: &str, extra: &str, script: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let b = dir.join(name);
    std::fs::create_dir_all(&b).unwrap();
    std::fs::set_permissions(&b, std::fs::Permissions::from_mode(0o755)).unwrap();
    let manifest = format!("name = \"{name}\"\nentrypoint = \"run.sh\"\ntimeout_s = 5\n{extra}\n");
    std::fs::write(b.join("fnlet.toml"), manifest).unwrap();
    let run = b.join("run.sh");
    std::fs::write(&run, format!("#!/bin/sh\n{script}\n")).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
    b
}

fn tar_gz(dir: &Path) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut ar = tar::Builder::new(gz);
    ar.follow_symlinks(false);
    ar.append_dir_all(".", dir).unwrap();
    ar.into_inner().and_then(|gz| gz.finish()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_calls_over_quic_answer_as_over_http() {
    let agent = TestAgent::start("quic-exec").await;
    let bundles = agent.dir.path().join("bundles");
    agent
        .deploy(&sh_bundle(
            &bundles,
            "echo",
            "public = true",
            "printf 'got:'; cat",
        ))
        .await;
    agent
        .deploy(&sh_bundle(&bundles, "private", "", "echo secret"))
        .await;
    let (_ep, conn) = agent.client().await;
    let bearer = format!("Bearer {TOKEN}");

    // (HTTP request, the QUIC call meaning the same): the same answer, request ids apart.
    let cases = [
        (
            post("/fn/echo", &[], "abc"),
            call_of("echo", InvokeEntry::Exec, &[], "abc"),
            200,
        ),
        (
            post("/fn/nope", &[], ""),
            call_of("nope", InvokeEntry::Exec, &[], ""),
            404,
        ),
        (
            post("/fn/private", &[], ""),
            call_of("private", InvokeEntry::Exec, &[], ""),
            401,
        ),
        (
            post("/fn/private", &[("authorization", &bearer)], ""),
            call_of(
                "private",
                InvokeEntry::Exec,
                &[("authorization", &bearer)],
                "",
            ),
            200,
        ),
        (
            post("/fn/private", &[("authorization", "Bearer wrong")], ""),
            call_of(
                "private",
                InvokeEntry::Exec,
                &[("authorization", "Bearer wrong")],
                "",
            ),
            401,
        ),
        // An exec-mode function through the Invoke API: the payload on its stdin.
        (
            post(
                "/2015-03-31/functions/echo/invocations",
                &[("authorization", &bearer)],
                "{}",
            ),
            call_of(
                "echo",
                InvokeEntry::InvokeApi,
                &[("authorization", &bearer)],
                "{}",
            ),
            200,
        ),
    ];
    for (http_req, call, status) in cases {
        let what = format!("{} {}", http_req.method(), http_req.uri());
        let over_http = agent.http(http_req).await;
        let over_quic = quic(&conn, call).await;
        assert_eq!(over_http.status, status, "{what}: {}", over_http.text());
        assert_eq!(over_quic, over_http, "{what}");
        assert_eq!(over_quic.header("x-fnlet-host"), Some("alpha"), "{what}");
        assert!(!over_quic.request_ids.is_empty(), "{what}");
    }

    // `auto`, what `fnlet invoke --quic` sends: an exec-mode function's own door.
    let a = quic(&conn, call_of("echo", InvokeEntry::Auto, &[], "xyz")).await;
    assert_eq!((a.status, a.text().as_str()), (200, "got:xyz"));

    // A peer authorised its caller already: no token needed, the request id is the call's.
    let (_beta, peer) = agent.peer().await;
    let mut c = call_of("private", InvokeEntry::Exec, &[], "");
    c.request.hops = 1;
    let r = super::call(&peer, c, frame::DEFAULT_MAX_BODY)
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-fnlet-request-id"], "r-from-the-caller");
    assert_eq!(r.headers()["x-fnlet-host"], "alpha");
    let body = r.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "secret\n");
    // ...but no further than it may go.
    let mut c = call_of("private", InvokeEntry::Exec, &[], "");
    c.request.hops = 2;
    let e = super::call(&peer, c, frame::DEFAULT_MAX_BODY)
        .await
        .unwrap_err();
    assert!(matches!(e, CallError::HopLimit { .. }), "{e}");

    agent.finish().await;
}

/// A bundle folder of a Lambda fixture (its built `bootstrap`) named `name`.
fn lambda_bundle(dir: &Path, fixture: &str, name: &str, extra: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let bootstrap = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(fixture)
        .join("bundle/bootstrap");
    assert!(
        bootstrap.exists(),
        "{} is not built: run scripts/build-fixtures.sh (the README's test command does)",
        bootstrap.display()
    );
    let b = dir.join(name);
    std::fs::create_dir_all(&b).unwrap();
    std::fs::set_permissions(&b, std::fs::Permissions::from_mode(0o755)).unwrap();
    let manifest = format!("name = \"{name}\"\nmode = \"lambda\"\ntimeout_s = 5\n{extra}\n");
    std::fs::write(b.join("fnlet.toml"), manifest).unwrap();
    std::fs::copy(&bootstrap, b.join("bootstrap")).unwrap();
    std::fs::set_permissions(b.join("bootstrap"), std::fs::Permissions::from_mode(0o755)).unwrap();
    b
}

fn url_call(
    method: &str,
    path: &str,
    query: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> InvokeCall {
    call_of(
        "web",
        InvokeEntry::FunctionUrl {
            method: method.into(),
            path: path.into(),
            query: query.into(),
            source_ip: None,
        },
        headers,
        body,
    )
}

fn request(method: &str, uri: &str, headers: &[(&str, &str)], body: &str) -> Request<Body> {
    let mut r = Request::builder().method(method).uri(uri);
    for (n, v) in headers {
        r = r.header(*n, *v);
    }
    r.body(Body::from(body.to_string())).unwrap()
}

/// What the fixture's /inspect saw, without what differs between any two calls.
fn seen_by_the_function(a: &Answer) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_slice(&a.body)
        .unwrap_or_else(|e| panic!("{} {}: {e}", a.status, a.text()));
    v["request_id"] = serde_json::Value::Null;
    // The trace id is made from the request id.
    v["headers"]["x-amzn-trace-id"] = serde_json::Value::Null;
    for k in ["requestId", "time", "timeEpoch"] {
        v["request_context"][k] = serde_json::Value::Null;
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_urls_and_the_invoke_api_over_quic_answer_as_over_http() {
    let agent = TestAgent::start("quic-lambda").await;
    let bundles = agent.dir.path().join("bundles");
    let streaming = "public = true\n[env]\nFIXTURE_STREAMING = \"1\"";
    agent
        .deploy(&lambda_bundle(&bundles, "lambda-http", "web", streaming))
        .await;
    agent
        .deploy(&lambda_bundle(&bundles, "lambda-http", "priv", ""))
        .await;
    let (_ep, conn) = agent.client().await;
    let bearer = format!("Bearer {TOKEN}");
    let host = ("host", "fn.example:8740");

    // A streamed function URL answer: status, headers, cookies and body as over HTTP.
    let over_http = agent
        .http(request("GET", "/fn/web/hello?name=q", &[host], ""))
        .await;
    let over_quic = quic(&conn, url_call("GET", "/hello", "name=q", &[host], "")).await;
    assert_eq!(
        (over_http.status, over_http.text().as_str()),
        (200, "hello q")
    );
    assert_eq!(over_quic, over_http);
    assert_eq!(over_quic.header("x-fixture"), Some("1"));
    assert_eq!(over_quic.header("x-fnlet-host"), Some("alpha"));

    // What the function sees of the request, the checked credentials left out either way.
    let headers = [
        host,
        ("authorization", bearer.as_str()),
        ("x-custom", "1"),
        ("cookie", "a=1; b=2"),
    ];
    let over_http = agent
        .http(request(
            "DELETE",
            "/fn/web/inspect?a=1&a=2",
            &headers,
            "data",
        ))
        .await;
    let over_quic = quic(
        &conn,
        url_call("DELETE", "/inspect", "a=1&a=2", &headers, "data"),
    )
    .await;
    assert_eq!(over_http.status, 200, "{}", over_http.text());
    let seen = seen_by_the_function(&over_quic);
    assert_eq!(seen, seen_by_the_function(&over_http));
    assert_eq!(seen["headers"]["x-custom"], "1", "{seen}");
    assert_eq!(
        seen["headers"]["authorization"],
        serde_json::Value::Null,
        "{seen}"
    );
    assert_eq!(
        seen["request_context"]["domainName"], "fn.example:8740",
        "{seen}"
    );
    // The same request taken by another host and passed on (what forwarding will do): the
    // function sees it as if it had come here.
    let (parts, ()) = request("DELETE", "/fn/web/inspect?a=1&a=2", &headers, "")
        .map(|_| ())
        .into_parts();
    let passing = Passing {
        request_id: "r-passed-on",
        deadline_ms: deadline_in(Duration::from_secs(60)),
        hops: 0,
        source: "127.0.0.1".parse().unwrap(),
    };
    let is_admin = |v: &http::HeaderValue| v.as_bytes() == bearer.as_bytes();
    let c = forward_call(
        &parts,
        Bytes::from_static(b"data"),
        true,
        is_admin,
        &passing,
    )
    .unwrap();
    let (_beta, peer) = agent.peer().await;
    let passed_on = quic(&peer, c).await;
    assert_eq!(seen_by_the_function(&passed_on), seen);
    assert_eq!(passed_on.header("x-fnlet-host"), Some("alpha"));

    for (method, path, body) in [
        ("POST", "/echo", "echo me"),
        ("GET", "/fail", ""),
        ("PUT", "/status/418", ""),
    ] {
        let ct = ("content-type", "text/plain");
        let over_http = agent
            .http(request(
                method,
                &format!("/fn/web{path}"),
                &[host, ct],
                body,
            ))
            .await;
        let over_quic = quic(&conn, url_call(method, path, "", &[host, ct], body)).await;
        assert_eq!(over_quic, over_http, "{method} {path}");
    }

    // The Invoke API on a function that is not public: refused unsigned, in Lambda's words...
    let api = "/2015-03-31/functions/priv/invocations";
    let over_http = agent.http(post(api, &[], "{}")).await;
    let over_quic = quic(&conn, call_of("priv", InvokeEntry::InvokeApi, &[], "{}")).await;
    assert_eq!(over_http.status, 403, "{}", over_http.text());
    assert_eq!(over_quic, over_http);
    // ...and let in with the admin token (a dry run: checked, not run).
    let dry = [
        ("authorization", bearer.as_str()),
        ("x-amz-invocation-type", "DryRun"),
    ];
    let over_http = agent.http(post(api, &dry, "{}")).await;
    let over_quic = quic(&conn, call_of("priv", InvokeEntry::InvokeApi, &dry, "{}")).await;
    assert_eq!(over_http.status, 204, "{}", over_http.text());
    assert_eq!(over_quic, over_http);
    // `auto` takes a Lambda-mode function through the Invoke API.
    let over_quic = quic(&conn, call_of("priv", InvokeEntry::Auto, &dry, "{}")).await;
    assert_eq!(over_quic, over_http);

    agent.finish().await;
}
