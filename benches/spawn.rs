//! Spawn-to-exit of a trivial static binary: fnlet's full sandbox (through `fnlet sandbox run` and
//! through the isolate library) against the floor (plain fork+exec of the same binary),
//! bubblewrap and runc (and crun, when the host lets it run), interleaved in one run; then each
//! step of a sandboxed spawn alone, to say which one dominates.
//!
//! Run as root through `benches/run.sh`, which installs the peers and builds fnlet first.
//! Environment: `FNLET_BENCH_RUNS` (samples per contender and per step, default 200),
//! `FNLET_BENCH_WARMUP` (default 10), `FNLET_BIN` (default `<target>/release/fnlet`),
//! `FNLET_BENCH_NETNS_POOL` (the library contenders' `IsolatorConfig::netns_pool`, default the
//! library's; 0 to measure every spawn creating its own network namespace). The library runs
//! twice: cloning in this process, and through a spawn helper as the agent does.

#![forbid(unsafe_code)]

mod common;

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use isolate::cgroup::{CgroupBackend, CgroupMode};
use isolate::steps::{self, Namespaces, Timing};
use isolate::{Isolator, IsolatorConfig, Limits, SandboxSpec, TASK_ROOT};

use common::{
    Contender, Stats, env_count, fnlet_binary, load_average, ms, ratio, remove_cgroup_dirs,
    run_quiet, us, which,
};

