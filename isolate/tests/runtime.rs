//! The library against the real kernel: cgroup v2 through a writable cgroup2 hierarchy (the
//! hybrid host's /sys/fs/cgroup/unified, or /sys/fs/cgroup on a pure v2 host), and recovery of
//! what a crashed agent left, on both hierarchies. Needs root.

use std::path::{Path, PathBuf};
use std::time::Duration;

use isolate::{
    CgroupMode, CgroupVersion, ExitStatus, IsolateError, Isolator, IsolatorConfig, Limits,
    SandboxSpec,
};

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests create namespaces and cgroups and must run as root (try: sudo cargo nextest run)"
    );
}

/// An isolator whose cgroup root goes even when its test fails: a failed assertion would
/// otherwise leave the test's `fnlet-test-*` groups on the host. A test that passes removes
/// the root itself (and checks that it could).
struct TestIsolator(Isolator);

impl std::ops::Deref for TestIsolator {
    type Target = Isolator;
    fn deref(&self) -> &Isolator {
        &self.0
    }
}

impl std::ops::DerefMut for TestIsolator {
    fn deref_mut(&mut self) -> &mut Isolator {
        &mut self.0
    }
}

impl Drop for TestIsolator {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = self.0.reap_stale();
            let _ = self.0.remove_root();
        }
    }
}

/// An isolator on the host's cgroups under `fnlet-test-<pid>-<suffix>`.
fn isolator(suffix: &str) -> TestIsolator {
    TestIsolator(
        Isolator::new(IsolatorConfig {
            cgroup_root: format!("fnlet-test-{}-{suffix}", std::process::id()),
            ..Default::default()
        })
        .unwrap(),
    )
}

/// A writable cgroup2 mount: pure v2, or the hybrid host's unified tree.
fn cgroup2_mount() -> PathBuf {
    for p in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        if isolate::cgroup::is_cgroup2_mount(Path::new(p)) {
            return p.into();
        }
    }
    panic!(
        "no cgroup2 hierarchy is mounted at /sys/fs/cgroup or /sys/fs/cgroup/unified: the v2 backend cannot be tested on this host"
    );
}

/// Kills the sandbox and waits (at most 5 s) for its outcome.
async fn killed(sb: &mut isolate::Sandbox) -> isolate::Outcome {
    sb.kill().unwrap();
    tokio::time::timeout(Duration::from_secs(5), sb.wait())
        .await
        .expect("the sandbox ends within 5 s of its kill")
        .unwrap()
}

fn sleeper(name: &str) -> SandboxSpec {
    SandboxSpec {
        name: name.into(),
        program: "/bin/sleep".into(),
        args: vec!["30".into()],
        limits: Limits {
            memory_bytes: None,
            cpus: None,
            pids: None,
            nofile: 1024,
        },
        ..Default::default()
    }
}

#[tokio::test]
async fn v2_puts_the_sandbox_in_its_group_and_removes_it() {
    require_root();
    let mount = cgroup2_mount();
    let root = format!("fnlet-test-{}-v2", std::process::id());
    let iso = TestIsolator(
        Isolator::new(IsolatorConfig {
            cgroup_root: root.clone(),
            cgroup_mode: CgroupMode::V2At(mount.clone()),
            ..Default::default()
        })
        .unwrap(),
    );
    assert_eq!(iso.cgroup_version(), CgroupVersion::V2);

    let mut sb = iso.spawn(&sleeper("v2fn")).unwrap();
    let dir = PathBuf::from(sb.cgroup_path().unwrap());
    assert!(dir.starts_with(mount.join(&root)), "{}", dir.display());
    // clone3(CLONE_INTO_CGROUP): the init was born inside the group.
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
    assert!(
        procs.lines().any(|l| l == sb.pid().to_string()),
        "init {} not in {procs:?}",
        sb.pid()
    );
    let own = std::fs::read_to_string(format!("/proc/{}/cgroup", sb.pid())).unwrap();
    assert!(
        own.contains(&format!("0::/{root}/")) || own.contains(&format!("{root}/v2fn")),
        "{own}"
    );

    assert_eq!(killed(&mut sb).await.status, ExitStatus::Signaled(9));
    assert!(!dir.exists(), "group {} left behind", dir.display());
    iso.remove_root().unwrap();
    assert!(!mount.join(&root).exists());
}

