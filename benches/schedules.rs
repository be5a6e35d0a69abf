//! Schedule firing accuracy: how long after its tick a per-second schedule's run starts, on a
//! real `fnlet agent`, beside a floor that fires the same script from a plain timer loop.
//!
//! - fnlet: an exec-mode function with `[[triggers]] schedule = "rate(1 second)"`. Its script
//!   (`#!/bin/sh`, `echo "START $(date +%s.%N) $(cat)" >&2`) logs when it started and the
//!   Scheduled Event it got; the delay is the start time less the event's `time` (the tick).
//!   The same run gives the scheduler's own part: the tick to the event stored in the queue
//!   (the time of the agent's "schedule ... fired tick" line in the function's log, written once
//!   the event is committed). A run includes the sandbox's start (a prepared one, as every exec
//!   call), so it is the delay a function sees.
//! - floor: a thread of this bench sleeps until each tick + 500 ms (between fnlet's ticks, so
//!   the two never fire at once) and fork+execs the same script, unsandboxed, with a
//!   `{"time": ...}` on its stdin; the delay is its start less that instant. It is what firing
//!   a script on time costs here with no scheduler at all.
//!
//! No peer scheduler is run: cron's granularity is a minute, and a systemd timer
//! (`OnCalendar=*:*:*`, `AccuracySec=1us`) needs systemd as PID 1, which the machines these run
//! on do not have; both are named in BENCHMARKS.md.
//!
//! Run as root through `benches/run.sh schedules` (builds fnlet first). Environment:
//! `FNLET_BENCH_SECONDS` (how long both fire, default 600: 10 minutes), `FNLET_BENCH_DIR` (where
//! the agent's state goes, default /var/tmp), `FNLET_BIN`.

#![forbid(unsafe_code)]

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Stats, env_count, fnlet_binary, load_average, ms, print_machine, ratio};

const SCRIPT: &str = "#!/bin/sh\necho \"START $(date +%s.%N) $(cat)\" >&2\necho ok\n";

fn main() {
    let seconds = env_count("FNLET_BENCH_SECONDS", 600).max(5) as u64;
    assert!(
        nix::unistd::geteuid().is_root(),
        "the agent creates namespaces and cgroups: run as root (benches/run.sh schedules)"
    );
    print_machine("schedules");
    let base =
        PathBuf::from(std::env::var("FNLET_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()));
    let work = tempfile::Builder::new()
        .prefix("fnlet-bench-schedules-")
        .tempdir_in(&base)
        .expect("work dir");
    let mut agent = start_agent(work.path());
    let floor_file = work.path().join("floor.log");
    let script = work.path().join("floor.sh");
    fs::write(&script, SCRIPT).expect("script");
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).expect("chmod");

    println!("  firing for {seconds} s: fnlet at each second, the floor at each second + 500 ms");
    let deployed = SystemTime::now();
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut floor_ticks = Vec::new();
    let mut children: Vec<Child> = Vec::new();
    while Instant::now() < end {
        // The next whole second + 500 ms.
        let now = unix_now();
        let mut at = now.floor() + 0.5;
        if at <= now {
            at += 1.0;
        }
        std::thread::sleep(Duration::from_secs_f64(at - now));
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&floor_file)
            .expect("floor log");
        let child = Command::new(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(out)
            .spawn();
        let Ok(mut child) = child else { continue };
        if let Some(mut stdin) = child.stdin.take() {
            let _ = write!(stdin, "{{\"time\": {at:.3}}}");
        }
        floor_ticks.push(at);
        children.push(child);
        children.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
    }
    for mut c in children {
        let _ = c.wait();
    }
    // The last runs' lines.
    std::thread::sleep(Duration::from_secs(2));
    let load_after = load_average();

    // fnlet: the function's log.
    let log = fs::read_to_string(work.path().join("state/logs/tick.log")).unwrap_or_default();
    let mut started = Vec::new();
    let mut stored = Vec::new();
    for l in log.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
            continue;
        };
        let line = v["line"].as_str().unwrap_or_default();
        if let Some(rest) = line.strip_prefix("START ") {
            let (at, event) = rest.split_once(' ').unwrap_or((rest, "{}"));
            let Ok(at) = at.parse::<f64>() else { continue };
            let Ok(e) = serde_json::from_str::<serde_json::Value>(event) else {
                continue;
            };
            let Some(tick) = e["time"].as_str().and_then(rfc3339_secs) else {
                continue;
            };
            if tick >= secs(deployed) + 2.0 {
                started.push(delay(at - tick));
            }
        } else if let Some(rest) = line.strip_prefix("schedule ") {
            // "schedule ID fired tick T" at the log line's ts.
            let Some(tick) = rest.split(" fired tick ").nth(1) else {
                continue;
            };
            let tick = tick.split_whitespace().next().and_then(rfc3339_secs);
            let at = v["ts"].as_str().and_then(rfc3339_secs);
            if let (Some(tick), Some(at)) = (tick, at)
                && tick >= secs(deployed) + 2.0
            {
                stored.push(delay(at - tick));
            }
        }
    }
    let floor_log = fs::read_to_string(&floor_file).unwrap_or_default();
    let mut floor = Vec::new();
    for l in floor_log.lines() {
        let Some(rest) = l.strip_prefix("START ") else {
            continue;
        };
        let (at, event) = rest.split_once(' ').unwrap_or((rest, "{}"));
        let (Ok(at), Ok(e)) = (
            at.parse::<f64>(),
            serde_json::from_str::<serde_json::Value>(event),
        ) else {
            continue;
        };
        if let Some(tick) = e["time"].as_f64() {
            floor.push(delay(at - tick));
        }
    }
    let expected = seconds.saturating_sub(3);
    println!(
        "\n  ticks: fnlet ran {} (of about {expected} due), the floor {} (fired {})",
        started.len(),
        floor.len(),
        floor_ticks.len()
    );
    println!("  load average after: {load_after}\n");
    let f = Stats::of(&floor);
    let rows = [
        ("fnlet: tick -> event stored", Stats::of(&stored)),
        ("fnlet: tick -> run starts (sandboxed)", Stats::of(&started)),
        ("floor: timer loop, fork+exec -> start", f),
    ];
    println!(
        "  {:<40} {:>6} {:>10} {:>10} {:>10} {:>10}",
        "contender", "runs", "median ms", "p99 ms", "max ms", "vs floor"
    );
    for (name, s) in rows {
        println!(
            "  {:<40} {:>6} {:>10} {:>10} {:>10} {:>10}",
            name,
            s.n,
            ms(s.median),
            ms(s.p99),
            ms(s.max),
            ratio(s.median, Some(f.median))
        );
    }
    println!(
        "\n  fnlet_schedule_fires_total: {}, misses: {}",
        metric(&agent, "fnlet_schedule_fires_total{function=\"tick\"}"),
        metric(&agent, "fnlet_schedule_misses_total{function=\"tick\"}")
    );
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(agent.child.id().to_string())
        .status();
    let _ = agent.child.wait();
}

