//! `cargo fuzz run -s none connection_bytes`: see [`qmp_proto_fuzz::connection_bytes`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| qmp_proto_fuzz::connection_bytes(data));
