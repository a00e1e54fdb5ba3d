//! Builds the built-in guests with the machine's gcc and binutils and leaves
//! flat binaries in OUT_DIR for `include_bytes!`:
//! - guest.bin: a CPL0 kernel in GNU as (vmm/guest/boot.S) and CPL3 workloads in C;
//! - guest-net.bin: the same kernel and the networked workload, a no_std Rust
//!   static library (vmm/guest/net, its own workspace and lock file) built by
//!   a nested cargo for the host target.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Most bytes a flat image may have (IMAGE_MAX in src/abi.rs).
const IMAGE_MAX: u64 = 0x100000;

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?}: {e} (the guest build needs gcc and binutils: apt-get install gcc binutils)")
    });
    assert!(status.success(), "guest build step failed: {cmd:?}");
}

/// gcc with the flags both images are linked with.
fn gcc(guest: &Path, script: &Path, elf: &Path) -> Command {
    let cc = std::env::var("CASTOR_GUEST_CC").unwrap_or_else(|_| "gcc".into());
    let mut c = Command::new(cc);
    c.args([
        "-m64",
        "-ffreestanding",
        "-fno-pie",
        "-no-pie",
        "-nostdlib",
        "-static",
        "-mno-red-zone",
        "-mgeneral-regs-only",
        "-fno-stack-protector",
        "-fno-asynchronous-unwind-tables",
        "-O2",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-Wl,--build-id=none",
    ])
    .arg(format!("-I{}", guest.display()))
    .arg("-T")
    .arg(script)
    .arg("-o")
    .arg(elf);
    c
}

fn objcopy(elf: &Path, bin: &Path) {
    run(Command::new("objcopy").args(["-O", "binary"]).arg(elf).arg(bin));
    let len = std::fs::metadata(bin).map(|m| m.len()).unwrap_or(u64::MAX);
    assert!(len <= IMAGE_MAX, "{} is {len} bytes, over the {IMAGE_MAX}-byte image window", bin.display());
}

/// Environment of the outer build that must not reach the nested cargo: flags
/// meant for castor's own crates, its target directory and target, and the
/// variables cargo sets for build scripts. Registry, network, home and
/// jobserver settings (CARGO_MAKEFLAGS: the nested build shares the job
/// slots) are kept.
fn scrubbed(cmd: &mut Command) {
    const KEEP: [&str; 7] = [
        "CARGO_HOME",
        "CARGO_MAKEFLAGS",
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
        "CARGO_REGISTRY_",
        "CARGO_TERM_",
    ];
    const DROP: [&str; 12] = [
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "TARGET",
        "HOST",
        "OUT_DIR",
        "OPT_LEVEL",
        "PROFILE",
        "DEBUG",
        "NUM_JOBS",
        "RUSTC_LINKER",
    ];
    for (k, _) in std::env::vars_os() {
        let Some(k) = k.to_str() else { continue };
        let cargo_var =
            k.starts_with("CARGO_") && !KEEP.iter().any(|p| k == *p || (p.ends_with('_') && k.starts_with(p)));
        if cargo_var || DROP.contains(&k) || k.starts_with("__CARGO") {
            cmd.env_remove(k);
        }
    }
}

fn build_net(guest: &Path, out: &Path) {
    let net = guest.join("net");
    for f in ["Cargo.toml", "Cargo.lock", "linker.ld", "src"] {
        println!("cargo:rerun-if-changed=guest/net/{f}");
    }
    let target_dir = out.join("guest-net-target");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut c = Command::new(cargo);
    scrubbed(&mut c);
    c.args(["build", "--release", "--locked", "--target", "x86_64-unknown-linux-gnu", "--manifest-path"])
        .arg(net.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&net);
    run(&mut c);
    let lib = target_dir.join("x86_64-unknown-linux-gnu/release/libcastor_guest_net.a");
    let elf = out.join("guest-net.elf");
    run(gcc(guest, &net.join("linker.ld"), &elf)
        .args(["-Wl,--gc-sections", "-Wl,--no-warn-rwx-segments"])
        .arg(guest.join("boot.S"))
        .arg(&lib));
    objcopy(&elf, &out.join("guest-net.bin"));
}

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let guest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("manifest dir")).join("guest");
    for f in ["abi.h", "boot.S", "user.c", "linker.ld"] {
        println!("cargo:rerun-if-changed=guest/{f}");
    }
    let elf = out.join("guest.elf");
    run(gcc(&guest, &guest.join("linker.ld"), &elf).arg(guest.join("boot.S")).arg(guest.join("user.c")));
    objcopy(&elf, &out.join("guest.bin"));
    build_net(&guest, &out);
}
