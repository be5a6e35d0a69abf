//! `fnlet sandbox run` end to end: the escape suite, the limits, the cleanup, and the errors.
//! Every test runs the real binary as root and checks that nothing is left on the host.

mod common;

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

/// Every door the probe tries; each must be reported BLOCKED.
const ATTEMPTS: &[&str] = &[
    "see host processes",
    "read host files",
    "write outside /tmp",
    "write /proc/sys and sysrq",
    "read masked /proc files",
    "mount, chroot, pivot_root",
    "unshare and clone namespaces",
    "setns into init's namespace",
    "ptrace and process_vm",
    "reach the runtime through /proc/1 (CVE-2019-5736)",
    "leaked fds (CVE-2024-21626)",
    "kernel: modules, bpf, perf, keyring, io_uring, kexec",
    "TIOCSTI",
    "i386 syscall",
    "x32 syscall",
    "raw and packet sockets",
    "network interfaces",
    "reach the host network",
    "become uid 0",
    "change hostname",
    "signal the agent",
    "device nodes",
    "exec from /tmp",
];

fn escape_suite(userns: bool, spawn_helper: bool) {
    require_root();
    let root = cgroup_root(match (userns, spawn_helper) {
        (false, false) => "escape",
        (true, false) => "escape-userns",
        (false, true) => "escape-helper",
        (true, true) => "escape-userns-helper",
    });
    let before = host_state();
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let bundle = Bundle::with_probe();
    // Something of the host's on loopback that the sandbox must not reach.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let pid = std::process::id().to_string();

    let mut flags = vec![
        "--bundle",
        bundle.path().to_str().unwrap(),
        "--name",
        "escape",
    ];
    if userns {
        flags.push("--userns");
    }
    if spawn_helper {
        flags.push("--spawn-helper");
    }
    let out = output(sandbox_run(
        &root,
        &flags,
        &["/var/task/probe", "escape", &pid, &port],
    ));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "probe failed: {out:?}\n{stdout}");

    let mut open = Vec::new();
    for name in ATTEMPTS {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("ATTEMPT {name}: ")));
        match line {
            Some(l) if l.contains(": BLOCKED: ") => {}
            Some(l) => open.push(l.to_string()),
            None => open.push(format!("ATTEMPT {name}: never reported")),
        }
    }
    assert!(
        open.is_empty(),
        "doors open in the sandbox:\n{}",
        open.join("\n")
    );
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap(),
        hostname,
        "host hostname changed"
    );
    assert_clean(&root, &before, &root);
}

#[test]
fn escape_suite_finds_every_door_closed() {
    escape_suite(false, false);
}

#[test]
fn escape_suite_finds_every_door_closed_in_a_user_namespace() {
    escape_suite(true, false);
}

/// The agent's path: the sandbox cloned by the spawn helper (a fork of the helper, not of the
/// caller), with and without a user namespace.
#[test]
fn escape_suite_finds_every_door_closed_through_the_spawn_helper() {
    escape_suite(false, true);
    escape_suite(true, true);
}

#[test]
fn a_user_namespace_maps_only_the_functions_ids_and_keeps_the_limits() {
    require_root();
    let root = cgroup_root("userns");
    let before = host_state();
    let out = output(sandbox_run(
        &root,
        &["--userns"],
        &[
            "/bin/sh",
            "-c",
            "cat /proc/self/uid_map /proc/self/gid_map; id -u",
        ],
    ));
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<Vec<String>> = text(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect();
    assert_eq!(lines[0], ["65534", "65534", "1"], "uid_map");
    assert_eq!(lines[1], ["65534", "65534", "1"], "gid_map");
    assert_eq!(lines[2], ["65534"]);
    // The cgroup is joined by the parent in this mode: the pids limit still holds.
    let bundle = Bundle::with_probe();
    let out = output(sandbox_run(
        &root,
        &[
            "--userns",
            "--bundle",
            bundle.path().to_str().unwrap(),
            "--pids",
            "16",
        ],
        &["/var/task/probe", "forkbomb"],
    ));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("fork failed after "), "{stdout} {out:?}");
    let n: usize = stdout
        .split_whitespace()
        .nth(3)
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert!(n <= 14, "{n} children under a limit of 16");
    assert_clean(&root, &before, &root);
}

#[test]
fn sees_its_own_hostname_and_cgroup_root() {
    require_root();
    let root = cgroup_root("view");
    let out = output(sandbox_run(
        &root,
        &["--name", "viewfn"],
        &["/bin/sh", "-c", "hostname; cat /proc/self/cgroup; pwd"],
    ));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.starts_with("viewfn\n"), "hostname: {stdout}");
    // The cgroup namespace is rooted at the sandbox's own group.
    assert!(stdout.contains("memory:/\n"), "cgroup view: {stdout}");
    assert!(stdout.ends_with("/var/task\n"), "cwd: {stdout}");
}

