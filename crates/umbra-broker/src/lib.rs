//! umbra-broker
