//! Stream header frames.
//!
//! Every stream on a link starts with exactly one request frame from the side that opened it
//! and one reply frame from the other side; after an `Ok` reply the stream carries the
//! application's bytes unframed, in both directions, until each side finishes its half.
//!
//! ```text
//! frame   = version:u8 (=1) | kind:u8 | len:u16 (big endian) | payload[len]
//! str8    = len:u8 | utf-8 bytes
//! bytes16 = len:u16 | bytes
//! ```
//! `len` is at most [`MAX_PAYLOAD`]. Every field is length-checked; trailing bytes in a
//! payload, an unknown kind, a bad version, a bad code or invalid UTF-8 are errors
//! ([`FrameError`]), never panics. Unknown *codes* inside a known reply are errors too, so
//! both ends must agree on a version: that is what the version byte is for.
//!
//! Room left for later work: [`Flow::Udp`] (datagram flows over QUIC datagrams) is a valid
//! value that today's brokers answer with [`OpenCode::UnsupportedFlow`]; `Open::credential`
//! carries an opaque user token (login and MFA bind one to the device certificate later);
//! brokers ignore an empty one.

use std::fmt;

/// The only version this code speaks.
pub const VERSION: u8 = 1;
/// Bytes before the payload.
pub const HEADER_LEN: usize = 4;
/// Largest payload accepted or produced.
pub const MAX_PAYLOAD: usize = 16 * 1024;
/// Largest opaque credential in an `Open` frame.
pub const MAX_CREDENTIAL: usize = 8 * 1024;

/// What kind of traffic a stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Flow {
    /// A TCP connection carried as a reliable byte stream.
    Tcp,
    /// Reserved: UDP datagrams (QUIC datagrams). Not served yet.
    Udp,
}

impl Flow {
    fn to_u8(self) -> u8 {
        match self {
            Flow::Tcp => 1,
            Flow::Udp => 2,
        }
    }
    fn from_u8(v: u8) -> Result<Self, FrameError> {
        match v {
            1 => Ok(Flow::Tcp),
            2 => Ok(Flow::Udp),
            _ => Err(FrameError::BadValue("flow")),
        }
    }
    /// Lower-case name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Flow::Tcp => "tcp",
            Flow::Udp => "udp",
        }
    }
}

/// The broker's answer to an agent's `Open`.
///
/// An unknown service and a forbidden one both get [`OpenCode::Denied`]: the answer must not
/// tell a user which services exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpenCode {
    /// Allowed and connected; application bytes follow.
    Ok,
    /// Not allowed, or no such service.
    Denied,
    /// Allowed, but no healthy connector could reach the target.
    Unavailable,
    /// The flow kind is not served by this broker.
    UnsupportedFlow,
    /// The broker's policy snapshot is older than its staleness limit: it authorizes nothing.
    Stale,
    /// This device opens streams faster than the broker allows (its `stream_opens_per_sec`
    /// after a burst of `stream_open_burst`); nothing was decided. Asked again later, the same
    /// broker may allow it.
    RateLimited,
}

impl OpenCode {
    fn to_u8(self) -> u8 {
        match self {
            OpenCode::Ok => 0,
            OpenCode::Denied => 1,
            OpenCode::Unavailable => 2,
            OpenCode::UnsupportedFlow => 3,
            OpenCode::Stale => 4,
            OpenCode::RateLimited => 5,
        }
    }
    fn from_u8(v: u8) -> Result<Self, FrameError> {
        Ok(match v {
            0 => OpenCode::Ok,
            1 => OpenCode::Denied,
            2 => OpenCode::Unavailable,
            3 => OpenCode::UnsupportedFlow,
            4 => OpenCode::Stale,
            5 => OpenCode::RateLimited,
            _ => return Err(FrameError::BadValue("open code")),
        })
    }
    /// Lower-case name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            OpenCode::Ok => "ok",
            OpenCode::Denied => "denied",
            OpenCode::Unavailable => "unavailable",
            OpenCode::UnsupportedFlow => "unsupported_flow",
            OpenCode::Stale => "stale",
            OpenCode::RateLimited => "rate_limited",
        }
    }
}

/// The connector's answer to a broker's `Dial`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DialCode {
    /// Connected to the target; application bytes follow.
    Ok,
    /// The target is not published for this connector (refused and audited).
    NotPublished,
    /// The target is published but did not accept the connection.
    Unreachable,
    /// The flow kind is not served by this connector.
    UnsupportedFlow,
}

