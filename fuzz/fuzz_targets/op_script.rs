//! Fuzz target `op_script`: see `timezero::fault::fuzzing::check_op_script`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    timezero::fault::fuzzing::check_op_script(data);
});
