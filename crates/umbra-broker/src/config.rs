//! Broker configuration: a serde struct with defaults, unknown keys refused, checked at load.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Everything a broker needs to run. Read from the top-level keys of the TOML file given to
/// `umbra broker --config`, then flags and `UMBRA_BROKER_*` variables; see `umbra broker --help`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Name in this broker's log lines, audit records and stream reports. Empty (the
    /// default): its identity's id (`b-…`), which the admin API lists beside the name the
    /// broker was enrolled under.
    pub name: String,
    /// Directory holding key.pem, cert.pem, ca.pem and controller.json from `umbra broker
    /// enroll`; the broker also keeps its last good snapshot, its QUIC reset key and its audit
    /// spool here.
    pub identity_dir: PathBuf,
    /// UDP address of the QUIC listener; `None` (`"none"` in the file) disables QUIC.
    #[serde(with = "addr_or_none")]
    pub listen_quic: Option<SocketAddr>,
    /// TCP address of the TLS-over-TCP listener; `None` (`"none"` in the file) disables it.
    #[serde(with = "addr_or_none")]
    pub listen_tcp: Option<SocketAddr>,
    /// Host (name or IP) agents and connectors use to reach this broker. Defaults to the
    /// listen address when that is not a wildcard.
    pub advertise_host: Option<String>,
    /// How long the broker keeps authorizing streams from its last snapshot once it can no
    /// longer confirm it with the controller. Past this, every new stream is refused, and
    /// live streams end too (the re-check comes then, whatever `reverify_secs` is).
    /// Certificates bound it too: one that expires while the controller is away cannot be
    /// renewed, and a link ends when its peer's certificate (or the broker's own) expires.
    /// So with the controller away, access lasts at most until the earliest of this limit
    /// and the expiry of the certificates in use (`cert_lifetime_secs` at the controller;
    /// they renew with a third of it left, so that is at worst a third of a lifetime).
    pub max_staleness_secs: u64,
    /// Live streams are decided again at least this often (and at once on every new
    /// snapshot): a decision can change with time alone, by a policy on `context.now` or by
    /// the staleness limit.
    pub reverify_secs: u64,
    /// Limit for a peer to send the header frame of a new stream.
    pub open_timeout_ms: u64,
    /// Limit for a connector to answer a dial. Keep it above the connectors' own
    /// `dial_timeout_ms` (5000 by default), the time they give a target to accept: a target
    /// that drops connection attempts is then reported by its connector as unreachable, not
    /// taken for a silent connector (which is passed over for every service it serves).
    pub dial_timeout_ms: u64,
    /// A stream with no bytes either way for this long is closed.
    pub idle_timeout_secs: u64,
    /// Interval of heartbeats (live streams, audit events) to the controller.
    pub heartbeat_ms: u64,
    /// Handshakes in progress at once, per transport. When all are taken, a new connection
    /// evicts the oldest; one source address (an IPv6 /64) holds at most an eighth of them
    /// and evicts its own, so a flood from one host cannot evict every distant peer. Peers
    /// behind one NAT or load balancer count as one source: for more than an eighth of this
    /// many of them handshaking at once (a reconnect storm), raise it.
    pub max_pending_handshakes: usize,
    /// Limit for a TLS/QUIC handshake.
    pub handshake_timeout_ms: u64,
    /// Links one identity (a device or a connector) may have up at once; more are refused.
    /// An agent holds one per running `umbra agent forward`, whatever number of services it
    /// forwards (two around a certificate renewal), a connector
    /// one (two around a renewal), so the default 32 leaves room while bounding what one
    /// stolen or broken identity can hold.
    pub max_links_per_peer: usize,
    /// Streams one device may have open at once at this broker, over all its links (being
    /// set up or relaying); more are reset as they arrive. Each costs a task and a
    /// connection at a connector and the app, and up to one stream window of broker memory
    /// each way when the agent or the app stops reading; so this bounds what one stolen or
    /// broken device can tie up: at most this many windows each way (1024 × 256 KiB =
    /// 256 MiB by default), whatever it does. Links never stall for it: a stream whose
    /// reader stopped holds its own window, never the shared link to a connector.
    pub max_streams_per_device: usize,
    /// New streams one device may open per second at this broker, after a burst of
    /// `stream_open_burst`; more are answered "rate limited" before any decision or dial.
    /// Every stream opened is an audit record in the controller's store (every access is
    /// recorded), so this bounds how fast one device can grow the store, and the Cedar
    /// decisions and connector dials it can make the broker do. The defaults leave room for a
    /// browser's or a test suite's bursts of connections.
    pub stream_opens_per_sec: u32,
    /// New streams one device may open at once before `stream_opens_per_sec` applies.
    pub stream_open_burst: u32,
    /// Receive window per stream on agent and connector links, in KiB (16 to 16384): the
    /// most the broker holds for one stream in each direction. A stream moves at most one
    /// window per round trip, so long paths need more (1024 KiB keeps about 80 Mbit/s per
    /// stream at 100 ms); the agents and connectors set their own for the other direction.
    pub stream_window_kib: u32,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            name: String::new(),
            identity_dir: PathBuf::from("broker"),
            listen_quic: Some(SocketAddr::from(([127, 0, 0, 1], 7401))),
            listen_tcp: Some(SocketAddr::from(([127, 0, 0, 1], 7401))),
            advertise_host: None,
            max_staleness_secs: 24 * 3600,
            reverify_secs: 10,
            open_timeout_ms: 5_000,
            dial_timeout_ms: 7_000,
            idle_timeout_secs: 3_600,
            heartbeat_ms: 1_000,
            max_pending_handshakes: 256,
            handshake_timeout_ms: 5_000,
            max_links_per_peer: 32,
            max_streams_per_device: 1024,
            stream_opens_per_sec: 50,
            stream_open_burst: 500,
            stream_window_kib: umbra_link::DEFAULT_STREAM_WINDOW_KIB,
        }
    }
}