/// Where the binary sits inside the bundle, and so at /var/task/true in every sandbox.
const BINARY: &str = "true";

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "the spawn benchmark creates namespaces and cgroups: run it as root (benches/run.sh)"
        );
        std::process::exit(1);
    }
    let runs = env_count("FNLET_BENCH_RUNS", 200);
    let warmup = env_count("FNLET_BENCH_WARMUP", 10);
    let pid = std::process::id();
    let fnlet = fnlet_binary();

    let work = tempfile::Builder::new()
        .prefix("fnlet-bench-")
        .tempdir()
        .expect("creating a temporary directory");
    let bundle = work.path().join("bundle");
    fs::create_dir(&bundle).expect("creating the bundle directory");
    let binary = bundle.join(BINARY);
    compile_fixture(&binary);
    // uid 65534 must reach the binary: every directory on the way is 0755.
    for dir in [work.path(), &bundle] {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).expect("chmod 0755");
    }
    let in_sandbox = format!("{TASK_ROOT}/{BINARY}");

    let mut cleanup = Cleanup {
        pid,
        runc_state: work.path().join("runc-state"),
        crun_state: work.path().join("crun-state"),
        isolators: Vec::new(),
    };

    print_machine();

    // ---- contenders ----
    let spec = SandboxSpec {
        program: in_sandbox.clone(),
        bundle: Some(bundle.clone()),
        ..Default::default()
    };
    let lib_root = format!("fnlet-bench-{pid}");
    let netns_pool = env_count(
        "FNLET_BENCH_NETNS_POOL",
        IsolatorConfig::default().netns_pool,
    );
    let isolator = Isolator::new(IsolatorConfig {
        cgroup_root: lib_root.clone(),
        netns_pool,
        ..Default::default()
    })
    .expect("Isolator::new (the library contender)");
    cleanup.isolators.push(lib_root.clone());
    // The agent's way (sandbox.spawn_helper): the same spawns, cloned by a helper process.
    let helper_root = format!("fnlet-bench-helper-{pid}");
    let mut helped = Isolator::new(IsolatorConfig {
        cgroup_root: helper_root.clone(),
        netns_pool,
        ..Default::default()
    })
    .expect("Isolator::new (the spawn helper's contender)");
    helped
        .use_spawner(isolate::spawner::Spawner::start().expect("starting the spawn helper"))
        .expect("use_spawner");
    cleanup.isolators.push(helper_root.clone());
    let cli_root = format!("fnlet-bench-cli-{pid}");
    cleanup.isolators.push(cli_root.clone());

    let binds: Vec<PathBuf> = isolate::default_runtime_binds()
        .into_iter()
        .filter(|b| b.source.exists())
        .map(|b| b.source)
        .collect();
    let bwrap_args = bwrap_args(&binds, &bundle, &in_sandbox, &spec);
    let bpf_file = work.path().join("seccomp.bpf");
    write_bpf(&bpf_file);
    let runc_bundle = work.path().join("oci");
    let oci_ready = make_oci_bundle(&runc_bundle, &binary, pid);

    let (runc_root, crun_root) = (cleanup.runc_state.clone(), cleanup.crun_state.clone());
    let mut contenders: Vec<Contender> = Vec::new();
    contenders.push(Contender::new(
        "floor: fork+exec",
        "std::process::Command spawn + wait of the binary, no isolation",
        Box::new(|_| run_quiet(&mut Command::new(&binary))),
    ));
    contenders.push(Contender::new(
        "fnlet sandbox run (CLI)",
        "full sandbox, default limits (128M, 1 cpu, 64 pids, 64M /tmp), a new fnlet process each run",
        Box::new(|_| {
            run_quiet(
                Command::new(&fnlet)
                    .args(["sandbox", "run", "--cgroup-root", &cli_root, "--bundle"])
                    .arg(&bundle)
                    .args(["--", &in_sandbox]),
            )
        }),
    ));
    contenders.push(Contender::new(
        "fnlet library (Isolator::spawn)",
        &format!(
            "the same sandbox from this process: spawn + wait_blocking, one Isolator \
             ({netns_pool} network namespaces made ahead by its thread)"
        ),
        Box::new(|_| spawn_and_wait(&isolator, &spec)),
    ));
    contenders.push(Contender::new(
        "fnlet library, spawn helper",
        &format!(
            "the same, cloned by a spawn helper process as the agent does (sandbox.spawn_helper; \
             {netns_pool} network namespaces made ahead)"
        ),
        Box::new(|_| spawn_and_wait(&helped, &spec)),
    ));
    let bwrap_ok = which("bwrap");
    if bwrap_ok {
        contenders.push(Contender::new(
            "bwrap --unshare-all",
            &format!("bwrap {}", join_args(&bwrap_args)),
            Box::new(|_| run_quiet(Command::new("bwrap").args(&bwrap_args))),
        ));
        contenders.push(Contender::new(
            "bwrap + fnlet's seccomp",
            "the same bwrap, plus --seccomp FD loading fnlet's own BPF program",
            Box::new(|_| {
                let f = fs::File::open(&bpf_file).map_err(|e| e.to_string())?;
                // Inherited by bwrap: clear close-on-exec on this fresh descriptor.
                nix::fcntl::fcntl(
                    f.as_fd(),
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                )
                .map_err(|e| e.to_string())?;
                let fd = std::os::fd::AsRawFd::as_raw_fd(&f).to_string();
                let mut args = vec![OsString::from("--seccomp"), fd.into()];
                args.extend(bwrap_args.iter().cloned());
                run_quiet(Command::new("bwrap").args(&args))
            }),
        ));
    }
    if which("runc") && oci_ready {
        contenders.push(Contender::new(
            "runc run",
            "runc run of an OCI bundle (runc spec + readonly root, caps emptied, uid 65534, \
             cgroup ns, /tmp tmpfs, the same limits); deleted on exit",
            Box::new(|i| {
                run_quiet(
                    Command::new("runc")
                        .arg("--root")
                        .arg(&runc_root)
                        .args(["run", "--bundle"])
                        .arg(&runc_bundle)
                        .arg(format!("fnlet-bench-{pid}-{i}")),
                )
            }),
        ));
    }
    if which("crun") && oci_ready {
        contenders.push(Contender::new(
            "crun run",
            "crun run of the same OCI bundle",
            Box::new(|i| {
                run_quiet(
                    Command::new("crun")
                        .arg("--root")
                        .arg(&crun_root)
                        .args(["run", "--bundle"])
                        .arg(&runc_bundle)
                        .arg(format!("fnlet-bench-crun-{pid}-{i}")),
                )
            }),
        ));
    } else {
        println!("crun: not installed or no OCI bundle; not measured");
    }

    // One trial run each: a peer that cannot run here is reported and left out.
    let failed = common::trial(&mut contenders);
    for (name, why) in &failed {
        println!("NOT MEASURED: {name}: {why}");
    }
    for required in ["floor: fork+exec", "fnlet library (Isolator::spawn)"] {
        assert!(
            contenders.iter().any(|c| c.name == required),
            "{required} failed its trial run; see above"
        );
    }

    println!("\n== spawn-to-exit, {runs} interleaved runs each after {warmup} warm-up rounds ==\n");
    let started = Instant::now();
    common::interleave(&mut contenders, warmup, runs);
    let spawn_secs = started.elapsed().as_secs_f64();
    let results: Vec<(String, String, Stats)> = contenders
        .iter()
        .map(|c| (c.name.clone(), c.what.clone(), Stats::of(&c.samples)))
        .collect();
    drop(contenders);
    print_spawn_table(&results);
    println!("(measured in {spawn_secs:.1} s)");
    for (name, what, _) in &results {
        println!("  {name}: {what}");
    }
    let median_of = |name: &str| {
        results
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, s)| s.median)
    };
    let lib_median = median_of("fnlet library (Isolator::spawn)").unwrap_or_default();
    print_goal(&results);

    // ---- each step alone ----
    println!("\n== each step alone, {runs} interleaved runs each ==\n");
    let steps_root = format!("fnlet-bench-steps-{pid}");
    cleanup.isolators.push(steps_root.clone());
    let backend = isolate::cgroup::detect(&CgroupMode::Auto, &steps_root)
        .expect("detecting the cgroup hierarchy");
    let bpf = isolate::seccomp::program();
    let mut probes = step_probes(&spec, &binary, bpf, backend.as_ref(), &fnlet, &steps_root);
    for i in 0..warmup + runs {
        let n = probes.len();
        for k in 0..n {
            let p = &mut probes[(i + k) % n];
            let timings = (p.run)(i).unwrap_or_else(|e| panic!("{} failed: {e}", p.rows[0].name));
            if i >= warmup {
                for (row, t) in p.rows.iter_mut().zip(timings) {
                    row.samples.push(t);
                }
            }
        }
    }
    let rows: Vec<StepRow> = probes.into_iter().flat_map(|p| p.rows).collect();
    print_step_table(&rows, lib_median);
    let _ = backend.remove_root();
    println!("load average at the end: {}", load_average());
    drop(isolator);
    drop(cleanup);
    drop(work);
}

