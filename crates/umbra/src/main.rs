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
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `umbra_broker=debug`. Default:
    /// `info` for the roles; for `agent` and `admin`, which print results for a person,
    /// warnings only (and the agent's own `info`).
    #[arg(long, global = true, env = "UMBRA_LOG")]
    log: Option<String>,
    /// Log format: `json` (one structured line per event) or `text`. Default: `json` for the
    /// controller, brokers, connectors and quickstart's log file; `text` for the agent and
    /// admin commands, which a person runs.
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
    // Quickstart's log goes to a file, JSON unless asked otherwise (the terminal is for the
    // person, and its own lines are not logs).
    let quickstart_format = cli.log_format.clone().unwrap_or_else(|| "json".to_owned());
    let log = cli.log_filter();
    // Scripts reading `-o json` get their error as JSON too (on stderr, as a person would).
    let json_errors = matches!(&cli.command, Command::Admin(a) if a.json_output());
    if match &cli.command {
        Command::Admin(_) => true,
        Command::Agent(a) => a.prints_result(),
        _ => false,
    } {
        end_quietly_on_closed_output();
    }
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
            Command::Quickstart(a) => quickstart::run(a, &log, &quickstart_format).await,
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
                telemetry::init_logs(&log, format, None)?;
                agent::run(a).await
            }
            Command::Admin(a) => {
                telemetry::init_logs(&log, format, None)?;
                admin::run(a).await
            }
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if json_errors => {
            // The controller's own refusal keeps its parts; anything else is one line.
            let v = match e.downcast_ref::<admin::Refused>() {
                Some(r) => r.to_json(),
                None => serde_json::json!({ "error": error_line(&e) }),
            };
            eprintln!("{v}");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {}", error_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Output read by another program (`| head`) may stop being read: the command then ends
/// quietly, as other Unix tools do, instead of panicking in `println!`. Only for short-lived
/// commands whose output is their result: the roles write to sockets, which never raise
/// SIGPIPE (Rust sends with MSG_NOSIGNAL), but their logs go to stderr.
#[allow(unsafe_code)]
fn end_quietly_on_closed_output() {
    // SAFETY: sets a signal's disposition to its default, before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

impl Cli {
    /// The log filter asked for (`--log`, `UMBRA_LOG`), else the command's own default: agent
    /// and admin commands print results for a person, so their logs stay to warnings.
    fn log_filter(&self) -> String {
        if let Some(l) = &self.log {
            return l.clone();
        }
        match self.command {
            Command::Agent(_) => "warn,umbra_agent=info",
            Command::Admin(_) => "warn",
            _ => "info",
        }
        .to_owned()
    }
}

/// The error and its causes on one line, as `{:#}` prints them, but without a cause whose text
/// the line already holds: the library errors put their source in their own message
/// (`cannot listen on ADDR: Address already in use`), which `{:#}` would print twice.
fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::error_line;

    /// An explicit `--log` is used as given, `info` included; without one, each command has
    /// its default. (`UMBRA_LOG` counts as given; the test environment leaves it unset.)
    #[test]
    fn the_log_filter_asked_for_wins() {
        use clap::Parser;
        let filter = |argv: &[&str]| super::Cli::try_parse_from(argv).unwrap().log_filter();
        assert_eq!(
            filter(&["umbra", "--log", "info", "agent", "status"]),
            "info"
        );
        assert_eq!(
            filter(&["umbra", "agent", "status"]),
            "warn,umbra_agent=info"
        );
        assert_eq!(
            filter(&["umbra", "--log", "debug", "admin", "user", "list"]),
            "debug"
        );
        assert_eq!(filter(&["umbra", "admin", "user", "list"]), "warn");
        assert_eq!(filter(&["umbra", "controller"]), "info");
    }

    /// Like the library errors: the source in the message and as `source()`.
    #[derive(Debug)]
    struct Listen {
        source: std::io::Error,
    }

    impl std::fmt::Display for Listen {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "cannot listen on 127.0.0.1:1: {}", self.source)
        }
    }

    impl std::error::Error for Listen {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    /// The source in the middle of the message.
    #[derive(Debug)]
    struct Enroll {
        source: std::io::Error,
    }

    impl std::fmt::Display for Enroll {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "read cert.pem: {} (enroll first)", self.source)
        }
    }

    impl std::error::Error for Enroll {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    #[test]
    fn a_cause_already_in_the_message_is_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address already in use");
        let e = anyhow::Error::new(Listen { source: io }).context("controller did not start");
        assert_eq!(
            error_line(&e),
            "controller did not start: cannot listen on 127.0.0.1:1: Address already in use"
        );
        // Also when the parent adds words after its source.
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let e = anyhow::Error::new(Enroll { source: io });
        assert_eq!(error_line(&e), "read cert.pem: No such file (enroll first)");
        // A cause not repeated by its parent is kept, as `{:#}` would.
        let e = anyhow::anyhow!("no identity in /x").context("agent did not start");
        assert_eq!(error_line(&e), "agent did not start: no identity in /x");
        assert_eq!(error_line(&e), format!("{e:#}"));
    }
}
