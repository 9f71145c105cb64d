//! `cargo fuzz run -s none members_scan`: see [`qmp_proto_fuzz::members_scan`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| qmp_proto_fuzz::members_scan(data));