/// The root and every bind in it are read-only, nosuid and nodev (the function's uid could not
/// write most of them anyway, so the mount flags are checked, not a write's errno). Only /proc,
/// its masks, /dev's device nodes and /tmp are other mounts.
#[test]
fn the_root_and_every_bind_are_mounted_read_only() {
    require_root();
    let root = cgroup_root("readonly");
    let before = host_state();
    let bundle = tempfile::tempdir().unwrap();
    let extra = tempfile::tempdir().unwrap();
    let out = output(sandbox_run(
        &root,
        &[
            "--bundle",
            bundle.path().to_str().unwrap(),
            "--ro-bind",
            &format!("{}:/opt/extra", extra.path().display()),
        ],
        &["/bin/cat", "/proc/self/mountinfo"],
    ));
    assert!(out.status.success(), "{out:?}");
    let mountinfo = text(&out.stdout);
    let mut seen = Vec::new();
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let (point, options) = (fields[4], fields[5]);
        if point == "/proc" || point.starts_with("/proc/") || point == "/tmp" {
            continue;
        }
        let options: Vec<&str> = options.split(',').collect();
        let want: &[&str] = if point == "/dev" {
            &["ro", "nosuid"]
        } else {
            &["ro", "nosuid", "nodev"]
        };
        for flag in want {
            assert!(options.contains(flag), "{point} lacks {flag}: {line}");
        }
        seen.push(point.to_string());
    }
    for point in ["/", "/usr", "/etc/hosts", "/var/task", "/opt/extra", "/dev"] {
        assert!(
            seen.iter().any(|p| p == point),
            "{point} not mounted:\n{mountinfo}"
        );
    }
    assert_clean(&root, &before, &root);
}

/// A bind nested in another one needs a mount point inside the outer bind: it is refused
/// (the outer bind is read-only by then) and nothing is created in the host's directory.
#[test]
fn a_bind_nested_in_a_host_directory_is_refused_without_writing_there() {
    require_root();
    let root = cgroup_root("nested");
    let before = host_state();
    let outer = tempfile::tempdir().unwrap();
    let inner = tempfile::tempdir().unwrap();
    let out = output(sandbox_run(
        &root,
        &[
            "--ro-bind",
            &format!("{}:/opt/outer", outer.path().display()),
            "--ro-bind",
            &format!("{}:/opt/outer/made-here", inner.path().display()),
        ],
        &["/bin/true"],
    ));
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("/opt/outer/made-here") && stderr.contains("EROFS"),
        "{stderr}"
    );
    assert!(
        !outer.path().join("made-here").exists(),
        "the sandbox created a directory in the host's {}",
        outer.path().display()
    );
    assert_clean(&root, &before, &root);
}

#[test]
fn fork_bomb_is_contained_by_the_pids_limit() {
    require_root();
    let root = cgroup_root("forkbomb");
    let before = host_state();
    let bundle = Bundle::with_probe();
    let out = output(sandbox_run(
        &root,
        &["--bundle", bundle.path().to_str().unwrap(), "--pids", "32"],
        &["/var/task/probe", "forkbomb"],
    ));
    let stdout = text(&out.stdout);
    let n: usize = stdout
        .strip_prefix("fork failed after ")
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected probe output: {stdout:?} {out:?}"));
    // 32 pids, two of them the init and the probe.
    assert!(n <= 30, "{n} children forked under a limit of 32");
    // The host still forks fine.
    assert!(
        std::process::Command::new("/bin/true")
            .status()
            .unwrap()
            .success()
    );
    assert_clean(&root, &before, &root);
}