#[test]
fn v2_refuses_limits_whose_controller_is_not_delegated() {
    require_root();
    let mount = cgroup2_mount();
    let controllers = std::fs::read_to_string(mount.join("cgroup.controllers")).unwrap();
    let root = format!("fnlet-test-{}-v2lim", std::process::id());
    let iso = TestIsolator(
        Isolator::new(IsolatorConfig {
            cgroup_root: root,
            cgroup_mode: CgroupMode::V2At(mount.clone()),
            ..Default::default()
        })
        .unwrap(),
    );
    let mut spec = sleeper("v2lim");
    spec.limits.pids = Some(16);
    match iso.spawn(&spec) {
        Err(IsolateError::CgroupControllerMissing { controller, .. }) => {
            assert!(!controllers.split_whitespace().any(|c| c == "pids"));
            assert_eq!(controller, "pids");
        }
        Ok(mut sb) => {
            // A pure v2 host has pids: the limit must then be in force.
            let dir = PathBuf::from(sb.cgroup_path().unwrap());
            assert_eq!(
                std::fs::read_to_string(dir.join("pids.max"))
                    .unwrap()
                    .trim(),
                "16"
            );
            sb.kill().unwrap();
            sb.wait_blocking().unwrap();
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
    iso.remove_root().unwrap();
}

/// A sandbox whose agent vanished without cleaning up: the next agent's reap_stale kills it and
/// removes its group.
fn reap_after_crash(mode: CgroupMode, tag: &str) {
    let root = format!("fnlet-test-{}-{tag}", std::process::id());
    let iso = TestIsolator(
        Isolator::new(IsolatorConfig {
            cgroup_root: root.clone(),
            cgroup_mode: mode.clone(),
            ..Default::default()
        })
        .unwrap(),
    );
    let sb = iso.spawn(&sleeper(tag)).unwrap();
    let pid = sb.pid();
    let dir = PathBuf::from(sb.cgroup_path().unwrap());
    // Simulate the crash: the handle is never dropped.
    std::mem::forget(sb);

    let next = Isolator::new(IsolatorConfig {
        cgroup_root: root,
        cgroup_mode: mode,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(next.reap_stale().unwrap(), 1);
    assert!(!dir.exists(), "{} left behind", dir.display());
    // The init is a zombie of ours now (we are its parent): reap it, and check it died of SIGKILL.
    let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None).unwrap();
    assert!(
        matches!(
            status,
            nix::sys::wait::WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGKILL, _)
        ),
        "{status:?}"
    );
    next.remove_root().unwrap();
}

#[test]
fn reap_stale_on_v2() {
    require_root();
    reap_after_crash(CgroupMode::V2At(cgroup2_mount()), "reapv2");
}

#[test]
fn reap_stale_on_the_hosts_own_hierarchy() {
    require_root();
    reap_after_crash(CgroupMode::Auto, "reapauto");
}

/// A sandbox built ahead of time runs the function only when started, and a sandbox that is
/// never started leaves nothing behind.
#[test]
fn prepared_sandboxes_start_on_demand_and_clean_up_unused() {
    require_root();
    let root = format!("fnlet-test-{}-prepared", std::process::id());
    let iso = TestIsolator(
        Isolator::new(IsolatorConfig {
            cgroup_root: root.clone(),
            ..Default::default()
        })
        .unwrap(),
    );
    let spec = SandboxSpec {
        name: "prep".into(),
        program: "/bin/sh".into(),
        args: vec!["-c".into(), "exit 7".into()],
        ..Default::default()
    };
    let prepared = iso.prepare(&spec).unwrap();
    // The init waits: it is alive, and the function has not run.
    let init = prepared.pid();
    assert!(std::path::Path::new(&format!("/proc/{init}")).exists());
    let mut sb = prepared.start(None).unwrap();
    assert_eq!(sb.wait_blocking().unwrap().status, ExitStatus::Exited(7));

    let unused = iso.prepare(&spec).unwrap();
    let init = unused.pid();
    drop(unused);
    assert!(
        !std::path::Path::new(&format!("/proc/{init}")).exists(),
        "init {init} survived its drop"
    );

    // A failure at exec still names the step, reported at start.
    let bad = SandboxSpec {
        program: "/var/task/missing".into(),
        ..spec
    };
    let err = iso.prepare(&bad).unwrap().start(None).unwrap_err();
    assert!(
        err.to_string().contains("exec /var/task/missing: ENOENT"),
        "{err}"
    );
    iso.remove_root().unwrap();
    for h in std::fs::read_dir("/sys/fs/cgroup")
        .unwrap()
        .filter_map(|e| e.ok())
    {
        assert!(
            !h.path().join(&root).exists(),
            "cgroup left in {}",
            h.path().display()
        );
    }
}

/// A function that prints its late variable `REQ` and exits with `code`.
fn prints_its_late_variable(name: &str, code: i32) -> SandboxSpec {
    SandboxSpec {
        name: name.into(),
        program: "/bin/sh".into(),
        args: vec!["-c".into(), format!("printf %s \"$REQ\"; exit {code}")],
        late_env: Some("REQ".into()),
        stdio: isolate::StdioSpec {
            stdout: isolate::Stdio::Piped,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Starts a prepared sandbox with `value` as its late variable: what it printed, how it ended.
fn start_and_read(prepared: isolate::PreparedSandbox, value: &str) -> (String, ExitStatus) {
    let mut sb = prepared.start(Some(value)).unwrap();
    let out = std::fs::File::from(sb.take_stdout().unwrap());
    let text = std::io::read_to_string(out).unwrap();
    (text, sb.wait_blocking().unwrap().status)
}

#[test]
fn a_prepared_sandbox_gets_its_late_variable_at_start() {
    require_root();
    let iso = isolator("late");
    let spec = prints_its_late_variable("late", 0);
    for value in ["4b2f-request-1", ""] {
        let got = start_and_read(iso.prepare(&spec).unwrap(), value);
        assert_eq!(got, (value.to_string(), ExitStatus::Exited(0)));
    }
    assert!(
        iso.prepare(&spec)
            .unwrap()
            .start(Some(&"x".repeat(300)))
            .is_err()
    );
    iso.remove_root().unwrap();
}

/// One run of a reusable sandbox: `input` on stdin; what it printed on stdout and stderr, and
/// how it ended (None: the sandbox itself ended).
async fn run_once(
    sb: &mut isolate::ReusableSandbox,
    request: &str,
    input: &str,
) -> isolate::Result<(String, String, Option<isolate::FunctionEnd>)> {
    run_with(sb, request, input, &[]).await
}

/// [`run_once`] with variables of the run's own.
async fn run_with(
    sb: &mut isolate::ReusableSandbox,
    request: &str,
    input: &str,
    env: &[(String, String)],
) -> isolate::Result<(String, String, Option<isolate::FunctionEnd>)> {
    use std::io::Write;
    let pipes = sb.run(Some(request), env)?;
    let mut stdin = std::fs::File::from(pipes.stdin);
    let _ = stdin.write_all(input.as_bytes());
    drop(stdin);
    let out = std::fs::File::from(pipes.stdout);
    let err = std::fs::File::from(pipes.stderr);
    let (out, err) = tokio::task::spawn_blocking(move || {
        (
            std::io::read_to_string(out).unwrap(),
            std::io::read_to_string(err).unwrap(),
        )
    })
    .await
    .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), sb.run_ended())
        .await
        .expect("a run ends within 10 s")?;
    Ok((out, err, end))
}

/// A run started before its input is known (its start-up done ahead), then cancelled: its
/// process and what it started are killed, and the sandbox serves the next run.
#[tokio::test]
async fn a_run_started_ahead_can_be_cancelled_and_the_sandbox_serves_the_next() {
    require_root();
    let iso = isolator("cancel");
    // Says whether the child of the run before still lives, leaves one of its own, then
    // waits for its input.
    let script = r#"old=none; [ -e /tmp/child ] && { old=dead; kill -0 "$(cat /tmp/child)" 2>/dev/null && old=alive; }
sleep 1000 >/dev/null 2>&1 </dev/null & echo $! > /tmp/child
read -r line
printf '%s %s %s' "${REQ:-none}" "$line" "$old""#;
    let spec = SandboxSpec {
        name: "cancel".into(),
        program: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        late_env: Some("REQ".into()),
        reusable: true,
        ..Default::default()
    };
    let mut sb = iso.prepare(&spec).unwrap().into_reusable().unwrap();
    let init = sb.sandbox().pid();
    assert!(!sb.has_run());
    // Started ahead with no request id; cancelled while it waits on stdin.
    let pipes = sb.run(None, &[]).unwrap();
    assert!(sb.has_run());
    std::thread::sleep(Duration::from_millis(100));
    let end = cancel(&mut sb).await.unwrap();
    assert_eq!(
        end,
        Some(isolate::FunctionEnd {
            status: ExitStatus::Signaled(libc::SIGKILL),
            oom_killed: false,
        })
    );
    assert!(!sb.has_run());
    drop(pipes);
    // The next run is a new process, and the child the cancelled one left is gone.
    let got = run_once(&mut sb, "r2", "quick\n").await.unwrap();
    assert_eq!(got.0, "r2 quick dead");
    // A run that ended by itself before the cancel is only reported; no signal is left over
    // for the run after it.
    let pipes = sb.run(Some("r3"), &[]).unwrap();
    drop(pipes.stdin);
    std::thread::sleep(Duration::from_millis(300));
    let end = cancel(&mut sb).await.unwrap().unwrap();
    assert_eq!(end.status, ExitStatus::Exited(0));
    let got = run_once(&mut sb, "r4", "quick\n").await.unwrap();
    assert_eq!(got.0, "r4 quick dead");
    assert_eq!(got.2.unwrap().status, ExitStatus::Exited(0));
    assert!(cancel(&mut sb).await.is_err(), "no run going");
    assert_eq!((sb.runs(), sb.sandbox().pid()), (4, init));
    drop(sb);
    iso.remove_root().unwrap();
}

async fn cancel(
    sb: &mut isolate::ReusableSandbox,
) -> isolate::Result<Option<isolate::FunctionEnd>> {
    tokio::time::timeout(Duration::from_secs(10), sb.cancel_run())
        .await
        .expect("a cancelled run ends within 10 s")
}

#[tokio::test]
async fn a_reusable_sandbox_runs_its_function_again_and_nothing_of_a_run_outlives_it() {
    require_root();
    let iso = isolator("reuse");
    // Prints its request id, its input, whether /tmp kept the last run's mark, and whether the
    // process the last run left behind still lives; then does what the input says.
    let script = r#"read -r line
seen=no; [ -e /tmp/mark ] && seen=yes; touch /tmp/mark
left=none; [ -e /tmp/leftover ] && { left=dead; kill -0 "$(cat /tmp/leftover)" 2>/dev/null && left=alive; }
printf '%s %s %s %s' "$REQ" "$line" "$seen" "$left"
echo "err of $REQ" >&2
case "$line" in
  leave) sleep 1000 >/dev/null 2>&1 </dev/null & echo $! > /tmp/leftover ;;
  fail) exit 3 ;;
  crash) kill -9 $$ ;;
  hog) exec python3 -c 'b = bytearray(256 << 20); print(len(b))' ;;
  env) printf ' %s/%s' "${GREETING:-unset}" "${CE_TYPE:-unset}" ;;
