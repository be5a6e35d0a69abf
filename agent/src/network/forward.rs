//! `net.ipv4.ip_forward`: turned on when instances' traffic first needs routing out, and put
//! back as it was found when the network goes (at stop, or at the next start after a crash).
//! The value found is written to the state directory before forwarding is turned on, so an
//! agent killed with the switch on still puts it back.

use std::path::{Path, PathBuf};

use super::{NetworkError, write_file};

/// The switch and the record of what it was before fnlet turned it on. Paths are parameters
/// so that tests use files of their own.
pub struct Forwarding {
    sysctl: PathBuf,
    record: PathBuf,
}

/// What [`Forwarding::restore`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Restored {
    /// fnlet had not changed it.
    Nothing,
    /// Put back to the value found.
    PutBack(String),
    /// Someone changed it since fnlet turned it on (to this value): left as it is.
    Changed(String),
}

impl Forwarding {
    pub fn new(sysctl: PathBuf, record: PathBuf) -> Forwarding {
        Forwarding { sysctl, record }
    }

    /// The host's switch, recorded in `state_dir`.
    pub fn host(state_dir: &Path) -> Forwarding {
        Forwarding::new(
            "/proc/sys/net/ipv4/ip_forward".into(),
            state_dir.join("network-ip_forward-before"),
        )
    }

    fn read(&self) -> Result<String, NetworkError> {
        std::fs::read_to_string(&self.sysctl)
            .map(|v| v.trim().to_string())
            .map_err(|source| NetworkError::Read {
                path: self.sysctl.clone(),
                source,
            })
    }

    /// Turns forwarding on; returns the value it had when that changed it. The first value
    /// found is recorded (a record left by a crashed agent is kept: it holds the host's own).
    pub fn turn_on(&self) -> Result<Option<String>, NetworkError> {
        let found = self.read()?;
        if found == "1" {
            return Ok(None);
        }
        if !self.record.exists() {
            write_file(&self.record, &found)?;
        }
        write_file(&self.sysctl, "1")?;
        Ok(Some(found))
    }

    /// Puts the recorded value back if forwarding is still on (anything else means someone
    /// changed it meanwhile, and it stays), then forgets the record.
    pub fn restore(&self) -> Result<Restored, NetworkError> {
        let before = match std::fs::read_to_string(&self.record) {
            Ok(v) => v.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Restored::Nothing),
            Err(source) => {
                return Err(NetworkError::Read {
                    path: self.record.clone(),
                    source,
                });
            }
        };
        let now = self.read()?;
        let done = if before.parse::<u8>().is_err() {
            // Not written by fnlet: nothing to put back.
            Restored::Changed(now)
        } else if now == "1" {
            write_file(&self.sysctl, &before)?;
            Restored::PutBack(before)
        } else {
            Restored::Changed(now)
        };
        let _ = std::fs::remove_file(&self.record);
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(value: &str) -> (tempfile::TempDir, Forwarding) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ip_forward"), format!("{value}\n")).unwrap();
        let f = Forwarding::new(dir.path().join("ip_forward"), dir.path().join("record"));
        (dir, f)
    }

    fn value(dir: &tempfile::TempDir) -> String {
        std::fs::read_to_string(dir.path().join("ip_forward"))
            .unwrap()
            .trim()
            .to_string()
    }

    #[test]
    fn forwarding_turned_on_is_put_back_and_the_record_goes() {
        let (dir, f) = setup("0");
        assert_eq!(f.turn_on().unwrap(), Some("0".into()));
        assert_eq!(value(&dir), "1");
        // Again (the network brought up again by the same agent): the first value stays.
        assert_eq!(f.turn_on().unwrap(), None);
        assert_eq!(f.restore().unwrap(), Restored::PutBack("0".into()));
        assert_eq!(value(&dir), "0");
        assert!(!dir.path().join("record").exists());
        assert_eq!(f.restore().unwrap(), Restored::Nothing);
        assert_eq!(value(&dir), "0");
    }

    #[test]
    fn forwarding_that_was_on_is_left_on() {
        let (dir, f) = setup("1");
        assert_eq!(f.turn_on().unwrap(), None);
        assert_eq!(f.restore().unwrap(), Restored::Nothing);
        assert_eq!(value(&dir), "1");
    }

    #[test]
    fn a_value_changed_meanwhile_is_left_as_it_is() {
        let (dir, f) = setup("0");
        f.turn_on().unwrap();
        // An operator turns it off while the agent runs.
        std::fs::write(dir.path().join("ip_forward"), "0\n").unwrap();
        assert_eq!(f.restore().unwrap(), Restored::Changed("0".into()));
        assert_eq!(value(&dir), "0");
        assert!(!dir.path().join("record").exists());
    }

    #[test]
    fn a_crashed_agents_record_is_put_back_by_the_next_one() {
        let (dir, f) = setup("0");
        f.turn_on().unwrap();
        drop(f);
        // The next agent, same state directory: its start-up restores the host's value.
        let next = Forwarding::new(dir.path().join("ip_forward"), dir.path().join("record"));
        assert_eq!(next.restore().unwrap(), Restored::PutBack("0".into()));
        assert_eq!(value(&dir), "0");
    }
}
