//! The `kvfabric` binary's git-style subcommands: `kvfabric worker ARGS`
//! runs `kvfabric-worker ARGS` (found through `KVFABRIC_LIBEXEC_DIR`, beside
//! the executable, or on `PATH`); unknown subcommands and missing binaries
//! fail with a message naming what to do.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

const KVFABRIC: &str = env!("CARGO_BIN_EXE_kvfabric");

fn stub(dir: &Path, name: &str) {
    let p = dir.join(name);
    std::fs::write(&p, "#!/bin/sh\necho \"$0 ran with: $*\"\nexit 7\n").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn subcommands_run_their_binary_with_the_remaining_arguments() {
    let dir = tempfile::tempdir().unwrap();
    stub(dir.path(), "kvfabric-worker");
    let out = Command::new(KVFABRIC)
        .args(["worker", "--role", "decode", "--listen", "127.0.0.1:0"])
        .env("KVFABRIC_LIBEXEC_DIR", dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("kvfabric-worker ran with: --role decode --listen 127.0.0.1:0"),
        "{stdout}"
    );
    assert_eq!(out.status.code(), Some(7), "the exit status is the binary's own");
}

#[test]
fn unknown_subcommands_and_missing_binaries_say_what_to_do() {
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(KVFABRIC)
        .arg("frobnicate")
        .env("KVFABRIC_LIBEXEC_DIR", empty.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unrecognized subcommand 'frobnicate'") && err.contains("worker"),
        "{err}"
    );

    // Only checkable where the real binary was not built beside this one.
    let beside = Path::new(KVFABRIC).parent().unwrap().join("kvfabric-demo");
    if beside.exists() {
        println!("skipped the missing-binary case: {} exists", beside.display());
        return;
    }
    let out = Command::new(KVFABRIC)
        .arg("demo")
        .env("KVFABRIC_LIBEXEC_DIR", empty.path())
        .env("PATH", empty.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(127));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("kvfabric-demo") && err.contains("cargo build --release -p kvfabric-bench"),
        "{err}"
    );
}
