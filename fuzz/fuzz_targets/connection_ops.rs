//! `cargo fuzz run -s none connection_ops`: see [`qmp_proto_fuzz::connection_ops`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| qmp_proto_fuzz::connection_ops(data));
