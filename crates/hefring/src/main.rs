//! `hefring`: the server, the workers and the command-line client in one binary.

mod cli;
mod client;
mod config;
mod isolation;
mod renewal;
mod serve;

use clap::Parser;

use cli::{AdminCommand, Cli, Command};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let vars = match config::variables_from_file(&args) {
        Ok(vars) => vars,
        Err(e) => fail(&e),
    };
    for (key, value) in vars {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var(key, value) };
    }
    let cli = Cli::parse_from(&args);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HEFRING_LOG")
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve::serve(args).await.map(|_| 0),
            Command::Worker(args) => serve::worker(args).await.map(|_| 0),
            Command::Admin {
                command: AdminCommand::CreateToken { state, name },
            } => serve::create_token(state, name).await.map(|_| 0),
            Command::Admin {
                command: AdminCommand::RotateSecretKey { state },
            } => serve::rotate_secret_key(state).await.map(|_| 0),
            Command::Target { client, command } => client::target(client, command).await,
            Command::Project { client, command } => client::project(client, command).await,
            Command::Release { client, command } => client::release(client, command).await,
            Command::Env { client, command } => client::environment(client, command).await,
            Command::Backup { client, command } => client::backup(client, command).await,
            Command::Op { client, command } => client::op(client, command).await,
        }
    });
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => fail(&e),
    }
}

fn fail(e: &anyhow::Error) -> ! {
    let mut message = e.to_string();
    for cause in e.chain().skip(1) {
        message.push_str(": ");
        message.push_str(&cause.to_string());
    }
    eprintln!("error: {message}");
    std::process::exit(1);
}
