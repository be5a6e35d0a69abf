//! Any bytes as an uploaded bundle (.tar.gz or .zip): refused or unpacked, never a panic, and
//! an accepted bundle never has anything outside its staging directory.
#![no_main]

use fnlet::bundle::{BundleLimits, unpack};
use libfuzzer_sys::fuzz_target;

const LIMITS: BundleLimits = BundleLimits { max_unpacked_bytes: 1 << 20, max_files: 64 };

fuzz_target!(|data: &[u8]| {
    let Ok(base) = tempfile::tempdir() else { return };
    let dest = base.path().join("staging");
    if std::fs::create_dir(&dest).is_err() {
        return;
    }
    let _ = unpack(data, &dest, LIMITS);
    // Whatever happened, nothing may land beside the staging dir.
    let siblings = std::fs::read_dir(base.path()).map(|it| it.count()).unwrap_or(0);
    assert_eq!(siblings, 1, "the archive wrote outside its staging directory");
});
