//! fnlet: the agent daemon and its command-line interface, as a library so that tests and fuzz
//! targets can reach the parsers. The `fnlet` binary is `main.rs`.
//!
//! Layers: `api` (HTTP) -> `router` (where to run) -> `pool` (which version, concurrency) ->
//! `instance` (one run) -> `isolate` (the sandbox). `store` keeps functions and bundles.

#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod bundle;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod events;
pub mod instance;
pub mod logs;
pub mod manifest;
pub mod metrics;
pub mod network;
pub mod ownership;
pub mod placement;
pub mod pool;
pub mod router;
pub mod store;
pub mod systemd;
pub mod triggers;
pub mod units;
