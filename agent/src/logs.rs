//! Function logs: one JSON line per output line, kept in a size-bounded file per function
//! (`<state>/logs/<name>.log`, rotated once to `.log.1`), streamed live to followers, and
//! emitted as tracing events so they reach the journal attributed to their function.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::broadcast;

#[derive(Debug, Serialize)]
pub struct LogLine<'a> {
    pub ts: String,
    pub function: &'a str,
    pub version: u64,
    pub request_id: &'a str,
    /// The sandbox the line came from (its cgroup leaf), for lines a function wrote.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<&'a str>,
    pub stream: &'a str,
    pub line: &'a str,
}

struct FnLog {
    file: Option<File>,
    size: u64,
    tx: broadcast::Sender<Arc<str>>,
}

pub struct Logs {
    dir: PathBuf,
    max_bytes: u64,
    inner: Mutex<HashMap<String, FnLog>>,
}

/// Longest line kept; longer output is cut (a function cannot fill memory through its log).
const MAX_LINE: usize = 16 * 1024;

impl Logs {
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Logs> {
        fs::create_dir_all(dir)?;
        Ok(Logs {
            dir: dir.to_path_buf(),
            max_bytes,
            inner: Mutex::new(HashMap::new()),
        })
    }

    fn path(&self, function: &str) -> PathBuf {
        self.dir.join(format!("{function}.log"))
    }

    fn with<R>(&self, function: &str, f: impl FnOnce(&mut FnLog, &Path) -> R) -> R {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map.entry(function.to_string()).or_insert_with(|| FnLog {
            file: None,
            size: fs::metadata(self.path(function))
                .map(|m| m.len())
                .unwrap_or(0),
            tx: broadcast::channel(1024).0,
        });
        f(entry, &self.path(function))
    }

    /// Appends one line; failures to write the file are logged, never fatal.
    pub fn append(&self, function: &str, version: u64, request_id: &str, stream: &str, line: &str) {
        self.write(function, version, request_id, None, stream, line);
    }

    /// A line the function itself wrote, attributed to its instance.
    pub fn append_from_instance(
        &self,
        function: &str,
        version: u64,
        request_id: &str,
        instance: &str,
        stream: &str,
        line: &str,
    ) {
        self.write(function, version, request_id, Some(instance), stream, line);
    }

    fn write(
        &self,
        function: &str,
        version: u64,
        request_id: &str,
        instance: Option<&str>,
        stream: &str,
        line: &str,
    ) {
        let line = if line.len() > MAX_LINE {
            let mut cut = MAX_LINE;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            &line[..cut]
        } else {
            line
        };
        tracing::info!(target: "fnlet::function", function, version, request_id, instance = instance.unwrap_or("-"), stream, "{line}");
        let rec = LogLine {
            ts: crate::store::now_rfc3339(),
            function,
            version,
            request_id,
            instance,
            stream,
            line,
        };
        let mut json = serde_json::to_string(&rec).unwrap_or_default();
        json.push('\n');
        let max = self.max_bytes;
        self.with(function, |log, path| {
            if log.size + json.len() as u64 > max {
                log.file = None;
                let _ = fs::rename(path, path.with_extension("log.1"));
                log.size = 0;
            }
            if log.file.is_none() {
                log.file = OpenOptions::new().create(true).append(true).open(path).ok();
            }
            match log.file.as_mut().map(|f| f.write_all(json.as_bytes())) {
                Some(Ok(())) => log.size += json.len() as u64,
                _ => tracing::warn!(function, path = %path.display(), "cannot write function log"),
            }
            let _ = log.tx.send(Arc::from(json.as_str()));
        });
    }

    /// The last `n` lines (JSON, with newline), oldest first.
    pub fn tail(&self, function: &str, n: usize) -> Vec<String> {
        let path = self.path(function);
        let mut lines = Vec::new();
        for p in [path.with_extension("log.1"), path] {
            if let Ok(f) = File::open(&p) {
                lines.extend(
                    BufReader::new(f)
                        .lines()
                        .map_while(Result::ok)
                        .map(|mut l| {
                            l.push('\n');
                            l
                        }),
                );
            }
        }
        let skip = lines.len().saturating_sub(n);
        lines.split_off(skip)
    }

    pub fn subscribe(&self, function: &str) -> broadcast::Receiver<Arc<str>> {
        self.with(function, |log, _| log.tx.subscribe())
    }

    /// Forgets a removed function's logs.
    pub fn remove(&self, function: &str) {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(function);
        let path = self.path(function);
        let _ = fs::remove_file(path.with_extension("log.1"));
        let _ = fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_tails_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let logs = Logs::open(dir.path(), 600).unwrap();
        let mut rx = logs.subscribe("f");
        for i in 0..20 {
            logs.append("f", 1, "req", "stderr", &format!("line {i}"));
        }
        let tail = logs.tail("f", 3);
        assert_eq!(tail.len(), 3);
        assert!(tail[2].contains("\"line 19\""), "{tail:?}");
        // Rotation bounds what is kept: two files of at most 600 bytes.
        let total: u64 = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(total <= 1200, "{total}");
        assert!(rx.try_recv().unwrap().contains("line 0"));
        logs.remove("f");
        assert!(logs.tail("f", 10).is_empty());
    }

    #[test]
    fn function_lines_name_their_instance() {
        let dir = tempfile::tempdir().unwrap();
        let logs = Logs::open(dir.path(), 1 << 20).unwrap();
        logs.append_from_instance("f", 2, "r1", "f-10-3", "stderr", "hello");
        logs.append("f", 2, "-", "agent", "deployed");
        let t = logs.tail("f", 2);
        let a: serde_json::Value = serde_json::from_str(&t[0]).unwrap();
        let b: serde_json::Value = serde_json::from_str(&t[1]).unwrap();
        assert_eq!(a["instance"], "f-10-3");
        assert!(b.get("instance").is_none());
    }

    #[test]
    fn long_lines_are_cut_on_a_char_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let logs = Logs::open(dir.path(), 1 << 20).unwrap();
        logs.append("f", 1, "r", "stderr", &"é".repeat(MAX_LINE));
        let t = logs.tail("f", 1);
        let v: serde_json::Value = serde_json::from_str(&t[0]).unwrap();
        assert!(v["line"].as_str().unwrap().len() <= MAX_LINE);
    }
}