// ---------------------------------------------------------------------------------------------
// contenders

/// `gcc -static -O2 benches/fixtures/true.c`: the same static binary for every contender.
fn compile_fixture(out: &Path) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/true.c");
    let status = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(out)
        .arg(&src)
        .status()
        .expect("running gcc (apt-get install gcc libc6-dev; benches/run.sh does)");
    assert!(status.success(), "gcc -static failed on {}", src.display());
    fs::set_permissions(out, fs::Permissions::from_mode(0o755)).expect("chmod 0755 the binary");
}

/// bwrap doing what fnlet's sandbox does, as far as bwrap can: the same read-only binds, the
/// bundle at /var/task, new /proc, /dev and a 64M /tmp, a read-only root, no capabilities, uid
/// and gid 65534, the same hostname, cwd and environment.
fn bwrap_args(
    binds: &[PathBuf],
    bundle: &Path,
    program: &str,
    spec: &SandboxSpec,
) -> Vec<OsString> {
    let mut a: Vec<OsString> = ["--unshare-all", "--die-with-parent"]
        .iter()
        .map(OsString::from)
        .collect();
    for b in binds {
        a.extend(["--ro-bind".into(), b.clone().into(), b.clone().into()]);
    }
    a.extend([
        "--ro-bind".into(),
        bundle.as_os_str().to_owned(),
        TASK_ROOT.into(),
    ]);
    let size = spec.tmp_size_bytes.to_string();
    for s in [
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--size",
        &size,
        "--tmpfs",
        "/tmp",
        "--remount-ro",
        "/",
        "--cap-drop",
        "ALL",
        "--uid",
        "65534",
        "--gid",
        "65534",
        "--hostname",
        "sandbox",
        "--chdir",
        TASK_ROOT,
        "--clearenv",
    ] {
        a.push(s.into());
    }
    for (k, v) in &spec.env {
        a.extend(["--setenv".into(), k.into(), v.into()]);
    }
    a.extend(["--".into(), program.into()]);
    a
}

