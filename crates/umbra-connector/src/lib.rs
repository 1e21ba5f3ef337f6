//! umbra-connector
