//! The `switchboard` command: the server in any role, and its operator tools.

mod admin;
mod admin_http;
mod bus_cmd;
mod config_cmd;
mod projections_cmd;
mod serve;
mod supervise;
mod token_cmd;
mod user_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use switchboard_infra::config::Config;

/// Event-sourced enterprise IM and presence server.
#[derive(Debug, Parser)]
#[command(name = "switchboard", version, about)]
struct Cli {
    /// Configuration file (TOML); defaults apply when absent. Fields can be
    /// overridden by SWITCHBOARD__<SECTION>__<FIELD> environment variables.
    #[arg(long, global = true, env = "SWITCHBOARD_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server: every role in one process (the embedded default), or
    /// one role of a scaled-out deployment on Kafka.
    Serve {
        /// Which role this process plays.
        #[arg(long, value_enum, default_value_t = serve::Role::All)]
        role: serve::Role,
    },
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Diagnostics on the bus: create topics, produce and consume test records.
    #[command(subcommand)]
    Bus(bus_cmd::BusCommand),
    /// Manage users (through a running server's admin socket when there is one).
    #[command(subcommand)]
    User(user_cmd::UserCommand),
    /// Drop one projection (rosters, sessions, archive, files, compliance)
    /// and rebuild it from the log.
    Replay {
        /// The projection to rebuild.
        projection: String,
    },
    /// The compliance log.
    #[command(subcommand)]
    Compliance(projections_cmd::ComplianceCommand),
    /// Run projections without the rest of the server.
    #[command(subcommand)]
    Projections(projections_cmd::ProjectionsCommand),
    /// API tokens of the compliance API (created, revoked, listed).
    #[command(subcommand)]
    Token(token_cmd::TokenCommand),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate the configuration and print it with every default filled in.
    Check,
    /// Change a live setting; it takes effect without a restart.
    Set {
        /// The setting key, e.g. im.offline.max_per_user (see `config list`).
        key: String,
        /// The new value: true/false (on/off) or an integer.
        value: String,
    },
    /// Print a live setting.
    Get {
        /// The setting key.
        key: String,
    },
    /// Print every live setting with its value.
    List,
}

/// mimalloc, not glibc's malloc: under the XMPP message load about 40 % of
/// the tokio workers' samples were in glibc's malloc and free (arena locks,
/// `unlink_chunk`, `malloc_consolidate`); with mimalloc the burst went from
/// 18,200-18,900 to 20,200-22,400 messages/s (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SWITCHBOARD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = match Config::load(cli.config.as_deref(), std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve { role } => serve::run(config, role).await,
            Command::Config(ConfigCommand::Check) => {
                print!("{}", toml::to_string_pretty(&config)?);
                Ok(())
            }
            Command::Config(ConfigCommand::Set { key, value }) => {
                config_cmd::set(&config, &key, &value).await
            }
            Command::Config(ConfigCommand::Get { key }) => config_cmd::get(&config, &key).await,
            Command::Config(ConfigCommand::List) => config_cmd::list(&config).await,
            Command::Bus(cmd) => bus_cmd::run(&config, cmd).await,
            Command::User(cmd) => user_cmd::run(&config, cmd).await,
            Command::Replay { projection } => projections_cmd::replay(&config, &projection).await,
            Command::Compliance(cmd) => projections_cmd::compliance(&config, cmd).await,
            Command::Projections(cmd) => projections_cmd::projections(&config, cmd).await,
            Command::Token(cmd) => token_cmd::run(&config, cmd).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // Bad input (an unknown setting or value) is a usage error.
            if e.downcast_ref::<switchboard_processors::settings::SettingError>()
                .is_some()
            {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
