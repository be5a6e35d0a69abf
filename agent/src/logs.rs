//! Function logs: one JSON line per output line, kept in a size-bounded file per function
//! (`<state>/logs/<name>.log`, rotated once to `.log.1`), streamed live to followers, and
//! emitted as tracing events so they reach the journal attributed to their function, within
//! the agent's [`LineBudget`].

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// `<state>/logs/<name>.log`.
    path: PathBuf,
    file: Option<File>,
    /// Bytes in the file and in `pending`.
    size: u64,
    /// Lines not written to the file yet (see [`Logs::write_behind`]).
    pending: Vec<u8>,
    tx: broadcast::Sender<Arc<str>>,
}

impl FnLog {
    /// Writes `pending` to its file, opening it first if needed.
    fn flush(&mut self, function: &str) {
        let path = &self.path;
        if self.pending.is_empty() {
            return;
        }
        if self.file.is_none() {
            self.file = OpenOptions::new().create(true).append(true).open(path).ok();
        }
        if !matches!(
            self.file.as_mut().map(|f| f.write_all(&self.pending)),
            Some(Ok(()))
        ) {
            tracing::warn!(function, path = %path.display(), "cannot write function log");
        }
        self.pending.clear();
    }
}

pub struct Logs {
    dir: PathBuf,
    max_bytes: u64,
    inner: Mutex<HashMap<String, FnLog>>,
    budget: LineBudget,
    /// Set: lines reach the files this long after they were logged, in one write per function
    /// ([`Logs::write_behind`]); None: each append is its own write.
    delay: Option<Duration>,
    /// A flush is due (the flusher was told); cleared when it starts.
    flush_due: std::sync::atomic::AtomicBool,
    wake_flusher: Arc<tokio::sync::Notify>,
}

/// Pending bytes of one function past which they are written at once.
const PENDING_MAX: usize = 64 << 10;

/// What a line that comes with calls is, for the count of those not logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineKind {
    /// The agent's `invocation ok` / `invocation failed` line.
    Invocation,
    /// A line of a function's own output (or the agent's line in an exec function's log).
    Function,
}

/// How many lines of each kind a one-second window did not log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Skipped {
    pub invocations: u64,
    pub function_lines: u64,
}

/// The lines that come with every call (`limits.log_lines_per_s`): at most `per_s` a second
/// reach the agent's log; past that they are counted, and the next line after the window says
/// how many were not logged. journald drops everything a service logs past its rate limit
/// (10,000 messages per 30 s by default), the agent's own warnings included, so a busy host
/// must stay under it on its own. The function's log file and /metrics still get every line and
/// every call. A fixed window, one lock per line: no timer, nothing runs while nothing is
/// logged.
pub struct LineBudget {
    per_s: u32,
    window: Mutex<Window>,
}

struct Window {
    start: Instant,
    logged: u32,
    skipped: Skipped,
    /// Every line not logged since the start (/metrics).
    total: Skipped,
}

const WINDOW: Duration = Duration::from_secs(1);

impl LineBudget {
    pub fn new(per_s: u32) -> LineBudget {
        LineBudget {
            per_s,
            window: Mutex::new(Window {
                start: Instant::now(),
                logged: 0,
                skipped: Skipped::default(),
                total: Skipped::default(),
            }),
        }
    }

    /// Whether a line of `kind` may be logged now. The first call after a window that skipped
    /// lines logs how many, whatever it returns.
    pub fn admit(&self, kind: LineKind) -> bool {
        let (admit, ended) = self.admit_at(Instant::now(), kind);
        if let Some((skipped, began)) = ended {
            tracing::info!(
                invocation_lines = skipped.invocations,
                function_lines = skipped.function_lines,
                window_began_s_ago = began.as_secs_f64(),
                "{} invocation and {} function output lines of a 1 s window were not logged \
                 (limits.log_lines_per_s = {}; /metrics counts every call, `fnlet logs` keeps \
                 every line)",
                skipped.invocations,
                skipped.function_lines,
                self.per_s
            );
        }
        admit
    }

    /// Every line not logged since the start, by kind.
    pub fn not_logged(&self) -> Skipped {
        self.window.lock().unwrap_or_else(|p| p.into_inner()).total
    }

    /// [`LineBudget::admit`] at `now`: whether to log, and what an ended window skipped (with
    /// how long ago it began), to be said once.
    fn admit_at(&self, now: Instant, kind: LineKind) -> (bool, Option<(Skipped, Duration)>) {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let mut ended = None;
        let age = now.saturating_duration_since(w.start);
        if age >= WINDOW {
            let skipped = std::mem::take(&mut w.skipped);
            if skipped != Skipped::default() {
                ended = Some((skipped, age));
            }
            w.start = now;
            w.logged = 0;
        }
        let admit = w.logged < self.per_s;
        if admit {
            w.logged += 1;
        } else {
            match kind {
                LineKind::Invocation => {
                    w.skipped.invocations += 1;
                    w.total.invocations += 1;
                }
                LineKind::Function => {
                    w.skipped.function_lines += 1;
                    w.total.function_lines += 1;
                }
            }
        }
        (admit, ended)
    }
}

