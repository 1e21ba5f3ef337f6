//! umbra-controller