esac"#;
    let spec = SandboxSpec {
        name: "reuse".into(),
        program: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        late_env: Some("REQ".into()),
        reusable: true,
        limits: Limits {
            memory_bytes: Some(64 << 20),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut spec = spec;
    spec.env.insert("GREETING".into(), "base".into());
    let mut sb = iso.prepare(&spec).unwrap().into_reusable().unwrap();
    let init = sb.sandbox().pid();
    let ok = |status| {
        Some(isolate::FunctionEnd {
            status,
            oom_killed: false,
        })
    };

    let got = run_once(&mut sb, "r1", "leave\n").await.unwrap();
    assert_eq!(
        got,
        (
            "r1 leave no none".into(),
            "err of r1\n".into(),
            ok(ExitStatus::Exited(0))
        )
    );
    // The sleep the first run left was killed before the run was said to end.
    let got = run_once(&mut sb, "r2", "look\n").await.unwrap();
    assert_eq!(got.0, "r2 look yes dead");
    assert_eq!(got.2, ok(ExitStatus::Exited(0)));
    let got = run_once(&mut sb, "r3", "fail\n").await.unwrap();
    assert_eq!(got.2, ok(ExitStatus::Exited(3)));
    let got = run_once(&mut sb, "r4", "crash\n").await.unwrap();
    assert_eq!(got.2, ok(ExitStatus::Signaled(9)));
    let got = run_once(&mut sb, "r5", "hog\n").await.unwrap();
    let end = got.2.expect("the sandbox outlives its run's OOM kill");
    assert!(end.oom_killed, "{end:?}");
    // The OOM kill was the last run's only.
    let got = run_once(&mut sb, "a-much-longer-request-id-6", "look\n")
        .await
        .unwrap();
    assert_eq!(got.0, "a-much-longer-request-id-6 look yes dead");
    assert_eq!(got.2, ok(ExitStatus::Exited(0)));
    assert_eq!((sb.runs(), sb.sandbox().pid()), (6, init));

    // A run's own variables, over the spec's of the same name, for that run only.
    let own = [
        ("CE_TYPE".to_string(), "order.created".to_string()),
        ("GREETING".to_string(), "call".to_string()),
    ];
    let got = run_with(&mut sb, "r7", "env\n", &own).await.unwrap();
    assert_eq!(got.0, "r7 env yes dead call/order.created");
    let got = run_once(&mut sb, "r8", "env\n").await.unwrap();
    assert_eq!(got.0, "r8 env yes dead base/unset");
    // A bad one starts no run.
    let bad = [("A=B".to_string(), "v".to_string())];
    assert!(sb.run(Some("r9"), &bad).is_err());
    let many: Vec<(String, String)> = (0..65).map(|i| (format!("V{i}"), "x".into())).collect();
    assert!(sb.run(Some("r9"), &many).is_err());
    let big = [("BIG".to_string(), "x".repeat(9000))];
    assert!(sb.run(Some("r9"), &big).is_err());
    assert_eq!(sb.runs(), 8);

    // One run at a time.
    let _pipes = sb.run(Some("r10"), &[]).unwrap();
    assert!(sb.run(Some("r11"), &[]).is_err());
    // A killed sandbox says so instead of a status, and ends.
    sb.kill().unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), sb.run_ended())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(end, None);
    let mut ended = sb.into_sandbox();
    tokio::time::timeout(Duration::from_secs(5), ended.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(!Path::new(&format!("/proc/{init}")).exists());

    // A run whose program is missing names the step, and the sandbox serves the next.
    let missing = SandboxSpec {
        program: "/var/task/missing".into(),
        ..spec.clone()
    };
    let mut sb = iso.prepare(&missing).unwrap().into_reusable().unwrap();
    for _ in 0..2 {
        let err = run_once(&mut sb, "r", "").await.unwrap_err();
        assert!(
            err.to_string().contains("exec /var/task/missing: ENOENT"),
            "{err}"
        );
    }
    drop(sb);

    // The two kinds do not mix.
    let plain = SandboxSpec {
        reusable: false,
        ..spec.clone()
    };
    assert!(iso.prepare(&plain).unwrap().into_reusable().is_err());
    assert!(iso.prepare(&spec).unwrap().start(Some("x")).is_err());
    iso.remove_root().unwrap();
}

