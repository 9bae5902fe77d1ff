use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    kopilka::cli::main_with(kopilka::cli::Cli::parse())
}
