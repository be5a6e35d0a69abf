//! What keeping `catalog.json` costs while schedules fire: every fired tick changes a
//! `schedule:ID` record in the cluster's catalog, on the host that fired it and on every host
//! its delta reaches, and each change used to rewrite the whole file.
//!
//! - fnlet: a catalog of `FNLET_BENCH_FUNCTIONS` (default 50) functions, each with a
//!   per-second schedule trigger in its manifest (as a deploy writes it) and a schedule
//!   record; each round records the next tick of every schedule (one batch, as the owner of
//!   them all fires them) and writes the file with the agent's own `write_catalog` (JSON of
//!   every entry into a temporary file renamed over `catalog.json`, no fsync). Timed: the
//!   write, over `FNLET_BENCH_RUNS` rounds (default 2,000).
//! - floor: writing and renaming the same bytes, already serialized: the file system's part.
//!
//! From the write's median it works out the cost per host at 1 s ticks: a host rewrote the
//! file once per batch it fired and once per delta a peer pushed (H rewrites a second on H
//! hosts that each own some of the schedules), and rewrites it at most once per
//! `fnlet::cluster::replica::SCHEDULE_SAVE_EVERY` now that schedule-only changes are coalesced.
//!
//! No root, no agent: `benches/run.sh catalog`. `FNLET_BENCH_DIR`: where the file is written
//! (default /var/tmp, the file system of /var/lib/fnlet on most hosts).

#![forbid(unsafe_code)]

mod common;

use std::path::PathBuf;
use std::time::Instant;

use common::{Stats, env_count, load_average, us};
use fnlet_cluster::Sha256Hash;
use fnlet_cluster::catalog::{Catalog, FunctionRecord, ScheduleRecord};
use fnlet_cluster::hlc::ntp64;

fn now() -> fnlet_cluster::hlc::NTP64 {
    ntp64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default(),
    )
}

fn main() {
    let functions = env_count("FNLET_BENCH_FUNCTIONS", 50).max(1);
    let runs = env_count("FNLET_BENCH_RUNS", 2000).max(10);
    let base =
        PathBuf::from(std::env::var("FNLET_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()));
    let dir = tempfile::Builder::new()
        .prefix("fnlet-bench-catalog-")
        .tempdir_in(&base)
        .expect("work dir");
    let path = dir.path().join("catalog.json");
    println!("catalog: {functions} functions with a per-second schedule each, {runs} rounds");
    println!("  load average before: {}", load_average());

    let mut catalog = Catalog::new("bench-host-1").expect("catalog");
    let mut ids = Vec::new();
    for i in 0..functions {
        let name = format!("function-{i:03}");
        let manifest = fnlet::manifest::Manifest::parse(&format!(
            "name = \"{name}\"\nmode = \"exec\"\nentrypoint = [\"./run.sh\"]\nmemory_mb = 128\n\
             timeout_s = 30\n\n[[triggers]]\nschedule = \"rate(1 second)\"\npayload = {{ job = \"{name}\" }}\n"
        ))
        .expect("manifest");
        let record = FunctionRecord {
            version: 3,
            manifest: serde_json::to_value(&manifest).expect("manifest JSON"),
            bundle_sha256: Sha256Hash::of(name.as_bytes()),
            size: 4096,
            deployed_by: "bench-host-1".into(),
            deployed_at_ms: 1_764_900_000_000,
        };
        catalog
            .put_function(&name, record, now())
            .expect("put_function");
        for (id, _, _) in fnlet::triggers::schedule::schedules_of(&name, &manifest) {
            ids.push(id);
        }
    }
    let mut tick_ms = 1_764_900_000_000u64;
    let mut fire_all = |catalog: &mut Catalog| {
        tick_ms += 1000;
        for id in &ids {
            let r = ScheduleRecord {
                tick_ms,
                fired_by: "bench-host-1".into(),
                fired_at_ms: tick_ms + 2,
                epoch: 0,
                removed: false,
            };
            catalog
                .fire_schedule(id, tick_ms, r, now())
                .expect("fire_schedule");
        }
    };
    fire_all(&mut catalog);
    fnlet::cluster::replica::write_catalog(&path, &catalog).expect("write");
    let size = std::fs::metadata(&path).map_or(0, |m| m.len());

    // fnlet and the floor interleaved, round by round.
    let mut fnlet_samples = Vec::with_capacity(runs);
    let mut floor_samples = Vec::with_capacity(runs);
    let floor_path = dir.path().join("floor.json");
    for _ in 0..runs {
        fire_all(&mut catalog);
        let t = Instant::now();
        fnlet::cluster::replica::write_catalog(&path, &catalog).expect("write");
        fnlet_samples.push(t.elapsed());
        let bytes = std::fs::read(&path).expect("read back");
        let t = Instant::now();
        let tmp = floor_path.with_extension("tmp");
        std::fs::write(&tmp, &bytes).expect("floor write");
        std::fs::rename(&tmp, &floor_path).expect("floor rename");
        floor_samples.push(t.elapsed());
    }
    let f = Stats::of(&fnlet_samples);
    let floor = Stats::of(&floor_samples);
    println!(
        "  catalog.json: {size} bytes ({} entries)",
        catalog.entries().count()
    );
    println!(
        "  one write:  fnlet median {} us, p99 {} us | floor (write + rename of the bytes) median {} us, p99 {} us",
        us(f.median),
        us(f.p99),
        us(floor.median),
        us(floor.p99)
    );
    let every = fnlet::cluster::replica::SCHEDULE_SAVE_EVERY;
    for hosts in [3u32, 5] {
        let before = f64::from(hosts);
        let after = (1.0 / every.as_secs_f64()).min(before);
        let cpu = |per_s: f64| per_s * f.median.as_secs_f64() * 100.0;
        println!(
            "  {hosts} hosts, 1 s ticks: {before:.0} rewrites/s per host ({:.2} % of a core, {:.0} KB/s into the page cache); coalesced: at most {after:.0}/s ({:.2} %, {:.0} KB/s)",
            cpu(before),
            before * size as f64 / 1e3,
            cpu(after),
            after * size as f64 / 1e3,
        );
    }
    println!("  load average after: {}", load_average());
    // Keeps the tempdir until here.
    drop(dir);
}
