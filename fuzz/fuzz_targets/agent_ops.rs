//! `cargo fuzz run -s none agent_ops`: see [`qmp_proto_fuzz::agent_ops`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| qmp_proto_fuzz::agent_ops(data));
