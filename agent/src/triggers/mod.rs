//! Triggers: what runs a function besides a call (topics and schedules). Every triggered run is
//! an async event (events/), with its retries and destinations.

pub mod cloudevent;
pub mod manifest;
pub mod topics;

pub use manifest::{FilterMatch, Schedule, ScheduleKind, Trigger, TriggerError, TriggerManifest};
