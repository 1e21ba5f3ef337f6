//! umbra-policy