/// A function that connects to its Runtime-API-style listener on 127.0.0.1:9001 (inside its
/// own namespace), says hello and exits 0 once told ok.
fn talking_spec(name: &str) -> SandboxSpec {
    SandboxSpec {
        name: name.into(),
        program: "/bin/bash".into(),
        args: vec![
            "-c".into(),
            "exec 3<>/dev/tcp/127.0.0.1/9001; echo hello-from-inside >&3; read -r answer <&3; [ \"$answer\" = ok ]".into(),
        ],
        loopback_listener: Some(9001),
        ..Default::default()
    }
}

/// The host's side of [`talking_spec`]: the listener is not reachable from the host's loopback,
/// the function connects to it, says hello and is told ok.
async fn converse(sb: &mut isolate::Sandbox) {
    let listener = sb.take_listener().expect("a listener");
    assert!(
        std::net::TcpStream::connect(listener.local_addr().unwrap()).is_err(),
        "the sandbox's socket must not be reachable from the host's loopback"
    );
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let (mut conn, _) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
        .await
        .expect("the function connects over its lo")
        .unwrap();
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut line = String::new();
    tokio::io::BufReader::new(&mut conn)
        .read_line(&mut line)
        .await
        .unwrap();
    assert_eq!(line, "hello-from-inside\n");
    conn.write_all(b"ok\n").await.unwrap();
}

