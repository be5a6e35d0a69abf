//! boto3 and the AWS CLI from PyPI for the tests that drive fnlet with AWS's own clients
//! (tests/events.rs, tests/control_plane.rs).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The boto3 whose botocore model the Lambda API is checked against.
pub const BOTO3: &str = "boto3==1.44.8";
/// The AWS CLI v1 release that goes with botocore 1.44.8.
pub const AWSCLI: &str = "awscli==1.46.3";
pub const PYTHON: &str = "/usr/bin/python3";

/// boto3 and the AWS CLI, installed from PyPI once into target/<profile>/python, for
/// `PYTHONPATH`; a lock keeps parallel tests from installing twice.
pub fn clients_dir() -> PathBuf {
    let cache = super::target_dir().join("python");
    std::fs::create_dir_all(&cache).expect("create the python cache");
    let path = cache.join(format!("clients-{BOTO3}-{AWSCLI}").replace("==", "-"));
    let lock = std::fs::File::create(cache.join(".lock-clients")).expect("cache lock");
    lock.lock().expect("lock the cache");
    if !path.exists() {
        let staging = path.with_extension(format!("tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        let o = Command::new(PYTHON)
            .args(["-m", "pip", "install", "--disable-pip-version-check"])
            .args(["--only-binary=:all:", "--target"])
            .arg(&staging)
            .args([BOTO3, AWSCLI])
            .env("PIP_ROOT_USER_ACTION", "ignore")
            .stdin(Stdio::null())
            .output()
            .expect("run pip");
        assert!(
            o.status.success(),
            "pip install: {}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        std::fs::rename(&staging, &path).expect("move the clients in place");
    }
    path
}

/// A Python command with the clients on its path and no AWS settings of the machine's own.
pub fn python(clients: &Path) -> Command {
    let mut c = Command::new(PYTHON);
    c.env("PYTHONPATH", clients)
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN")
        .stdin(Stdio::null());
    c
}
