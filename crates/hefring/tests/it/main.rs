//! Hefring's integration tests: one binary (one link step on a 2-core machine), driving a
//! real `hefring serve` over HTTP and the real CLI, with SQLite, git and sshd.

mod api;
mod backups;
mod build_sandbox;
mod cli;
mod distributed;
mod durability;
mod environments;
mod fleet;
mod harness;
mod isolation;
mod mediawiki;
mod migrate;
mod operations;
mod postgres;
mod s3_backups;
mod schedules;
mod scram;
mod secrets;
mod ssh;
mod target_lock;
