//! What the bench targets share: counts from the environment, locating the release binaries,
//! running a quiet subprocess, statistics and formatting, the machine header, the CPU time of
//! processes, and removing cgroup directories. Each target uses a part of it.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A count from the environment, or `default`.
pub fn env_count(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// A binary of the workspace's release build, `<target>/release/<name>`: a bench runs as
/// `<target>/release/deps/<bench>-<hash>`. `env_var`, when set, names it instead.
pub fn release_binary(name: &str, env_var: &str, build: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env_var) {
        return p.into();
    }
    let exe = std::env::current_exe().expect("locating the bench executable");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the bench executable lives in <target>/<profile>/deps");
    let path = profile_dir.join(name);
    if !path.is_file() {
        eprintln!(
            "{} is missing: build it first with `{build}` (benches/run.sh does), or point \
             {env_var} at one",
            path.display()
        );
        std::process::exit(1);
    }
    path
}

/// `<target>/release/fnlet` (or `FNLET_BIN`).
pub fn fnlet_binary() -> PathBuf {
    release_binary("fnlet", "FNLET_BIN", "cargo build --release -p fnlet")
}

/// Runs a command with all three streams on /dev/null; on failure, runs it once more with
/// stderr captured so the error says why.
pub fn run_quiet(cmd: &mut Command) -> Result<(), String> {
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("{}: {e}", cmd.get_program().to_string_lossy()))?;
    if status.success() {
        return Ok(());
    }
    let again = cmd.stderr(Stdio::piped()).output();
    let stderr = again
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .unwrap_or_default();
    Err(format!("{status}: {stderr}"))
}

pub fn which(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

// ---------------------------------------------------------------------------------------------
// contenders, measured round by round

/// One run of a contender; the argument is the round number (`usize::MAX - 1` for the trial).
pub type RunFn<'a> = Box<dyn FnMut(usize) -> Result<(), String> + 'a>;

pub struct Contender<'a> {
    pub name: String,
    pub what: String,
    pub run: RunFn<'a>,
    /// Runs right after each run, untimed (say, preparing what the next run starts from).
    pub untimed_after: Option<RunFn<'a>>,
    /// One per timed round, in round order: sample i of every contender comes from round i.
    pub samples: Vec<Duration>,
}

impl<'a> Contender<'a> {
    pub fn new(name: &str, what: &str, run: RunFn<'a>) -> Self {
        Contender {
            name: name.into(),
            what: what.into(),
            run,
            untimed_after: None,
            samples: Vec::new(),
        }
    }

    pub fn untimed_after(mut self, after: RunFn<'a>) -> Self {
        self.untimed_after = Some(after);
        self
    }

    /// One run, timed, then the untimed part.
    fn run_once(&mut self, i: usize) -> Result<Duration, String> {
        let t = Instant::now();
        (self.run)(i)?;
        let d = t.elapsed();
        if let Some(after) = &mut self.untimed_after {
            after(i)?;
        }
        Ok(d)
    }
}

/// One trial run each: a contender that cannot run here is left out, and returned with why.
pub fn trial(contenders: &mut Vec<Contender>) -> Vec<(String, String)> {
    let mut failed = Vec::new();
    contenders.retain_mut(|c| match c.run_once(usize::MAX - 1) {
        Ok(_) => true,
        Err(e) => {
            failed.push((c.name.clone(), e));
            false
        }
    });
    failed
}

/// `warmup` untimed rounds, then `runs` timed ones; each round runs every contender once.
/// Panics when a run fails.
pub fn interleave(contenders: &mut [Contender], warmup: usize, runs: usize) {
    let mut rounds = Rounds::new(contenders.len());
    for i in 0..warmup + runs {
        for &k in rounds.next_order() {
            let c = &mut contenders[k];
            let d = c
                .run_once(i)
                .unwrap_or_else(|e| panic!("{} failed on run {i}: {e}", c.name));
            if i >= warmup {
                c.samples.push(d);
            }
        }
    }
}

/// The order of each round's contenders: a new one every round (seeded: runs are repeatable),
/// so what one contender leaves behind does not always land on the same neighbour. Rotating a
/// fixed order did not do that: each contender always followed the same one. On cgroup v1 that
/// mattered: a cgroup join within ~one RCU grace period of another costs ~0.1 ms, after a quiet
/// spell ~5-10 ms (the threadgroup rwsem's rcu_sync), so the library, always run right after
/// `fnlet sandbox run`, always joined warm and the CLI, after fork+exec, cold.
pub struct Rounds {
    rng: rand::rngs::StdRng,
    order: Vec<usize>,
}

impl Rounds {
    pub fn new(contenders: usize) -> Rounds {
        use rand::SeedableRng;
        Rounds {
            rng: rand::rngs::StdRng::seed_from_u64(0x5eed),
            order: (0..contenders).collect(),
        }
    }

    pub fn next_order(&mut self) -> &[usize] {
        use rand::seq::SliceRandom;
        self.order.shuffle(&mut self.rng);
        &self.order
    }
}

// ---------------------------------------------------------------------------------------------
// statistics and output

#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    pub n: usize,
    pub median: Duration,
    pub p99: Duration,
    pub min: Duration,
    pub max: Duration,
}

