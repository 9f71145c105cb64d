//! `cargo fuzz run -s none splitter_differential`: see [`qmp_proto_fuzz::splitter_differential`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| qmp_proto_fuzz::splitter_differential(data));
