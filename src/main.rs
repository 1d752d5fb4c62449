use std::process::ExitCode;

fn main() -> ExitCode {
    voicectl::cli::main()
}
