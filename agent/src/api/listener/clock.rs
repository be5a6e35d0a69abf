//! When a connection with no request in flight is closed: the clock of one connection, fed
//! events and `now`, with no socket and no timer of its own.
//!
//! A request is in flight from the moment hyper hands it to the API until its answer's body is
//! done; then nothing times the connection (a long invocation or a followed log is not idle,
//! and a stalled request body has its own timeout). Otherwise the connection is either idle,
//! waiting for the first byte of the next request (`idle_timeout`), or reading a request's head
//! (`header_timeout`). A new connection is reading its first head from the connect: a client
//! that connects and says nothing gets `header_timeout`, not `idle_timeout`.

use std::time::Duration;

use tokio::time::Instant;

/// Why a connection was closed by its clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// A request head did not arrive in time.
    Header,
    /// No request came on a kept-alive connection.
    Idle,
}

impl Expiry {
    pub fn label(self) -> &'static str {
        match self {
            Expiry::Header => "header",
            Expiry::Idle => "idle",
        }
    }
}

#[derive(Debug)]
pub struct ConnClock {
    header: Duration,
    idle: Duration,
    in_flight: usize,
    /// When the last request in flight was done (or the connection was accepted).
    idle_since: Instant,
    /// When the head being read began: its first byte, or the connect for the first request.
    head_since: Option<Instant>,
}

impl ConnClock {
    pub fn new(now: Instant, header: Duration, idle: Duration) -> ConnClock {
        ConnClock {
            header,
            idle,
            in_flight: 0,
            idle_since: now,
            head_since: Some(now),
        }
    }

    /// Bytes came in. Returns true when that moved the deadline (a request head began).
    pub fn on_read(&mut self, now: Instant) -> bool {
        if self.in_flight == 0 && self.head_since.is_none() {
            self.head_since = Some(now);
            return true;
        }
        false
    }

    /// A request's head was read and handed to the API.
    pub fn on_request(&mut self) {
        self.in_flight += 1;
        self.head_since = None;
    }

    /// A request's answer is done (or abandoned). Returns true when the connection is idle now.
    pub fn on_done(&mut self, now: Instant) -> bool {
        self.in_flight = self.in_flight.saturating_sub(1);
        if self.in_flight == 0 {
            self.idle_since = now;
            self.head_since = None;
            return true;
        }
        false
    }

    /// When the connection is to be closed, and why; None while a request is in flight.
    pub fn deadline(&self) -> Option<(Instant, Expiry)> {
        if self.in_flight > 0 {
            return None;
        }
        Some(match self.head_since {
            Some(t) => (t + self.header, Expiry::Header),
            None => (self.idle_since + self.idle, Expiry::Idle),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: Duration = Duration::from_secs(10);
    const I: Duration = Duration::from_secs(60);

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn a_silent_new_connection_gets_the_header_timeout() {
        let t0 = Instant::now();
        let c = ConnClock::new(t0, H, I);
        assert_eq!(c.deadline(), Some((t0 + H, Expiry::Header)));
    }

    #[test]
    fn the_first_byte_of_a_new_connection_does_not_extend_its_header_timeout() {
        let t0 = Instant::now();
        let mut c = ConnClock::new(t0, H, I);
        assert!(!c.on_read(t0 + s(5)));
        assert_eq!(c.deadline(), Some((t0 + H, Expiry::Header)));
    }

    #[test]
    fn nothing_times_a_request_in_flight() {
        let t0 = Instant::now();
        let mut c = ConnClock::new(t0, H, I);
        c.on_request();
        // Body bytes, however late, do not start a head.
        assert!(!c.on_read(t0 + s(1000)));
        assert_eq!(c.deadline(), None);
    }

    #[test]
    fn after_an_answer_the_connection_idles_then_reads_the_next_head() {
        let t0 = Instant::now();
        let mut c = ConnClock::new(t0, H, I);
        c.on_request();
        assert!(c.on_done(t0 + s(3)));
        assert_eq!(c.deadline(), Some((t0 + s(3) + I, Expiry::Idle)));
        // The next request's first byte: its head has header_timeout from now, even when
        // that is later than the idle deadline was.
        assert!(c.on_read(t0 + s(55)));
        assert_eq!(c.deadline(), Some((t0 + s(65), Expiry::Header)));
        // More bytes of the same head change nothing.
        assert!(!c.on_read(t0 + s(60)));
        assert_eq!(c.deadline(), Some((t0 + s(65), Expiry::Header)));
        c.on_request();
        assert_eq!(c.deadline(), None);
    }

    #[test]
    fn concurrent_requests_keep_the_connection_busy_until_the_last_is_done() {
        let t0 = Instant::now();
        let mut c = ConnClock::new(t0, H, I);
        c.on_request();
        c.on_request();
        assert!(!c.on_done(t0 + s(1)));
        assert_eq!(c.deadline(), None);
        assert!(c.on_done(t0 + s(2)));
        assert_eq!(c.deadline(), Some((t0 + s(2) + I, Expiry::Idle)));
        // A stray extra "done" does not underflow.
        assert!(c.on_done(t0 + s(4)));
        assert_eq!(c.deadline(), Some((t0 + s(4) + I, Expiry::Idle)));
    }
}
