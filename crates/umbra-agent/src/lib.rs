//! umbra-agent
