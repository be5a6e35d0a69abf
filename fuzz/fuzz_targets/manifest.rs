//! Any bytes as fnlet.toml: parse errors are fine, panics are not; an accepted manifest
//! round-trips through serialization unchanged.
#![no_main]

use fnlet::manifest::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(m) = Manifest::parse(text) {
        let again = toml_round_trip(&m);
        assert_eq!(again.as_ref(), Some(&m), "manifest did not round-trip");
    }
});

fn toml_round_trip(m: &Manifest) -> Option<Manifest> {
    let text = fnlet::manifest::to_toml(m).ok()?;
    Manifest::parse(&text).ok()
}
