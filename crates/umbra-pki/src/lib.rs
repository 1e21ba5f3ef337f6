//! umbra-pki
