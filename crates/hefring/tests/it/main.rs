//! Hefring's integration tests: one binary (one link step on a 2-core machine), driving a
//! real `hefring serve` over HTTP and the real CLI, with SQLite, git and sshd.

mod api;
mod backups;
mod cli;
mod distributed;
mod durability;
mod fleet;
mod environments;
mod harness;
mod mediawiki;
mod operations;
mod postgres;
mod scram;
mod ssh;
