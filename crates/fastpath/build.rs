//! Builds the XDP program with clang when it is installed. Without clang
//! the crate still builds: the object is empty and loading says why.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "src/bpf/turn_fast.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo::rustc-check-cfg=cfg(fastpath_built)");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("turn_fast.o");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    // The kernel headers' asm/ directory lives under the host's multiarch
    // triple on Debian.
    let triple = Command::new("gcc")
        .arg("-dumpmachine")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let built = Command::new(&clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-I/usr/include/{triple}"))
        .args(["-c", src, "-o"])
        .arg(&out)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if built {
        println!("cargo:rustc-cfg=fastpath_built");
    } else {
        println!("cargo:warning=fastpath: {clang} could not build {src} (install clang and libbpf-dev); the kernel fast path is unavailable in this build");
        std::fs::write(&out, b"").expect("write an empty object");
    }
}
