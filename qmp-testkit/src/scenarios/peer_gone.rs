//! Conformance scenarios: peer_gone.

#[allow(unused_imports)]
use super::*;
