//! The `timezero` command-line tool: see `timezero --help`.

fn main() {
    std::process::exit(timezero::cli::main());
}