/// A configuration value that cannot work, with the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid broker configuration: {field}: {reason}")]
pub struct ConfigError {
    pub field: &'static str,
    pub reason: String,
}

fn bad(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        reason: reason.into(),
    }
}

impl BrokerConfig {
    /// Checks every field; the first problem names its field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.name.is_empty() && !umbra_proto::valid_name(&self.name) {
            return Err(bad(
                "name",
                "1-63 lowercase letters, digits, '-', '_' or '.'",
            ));
        }
        if self.listen_quic.is_none() && self.listen_tcp.is_none() {
            return Err(bad(
                "listen_quic",
                "at least one of listen_quic and listen_tcp is needed",
            ));
        }
        if self.advertise_host.is_none() && self.advertised_ip().is_none() {
            return Err(bad(
                "advertise_host",
                "required when listening on a wildcard address",
            ));
        }
        // As the controller checks it in every heartbeat: a broker started with one it
        // refuses would run without its addresses, streams or audit events being stored.
        // The controller takes `host:port` in at most 255 bytes (what a Dial frame carries):
        // with the longest port and an IPv6 address's brackets, 247 for the host.
        if let Some(h) = &self.advertise_host
            && (!umbra_proto::dialable_host(h) || h.len() > 247)
        {
            return Err(bad(
                "advertise_host",
                "a DNS name (letters, digits, '-', '_', dots; at most 247 bytes) or an IP address",
            ));
        }
        // Upper bounds too: a duration is added to clocks and timers, where an absurd one
        // would overflow (a panic in a background task that then never runs again).
        for (field, v, max, what) in [
            (
                "max_staleness_secs",
                self.max_staleness_secs,
                366 * 86_400,
                "366 days",
            ),
            (
                "open_timeout_ms",
                self.open_timeout_ms,
                3_600_000,
                "an hour",
            ),
            (
                "dial_timeout_ms",
                self.dial_timeout_ms,
                3_600_000,
                "an hour",
            ),
            ("idle_timeout_secs", self.idle_timeout_secs, 86_400, "a day"),
            ("heartbeat_ms", self.heartbeat_ms, 3_600_000, "an hour"),
            (
                "handshake_timeout_ms",
                self.handshake_timeout_ms,
                3_600_000,
                "an hour",
            ),
        ] {
            if v == 0 {
                return Err(bad(field, "must be greater than 0"));
            }
            if v > max {
                return Err(bad(field, format!("must be at most {max} ({what})")));
            }
        }
        if !(1..=3600).contains(&self.reverify_secs) {
            return Err(bad("reverify_secs", "must be between 1 and 3600"));
        }
        if !(1..=65_536).contains(&self.max_pending_handshakes) {
            return Err(bad("max_pending_handshakes", "must be between 1 and 65536"));
        }
        if !(1..=4096).contains(&self.max_links_per_peer) {
            return Err(bad("max_links_per_peer", "must be between 1 and 4096"));
        }
        if !(1..=1_000_000).contains(&self.max_streams_per_device) {
            return Err(bad(
                "max_streams_per_device",
                "must be between 1 and 1000000",
            ));
        }
        if !(1..=1_000_000).contains(&self.stream_opens_per_sec) {
            return Err(bad("stream_opens_per_sec", "must be between 1 and 1000000"));
        }
        if !(1..=1_000_000).contains(&self.stream_open_burst) {
            return Err(bad("stream_open_burst", "must be between 1 and 1000000"));
        }
        if umbra_link::stream_window_bytes(self.stream_window_kib).is_none() {
            return Err(bad(
                "stream_window_kib",
                umbra_link::STREAM_WINDOW_KIB_ERROR,
            ));
        }
        Ok(())
    }

    fn advertised_ip(&self) -> Option<String> {
        [self.listen_quic, self.listen_tcp]
            .into_iter()
            .flatten()
            .find(|a| !a.ip().is_unspecified())
            .map(|a| a.ip().to_string())
    }

    /// Host agents should dial.
    pub(crate) fn advertise(&self) -> String {
        self.advertise_host
            .clone()
            .or_else(|| self.advertised_ip())
            .unwrap_or_else(|| "127.0.0.1".into())
    }

    pub(crate) fn max_staleness(&self) -> Duration {
        Duration::from_secs(self.max_staleness_secs)
    }
    pub(crate) fn reverify(&self) -> Duration {
        Duration::from_secs(self.reverify_secs)
    }
    pub(crate) fn open_timeout(&self) -> Duration {
        Duration::from_millis(self.open_timeout_ms)
    }
    pub(crate) fn dial_timeout(&self) -> Duration {
        Duration::from_millis(self.dial_timeout_ms)
    }
    pub(crate) fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
    pub(crate) fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }
}

