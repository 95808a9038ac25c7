//! Builds the data plane (lb-ebpf's `lb` binary) with the nightly toolchain for the bpf target
//! and leaves the object in OUT_DIR, where `include_bytes_aligned!` embeds it.
//!
//! This does what `aya_build::build_ebpf` does, plus `-C target-cpu=v3`: the round-robin cursor
//! needs BPF's fetching atomic add, which LLVM emits only for CPU v3 (kernel 5.1+ for the
//! instruction set, 5.12+ for the atomic), and aya-build 0.2 offers no way to pass rustflags.
use std::{env, fs, path::PathBuf, process::Command};

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir.parent().expect("workspace folder");
    for watched in [
        "lb-ebpf/src",
        "lb-ebpf/Cargo.toml",
        "lb-common/src",
        "lb-common/Cargo.toml",
    ] {
        println!(
            "cargo:rerun-if-changed={}",
            workspace.join(watched).display()
        );
    }
    println!("cargo:rerun-if-env-changed=PATH");

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let target_dir = out_dir.join("ebpf-target");
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("CARGO_CFG_TARGET_ARCH");
    let target = match env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() {
        Ok("big") => "bpfeb-unknown-none",
        _ => "bpfel-unknown-none",
    };
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".to_owned(),
        "-Clink-arg=--btf".to_owned(),
        "-Ctarget-cpu=v3".to_owned(),
    ]
    .join("\x1f");

    let mut cargo = Command::new("rustup");
    cargo
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--package",
            "lb-ebpf",
            "--bins",
        ])
        .args(["--release", "-Z", "build-std=core", "--target", target])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(workspace)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        // The outer (stable) build's compiler settings must not leak into the nightly build.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR");
    let status = cargo
        .status()
        .unwrap_or_else(|err| panic!("cannot run {cargo:?}: {err}; run `cargo xtask setup`"));
    assert!(
        status.success(),
        "building the eBPF programs failed ({status}); `cargo xtask setup` installs the \
         nightly rust-src component and bpf-linker they need"
    );
    let object = target_dir.join(target).join("release").join("lb");
    fs::copy(&object, out_dir.join("lb"))
        .unwrap_or_else(|err| panic!("cannot copy {}: {err}", object.display()));
}
