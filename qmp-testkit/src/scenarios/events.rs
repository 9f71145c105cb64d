//! Conformance scenarios: events.

#[allow(unused_imports)]
use super::*;
