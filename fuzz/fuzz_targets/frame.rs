//! Stream header frames from a peer: decoding never panics, consumes no more than it was
//! given, and whatever decodes re-encodes to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use umbra_proto::Frame;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((frame, used))) = Frame::decode(rest) {
        assert!(used > 0 && used <= rest.len());
        assert_eq!(frame.to_bytes().expect("decoded frames encode"), &rest[..used]);
        rest = &rest[used..];
    }
});