fn join_args(args: &[OsString]) -> String {
    args.iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// fnlet's compiled seccomp program, in the raw form bwrap's --seccomp reads.
fn write_bpf(path: &Path) {
    let prog = isolate::seccomp::program();
    let mut bytes = Vec::with_capacity(prog.len() * 8);
    for ins in prog {
        bytes.extend_from_slice(&ins.code.to_ne_bytes());
        bytes.push(ins.jt);
        bytes.push(ins.jf);
        bytes.extend_from_slice(&ins.k.to_ne_bytes());
    }
    fs::write(path, bytes).expect("writing the BPF program");
}

/// An OCI bundle holding the same static binary at /true (the rootfs needs nothing else).
/// Returns false when `runc spec` is not available.
fn make_oci_bundle(dir: &Path, binary: &Path, pid: u32) -> bool {
    let rootfs = dir.join("rootfs");
    fs::create_dir_all(&rootfs).expect("creating the OCI rootfs");
    fs::copy(binary, rootfs.join(BINARY)).expect("copying the binary into the rootfs");
    let ok = Command::new("runc")
        .arg("spec")
        .current_dir(dir)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        println!("runc spec failed or runc is missing: no OCI bundle");
        return false;
    }
    let path = dir.join("config.json");
    let text = fs::read_to_string(&path).expect("reading config.json");
    let mut c: serde_json::Value = serde_json::from_str(&text).expect("parsing config.json");
    let p = &mut c["process"];
    p["terminal"] = false.into();
    p["args"] = serde_json::json!([format!("/{BINARY}")]);
    p["user"] = serde_json::json!({"uid": 65534, "gid": 65534});
    p["capabilities"] = serde_json::json!({
        "bounding": [], "effective": [], "permitted": [], "inheritable": [], "ambient": []
    });
    c["root"]["readonly"] = true.into();
    c["hostname"] = "sandbox".into();
    let linux = &mut c["linux"];
    if let Some(ns) = linux["namespaces"].as_array_mut()
        && !ns.iter().any(|n| n["type"] == "cgroup")
    {
        ns.push(serde_json::json!({"type": "cgroup"}));
    }
    // Absolute: a relative cgroupsPath is taken below runc's own cgroup.
    linux["cgroupsPath"] = format!("/fnlet-bench-runc-{pid}/c").into();
    let limits = Limits::default();
    let mem = limits.memory_bytes.unwrap_or(128 << 20);
    linux["resources"]["memory"] = serde_json::json!({"limit": mem, "swap": mem});
    linux["resources"]["cpu"] = serde_json::json!({"quota": 100_000, "period": 100_000});
    linux["resources"]["pids"] = serde_json::json!({"limit": limits.pids.unwrap_or(64)});
    if let Some(m) = c["mounts"].as_array_mut() {
        m.push(serde_json::json!({
            "destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
            "options": ["nosuid", "nodev", "noexec", "mode=1777", "size=64m"]
        }));
    }
    let out = serde_json::to_string_pretty(&c).expect("serialising config.json");
    fs::write(&path, out).expect("writing config.json");
    true
}

// ---------------------------------------------------------------------------------------------
// steps

struct StepRow {
    name: String,
    /// Whose whole-life median to subtract to get this step's marginal cost.
    baseline: Baseline,
    /// Counts when naming the dominant step (a per-spawn step, not a sum or a one-off).
    ranked: bool,
    samples: Vec<Timing>,
}

