//! The key exchange group a QUIC handshake negotiated.
//!
//! rustls reports it (`negotiated_key_exchange_group`), but quinn keeps its rustls connection
//! private. The group is also written in clear in the ServerHello's `key_share` extension, and
//! every ServerHello byte passes through quinn's `crypto::Session` interface: the server writes
//! it (`write_handshake`), the client reads it (`read_handshake`). So quinn's rustls session is
//! wrapped, the first handshake message in that direction is parsed for its `key_share` group,
//! and the group is returned with the handshake data ([`QuicHandshake`]). Everything else is
//! delegated unchanged.
//!
//! A HelloRetryRequest has the same shape and names the same group the final ServerHello
//! uses, so the first message suffices. The parser never panics; if it cannot find a group
//! the link reports `"unknown"`.

use std::any::Any;
use std::sync::Arc;

use quinn::crypto::{
    self, ExportKeyingMaterialError, KeyPair, Keys, PacketKey, UnsupportedVersion,
};
use quinn::{ConnectError, ConnectionId, Side};
use quinn_proto::TransportError;
use quinn_proto::transport_parameters::TransportParameters;
use rustls::NamedGroup;

/// Handshake data of our QUIC sessions (what `Connection::handshake_data` returns).
#[derive(Debug, Clone)]
pub(crate) struct QuicHandshake {
    /// Negotiated ALPN protocol.
    pub(crate) protocol: Option<Vec<u8>>,
    /// Key exchange group from the ServerHello.
    pub(crate) kx_group: Option<NamedGroup>,
}

/// Server side: wraps quinn's rustls server config.
pub(crate) struct KxServerConfig(pub(crate) Arc<quinn::crypto::rustls::QuicServerConfig>);

impl crypto::ServerConfig for KxServerConfig {
    fn initial_keys(
        &self,
        version: u32,
        dst_cid: &ConnectionId,
    ) -> Result<Keys, UnsupportedVersion> {
        self.0.initial_keys(version, dst_cid)
    }

    fn retry_tag(&self, version: u32, orig_dst_cid: &ConnectionId, packet: &[u8]) -> [u8; 16] {
        self.0.retry_tag(version, orig_dst_cid, packet)
    }

    fn start_session(
        self: Arc<Self>,
        version: u32,
        params: &TransportParameters,
    ) -> Box<dyn crypto::Session> {
        let inner = crypto::ServerConfig::start_session(self.0.clone(), version, params);
        Box::new(KxSession::new(inner, Side::Server))
    }
}

/// Client side: wraps quinn's rustls client config.
pub(crate) struct KxClientConfig(pub(crate) Arc<quinn::crypto::rustls::QuicClientConfig>);

impl crypto::ClientConfig for KxClientConfig {
    fn start_session(
        self: Arc<Self>,
        version: u32,
        server_name: &str,
        params: &TransportParameters,
    ) -> Result<Box<dyn crypto::Session>, ConnectError> {
        let inner =
            crypto::ClientConfig::start_session(self.0.clone(), version, server_name, params)?;
        Ok(Box::new(KxSession::new(inner, Side::Client)))
    }
}

struct KxSession {
    inner: Box<dyn crypto::Session>,
    side: Side,
    sniffer: ServerHelloSniffer,
}

impl KxSession {
    fn new(inner: Box<dyn crypto::Session>, side: Side) -> KxSession {
        KxSession {
            inner,
            side,
            sniffer: ServerHelloSniffer::default(),
        }
    }
}

impl crypto::Session for KxSession {
    fn initial_keys(&self, dst_cid: &ConnectionId, side: Side) -> Keys {
        self.inner.initial_keys(dst_cid, side)
    }

    fn handshake_data(&self) -> Option<Box<dyn Any>> {
        let data = self.inner.handshake_data()?;
        let protocol = data
            .downcast::<quinn::crypto::rustls::HandshakeData>()
            .ok()
            .and_then(|d| d.protocol);
        Some(Box::new(QuicHandshake {
            protocol,
            kx_group: self.sniffer.group,
        }))
    }

    fn peer_identity(&self) -> Option<Box<dyn Any>> {
        self.inner.peer_identity()
    }

    fn early_crypto(&self) -> Option<(Box<dyn crypto::HeaderKey>, Box<dyn PacketKey>)> {
        self.inner.early_crypto()
    }

    fn early_data_accepted(&self) -> Option<bool> {
        self.inner.early_data_accepted()
    }

    fn is_handshaking(&self) -> bool {
        self.inner.is_handshaking()
    }

    fn read_handshake(&mut self, buf: &[u8]) -> Result<bool, TransportError> {
        if self.side == Side::Client {
            self.sniffer.feed(buf);
        }
        self.inner.read_handshake(buf)
    }

    fn transport_parameters(&self) -> Result<Option<TransportParameters>, TransportError> {
        self.inner.transport_parameters()
    }

    fn write_handshake(&mut self, buf: &mut Vec<u8>) -> Option<Keys> {
        let start = buf.len();
        let keys = self.inner.write_handshake(buf);
        if self.side == Side::Server
            && let Some(new) = buf.get(start..)
        {
            self.sniffer.feed(new);
        }
        keys
    }

    fn next_1rtt_keys(&mut self) -> Option<KeyPair<Box<dyn PacketKey>>> {
        self.inner.next_1rtt_keys()
    }

    fn is_valid_retry(&self, orig_dst_cid: &ConnectionId, header: &[u8], payload: &[u8]) -> bool {
        self.inner.is_valid_retry(orig_dst_cid, header, payload)
    }

