//! `castor`: fault-tolerant virtual machines on KVM.
//!
//! Exit codes (also in the README):
//! * 0: success
//! * 2: bad command line (clap)
//! * 3: the machine could not be built (KVM, memory, snapshot that does not fit)
//! * 4: the guest failed while running (exception, vCPU stopped, pause timeout)
//! * 5: file I/O (snapshots, expectation files, secret files: a weak link
//!   key, or `castor keygen` refusing to overwrite a file without `--force`)
//! * 6: a verification the user asked for failed (e.g. `--kv-verify`)
//! * 8: `castor vm`: refused (the VM exists, has a witness history, does
//!   not exist, or its nodes still run)
//! * 9: `castor vm`, `castor agent`: etcd unreachable (or its host name is
//!   registered already)
//! * 130: `castor demo --pool` interrupted (SIGINT, SIGTERM), once it has
//!   stopped every process it started

mod agent;
mod bench;
mod bench_e2e;
mod demo;
mod kvload;
mod net_arg;
mod node_cmd;
mod node_rt;
mod run;
mod vm_cmd;

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
    /// Run a guest as the primary: epochs to the secondary, output commit, heartbeats.
    Primary(node_cmd::PrimaryArgs),
    /// Keep a page-exact replica and take over when the primary goes silent.
    Secondary(node_cmd::SecondaryArgs),
    /// Show a node's status (role, generation, epochs, protection, last epoch's phases).
    Status {
        #[command(flatten)]
        control: node_cmd::ControlArgs,
    },
    /// Secondary + primary on loopback with the kv guest and clients; injects a
    /// fault halfway (--scenario: kill-primary, standby-dies, partition, switchover).
    /// With --pool N: N agents, two VMs under load, a host killed with its nodes.
    Demo(demo::DemoArgs),
    /// Measure epoch latency, ring vs bitmap, the physical floor, and the service end to end.
    Bench(bench::BenchArgs),
    /// Closed-loop kv client load against a node's service address; prints ops/s and latency.
    Load {
        /// The node's service address.
        #[arg(long)]
        service: std::net::SocketAddr,
        /// Concurrent clients (each with one request outstanding).
        #[arg(long, default_value_t = 256)]
        clients: u32,
        /// How long the load runs (more than 0).
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// Force a failover: the secondary at this control address takes over now.
    Failover {
        #[command(flatten)]
        control: node_cmd::ControlArgs,
    },
    /// End a primary's hold: it runs unprotected and releases what it held
    /// (only when you know its secondary is gone; refused unless holding).
    Unprotect {
        #[command(flatten)]
        control: node_cmd::ControlArgs,
    },
    /// Make a link key file for `--secret-file`: 32 random bytes, mode 0600.
    /// Copy the same file to both nodes. An existing file is not overwritten
    /// unless --force (exit 5).
    Keygen {
        /// The key file to create.
        file: std::path::PathBuf,
        /// Replace an existing file (both nodes then need the new key).
        #[arg(long)]
        force: bool,
    },
    /// Planned switchover: the primary at this control address finishes its
    /// epoch, waits for the ack and hands over; its secondary takes over at
    /// once and the old primary exits 0. Refused unless protected.
    Switchover {
        #[command(flatten)]
        control: node_cmd::ControlArgs,
    },
    /// One per host of a pool: registers the host in etcd, claims
    /// placements, starts and supervises the castor nodes placed on it.
    Agent(agent::AgentArgs),
    /// The pool's VMs: create, list, show, delete (desired state in etcd).
    Vm(vm_cmd::VmArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CASTOR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // A panic anywhere ends the process (as panic = "abort" would, without
    // building the test harness's dependencies twice): a half-done step must
    // not leave a primary serving beside a state it did not finish. The one
    // exception is code run under `crashpoint::contained::contain`, whose
    // caller cleans up: the secondary's apply thread, which marks its replica
    // unusable before writing a page (no failover from it; a resync follows).
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        if !common::crashpoint::contained::is_inside() {
            std::process::abort();
        }
    }));
    let cli = Cli::parse();
    let node = |name: &str, r: Result<(), node_cmd::NodeCmdError>| match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("castor {name}: {e}");
            e.exit_code()
        }
    };
    let code = match cli.command {
        Command::Run(args) => match run::run(args) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("castor run: {e}");
                e.exit_code()
            }
        },
        Command::Demo(a) => match demo::demo(a) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("castor demo: {e}");
                e.exit_code()
            }
        },
        Command::Bench(a) => match bench::bench(a) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("castor bench: {e}");
                e.exit_code()
            }
        },
        Command::Load { seconds, .. } if !(seconds > 0.0 && seconds.is_finite()) => {
            eprintln!("castor load: --seconds must be more than 0 (got {seconds})");
            2
        }
        Command::Load { service, clients, seconds } => {
            let rt =
                tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
            let (rate, lat) = bench_e2e::kv_load(&rt, service, clients, seconds);
            if lat.is_empty() {
                // a load that reached nothing is no measurement
                eprintln!(
                    "castor load: no request to {service} was answered in {seconds} s (is a node serving there?)"
                );
                4
            } else {
                let round2 = |x: f64| (x * 100.0).round() / 100.0;
                let report = serde_json::json!({
                    "ops_per_s": rate.round() as u64,
                    "latency_ms_p50": round2(common::sync::percentile(&lat, 0.5)),
                    "latency_ms_p99": round2(common::sync::percentile(&lat, 0.99)),
                });
                println!("{report}");
                0
            }
        }
        Command::Keygen { file, force } => match common::auth::generate_secret_file(&file, force) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("castor keygen: {e}");
                5
            }
        },
        Command::Agent(a) => match agent::agent(a) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("castor agent: {e}");
                e.exit_code()
            }
        },
        Command::Vm(a) => match vm_cmd::vm(a) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("castor vm: {e}");
                e.exit_code()
            }
        },
        Command::Primary(a) => node("primary", node_cmd::primary(a)),
        Command::Secondary(a) => node("secondary", node_cmd::secondary(a)),
        Command::Status { control } => node("status", node_cmd::control(&control, "status").map(|j| println!("{j}"))),
        Command::Failover { control } => {
            node("failover", node_cmd::control(&control, "failover").map(|j| println!("{j}")))
        }
        Command::Unprotect { control } => {
            node("unprotect", node_cmd::control(&control, "unprotect").map(|j| println!("{j}")))
        }
        Command::Switchover { control } => {
            node("switchover", node_cmd::control(&control, "switchover").map(|j| println!("{j}")))
        }
    };
    std::process::exit(code);
}
