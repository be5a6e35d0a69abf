//! Lambda's control plane on a real `fnlet agent`: CreateFunction of a 5 MB zip, then the
//! Invoke API until the function answers (the time an IaC tool waits before its first call),
//! beside `fnlet deploy`'s own API call (`POST /v1/functions`) of the same zip, then the same
//! invoke. Interleaved round by round; each round makes a new function (a new name, so the
//! zips differ by their fnlet.toml only) and deletes it untimed.
//!
//! Both sides send the same bytes over one keep-alive HTTP/1.1 connection with the admin
//! token: CreateFunction's JSON carries the zip in base64 (encoded before the clock starts),
//! `POST /v1/functions` the raw zip. The zip: the benchmark no-op as `bootstrap` (tests/
//! fixtures/lambda-noop), its fnlet.toml, and 5 MB of incompressible data, stored.
//!
//! Then warm calls of one such function, interleaved: the Invoke API (buffered: the time to the
//! whole answer) beside InvokeWithResponseStream (the time to the first byte of its body, the
//! PayloadChunk event, and to its end, the InvokeComplete event).
//!
//! `benches/run.sh control`, or `cargo bench -p fnlet-benches --bench control` as root with the
//! no-op built. FNLET_BENCH_RUNS (default 40) and FNLET_BENCH_WARMUP (4); the warm calls are
//! FNLET_BENCH_CALLS (default 400) of each.

mod common;

use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::{Stats, env_count, fnlet_binary, ms, print_machine, ratio};

const PAYLOAD_MB: usize = 5;

