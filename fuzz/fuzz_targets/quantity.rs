#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| modelpool_fuzz::quantity(data));