/// The loopback listener lives in the sandbox's own network namespace: the function reaches it
/// on 127.0.0.1, the host's loopback does not, and the watch sees the sandbox end.
#[tokio::test]
async fn a_loopback_listener_is_served_from_the_host_side() {
    require_root();
    let iso = isolator("listen");
    let spec = talking_spec("listen");
    for prepared in [false, true] {
        let mut sb = if prepared {
            iso.prepare(&spec).unwrap().start(None).unwrap()
        } else {
            iso.spawn(&spec).unwrap()
        };
        let watch = sb.watch().unwrap();
        converse(&mut sb).await;
        tokio::time::timeout(Duration::from_secs(5), watch.exited())
            .await
            .expect("the watch sees the exit")
            .unwrap();
        assert_eq!(sb.wait().await.unwrap().status, ExitStatus::Exited(0));
        // Killing through the watch after the end is harmless.
        watch.kill().unwrap();
    }
    iso.remove_root().unwrap();
}

/// The function's side of [`a_connect_to_the_loopback_port_gets_a_socket_pair`]: a blocking
/// and a non-blocking connect to 127.0.0.1:9001, TCP options on both, a connect elsewhere.
const SOCKETPAIR_CLIENT: &str = r#"
import errno, select, socket
def talk(s, word):
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    s.sendall(word.encode() + b"\n")
    print(word, s.recv(64).decode().strip(), s.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN))