fn main() {
    let runs = env_count("FNLET_BENCH_RUNS", 40);
    let warmup = env_count("FNLET_BENCH_WARMUP", 4);
    assert!(
        nix::unistd::geteuid().is_root(),
        "the agent creates namespaces and cgroups: run as root (benches/run.sh control)"
    );
    print_machine("control plane");
    let base =
        PathBuf::from(std::env::var("FNLET_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()));
    let work = tempfile::Builder::new()
        .prefix("fnlet-bench-control-")
        .tempdir_in(&base)
        .expect("work dir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut agent = Agent::start(&work.path().join("agent"));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .expect("http client");
    let bootstrap = fs::read(noop_binary()).expect("read the no-op");
    let mut filler = vec![0u8; PAYLOAD_MB << 20];
    // Incompressible: xorshift bytes.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for b in filler.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    println!(
        "  agent pid {} at {}; zip: bootstrap ({} bytes) + fnlet.toml + {PAYLOAD_MB} MB stored data",
        agent.child.id(),
        agent.addr,
        bootstrap.len()
    );
    let url = |p: &str| format!("http://{}{p}", agent.addr);
    let bearer = format!("Bearer {}", agent.token);
    let mut create = Vec::new();
    let mut deploy = Vec::new();
    for i in 0..warmup + runs {
        // Alternate who goes first.
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for who in order {
            let name = format!("b{i}-{who}");
            let zip = zip_of(&name, &bootstrap, &filler);
            let d = rt.block_on(async {
                let started;
                if who == 0 {
                    let body = serde_json::json!({
                        "FunctionName": name,
                        "Role": "arn:aws:iam::000000000000:role/bench",
                        "Runtime": "provided.al2023",
                        "Handler": "bootstrap",
                        "Code": { "ZipFile": base64::engine::general_purpose::STANDARD.encode(&zip) },
                    })
                    .to_string();
                    started = Instant::now();
                    let r = client
                        .post(url("/2015-03-31/functions"))
                        .header("authorization", &bearer)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await
                        .expect("CreateFunction");
                    let status = r.status();
                    let text = r.text().await.unwrap_or_default();
                    assert_eq!(status.as_u16(), 201, "CreateFunction: {text}");
                } else {
                    started = Instant::now();
                    let r = client
                        .post(url("/v1/functions"))
                        .header("authorization", &bearer)
                        .header("content-type", "application/zip")
                        .body(zip)
                        .send()
                        .await
                        .expect("deploy");
                    let status = r.status();
                    let text = r.text().await.unwrap_or_default();
                    assert_eq!(status.as_u16(), 201, "deploy: {text}");
                }
                // The first successful invoke.
                loop {
                    let r = client
                        .post(url(&format!("/2015-03-31/functions/{name}/invocations")))
                        .header("authorization", &bearer)
                        .body("{}")
                        .send()
                        .await
                        .expect("invoke");
                    let ok = r.status().as_u16() == 200;
                    let _ = r.bytes().await;
                    if ok {
                        break started.elapsed();
                    }
                    assert!(
                        started.elapsed() < Duration::from_secs(30),
                        "{name} never answered"
                    );
                }
            });
            rt.block_on(async {
                let r = client
                    .delete(url(&format!("/v1/functions/{name}")))
                    .header("authorization", &bearer)
                    .send()
                    .await
                    .expect("delete");
                assert!(r.status().is_success(), "delete {name}: {}", r.status());
            });
            if i >= warmup {
                if who == 0 { &mut create } else { &mut deploy }.push(d);
            }
        }
    }
    let (c, d) = (Stats::of(&create), Stats::of(&deploy));
    println!(
        "\n  {:<52} {:>5} {:>10} {:>10} {:>10} {:>10}",
        "to the first successful invoke", "runs", "median ms", "p99 ms", "min ms", "vs deploy"
    );
    for (what, s) in [
        ("CreateFunction (5 MB zip, base64 JSON)", c),
        ("fnlet deploy's POST /v1/functions (same zip)", d),
    ] {
        println!(
            "  {what:<52} {:>5} {:>10} {:>10} {:>10} {:>10}",
            s.n,
            ms(s.median),
            ms(s.p99),
            ms(s.min),
            ratio(s.median, Some(d.median)),
        );
    }
    println!("  load average after: {}", common::load_average());

    // Warm calls: buffered Invoke beside InvokeWithResponseStream, alternating.
    let calls = env_count("FNLET_BENCH_CALLS", 400);
    let name = "warm";
    let zip = zip_of(name, &bootstrap, &[]);
    rt.block_on(async {
        let r = client
            .post(url("/v1/functions"))
            .header("authorization", &bearer)
            .header("content-type", "application/zip")
            .body(zip)
            .send()
            .await
            .expect("deploy");
        assert_eq!(r.status().as_u16(), 201, "deploy warm");
    });
    let (mut buffered, mut first_byte, mut whole) = (Vec::new(), Vec::new(), Vec::new());
    let invoke = url(&format!("/2015-03-31/functions/{name}/invocations"));
    let stream = url(&format!(
        "/2021-11-15/functions/{name}/response-streaming-invocations"
    ));
    for i in 0..warmup + calls {
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for who in order {
            rt.block_on(async {
                let started = Instant::now();
                let target = if who == 0 { &invoke } else { &stream };
                let mut r = client
                    .post(target)
                    .header("authorization", &bearer)
                    .body("{}")
                    .send()
                    .await
                    .expect("invoke");
                assert_eq!(r.status().as_u16(), 200, "{target}");
                let mut first = None;
                let mut bytes = 0;
                while let Some(c) = r.chunk().await.expect("the answer's body") {
                    first.get_or_insert_with(|| started.elapsed());
                    bytes += c.len();
                }
                let total = started.elapsed();
                assert!(bytes > 0, "{target}: an empty answer");
                if i >= warmup {
                    if who == 0 {
                        buffered.push(total);
                    } else {
                        first_byte.push(first.unwrap_or(total));
                        whole.push(total);
                    }
                }
            });
        }
    }
    let b = Stats::of(&buffered);
    println!(
        "\n  {:<52} {:>5} {:>10} {:>10} {:>10} {:>10}",
        "warm calls of the no-op", "runs", "median ms", "p99 ms", "min ms", "vs Invoke"
    );
    for (what, s) in [
        ("Invoke (buffered), the whole answer", b),
        (
            "InvokeWithResponseStream, first byte",
            Stats::of(&first_byte),
        ),
        (
            "InvokeWithResponseStream, InvokeComplete",
            Stats::of(&whole),
        ),
    ] {
        println!(
            "  {what:<52} {:>5} {:>10} {:>10} {:>10} {:>10}",
            s.n,
            ms(s.median),
            ms(s.p99),
            ms(s.min),
            ratio(s.median, Some(b.median)),
        );
    }
    println!("  load average after: {}", common::load_average());
    agent.stop();
}

/// A zip of `bootstrap`, a fnlet.toml naming `name`, and `filler` stored (not deflated).
fn zip_of(name: &str, bootstrap: &[u8], filler: &[u8]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let stored = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .unix_permissions(0o644);
    let manifest = format!(
        "name = \"{name}\"\nmode = \"lambda\"\nmemory_mb = 32\ntimeout_s = 5\nkeep_alive_s = 60\n"
    );
    for (path, data, mode) in [
        ("fnlet.toml", manifest.as_bytes(), 0o644),
        ("bootstrap", bootstrap, 0o755),
        ("data.bin", filler, 0o644),
    ] {
        w.start_file(path, stored.unix_permissions(mode))
            .expect("zip entry");
        w.write_all(data).expect("zip write");
    }
    w.finish().expect("finish the zip").into_inner()
}

fn noop_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("FNLET_NOOP_BIN") {
        return p.into();
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/lambda-noop/bundle/bootstrap");
    assert!(
        p.is_file(),
        "{} is missing: benches/run.sh control builds it",
        p.display()
    );
    p
}

struct Agent {
    child: Child,
    addr: SocketAddr,
    token: String,
}

impl Agent {
    fn start(dir: &Path) -> Agent {
        fs::create_dir(dir).expect("agent dir");
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let state = dir.join("state");
        let config = dir.join("config.toml");
        fs::write(
            &config,
            "shutdown_grace_s = 5.0\nretain_versions = 2\n[sandbox]\ncgroup_root = \"fnlet-bench-control\"\n\
             [limits]\nmax_bundle_mb = 64\nmax_unpacked_mb = 64\n",
        )
        .expect("config");
        let log = fs::File::create(dir.join("agent.log")).expect("agent log");
        let child = Command::new(fnlet_binary())
            .arg("agent")
            .args(["--listen", &format!("127.0.0.1:{port}"), "--state-dir"])
            .arg(&state)
            .arg("--config")
            .arg(&config)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("starting fnlet agent");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let t = Instant::now();
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the agent did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let token = fs::read_to_string(state.join("admin.token"))
            .expect("admin token")
            .trim()
            .to_string();
        Agent { child, addr, token }
    }

    fn stop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}
