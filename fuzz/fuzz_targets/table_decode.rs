//! Fuzz target `table_decode`: see `timezero::fault::fuzzing::check_table_decode`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    timezero::fault::fuzzing::check_table_decode(data);
});
