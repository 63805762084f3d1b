//! libnefele from C: its error paths, and the seed's Monte Carlo sample
//! on an embedded single node. Needs a C compiler and make (ci/setup.sh
//! installs them) and the workspace's `nefele` binary, built beside this
//! test by `cargo test --workspace`.

use std::path::PathBuf;
use std::process::Command;

#[path = "../../sdk-rs/tests/support/mod.rs"]
mod support;

/// `target/<profile>`, where libnefele.so and the nefele CLI are.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(|d| d.parent()).unwrap().to_path_buf()
}

fn nefele() -> PathBuf {
    let p = target_dir().join("nefele");
    assert!(
        p.exists(),
        "{} is missing: run `cargo test --workspace` (it builds the nefele CLI)",
        p.display()
    );
    p
}

fn include_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("include")
}

/// `target/<profile>/libnefele.so`, which `cargo test` alone does not build.
fn lib_dir() -> PathBuf {
    let lib = target_dir();
    assert!(
        lib.join("libnefele.so").exists(),
        "{} is missing: run `cargo build --workspace --release` before the tests (ci/test.sh does)",
        lib.join("libnefele.so").display()
    );
    lib
}

fn compile(source: &str, out: &std::path::Path) {
    let lib = lib_dir();
    let st = Command::new("cc")
        .args([
            "-std=c11",
            "-D_GNU_SOURCE",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-I",
        ])
        .arg(include_dir())
        .arg("-o")
        .arg(out)
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(source))
        .arg(format!("-L{}", lib.display()))
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-lnefele")
        .status()
        .expect("cc");
    assert!(st.success(), "compiling {source} failed");
}

#[test]
fn null_and_malformed_arguments_are_errors_offline_and_online() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("api_errors");
    compile("tests/c/api_errors.c", &exe);
    let off = Command::new(&exe)
        .env("NEFELE_FABRICD_SOCKET", dir.path().join("none.sock"))
        .output()
        .unwrap();
    assert!(
        off.status.success(),
        "offline: {}{}",
        String::from_utf8_lossy(&off.stdout),
        String::from_utf8_lossy(&off.stderr)
    );
    let on = Command::new(nefele())
        .arg("run")
        .arg(&exe)
        .arg("online")
        .output()
        .unwrap();
    assert!(
        on.status.success(),
        "online: {}{}",
        String::from_utf8_lossy(&on.stdout),
        String::from_utf8_lossy(&on.stderr)
    );
    assert!(String::from_utf8_lossy(&on.stdout).contains("ok (online)"));
}

#[test]
fn the_seeds_monte_carlo_sample_estimates_pi_on_one_node() {
    let build = tempfile::tempdir().unwrap();
    let st = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/montecarlo"))
        .arg(format!("NEFELE_LIB={}", lib_dir().display()))
        .arg(format!("NEFELE_INCLUDE={}", include_dir().display()))
        .arg(format!("BUILD={}", build.path().display()))
        .status()
        .expect("make");
    assert!(st.success(), "building the sample failed");
    support::run_pi_sample(
        &nefele(),
        &[build.path().join("montecarlo_main").as_os_str()],
    );
}