#[derive(Clone, Copy, PartialEq)]
enum Baseline {
    /// The step's own time is its cost (timed in the parent, or a part timed in the child).
    None,
    /// A child's whole life, less a plain fork's.
    Fork,
    /// Less a clone into a new network namespace.
    NetNs,
    /// Less a clone into new mount and pid namespaces.
    MountPidNs,
}

type ProbeFn<'a> = Box<dyn FnMut(usize) -> Result<Vec<Timing>, String> + 'a>;

struct Probe<'a> {
    rows: Vec<StepRow>,
    run: ProbeFn<'a>,
}

fn row(name: &str, baseline: Baseline, ranked: bool) -> StepRow {
    StepRow {
        name: name.into(),
        baseline,
        ranked,
        samples: Vec::new(),
    }
}

fn probe<'a>(rows: Vec<StepRow>, run: ProbeFn<'a>) -> Probe<'a> {
    Probe { rows, run }
}

/// 30 ms with no cgroup migration here, then a child joins a new group by writing "0" into
/// `file` in each of the group's hierarchies (on v2 the group has no join files: nothing).
fn join_after_a_quiet_spell(
    backend: &dyn CgroupBackend,
    name: &str,
    file: &str,
) -> Result<Vec<Timing>, String> {
    std::thread::sleep(Duration::from_millis(30));
    let mut g = backend
        .create(name, &Limits::default())
        .map_err(|e| e.to_string())?;
    let files: Vec<PathBuf> = g
        .join_files()
        .iter()
        .map(|f| f.with_file_name(file))
        .collect();
    let join = steps::join_cgroup(&files);
    g.remove_after_exit().map_err(|e| e.to_string())?;
    one(join)
}

fn one(t: isolate::Result<Timing>) -> Result<Vec<Timing>, String> {
    t.map(|t| vec![t]).map_err(|e| e.to_string())
}

fn timed<T, E: std::fmt::Display>(f: impl FnOnce() -> Result<T, E>) -> Result<(T, Timing), String> {
    let t = Instant::now();
    let v = f().map_err(|e| e.to_string())?;
    let d = t.elapsed();
    Ok((v, Timing { step: d, total: d }))
}

