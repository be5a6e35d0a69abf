//! `fnlet invoke --quic`: one call over QUIC (`fnlet-invoke/1`) to an agent's cluster
//! endpoint, which must show a certificate of the cluster's CA. The answer reads as the HTTP
//! API's does, so `fnlet invoke` prints and exits the same either way.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use fnlet_cluster::frame::{self, InvokeEntry, InvokeRequest};
use http_body_util::BodyExt as _;
use rustls_pki_types::CertificateDer;

use super::client::{
    self, ApiError, ClientError, ClientResult, Invocation, MAX_ERROR_BYTES, USER_AGENT_VALUE,
};
use super::functions::CliError;
use crate::cluster::invoke::{self, AnswerCut, CallError, InvokeCall};
use crate::cluster::{pki, transport};

/// How long a dial may take before the agent counts as unreachable (as over HTTP).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the caller waits for its answer, as over HTTP: as long as a function may run
/// (`timeout_s` is at most a day), and a minute more for its queue and start.
const WAIT: Duration = Duration::from_secs(24 * 3600 + 60);

/// The cluster CA's certificate from `path` (`given`: named by --ca, else the default).
pub(super) fn read_ca(path: &Path, given: bool) -> Result<CertificateDer<'static>, CliError> {
    use rustls_pki_types::pem::PemObject;
    let pem = std::fs::read(path).map_err(|e| {
        if given {
            CliError::Usage(format!("--ca {}: {e}", path.display()))
        } else {
            CliError::Usage(format!(
                "{}: {e}: --quic checks the agent against the cluster's CA; pass --ca FILE (the \
                 cluster's ca.pem), or --state-dir of a cluster member",
                path.display()
            ))
        }
    })?;
    CertificateDer::from_pem_slice(&pem)
        .map_err(|_| CliError::Usage(format!("{}: not a PEM certificate", path.display())))
}

/// A QUIC connection to one agent.
pub(super) struct Session {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    /// The agent as messages name it: `quic://ADDR:PORT`.
    shown: String,
}

