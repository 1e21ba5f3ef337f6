//! The `umbra` binary as a person meets it, without root: help texts, configuration errors
//! that name what is wrong, and `umbra quickstart` end to end on loopback (start, the printed
//! next step works, Ctrl-C exits cleanly, a second run resumes the same state).

// Test code: a failed expectation is the test failing, with its message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Output, Proc, poll};

/// `umbra ARGS` with a clean environment, killed after 20 s.
fn umbra(home: &Path, args: &[&str]) -> Output {
    let dir = home.join("out");
    std::fs::create_dir_all(&dir).expect("out dir");
    let n = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
    let mut cmd = Command::new(common::umbra());
    cmd.args(args).current_dir(home);
    common::clean_env(&mut cmd, home);
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
            &["--controller", "--token", "--dir"],
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
            &["--controller", "--token", "--dir"],
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
        (&["agent", "enroll", "--help"], &["--controller", "--token"]),
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
                "user",
                "group",
                "service",
                "policy",
                "token",
                "device",
                "connector",
                "broker",
                "stream",
                "audit",
            ],
        ),
        (&["admin", "user", "add", "--help"], &["--group"]),
        (
            &["admin", "service", "add", "--help"],
            &["--target", "--connector"],
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
        (&["admin", "audit", "--help"], &["--after", "--limit"]),
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

/// A base port where P, P+1, P+2 (TCP and UDP) and P+80 are free on loopback, starting from a
/// pid-derived place so that parallel runs rarely meet.
fn quickstart_base_port() -> u16 {
    let start = 27_400 + (std::process::id() % 1000) as u16 * 5;
    let mut p = start;
    loop {
        if common::port_free(p, false)
            && common::port_free(p + 1, true)
            && common::port_free(p + 2, true)
            && common::port_free(p + 80, false)
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
    fn start(home: &Path, data: &Path, base: u16, run: u32) -> Quickstart {
        let mut cmd = Command::new(common::umbra());
        cmd.args(["quickstart", "--data-dir"])
            .arg(data)
            .args(["--base-port", &base.to_string()])
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
    let port = common::free_tcp_port();
    let mut args: Vec<String> = printed[1..].to_vec();
    match args.iter().position(|a| a == "--listen") {
        Some(i) if i + 1 < args.len() => args[i + 1] = format!("127.0.0.1:{port}"),
        _ => panic!("the printed agent command has no --listen ADDR: {printed:?}"),
    }
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
        home.join(format!("agent.{port}.stdout")),
        home.join(format!("agent.{port}.stderr")),
    );
    let r = poll(Duration::from_secs(20), || {
        if let Some(s) = agent.exited() {
            return Err(format!("the agent exited: {s}"));
        }
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

#[test]
fn quickstart_runs_stops_and_resumes() {
    umbra_pki::install_crypto_provider();
    let home = tempfile::tempdir().expect("tempdir");
    let data = home.path().join("qs");
    let base = quickstart_base_port();

    // First run: everything is set up from nothing.
    let mut q = Quickstart::start(home.path(), &data, base, 1);
    let printed = q.next_steps();
    let out = q.proc.stdout_text();
    assert!(
        out.contains("curl http://127.0.0.1:"),
        "no curl step printed:\n{out}"
    );
    assert!(
        out.contains("admin --config"),
        "no admin step printed:\n{out}"
    );
    forward_and_get(home.path(), &printed, &q);
    let ca_first = std::fs::read_to_string(data.join("ca.pem")).expect("quickstart wrote ca.pem");

    // The printed admin step works too.
    let admin_cfg = data.join("admin.toml");
    let cfg = admin_cfg.to_str().expect("utf-8");
    let users = umbra(
        home.path(),
        &["admin", "--config", cfg, "-o", "json", "user", "list"],
    );
    assert!(
        users.success() && users.stdout.contains("demo@example.test"),
        "umbra admin --config {cfg} user list: {}",
        users.describe()
    );

    q.proc.interrupt();
    let status = q.proc.wait_exit(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "quickstart did not exit 0 on Ctrl-C: {status:?}\n{}",
        q.proc.tails(30)
    );

    // Second run on the same directory: same CA, works again.
    let mut q = Quickstart::start(home.path(), &data, base, 2);
    let printed = q.next_steps();
    let ca_second = std::fs::read_to_string(data.join("ca.pem")).expect("ca.pem");
    assert_eq!(
        ca_first, ca_second,
        "the second run made a new CA instead of resuming"
    );
    forward_and_get(home.path(), &printed, &q);
    q.proc.interrupt();
    let status = q.proc.wait_exit(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "the second quickstart did not exit 0 on Ctrl-C: {status:?}\n{}",
        q.proc.tails(30)
    );
}
