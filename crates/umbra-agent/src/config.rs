//! The agent's configuration: parsed with serde (unknown keys are errors), defaults for
//! everything, and [`AgentConfig::validate`] naming the field at fault.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
pub use umbra_link::{TransportPref, UnknownTransportPref};

/// Configuration of an agent: the top-level keys of the TOML file given to `umbra agent --config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Directory holding `key.pem`, `cert.pem`, `ca.pem` and `controller.json` (written at
    /// enrollment). Default `$HOME/.config/umbra/agent`.
    pub identity_dir: PathBuf,
    /// `auto` (QUIC, falling back to TLS over TCP), `quic` or `tcp`.
    pub transport: TransportPref,
    /// Time the broker has to answer an `Open` (or a ping) before it is considered down.
    pub open_timeout_ms: u64,
    /// Time allowed for one link handshake with a broker (per transport tried).
    pub connect_timeout_ms: u64,
    /// A forwarded connection with no bytes either way for this long is closed (checked every
    /// quarter of it). Default 3600, like the broker's: the shortest of the limits on a
    /// stream's path applies.
    pub idle_timeout_secs: u64,
    /// Receive window per stream on broker links, in KiB (16 to 16384): the most this
    /// agent holds for one stream coming from a broker. A download moves at most one window
    /// per round trip, so long paths to brokers need more (1024 KiB keeps about 80 Mbit/s per
    /// stream at 100 ms).
    pub stream_window_kib: u32,
    /// Let a forward listen on an address other hosts can reach. Off by default: whoever
    /// connects to a forward reaches the service as this device's user, so a forward on
    /// `0.0.0.0` would share that access with the whole network.
    pub allow_remote_clients: bool,
    /// A running forward follows the controller's broker list by long poll: a broker that
    /// leaves the list (revoked, or retired) is dropped within about a second, and the agent's
    /// links to it are closed. While the controller cannot be reached the last list stays in
    /// use, and tries are spaced by a backoff of at most this many seconds.
    pub broker_retry_max_secs: u64,
    /// A running forward measures every broker again this often (1 to 3600 s) while it may
    /// not be on the nearest one (it failed over, or some broker did not answer), and ten
    /// times less often otherwise; new connections move to a broker that is clearly nearer
    /// (by a third and 5 ms). Connections in progress stay where they are.
    pub reprobe_secs: u64,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            identity_dir: default_identity_dir(),
            transport: TransportPref::Auto,
            open_timeout_ms: 1_000,
            connect_timeout_ms: 1_000,
            idle_timeout_secs: 3_600,
            stream_window_kib: umbra_link::DEFAULT_STREAM_WINDOW_KIB,
            allow_remote_clients: false,
            broker_retry_max_secs: 60,
            reprobe_secs: 60,
        }
    }
}

/// `$HOME/.config/umbra/agent`. Read once, when the default configuration is built.
fn default_identity_dir() -> PathBuf {
    identity_dir_under(std::env::var_os("HOME"))
}

/// The default identity directory under `home`; none (an empty path, refused by
/// [`AgentConfig::validate`]) when `home` is unset or not absolute. A relative default would
/// land under whatever directory the agent was started in (`/` for a service, `/tmp` for a
/// shell), where someone else may have created it and placed their own CA and controller.
fn identity_dir_under(home: Option<std::ffi::OsString>) -> PathBuf {
    match home.map(PathBuf::from) {
        Some(h) if h.is_absolute() => h.join(".config/umbra/agent"),
        _ => PathBuf::new(),
    }
}

/// A configuration value that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid agent configuration: {field}: {reason}")]
pub struct ConfigError {
    /// The field at fault, as spelled in the config file.
    pub field: &'static str,
    pub reason: &'static str,
}

const MAX_TIMEOUT_MS: u64 = 60_000;
const MAX_BROKER_RETRY_SECS: u64 = 300;

