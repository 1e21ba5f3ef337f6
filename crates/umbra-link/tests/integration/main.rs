//! Integration tests of umbra-link: real sockets on 127.0.0.1, real TLS, both transports.
//!
//! One test binary (link time matters on the build box); each link test runs once per
//! transport through the `both!` macro.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod control;
mod link;
mod relay;
