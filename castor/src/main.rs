//! `castor`: fault-tolerant virtual machines on KVM.
//!
//! Exit codes (also in the README):
//! * 0: success
//! * 2: bad command line (clap)
//! * 3: the machine could not be built (KVM, memory, snapshot that does not fit)
//! * 4: the guest failed while running (exception, vCPU stopped, pause timeout)
//! * 5: file I/O (snapshots, expectation files)
//! * 6: a verification the user asked for failed (e.g. `--kv-verify`)

mod kvload;
mod run;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "castor", version, about = "Fault-tolerant virtual machines on KVM")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a built-in guest unprotected, collecting its dirty set every epoch, with live stats.
    Run(run::RunArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CASTOR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run(args) => match run::run(args) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("castor run: {e}");
                e.exit_code()
            }
        },
    };
    std::process::exit(code);
}
