//! Fuzz target `nbd_request`: see `timezero::fault::fuzzing::check_nbd`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    timezero::fault::fuzzing::check_nbd(data);
});