fn step_probes<'a>(
    spec: &'a SandboxSpec,
    binary: &'a Path,
    bpf: &'a [libc::sock_filter],
    backend: &'a dyn CgroupBackend,
    fnlet: &'a Path,
    steps_root: &'a str,
) -> Vec<Probe<'a>> {
    let clone_row = |name: &str, ns: Namespaces, ranked: bool| {
        probe(
            vec![row(name, Baseline::Fork, ranked)],
            Box::new(move |_| one(steps::clone(ns))),
        )
    };
    vec![
        clone_row(
            "clone3, no new namespace (plain fork)",
            Namespaces::NONE,
            false,
        ),
        clone_row("clone3 + CLONE_NEWPID", Namespaces::PID, true),
        clone_row("clone3 + CLONE_NEWNS", Namespaces::MOUNT, true),
        clone_row("clone3 + CLONE_NEWIPC", Namespaces::IPC, true),
        clone_row("clone3 + CLONE_NEWUTS", Namespaces::UTS, true),
        clone_row("clone3 + CLONE_NEWNET", Namespaces::NET, true),
        clone_row("clone3 + CLONE_NEWCGROUP", Namespaces::CGROUP, false),
        clone_row(
            "clone3 + NEWNS|NEWPID",
            Namespaces::MOUNT.union(Namespaces::PID),
            false,
        ),
        clone_row("clone3 with all six namespaces", Namespaces::ALL, false),
        probe(
            vec![row(
                "unshare(CLONE_NEWCGROUP) in the child",
                Baseline::Fork,
                true,
            )],
            Box::new(|_| one(steps::unshare_cgroup_ns())),
        ),
        probe(
            vec![row("bring lo up (in a new netns)", Baseline::NetNs, true)],
            Box::new(|_| one(steps::loopback_up())),
        ),
        probe(
            vec![
                row("cgroup create (mkdir + limits)", Baseline::None, true),
                row(
                    "join cgroup (child writes 0 to its tasks files)",
                    Baseline::Fork,
                    true,
                ),
                row(
                    "cgroup removal after exit (rmdir; a kill only if busy)",
                    Baseline::None,
                    true,
                ),
            ],
            Box::new(move |i| {
                let limits = Limits::default();
                let (mut group, create) = timed(|| backend.create(&format!("s{i}"), &limits))?;
                let join = steps::join_cgroup(&group.join_files());
                let ((), remove) = timed(|| group.remove_after_exit())?;
                Ok(vec![create, join.map_err(|e| e.to_string())?, remove])
            }),
        ),
        probe(
            vec![row(
                "join cgroup after 30 ms without a join (idle host)",
                Baseline::Fork,
                false,
            )],
            // A cold start on a quiet host: nothing has migrated a task for a while.
            Box::new(move |i| join_after_a_quiet_spell(backend, &format!("i{i}"), "tasks")),
        ),
        probe(
            vec![row(
                "the same through cgroup.procs (before 2026-12-06)",
                Baseline::Fork,
                false,
            )],
            // What the child wrote until the join went through `tasks`: the whole-process file
            // takes the kernel's threadgroup rwsem, which a quiet spell makes slow.
            Box::new(move |i| join_after_a_quiet_spell(backend, &format!("p{i}"), "cgroup.procs")),
        ),
        probe(
            vec![row(
                "join cgroup right after another join (warm)",
                Baseline::None,
                false,
            )],
            Box::new(move |i| {
                let limits = Limits::default();
                let mut a = backend
                    .create(&format!("w{i}a"), &limits)
                    .map_err(|e| e.to_string())?;
                let mut b = backend
                    .create(&format!("w{i}b"), &limits)
                    .map_err(|e| e.to_string())?;
                let warm = steps::join_cgroup_warm(&a.join_files(), &b.join_files());
                for g in [&mut a, &mut b] {
                    g.kill_all().map_err(|e| e.to_string())?;
                    g.remove().map_err(|e| e.to_string())?;
                }
                one(warm)
            }),
        ),
        probe(
            vec![row(
                "mount plan: root, binds, /proc, /dev, /tmp, pivot_root",
                Baseline::MountPidNs,
                true,
            )],
            Box::new(|_| one(steps::mount_plan(spec))),
        ),
        probe(
            vec![row(
                "drop privileges (ids, caps, nnp)",
                Baseline::Fork,
                true,
            )],
            Box::new(|_| one(steps::drop_privileges(spec.uid, spec.gid))),
        ),
        probe(
            vec![row("seccomp load (compiled BPF)", Baseline::Fork, true)],
            Box::new(|_| one(steps::seccomp_load(bpf))),
        ),
        probe(
            // Not ranked: the floor pays it too, so it is no cost of the sandbox.
            vec![row("exec the static binary", Baseline::Fork, false)],
            Box::new(|_| one(steps::exec(binary))),
        ),
        probe(
            vec![row(
                "Isolator::new (once per fnlet process)",
                Baseline::None,
                false,
            )],
            Box::new(move |_| {
                timed(|| {
                    Isolator::new(IsolatorConfig {
                        cgroup_root: steps_root.into(),
                        ..Default::default()
                    })
                })
                .map(|(_, t)| vec![t])
            }),
        ),
        probe(
            vec![row(
                "fnlet --version (CLI process start)",
                Baseline::None,
                false,
            )],
            Box::new(move |_| {
                let t = Instant::now();
                run_quiet(Command::new(fnlet).arg("--version"))?;
                let d = t.elapsed();
                Ok(vec![Timing { step: d, total: d }])
            }),
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// statistics and output

fn print_spawn_table(results: &[(String, String, Stats)]) {
    let find = |name: &str| {
        results
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, s)| s.median)
    };
    let (floor, bwrap, runc) = (
        find("floor: fork+exec"),
        find("bwrap --unshare-all"),
        find("runc run"),
    );
    println!(
        "| {:<32} | {:>4} | {:>11} | {:>9} | {:>9} | {:>9} | {:>8} | {:>8} | {:>8} |",
        "contender",
        "runs",
        "median (ms)",
        "p99 (ms)",
        "min (ms)",
        "max (ms)",
        "x floor",
        "x bwrap",
        "x runc"
    );
    println!(
        "|{:-<34}|{:->6}|{:->13}|{:->11}|{:->11}|{:->11}|{:->10}|{:->10}|{:->10}|",
        "", "", "", "", "", "", "", "", ""
    );
    for (name, _, s) in results {
        println!(
            "| {:<32} | {:>4} | {:>11} | {:>9} | {:>9} | {:>9} | {:>8} | {:>8} | {:>8} |",
            name,
            s.n,
            ms(s.median),
            ms(s.p99),
            ms(s.min),
            ms(s.max),
            ratio(s.median, floor),
            ratio(s.median, bwrap),
            ratio(s.median, runc),
        );
    }
    println!("(ratios are of medians; x runc below 0.10 meets the one-tenth goal)");
}

