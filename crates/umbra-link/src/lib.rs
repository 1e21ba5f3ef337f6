//! umbra-link