/// Longest line kept; longer output is cut (a function cannot fill memory through its log).
const MAX_LINE: usize = 16 * 1024;

/// `line` cut to [`MAX_LINE`] bytes on a character boundary.
fn cut(line: &str) -> &str {
    if line.len() <= MAX_LINE {
        return line;
    }
    let mut end = MAX_LINE;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    &line[..end]
}

/// A line the agent writes into a function's log ([`Logs::append_agent_lines`]).
#[derive(Debug, Clone)]
pub struct AgentLine {
    /// When it happened (START: when the invocation began, not when the line was written).
    pub at: time::OffsetDateTime,
    pub request_id: String,
    pub line: String,
}

impl Logs {
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Logs> {
        fs::create_dir_all(dir)?;
        Ok(Logs {
            dir: dir.to_path_buf(),
            max_bytes,
            inner: Mutex::new(HashMap::new()),
            budget: LineBudget::new(u32::MAX),
            delay: None,
            flush_due: std::sync::atomic::AtomicBool::new(false),
            wake_flusher: Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// Lines reach the files up to `delay` after they were logged, one write per function
    /// then, rather than one write per call (a warm call's START, END and REPORT, an exec
    /// call's END): that write was ~3 % of the agent's CPU per warm call at 32 clients.
    /// Followers (`fnlet logs -f`) and an invocation's own tail still get each line at once,
    /// and [`Logs::tail`] flushes first. An agent killed with SIGKILL loses up to `delay` of
    /// lines from the files (the journal has them too). Call [`Logs::start_flusher`] on the
    /// runtime that is to write them.
    pub fn write_behind(mut self, delay: Duration) -> Logs {
        self.delay = Some(delay);
        self
    }

    /// The task that writes pending lines `delay` after the first of them; it sleeps while
    /// nothing is pending and ends when the logs are dropped.
    pub fn start_flusher(self: &Arc<Self>) {
        let Some(delay) = self.delay else {
            return;
        };
        let logs = Arc::downgrade(self);
        let wake = self.wake_flusher.clone();
        tokio::spawn(async move {
            loop {
                wake.notified().await;
                tokio::time::sleep(delay).await;
                let Some(logs) = logs.upgrade() else {
                    return;
                };
                logs.flush_due
                    .store(false, std::sync::atomic::Ordering::Release);
                logs.flush();
            }
        });
    }

    /// Writes every pending line to its file.
    pub fn flush(&self) {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for (function, log) in map.iter_mut().filter(|(_, log)| !log.pending.is_empty()) {
            log.flush(function);
        }
    }

    /// At most `per_s` lines a second that come with calls reach the agent's log
    /// ([`LineBudget`]); unlimited unless set.
    pub fn with_line_budget(mut self, per_s: u32) -> Logs {
        self.budget = LineBudget::new(per_s);
        self
    }

    /// The budget of lines that come with calls, shared with the router's invocation lines.
    pub fn line_budget(&self) -> &LineBudget {
        &self.budget
    }

    fn path(&self, function: &str) -> PathBuf {
        self.dir.join(format!("{function}.log"))
    }

    /// `f` on `function`'s log, set up at its first line (no allocation on the way after
    /// that: every warm call comes here).
    fn with<R>(&self, function: &str, f: impl FnOnce(&mut FnLog) -> R) -> R {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(log) = map.get_mut(function) {
            return f(log);
        }
        let path = self.path(function);
        let log = map.entry(function.to_string()).or_insert_with(|| FnLog {
            file: None,
            size: fs::metadata(&path).map(|m| m.len()).unwrap_or(0),
            path,
            pending: Vec::new(),
            tx: broadcast::channel(1024).0,
        });
        f(log)
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
        let line = cut(line);
        if tracing::enabled!(target: "fnlet::function", tracing::Level::INFO)
            && self.budget.admit(LineKind::Function)
        {
            tracing::info!(target: "fnlet::function", function, version, request_id, instance = instance.unwrap_or("-"), stream, "{line}");
        }
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
        self.write_json(function, &json, &[json.len()]);
    }

    /// The agent's own lines about a function's instance (Lambda's START, END and REPORT), in
    /// one write. They are the function's log, not the agent's: the agent's log (the journal)
    /// gets them at debug level only, beside its one line per invocation.
    pub fn append_agent_lines(
        &self,
        function: &str,
        version: u64,
        instance: Option<&str>,
        lines: &[AgentLine],
    ) {
        // All of them JSON'd straight into one buffer.
        let mut text = Vec::with_capacity(256 * lines.len());
        let mut ends = Vec::with_capacity(lines.len());
        for l in lines {
            let line = cut(&l.line);
            tracing::debug!(target: "fnlet::function", function, version, request_id = l.request_id.as_str(), instance = instance.unwrap_or("-"), stream = "agent", "{line}");
            let rec = LogLine {
                ts: l
                    .at
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
                function,
                version,
                request_id: &l.request_id,
                instance,
                stream: "agent",
                line,
            };
            let start = text.len();
            if serde_json::to_writer(&mut text, &rec).is_ok() {
                text.push(b'\n');
                ends.push(text.len());
            } else {
                text.truncate(start);
            }
        }
        // serde_json writes UTF-8 only.
        if let Ok(text) = std::str::from_utf8(&text)
            && !text.is_empty()
        {
            self.write_json(function, text, &ends);
        }
    }

    /// Appends whole JSON lines (`ends`: where each ends in `text`) in one write, rotating
    /// first when they would not fit, and sends each line to followers.
    fn write_json(&self, function: &str, text: &str, ends: &[usize]) {
        let max = self.max_bytes;
        let wake = self.with(function, |log| {
            if log.size + text.len() as u64 > max {
                log.flush(function);
                log.file = None;
                let _ = fs::rename(&log.path, log.path.with_extension("log.1"));
                log.size = 0;
            }
            let was_empty = log.pending.is_empty();
            log.pending.extend_from_slice(text.as_bytes());
            log.size += text.len() as u64;
            if self.delay.is_none() || log.pending.len() >= PENDING_MAX {
                log.flush(function);
            }
            if log.tx.receiver_count() > 0 {
                let mut from = 0;
                for &end in ends {
                    let _ = log.tx.send(Arc::from(&text[from..end]));
                    from = end;
                }
            }
            was_empty && !log.pending.is_empty()
        });
        if wake
            && !self
                .flush_due
                .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            self.wake_flusher.notify_one();
        }
    }

    /// The last `n` lines (JSON, with newline), oldest first.
    pub fn tail(&self, function: &str, n: usize) -> Vec<String> {
        let path = self.path(function);
        if let Some(log) = self
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(function)
        {
            log.flush(function);
        }
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
        self.with(function, |log| log.tx.subscribe())
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

impl Drop for Logs {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_budget_admits_per_s_a_second_and_counts_the_rest_once() {
        let budget = LineBudget::new(3);
        let t0 = budget.window.lock().unwrap().start;
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let kinds = [
            LineKind::Invocation,
            LineKind::Function,
            LineKind::Invocation,
            LineKind::Invocation,
            LineKind::Function,
            LineKind::Invocation,
        ];
        let admitted: Vec<bool> = kinds
            .iter()
            .enumerate()
            .map(|(i, &k)| {
                let (admit, ended) = budget.admit_at(at(i as u64 * 10), k);
                assert_eq!(ended, None, "line {i}: nothing ended yet");
                admit
            })
            .collect();
        assert_eq!(admitted, [true, true, true, false, false, false]);

        // The first line of the next window is admitted and says what the last one skipped,
        // with how long ago that window began.
        let (admit, ended) = budget.admit_at(at(1_500), LineKind::Function);
        assert!(admit);
        assert_eq!(
            ended,
            Some((
                Skipped {
                    invocations: 2,
                    function_lines: 1
                },
                Duration::from_millis(1_500)
            ))
        );
        // Said once: the rest of this window, and a later one that skipped nothing, say nothing.
        assert_eq!(budget.admit_at(at(1_600), LineKind::Function), (true, None));
        assert_eq!(budget.admit_at(at(1_700), LineKind::Function), (true, None));
        assert_eq!(
            budget.admit_at(at(2_600), LineKind::Invocation),
            (true, None)
        );
        // Time that seems to run backwards (another thread's earlier Instant) is no new window.
        assert_eq!(
            budget.admit_at(at(2_000), LineKind::Invocation),
            (true, None)
        );
        // The totals for /metrics keep counting across windows.
        assert_eq!(budget.admit_at(at(2_700), LineKind::Function), (true, None));
        assert_eq!(
            budget.admit_at(at(2_800), LineKind::Function),
            (false, None)
        );
        assert_eq!(
            budget.not_logged(),
            Skipped {
                invocations: 2,
                function_lines: 2
            }
        );
    }

    #[test]
    fn a_zero_budget_logs_nothing_and_still_counts() {
        let budget = LineBudget::new(0);
        let t0 = budget.window.lock().unwrap().start;
        for i in 0..5 {
            let (admit, _) = budget.admit_at(t0 + Duration::from_millis(i), LineKind::Invocation);
            assert!(!admit);
        }
        let (admit, ended) = budget.admit_at(t0 + Duration::from_secs(1), LineKind::Invocation);
        assert!(!admit);
        assert_eq!(ended.map(|(s, _)| s.invocations), Some(5));
    }

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

    fn file_lines(dir: &Path, name: &str) -> Vec<String> {
        fs::read_to_string(dir.join(name))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[tokio::test]
    async fn written_behind_lines_reach_the_file_after_the_delay_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let logs = Arc::new(
            Logs::open(dir.path(), 1 << 20)
                .unwrap()
                .write_behind(Duration::from_millis(50)),
        );
        logs.start_flusher();
        let mut rx = logs.subscribe("f");
        for i in 0..5 {
            logs.append("f", 1, "req", "stderr", &format!("line {i}"));
        }
        // Followers have them at once; the file not yet.
        assert!(rx.try_recv().unwrap().contains("\"line 0\""));
        assert!(file_lines(dir.path(), "f.log").is_empty());
        // The flusher writes them all, in order, in one go.
        let deadline = Instant::now() + Duration::from_secs(5);
        while file_lines(dir.path(), "f.log").len() < 5 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let lines = file_lines(dir.path(), "f.log");
        assert_eq!(lines.len(), 5, "{lines:?}");
        for (i, l) in lines.iter().enumerate() {
            assert!(l.contains(&format!("\"line {i}\"")), "{lines:?}");
        }
        // And again for lines logged after that flush (a new round of the flusher).
        logs.append("f", 1, "req", "stderr", "line 5");
        let deadline = Instant::now() + Duration::from_secs(5);
        while file_lines(dir.path(), "f.log").len() < 6 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(file_lines(dir.path(), "f.log").len(), 6);
    }

    #[test]
    fn pending_lines_are_written_by_tail_rotation_and_drop() {
        let dir = tempfile::tempdir().unwrap();
        // No flusher: only tail, a rotation or the drop writes.
        let logs = Logs::open(dir.path(), 600)
            .unwrap()
            .write_behind(Duration::from_secs(3600));
        logs.append("f", 1, "req", "stderr", "first");
        assert!(file_lines(dir.path(), "f.log").is_empty());
        let tail = logs.tail("f", 10);
        assert_eq!(tail.len(), 1, "{tail:?}");
        assert_eq!(file_lines(dir.path(), "f.log").len(), 1);
        // Rotation writes what is pending to the old file first: nothing is lost or reordered.
        for i in 0..20 {
            logs.append("f", 1, "req", "stderr", &format!("line {i}"));
        }
        let tail = logs.tail("f", 100);
        let numbers: Vec<usize> = tail
            .iter()
            .filter_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["line"].as_str()?.strip_prefix("line ")?.parse().ok()
            })
            .collect();
        assert!(!numbers.is_empty());
        assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
        assert_eq!(numbers.last(), Some(&19));
        logs.append("f", 1, "req", "stderr", "last");
        drop(logs);
        assert!(
            file_lines(dir.path(), "f.log")
                .last()
                .is_some_and(|l| l.contains("\"last\"")),
            "the drop wrote the pending line"
        );
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
    fn agent_lines_go_out_in_one_write_each_line_its_own_record() {
        let dir = tempfile::tempdir().unwrap();
        let logs = Logs::open(dir.path(), 1 << 20).unwrap();
        let mut rx = logs.subscribe("f");
        let at = time::macros::datetime!(2026-12-04 22:00:00.5 UTC);
        let line = |id: &str, l: &str| AgentLine {
            at,
            request_id: id.into(),
            line: l.into(),
        };
        logs.append_from_instance("f", 3, "r1", "f-1-1", "stdout", "hello");
        logs.append_agent_lines(
            "f",
            3,
            Some("f-1-1"),
            &[
                line("r1", "END RequestId: r1"),
                line("r1", "REPORT RequestId: r1"),
            ],
        );
        let t = logs.tail("f", 10);
        assert_eq!(t.len(), 3, "{t:?}");
        let v: Vec<serde_json::Value> =
            t.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(v[1]["line"], "END RequestId: r1");
        assert_eq!(v[2]["line"], "REPORT RequestId: r1");
        assert_eq!(v[2]["stream"], "agent");
        assert_eq!(v[2]["instance"], "f-1-1");
        assert_eq!(v[2]["version"], 3);
        assert_eq!(v[2]["ts"], "2026-12-04T22:00:00.5Z");
        // Followers get one record per message, as for any other line.
        let got: Vec<String> = (0..3).map(|_| rx.try_recv().unwrap().to_string()).collect();
        assert_eq!(got, t);
        assert!(rx.try_recv().is_err());
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
