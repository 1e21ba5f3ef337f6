//! `umbra`: one binary for every role of an Umbra deployment and its administration.
//!
//! Parses flags, starts telemetry, and hands over to one module per subcommand.

/// `println!` for a command's result, which a person or another program reads: see
/// [`stdout_line`].
macro_rules! outln {
    ($($t:tt)*) => {
        $crate::stdout_line(format_args!($($t)*))
    };
}

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
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => usage_error(&e),
    };
    if let Command::Admin(a) = &cli.command
        && let Some(problem) = a.usage_problem()
    {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        usage_error(&cmd.error(clap::error::ErrorKind::ArgumentConflict, problem));
    }
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
    // A change made that not every broker confirmed within `--wait`: said as any error is,
    // with its own exit status.
    let status = |e: &anyhow::Error| {
        if e.is::<admin::Unconfirmed>() {
            std::process::ExitCode::from(3)
        } else {
            std::process::ExitCode::FAILURE
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if json_errors => {
            // The controller's own refusal keeps its parts; anything else is one line, in the
            // same shape (no field named, no HTTP status: no answer came).
            let v = match e.downcast_ref::<admin::Refused>() {
                Some(r) => r.to_json(),
                None => {
                    serde_json::json!({ "error": error_line(&e), "field": null, "status": null })
                }
            };
            eprintln!("{v}");
            status(&e)
        }
        Err(e) => {
            eprintln!("error: {}", error_line(&e));
            status(&e)
        }
    }
}

/// Ends on a command line clap refuses (exit status 2), as clap would, except that an admin
/// command asked for `-o json` gets the refusal as JSON on stderr, in the shape of the
/// controller's refusals (`status` null: no request was sent), so that a script reads every
/// failure one way. Help and version are printed as asked.
fn usage_error(e: &clap::Error) -> ! {
    use clap::error::{ContextKind, ErrorKind};
    let wants_help = matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    );
    if wants_help || !admin_json_asked(std::env::args()) {
        e.exit();
    }
    let text = e.to_string();
    let text = text.trim_start().trim_start_matches("error:");
    let text = text.split("\n\nUsage:").next().unwrap_or(text);
    let error = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let field = e.get(ContextKind::InvalidArg).map(ToString::to_string);
    eprintln!(
        "{}",
        serde_json::json!({ "error": error, "field": field, "status": null })
    );
    std::process::exit(2);
}

/// Whether a command line clap refused asks for an admin command's output as JSON: `admin`
/// and then `-o json` (or `-ojson`, `-o=json`, `--output json`, `--output=json`).
fn admin_json_asked(args: impl Iterator<Item = String>) -> bool {
    let mut admin = false;
    let mut prev = String::new();
    for a in args.skip(1) {
        if a == "admin" {
            admin = true;
        } else if admin
            && (matches!(a.as_str(), "-ojson" | "-o=json" | "--output=json")
                || (a == "json" && matches!(prev.as_str(), "-o" | "--output")))
        {
            return true;
        }
        prev = a;
    }
    false
}

/// Writes one line of a command's result to stdout. Output that stops being read (`| head`)
/// ends the command quietly, by SIGPIPE, as it ends other Unix tools; any other
/// failure to write it (a full disk) ends the command with that error. Resetting SIGPIPE for
/// the whole process instead would also kill it, without a word, when a socket write fails:
/// `writev`, which TLS writes use, has no `MSG_NOSIGNAL`, so a controller or broker that
/// resets the connection (a plain HTTP port given as the controller) would end the command
/// with no error at all.
pub(crate) fn stdout_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let written = out
        .write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush());
    if let Err(e) = written {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            end_by_sigpipe();
        }
        eprintln!("error: cannot write the output: {e}");
        std::process::exit(1);
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

/// Ends the process by SIGPIPE, as a write to a closed pipe ends a Unix tool (the shell sees
/// status 141).
#[allow(unsafe_code)]
fn end_by_sigpipe() -> ! {
    // SAFETY: sets a signal's disposition to its default and raises it in this thread; the
    // process ends there. Nothing else is running that relies on SIGPIPE being ignored.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::raise(libc::SIGPIPE);
    }
    std::process::exit(141)
}

#[cfg(test)]
mod tests {
    use super::error_line;

    /// Clap's own checks of every command at once (a duplicate option name, say, panics only
    /// when that command is parsed).
    #[test]
    fn the_command_line_is_consistent() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }

    #[test]
    fn admin_json_is_asked_for_in_every_spelling() {
        let asked = |line: &str| super::admin_json_asked(line.split(' ').map(str::to_owned));
        for line in [
            "umbra admin -o json service set x",
            "umbra admin service set x -o json",
            "umbra admin service set x -ojson",
            "umbra admin service set x -o=json",
            "umbra --log warn admin --output json user add",
            "umbra admin user add --output=json",
        ] {
            assert!(asked(line), "{line}");
        }
        for line in [
            "umbra admin service set x",
            "umbra admin -o table user list",
            "umbra agent status -o json",
            "umbra admin user add json",
            "umbra -o json admin",
        ] {
            assert!(!asked(line), "{line}");
        }
    }

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
