use clap::Parser;
use pis_worker::cli::{Cli, Command};
use tracing_subscriber::EnvFilter;

fn init_logging(format: &str) {
    let filter =
        EnvFilter::try_from_env("PIS_LOG").unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> std::process::ExitCode {
    // Before the runtime's threads exist (src/memory.rs).
    pis_worker::memory::limit_arenas();
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(run()),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    let result = match cli.command {
        Command::Run(args) => pis_worker::cli::run::run(*args).await,
        Command::Sandbox(args) => pis_worker::sandbox::cli::run(*args).await,
        Command::Psu(args) => pis_worker::sandbox::cli::run_psu(args).await,
        Command::Send(args) => pis_worker::cli::send::run(*args).await,
        Command::Watch(args) => {
            tokio::task::spawn_blocking(move || pis_worker::cli::watch::run(*args))
                .await
                .map_err(anyhow::Error::from)
                .and_then(|r| r)
        }
        Command::BankCheck(args) => match pis_worker::cli::bank_check::run(*args).await {
            Ok(true) => Ok(()),
            Ok(false) => return std::process::ExitCode::from(1),
            Err(e) => Err(e),
        },
        Command::Topics(args) => pis_worker::cli::run::topics(*args).await,
        Command::Dlq(args) => pis_worker::cli::dlq::run(*args).await,
        Command::State(args) => pis_worker::cli::state::run(*args).await,
        Command::Schemas => pis_worker::contract::schemas()
            .map(|s| {
                for known in [&s.command, &s.status, &s.consent_status] {
                    println!(
                        "{:<20} fingerprint {} (header {})",
                        known.name,
                        hex::encode(known.fingerprint),
                        hex::encode([&[0xC3, 0x01][..], &known.fingerprint[..]].concat())
                    );
                }
            })
            .map_err(|e| anyhow::anyhow!("{e}")),
        Command::Keygen => {
            use secrecy::ExposeSecret;
            println!(
                "{}",
                pis_worker::secret::StateKey::generate_hex().expose_secret()
            );
            Ok(())
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