impl Session {
    pub(super) async fn connect(
        addr: SocketAddr,
        ca: &CertificateDer<'static>,
    ) -> ClientResult<Session> {
        let shown = format!("quic://{addr}");
        let unreachable = |reason: String| ClientError::Unreachable {
            endpoint: shown.clone(),
            reason,
        };
        let setup = |detail: String| ClientError::Protocol {
            endpoint: shown.clone(),
            detail: format!("setting up QUIC: {detail}"),
        };
        let bind: SocketAddr = if addr.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let endpoint = quinn::Endpoint::client(bind)
            .map_err(|e| unreachable(format!("opening a UDP socket: {e}")))?;
        let tls = pki::caller_client_config(ca).map_err(|e| setup(e.to_string()))?;
        let config = transport::client_config(tls).map_err(|e| setup(e.to_string()))?;
        // Any node id will do: the certificate is checked against the CA, whatever it names.
        let connecting = endpoint
            .connect_with(config, addr, "fnlet")
            .map_err(|e| unreachable(e.to_string()))?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| unreachable(format!("no answer within {}s", CONNECT_TIMEOUT.as_secs())))?
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(Session {
            endpoint,
            conn,
            shown,
        })
    }

    /// Calls `name` with `input`; the admin token goes in `authorization` as over HTTP.
    pub(super) async fn invoke(
        &self,
        name: &str,
        token: Option<&str>,
        input: Vec<u8>,
    ) -> ClientResult<Invocation> {
        let mut headers = vec![("user-agent".to_string(), USER_AGENT_VALUE.to_string())];
        if let Some(t) = token {
            headers.push(("authorization".into(), format!("Bearer {t}")));
        }
        let request = InvokeRequest {
            function: name.to_string(),
            qualifier: None,
            // The call's request id on every host it passes (the agent keeps it).
            request_id: crate::api::request_id(),
            deadline_ms: invoke::deadline_in(WAIT),
            hops: 0,
            entry: InvokeEntry::Auto,
            headers,
            log_tail: false,
            client_context: None,
        };
        let call = InvokeCall {
            request,
            payload: input.into(),
        };
        let resp = invoke::call(&self.conn, call, frame::DEFAULT_MAX_BODY)
            .await
            .map_err(|e| self.call_error(e))?;
        let (parts, body) = resp.into_parts();
        let shown = self.shown.clone();
        let mut body = body
            .map_err(move |e| ClientError::Connection {
                endpoint: shown.clone(),
                reason: cut_reason(&e),
            })
            .boxed_unsync();
        if parts.status.is_success() {
            return Ok(Invocation::from_answer(parts.status, &parts.headers, body));
        }
        let mut text = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                let room = MAX_ERROR_BYTES.saturating_sub(text.len());
                text.extend_from_slice(&data[..data.len().min(room)]);
                if text.len() >= MAX_ERROR_BYTES {
                    break;
                }
            }
        }
        let api = client::parse_api_error(parts.status, &parts.headers, &text);
        Err(ClientError::Api(Box::new(api)))
    }

    /// A call that got no answer, in the words of the HTTP path.
    fn call_error(&self, e: CallError) -> ClientError {
        let endpoint = self.shown.clone();
        match e {
            CallError::PeerLost { reason, .. } => ClientError::Connection { endpoint, reason },
            CallError::Reset { .. } => ClientError::Connection {
                endpoint,
                reason: e.to_string(),
            },
            CallError::BadCall(_) | CallError::BadAnswer { .. } => ClientError::Protocol {
                endpoint,
                detail: e.to_string(),
            },
            // A refusal: an error the agent answered, as an HTTP answer would carry it.
            _ => {
                let a = e.app_error();
                let body = serde_json::json!({ "error": { "kind": a.kind, "message": a.message } });
                ClientError::Api(Box::new(ApiError {
                    status: a.status,
                    kind: a.kind.to_string(),
                    message: a.message,
                    body: Some(body),
                    request_id: None,
                    version: None,
                    retry_after: a.retry_after.map(|s| s.to_string()),
                }))
            }
        }
    }

    /// Closes the connection and lets the agent hear it.
    pub(super) async fn close(self) {
        self.conn.close(0u32.into(), b"done");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// Why an answer's body broke: the agent's own words when it cut it.
fn cut_reason(e: &axum::Error) -> String {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(c) = s.downcast_ref::<AnswerCut>() {
            return c.to_string();
        }
        source = s.source();
    }
    e.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::invoke::app_tests::{TOKEN, TestAgent, sh_bundle};
    use crate::cluster::pki::ClusterDir;

    async fn read_all(inv: &mut Invocation) -> String {
        let mut out = Vec::new();
        while let Some(c) = inv.chunk().await.unwrap() {
            out.extend_from_slice(&c);
        }
        String::from_utf8(out).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_invocation_over_quic_reads_as_over_http() {
        let agent = TestAgent::start("cli-quic").await;
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
        let ca = read_ca(&agent.cluster.ca_cert(), true).unwrap();
        let session = Session::connect(agent.addr, &ca).await.unwrap();

        let mut inv = session.invoke("echo", None, b"abc".to_vec()).await.unwrap();
        assert_eq!(inv.status, http::StatusCode::OK);
        assert_eq!(inv.version.as_deref(), Some("1"));
        assert_eq!(inv.request_id.as_ref().map(String::len), Some(36));
        assert_eq!(inv.function_error, None);
        assert_eq!(read_all(&mut inv).await, "got:abc");

        // The agent's refusals, as the HTTP path reports them.
        match session.invoke("nope", None, Vec::new()).await {
            Err(ClientError::Api(a)) => {
                assert_eq!((a.status.as_u16(), a.kind.as_str()), (404, "not_found"));
                assert!(a.message.contains("nope"), "{}", a.message);
                assert!(a.request_id.is_some());
            }
            other => panic!("{other:?}"),
        }
        match session.invoke("private", Some("wrong"), Vec::new()).await {
            Err(ClientError::Api(a)) => {
                assert_eq!((a.status.as_u16(), a.kind.as_str()), (401, "unauthorized"))
            }
            other => panic!("{other:?}"),
        }
        // The admin token goes where it goes over HTTP.
        let mut inv = session
            .invoke("private", Some(TOKEN), Vec::new())
            .await
            .unwrap();
        assert_eq!(read_all(&mut inv).await, "secret\n");
        session.close().await;

        // An agent of another cluster is not the one asked for.
        let other = tempfile::tempdir().unwrap();
        let theirs = ClusterDir::new(other.path());
        theirs.init("mallory").unwrap();
        let wrong = read_ca(&theirs.ca_cert(), true).unwrap();
        match Session::connect(agent.addr, &wrong).await {
            Err(ClientError::Unreachable { endpoint, reason }) => {
                assert_eq!(endpoint, format!("quic://{}", agent.addr));
                assert!(reason.contains("certificate"), "{reason}");
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("connected to an agent of another CA"),
        }
        agent.finish().await;
    }

    #[test]
    fn a_missing_or_bad_ca_is_a_usage_error_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("ca.pem");
        match read_ca(&missing, true) {
            Err(CliError::Usage(m)) => assert!(m.starts_with("--ca "), "{m}"),
            other => panic!("{other:?}"),
        }
        match read_ca(&missing, false) {
            Err(CliError::Usage(m)) => assert!(m.contains("pass --ca FILE"), "{m}"),
            other => panic!("{other:?}"),
        }
        std::fs::write(&missing, "not a certificate").unwrap();
        match read_ca(&missing, true) {
            Err(CliError::Usage(m)) => assert!(m.contains("not a PEM certificate"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