fn delay(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

fn unix_now() -> f64 {
    secs(SystemTime::now())
}

fn secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `2026-12-05T01:02:03Z` or `...03.123456Z` to seconds since the epoch.
fn rfc3339_secs(s: &str) -> Option<f64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    Some(t.unix_timestamp_nanos() as f64 / 1e9)
}

struct Agent {
    child: Child,
    addr: String,
    token: String,
}

fn metric(agent: &Agent, name: &str) -> f64 {
    use std::io::Read;
    let Ok(mut s) = std::net::TcpStream::connect(&agent.addr) else {
        return 0.0;
    };
    let _ = write!(
        s,
        "GET /metrics HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\nconnection: close\r\n\r\n",
        agent.token
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

fn start_agent(dir: &Path) -> Agent {
    let fnlet = fnlet_binary();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let state = dir.join("state");
    let config = dir.join("config.toml");
    fs::write(
        &config,
        "shutdown_grace_s = 5.0\n[sandbox]\ncgroup_root = \"fnlet-bench-schedules\"\n\
         [cluster]\nlisten = \"127.0.0.1:0\"\n",
    )
    .expect("config");
    let out = fs::File::create(dir.join("agent.log")).expect("agent log");
    let child = Command::new(&fnlet)
        .arg("agent")
        .args(["--listen", &format!("127.0.0.1:{port}"), "--state-dir"])
        .arg(&state)
        .arg("--config")
        .arg(&config)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(out)
        .spawn()
        .expect("starting fnlet agent");
    let addr = format!("127.0.0.1:{port}");
    let t = Instant::now();
    while std::net::TcpStream::connect(&addr).is_err() {
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
    let bundle = dir.join("bundle");
    fs::create_dir(&bundle).expect("bundle dir");
    fs::write(
        bundle.join("fnlet.toml"),
        "name = \"tick\"\nentrypoint = \"run.sh\"\nmemory_mb = 32\ntimeout_s = 5\n\
         [[triggers]]\nschedule = \"rate(1 second)\"\n",
    )
    .expect("manifest");
    fs::write(bundle.join("run.sh"), SCRIPT).expect("script");
    for (p, mode) in [
        (bundle.join("run.sh"), 0o755),
        (bundle.join("fnlet.toml"), 0o644),
        (bundle.clone(), 0o755),
    ] {
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let st = Command::new(&fnlet)
        .arg("deploy")
        .arg(&bundle)
        .args(["--endpoint", &format!("http://{addr}"), "--state-dir"])
        .arg(&state)
        .stdout(Stdio::null())
        .status()
        .expect("fnlet deploy");
    assert!(st.success(), "fnlet deploy failed");
    Agent { child, addr, token }
}
