//! `umbra`: one binary for every role of an Umbra deployment and its administration.
//!
//! Parses flags, starts telemetry, and hands over to one module per subcommand.

mod admin;
mod agent;
mod broker;
mod connector;
mod controller;
mod load;
mod malloc;
mod quickstart;
mod telemetry;

use clap::{Parser, Subcommand};

/// Umbra: zero trust access to private apps.
///
/// Every role runs from this binary: a controller (policy, CA, admin API), brokers
/// (enforcement points), connectors (next to private apps, dial out), agents (on user
/// devices). `umbra quickstart` runs a complete local deployment in one command.
#[derive(Parser)]
#[command(name = "umbra", version, propagate_version = true)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `umbra_broker=debug`.
    #[arg(long, global = true, env = "UMBRA_LOG", default_value = "info")]
    log: String,
    /// Log format: `json` (one structured line per event) or `text`.
    #[arg(long, global = true, env = "UMBRA_LOG_FORMAT", value_parser = ["json", "text"])]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a complete local deployment: controller, two brokers, a connector, a demo app and
    /// an enrolled agent identity for demo@example.test.
    Quickstart(quickstart::Args),
    /// Run the controller (policy engine, CA, enrollment, admin API).
    Controller(controller::Args),
    /// Run a broker, or enroll one.
    Broker(broker::Args),
    /// Run a connector, or enroll one.
    Connector(connector::Args),
    /// The endpoint agent: enroll this device, list services, forward one.
    Agent(agent::Args),
    /// Administer the controller through its REST API.
    Admin(admin::Args),
}

fn main() -> std::process::ExitCode {
    malloc::tune();
    let cli = Cli::parse();
    umbra_pki::install_crypto_provider();
    let interactive = matches!(
        cli.command,
        Command::Agent(_) | Command::Admin(_) | Command::Quickstart(_)
    );
    let format = cli
        .log_format
        .clone()
        .unwrap_or_else(|| if interactive { "text" } else { "json" }.to_owned());
    let format = format.as_str();
    let agent_log = cli.log_or_quiet();
    let log = cli.log.clone();
    if !matches!(cli.command, Command::Admin(_) | Command::Agent(_)) {
        // Installed before any role records a metric (records made earlier would be lost).
        telemetry::metrics_handle();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Quickstart(a) => quickstart::run(a, &log, format).await,
            Command::Controller(a) => {
                telemetry::init_logs(&log, format, None)?;
                controller::run(a).await
            }
            Command::Broker(a) => {
                telemetry::init_logs(&log, format, None)?;
                broker::run(a).await
            }
            Command::Connector(a) => {
                telemetry::init_logs(&log, format, None)?;
                connector::run(a).await
            }
            Command::Agent(a) => {
                telemetry::init_logs(&agent_log, format, None)?;
                agent::run(a).await
            }
            Command::Admin(a) => {
                telemetry::init_logs("warn", format, None)?;
                admin::run(a).await
            }
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

impl Cli {
    /// Agent commands print results for a person: keep logs to warnings unless asked.
    fn log_or_quiet(&self) -> String {
        if self.log == "info" {
            "warn,umbra_agent=info".into()
        } else {
            self.log.clone()
        }
    }
}
