//! `cargo fuzz run -s none splitter_chunks`: see [`qmp_proto_fuzz::splitter_chunks`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| qmp_proto_fuzz::splitter_chunks(data));
