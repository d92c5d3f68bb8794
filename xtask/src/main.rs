//! `cargo xtask`: the project's developer tasks, as a plain workspace binary reached through
//! the `.cargo/config.toml` alias (in the style of rust-analyzer's `xtask/`).
//!
//! Every command and option is declared in [`flags`]; each command lives in its own module.
//! Child cargo runs use `$CARGO` and start at the workspace root, so `cargo xtask` works from
//! any directory of the workspace.

mod backends;
mod bench;
mod chaos;
mod ci;
mod conformance;
mod drivers;
mod features;
mod flags;
mod interop;
mod process;
mod soak;

use std::process::ExitCode;

use process::progress;

fn main() -> ExitCode {
    let command = match flags::parse(std::env::args().skip(1)) {
        Ok(command) => command,
        Err(err) => {
            eprintln!("error: {err:#}");
            return ExitCode::from(2);
        }
    };
    let result = match command {
        flags::Command::Help => {
            print!("{}", flags::HELP);
            Ok(())
        }
        flags::Command::Conformance(flags) => conformance::run(&flags),
        flags::Command::Interop(flags) => interop::run(&flags),
        flags::Command::Backends(args) => backends::main(&args),
        flags::Command::Bench(flags) => bench::run(&flags),
        flags::Command::Chaos(flags) => chaos::run(&flags),
        flags::Command::Soak(flags) => soak::run(&flags),
        flags::Command::Ci => ci::run(),
        flags::Command::Readme => {
            progress!("readme: regenerating the driver feature table");
            process::run(
                process::cargo()
                    .args(["test", "-q", "-p", "tooz", "--test", "readme_table"])
                    .env("TOOZ_BLESS_README", "1"),
            )
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            progress!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
