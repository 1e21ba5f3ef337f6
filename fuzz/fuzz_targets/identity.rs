//! Identity URIs (from certificates) and enrollment tokens (from operators): parsing never
//! panics, and what parses prints back to the same text.
#![no_main]
use libfuzzer_sys::fuzz_target;
use umbra_proto::PeerId;
use umbra_proto::api::EnrollToken;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(id) = PeerId::from_uri(s) {
            assert_eq!(id.to_uri(), s);
        }
        if let Ok(t) = EnrollToken::parse(s) {
            assert_eq!(EnrollToken::parse(&t.to_string()).ok(), Some(t));
        }
    }
});