fn print_goal(results: &[(String, String, Stats)]) {
    let find = |name: &str| {
        results
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, s)| s.median)
    };
    let (Some(bwrap), Some(runc)) = (find("bwrap --unshare-all"), find("runc run")) else {
        println!("goal: cannot judge without both bwrap and runc");
        return;
    };
    println!("\ngoal: median at or below bwrap's, and at most a tenth of runc's");
    for name in [
        "fnlet library (Isolator::spawn)",
        "fnlet library, spawn helper",
        "fnlet sandbox run (CLI)",
    ] {
        if let Some(m) = find(name) {
            let yes = |b: bool| if b { "met" } else { "NOT met" };
            println!(
                "  {name}: {} ms vs bwrap {} ms: {}; vs runc/10 {} ms: {}",
                ms(m),
                ms(bwrap),
                yes(m <= bwrap),
                ms(runc / 10),
                yes(m <= runc / 10),
            );
        }
    }
}

fn print_step_table(rows: &[StepRow], lib_median: Duration) {
    let life = |r: &StepRow| Stats::of(&r.samples.iter().map(|t| t.total).collect::<Vec<_>>());
    let lives = |name: &str| -> Vec<f64> {
        rows.iter()
            .find(|r| r.name == name)
            .map(|r| r.samples.iter().map(|t| t.total.as_secs_f64()).collect())
            .unwrap_or_default()
    };
    let fork = lives("clone3, no new namespace (plain fork)");
    let net = lives("clone3 + CLONE_NEWNET");
    let mntpid = lives("clone3 + NEWNS|NEWPID");
    // Sample i of every row comes from the same round, so the difference is taken pairwise
    // (round by round) and its median reported: drift over the run cancels out.
    let paired = |r: &StepRow, base: &[f64]| -> f64 {
        let mut d: Vec<f64> = r
            .samples
            .iter()
            .zip(base)
            .map(|(t, b)| t.total.as_secs_f64() - b)
            .collect();
        d.sort_by(f64::total_cmp);
        d.get(d.len() / 2).copied().unwrap_or(0.0)
    };
    println!(
        "| {:<56} | {:>4} | {:>11} | {:>9} | {:>9} | {:>10} | {:>14} | {:>13} | {:>7} |",
        "step",
        "runs",
        "median (us)",
        "p99 (us)",
        "min (us)",
        "max (us)",
        "life med. (us)",
        "marginal (us)",
        "% spawn"
    );
    println!(
        "|{:-<58}|{:->6}|{:->13}|{:->11}|{:->11}|{:->12}|{:->16}|{:->15}|{:->9}|",
        "", "", "", "", "", "", "", "", ""
    );
    let mut ranked: Vec<(f64, &str)> = Vec::new();
    for r in rows {
        let step = Stats::of(&r.samples.iter().map(|t| t.step).collect::<Vec<_>>());
        let marginal = match r.baseline {
            Baseline::None => step.median.as_secs_f64(),
            Baseline::Fork => paired(r, &fork),
            Baseline::NetNs => paired(r, &net),
            Baseline::MountPidNs => paired(r, &mntpid),
        };
        if r.ranked {
            ranked.push((marginal, &r.name));
        }
        let share = if lib_median.is_zero() {
            "-".into()
        } else {
            format!("{:.1}", 100.0 * marginal / lib_median.as_secs_f64())
        };
        println!(
            "| {:<56} | {:>4} | {:>11} | {:>9} | {:>9} | {:>10} | {:>14} | {:>13} | {:>7} |",
            r.name,
            step.n,
            us(step.median),
            us(step.p99),
            us(step.min),
            us(step.max),
            us(life(r).median),
            format!("{:.1}", marginal * 1e6),
            share,
        );
    }
    println!(
        "(median..max: the step alone, timed in the child or around clone3 in the parent; life: \
         clone to reaped; marginal: median, round by round, of life less the life of the same clone \
         without the step (a plain fork, a netns, or NEWNS|NEWPID), or the step itself when timed \
         in the parent; % spawn: marginal \
         over the library's spawn-to-exit median)"
    );
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
    if let Some((cost, name)) = ranked.first() {
        print!(
            "dominant sandbox step (exec and one-offs aside): {name}, {:.1} us per spawn",
            cost * 1e6
        );
        if let Some((c2, n2)) = ranked.get(1) {
            print!("; next: {n2}, {:.1} us", c2 * 1e6);
        }
        println!();
    }
}

