//! The worker: claims operations from the store (woken by the queue), runs their tasks in
//! order through the backends, and records every step: task status and attempts, log lines,
//! the lease that proves it is alive, the operation's end. Cancel, timeouts and rollback
//! live here too. Nothing here speaks HTTP.

pub mod acme;
mod log;
mod progress;
mod run;
pub mod sandbox;
mod tasks;
mod worker;

pub mod time;

pub use run::{TaskError, TaskOutput};
pub use worker::{Engine, EngineConfig, Observed, Observer};