    fn export_keying_material(
        &self,
        output: &mut [u8],
        label: &[u8],
        context: &[u8],
    ) -> Result<(), ExportKeyingMaterialError> {
        self.inner.export_keying_material(output, label, context)
    }
}

/// Collects the first handshake message server -> client and extracts its key share group.
#[derive(Default)]
struct ServerHelloSniffer {
    buf: Vec<u8>,
    done: bool,
    group: Option<NamedGroup>,
}

/// A ServerHello with an ML-KEM-768 hybrid share is about 1.2 KB; anything this long without
/// a complete message is not what we are looking for.
const SNIFF_LIMIT: usize = 8 * 1024;

impl ServerHelloSniffer {
    fn feed(&mut self, bytes: &[u8]) {
        if self.done || bytes.is_empty() {
            return;
        }
        self.buf.extend_from_slice(bytes);
        match server_hello_group(&self.buf) {
            Ok(Some(g)) => {
                self.group = Some(NamedGroup::from(g));
                self.finish();
            }
            Ok(None) if self.buf.len() < SNIFF_LIMIT => {}
            Ok(None) | Err(()) => self.finish(),
        }
    }

    fn finish(&mut self) {
        self.done = true;
        self.buf = Vec::new();
    }
}

/// Parses a TLS 1.3 ServerHello (or HelloRetryRequest) handshake message at the start of
/// `msg` and returns its `key_share` group. `Ok(None)`: incomplete, feed more.
fn server_hello_group(msg: &[u8]) -> Result<Option<u16>, ()> {
    const SERVER_HELLO: u8 = 2;
    const KEY_SHARE: u16 = 51;
    let Some(head) = msg.get(..4) else {
        return Ok(None);
    };
    if head[0] != SERVER_HELLO {
        return Err(());
    }
    let len = (usize::from(head[1]) << 16) | (usize::from(head[2]) << 8) | usize::from(head[3]);
    let Some(body) = msg.get(4..4 + len) else {
        return if len > SNIFF_LIMIT { Err(()) } else { Ok(None) };
    };
    let mut r = body;
    skip(&mut r, 2 + 32)?; // legacy_version, random
    let sid = usize::from(take(&mut r, 1)?[0]);
    skip(&mut r, sid + 2 + 1)?; // session id, cipher suite, compression
    let ext_len = u16_at(take(&mut r, 2)?);
    let mut exts = take(&mut r, usize::from(ext_len))?;
    while !exts.is_empty() {
        let ty = u16_at(take(&mut exts, 2)?);
        let n = u16_at(take(&mut exts, 2)?);
        let data = take(&mut exts, usize::from(n))?;
        if ty == KEY_SHARE {
            // ServerHello: KeyShareEntry { group, key_exchange }; HRR: selected_group.
            return data.get(..2).map(|g| Some(u16_at(g))).ok_or(());
        }
    }
    Err(())
}

fn take<'a>(r: &mut &'a [u8], n: usize) -> Result<&'a [u8], ()> {
    if r.len() < n {
        return Err(());
    }
    let (a, b) = r.split_at(n);
    *r = b;
    Ok(a)
}

fn skip(r: &mut &[u8], n: usize) -> Result<(), ()> {
    take(r, n).map(|_| ())
}

fn u16_at(b: &[u8]) -> u16 {
    match b {
        [x, y, ..] => u16::from_be_bytes([*x, *y]),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(exts: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.push(0); // empty session id
        body.extend([0x13, 0x01, 0]);
        let mut e = Vec::new();
        for (ty, data) in exts {
            e.extend(ty.to_be_bytes());
            e.extend((data.len() as u16).to_be_bytes());
            e.extend(*data);
        }
        body.extend((e.len() as u16).to_be_bytes());
        body.extend(e);
        let mut m = vec![2, 0, (body.len() >> 8) as u8, body.len() as u8];
        m.extend(body);
        m
    }

    #[test]
    fn finds_the_group_in_pieces() {
        let mut share = vec![0x11, 0xec, 0x04, 0x60];
        share.extend([9u8; 1120]);
        let m = hello(&[(43, &[3, 4]), (51, &share)]);
        for split in [1, 3, 4, 50, m.len() - 1] {
            let mut s = ServerHelloSniffer::default();
            s.feed(&m[..split]);
            assert_eq!(s.group, None);
            s.feed(&m[split..]);
            s.feed(b"more handshake messages");
            assert_eq!(s.group, Some(NamedGroup::X25519MLKEM768), "split {split}");
        }
    }

    #[test]
    fn hello_retry_request_names_the_group() {
        let m = hello(&[(51, &[0x00, 0x1d])]);
        assert_eq!(server_hello_group(&m), Ok(Some(0x001d)));
    }

    #[test]
    fn garbage_is_refused_without_panic() {
        assert_eq!(server_hello_group(&[1, 0, 0, 0]), Err(()));
        assert_eq!(server_hello_group(&hello(&[(43, &[3, 4])])), Err(()));
        assert_eq!(server_hello_group(&[2, 0, 0, 3, 1, 2, 3]), Err(()));
        assert_eq!(server_hello_group(&[2, 0xff, 0xff, 0xff]), Err(()));
        let mut x: u32 = 1;
        for _ in 0..5000 {
            let mut v = vec![2u8, 0, 0];
            for _ in 0..(x % 80) {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                v.push((x >> 24) as u8);
            }
            let _ = server_hello_group(&v);
        }
    }
}