impl Stats {
    pub fn of(samples: &[Duration]) -> Stats {
        let mut s = samples.to_vec();
        s.sort();
        let n = s.len();
        if n == 0 {
            return Stats::default();
        }
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2
        };
        // Nearest rank.
        let p99 = s[((n * 99).div_ceil(100)).max(1) - 1];
        Stats {
            n,
            median,
            p99,
            min: s[0],
            max: s[n - 1],
        }
    }
}

pub fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

pub fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

pub fn ratio(a: Duration, b: Option<Duration>) -> String {
    match b {
        Some(b) if !b.is_zero() => format!("{:.2}x", a.as_secs_f64() / b.as_secs_f64()),
        _ => "-".into(),
    }
}

/// The 1, 5 and 15 minute load averages, as /proc/loadavg says them.
pub fn load_average() -> String {
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    load.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `fnlet <what> benchmark, <date>: <cores> cores, kernel ..., cgroup ..., load average ...`,
/// then whether cgroup migrations wait for an RCU grace period.
pub fn print_machine(what: &str) {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let v2 = isolate::cgroup::is_cgroup2_mount(Path::new("/sys/fs/cgroup"));
    let hybrid = isolate::cgroup::is_cgroup2_mount(Path::new("/sys/fs/cgroup/unified"));
    let cgroups = match (v2, hybrid) {
        (true, _) => "v2",
        (false, true) => "v1 (hybrid: v2 at /sys/fs/cgroup/unified)",
        (false, false) => "v1",
    };
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%dT%H:%M:%SZ")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!(
        "fnlet {what} benchmark, {date}: {cores} cores, kernel {}, cgroup {cgroups}, load average {}",
        kernel.trim(),
        load_average()
    );
    println!("  cgroup favordynmods: {}", favordynmods());
}

/// Whether cgroup migrations skip the RCU grace period ("favordynmods"): a mount option, or, on
/// kernels from 6.17 on, sticky until reboot once any hierarchy was mounted with it.
pub fn favordynmods() -> String {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let with: Vec<&str> = mounts
        .lines()
        .filter(|l| l.contains("cgroup") && l.contains("favordynmods"))
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    if !with.is_empty() {
        return format!("on (mounted with it: {})", with.join(", "));
    }
    let log = Command::new("dmesg")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if log.contains("favordynmods: per threadgroup rwsem mechanism can't be disabled") {
        return "on until reboot (a hierarchy was mounted with it earlier; see the kernel log)"
            .into();
    }
    // The ring buffer may have wrapped since boot, taking that message with it.
    let from_boot = log
        .lines()
        .next()
        .and_then(|l| l.strip_prefix('['))
        .and_then(|l| l.split(']').next())
        .and_then(|t| t.trim().parse::<f64>().ok())
        .is_some_and(|t| t < 1.0);
    if from_boot {
        "off (no cgroup mount has it)".into()
    } else {
        "unknown: no cgroup mount has it now, and the kernel log no longer reaches back to \
         boot to say whether an earlier mount made it stick"
            .into()
    }
}

// ---------------------------------------------------------------------------------------------
// what processes cost

/// (CPU time in ns, context switches) of a process, summed over its threads now alive
/// (/proc/<pid>/task/*/schedstat and status).
pub fn task_stats(pid: u32) -> (u64, u64) {
    let (mut ns, mut cs) = (0, 0);
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            ns += fs::read_to_string(t.path().join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0);
            let status = fs::read_to_string(t.path().join("status")).unwrap_or_default();
            cs += status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    (ns, cs)
}

/// Pids of the processes in a function's instance cgroups (`<root>/<function>-*`).
pub fn instance_pids(root: &str, function: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for base in ["/sys/fs/cgroup/pids", "/sys/fs/cgroup"] {
        let Ok(entries) = fs::read_dir(Path::new(base).join(root)) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{function}-"))
            {
                let procs = fs::read_to_string(e.path().join("cgroup.procs")).unwrap_or_default();
                pids.extend(
                    procs
                        .split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
        }
        break;
    }
    pids
}

// ---------------------------------------------------------------------------------------------
// cgroups

/// Removes `/sys/fs/cgroup/<hierarchy>/<name>` for each name in every hierarchy (deepest
/// first); returns what could not be removed.
pub fn remove_cgroup_dirs(names: &[String]) -> Vec<PathBuf> {
    let mut left = Vec::new();
    if let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") {
        for h in hierarchies.flatten() {
            for name in names {
                let dir = h.path().join(name);
                if dir.exists() {
                    remove_cgroup_tree(&dir);
                    if dir.exists() {
                        left.push(dir);
                    }
                }
            }
        }
    }
    left
}

/// Every `/sys/fs/cgroup/<hierarchy>/<entry>` whose name starts with `prefix`.
pub fn cgroup_dirs_with_prefix(prefix: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") {
        for h in hierarchies.flatten() {
            if let Ok(entries) = fs::read_dir(h.path()) {
                for e in entries.flatten() {
                    if e.file_name().to_string_lossy().starts_with(prefix) {
                        found.push(e.path());
                    }
                }
            }
        }
    }
    found
}

/// rmdir of a cgroup directory and its (empty) children, deepest first.
pub fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    for _ in 0..100 {
        if fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
