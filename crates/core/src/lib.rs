//! Hefring's domain. Everything here is pure: no I/O, no clock, no randomness except id
//! generation, so every rule can be tested by calling a function.

pub mod archive;
pub mod backup;
pub mod environment;
pub mod id;
pub mod isolation;
pub mod manifest;
pub mod network;
pub mod operation;
pub mod render;
pub mod sandbox;
pub mod schedule;
pub mod secret;
pub mod target;
pub mod validate;

pub use id::{new_id, IdKind};
pub use secret::Secret;
pub use validate::FieldError;