/// A listen address as TOML holds it: `"127.0.0.1:7401"`, or `"none"` for no listener (a
/// key left out means the default, so it cannot say "none" by its absence).
mod addr_or_none {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub(super) fn serialize<S: Serializer>(
        v: &Option<SocketAddr>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(a) => s.collect_str(a),
            None => s.serialize_str("none"),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(d)?;
        if text == "none" {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|_| {
            D::Error::custom(format!(
                "{text:?} is not an address like 127.0.0.1:7401 (or \"none\")"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener is turned off in the file with "none", as with the flag; a bad value is
    /// refused naming the key. The twin: an address, or no key (the default).
    #[test]
    fn listeners_are_turned_off_with_none() {
        let c: BrokerConfig = toml::from_str("listen_quic = \"none\"").unwrap();
        assert_eq!(c.listen_quic, None);
        assert_eq!(c.listen_tcp, BrokerConfig::default().listen_tcp);
        let c: BrokerConfig = toml::from_str("listen_tcp = \"0.0.0.0:443\"").unwrap();
        assert_eq!(c.listen_tcp, Some("0.0.0.0:443".parse().unwrap()));
        let e = toml::from_str::<BrokerConfig>("listen_tcp = \"nowhere\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("listen_tcp") && e.contains("nowhere"), "{e}");
        // What it writes, it reads back.
        let off = BrokerConfig {
            listen_quic: None,
            ..BrokerConfig::default()
        };
        let back: BrokerConfig = toml::from_str(&toml::to_string(&off).unwrap()).unwrap();
        assert_eq!(back, off);
    }

    #[test]
    fn defaults_are_valid() {
        BrokerConfig::default().validate().unwrap();
    }

    #[test]
    fn unknown_key_is_named() {
        let e = toml::from_str::<BrokerConfig>("nmae = \"x\"").unwrap_err();
        assert!(e.to_string().contains("nmae"), "{e}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let c = BrokerConfig {
            open_timeout_ms: 0,
            ..BrokerConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "open_timeout_ms");
        for n in [0, 4097] {
            let c = BrokerConfig {
                max_links_per_peer: n,
                ..BrokerConfig::default()
            };
            assert_eq!(c.validate().unwrap_err().field, "max_links_per_peer");
        }
        for n in [0, 3601] {
            let c = BrokerConfig {
                reverify_secs: n,
                ..BrokerConfig::default()
            };
            assert_eq!(c.validate().unwrap_err().field, "reverify_secs");
        }
        // Absurdly large values are refused by name, not left to overflow a timer later.
        for n in [0, 65_537, 1 << 62] {
            let c = BrokerConfig {
                max_pending_handshakes: n,
                ..BrokerConfig::default()
            };
            assert_eq!(c.validate().unwrap_err().field, "max_pending_handshakes");
        }
        let c = BrokerConfig {
            max_staleness_secs: u64::MAX,
            ..BrokerConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "max_staleness_secs");
        let c = BrokerConfig {
            idle_timeout_secs: 86_401,
            ..BrokerConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "idle_timeout_secs");
        // The twin: the largest allowed values are taken.
        let c = BrokerConfig {
            max_staleness_secs: 366 * 86_400,
            max_pending_handshakes: 65_536,
            idle_timeout_secs: 86_400,
            heartbeat_ms: 3_600_000,
            ..BrokerConfig::default()
        };
        c.validate().unwrap();
        for n in [0, 1_000_001] {
            let c = BrokerConfig {
                max_streams_per_device: n,
                ..BrokerConfig::default()
            };
            assert_eq!(c.validate().unwrap_err().field, "max_streams_per_device");
            let c = BrokerConfig {
                stream_opens_per_sec: n as u32,
                ..BrokerConfig::default()
            };
            assert_eq!(c.validate().unwrap_err().field, "stream_opens_per_sec");
            let c = BrokerConfig {
                stream_open_burst: n as u32,
                ..BrokerConfig::default()
            };
            assert_eq!(c.validate().unwrap_err().field, "stream_open_burst");
        }
        // The twin: the bounds themselves are taken.
        for n in [1, 1_000_000] {
            let c = BrokerConfig {
                stream_opens_per_sec: n,
                stream_open_burst: n,
                ..BrokerConfig::default()
            };
            c.validate().unwrap();
        }
        let c = BrokerConfig {
            listen_quic: None,
            listen_tcp: None,
            ..BrokerConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "listen_quic");
        let mut c = BrokerConfig {
            listen_quic: Some("0.0.0.0:7401".parse().unwrap()),
            listen_tcp: None,
            ..BrokerConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "advertise_host");
        c.advertise_host = Some("broker1.example.test".into());
        c.validate().unwrap();
        // What the controller would refuse in every heartbeat is refused at start.
        let long = format!(
            "{}.{}.{}.{}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(59)
        );
        c.advertise_host = Some(long.clone());
        assert_eq!(c.validate().unwrap_err().field, "advertise_host");
        c.advertise_host = Some(long[..247].to_owned());
        c.validate().unwrap();
        for bad in [
            "",
            "bad!",
            "x*y",
            "a b",
            "010.0.0.5",
            "10.1",
            "[::1]",
            "h:80",
            "a/b",
        ] {
            c.advertise_host = Some(bad.into());
            assert_eq!(c.validate().unwrap_err().field, "advertise_host", "{bad:?}");
        }
        for good in ["10.0.0.5", "::1", "fd00::7", "b-1.pop_2.example.test"] {
            c.advertise_host = Some(good.into());
            c.validate().unwrap_or_else(|e| panic!("{good:?}: {e}"));
        }
        let c = BrokerConfig {
            name: "Bad Name".into(),
            ..BrokerConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "name");
        for kib in [0, 15, 16_385] {
            let c = BrokerConfig {
                stream_window_kib: kib,
                ..BrokerConfig::default()
            };
            assert_eq!(c.validate().unwrap_err().field, "stream_window_kib");
        }
        let c: BrokerConfig = toml::from_str("stream_window_kib = 1024").unwrap();
        c.validate().unwrap();
    }
}