fn print_machine() {
    common::print_machine("spawn");
    for (tool, arg) in [
        ("bwrap", "--version"),
        ("runc", "--version"),
        ("crun", "--version"),
    ] {
        let v = Command::new(tool)
            .arg(arg)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .map(String::from)
            })
            .unwrap_or_else(|| "not installed".into());
        println!("  {tool}: {v}");
    }
    let _ = std::io::stdout().flush();
}

// ---------------------------------------------------------------------------------------------
// cleanup

/// Leaves nothing behind, even when a run panics: containers, cgroups.
struct Cleanup {
    pid: u32,
    runc_state: PathBuf,
    crun_state: PathBuf,
    /// Cgroup roots of the isolators used here.
    isolators: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (tool, state) in [("runc", &self.runc_state), ("crun", &self.crun_state)] {
            if !state.exists() {
                continue;
            }
            let list = Command::new(tool)
                .arg("--root")
                .arg(state)
                .args(["list", "-q"])
                .output();
            if let Ok(out) = list {
                for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    eprintln!("cleanup: {tool} delete -f {id}");
                    let _ = Command::new(tool)
                        .arg("--root")
                        .arg(state)
                        .args(["delete", "-f", id])
                        .status();
                }
            }
        }
        for root in &self.isolators {
            if let Ok(iso) = Isolator::new(IsolatorConfig {
                cgroup_root: root.clone(),
                ..Default::default()
            }) {
                let _ = iso.reap_stale();
                let _ = iso.remove_root();
            }
        }
        // Whatever runc (or a crashed step) left: our own directories only, deepest first.
        let mine = [
            format!("fnlet-bench-runc-{}", self.pid),
            format!("fnlet-bench-{}", self.pid),
            format!("fnlet-bench-cli-{}", self.pid),
            format!("fnlet-bench-steps-{}", self.pid),
        ];
        let left = remove_cgroup_dirs(&mine);
        for d in left {
            eprintln!("cleanup: could not remove {}", d.display());
        }
    }
}

/// One library spawn of `spec` to its end: Ok when the program exited 0.
fn spawn_and_wait(isolator: &Isolator, spec: &SandboxSpec) -> Result<(), String> {
    let mut sb = isolator.spawn(spec).map_err(|e| e.to_string())?;
    let out = sb.wait_blocking().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("exited {:?}", out.status))
    }
}