#[test]
fn out_of_memory_is_reported_as_such() {
    require_root();
    let root = cgroup_root("oom");
    let before = host_state();
    let bundle = Bundle::with_probe();
    let out = output(sandbox_run(
        &root,
        &[
            "--bundle",
            bundle.path().to_str().unwrap(),
            "--memory",
            "32M",
        ],
        &["/var/task/probe", "alloc", "100"],
    ));
    assert_eq!(out.status.code(), Some(137), "{out:?}");
    assert!(
        text(&out.stderr).contains("out of memory (limit 32M)"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        !text(&out.stdout).contains("allocated"),
        "allocation past the limit succeeded"
    );
    assert_clean(&root, &before, &root);
}

fn stats(stderr: &str) -> (f64, f64, f64) {
    // "fnlet: peak memory 66.3M, cpu 1.000s, wall 2.003s"
    let line = stderr
        .lines()
        .find(|l| l.starts_with("fnlet: peak memory"))
        .unwrap_or_else(|| panic!("no stats: {stderr}"));
    let field = |key: &str| -> &str {
        line.split(key)
            .nth(1)
            .and_then(|s| s.split([',', ' ']).next())
            .unwrap_or("")
    };
    let peak = field("peak memory ");
    let peak_mib = if let Some(m) = peak.strip_suffix('M') {
        m.parse::<f64>().unwrap()
    } else if let Some(g) = peak.strip_suffix('G') {
        g.parse::<f64>().unwrap() * 1024.0
    } else {
        0.0
    };
    let secs = |s: &str| s.trim_end_matches('s').parse::<f64>().unwrap();
    (peak_mib, secs(field("cpu ")), secs(field("wall ")))
}

#[test]
fn memory_accounting_reports_the_peak() {
    require_root();
    let root = cgroup_root("peak");
    let bundle = Bundle::with_probe();
    let out = output(sandbox_run(
        &root,
        &[
            "--bundle",
            bundle.path().to_str().unwrap(),
            "--memory",
            "256M",
            "--stats",
        ],
        &["/var/task/probe", "alloc", "64"],
    ));
    assert!(out.status.success(), "{out:?}");
    let (peak, _, _) = stats(&text(&out.stderr));
    assert!(
        (64.0..200.0).contains(&peak),
        "peak {peak} MiB after touching 64 MiB"
    );
}

#[test]
fn half_a_cpu_gets_about_half_a_core() {
    require_root();
    let root = cgroup_root("cpu");
    let bundle = Bundle::with_probe();
    let out = output(sandbox_run(
        &root,
        &[
            "--bundle",
            bundle.path().to_str().unwrap(),
            "--cpus",
            "0.5",
            "--stats",
        ],
        &["/var/task/probe", "spin", "2"],
    ));
    assert!(out.status.success(), "{out:?}");
    let (_, cpu, wall) = stats(&text(&out.stderr));
    let share = cpu / wall;
    // The quota caps it at 0.5; the lower bound leaves room for a busy CI machine.
    assert!(
        (0.3..=0.6).contains(&share),
        "a spinning process under --cpus 0.5 got {share:.2} of a core ({cpu}s in {wall}s)"
    );
}

#[test]
fn tmp_is_size_limited() {
    require_root();
    let root = cgroup_root("tmp");
    let bundle = Bundle::with_probe();
    let out = output(sandbox_run(
        &root,
        &[
            "--bundle",
            bundle.path().to_str().unwrap(),
            "--tmp-size",
            "8M",
            "--memory",
            "64M",
        ],
        &["/var/task/probe", "filltmp"],
    ));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("No space left on device"), "{stdout}");
    let written: u64 = stdout
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert!(written <= 8 << 20, "wrote {written} bytes into an 8M /tmp");
}

#[test]
fn setup_failures_name_the_step_and_errno() {
    require_root();
    let root = cgroup_root("errors");
    let before = host_state();
    let out = output(sandbox_run(&root, &[], &["/var/task/nope"]));
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("exec /var/task/nope: ENOENT"),
        "{}",
        text(&out.stderr)
    );

    let out = output(sandbox_run(
        &root,
        &["--cwd", "/no/such/dir"],
        &["/bin/true"],
    ));
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("chdir /no/such/dir: ENOENT"),
        "{}",
        text(&out.stderr)
    );

    let out = output(sandbox_run(&root, &["--uid", "0"], &["/bin/true"]));
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("uid"), "{}", text(&out.stderr));

    let out = output(sandbox_run(
        &root,
        &["--ro-bind", "/no/such/src:/data"],
        &["/bin/true"],
    ));
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("/no/such/src"),
        "{}",
        text(&out.stderr)
    );
    assert_clean(&root, &before, &root);
}

#[test]
fn exit_status_and_signals_come_through() {
    require_root();
    let root = cgroup_root("status");
    let out = output(sandbox_run(&root, &[], &["/bin/sh", "-c", "exit 3"]));
    assert_eq!(out.status.code(), Some(3));
    let out = output(sandbox_run(&root, &[], &["/bin/sh", "-c", "kill -SEGV $$"]));
    assert_eq!(out.status.code(), Some(128 + 11), "{out:?}");
    assert!(
        text(&out.stderr).contains("killed by signal 11"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn stdin_and_stdout_pass_through() {
    require_root();
    let root = cgroup_root("stdio");
    let mut cmd = sandbox_run(&root, &[], &["/bin/cat"]);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let payload = "hello sandbox\n".repeat(10_000);
    let mut stdin = child.stdin.take().unwrap();
    let writer = {
        let payload = payload.clone();
        std::thread::spawn(move || stdin.write_all(payload.as_bytes()))
    };
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), payload);
}

#[test]
fn sigterm_reaches_the_function_and_everything_goes() {
    require_root();
    let root = cgroup_root("sigterm");
    let before = host_state();
    // A function that leaves a background child behind: the namespace teardown must take it.
    let mut child = sandbox_run(&root, &[], &["/bin/sh", "-c", "sleep 300 & exec sleep 300"])
        .spawn()
        .unwrap();
    let cg = std::path::PathBuf::from("/sys/fs/cgroup/pids").join(&root);
    let deadline = Instant::now() + Duration::from_secs(5);
    // Wait until both sleeps are inside the sandbox's cgroup.
    loop {
        let n: usize = std::fs::read_dir(&cg)
            .map(|it| {
                it.filter_map(|e| e.ok())
                    .filter_map(|e| std::fs::read_to_string(e.path().join("cgroup.procs")).ok())
                    .map(|s| s.lines().count())
                    .sum()
            })
            .unwrap_or(0);
        if n >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "sandbox never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + 15), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_clean(&root, &before, &root);
}
