//! The controller's checks of names, user ids and `host:port` values: never panics, and what
//! they accept has one spelling.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../harness/controller.rs"]
mod harness;

fuzz_target!(|data: &[u8]| {
    harness::validate(data);
});
