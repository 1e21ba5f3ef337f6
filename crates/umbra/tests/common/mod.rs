//! Helpers shared by the process-level tests: the `umbra` binary, processes with their output
//! in files, bounded polling, free ports.
//!
//! Every wait here is a poll with a deadline (never a fixed sleep standing in for an
//! assertion), and every child is killed when its guard drops, also when a test panics.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The `umbra` binary built for these tests.
pub(crate) fn umbra() -> &'static str {
    env!("CARGO_BIN_EXE_umbra")
}

/// Removes every `UMBRA_*` variable the test runner may have, so that only the flags the test
/// passes count, and points HOME at `home` so that no default path lands in the real one.
pub(crate) fn clean_env(cmd: &mut Command, home: &Path) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("UMBRA_") {
            cmd.env_remove(&k);
        }
    }
    cmd.env("HOME", home);
}

/// Calls `f` every 100 ms until it returns `Ok` or `timeout` has passed; the error is the last
/// one `f` gave.
pub(crate) fn poll<T>(
    timeout: Duration,
    mut f: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The last `n` lines of a file (or a note that it cannot be read).
pub(crate) fn tail(path: &Path, n: usize) -> String {
    match fs::read(path) {
        Ok(b) => {
            let text = String::from_utf8_lossy(&b);
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(n);
            lines[start..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

pub(crate) fn read(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// A finished short command: its status (None if it was killed at its deadline) and output.
#[derive(Debug)]
pub(crate) struct Output {
    pub(crate) status: Option<ExitStatus>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
    pub(crate) stdout_path: PathBuf,
    pub(crate) stderr_path: PathBuf,
}

impl Output {
    pub(crate) fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// One line for failure messages.
    pub(crate) fn describe(&self) -> String {
        let status = match self.status {
            Some(s) => s.to_string(),
            None => "killed at its deadline".into(),
        };
        format!(
            "{status}; stdout: {:?}; stderr: {:?}",
            clip(&self.stdout, 2000),
            clip(&self.stderr, 2000)
        )
    }
}

pub(crate) fn clip(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut i = s.len() - n;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// Runs `cmd` to completion with its output in `stdout`/`stderr` files; kills it at `timeout`.
pub(crate) fn run_to_files(
    mut cmd: Command,
    stdout: PathBuf,
    stderr: PathBuf,
    timeout: Duration,
) -> Output {
    let out = fs::File::create(&stdout).expect("create stdout file");
    let err = fs::File::create(&stderr).expect("create stderr file");
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Output {
                status: None,
                stdout: String::new(),
                stderr: format!("cannot start {cmd:?}: {e}"),
                stdout_path: stdout,
                stderr_path: stderr,
            };
        }
    };
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => break None,
        }
    };
    Output {
        status,
        stdout: read(&stdout),
        stderr: read(&stderr),
        stdout_path: stdout,
        stderr_path: stderr,
    }
}

/// A long-running child with its output in files. Dropping it kills it (SIGKILL).
pub(crate) struct Proc {
    pub(crate) name: String,
    pub(crate) child: Child,
    pub(crate) stdout: PathBuf,
    pub(crate) stderr: PathBuf,
    pub(crate) status: Option<ExitStatus>,
}

impl Proc {
    pub(crate) fn spawn(name: &str, mut cmd: Command, stdout: PathBuf, stderr: PathBuf) -> Proc {
        let out = fs::File::create(&stdout).expect("create stdout file");
        let err = fs::File::create(&stderr).expect("create stderr file");
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Proc {
            name: name.into(),
            child,
            stdout,
            stderr,
            status: None,
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has ended.
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none()
            && let Ok(Some(s)) = self.child.try_wait()
        {
            self.status = Some(s);
        }
        self.status
    }

    /// SIGKILL and reap.
    pub(crate) fn kill9(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            if let Ok(s) = self.child.wait() {
                self.status = Some(s);
            }
        }
    }

    /// Sends SIGINT (as Ctrl-C does) through the shell's `kill` builtin.
    pub(crate) fn interrupt(&mut self) {
        let _ = Command::new("sh")
            .args(["-c", &format!("kill -INT {}", self.child.id())])
            .status();
    }

    /// Waits for the process to end, up to `timeout`.
    pub(crate) fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn stdout_text(&self) -> String {
        read(&self.stdout)
    }

    pub(crate) fn stderr_text(&self) -> String {
        read(&self.stderr)
    }

    /// Tails of both outputs, for failure messages.
    pub(crate) fn tails(&self, n: usize) -> String {
        format!(
            "--- {} stdout ({}) ---\n{}\n--- {} stderr ({}) ---\n{}\n",
            self.name,
            self.stdout.display(),
            tail(&self.stdout, n),
            self.name,
            self.stderr.display(),
            tail(&self.stderr, n)
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Whether this process runs as root (uid 0), read from /proc.
pub(crate) fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Whether `program` can be started (`program ARG` exits, whatever its status).
pub(crate) fn have(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Whether `port` is free on loopback for TCP and, with `udp`, for UDP too.
pub(crate) fn port_free(port: u16, udp: bool) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
        && (!udp || std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok())
}

/// A plain HTTP/1.0 GET of `/` on 127.0.0.1:`port`; the whole answer.
pub(crate) fn http_get(port: u16) -> Result<String, String> {
    http_get_path(port, "/")
}

/// `GET PATH` over HTTP/1.0 to 127.0.0.1:PORT; the whole answer, head and body.
pub(crate) fn http_get_path(port: u16, path: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok();
    s.set_write_timeout(Some(Duration::from_secs(3))).ok();
    s.write_all(
        format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| format!("read: {e}"))?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}
