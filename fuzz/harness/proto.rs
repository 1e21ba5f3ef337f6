//! One input of the `umbra-proto` fuzz targets (`frame`, `snapshot`, `identity`,
//! `api_request`): the parser calls the product makes on peer input, and the invariants that
//! must hold where a parse succeeds.
//!
//! Shared, through `#[path]`, by `fuzz/fuzz_targets/*.rs` (libFuzzer) and by
//! `crates/umbra-proto/tests/fuzz_corpus.rs` (replays the corpora under `cargo test`), so CI
//! and the fuzzer check the same thing. Uses only crates `umbra-proto` itself depends on.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use serde::Serialize;
use serde::de::DeserializeOwned;
use umbra_proto::api::{
    ApiError, BrokerHeartbeat, BrokerList, ConnectorConfig, CreateEnrollToken, CreateGroup,
    CreatePolicy, CreateService, CreateUser, EnrollRequest, EnrollToken, IssuedCert, PolicyCheck,
    RenewRequest, ReplacePolicy, UpdateService, UpdateUser,
};
use umbra_proto::{Frame, PeerId, Snapshot};

/// Stream header frames, several back to back, as `Stream::read_frame` decodes them: never
/// panics, consumes at most what it was given, whatever decodes re-encodes to the same bytes,
/// and every strict prefix of a decoded frame asks for more input (never an error), which the
/// reader's partial-frame buffering relies on. True if a frame decoded.
pub(crate) fn frame(data: &[u8]) -> bool {
    let mut rest = data;
    let mut decoded = false;
    while let Ok(Some((frame, used))) = Frame::decode(rest) {
        assert!(
            used >= 4 && used <= rest.len(),
            "used {used} of {}",
            rest.len()
        );
        assert_eq!(Frame::payload_len(rest), Ok(Some(used - 4)));
        assert_eq!(
            frame.to_bytes().expect("decoded frames encode"),
            &rest[..used]
        );
        for cut in [0, 3, used - 1] {
            assert_eq!(
                Frame::decode(&rest[..cut]),
                Ok(None),
                "prefix {cut} of {used}"
            );
        }
        rest = &rest[used..];
        decoded = true;
    }
    decoded
}

/// JSON that peers receive from the controller (snapshot long poll, connector config,
/// enrollment answer, broker list, error bodies) plus the broker heartbeat: never panics, and
/// what parses serialises and parses back to the same (brokers and connectors cache some of
/// it on disk and reload it). True if one of them parsed.
pub(crate) fn snapshot(data: &[u8]) -> bool {
    [
        json::<Snapshot>(data).is_some(),
        json::<ConnectorConfig>(data).is_some(),
        json::<IssuedCert>(data).is_some(),
        json::<BrokerList>(data).is_some(),
        json::<ApiError>(data).is_some(),
        json::<BrokerHeartbeat>(data).is_some(),
    ]
    .contains(&true)
}

/// Certificate identity URIs and printed enrollment tokens: what parses prints back the same.
/// True if one of them parsed.
pub(crate) fn identity(data: &[u8]) -> bool {
    let Ok(s) = std::str::from_utf8(data) else {
        return false;
    };
    let id = PeerId::from_uri(s).ok();
    if let Some(id) = &id {
        assert_eq!(id.to_uri(), s);
    }
    token(s) || id.is_some()
}

/// Request bodies the controller deserialises (`ApiJson`: `serde_json::from_slice`) from
/// peers, anonymous ones included (`POST /v1/enroll`), and from administrators, then the
/// validation `umbra-proto` owns (the enrollment token). Never panics; what parses serialises
/// and parses back to the same. The CSR inside enroll and renew bodies goes to the CA
/// unchanged: that is the `csr` target (`fuzz/harness/pki.rs`). True if a body parsed.
pub(crate) fn api_request(data: &[u8]) -> bool {
    let enroll = json::<EnrollRequest>(data);
    if let Some(req) = &enroll {
        // The controller accepts the printed token or its bare secret; only the printed form
        // is parsed (`presented_secret` in umbra-controller's enroll.rs).
        let t = req.token.trim();
        if t.starts_with("umb1.") {
            token(t);
        }
    }
    [
        enroll.is_some(),
        json::<RenewRequest>(data).is_some(),
        json::<BrokerHeartbeat>(data).is_some(),
        json::<CreateUser>(data).is_some(),
        json::<CreateGroup>(data).is_some(),
        json::<CreateService>(data).is_some(),
        json::<CreatePolicy>(data).is_some(),
        json::<CreateEnrollToken>(data).is_some(),
        json::<UpdateUser>(data).is_some(),
        json::<UpdateService>(data).is_some(),
        json::<ReplacePolicy>(data).is_some(),
        json::<PolicyCheck>(data).is_some(),
    ]
    .contains(&true)
}

/// A printed enrollment token: if it parses, it prints to a form that parses to the same.
/// True if it parsed.
fn token(s: &str) -> bool {
    let Ok(t) = EnrollToken::parse(s) else {
        return false;
    };
    let printed = t.to_string();
    assert!(
        printed.len() <= 5 + 64 + 1 + 128,
        "token prints long: {}",
        printed.len()
    );
    assert_eq!(EnrollToken::parse(&printed).ok(), Some(t));
    true
}

/// Parses `data` as a `T` the way the product does; where it parses, its JSON text parses
/// back to a `T` with the same JSON text.
fn json<T: Serialize + DeserializeOwned>(data: &[u8]) -> Option<T> {
    let v: T = serde_json::from_slice(data).ok()?;
    let text = serde_json::to_vec(&v).expect("what parsed serialises");
    let again: T = serde_json::from_slice(&text).unwrap_or_else(|e| {
        panic!(
            "{} does not parse its own JSON: {e}: {}",
            std::any::type_name::<T>(),
            String::from_utf8_lossy(&text)
        )
    });
    assert_eq!(
        serde_json::to_vec(&again).expect("what parsed serialises"),
        text,
        "{} changes on a JSON round trip",
        std::any::type_name::<T>()
    );
    Some(v)
}
