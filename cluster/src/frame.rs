//! The wire frames on QUIC streams (ALPNs `fnlet-peer/1` and `fnlet-invoke/1`).

/// Largest `meta` part of a frame, in bytes (64 KiB).
pub const MAX_META_LEN: u32 = 64 * 1024;
