//! Builds the built-in guest (vmm/guest: a CPL0 kernel in GNU as and CPL3
//! workloads in C) with the machine's gcc and binutils, and leaves a flat binary
//! in OUT_DIR for `include_bytes!`.

use std::path::PathBuf;
use std::process::Command;

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?}: {e} (the guest build needs gcc and binutils: apt-get install gcc binutils)")
    });
    assert!(status.success(), "guest build step failed: {cmd:?}");
}

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let guest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("manifest dir")).join("guest");
    for f in ["abi.h", "boot.S", "user.c", "linker.ld"] {
        println!("cargo:rerun-if-changed=guest/{f}");
    }
    let elf = out.join("guest.elf");
    let cc = std::env::var("CASTOR_GUEST_CC").unwrap_or_else(|_| "gcc".into());
    run(Command::new(&cc)
        .args([
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
        .arg(guest.join("linker.ld"))
        .arg("-o")
        .arg(&elf)
        .arg(guest.join("boot.S"))
        .arg(guest.join("user.c")));
    run(Command::new("objcopy").args(["-O", "binary"]).arg(&elf).arg(out.join("guest.bin")));
}
