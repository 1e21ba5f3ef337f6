//! The `umbra` binary as a person meets it, without root: help texts, configuration errors
//! that name what is wrong, and `umbra quickstart` end to end on loopback (start, the printed
//! next step works, Ctrl-C exits cleanly, a second run resumes the same state).

// Test code: a failed expectation is the test failing, with its message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Output, Proc, poll};
use serde_json::Value;

/// `umbra ARGS` with a clean environment, killed after 20 s.
fn umbra(home: &Path, args: &[&str]) -> Output {
    umbra_env(home, args, &[])
}

/// `umbra agent --dir DIR enroll --controller URL EXTRA` with `envs`.
fn enroll_agent_cmd(
    home: &Path,
    dir: &str,
    controller: &str,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> Output {
    let mut args = vec!["agent", "--dir", dir, "enroll", "--controller", controller];
    args.extend_from_slice(extra);
    umbra_env(home, &args, envs)
}

/// `umbra broker enroll --controller URL --token TOKEN --dir DIR`.
fn broker_enroll(home: &Path, url: &str, token: &str, dir: &Path) -> Output {
    let dir = dir.to_str().expect("utf-8");
    umbra(
        home,
        &[
            "broker",
            "enroll",
            "--controller",
            url,
            "--token",
            token,
            "--dir",
            dir,
        ],
    )
}

/// `umbra ARGS` with a clean environment plus `envs`, killed after 20 s.
fn umbra_env(home: &Path, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let dir = home.join("out");
    std::fs::create_dir_all(&dir).expect("out dir");
    let n = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
    let mut cmd = Command::new(common::umbra());
    cmd.args(args).current_dir(home);
    common::clean_env(&mut cmd, home);
    cmd.envs(envs.iter().copied());
    common::run_to_files(
        cmd,
        dir.join(format!("{n:03}.stdout")),
        dir.join(format!("{n:03}.stderr")),
        Duration::from_secs(20),
    )
}

#[test]
fn help_of_every_command_names_its_options() {
    let home = tempfile::tempdir().expect("tempdir");
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--help"],
            &[
                "quickstart",
                "controller",
                "broker",
                "connector",
                "agent",
                "admin",
                "--log",
            ],
        ),
        (&["quickstart", "--help"], &["--data-dir", "--base-port"]),
        (
            &["controller", "--help"],
            &[
                "--config",
                "--data-dir",
                "--listen",
                "--public-url",
                "--server-name",
                "--database-url",
                "--audit-retention-days",
                "UMBRA_CA_KEY",
            ],
        ),
        (
            &["broker", "--help"],
            &[
                "enroll",
                "--config",
                "--name",
                "--dir",
                "--listen-quic",
                "--listen-tcp",
                "--advertise-host",
                "--max-staleness",
                "--stream-window-kib",
                "--metrics-listen",
            ],
        ),
        (
            &["broker", "enroll", "--help"],
            &["--controller", "--token", "--token-file", "--dir"],
        ),
        (
            &["connector", "--help"],
            &[
                "enroll",
                "--config",
                "--dir",
                "--transport",
                "--stream-window-kib",
                "--metrics-listen",
            ],
        ),
        (
            &["connector", "enroll", "--help"],
            &["--controller", "--token", "--token-file", "--dir"],
        ),
        (
            &["agent", "--help"],
            &[
                "enroll",
                "status",
                "services",
                "forward",
                "--dir",
                "--transport",
                "--stream-window-kib",
            ],
        ),
        (
            &["agent", "enroll", "--help"],
            &["--controller", "--token", "--token-file"],
        ),
        (&["agent", "forward", "--help"], &["--listen"]),
        (&["agent", "status", "--help"], &["--dir"]),
        (&["agent", "services", "--help"], &["--dir"]),
        (
            &["admin", "--help"],
            &[
                "--controller",
                "--token",
                "--ca-file",
                "--output",
                "--wait",
                "user",
                "group",
                "service",
                "policy",
                "token",
                "device",
                "connector",
                "broker",
                "stream",
                "rollout",
                "audit",
            ],
        ),
        (&["admin", "rollout", "--help"], &["--snapshot", "--wait"]),
        (&["admin", "user", "add", "--help"], &["--group"]),
        (&["admin", "user", "--help"], &["disable", "enable"]),
        (
            &["admin", "access", "--help"],
            &["--user", "--device", "--service", "--transport"],
        ),
        (
            &["admin", "service", "add", "--help"],
            &["--target", "--connector"],
        ),
        (
            &["admin", "service", "set", "--help"],
            &["--target", "--connector"],
        ),
        (
            &["admin", "policy", "set", "--help"],
            &[
                "--file",
                "--text",
                "--allow-user",
                "--allow-group",
                "--service",
            ],
        ),
        (
            &["admin", "policy", "add", "--help"],
            &[
                "--file",
                "--text",
                "--allow-user",
                "--allow-group",
                "--allow-everyone",
                "--service",
            ],
        ),
        (
            &["admin", "token", "create", "--help"],
            &["--role", "--user", "--name", "--ttl"],
        ),
        (&["admin", "device", "--help"], &["list", "revoke"]),
        (
            &["admin", "device", "list", "--help"],
            &["--user", "--limit", "--after"],
        ),
        (
            &["admin", "audit", "--help"],
            &["--after", "--limit", "list"],
        ),
        (
            &["admin", "audit", "list", "--help"],
            &["--after", "--limit"],
        ),
    ];
    let mut failures = Vec::new();
    for (args, wanted) in cases {
        let out = umbra(home.path(), args);
        if !out.success() {
            failures.push(format!(
                "`umbra {}` failed: {}",
                args.join(" "),
                out.describe()
            ));
            continue;
        }
        for w in *wanted {
            if !out.stdout.contains(w) {
                failures.push(format!("`umbra {}` does not mention {w}", args.join(" ")));
            }
        }
    }
    assert!(failures.is_empty(), "help texts:\n{}", failures.join("\n"));
}

#[test]
fn broker_config_errors_name_what_is_wrong() {
    let home = tempfile::tempdir().expect("tempdir");

    // An unknown key in the config file fails at start, naming the key.
    let cfg = home.path().join("broker.toml");
    std::fs::write(
        &cfg,
        "name = \"b-1\"\nlisten_quic = \"127.0.0.1:7401\"\nbogus_key = 1\n",
    )
    .expect("write");
    let cfg = cfg.to_str().expect("utf-8 path");
    let out = umbra(
        home.path(),
        &["broker", "--config", cfg, "--metrics-listen", "none"],
    );
    assert!(
        out.status.is_some(),
        "the broker started with an unknown config key: {}",
        out.describe()
    );
    assert!(
        !out.success(),
        "an unknown config key was accepted: {}",
        out.describe()
    );
    assert!(
        out.stderr.contains("bogus_key"),
        "the error does not name the unknown key: {}",
        out.describe()
    );

    // A bad value in a file names the field.
    let bad = home.path().join("bad.toml");
    std::fs::write(&bad, "listen_tcp = \"nowhere\"\n").expect("write");
    let out = umbra(
        home.path(),
        &[
            "broker",
            "--config",
            bad.to_str().expect("utf-8"),
            "--metrics-listen",
            "none",
        ],
    );
    assert!(
        !out.success() && out.status.is_some(),
        "a bad listen_tcp was accepted: {}",
        out.describe()
    );
    assert!(
        out.stderr.contains("listen_tcp"),
        "the error does not name listen_tcp: {}",
        out.describe()
    );

    // A bad flag value fails naming the flag.
    let out = umbra(
        home.path(),
        &[
            "broker",
            "--listen-quic",
            "nonsense",
            "--metrics-listen",
            "none",
        ],
    );
    assert!(
        !out.success() && out.status.is_some(),
        "--listen-quic nonsense was accepted: {}",
        out.describe()
    );
    assert!(
        out.stderr.contains("listen-quic"),
        "the error does not name --listen-quic: {}",
        out.describe()
    );

    let out = umbra(
        home.path(),
        &[
            "broker",
            "--max-staleness",
            "5x",
            "--metrics-listen",
            "none",
        ],
    );
    assert!(
        !out.success() && out.status.is_some(),
        "--max-staleness 5x was accepted: {}",
        out.describe()
    );
    assert!(
        out.stderr.contains("max-staleness"),
        "the error does not name --max-staleness: {}",
        out.describe()
    );

    // A value outside its range names the setting, for each role that has it.
    for args in [
        &[
            "broker",
            "--stream-window-kib",
            "8",
            "--metrics-listen",
            "none",
        ][..],
        &[
            "connector",
            "--stream-window-kib",
            "100000",
            "--metrics-listen",
            "none",
        ][..],
        &["agent", "--stream-window-kib", "0", "status"][..],
    ] {
        let out = umbra(home.path(), args);
        assert!(
            !out.success() && out.status.is_some(),
            "{args:?} was accepted: {}",
            out.describe()
        );
        assert!(
            out.stderr.contains("stream_window_kib") && out.stderr.contains("16 and 16384"),
            "{args:?}: the error does not name stream_window_kib and its range: {}",
            out.describe()
        );
    }

    // The same for the controller and the connector.
    let out = umbra(home.path(), &["controller", "--listen", "not-an-address"]);
    assert!(
        !out.success() && out.status.is_some(),
        "controller --listen not-an-address: {}",
        out.describe()
    );
    assert!(
        out.stderr.contains("--listen"),
        "the error does not name --listen: {}",
        out.describe()
    );
    let out = umbra(
        home.path(),
        &[
            "connector",
            "--transport",
            "carrier-pigeon",
            "--metrics-listen",
            "none",
        ],
    );
    assert!(
        !out.success() && out.status.is_some(),
        "connector --transport carrier-pigeon: {}",
        out.describe()
    );
    assert!(
        out.stderr.contains("--transport"),
        "the error does not name --transport: {}",
        out.describe()
    );
}

/// The sections of a clap help page: name -> entry lines (with their indentation).
fn help_sections(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut sections: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if !line.starts_with(' ') && line.ends_with(':') {
            current = Some(line.trim_end_matches(':').to_owned());
        } else if line.trim().is_empty() || !line.starts_with(' ') {
            if !line.trim().is_empty() {
                current = None;
            }
        } else if let Some(c) = &current {
            sections.entry(c.clone()).or_default().push(line.to_owned());
        }
    }
    sections
}

/// Entries of a help section (`Options`, `Arguments`, `Commands`) without a description.
fn undescribed(lines: &[String]) -> Vec<String> {
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut missing = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        let entry =
            indent(line) <= 6 && (t.starts_with('-') || t.starts_with('<') || indent(line) == 2);
        if !entry {
            continue;
        }
        // `--flag <V>   Description` on one line, or the description on the next, deeper.
        let same_line = t.split("  ").filter(|p| !p.trim().is_empty()).count() >= 2;
        let next_line = lines
            .get(i + 1)
            .is_some_and(|n| indent(n) > indent(line) + 2 && !n.trim_start().starts_with('-'));
        if !same_line && !next_line {
            missing.push(t.to_owned());
        }
    }
    missing
}

