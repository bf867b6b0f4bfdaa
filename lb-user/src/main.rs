//! The `xdplb` binary: parses the command line, sets up logging, dispatches.
use std::process::ExitCode;

use clap::Parser as _;
use lb_user::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    lb_user::logging::init(cli.log_format);
    let res = match cli.command {
        Command::Run(args) => lb_user::daemon::run_cli(*args),
        Command::Down(args) => lb_user::daemon::down(&args.pin_dir),
        Command::Stats(args) => lb_user::stats::run_stats(&args),
        Command::Backends(args) => lb_user::stats::run_backends(&args),
        Command::Top(args) => lb_user::top::run(&args),
        Command::Explain(args) => lb_user::explain::run(&args),
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
