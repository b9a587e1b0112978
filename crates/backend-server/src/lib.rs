//! Server targets: Linux hosts reached locally or over SSH. Everything Hefring does on such a
//! host goes through an [`Executor`], which runs argument vectors (never shell lines built
//! from user input) and streams their output.

pub mod ca;
pub mod deploy_key;
pub mod executor;
pub mod inspect;
pub mod ssh;

pub use ca::{IssuedCertificate, LocalCa};
pub use executor::{CommandSpec, ExecError, Executor, LocalExecutor, Stream};
pub use ssh::{SshExecutor, SshKeyPair};