impl AgentConfig {
    /// Checks every field; the error names the first one at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field, reason| Err(ConfigError { field, reason });
        if self.identity_dir.as_os_str().is_empty() {
            return err(
                "identity_dir",
                "not set: give it (--dir); the default is under $HOME, which is unset or relative",
            );
        }
        if self.open_timeout_ms == 0 || self.open_timeout_ms > MAX_TIMEOUT_MS {
            return err("open_timeout_ms", "must be between 1 and 60000");
        }
        if self.connect_timeout_ms == 0 || self.connect_timeout_ms > MAX_TIMEOUT_MS {
            return err("connect_timeout_ms", "must be between 1 and 60000");
        }
        if self.idle_timeout_secs == 0 {
            return err("idle_timeout_secs", "must be at least 1");
        }
        if !(1..=MAX_BROKER_RETRY_SECS).contains(&self.broker_retry_max_secs) {
            return err("broker_retry_max_secs", "must be between 1 and 300");
        }
        if !(1..=3600).contains(&self.reprobe_secs) {
            return err("reprobe_secs", "must be between 1 and 3600");
        }
        if umbra_link::stream_window_bytes(self.stream_window_kib).is_none() {
            return err("stream_window_kib", umbra_link::STREAM_WINDOW_KIB_ERROR);
        }
        Ok(())
    }

    pub(crate) fn open_timeout(&self) -> Duration {
        Duration::from_millis(self.open_timeout_ms)
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub(crate) fn broker_retry_max(&self) -> Duration {
        Duration::from_secs(self.broker_retry_max_secs)
    }

    pub(crate) fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }

    pub(crate) fn reprobe(&self) -> Duration {
        Duration::from_secs(self.reprobe_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = AgentConfig::default();
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.open_timeout(), Duration::from_secs(1));
        assert_eq!(c.connect_timeout(), Duration::from_secs(1));
        assert!(c.identity_dir.ends_with(".config/umbra/agent"));
    }

    #[test]
    fn parses_with_defaults_and_refuses_unknown_keys() {
        let c: AgentConfig =
            serde_json::from_str(r#"{"identity_dir":"/tmp/a","transport":"quic"}"#).unwrap();
        assert_eq!(c.transport, TransportPref::Quic);
        assert_eq!(c.open_timeout_ms, 1_000);
        for (text, named) in [
            // A misspelt key is named, with the keys that exist.
            (r#"{"open_timeout":1}"#, "`open_timeout`"),
            (r#"{"open_timeout":1}"#, "open_timeout_ms"),
            // A bad value is named, with the ones accepted.
            (r#"{"transport":"udp"}"#, "`udp`"),
            (r#"{"transport":"udp"}"#, "quic"),
        ] {
            let e = serde_json::from_str::<AgentConfig>(text)
                .expect_err(text)
                .to_string();
            assert!(e.contains(named), "{text}: {e}");
        }
    }

    #[test]
    fn no_default_identity_dir_without_an_absolute_home() {
        assert_eq!(
            identity_dir_under(Some("/home/ann".into())),
            PathBuf::from("/home/ann/.config/umbra/agent")
        );
        for home in [None, Some("".into()), Some("ann".into())] {
            let c = AgentConfig {
                identity_dir: identity_dir_under(home.clone()),
                ..AgentConfig::default()
            };
            assert_eq!(c.validate().unwrap_err().field, "identity_dir", "{home:?}");
        }
    }

    #[test]
    fn validate_names_the_field() {
        type Breaker = fn(&mut AgentConfig);
        let cases: [(Breaker, &str); 11] = [
            (|c| c.identity_dir = PathBuf::new(), "identity_dir"),
            (|c| c.open_timeout_ms = 0, "open_timeout_ms"),
            (|c| c.connect_timeout_ms = 0, "connect_timeout_ms"),
            (|c| c.connect_timeout_ms = 120_000, "connect_timeout_ms"),
            (|c| c.idle_timeout_secs = 0, "idle_timeout_secs"),
            (|c| c.stream_window_kib = 15, "stream_window_kib"),
            (|c| c.stream_window_kib = 16_385, "stream_window_kib"),
            (|c| c.broker_retry_max_secs = 0, "broker_retry_max_secs"),
            (|c| c.broker_retry_max_secs = 301, "broker_retry_max_secs"),
            (|c| c.reprobe_secs = 0, "reprobe_secs"),
            (|c| c.reprobe_secs = 3601, "reprobe_secs"),
        ];
        for (break_it, field) in cases {
            let mut c = AgentConfig {
                identity_dir: PathBuf::from("/tmp/a"),
                ..AgentConfig::default()
            };
            break_it(&mut c);
            let e = c.validate().expect_err(field);
            assert_eq!(e.field, field);
            // The message a person reads names the field too.
            let shown = e.to_string();
            assert!(shown.contains(field) && shown.contains(e.reason), "{shown}");
        }
    }
}
