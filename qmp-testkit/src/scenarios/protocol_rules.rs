//! Conformance scenarios: protocol_rules.

#[allow(unused_imports)]
use super::*;
