//! The `basalt` command: parse the CLI, set up logging, load the config, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use basalt::app::{shutdown_signal, App};
use basalt::config::Config;

#[derive(Parser)]
#[command(name = "basalt", version, about = "Self-hosted Backend-as-a-Service")]
struct Cli {
    /// Configuration file (default: ./basalt.toml when present).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Manage admins.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Manage service keys and the token signing key.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create an admin.
    Create {
        #[arg(long)]
        email: String,
        #[arg(long)]
        password: String,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a service key; the secret is printed once, on the last line.
    Create { name: String },
    /// Start signing with a new key; old public keys stay published until their tokens expire.
    RotateSigning,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("basalt: {err}");
            return ExitCode::from(2);
        }
    };
    basalt::telemetry::init(&config.log);
    let ignored = Config::ignored_env_vars();
    if !ignored.is_empty() {
        tracing::warn!(
            variables = ?ignored,
            "ignoring BASALT_* variables that name no setting (sections nest with a double underscore, as BASALT_DATABASE__URL)"
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("basalt: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command.unwrap_or(Command::Serve), config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("basalt: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve => {
            let app = App::build(config).await?;
            app.run_until_stopped(shutdown_signal()).await
        }
        Command::Migrate => {
            basalt::store::open(&config.database_url(), 1).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Admin {
            command: AdminCommand::Create { email, password },
        } => {
            let auth = basalt::cli::auth_service(&config).await?;
            let admin = auth
                .create_admin(&email, &password)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            basalt::audit::AuditLog::new(auth.store().clone())
                .record(
                    &basalt::auth::Caller::System("cli"),
                    "admin.create",
                    Some(&admin.id),
                    serde_json::json!({"email": admin.email}),
                )
                .await;
            println!("admin created: {} ({})", admin.email, admin.id);
            Ok(())
        }
        Command::Keys {
            command: KeysCommand::Create { name },
        } => {
            let auth = basalt::cli::auth_service(&config).await?;
            let key = auth
                .create_service_key(&name)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            basalt::audit::AuditLog::new(auth.store().clone())
                .record(
                    &basalt::auth::Caller::System("cli"),
                    "key.create",
                    Some(&key.id),
                    serde_json::json!({"name": key.name}),
                )
                .await;
            println!(
                "service key {} ({}) created; it is shown only now:",
                key.name, key.id
            );
            println!("{}", key.key.unwrap_or_default());
            Ok(())
        }
        Command::Keys {
            command: KeysCommand::RotateSigning,
        } => {
            let store = basalt::store::open(&config.database_url(), 1).await?;
            let kid = basalt::auth::tokens::TokenService::rotate(store.as_ref()).await?;
            println!("new signing key {kid} is active; old keys stay published until their tokens expire");
            Ok(())
        }
    }
}