s = socket.create_connection(("127.0.0.1", 9001))
talk(s, "blocking")
n = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
r = n.connect_ex(("127.0.0.1", 9001))
select.select([], [n], [], 5)
print("nonblocking-connect", r in (0, errno.EINPROGRESS), n.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
n.setblocking(True)
talk(n, "nonblocking")
o = socket.socket()
o.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
try:
    o.connect(("127.0.0.1", 9002))
    print("elsewhere connected")
except ConnectionRefusedError:
    print("elsewhere refused")
"#;

/// With `loopback_socketpair`, the function's connects to 127.0.0.1:9001 come out on the host
/// as Unix sockets (the TCP listener behind the same port sees nothing); TCP options on them
/// succeed; a connect to another port goes on as usual.
#[tokio::test]
async fn a_connect_to_the_loopback_port_gets_a_socket_pair() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    require_root();
    let iso = isolator("pair");
    let spec = SandboxSpec {
        name: "pair".into(),
        program: "/usr/bin/python3".into(),
        args: vec!["-c".into(), SOCKETPAIR_CLIENT.into()],
        loopback_listener: Some(9001),
        loopback_socketpair: Some(9001),
        stdio: isolate::StdioSpec {
            stdout: isolate::Stdio::Piped,
            stderr: isolate::Stdio::Piped,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut sb = iso.prepare(&spec).unwrap().start(None).unwrap();
    let err = std::fs::File::from(sb.take_stderr().unwrap());
    let errors = std::thread::spawn(move || std::io::read_to_string(err).unwrap());
    let listener = sb.take_listener().expect("a listener");
    let notifier = sb.take_connect_notifier().expect("a connect notifier");
    let answering = tokio::spawn(async move {
        let mut served = 0;
        notifier
            .answer_all(|ours| {
                // Served beside the answering: the function's next call (a TCP option) waits
                // for us before it writes.
                let mut conn = tokio::net::UnixStream::from_std(ours).unwrap();
                tokio::spawn(async move {
                    let mut line = String::new();
                    tokio::io::BufReader::new(&mut conn)
                        .read_line(&mut line)
                        .await
                        .unwrap();
                    conn.write_all(format!("ok-{}", line.trim()).as_bytes())
                        .await
                        .unwrap();
                });
                served += 1;
            })
            .await
            .unwrap();
        served
    });
    let out = std::fs::File::from(sb.take_stdout().unwrap());
    let text = tokio::task::spawn_blocking(move || std::io::read_to_string(out).unwrap())
        .await
        .unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(10), sb.wait())
        .await
        .expect("the function ends")
        .unwrap();
    let errors = errors.join().unwrap();
    assert_eq!(
        (outcome.status, errors.as_str()),
        (ExitStatus::Exited(0), ""),
        "printed: {text}"
    );
    assert_eq!(
        text,
        format!(
            "blocking ok-blocking {unix}\nnonblocking-connect True 0\nnonblocking ok-nonblocking {unix}\nelsewhere refused\n",
            unix = libc::AF_UNIX
        )
    );
    let served = tokio::time::timeout(Duration::from_secs(5), answering)
        .await
        .expect("the listener closes once the sandbox is gone")
        .unwrap();
    assert_eq!(served, 2);
    listener.set_nonblocking(true).unwrap();
    assert_eq!(
        listener.accept().unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "no connection may reach the TCP listener"
    );
    iso.remove_root().unwrap();
}

/// A group is removed after its sandbox ends without reading it first; a process still in it
/// (one the sandbox's pid namespace did not hold: here a host process the test moved in) makes
/// the removal kill it, and the group still goes.
#[test]
fn a_group_still_busy_after_its_sandbox_ends_is_killed_and_removed() {
    require_root();
    let iso = isolator("busy");
    let mut spec = sleeper("busy");
    spec.args = vec!["1".into()];
    let mut sb = iso.spawn(&spec).unwrap();
    let dir = PathBuf::from(sb.cgroup_path().unwrap());
    let mut stray = std::process::Command::new("/bin/sleep")
        .arg("30")
        .spawn()
        .unwrap();
    // Into the sandbox's group in every hierarchy it has (v1: one per controller mount).
    let groups: Vec<PathBuf> = if iso.cgroup_version() == CgroupVersion::V2 {
        vec![dir.clone()]
    } else {
        std::fs::read_dir("/sys/fs/cgroup")
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| {
                e.path()
                    .join(dir.strip_prefix("/sys/fs/cgroup/memory").unwrap_or(&dir))
            })
            .filter(|p| p.is_dir())
            .collect()
    };
    assert!(!groups.is_empty(), "no group found for {}", dir.display());
    for g in &groups {
        std::fs::write(g.join("cgroup.procs"), stray.id().to_string()).unwrap();
    }
    let out = sb.wait_blocking().unwrap();
    assert_eq!(out.status, ExitStatus::Exited(0));
    for g in &groups {
        assert!(!g.exists(), "{} left behind", g.display());
    }
    let status = stray.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL),
        "{status:?}"
    );
    iso.remove_root().unwrap();
}

/// Sandboxes spawned while network namespaces wait made ahead: each gets one of its own (not
/// the host's, not another sandbox's), its lo is up (the function reaches its Runtime-API-style
/// listener on 127.0.0.1), and the host's loopback does not reach into it.
#[tokio::test]
async fn sandboxes_from_the_netns_pool_each_get_a_fresh_namespace_with_lo_up() {
    require_root();
    let root = format!("fnlet-test-{}-netpool", std::process::id());
    let iso = TestIsolator(
        Isolator::new(IsolatorConfig {
            cgroup_root: root,
            netns_pool: 2,
            ..Default::default()
        })
        .unwrap(),
    );
    assert_eq!(
        iso.netns_ready(),
        0,
        "nothing is made before the first spawn"
    );
    let spec = talking_spec("netpool");
    let host = std::fs::metadata("/proc/self/ns/net").unwrap();
    let mut seen = std::collections::HashSet::new();
    let mut held = Vec::new();
    for round in 0..5 {
        if round > 0 {
            // Made ahead by now: this spawn joins one rather than creating its own.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while iso.netns_ready() < 2 {
                assert!(std::time::Instant::now() < deadline, "the pool stays empty");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let mut sb = if round % 2 == 0 {
            iso.spawn(&spec).unwrap()
        } else {
            iso.prepare(&spec).unwrap().start(None).unwrap()
        };
        use std::os::unix::fs::MetadataExt;
        // Held open to the end, so that no namespace's inode number is freed and reused.
        let ns = std::fs::File::open(format!("/proc/{}/ns/net", sb.pid())).unwrap();
        let ino = ns.metadata().unwrap().ino();
        assert_ne!(ino, host.ino(), "round {round}: the host's namespace");
        assert!(seen.insert(ino), "round {round}: a namespace used twice");
        held.push(ns);
        converse(&mut sb).await;
        assert_eq!(sb.wait().await.unwrap().status, ExitStatus::Exited(0));
    }
    iso.remove_root().unwrap();
}

/// `function_ended` gives the function's status as soon as it has exited, before the init is
/// reaped and the cgroup removed (that is `wait`'s, which then says the same); a sandbox whose
/// init is killed says nothing there, and `wait` tells.
#[tokio::test]
async fn the_functions_end_is_known_before_the_sandbox_is_torn_down() {
    require_root();
    let iso = isolator("ended");
    let spec = SandboxSpec {
        name: "ended".into(),
        program: "/bin/sh".into(),
        args: vec!["-c".into(), "exit 3".into()],
        ..Default::default()
    };
    for prepared in [false, true] {
        let mut sb = if prepared {
            iso.prepare(&spec).unwrap().start(None).unwrap()
        } else {
            iso.spawn(&spec).unwrap()
        };
        let group = sb.cgroup_path().expect("a cgroup").to_string();
        let ended = tokio::time::timeout(Duration::from_secs(5), sb.function_ended())
            .await
            .expect("the end is reported")
            .unwrap()
            .expect("the init says how the function ended");
        assert_eq!(ended.status, ExitStatus::Exited(3));
        assert!(!ended.oom_killed);
        assert!(
            Path::new(&group).exists(),
            "the cgroup {group} is removed by wait, not before"
        );
        // Asked again: the same answer, from what was read.
        let again = sb.function_ended().await.unwrap().unwrap();
        assert_eq!(again.status, ExitStatus::Exited(3));
        let outcome = sb.wait().await.unwrap();
        assert_eq!(outcome.status, ExitStatus::Exited(3));
        assert!(!Path::new(&group).exists(), "{group} left after wait");
    }

    let mut sb = iso.spawn(&sleeper("ended-killed")).unwrap();
    sb.kill().unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), sb.function_ended())
        .await
        .expect("a killed init closes the pipe")
        .unwrap();
    assert!(ended.is_none(), "{ended:?}");
    assert_eq!(
        sb.wait().await.unwrap().status,
        ExitStatus::Signaled(libc::SIGKILL)
    );
    iso.remove_root().unwrap();
}