impl DialCode {
    fn to_u8(self) -> u8 {
        match self {
            DialCode::Ok => 0,
            DialCode::NotPublished => 1,
            DialCode::Unreachable => 2,
            DialCode::UnsupportedFlow => 3,
        }
    }
    fn from_u8(v: u8) -> Result<Self, FrameError> {
        Ok(match v {
            0 => DialCode::Ok,
            1 => DialCode::NotPublished,
            2 => DialCode::Unreachable,
            3 => DialCode::UnsupportedFlow,
            _ => return Err(FrameError::BadValue("dial code")),
        })
    }
    /// Lower-case name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DialCode::Ok => "ok",
            DialCode::NotPublished => "not_published",
            DialCode::Unreachable => "unreachable",
            DialCode::UnsupportedFlow => "unsupported_flow",
        }
    }
}

/// One header frame.
#[derive(Clone, PartialEq, Eq)]
pub enum Frame {
    /// Agent -> broker: carry this stream to `service`.
    Open {
        flow: Flow,
        service: String,
        /// Opaque user credential (empty today; a device-bound user token later).
        credential: Vec<u8>,
    },
    /// Broker -> agent.
    OpenReply { code: OpenCode },
    /// Broker -> connector: connect this stream to `target` for `service`.
    Dial {
        flow: Flow,
        /// Broker-assigned id, for correlating logs on both sides.
        stream_id: u64,
        service: String,
        /// `host:port` exactly as published for the service.
        target: String,
        /// Who asked (user id), for the connector's logs.
        principal: String,
    },
    /// Connector -> broker.
    DialReply { code: DialCode },
    /// Either side: measure round trip time; answered by `Pong` with the same nonce.
    Ping { nonce: u64 },
    /// Answer to `Ping`.
    Pong { nonce: u64 },
    /// Agent -> broker: which services may I reach?
    ListServices,
    /// Broker -> agent: the services this agent's user may reach, sorted. A long list comes
    /// in several of these (see [`Frame::service_lists`]); the end of the stream ends it.
    ServiceList { services: Vec<String> },
}

// Debug leaves out the credential: frames get logged.
impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Frame::Open {
                flow,
                service,
                credential,
            } => f
                .debug_struct("Open")
                .field("flow", flow)
                .field("service", service)
                .field("credential_len", &credential.len())
                .finish(),
            Frame::OpenReply { code } => f.debug_struct("OpenReply").field("code", code).finish(),
            Frame::Dial {
                flow,
                stream_id,
                service,
                target,
                principal,
            } => f
                .debug_struct("Dial")
                .field("flow", flow)
                .field("stream_id", stream_id)
                .field("service", service)
                .field("target", target)
                .field("principal", principal)
                .finish(),
            Frame::DialReply { code } => f.debug_struct("DialReply").field("code", code).finish(),
            Frame::Ping { nonce } => f.debug_struct("Ping").field("nonce", nonce).finish(),
            Frame::Pong { nonce } => f.debug_struct("Pong").field("nonce", nonce).finish(),
            Frame::ListServices => f.write_str("ListServices"),
            Frame::ServiceList { services } => f
                .debug_struct("ServiceList")
                .field("services", services)
                .finish(),
        }
    }
}

