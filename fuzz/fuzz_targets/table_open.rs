//! Fuzz target `table_open`: see `timezero::fault::fuzzing::check_table_open`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    timezero::fault::fuzzing::check_table_open(data);
});