/// The parent pid of `pid`, from /proc.
fn ppid_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

/// Sandboxes cloned by the spawn helper are the caller's children (waitpid, pidfd and the
/// Sandbox as before), get their stdio, listener, late variable and named failures, and when
/// the helper is lost the caller clones them itself. Dropping the isolator ends the helper.
#[tokio::test]
async fn sandboxes_cloned_by_the_spawn_helper_are_the_callers_children() {
    require_root();
    let root = format!("fnlet-test-{}-spawner", std::process::id());
    let mut iso = TestIsolator(
        Isolator::new(IsolatorConfig {
            cgroup_root: root.clone(),
            ..Default::default()
        })
        .unwrap(),
    );
    iso.use_spawner(isolate::spawner::Spawner::start().unwrap())
        .unwrap();
    let helper = iso.spawner_pid().expect("a helper");
    assert_eq!(ppid_of(helper), std::process::id());
    // Named by the helper itself once it runs (cosmetic, for ps and pgrep).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(format!("/proc/{helper}/comm")).unwrap() != "fnlet-spawner\n" {
        assert!(
            std::time::Instant::now() < deadline,
            "the helper never named itself"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    // A spawn: ours to wait for, with its exit status.
    let spec = prints_its_late_variable("helped", 7);
    let mut sb = iso.spawn(&sleeper("helped-sleeper")).unwrap();
    assert_eq!(ppid_of(sb.pid()), std::process::id(), "init is our child");
    assert_eq!(killed(&mut sb).await.status, ExitStatus::Signaled(9));

    // Prepared, with the late variable and piped stdout.
    let prepared = iso.prepare(&spec).unwrap();
    assert_eq!(ppid_of(prepared.pid()), std::process::id());
    let got = start_and_read(prepared, "req-42");
    assert_eq!(got, ("req-42".to_string(), ExitStatus::Exited(7)));

    // The loopback listener of a prepared sandbox.
    let mut sb = iso.spawn(&talking_spec("helped-talk")).unwrap();
    converse(&mut sb).await;
    let out = tokio::time::timeout(Duration::from_secs(5), sb.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status, ExitStatus::Exited(0));

    // A failure still names its step and path.
    let bad = SandboxSpec {
        program: "/var/task/missing".into(),
        ..spec.clone()
    };
    let err = iso.spawn(&bad).unwrap_err();
    assert!(
        err.to_string().contains("exec /var/task/missing: ENOENT"),
        "{err}"
    );
    let err = iso.prepare(&bad).unwrap().start(None).unwrap_err();
    assert!(
        err.to_string().contains("exec /var/task/missing: ENOENT"),
        "{err}"
    );

    // The helper lost: spawns go on, cloned here.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(helper as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(format!("/proc/{helper}/stat"))
        .unwrap()
        .contains(") Z ")
    {
        assert!(std::time::Instant::now() < deadline, "helper did not die");
        std::thread::sleep(Duration::from_millis(10));
    }
    let got = start_and_read(iso.prepare(&spec).unwrap(), "after");
    assert_eq!(got, ("after".to_string(), ExitStatus::Exited(7)));
    assert_eq!(iso.spawner_pid(), None, "the lost helper is no longer used");

    iso.remove_root().unwrap();
    drop(iso);
    assert!(
        !std::path::Path::new(&format!("/proc/{helper}")).exists(),
        "the helper {helper} was not reaped"
    );
}

/// A helper whose caller drops it exits and is reaped; its sandboxes live on as the caller's.
#[test]
fn a_dropped_spawn_helper_exits_and_leaves_its_sandboxes_running() {
    require_root();
    let root = format!("fnlet-test-{}-spawner-drop", std::process::id());
    let spawner = isolate::spawner::Spawner::start().unwrap();
    let helper = spawner.pid();
    let mut iso = TestIsolator(
        Isolator::new(IsolatorConfig {
            cgroup_root: root,
            ..Default::default()
        })
        .unwrap(),
    );
    iso.use_spawner(spawner).unwrap();
    let mut sb = iso.spawn(&sleeper("outlives")).unwrap();
    // Swap the helper out: the old one is dropped (and reaped) while the sandbox runs.
    iso.use_spawner(isolate::spawner::Spawner::start().unwrap())
        .unwrap();
    assert!(
        !std::path::Path::new(&format!("/proc/{helper}")).exists(),
        "the dropped helper {helper} was not reaped"
    );
    assert!(std::path::Path::new(&format!("/proc/{}", sb.pid())).exists());
    sb.kill().unwrap();
    let out = sb.wait_blocking().unwrap();
    assert_eq!(out.status, ExitStatus::Signaled(9));
    iso.remove_root().unwrap();
}

/// The scheduling policy of `pid` (`/proc/<pid>/stat` field 41: 0 SCHED_OTHER, 3 SCHED_BATCH).
fn policy(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command's closing parenthesis start at field 3.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    after.split(' ').nth(41 - 3).unwrap().parse().unwrap()
}

/// The function's process: init's child.
fn function_pid(init: u32) -> u32 {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let children =
            std::fs::read_to_string(format!("/proc/{init}/task/{init}/children")).unwrap();
        if let Some(pid) = children.split_whitespace().next() {
            return pid.parse().unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "init {init} has no child"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test]
async fn batch_scheduling_puts_init_and_the_function_under_sched_batch() {
    require_root();
    let iso = isolator("batch");
    for (batch, want) in [(true, libc::SCHED_BATCH), (false, libc::SCHED_OTHER)] {
        let mut sb = iso
            .spawn(&SandboxSpec {
                batch_scheduling: batch,
                ..sleeper("batch")
            })
            .unwrap();
        let init = sb.pid();
        assert_eq!(
            policy(init),
            want as u32,
            "init, batch_scheduling = {batch}"
        );
        assert_eq!(
            policy(function_pid(init)),
            want as u32,
            "the function, batch_scheduling = {batch}"
        );
        assert_eq!(killed(&mut sb).await.status, ExitStatus::Signaled(9));
    }
    iso.remove_root().unwrap();
}

/// The CPUs a task may run on (`Cpus_allowed_list` in /proc), e.g. "0-1".
fn allowed_cpus(tid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string()
}

fn pin_this_thread(cpus: &[usize]) {
    let mut set = nix::sched::CpuSet::new();
    for &c in cpus {
        set.set(c).unwrap();
    }
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
}

#[tokio::test]
async fn a_sandbox_starts_on_the_cpus_of_its_spec_and_moves_when_told() {
    require_root();
    let n = std::thread::available_parallelism().unwrap().get();
    assert!(
        n >= 2,
        "this test needs two CPUs; this machine gives it {n}"
    );
    let iso = isolator("cpus");
    // Cloned by a thread pinned to CPU 0 (as the agent's HTTP threads are).
    pin_this_thread(&[0]);
    let mut inherits = iso.spawn(&sleeper("cpus")).unwrap();
    let mut sb = iso
        .spawn(&SandboxSpec {
            cpus: Some(vec![1]),
            ..sleeper("cpus")
        })
        .unwrap();
    pin_this_thread(&(0..n).collect::<Vec<_>>());
    let init = inherits.pid();
    assert_eq!(
        allowed_cpus(function_pid(init)),
        "0",
        "no cpus: the cloning thread's"
    );
    assert_eq!(killed(&mut inherits).await.status, ExitStatus::Signaled(9));

    let (init, function) = (sb.pid(), function_pid(sb.pid()));
    assert_eq!(allowed_cpus(init), "1", "init starts on the spec's CPUs");
    assert_eq!(allowed_cpus(function), "1", "and so does the function");
    let watch = sb.watch().unwrap();
    assert_eq!(
        watch.set_cpus(&[0, 1]).unwrap(),
        2,
        "init's and the function's thread"
    );
    assert_eq!(
        (allowed_cpus(init), allowed_cpus(function)),
        ("0-1".into(), "0-1".into())
    );
    watch.set_cpus(&[0]).unwrap();
    assert_eq!(
        (allowed_cpus(init), allowed_cpus(function)),
        ("0".into(), "0".into())
    );
    assert!(matches!(
        watch.set_cpus(&[]),
        Err(isolate::IsolateError::InvalidSpec { field: "cpus", .. })
    ));
    assert_eq!(killed(&mut sb).await.status, ExitStatus::Signaled(9));
    iso.remove_root().unwrap();
}