/// Why bytes from a peer are not a frame. The peer is at fault in every case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("unsupported frame version {0}")]
    Version(u8),
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    #[error("frame payload of {0} bytes exceeds the limit of {MAX_PAYLOAD}")]
    TooLong(usize),
    #[error("frame payload truncated")]
    Truncated,
    #[error("{0} trailing bytes after the frame's fields")]
    Trailing(usize),
    #[error("invalid {0}")]
    BadValue(&'static str),
    #[error("field too long to encode: {0}")]
    FieldTooLong(&'static str),
}

const K_OPEN: u8 = 0x01;
const K_OPEN_REPLY: u8 = 0x02;
const K_DIAL: u8 = 0x03;
const K_DIAL_REPLY: u8 = 0x04;
const K_PING: u8 = 0x05;
const K_PONG: u8 = 0x06;
const K_LIST: u8 = 0x07;
const K_SERVICE_LIST: u8 = 0x08;

impl Frame {
    /// `services` as `ServiceList` frames that each fit in [`MAX_PAYLOAD`], in order (one
    /// frame, empty, for an empty list). Names longer than 255 bytes cannot be encoded and are
    /// left out (no valid service name is).
    pub fn service_lists(services: Vec<String>) -> Vec<Frame> {
        let mut frames = Vec::new();
        let mut current = Vec::new();
        let mut size = 2;
        for name in services.into_iter().filter(|n| n.len() <= u8::MAX as usize) {
            if size + 1 + name.len() > MAX_PAYLOAD || current.len() == u16::MAX as usize {
                frames.push(Frame::ServiceList {
                    services: std::mem::take(&mut current),
                });
                size = 2;
            }
            size += 1 + name.len();
            current.push(name);
        }
        frames.push(Frame::ServiceList { services: current });
        frames
    }

    fn kind(&self) -> u8 {
        match self {
            Frame::Open { .. } => K_OPEN,
            Frame::OpenReply { .. } => K_OPEN_REPLY,
            Frame::Dial { .. } => K_DIAL,
            Frame::DialReply { .. } => K_DIAL_REPLY,
            Frame::Ping { .. } => K_PING,
            Frame::Pong { .. } => K_PONG,
            Frame::ListServices => K_LIST,
            Frame::ServiceList { .. } => K_SERVICE_LIST,
        }
    }

    /// Appends the encoded frame to `out`.
    ///
    /// Fails only if a field is longer than its length prefix or the payload would exceed
    /// [`MAX_PAYLOAD`]; `out` is left as it was then.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), FrameError> {
        let start = out.len();
        out.extend_from_slice(&[VERSION, self.kind(), 0, 0]);
        let r = self.encode_payload(out);
        let len = out.len() - start - HEADER_LEN;
        match r {
            Ok(()) if len <= MAX_PAYLOAD => {
                out[start + 2..start + 4].copy_from_slice(&(len as u16).to_be_bytes());
                Ok(())
            }
            Ok(()) => {
                out.truncate(start);
                Err(FrameError::TooLong(len))
            }
            Err(e) => {
                out.truncate(start);
                Err(e)
            }
        }
    }

    /// Encodes into a new buffer.
    pub fn to_bytes(&self) -> Result<Vec<u8>, FrameError> {
        let mut v = Vec::with_capacity(64);
        self.encode(&mut v)?;
        Ok(v)
    }

    fn encode_payload(&self, out: &mut Vec<u8>) -> Result<(), FrameError> {
        match self {
            Frame::Open {
                flow,
                service,
                credential,
            } => {
                out.push(flow.to_u8());
                put_str8(out, service, "service")?;
                if credential.len() > MAX_CREDENTIAL {
                    return Err(FrameError::FieldTooLong("credential"));
                }
                out.extend_from_slice(&(credential.len() as u16).to_be_bytes());
                out.extend_from_slice(credential);
            }
            Frame::OpenReply { code } => out.push(code.to_u8()),
            Frame::Dial {
                flow,
                stream_id,
                service,
                target,
                principal,
            } => {
                out.push(flow.to_u8());
                out.extend_from_slice(&stream_id.to_be_bytes());
                put_str8(out, service, "service")?;
                put_str8(out, target, "target")?;
                put_str8(out, principal, "principal")?;
            }
            Frame::DialReply { code } => out.push(code.to_u8()),
            Frame::Ping { nonce } | Frame::Pong { nonce } => {
                out.extend_from_slice(&nonce.to_be_bytes())
            }
            Frame::ListServices => {}
            Frame::ServiceList { services } => {
                if services.len() > u16::MAX as usize {
                    return Err(FrameError::FieldTooLong("services"));
                }
                out.extend_from_slice(&(services.len() as u16).to_be_bytes());
                for s in services {
                    put_str8(out, s, "service")?;
                }
            }
        }
        Ok(())
    }

    /// Decodes one frame from the front of `buf`.
    ///
    /// `Ok(None)`: `buf` holds a valid prefix but not a whole frame yet (read more).
    /// `Ok(Some((frame, used)))`: a frame and the number of bytes it took.
    /// The header is checked before the payload arrives, so an oversized or unknown frame is
    /// refused after four bytes.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
        let Some(len) = Self::payload_len(buf)? else {
            return Ok(None);
        };
        let total = HEADER_LEN + len;
        let Some(payload) = buf.get(HEADER_LEN..total) else {
            return Ok(None);
        };
        let mut r = Reader(payload);
        let frame = match buf[1] {
            K_OPEN => Frame::Open {
                flow: Flow::from_u8(r.u8()?)?,
                service: r.str8()?,
                credential: {
                    let n = r.u16()? as usize;
                    if n > MAX_CREDENTIAL {
                        return Err(FrameError::BadValue("credential length"));
                    }
                    r.take(n)?.to_vec()
                },
            },
            K_OPEN_REPLY => Frame::OpenReply {
                code: OpenCode::from_u8(r.u8()?)?,
            },
            K_DIAL => Frame::Dial {
                flow: Flow::from_u8(r.u8()?)?,
                stream_id: r.u64()?,
                service: r.str8()?,
                target: r.str8()?,
                principal: r.str8()?,
            },
            K_DIAL_REPLY => Frame::DialReply {
                code: DialCode::from_u8(r.u8()?)?,
            },
            K_PING => Frame::Ping { nonce: r.u64()? },
            K_PONG => Frame::Pong { nonce: r.u64()? },
            K_LIST => Frame::ListServices,
            K_SERVICE_LIST => {
                let n = r.u16()? as usize;
                // Each entry takes at least one byte, so `n` is bounded by the payload.
                if n > payload.len() {
                    return Err(FrameError::Truncated);
                }
                let mut services = Vec::with_capacity(n);
                for _ in 0..n {
                    services.push(r.str8()?);
                }
                Frame::ServiceList { services }
            }
            k => return Err(FrameError::UnknownKind(k)),
        };
        if !r.0.is_empty() {
            return Err(FrameError::Trailing(r.0.len()));
        }
        Ok(Some((frame, total)))
    }

    /// Checks the 4-byte header and returns the payload length, or `None` if fewer than four
    /// bytes are available.
    pub fn payload_len(buf: &[u8]) -> Result<Option<usize>, FrameError> {
        let Some(h) = buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        if h[0] != VERSION {
            return Err(FrameError::Version(h[0]));
        }
        if !(K_OPEN..=K_SERVICE_LIST).contains(&h[1]) {
            return Err(FrameError::UnknownKind(h[1]));
        }
        let len = u16::from_be_bytes([h[2], h[3]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(FrameError::TooLong(len));
        }
        Ok(Some(len))
    }
}