/// Every command's `--help`, found by walking the `Commands:` sections from the top: each
/// subcommand, option and argument has a description, and every `umbra admin` command takes
/// `-o json`.
#[test]
fn every_option_of_every_command_is_explained() {
    let home = tempfile::tempdir().expect("tempdir");
    let mut todo: Vec<Vec<String>> = vec![vec![]];
    let mut problems = Vec::new();
    let mut pages = 0;
    while let Some(cmd) = todo.pop() {
        let mut args: Vec<&str> = cmd.iter().map(String::as_str).collect();
        args.push("--help");
        let out = umbra(home.path(), &args);
        let name = format!("umbra {}", cmd.join(" "));
        if !out.success() {
            problems.push(format!("{name} --help: {}", out.describe()));
            continue;
        }
        pages += 1;
        let sections = help_sections(&out.stdout);
        let options = sections.get("Options").cloned().unwrap_or_default();
        if !options.iter().any(|l| l.contains("--help")) {
            problems.push(format!(
                "{name}: no Options section with --help:\n{}",
                out.stdout
            ));
        }
        for (section, lines) in &sections {
            for entry in undescribed(lines) {
                problems.push(format!(
                    "{name}: {section} entry without a description: {entry}"
                ));
            }
        }
        let subcommands: Vec<String> = sections
            .get("Commands")
            .map(|lines| {
                lines
                    .iter()
                    .filter(|l| l.len() - l.trim_start().len() == 2)
                    .filter_map(|l| l.split_whitespace().next())
                    .filter(|c| *c != "help")
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let admin_leaf = subcommands.is_empty() && cmd.first().is_some_and(|c| c == "admin");
        if admin_leaf && !options.iter().any(|l| l.contains("-o, --output")) {
            problems.push(format!("{name}: no -o/--output option"));
        }
        for sc in subcommands {
            let mut next = cmd.clone();
            next.push(sc);
            todo.push(next);
        }
    }
    // The walk really went everywhere: every role, admin's resources and their actions.
    assert!(pages >= 40, "only {pages} help pages found");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A setting comes from the config file, then an `UMBRA_*` variable overrides it, then a flag
/// overrides both; shown for each role with `stream_window_kib`, whose out-of-range value (8)
/// fails at start naming the field while a valid one (64) lets the role get as far as its
/// missing identity.
#[test]
fn settings_come_from_file_then_environment_then_flag() {
    let home = tempfile::tempdir().expect("tempdir");
    let roles: [(&str, &str, &[&str]); 3] = [
        (
            "broker",
            "UMBRA_BROKER_STREAM_WINDOW_KIB",
            &["--metrics-listen", "none"],
        ),
        (
            "connector",
            "UMBRA_CONNECTOR_STREAM_WINDOW_KIB",
            &["--metrics-listen", "none"],
        ),
        ("agent", "UMBRA_AGENT_STREAM_WINDOW_KIB", &[]),
    ];
    // (file, environment, flag) -> the value that must win.
    let cases: [(&str, Option<&str>, Option<&str>, &str); 5] = [
        ("8", None, None, "8"),
        ("8", Some("64"), None, "64"),
        ("64", Some("8"), None, "8"),
        ("64", Some("8"), Some("64"), "64"),
        ("64", Some("64"), Some("8"), "8"),
    ];
    let mut failures = Vec::new();
    for (role, var, extra) in roles {
        let id_dir = home.path().join(format!("{role}-no-identity"));
        let id_dir = id_dir.to_str().expect("utf-8").to_owned();
        for (i, (file, env, flag, wins)) in cases.iter().enumerate() {
            let cfg = home.path().join(format!("{role}-{i}.toml"));
            std::fs::write(&cfg, format!("stream_window_kib = {file}\n")).expect("write");
            let cfg = cfg.to_str().expect("utf-8").to_owned();
            let mut args: Vec<&str> = vec![role, "--config", &cfg, "--dir", &id_dir];
            args.extend_from_slice(extra);
            if let Some(f) = flag {
                args.extend_from_slice(&["--stream-window-kib", f]);
            }
            if role == "agent" {
                args.push("services");
            }
            let envs: Vec<(&str, &str)> = env.iter().map(|v| (var, *v)).collect();
            let out = umbra_env(home.path(), &args, &envs);
            let named = out.stderr.contains("stream_window_kib");
            let what = format!("{role}: file {file}, {var}={env:?}, flag {flag:?}");
            if out.success() || out.status.is_none() {
                failures.push(format!("{what}: did not stop at start: {}", out.describe()));
            } else if *wins == "8" && !named {
                failures.push(format!(
                    "{what}: 8 should win and be refused: {}",
                    out.describe()
                ));
            } else if *wins == "64" && (named || !out.stderr.contains("enroll")) {
                failures.push(format!(
                    "{what}: 64 should win, and the role stop only for its missing identity: {}",
                    out.describe()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// One role started with `--config FILE`: how to start it, a config that loads, what the role
/// then says when it fails for a reason that has nothing to do with the config, and configs
/// that must not load.
struct RoleConfigCase {
    role: &'static str,
    /// The command line, given the config file.
    args: fn(&str) -> Vec<String>,
    /// A config that loads (the twin of the bad ones).
    valid: String,
    /// All in stderr when the valid config is used: the role got past loading it.
    later_failure: Vec<String>,
    /// A misspelt key, with a valid config around it.
    unknown_key: &'static str,
    /// Files with one bad value, and the field each must name.
    bad: &'static [(&'static str, &'static str)],
}

/// `umbra controller`, `umbra connector`, `umbra agent` and `umbra admin` read `--config FILE`
/// at start: an
/// unknown key fails at once naming the key and the file, a bad value (wrong type, out of
/// range) names its field, and the same command with a valid file gets past the config (it
/// then fails for the reason expected here: a busy port, no identity).
#[test]
fn role_config_errors_name_what_is_wrong() {
    let home = tempfile::tempdir().expect("tempdir");
    // The controller's valid config listens on a port taken here, so that it stops after
    // loading its config, opening its database and making its CA.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = taken.local_addr().expect("local addr");
    let p = |name: &str| home.path().join(name).to_str().expect("utf-8").to_owned();
    let cases = [
        RoleConfigCase {
            role: "controller",
            args: |cfg| vec!["controller".into(), "--config".into(), cfg.into()],
            valid: format!(
                "data_dir = {:?}\nlisten = \"{busy}\"\norg = \"acme\"\ncert_lifetime_secs = 3600\n",
                p("controller-data")
            ),
            later_failure: vec![format!("cannot listen on {busy}")],
            unknown_key: "listen_adress",
            bad: &[
                ("listen = \"nowhere\"\n", "listen"),
                ("token_ttl_secs = \"1h\"\n", "token_ttl_secs"),
                ("cert_lifetime_secs = 0\n", "cert_lifetime_secs"),
                ("org = \"Bad Org\"\n", "org"),
            ],
        },
        RoleConfigCase {
            role: "connector",
            args: |cfg| {
                ["connector", "--config", cfg, "--metrics-listen", "none"]
                    .map(String::from)
                    .to_vec()
            },
            valid: format!(
                "identity_dir = {:?}\ntransport = \"tcp\"\ndial_timeout_ms = 2000\n",
                p("no-connector")
            ),
            later_failure: vec![p("no-connector"), "enroll".into()],
            unknown_key: "identity_dri",
            bad: &[
                ("transport = \"udp\"\n", "transport"),
                ("idle_timeout_secs = -1\n", "idle_timeout_secs"),
                ("dial_timeout_ms = 0\n", "dial_timeout_ms"),
                ("reconnect_cap_ms = 1\n", "reconnect_cap_ms"),
            ],
        },
        RoleConfigCase {
            role: "agent",
            args: |cfg| {
                ["agent", "--config", cfg, "services"]
                    .map(String::from)
                    .to_vec()
            },
            valid: format!(
                "identity_dir = {:?}\ntransport = \"quic\"\nopen_timeout_ms = 500\n",
                p("no-agent")
            ),
            later_failure: vec![p("no-agent"), "enroll".into()],
            unknown_key: "open_timeout",
            bad: &[
                ("transport = \"carrier-pigeon\"\n", "transport"),
                ("idle_timeout_secs = \"5m\"\n", "idle_timeout_secs"),
                ("open_timeout_ms = 120000\n", "open_timeout_ms"),
                ("stream_window_kib = 8\n", "stream_window_kib"),
            ],
        },
        RoleConfigCase {
            role: "admin",
            args: |cfg| {
                ["admin", "--config", cfg, "user", "list"]
                    .map(String::from)
                    .to_vec()
            },
            valid: format!(
                "controller = \"https://127.0.0.1:9\"\ntoken = \"t\"\nca_file = {:?}\n",
                p("no-ca.pem")
            ),
            later_failure: vec![format!("cannot read {}", p("no-ca.pem"))],
            unknown_key: "controler",
            bad: &[
                ("controller = 7400\n", "controller"),
                ("token_file = [1]\n", "token_file"),
            ],
        },
    ];

    let mut failures = Vec::new();
    for case in &cases {
        let role = case.role;
        let run = |file: &str, text: &str| {
            let path = home.path().join(format!("{role}-{file}.toml"));
            std::fs::write(&path, text).expect("write config");
            let path = path.to_str().expect("utf-8").to_owned();
            let args = (case.args)(&path);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            (path, umbra(home.path(), &args))
        };

        // (a) An unknown key: the process exits (it does not start), naming the key and file.
        let (path, out) = run(
            "unknown",
            &format!("{}{} = 1\n", case.valid, case.unknown_key),
        );
        if out.success() || out.status.is_none() {
            failures.push(format!(
                "{role}: unknown key {} did not fail at start: {}",
                case.unknown_key,
                out.describe()
            ));
        } else if !out.stderr.contains(case.unknown_key) || !out.stderr.contains(&path) {
            failures.push(format!(
                "{role}: the error does not name the unknown key {} and the file {path}: {}",
                case.unknown_key,
                out.describe()
            ));
        }

        // (b) A bad value names its field.
        for (i, (text, field)) in case.bad.iter().enumerate() {
            let (_, out) = run(&format!("bad-{i}"), text);
            if out.success() || out.status.is_none() {
                failures.push(format!(
                    "{role}: {text:?} did not fail at start: {}",
                    out.describe()
                ));
            } else if !out.stderr.contains(field) {
                failures.push(format!(
                    "{role}: the error for {text:?} does not name {field}: {}",
                    out.describe()
                ));
            }
        }

        // (c) The twin: the same command with a valid config gets past it.
        let (path, out) = run("valid", &case.valid);
        let config_error = [
            "config file",
            "invalid configuration",
            "invalid connector configuration",
            "invalid agent configuration",
            path.as_str(),
        ]
        .into_iter()
        .find(|w| out.stderr.contains(w));
        if out.success() || out.status.is_none() {
            failures.push(format!(
                "{role}: with a valid config, expected to exit on {:?}: {}",
                case.later_failure,
                out.describe()
            ));
        } else if let Some(w) = config_error {
            failures.push(format!(
                "{role}: a valid config was refused ({w:?} in stderr): {}",
                out.describe()
            ));
        } else if !case.later_failure.iter().all(|w| out.stderr.contains(w)) {
            failures.push(format!(
                "{role}: with a valid config, expected {:?} in stderr: {}",
                case.later_failure,
                out.describe()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "config errors:\n{}",
        failures.join("\n")
    );
}

/// A bad `UMBRA_CA_KEY` is reported as that variable, not as a `ca_key` setting the
/// operator never wrote. The twin: a good one starts the controller.
#[test]
fn a_bad_ca_key_variable_is_named() {
    let home = tempfile::tempdir().expect("tempdir");
    let data = home.path().join("ctl");
    let args = [
        "controller",
        "--data-dir",
        data.to_str().expect("utf-8"),
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "none",
    ];
    let out = umbra_env(home.path(), &args, &[("UMBRA_CA_KEY", "short")]);
    assert!(
        !out.success() && out.stderr.contains("UMBRA_CA_KEY") && !out.stderr.contains("ca_key"),
        "{}",
        out.describe()
    );
    let key = "ab".repeat(32);
    let mut cmd = Command::new(common::umbra());
    cmd.args(args).current_dir(home.path());
    common::clean_env(&mut cmd, home.path());
    cmd.env("UMBRA_CA_KEY", &key);
    let mut p = Proc::spawn(
        "controller",
        cmd,
        home.path().join("ctl.stdout"),
        home.path().join("ctl.stderr"),
    );
    let r = poll(Duration::from_secs(30), || {
        if p.stdout_text().contains("controller listening on") {
            Ok(())
        } else {
            Err(format!("not listening: {}", p.tails(10)))
        }
    });
    r.unwrap_or_else(|e| panic!("{e}"));
    p.interrupt();
    let _ = p.wait_exit(Duration::from_secs(20));
}

#[test]
fn admin_without_a_controller_says_so() {
    let home = tempfile::tempdir().expect("tempdir");
    let out = umbra(home.path(), &["admin", "user", "list"]);
    assert!(
        !out.success() && out.status.is_some(),
        "admin with no controller: {}",
        out.describe()
    );
    assert!(
        out.stderr.contains("controller") && out.stderr.contains("--controller"),
        "the error does not say a controller is needed and how to give it: {}",
        out.describe()
    );
    assert!(
        !out.stderr.contains("panicked"),
        "admin panicked: {}",
        out.describe()
    );

    // A forward on an address other hosts reach is refused, naming the way to allow it.
    let out = umbra(
        home.path(),
        &["agent", "forward", "demo", "--listen", "0.0.0.0:18080"],
    );
    assert!(
        !out.success()
            && out.stderr.contains("refusing to listen on 0.0.0.0:18080")
            && out.stderr.contains("--allow-remote-clients"),
        "forward on 0.0.0.0: {}",
        out.describe()
    );

    // An agent that never enrolled says so, instead of failing obscurely.
    let d = home.path().join("no-agent");
    let out = umbra(
        home.path(),
        &["agent", "--dir", d.to_str().expect("utf-8"), "services"],
    );
    assert!(
        !out.success() && out.status.is_some(),
        "agent services without identity: {}",
        out.describe()
    );
    assert!(
        out.stderr.contains("enroll"),
        "the error does not say to enroll first: {}",
        out.describe()
    );
}

/// `umbra admin` pointed at a plain HTTP port (a metrics port, a proxy) says it cannot reach
/// the controller and fails with status 1, every time. It used to die of SIGPIPE now and then,
/// with nothing said: its TLS alert went out with `writev` (no `MSG_NOSIGNAL`) on a
/// connection the server had reset, while SIGPIPE was reset to its default for stdout. The
/// server is axum's, as the roles' metrics listeners are; 20 tries (about 2 in 5 died).
#[test]
fn admin_pointed_at_a_plain_http_port_says_so_every_time() {
    let home = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let url = format!("https://{}", listener.local_addr().expect("addr"));
    rt.spawn(async move {
        let app = axum::Router::new().route("/metrics", axum::routing::get(|| async { "" }));
        let _ = axum::serve(listener, app).await;
    });
    // Any PEM certificate will do: the handshake never gets that far.
    let ca = home.path().join("ca.pem");
    let org = umbra_pki::Ca::generate("acme", std::time::SystemTime::now()).expect("ca");
    std::fs::write(&ca, org.cert_pem()).expect("ca.pem");
    for i in 0..20 {
        let out = umbra(
            home.path(),
            &[
                "admin",
                "-o",
                "json",
                "--controller",
                &url,
                "--ca-file",
                ca.to_str().expect("utf-8"),
                "--token",
                "umbra-admin-x",
                "user",
                "list",
            ],
        );
        let e: Value = serde_json::from_str(out.stderr.trim())
            .unwrap_or_else(|e| panic!("try {i}: not JSON ({e}): {}", out.describe()));
        assert!(
            code(&out) == Some(1)
                && e["error"]
                    .as_str()
                    .is_some_and(|m| m.contains("cannot reach the controller")),
            "try {i}: {}",
            out.describe()
        );
    }
}

/// A base port where P, P+1, P+2 (TCP and UDP), P+80 and P+90 are free on loopback, starting from a
/// pid-derived place so that parallel runs rarely meet.
fn quickstart_base_port() -> u16 {
    let start = 27_400 + (std::process::id() % 1000) as u16 * 5;
    let mut p = start;
    loop {
        if common::port_free(p, false)
            && common::port_free(p + 1, true)
            && common::port_free(p + 2, true)
            && common::port_free(p + 80, false)
            && common::port_free(p + 90, false)
        {
            return p;
        }
        p += 5;
        assert!(
            p < start + 5000,
            "no free port range for quickstart near {start}"
        );
    }
}

struct Quickstart {
    proc: Proc,
}

impl Quickstart {
    /// `umbra quickstart [--data-dir DATA] --base-port BASE`: without DATA, in its default
    /// directory under `home` (the child's HOME).
    fn start(home: &Path, data: Option<&Path>, base: u16, run: u32) -> Quickstart {
        let mut cmd = Command::new(common::umbra());
        cmd.arg("quickstart");
        if let Some(data) = data {
            cmd.arg("--data-dir").arg(data);
        }
        cmd.args(["--base-port", &base.to_string()])
            .current_dir(home);
        common::clean_env(&mut cmd, home);
        let proc = Proc::spawn(
            "quickstart",
            cmd,
            home.join(format!("quickstart.{run}.stdout")),
            home.join(format!("quickstart.{run}.stderr")),
        );
        Quickstart { proc }
    }

    /// Waits for the "Next" instructions; returns the printed agent command line.
    fn next_steps(&mut self) -> Vec<String> {
        let r = poll(Duration::from_secs(60), || {
            let text = self.proc.stdout_text();
            if text.contains("Next, in another terminal")
                && let Some(line) = text
                    .lines()
                    .find(|l| l.contains(" agent --dir ") && l.contains(" forward demo"))
            {
                return Ok(line
                    .split_whitespace()
                    .map(String::from)
                    .collect::<Vec<_>>());
            }
            if let Some(s) = self.proc.exited() {
                return Err(format!(
                    "quickstart exited ({s}) before printing the next steps"
                ));
            }
            Err("quickstart did not print the next steps (with an `agent --dir ... forward demo` line) in 60 s".into())
        });
        match r {
            Ok(v) => v,
            Err(e) => panic!("{e}\n{}", self.proc.tails(40)),
        }
    }
}

/// Runs the printed `umbra agent --dir DIR forward demo --listen ADDR` on a free port and GETs
/// the demo page through it.
fn forward_and_get(home: &Path, printed: &[String], q: &Quickstart) -> String {
    assert!(
        printed.len() >= 6 && printed[1] == "agent" && printed[2] == "--dir",
        "unexpected agent command line: {printed:?}"
    );
    let mut args: Vec<String> = printed[1..].to_vec();
    // Port 0, and the port the agent prints: a port picked here could be taken meanwhile.
    match args.iter().position(|a| a == "--listen") {
        Some(i) if i + 1 < args.len() => args[i + 1] = "127.0.0.1:0".into(),
        _ => panic!("the printed agent command has no --listen ADDR: {printed:?}"),
    }
    static RUN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let run = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let agent_dir = Path::new(&args[2]).to_path_buf();
    assert!(
        agent_dir.join("cert.pem").exists(),
        "the printed agent dir {} holds no identity",
        agent_dir.display()
    );
    let mut cmd = Command::new(common::umbra());
    cmd.args(&args).current_dir(home);
    common::clean_env(&mut cmd, home);
    let mut agent = Proc::spawn(
        "agent",
        cmd,
        home.join(format!("agent.{run}.stdout")),
        home.join(format!("agent.{run}.stderr")),
    );
    let r = poll(Duration::from_secs(20), || {
        if let Some(s) = agent.exited() {
            return Err(format!("the agent exited: {s}"));
        }
        let port = printed_port(&agent.stdout_text(), "forwarding 127.0.0.1:")
            .ok_or("the agent has not printed its forward yet")?;
        let answer = common::http_get(port)?;
        if answer.starts_with("HTTP/1.")
            && answer.contains(" 200 ")
            && answer.contains("hello from the demo app")
        {
            Ok(answer)
        } else {
            Err(format!("unexpected answer: {answer:?}"))
        }
    });
    let answer = match r {
        Ok(a) => a,
        Err(e) => panic!(
            "GET through the printed forward failed: {e}\n{}\n{}\nquickstart log (umbra.log):\n{}",
            agent.tails(30),
            q.proc.tails(30),
            common::tail(&agent_dir.parent().expect("data dir").join("umbra.log"), 30)
        ),
    };
    agent.interrupt();
    let status = agent.wait_exit(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "the agent did not exit cleanly on Ctrl-C: {status:?}\n{}",
        agent.tails(20)
    );
    answer
}

/// What the controller holds, as `umbra admin --config ADMIN_TOML -o json KIND list` shows it:
/// for each kind, one row per object with the fields that identify it, sorted.
fn inventory(home: &Path, admin_cfg: &Path) -> BTreeMap<&'static str, Vec<String>> {
    let cfg = admin_cfg.to_str().expect("utf-8");
    let kinds: [(&'static str, &[&str]); 6] = [
        ("user", &["id"]),
        ("device", &["id", "user"]),
        ("service", &["name", "target", "connectors"]),
        ("policy", &["name"]),
        ("broker", &["name", "id"]),
        ("connector", &["name", "id"]),
    ];
    kinds
        .into_iter()
        .map(|(kind, fields)| {
            let out = umbra(
                home,
                &["admin", "--config", cfg, "-o", "json", kind, "list"],
            );
            assert!(
                out.success(),
                "umbra admin --config {cfg} -o json {kind} list: {}",
                out.describe()
            );
            let list: Vec<Value> = serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
                panic!(
                    "`{kind} list -o json` is not a JSON array ({e}): {}",
                    out.stdout
                )
            });
            let mut rows: Vec<String> = list
                .iter()
                .map(|o| {
                    fields
                        .iter()
                        .map(|f| match &o[*f] {
                            Value::String(s) => s.clone(),
                            v => v.to_string(),
                        })
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect();
            rows.sort();
            (kind, rows)
        })
        .collect()
}

/// The objects quickstart makes, once each: user demo@example.test with one device, service
/// demo (to `app`, through demo-connector), one policy, two brokers, one connector.
fn assert_quickstart_objects(inv: &BTreeMap<&'static str, Vec<String>>, app: SocketAddr) {
    let names = |kind: &str| -> Vec<&str> {
        inv[kind]
            .iter()
            .map(|r| r.split(' ').next().unwrap_or_default())
            .collect()
    };
    let devices = &inv["device"];
    let service = format!("demo {app} ");
    let checks = [
        (
            names("user") == ["demo@example.test"],
            "one user, demo@example.test",
        ),
        (
            devices.len() == 1 && devices[0].ends_with(" demo@example.test"),
            "one device, of demo@example.test",
        ),
        (
            inv["service"].len() == 1 && inv["service"][0].starts_with(&service),
            "one service, demo, to the demo app",
        ),
        (inv["policy"].len() == 1, "one policy"),
        (names("broker") == ["broker-1", "broker-2"], "two brokers"),
        (names("connector") == ["demo-connector"], "one connector"),
    ];
    let wrong: Vec<&str> = checks.iter().filter(|c| !c.0).map(|c| c.1).collect();
    assert!(
        wrong.is_empty(),
        "the controller does not hold what quickstart makes: expected {wrong:?}; it holds {inv:#?}"
    );
}

#[test]
fn quickstart_runs_stops_and_resumes() {
    umbra_pki::install_crypto_provider();
    let home = tempfile::tempdir().expect("tempdir");
    // The first run is given no --data-dir: it uses the default under HOME and says so.
    let data = home.path().join(".local/share/umbra/quickstart");
    let base = quickstart_base_port();

    // First run: everything is set up from nothing.
    let mut q = Quickstart::start(home.path(), None, base, 1);
    let printed = q.next_steps();
    let out = q.proc.stdout_text();
    assert!(
        out.lines()
            .any(|l| l.trim_end().ends_with(&data.display().to_string())),
        "the first run does not print the data directory it uses ({}):\n{out}",
        data.display()
    );
    assert!(
        out.contains("curl http://127.0.0.1:"),
        "no curl step printed:\n{out}"
    );
    // The demo app listens on loopback only, on the address it prints.
    let app: SocketAddr = out
        .lines()
        .find_map(|l| l.split_once("demo app on ")?.1.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no `demo app on ADDR` printed:\n{out}"));
    assert!(
        app.ip().is_loopback() && app.port() == base + 80,
        "the demo app is not on 127.0.0.1:{}: {app}",
        base + 80
    );
    std::net::TcpStream::connect_timeout(&app, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("the demo app does not answer on {app}: {e}"));
    #[cfg(target_os = "linux")]
    {
        // All of 127/8 reaches this host on Linux: a listener on every address would answer
        // 127.0.0.2, one bound to 127.0.0.1 does not.
        let other = SocketAddr::from(([127, 0, 0, 2], app.port()));
        assert!(
            std::net::TcpStream::connect_timeout(&other, Duration::from_secs(2)).is_err(),
            "the demo app answers on {other}: it is not bound to {app} only"
        );
    }
    forward_and_get(home.path(), &printed, &q);
    // Every role's metrics, at the printed loopback address (and not on the public API).
    let metrics_port = base + 90;
    assert!(
        out.contains(&format!("http://127.0.0.1:{metrics_port}/metrics")),
        "the metrics address is not printed:\n{out}"
    );
    let metrics = common::http_get_path(metrics_port, "/metrics")
        .unwrap_or_else(|e| panic!("GET /metrics on 127.0.0.1:{metrics_port}: {e}"));
    for name in [
        "umbra_enrollments_total",
        "umbra_snapshot_version",
        "umbra_broker_decisions_total",
        "umbra_relay_bytes_total",
    ] {
        assert!(
            metrics.contains(name),
            "quickstart's /metrics has no {name}:\n{metrics}"
        );
    }
    let ca_first = std::fs::read_to_string(data.join("ca.pem")).expect("quickstart wrote ca.pem");

    // The printed admin step works as printed.
    let admin_step: Vec<String> = out
        .lines()
        .find(|l| l.contains(" admin --config "))
        .unwrap_or_else(|| panic!("no admin step printed:\n{out}"))
        .split_whitespace()
        .map(String::from)
        .collect();
    let admin_args: Vec<&str> = admin_step[1..].iter().map(String::as_str).collect();
    let streams = umbra(home.path(), &admin_args);
    assert!(
        streams.success(),
        "the printed admin step {admin_step:?}: {}",
        streams.describe()
    );
    // It holds each object quickstart makes, once.
    let admin_cfg = data.join("admin.toml");
    let first = inventory(home.path(), &admin_cfg);
    assert_quickstart_objects(&first, app);
    // `audit list` is `audit`, like every other kind's `list`.
    let cfg_arg = admin_cfg.to_str().expect("utf-8");
    let audit = |extra: &[&str]| {
        let mut args = vec!["admin", "--config", cfg_arg, "-o", "json", "audit"];
        args.extend_from_slice(extra);
        let out = umbra(home.path(), &args);
        assert!(out.success(), "{args:?}: {}", out.describe());
        serde_json::from_str::<Value>(&out.stdout).expect("JSON")
    };
    // Devices by user, and a page of them; a user with none lists none.
    let device_list = |extra: &[&str]| {
        let mut args = vec!["admin", "--config", cfg_arg, "-o", "json", "device", "list"];
        args.extend_from_slice(extra);
        let out = umbra(home.path(), &args);
        assert!(out.success(), "{args:?}: {}", out.describe());
        serde_json::from_str::<Value>(&out.stdout).expect("JSON")
    };
    let demo = device_list(&["--user", "demo@example.test", "--limit", "1"]);
    assert_eq!(demo.as_array().map(Vec::len), Some(1), "{demo}");
    assert_eq!(demo[0]["user"], "demo@example.test", "{demo}");
    let after = device_list(&["--after", demo[0]["id"].as_str().expect("id")]);
    assert_eq!(
        after,
        serde_json::json!([]),
        "quickstart enrolls one device"
    );
    // The user as typed, normalised; an unknown user is an error naming the field.
    assert_eq!(
        device_list(&["--user", "Demo@Example.TEST"]),
        device_list(&["--user", "demo@example.test"])
    );
    let unknown = umbra(
        home.path(),
        &[
            "admin",
            "--config",
            cfg_arg,
            "device",
            "list",
            "--user",
            "nobody@example.test",
        ],
    );
    assert!(
        !unknown.success()
            && unknown
                .stderr
                .contains("no user nobody@example.test (field user)"),
        "{}",
        unknown.describe()
    );
    // Each broker and the connector announced this build's version.
    for what in ["broker", "connector"] {
        let v = umbra(
            home.path(),
            &["admin", "--config", cfg_arg, "-o", "json", what, "list"],
        );
        let v: Value = serde_json::from_str(&v.stdout).expect("JSON");
        let all = v.as_array().expect("a list");
        assert!(
            !all.is_empty()
                && all
                    .iter()
                    .all(|x| x["version"] == env!("CARGO_PKG_VERSION")),
            "{what}: {v}"
        );
    }
    // Where each credential stands: in the JSON, and as a column of the table.
    assert_eq!(demo[0]["cert_state"], "valid", "{demo}");
    assert!(
        demo[0]["renew_until"].as_u64() > demo[0]["cert_not_after"].as_u64(),
        "{demo}"
    );
    let table = umbra(
        home.path(),
        &["admin", "--config", cfg_arg, "device", "list"],
    );
    let header = table.stdout.lines().next().unwrap_or_default().to_owned();
    assert!(
        table.success()
            && header.contains("STATE")
            && header.contains("RENEWS UNTIL")
            && table
                .stdout
                .lines()
                .nth(1)
                .is_some_and(|l| l.contains("valid")),
        "{}",
        table.describe()
    );
    let listed = audit(&["list", "--limit", "3"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(3), "{listed}");
    assert_eq!(listed, audit(&["--limit", "3"]));
    // A full page says, on stderr, that it may not be all and how to go on; a page that
    // holds the rest, and the newest events, say nothing.
    let page = umbra(
        home.path(),
        &["admin", "--config", cfg_arg, "audit", "--limit", "3"],
    );
    let next = format!("--after {} for the next page", listed[2]["seq"]);
    assert!(
        page.success() && page.stderr.contains(&next) && page.stdout.lines().count() == 4,
        "{}",
        page.describe()
    );
    for quiet in [&["--limit", "1000"][..], &["--last", "3"][..]] {
        let mut args = vec!["admin", "--config", cfg_arg, "audit"];
        args.extend_from_slice(quiet);
        let out = umbra(home.path(), &args);
        assert!(
            out.success() && !out.stderr.contains("more may follow"),
            "{quiet:?}: {}",
            out.describe()
        );
    }
    // The newest events, and filters (an identity URI as the target goes through encoded).
    let all = audit(&["--limit", "1000"]);
    let all = all.as_array().expect("a list");
    let newest = audit(&["--last", "2"]);
    assert_eq!(
        newest.as_array().map(Vec::as_slice),
        Some(&all[all.len() - 2..])
    );
    let agent_enroll = all
        .iter()
        .find(|e| {
            e["action"] == "enroll"
                && e["target"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("umbra://default/agent/"))
        })
        .expect("the agent's enrollment is audited");
    let target = agent_enroll["target"].as_str().expect("a target");
    let found = audit(&["--action", "enroll", "--result", "ok", "--target", target]);
    assert_eq!(found, Value::Array(vec![agent_enroll.clone()]));
    let both = umbra(
        home.path(),
        &[
            "admin", "--config", cfg_arg, "audit", "--limit", "3", "--last", "2",
        ],
    );
    assert!(
        !both.success() && both.stderr.contains("--last"),
        "--limit with --last: {}",
        both.describe()
    );
    // `audit --follow`: the newest matching events, then each new one as it is recorded, one
    // JSON object per line; Ctrl-C ends it cleanly.
    let mut cmd = Command::new(common::umbra());
    cmd.args([
        "admin",
        "--config",
        cfg_arg,
        "-o",
        "json",
        "audit",
        "--follow",
        "--action",
        "user.create",
    ])
    .current_dir(home.path());
    common::clean_env(&mut cmd, home.path());
    let mut follower = common::Proc::spawn(
        "audit-follow",
        cmd,
        home.path().join("follow.stdout"),
        home.path().join("follow.stderr"),
    );
    let lines = |p: &common::Proc| -> Vec<Value> {
        p.stdout_text()
            .lines()
            .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
            .collect()
    };
    let newest = common::poll(Duration::from_secs(10), || match lines(&follower) {
        l if l.is_empty() => Err("nothing printed yet".to_string()),
        l => Ok(l),
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", follower.tails(10)));
    assert!(
        newest.iter().all(|e| e["action"] == "user.create"),
        "{newest:?}"
    );
    let added = umbra(
        home.path(),
        &[
            "admin",
            "--config",
            cfg_arg,
            "user",
            "add",
            "followed@example.test",
        ],
    );
    assert!(added.success(), "{}", added.describe());
    common::poll(Duration::from_secs(10), || {
        let l = lines(&follower);
        match l.last() {
            Some(e) if e["target"] == "followed@example.test" => Ok(()),
            _ => Err(format!("the new user's event was not printed: {l:?}")),
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", follower.tails(10)));
    follower.interrupt();
    let status = follower.wait_exit(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "audit --follow on Ctrl-C: {status:?}\n{}",
        follower.tails(10)
    );
    let removed = umbra(
        home.path(),
        &[
            "admin",
            "--config",
            cfg_arg,
            "user",
            "rm",
            "followed@example.test",
        ],
    );
    assert!(removed.success(), "{}", removed.describe());

    q.proc.interrupt();
    let status = q.proc.wait_exit(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "quickstart did not exit 0 on Ctrl-C: {status:?}\n{}",
        q.proc.tails(30)
    );

    // Second run on the same directory, now given as --data-dir, relative to where it runs:
    // same CA, same objects (none made twice), works again; what it prints names the
    // directory absolutely, so the commands work from anywhere.
    let relative = data.strip_prefix(home.path()).expect("under home");
    let mut q = Quickstart::start(home.path(), Some(relative), base, 2);
    let printed = q.next_steps();
    assert!(
        printed
            .iter()
            .any(|l| l.contains(&data.display().to_string())),
        "{printed:?}"
    );
    let ca_second = std::fs::read_to_string(data.join("ca.pem")).expect("ca.pem");
    assert_eq!(
        ca_first, ca_second,
        "the second run made a new CA instead of resuming"
    );
    let second = inventory(home.path(), &admin_cfg);
    assert_eq!(
        first, second,
        "the second run changed what the controller holds instead of reusing it"
    );
    forward_and_get(home.path(), &printed, &q);

    // Enrolling again into a directory that holds a valid identity is refused before the
    // token is spent, and changes nothing; with --force the same token replaces it.
    let cfg = admin_cfg.to_str().expect("utf-8");
    let made = umbra(
        home.path(),
        &[
            "admin", "--config", cfg, "token", "create", "--role", "agent", "--user", USER_QS,
        ],
    );
    assert!(made.success(), "token create: {}", made.describe());
    let token = made.stdout.trim().to_owned();
    let agent_dir = data.join("agent");
    let dir_arg = agent_dir.to_str().expect("utf-8");
    let controller = format!("https://127.0.0.1:{base}");
    let cert_before = std::fs::read(agent_dir.join("cert.pem")).expect("agent cert");
    let enroll = |extra: &[&str]| {
        let mut args = vec!["--token", token.as_str()];
        args.extend_from_slice(extra);
        enroll_agent_cmd(home.path(), dir_arg, &controller, &args, &[])
    };
    let out = enroll(&[]);
    assert!(
        !out.success()
            && out.stderr.contains("already holds an unexpired identity")
            && out.stderr.contains("--force")
            && out.stderr.contains("umbra admin device revoke d-"),
        "enrolling over a valid identity: {}",
        out.describe()
    );
    assert_eq!(
        std::fs::read(agent_dir.join("cert.pem")).expect("agent cert"),
        cert_before,
        "a refused enrollment changed the identity"
    );
    let out = enroll(&["--force"]);
    assert!(
        out.success() && out.stdout.contains("enrolled umbra://default/agent/"),
        "the same token with --force: {}",
        out.describe()
    );
    assert_ne!(
        std::fs::read(agent_dir.join("cert.pem")).expect("agent cert"),
        cert_before,
        "--force did not replace the identity"
    );
    // The token is spent now: used again it is refused, and counted under its role.
    let out = enroll(&["--force"]);
    assert!(!out.success(), "a spent token enrolled: {}", out.describe());
    let metrics = common::http_get_path(base + 90, "/metrics").expect("metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("umbra_enrollments_total")
                && l.contains("role=\"agent\"")
                && l.contains("result=\"refused\"")),
        "a spent token's refusal is not counted under its role:\n{metrics}"
    );
    forward_and_get(home.path(), &printed, &q);

    // Rotating the admin token: with the config's token file, the new token goes into that
    // file, so the same command line keeps working, and the old token is refused.
    let before_rotation = inventory(home.path(), &admin_cfg);
    let token_file = data.join("admin.token");
    let old_token = std::fs::read_to_string(&token_file).expect("admin.token");
    let old_token = old_token.trim();
    let ca_file = data.join("ca.pem");
    let ca_arg = ca_file.to_str().expect("utf-8");
    let with_token = |token: &str, cmd: &[&str]| {
        let mut args = vec![
            "admin",
            "--controller",
            &controller,
            "--ca-file",
            ca_arg,
            "--token",
            token,
        ];
        args.extend_from_slice(cmd);
        umbra(home.path(), &args)
    };
    // Refused with a wrong token: nothing changes.
    let out = with_token("umbra-admin-wrong", &["admin-token", "rotate"]);
    assert!(
        !out.success() && out.stderr.contains("invalid admin token"),
        "rotation with a wrong token: {}",
        out.describe()
    );
    assert!(with_token(old_token, &["user", "list"]).success());
    let out = umbra(
        home.path(),
        &["admin", "--config", cfg, "admin-token", "rotate"],
    );
    let new_token = out.stdout.trim().to_owned();
    assert!(
        out.success() && new_token.starts_with("umbra-admin-") && new_token != old_token,
        "admin-token rotate: {}",
        out.describe()
    );
    assert!(
        out.stderr.contains("no longer work") && out.stderr.contains("admin.token"),
        "rotate does not say what happened: {}",
        out.describe()
    );
    assert_eq!(
        std::fs::read_to_string(&token_file)
            .expect("admin.token")
            .trim(),
        new_token,
        "the token file was not updated"
    );
    let refused = with_token(old_token, &["user", "list"]);
    assert!(
        !refused.success() && refused.stderr.contains("invalid admin token"),
        "the old token still works: {}",
        refused.describe()
    );
    // A script asking for JSON gets its error as JSON.
    let refused = with_token(old_token, &["-o", "json", "user", "list"]);
    let e: serde_json::Value = serde_json::from_str(refused.stderr.trim())
        .unwrap_or_else(|e| panic!("-o json error is not JSON ({e}): {}", refused.describe()));
    assert!(
        !refused.success()
            && e["error"]
                .as_str()
                .is_some_and(|m| m.contains("invalid admin token")),
        "{}",
        refused.describe()
    );
    assert_eq!(inventory(home.path(), &admin_cfg), before_rotation);
    // Rotated once more with the token given on the command line: the file is left stale.
    let out = with_token(&new_token, &["-o", "json", "admin-token", "rotate"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("rotate -o json: {e}: {}", out.describe()));
    assert!(
        v["token"]
            .as_str()
            .is_some_and(|t| t.starts_with("umbra-admin-"))
            && v["replaced"] == 1
            && v["token_file"].is_null(),
        "{v}"
    );
    // Through a symlink (to a secrets mount, say), the file it points to gets the new token
    // and the link stays.
    let latest = v["token"].as_str().expect("token").to_owned();
    std::fs::write(&token_file, format!("{latest}\n")).expect("store the token");
    let link = home.path().join("token-link");
    std::os::unix::fs::symlink(&token_file, &link).expect("symlink");
    // Shared with a group that reads it: that stays so.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o640))
            .expect("chmod");
    }
    let out = umbra(
        home.path(),
        &[
            "admin",
            "--controller",
            &controller,
            "--ca-file",
            ca_arg,
            "--token-file",
            link.to_str().expect("utf-8"),
            "admin-token",
            "rotate",
        ],
    );
    assert!(out.success(), "rotate through a link: {}", out.describe());
    assert!(
        std::fs::symlink_metadata(&link)
            .expect("link")
            .file_type()
            .is_symlink(),
        "the link was replaced by a file"
    );
    assert_eq!(
        std::fs::read_to_string(&token_file)
            .expect("admin.token")
            .trim(),
        out.stdout.trim(),
        "the file behind the link was not updated"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_file)
            .expect("token file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640, "the file's readers lost it");
    }
    // Rotated once more by a token on the command line, the file holds a dead token again
    // (what the next run must recover from).
    let out = with_token(out.stdout.trim(), &["admin-token", "rotate"]);
    assert!(out.success(), "{}", out.describe());

    q.proc.interrupt();
    let status = q.proc.wait_exit(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "the second quickstart did not exit 0 on Ctrl-C: {status:?}\n{}",
        q.proc.tails(30)
    );

    // As if an enrollment had been cut short between its files: the connector's identity
    // without its controller reference. The next run enrolls it again instead of failing.
    std::fs::remove_file(data.join("connector/controller.json"))
        .expect("connector/controller.json");

    // Third run: quickstart finds its stored token refused, takes a new one, and goes on.
    let mut q = Quickstart::start(home.path(), Some(&data), base, 3);
    let printed = q.next_steps();
    assert!(
        q.proc.stdout_text().contains("no longer worked"),
        "quickstart did not say it replaced the admin token:\n{}",
        q.proc.tails(30)
    );
    // The same objects, but for the connector enrolled again under its name (the one whose
    // enrollment was cut short stays listed until an administrator revokes it).
    let mut third = inventory(home.path(), &admin_cfg);
    let mut expected = before_rotation.clone();
    let connectors = third.remove("connector").unwrap_or_default();
    let before = expected.remove("connector").unwrap_or_default();
    assert_eq!(third, expected);
    assert!(
        connectors.len() == before.len() + 1
            && before.iter().all(|c| connectors.contains(c))
            && connectors.iter().all(|c| c.starts_with("demo-connector ")),
        "connectors after enrolling one again: {connectors:?} (before: {before:?})"
    );
    forward_and_get(home.path(), &printed, &q);
    q.proc.interrupt();
    let status = q.proc.wait_exit(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "the third quickstart did not exit 0 on Ctrl-C: {status:?}\n{}",
        q.proc.tails(30)
    );

    // As if the first run had been killed between storing the admin token's hash and
    // writing it out: no admin.token. The fourth run takes a new one and goes on.
    std::fs::remove_file(data.join("admin.token")).expect("admin.token");
    let mut q = Quickstart::start(home.path(), Some(&data), base, 4);
    q.next_steps();
    assert!(
        q.proc
            .stdout_text()
            .contains("was missing or no longer worked"),
        "quickstart did not say it replaced the admin token:\n{}",
        q.proc.tails(30)
    );
    assert!(data.join("admin.token").exists());
    let mut fourth = inventory(home.path(), &admin_cfg);
    fourth.remove("connector");
    assert_eq!(fourth, expected);
    // Runs after the first find their objects and write nothing: no refused "already
    // exists" in the audit log.
    let cfg = admin_cfg.to_str().expect("utf-8");
    let out = umbra(
        home.path(),
        &[
            "admin", "--config", cfg, "-o", "json", "audit", "--result", "error",
        ],
    );
    assert!(out.success(), "{}", out.describe());
    let errors: Vec<Value> = serde_json::from_str(&out.stdout).expect("audit -o json");
    assert!(
        errors
            .iter()
            .all(|r| !r["action"].as_str().unwrap_or("").ends_with(".create")),
        "refused creations at restarts: {errors:?}"
    );

    q.proc.interrupt();
    let status = q.proc.wait_exit(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "the fourth quickstart did not exit 0 on Ctrl-C: {status:?}\n{}",
        q.proc.tails(30)
    );
    // Its parting words resume this directory, not the default one.
    let again = format!("umbra quickstart --data-dir {}", data.display());
    assert!(
        q.proc.stdout_text().contains(&again),
        "{}",
        q.proc.tails(10)
    );

    // Another --base-port on the same directory is refused, naming the one it was set up
    // with, instead of a deployment that points at the old ports.
    let mut cmd = Command::new(common::umbra());
    cmd.arg("quickstart")
        .arg("--data-dir")
        .arg(&data)
        .args(["--base-port", &(base + 5).to_string()])
        .current_dir(home.path());
    common::clean_env(&mut cmd, home.path());
    let mut other = Proc::spawn(
        "quickstart-other-port",
        cmd,
        home.path().join("quickstart.other.stdout"),
        home.path().join("quickstart.other.stderr"),
    );
    let status = other.wait_exit(Duration::from_secs(30));
    if status.is_none() {
        other.interrupt();
        let _ = other.wait_exit(Duration::from_secs(20));
    }
    assert!(
        status.is_some_and(|s| !s.success())
            && other.stderr_text().contains(&format!("--base-port {base}")),
        "quickstart on another base port: {status:?}\n{}",
        other.tails(30)
    );
}

/// `umbra controller --reset-admin-token`: the way back in when the token is lost. It refuses
/// a data directory where no controller ever ran; on one that did, it prints a new token that
/// works while the old one is refused.
/// Starts `umbra controller` on a free loopback port with its data in `data`, and waits until
/// it listens: the process, its port, and its standard output so far (or why it did not
/// start).
fn start_controller(
    home: &Path,
    data: &str,
    run: u32,
    extra: &[&str],
) -> (Proc, u16, Result<String, String>) {
    // Port 0, and the port it prints: a port picked here could be taken meanwhile.
    let mut cmd = Command::new(common::umbra());
    cmd.args([
        "controller",
        "--data-dir",
        data,
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "none",
    ])
    .args(extra)
    .current_dir(home);
    common::clean_env(&mut cmd, home);
    let mut proc = Proc::spawn(
        "controller",
        cmd,
        home.join(format!("controller.{run}.stdout")),
        home.join(format!("controller.{run}.stderr")),
    );
    // Until it listens, or exits (no use waiting longer for a process that is gone).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let r = loop {
        let out = proc.stdout_text();
        if out.contains("controller listening on") {
            break Ok(out);
        }
        if let Some(s) = proc.exited() {
            break Err(format!("exited ({s})"));
        }
        if std::time::Instant::now() > deadline {
            break Err("not listening after 30 s".to_owned());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let port = r
        .as_ref()
        .ok()
        .and_then(|out| printed_port(out, "controller listening on https://127.0.0.1:"))
        .unwrap_or(0);
    (proc, port, r)
}

/// The exit code of a command that exited (not killed by a signal).
fn code(o: &Output) -> Option<i32> {
    o.status.and_then(|s| s.code())
}

/// The port printed right after `prefix` in `out`.
fn printed_port(out: &str, prefix: &str) -> Option<u16> {
    let rest = &out[out.find(prefix)? + prefix.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// A controller started for a test, and `umbra admin` against it.
struct AdminCtl {
    proc: Proc,
    url: String,
    ca: PathBuf,
    token: String,
}

impl AdminCtl {
    /// A fresh controller with its data in `home`/ctl.
    fn start(home: &Path) -> AdminCtl {
        let data = home.join("ctl");
        let (proc, port, r) = start_controller(home, data.to_str().expect("utf-8"), 0, &[]);
        let out = r.unwrap_or_else(|e| panic!("start: {e}\n{}", proc.tails(20)));
        AdminCtl {
            token: token_in(&out, "admin token (shown once"),
            url: format!("https://127.0.0.1:{port}"),
            ca: data.join("ca.pem"),
            proc,
        }
    }

    /// `umbra admin --controller .. --ca-file .. --token .. ARGS`.
    fn admin(&self, home: &Path, args: &[&str]) -> Output {
        let mut all = vec![
            "admin",
            "--controller",
            &self.url,
            "--ca-file",
            self.ca.to_str().expect("utf-8"),
            "--token",
            &self.token,
        ];
        all.extend_from_slice(args);
        umbra(home, &all)
    }
}

/// The last word of the first line of `out` containing `marker` (a printed token).
fn token_in(out: &str, marker: &str) -> String {
    out.lines()
        .find(|l| l.contains(marker))
        .and_then(|l| l.rsplit(' ').next())
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no `{marker}` line:\n{out}"))
}

/// `umbra admin user disable|enable`, `service set` and `policy set` against a real
/// controller: each changes the object in place and prints it; a refused change (an
/// invalid policy, nothing to change) fails naming the field and leaves the object as it
/// was. `umbra admin access` tells what the policy decides as it changes.
#[test]
fn admin_changes_in_place() {
    let home = tempfile::tempdir().expect("tempdir");
    let mut ctl = AdminCtl::start(home.path());
    let (ca, token) = (ctl.ca.clone(), ctl.token.clone());
    let admin = |args: &[&str]| ctl.admin(home.path(), args);
    let ok = |args: &[&str]| {
        let o = admin(args);
        assert!(
            o.success(),
            "umbra admin {}: {}",
            args.join(" "),
            o.describe()
        );
        o.stdout
    };
    let json = |args: &[&str]| -> Value {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        serde_json::from_str(&ok(&all)).expect("JSON output")
    };

    // A command that must fail, saying `why`.
    let refused = |args: &[&str], why: &str| {
        let o = admin(args);
        assert!(
            !o.success() && o.stderr.contains(why),
            "umbra admin {}: {}",
            args.join(" "),
            o.describe()
        );
    };
    // A field the command line calls otherwise is named by its option, not the API's name.
    let too_long = admin(&[
        "token",
        "create",
        "--role",
        "connector",
        "--name",
        "c9",
        "--ttl",
        "8d",
    ]);
    assert!(
        !too_long.success()
            && too_long.stderr.contains("(--ttl)")
            && !too_long.stderr.contains("(field"),
        "{}",
        too_long.describe()
    );
    // The admin token never goes out in clear: an http:// controller URL is refused before
    // any connection, naming the option. (Every command above and below is its twin.)
    let plain = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    plain.set_nonblocking(true).expect("nonblocking");
    let plain_url = format!("http://{}", plain.local_addr().expect("addr"));
    let o = umbra(
        home.path(),
        &[
            "admin",
            "--controller",
            &plain_url,
            "--ca-file",
            ca.to_str().expect("utf-8"),
            "--token",
            &token,
            "user",
            "list",
        ],
    );
    assert!(
        !o.success() && o.stderr.contains("--controller") && o.stderr.contains("https://"),
        "admin over http: {}",
        o.describe()
    );
    assert!(
        matches!(plain.accept(), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "admin connected to an http:// controller"
    );
    assert!(
        !o.stderr.contains(&token),
        "the token was printed: {}",
        o.describe()
    );
    // An empty token file is refused by name, not sent as an empty token.
    let empty = home.path().join("empty-admin.token");
    std::fs::write(&empty, "\n").expect("write");
    let o = umbra(
        home.path(),
        &[
            "admin",
            "--controller",
            &ctl.url,
            "--ca-file",
            ca.to_str().expect("utf-8"),
            "--token-file",
            empty.to_str().expect("utf-8"),
            "user",
            "list",
        ],
    );
    assert!(
        !o.success() && o.stderr.contains("token file") && o.stderr.contains("is empty"),
        "empty admin token file: {}",
        o.describe()
    );

    ok(&["user", "add", "ann@example.test"]);
    assert!(ok(&["user", "disable", "ann@example.test"]).contains("disabled"));
    assert_eq!(json(&["user", "list"])[0]["disabled"], true);
    assert_eq!(
        json(&["user", "enable", "ann@example.test"])["disabled"],
        false
    );

    ok(&["token", "create", "--role", "connector", "--name", "dc-1"]);
    ok(&["token", "create", "--role", "connector", "--name", "dc-2"]);
    ok(&[
        "service",
        "add",
        "wiki",
        "--target",
        "10.1.2.3:80",
        "--connector",
        "dc-1",
    ]);
    let printed = ok(&["service", "set", "wiki", "--target", "10.1.2.4:8080"]);
    assert!(
        printed.contains("10.1.2.4:8080") && printed.contains("dc-1"),
        "{printed}"
    );
    let v = json(&[
        "service",
        "set",
        "wiki",
        "--connector",
        "dc-2",
        "--connector",
        "dc-1",
    ]);
    assert_eq!(v["target"], "10.1.2.4:8080");
    assert_eq!(v["connectors"], serde_json::json!(["dc-1", "dc-2"]));
    let none = admin(&["service", "set", "wiki"]);
    assert!(
        !none.success(),
        "a set with nothing to set: {}",
        none.describe()
    );

    ok(&[
        "policy",
        "add",
        "wiki-ann",
        "--allow-user",
        "Ann@Example.test",
        "--service",
        "wiki",
    ]);
    let before = json(&["policy", "list"]);
    // Written for the id as the controller stores it, or it would never match.
    let text = before
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == "wiki-ann"))
        .and_then(|p| p["text"].as_str())
        .unwrap_or_default()
        .to_owned();
    assert!(
        text.contains(r#"Umbra::User::"ann@example.test""#),
        "{before}"
    );
    refused(
        &[
            "policy",
            "add",
            "wiki-bob",
            "--text",
            r#"forbid (principal == Umbra::User::"Bob@Example.test", action, resource);"#,
        ],
        "can never match",
    );
    let bad = admin(&["policy", "set", "wiki-ann", "--text", "permit("]);
    assert!(
        !bad.success()
            && bad.stderr.contains("invalid policy")
            && bad.stderr.contains("field text"),
        "{}",
        bad.describe()
    );
    assert_eq!(
        json(&["policy", "list"]),
        before,
        "a refused text changed the policy"
    );
    refused(
        &[
            "policy",
            "set",
            "nosuch",
            "--allow-everyone",
            "--service",
            "wiki",
        ],
        "no policy nosuch",
    );
    // A policy naming a group that does not exist (a typo) is written, and said to grant
    // nothing through it: on stderr for people, as `unknown` for scripts and in the audit.
    let typo = admin(&[
        "policy",
        "add",
        "wiki-typo",
        "--allow-group",
        "enginering",
        "--service",
        "wiki",
    ]);
    assert!(
        typo.success()
            && typo.stderr.contains(
                "policy wiki-typo names group enginering, which does not exist: it grants nothing"
            )
            && !typo.stderr.contains("service wiki"),
        "{}",
        typo.describe()
    );
    let typo_set = json(&[
        "policy",
        "set",
        "wiki-typo",
        "--text",
        r#"permit (principal in Umbra::Group::"enginering", action, resource) when { resource in [Umbra::Service::"wiki", Umbra::Service::"wikki"] };"#,
    ]);
    assert_eq!(
        typo_set["unknown"],
        serde_json::json!(["group enginering", "service wikki"]),
        "{typo_set}"
    );
    let audited = json(&["audit", "--last", "1", "--action", "policy.update"]);
    assert_eq!(
        audited[0]["detail"]["unknown"], typo_set["unknown"],
        "{audited}"
    );
    // Listings keep saying so, also of a group removed after its policy was written; the
    // removal's audit record names the policies left naming it.
    ok(&["group", "add", "gone"]);
    ok(&[
        "policy",
        "add",
        "wiki-gone",
        "--allow-group",
        "gone",
        "--service",
        "wiki",
    ]);
    ok(&["group", "rm", "gone"]);
    let removed = json(&["audit", "--last", "1", "--action", "group.delete"]);
    assert_eq!(
        removed[0]["detail"]["policies"],
        serde_json::json!(["wiki-gone"]),
        "{removed}"
    );
    let listed = json(&["policy", "list"]);
    let unknown_of = |name: &str| {
        listed
            .as_array()
            .and_then(|a| a.iter().find(|p| p["name"] == name))
            .map(|p| p["unknown"].clone())
    };
    assert_eq!(
        unknown_of("wiki-gone"),
        Some(serde_json::json!(["group gone"])),
        "{listed}"
    );
    assert_eq!(unknown_of("wiki-ann"), Some(Value::Null), "{listed}");
    assert!(
        ok(&["policy", "list"]).contains("# (names group gone, which does not exist"),
        "the table says it too"
    );
    ok(&["policy", "rm", "wiki-gone"]);
    ok(&["policy", "rm", "wiki-typo"]);
    ok(&["group", "add", "eng"]);
    // Naming only what exists: no warning.
    let known = admin(&[
        "policy",
        "set",
        "wiki-ann",
        "--allow-group",
        "eng",
        "--service",
        "wiki",
    ]);
    assert!(
        known.success() && known.stdout.contains("replaced") && !known.stderr.contains("warning"),
        "{}",
        known.describe()
    );
    let after = json(&["policy", "list"]);
    assert!(
        after[0]["text"].as_str().expect("text").contains("\"eng\""),
        "{after}"
    );
    // Who may reach what, and why, as the policy stands now.
    let decision = |v: Value| {
        (
            v["decisions"][0]["allow"].clone(),
            v["decisions"][0]["reason"].clone(),
        )
    };
    let asked = ["access", "--user", "ann@example.test", "--service", "wiki"];
    assert_eq!(
        decision(json(&asked)),
        (Value::Bool(false), Value::from("no_permit"))
    );
    ok(&["group", "add-member", "eng", "ann@example.test"]);
    assert_eq!(
        decision(json(&asked)),
        (Value::Bool(true), Value::from("permitted"))
    );
    let printed = ok(&["access", "--user", "ann@example.test"]);
    assert!(
        printed.contains("a new device in good standing")
            && printed
                .lines()
                .any(|l| l.starts_with("wiki") && l.contains("allow") && l.contains("wiki-ann")),
        "{printed}"
    );
    refused(&["access", "--user", "nobody@example.test"], "field user");
    // A reader that stops reading (`| head -c 1`) ends the command quietly, as it would any
    // Unix tool: no panic on the broken pipe.
    {
        let mut cmd = Command::new(common::umbra());
        cmd.args(["admin", "--controller", &ctl.url, "--ca-file"])
            .arg(&ca)
            .args(["--token", &token, "-o", "json", "audit", "--last", "1000"]);
        ends_quietly_when_unread(home.path(), cmd);
        // `--follow` too, which writes page by page for as long as it runs.
        let mut cmd = Command::new(common::umbra());
        cmd.args(["admin", "--controller", &ctl.url, "--ca-file"])
            .arg(&ca)
            .args(["--token", &token, "audit", "--follow", "--last", "5"]);
        ends_quietly_when_unread(home.path(), cmd);
    }
    // A script gets the controller's refusal in its parts: message, field and status.
    let bad = admin(&["-o", "json", "access", "--user", "nobody@example.test"]);
    let e: Value = serde_json::from_str(bad.stderr.trim())
        .unwrap_or_else(|e| panic!("-o json error is not JSON ({e}): {}", bad.describe()));
    assert!(!bad.success(), "{}", bad.describe());
    assert_eq!(
        (&e["field"], &e["status"]),
        (&Value::from("user"), &Value::from(404)),
        "{e}"
    );
    assert!(
        e["error"]
            .as_str()
            .is_some_and(|m| m.contains("nobody@example.test")),
        "{e}"
    );
    // A dry run reports and changes nothing.
    let before = json(&["policy", "list"]);
    let dry = ok(&["policy", "rm", "wiki-ann", "--dry-run"]);
    assert!(
        dry.contains("dry run, nothing changed: to remove policy wiki-ann would end 0 of 0"),
        "{dry}"
    );
    let dry = json(&[
        "policy",
        "add",
        "more",
        "--allow-everyone",
        "--service",
        "wiki",
        "--dry-run",
    ]);
    assert_eq!(dry["change"], "add", "{dry}");
    // A dry run of a command that would be refused is refused the same way.
    refused(
        &[
            "policy",
            "add",
            "wiki-ann",
            "--allow-everyone",
            "--service",
            "wiki",
            "--dry-run",
        ],
        "already exists",
    );
    refused(
        &[
            "policy",
            "set",
            "nosuch",
            "--allow-everyone",
            "--service",
            "wiki",
            "--dry-run",
        ],
        "no policy nosuch",
    );
    // Refused as a script reads the real command's refusal: status, field and message.
    let add = [
        "-o",
        "json",
        "policy",
        "add",
        "wiki-ann",
        "--allow-everyone",
        "--service",
        "wiki",
    ];
    let dry = admin(&[&add[..], &["--dry-run"]].concat());
    let real = admin(&add);
    let parse = |o: &Output| -> Value {
        serde_json::from_str(o.stderr.trim())
            .unwrap_or_else(|e| panic!("-o json error is not JSON ({e}): {}", o.describe()))
    };
    assert_eq!(
        parse(&dry),
        parse(&real),
        "{}\n{}",
        dry.describe(),
        real.describe()
    );
    assert_eq!(parse(&dry)["status"], 409);
    assert_eq!(
        (code(&dry), code(&real)),
        (Some(1), Some(1)),
        "{}",
        dry.describe()
    );
    // Removing a name that is not there, or that no policy could have.
    for name in ["nosuch", "B@D"] {
        let dry = admin(&["-o", "json", "policy", "rm", name, "--dry-run"]);
        let real = admin(&["-o", "json", "policy", "rm", name]);
        assert_eq!(
            parse(&dry),
            parse(&real),
            "{}\n{}",
            dry.describe(),
            real.describe()
        );
        assert_eq!(
            (&parse(&dry)["status"], &parse(&dry)["field"]),
            (&Value::from(404), &Value::from("name"))
        );
    }
    assert_eq!(
        json(&["policy", "list"]),
        before,
        "a dry run changed the policies"
    );
    // A command line that clap refuses: JSON too when `-o json` is asked for, with status 2
    // as clap's own; text otherwise.
    let usage = admin(&["-o", "json", "service", "set", "wiki"]);
    let e = parse(&usage);
    assert!(
        code(&usage) == Some(2)
            && e["status"].is_null()
            && e["error"].as_str().is_some_and(|m| m.contains("--target")
                && m.contains("--connector")
                && !m.contains("Usage:")),
        "{}",
        usage.describe()
    );
    let usage = admin(&["service", "set", "wiki"]);
    assert!(
        code(&usage) == Some(2) && usage.stderr.contains("Usage:"),
        "{}",
        usage.describe()
    );
    // A removal prints what it removed (the controller answers it with no body), not `null`.
    ok(&["group", "add", "gone"]);
    let removed = json(&["group", "rm", "gone"]);
    assert_eq!(
        removed,
        serde_json::json!({ "removed": "group", "id": "gone" })
    );
    let audit = ok(&["audit", "--action", "policy.update", "--result", "ok"]);
    assert!(audit.contains("wiki-ann"), "{audit}");
    ctl.proc.interrupt();
    let _ = ctl.proc.wait_exit(Duration::from_secs(20));
}

#[test]
fn controller_reset_admin_token() {
    let home = tempfile::tempdir().expect("tempdir");
    let data = home.path().join("ctl");
    let data_arg = data.to_str().expect("utf-8");
    let start = |run: u32, extra: &[&str]| start_controller(home.path(), data_arg, run, extra);

    // No controller here yet: refused, and nothing is created.
    let (mut p, _, r) = start(0, &["--reset-admin-token"]);
    assert!(r.is_err(), "a reset on an empty directory started");
    let _ = p.wait_exit(Duration::from_secs(10));
    assert!(
        p.stderr_text().contains("has a controller ever started"),
        "{}",
        p.tails(20)
    );
    assert!(
        !data.join("umbra.db").exists(),
        "a refused reset created the database"
    );

    // Without the URL's host among the certificate's names it is refused, naming the field.
    let (mut p, _, r) = start(1, &["--public-url", "https://ctl.example.test:7400"]);
    assert!(
        r.is_err(),
        "a public URL the certificate does not name was taken"
    );
    let _ = p.wait_exit(Duration::from_secs(10));
    assert!(p.stderr_text().contains("public_url"), "{}", p.tails(20));
    let (mut p, _, r) = start(
        1,
        &[
            "--public-url",
            "https://ctl.example.test:7400",
            "--server-name",
            "ctl.example.test,127.0.0.1,localhost",
        ],
    );
    let out = r.unwrap_or_else(|e| panic!("first start: {e}\n{}", p.tails(20)));
    let first = token_in(&out, "admin token (shown once");
    // The URL peers are to use is the one printed for them.
    common::poll(Duration::from_secs(5), || {
        let out = p.stdout_text();
        if out.contains("peers reach it at https://ctl.example.test:7400") {
            Ok(())
        } else {
            Err(format!("--public-url not printed:\n{out}"))
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    p.interrupt();
    let _ = p.wait_exit(Duration::from_secs(20));

    let (mut p, port2, r) = start(2, &["--reset-admin-token"]);
    let out = r.unwrap_or_else(|e| panic!("reset start: {e}\n{}", p.tails(20)));
    let reset = token_in(&out, "admin token reset");
    assert!(reset.starts_with("umbra-admin-") && reset != first, "{out}");
    let ca = data.join("ca.pem");
    let list_at = |port: u16, token: &str| {
        umbra(
            home.path(),
            &[
                "admin",
                "--controller",
                &format!("https://127.0.0.1:{port}"),
                "--ca-file",
                ca.to_str().expect("utf-8"),
                "--token",
                token,
                "user",
                "list",
            ],
        )
    };
    let list = |token: &str| list_at(port2, token);
    let old = list(&first);
    assert!(
        !old.success() && old.stderr.contains("invalid admin token"),
        "the lost token still works: {}",
        old.describe()
    );
    let new = list(&reset);
    assert!(new.success(), "the reset token: {}", new.describe());
    p.interrupt();
    let _ = p.wait_exit(Duration::from_secs(20));

    // Under a service manager the token goes to a file (0600), not to standard output.
    let file = home.path().join("admin.token");
    let file_arg = file.to_str().expect("utf-8");
    let (mut p, port3, r) = start(3, &["--reset-admin-token", "--write-admin-token", file_arg]);
    let out = r.unwrap_or_else(|e| panic!("reset start: {e}\n{}", p.tails(20)));
    assert!(
        out.contains(&format!("written to {file_arg}")) && !out.contains("umbra-admin-"),
        "{out}"
    );
    let written = std::fs::read_to_string(&file).expect("token file");
    let written = written.trim();
    assert!(written.starts_with("umbra-admin-"), "{written}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file)
        .expect("token file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(list_at(port3, written).success());
    assert!(
        !list_at(port3, &reset).success(),
        "the previous token still works"
    );
    p.interrupt();
    let _ = p.wait_exit(Duration::from_secs(20));
}

/// The user quickstart makes.
const USER_QS: &str = "demo@example.test";

/// An enrollment token can come from a file (or the environment) instead of the command
/// line, where other users of the host could read it; a missing or empty file, or no token
/// at all, fails naming the option and spends nothing.
#[test]
fn enroll_takes_its_token_from_a_file() {
    let home = tempfile::tempdir().expect("tempdir");
    let mut ctl = AdminCtl::start(home.path());
    let url = ctl.url.clone();
    let admin = |args: &[&str]| {
        let o = ctl.admin(home.path(), args);
        assert!(
            o.success(),
            "umbra admin {}: {}",
            args.join(" "),
            o.describe()
        );
        o.stdout
    };
    admin(&["user", "add", "ann@example.test"]);
    let token = admin(&[
        "token",
        "create",
        "--role",
        "agent",
        "--user",
        "ann@example.test",
    ]);
    let agent_dir = home.path().join("agent");
    let dir_arg = agent_dir.to_str().expect("utf-8");
    let enroll = |extra: &[&str]| enroll_agent_cmd(home.path(), dir_arg, &url, extra, &[]);

    let o = enroll(&[]);
    assert!(
        !o.success() && o.stderr.contains("--token-file"),
        "no token: {}",
        o.describe()
    );
    let empty = home.path().join("empty.token");
    std::fs::write(&empty, "\n").expect("write");
    let o = enroll(&["--token-file", empty.to_str().expect("utf-8")]);
    assert!(
        !o.success() && o.stderr.contains("--token-file") && o.stderr.contains("empty"),
        "empty token file: {}",
        o.describe()
    );
    let o = enroll(&["--token-file", "no/such/file"]);
    assert!(
        !o.success() && o.stderr.contains("--token-file"),
        "missing token file: {}",
        o.describe()
    );
    let file = home.path().join("ann.token");
    std::fs::write(&file, &token).expect("write");
    assert!(
        !agent_dir.join("cert.pem").exists(),
        "a refused enroll wrote an identity"
    );

    // The twin: from the file, which wins over a token left in the environment; the token
    // is spent then (the same file again is refused).
    let o = enroll_agent_cmd(
        home.path(),
        dir_arg,
        &url,
        &["--token-file", file.to_str().expect("utf-8")],
        &[("UMBRA_TOKEN", "umb1.stale.left-over")],
    );
    assert!(o.success(), "enroll from a file: {}", o.describe());
    assert!(o.stdout.contains("enrolled umbra://"), "{}", o.describe());
    // `agent status` with no broker to answer prints what it knows and fails (a health
    // check); the twin that succeeds is in the end-to-end test.
    let o = umbra(home.path(), &["agent", "--dir", dir_arg, "status"]);
    assert!(
        !o.success() && o.stdout.contains("identity:") && o.stderr.contains("no broker answered"),
        "{}",
        o.describe()
    );
    // `agent status` whose reader stops reading ends quietly (no panic on the broken pipe).
    {
        let mut cmd = Command::new(common::umbra());
        cmd.args(["agent", "--dir", dir_arg, "status"]);
        ends_quietly_when_unread(home.path(), cmd);
    }
    let o = enroll(&["--force", "--token-file", file.to_str().expect("utf-8")]);
    assert!(!o.success(), "a spent token from a file: {}", o.describe());

    // A connector enrolled without --dir goes where `umbra connector` looks for it
    // (UMBRA_CONNECTOR_DIR here), and says where.
    let t = admin(&["token", "create", "--role", "connector", "--name", "dc-1"]);
    let cdir = home.path().join("connector-from-env");
    let cdir_s = cdir.to_str().expect("utf-8");
    let o = umbra_env(
        home.path(),
        &[
            "connector",
            "enroll",
            "--controller",
            &url,
            "--token",
            t.trim(),
        ],
        &[("UMBRA_CONNECTOR_DIR", cdir_s)],
    );
    assert!(
        o.success() && o.stdout.contains(cdir_s) && cdir.join("cert.pem").exists(),
        "{}",
        o.describe()
    );
    // With a settings file instead (UMBRA_CONNECTOR_CONFIG, or --config), it goes to the
    // file's identity_dir: where `umbra connector` with that file looks.
    for (n, how) in [(2, "env"), (3, "flag")] {
        let t = admin(&[
            "token",
            "create",
            "--role",
            "connector",
            "--name",
            &format!("dc-{n}"),
        ]);
        let cdir = home.path().join(format!("connector-from-config-{n}"));
        let conf = home.path().join(format!("connector-{n}.toml"));
        std::fs::write(
            &conf,
            format!("identity_dir = {:?}\n", cdir.to_str().expect("utf-8")),
        )
        .expect("write");
        let conf_s = conf.to_str().expect("utf-8");
        let mut args = vec![
            "connector",
            "enroll",
            "--controller",
            &url,
            "--token",
            t.trim(),
        ];
        let mut env = vec![];
        if how == "flag" {
            args.extend(["--config", conf_s]);
        } else {
            env.push(("UMBRA_CONNECTOR_CONFIG", conf_s));
        }
        let o = umbra_env(home.path(), &args, &env);
        assert!(
            o.success() && cdir.join("cert.pem").exists(),
            "{how}: {}",
            o.describe()
        );
    }
    // A broker enrolled but never heard from: `stream list` says its streams are left out
    // (on stderr; the list on stdout stays valid JSON).
    let t = admin(&["token", "create", "--role", "broker", "--name", "eu-1"]);
    let bdir = home.path().join("broker-silent");
    let o = broker_enroll(home.path(), &url, t.trim(), &bdir);
    assert!(o.success(), "{}", o.describe());
    let o = ctl.admin(home.path(), &["-o", "json", "stream", "list"]);
    assert!(o.success(), "{}", o.describe());
    assert_eq!(o.stdout.trim(), "[]", "{}", o.describe());
    assert!(
        o.stderr.contains("1 broker(s) not heard from"),
        "{}",
        o.describe()
    );
    // An agent's token given to `umbra broker enroll` is refused, naming the command to use,
    // and writes nothing; the token still enrolls an agent.
    let t = admin(&[
        "token",
        "create",
        "--role",
        "agent",
        "--user",
        "ann@example.test",
    ]);
    let bdir = home.path().join("broker-wrong-token");
    let o = broker_enroll(home.path(), &url, t.trim(), &bdir);
    assert!(
        !o.success() && o.stderr.contains("umbra agent enroll") && !bdir.join("cert.pem").exists(),
        "{}",
        o.describe()
    );
    let adir = home.path().join("agent-2");
    let o = enroll_agent_cmd(
        home.path(),
        adir.to_str().expect("utf-8"),
        &url,
        &["--token", t.trim()],
        &[],
    );
    assert!(o.success(), "the same token for an agent: {}", o.describe());
    ctl.proc.interrupt();
    let _ = ctl.proc.wait_exit(Duration::from_secs(20));
}

/// Log lines that cannot be written (stderr a pipe nobody reads any more, as when the reader
/// of a service's output died; or a full disk) are dropped, and the role runs on: without
/// that, the logging library reported the failed write on that same stderr, which panics the
/// task that was logging (at start, the whole process). The twin in every other test: logs
/// that can be written are.
#[test]
fn a_log_that_cannot_be_written_stops_nothing() {
    let home = tempfile::tempdir().expect("tempdir");
    let data = home.path().join("ctl");
    let stdout = home.path().join("controller.stdout");
    let mut cmd = Command::new(common::umbra());
    cmd.args([
        "controller",
        "--data-dir",
        data.to_str().expect("utf-8"),
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "none",
        "--log",
        "debug",
    ])
    .current_dir(home.path());
    common::clean_env(&mut cmd, home.path());
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&stdout).expect("stdout file"))
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("spawn the controller");
    // Nobody reads its log: every write to it fails (EPIPE).
    drop(child.stderr.take());
    let mut proc = Proc {
        name: "controller".into(),
        child,
        stdout: stdout.clone(),
        stderr: home.path().join("none"),
        status: None,
    };
    let out = poll(Duration::from_secs(30), || {
        let out = std::fs::read_to_string(&stdout).unwrap_or_default();
        if let Some(s) = proc.exited() {
            panic!("the controller exited ({s}) without a log to write:\n{out}");
        }
        if out.contains("controller listening on") {
            Ok(out)
        } else {
            Err(out)
        }
    })
    .unwrap_or_else(|out| panic!("the controller does not listen:\n{out}"));
    let port = printed_port(&out, "controller listening on https://127.0.0.1:").expect("port");
    let ctl = AdminCtl {
        token: token_in(&out, "admin token (shown once"),
        url: format!("https://127.0.0.1:{port}"),
        ca: data.join("ca.pem"),
        proc,
    };
    // Admin changes log a line each (and refusals too); every one is served.
    for i in 0..20 {
        let o = ctl.admin(home.path(), &["user", "add", &format!("u{i}@example.test")]);
        assert!(o.success(), "user add {i}: {}", o.describe());
        let o = ctl.admin(home.path(), &["user", "add", &format!("u{i}@example.test")]);
        assert!(!o.success(), "a duplicate user was added");
    }
    let o = ctl.admin(home.path(), &["-o", "json", "user", "list"]);
    assert!(o.success(), "{}", o.describe());
    let users: Value = serde_json::from_str(&o.stdout).expect("json");
    assert_eq!(users.as_array().map(Vec::len), Some(20), "{users}");
    let mut proc = ctl.proc;
    assert!(proc.exited().is_none(), "the controller exited");
    proc.kill9();
}

/// Runs `cmd` (in `home`) with its output closed before it writes: it must end by SIGPIPE, as
/// a Unix tool does under `| head`, not panic on the broken pipe.
fn ends_quietly_when_unread(home: &Path, mut cmd: Command) {
    use std::os::unix::process::ExitStatusExt;
    cmd.current_dir(home);
    common::clean_env(&mut cmd, home);
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.signal() == Some(libc::SIGPIPE) && !stderr.contains("panicked"),
        "{:?}: {stderr}",
        out.status
    );
}

/// `umbra admin ... --wait TIME` and `umbra admin rollout` against a real controller and real
/// broker processes: a change is confirmed once every broker heard from lately has it in
/// force; a broker that is behind (stopped with SIGSTOP: heard from lately, not applying) or
/// silent (enrolled, never started) makes the command exit 3 after the change is made, naming
/// the broker; `--wait` after a listing is refused, as are a wait of 0 and a version the
/// controller does not have yet.
#[test]
fn admin_wait_confirms_changes_at_the_brokers() {
    let home = tempfile::tempdir().expect("tempdir");
    let ctl = AdminCtl::start(home.path());
    let admin = |args: &[&str]| ctl.admin(home.path(), args);
    let json = |args: &[&str]| -> Value {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let o = admin(&all);
        assert!(
            o.success(),
            "umbra admin {}: {}",
            all.join(" "),
            o.describe()
        );
        serde_json::from_str(&o.stdout).expect("JSON output")
    };
    let enroll_broker = |name: &str| -> PathBuf {
        let t = json(&["token", "create", "--role", "broker", "--name", name]);
        assert_eq!(
            (&t["name"], &t["user"]),
            (&Value::from(name), &Value::Null),
            "{t}"
        );
        let dir = home.path().join(name);
        let o = broker_enroll(
            home.path(),
            &ctl.url,
            t["token"].as_str().expect("token"),
            &dir,
        );
        assert!(o.success(), "broker enroll: {}", o.describe());
        dir
    };
    let signal = |p: &Proc, sig: &str| {
        let s = Command::new("sh")
            .args(["-c", &format!("kill -{sig} {}", p.pid())])
            .status()
            .expect("kill");
        assert!(s.success(), "kill -{sig}");
    };

    let b1 = enroll_broker("b1");
    let mut cmd = Command::new(common::umbra());
    cmd.args([
        "broker",
        "--dir",
        b1.to_str().expect("utf-8"),
        "--name",
        "b1",
    ])
    .args([
        "--listen-quic",
        "127.0.0.1:0",
        "--listen-tcp",
        "127.0.0.1:0",
    ])
    .args(["--metrics-listen", "none"])
    .current_dir(home.path());
    common::clean_env(&mut cmd, home.path());
    let mut broker = Proc::spawn(
        "broker",
        cmd,
        home.path().join("b1.stdout"),
        home.path().join("b1.stderr"),
    );
    poll(Duration::from_secs(20), || {
        let r = json(&["rollout"]);
        (r["applied"] == 1 && r["brokers"][0]["name"] == "b1")
            .then_some(())
            .ok_or(format!("{r}"))
    })
    .unwrap_or_else(|e| panic!("b1 never reported: {e}\n{}", broker.tails(10)));

    // Confirmed: the change, then the line that says where it is in force.
    let o = admin(&["user", "add", "bob@example.test", "--wait", "10s"]);
    assert!(
        o.success()
            && o.stdout.contains("user bob@example.test added")
            && o.stderr.contains("in force at every broker (1)"),
        "{}",
        o.describe()
    );
    // Refused before anything is sent: a wait after a listing, a wait of nothing, a
    // version not committed yet (named by the controller).
    let o = admin(&["user", "list", "--wait", "5s"]);
    assert!(
        code(&o) == Some(2) && o.stderr.contains("--wait follows a change"),
        "{}",
        o.describe()
    );
    let o = admin(&["-o", "json", "audit", "--wait", "5s"]);
    let e: Value = serde_json::from_str(o.stderr.trim()).expect("JSON usage error");
    assert!(
        code(&o) == Some(2) && e["error"].as_str().unwrap().contains("--wait follows"),
        "{}",
        o.describe()
    );
    let o = admin(&["user", "disable", "bob@example.test", "--wait", "0s"]);
    assert_eq!(code(&o), Some(2), "{}", o.describe());
    let current = json(&["rollout"])["current"].as_u64().expect("current");
    let ahead = (current + 1000).to_string();
    let o = admin(&["-o", "json", "rollout", "--snapshot", &ahead]);
    let e: Value = serde_json::from_str(o.stderr.trim()).expect("JSON error");
    assert!(
        code(&o) == Some(1) && e["field"] == "version" && e["status"] == 400,
        "{}",
        o.describe()
    );
    let users = json(&["user", "list"]);
    assert_eq!(
        users[0]["disabled"], false,
        "a refused command changed nothing"
    );

    // Behind: b1 is heard from lately, but stopped, so it applies nothing. The change is
    // made all the same; the command says which broker has not confirmed it, and exits 3.
    signal(&broker, "STOP");
    let o = admin(&["user", "disable", "bob@example.test", "--wait", "2s"]);
    signal(&broker, "CONT");
    assert!(
        code(&o) == Some(3)
            && o.stdout.contains("user bob@example.test disabled")
            && o.stderr.contains("broker b1 is behind"),
        "{}",
        o.describe()
    );
    assert_eq!(json(&["user", "list"])[0]["disabled"], true);
    // Running again, b1 catches up: the rollout confirms that very version.
    let r = json(&["rollout", "--wait", "20s"]);
    assert!(
        r["applied"] == 1 && r["behind"] == 0 && r["brokers"][0]["state"] == "applied",
        "{r}"
    );

    // Silent: b2 is enrolled and never started. The command does not wait for it (nothing
    // says it will come), and exits 3 naming it; b1 still applied the change.
    enroll_broker("b2");
    let o = admin(&["user", "enable", "bob@example.test", "--wait", "10s"]);
    assert!(
        code(&o) == Some(3) && o.stderr.contains("broker b2 has never been heard from"),
        "{}",
        o.describe()
    );
    let o = admin(&["-o", "json", "rollout", "--wait", "5s"]);
    let r: Value = serde_json::from_str(&o.stdout).expect("JSON report");
    assert!(
        code(&o) == Some(3) && r["applied"] == 1 && r["silent"] == 1 && r["behind"] == 0,
        "{}",
        o.describe()
    );
    // Without --wait, a report: the state is said, the status is 0.
    let o = admin(&["rollout"]);
    assert!(
        o.success()
            && o.stdout
                .contains("applied at 1 of 2 broker(s), 0 behind, 1 silent"),
        "{}",
        o.describe()
    );
    // A broker gone for good is revoked: it is no longer counted.
    let o = admin(&["broker", "revoke", "b2", "--wait", "10s"]);
    assert!(
        o.success() && o.stderr.contains("in force at every broker (1)"),
        "{}",
        o.describe()
    );
    // The controller goes away during the wait (b1 stopped, so the wait lasts): the change
    // is made, so the command says it could not confirm it and exits 3, not 1.
    signal(&broker, "STOP");
    let o = std::thread::scope(|scope| {
        let waiting =
            scope.spawn(|| admin(&["user", "disable", "bob@example.test", "--wait", "6s"]));
        std::thread::sleep(Duration::from_millis(1500));
        signal(&ctl.proc, "KILL");
        waiting.join().expect("admin")
    });
    signal(&broker, "CONT");
    assert!(
        code(&o) == Some(3)
            && o.stdout.contains("user bob@example.test disabled")
            && o.stderr
                .contains("the change is made, but it could not be confirmed"),
        "{}",
        o.describe()
    );
    broker.interrupt();
    assert!(broker.wait_exit(Duration::from_secs(10)).is_some());
}
