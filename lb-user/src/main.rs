//! The `xdplb` binary: parses the command line, sets up logging, dispatches.
use std::process::ExitCode;

use clap::Parser as _;
use lb_user::cli::{Cli, Command};

fn main() -> ExitCode {
    // Packaging's `xdplb generate man|completions DIR` is not part of `Cli`,
    // so neither --help, the man pages nor the completions offer it.
    if let Some(code) = lb_user::generate::main() {
        return code;
    }
    let cli = Cli::parse();
    lb_user::logging::init(cli.log_format);
    let res = match cli.command {
        Command::Run(args) => lb_user::daemon::run_cli(*args),
        Command::Down(args) => lb_user::daemon::down(&args.pin_dir),
        Command::Reload(args) => lb_user::daemon::reload_cli(
            &args.pin_dir,
            std::time::Duration::from_secs_f64(args.timeout),
        ),
        Command::Stats(args) => lb_user::report::stats::run_stats(&args),
        Command::Backends(args) => lb_user::report::backends::run_backends(&args),
        Command::Top(args) => lb_user::report::top::run(&args),
        Command::Explain(args) => lb_user::report::explain::run(&args),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line an operator can act on; the chain says what we were doing.
            eprintln!("xdplb: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