fn put_str8(out: &mut Vec<u8>, s: &str, field: &'static str) -> Result<(), FrameError> {
    if s.len() > u8::MAX as usize {
        return Err(FrameError::FieldTooLong(field));
    }
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.0.len() < n {
            return Err(FrameError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn str8(&mut self) -> Result<String, FrameError> {
        let n = self.u8()? as usize;
        let b = self.take(n)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| FrameError::BadValue("utf-8 string"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Frame> {
        vec![
            Frame::Open {
                flow: Flow::Tcp,
                service: "demo".into(),
                credential: vec![],
            },
            Frame::Open {
                flow: Flow::Udp,
                service: "dns".into(),
                credential: vec![7; 300],
            },
            Frame::OpenReply { code: OpenCode::Ok },
            Frame::OpenReply {
                code: OpenCode::Stale,
            },
            Frame::OpenReply {
                code: OpenCode::RateLimited,
            },
            Frame::Dial {
                flow: Flow::Tcp,
                stream_id: u64::MAX,
                service: "demo".into(),
                target: "10.0.0.1:80".into(),
                principal: "demo@example.test".into(),
            },
            Frame::DialReply {
                code: DialCode::NotPublished,
            },
            Frame::Ping { nonce: 42 },
            Frame::Pong { nonce: 42 },
            Frame::ListServices,
            Frame::ServiceList {
                services: vec!["a".into(), "bb".into()],
            },
            Frame::ServiceList { services: vec![] },
        ]
    }

    #[test]
    fn round_trip_every_kind() {
        for f in all() {
            let b = f.to_bytes().unwrap();
            let (g, used) = Frame::decode(&b).unwrap().unwrap();
            assert_eq!(f, g);
            assert_eq!(used, b.len());
        }
    }

    #[test]
    fn every_strict_prefix_asks_for_more() {
        for f in all() {
            let b = f.to_bytes().unwrap();
            for n in 0..b.len() {
                assert_eq!(Frame::decode(&b[..n]), Ok(None), "{f:?} prefix {n}");
            }
        }
    }

    #[test]
    fn two_frames_back_to_back() {
        let mut b = Frame::Ping { nonce: 1 }.to_bytes().unwrap();
        b.extend(Frame::ListServices.to_bytes().unwrap());
        let (f, n) = Frame::decode(&b).unwrap().unwrap();
        assert_eq!(f, Frame::Ping { nonce: 1 });
        assert_eq!(
            Frame::decode(&b[n..]).unwrap().unwrap().0,
            Frame::ListServices
        );
    }

    #[test]
    fn refuses_bad_headers_before_the_payload() {
        assert_eq!(Frame::decode(&[2, 1, 0, 0]), Err(FrameError::Version(2)));
        assert_eq!(
            Frame::decode(&[1, 0x7f, 0, 0]),
            Err(FrameError::UnknownKind(0x7f))
        );
        assert_eq!(
            Frame::decode(&[1, 0, 0, 0]),
            Err(FrameError::UnknownKind(0))
        );
        assert_eq!(
            Frame::decode(&[1, K_OPEN, 0xff, 0xff]),
            Err(FrameError::TooLong(0xffff))
        );
    }

    #[test]
    fn refuses_bad_payloads() {
        // Truncated field inside a complete frame.
        assert_eq!(
            Frame::decode(&[1, K_OPEN, 0, 2, 1, 5]),
            Err(FrameError::Truncated)
        );
        // Trailing bytes.
        assert_eq!(
            Frame::decode(&[1, K_OPEN_REPLY, 0, 2, 0, 0]),
            Err(FrameError::Trailing(1))
        );
        // Unknown reply code.
        assert_eq!(
            Frame::decode(&[1, K_OPEN_REPLY, 0, 1, 9]),
            Err(FrameError::BadValue("open code"))
        );
        // Bad flow.
        assert_eq!(
            Frame::decode(&[1, K_OPEN, 0, 4, 0, 0, 0, 0]),
            Err(FrameError::BadValue("flow"))
        );
        // Invalid UTF-8.
        assert_eq!(
            Frame::decode(&[1, K_OPEN, 0, 6, 1, 1, 0xff, 0, 0, 0]),
            Err(FrameError::BadValue("utf-8 string"))
        );
        // A service list claiming more entries than bytes.
        assert_eq!(
            Frame::decode(&[1, K_SERVICE_LIST, 0, 2, 0xff, 0xff]),
            Err(FrameError::Truncated)
        );
    }

    #[test]
    fn refuses_to_encode_oversized_fields() {
        let f = Frame::Open {
            flow: Flow::Tcp,
            service: "x".repeat(256),
            credential: vec![],
        };
        let mut out = vec![9];
        assert_eq!(f.encode(&mut out), Err(FrameError::FieldTooLong("service")));
        assert_eq!(out, vec![9], "output untouched on error");
        let big = Frame::ServiceList {
            services: vec!["y".repeat(200); 100],
        };
        assert!(matches!(big.to_bytes(), Err(FrameError::TooLong(_))));
    }

    #[test]
    fn debug_hides_the_credential() {
        let f = Frame::Open {
            flow: Flow::Tcp,
            service: "demo".into(),
            credential: b"secret-token".to_vec(),
        };
        let s = format!("{f:?}");
        assert!(!s.contains("secret"), "{s}");
        assert!(s.contains("credential_len: 12"));
    }

    /// Cheap deterministic fuzzing in the unit tests; `fuzz/` has the coverage-guided target.
    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut buf = Vec::new();
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            buf.clear();
            let len = (x % 40) as usize;
            let mut y = x;
            for i in 0..len {
                y = y.rotate_left(7).wrapping_add(i as u64);
                buf.push(y as u8);
            }
            if len > 0 {
                buf[0] = 1;
            }
            if len > 1 {
                buf[1] = (x % 10) as u8;
            }
            if len > 3 {
                buf[2] = 0;
                buf[3] %= 40;
            }
            if let Ok(Some((f, used))) = Frame::decode(&buf) {
                assert!(used <= buf.len());
                // Whatever decodes re-encodes to the same bytes.
                assert_eq!(f.to_bytes().unwrap(), buf[..used]);
            }
        }
    }

    #[test]
    fn a_long_service_list_is_split_into_frames_that_fit() {
        let names: Vec<String> = (0..1000).map(|i| format!("{i:0>63}")).collect();
        let frames = Frame::service_lists(names.clone());
        assert!(frames.len() > 1);
        let mut back = Vec::new();
        for f in &frames {
            let mut v = Vec::new();
            f.encode(&mut v).unwrap();
            assert!(v.len() <= HEADER_LEN + MAX_PAYLOAD);
            match Frame::decode(&v).unwrap() {
                Some((Frame::ServiceList { services }, _)) => back.extend(services),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(back, names);
        // Short and empty lists stay one frame.
        assert_eq!(
            Frame::service_lists(vec!["a".into()]),
            [Frame::ServiceList {
                services: vec!["a".into()]
            }]
        );
        assert_eq!(
            Frame::service_lists(vec![]),
            [Frame::ServiceList { services: vec![] }]
        );
    }
}
