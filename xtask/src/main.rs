//! Project tasks, run as `cargo xtask <task>`:
//!
//! - `setup`: install what building and testing need (idempotent, fast when
//!   everything is there, non-interactive so CI can run it);
//! - `test`: setup, lints, build, then the whole test suite;
//! - `demo`: the routing mesh of a three-node swarm, shown end to end (from a client, then
//!   from each node's own shell with curl);
//! - `bench`: the benchmarks (release build), with a table, JSON and plots.

use std::ffi::OsString;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use lb_tests::Lbctl;
use lb_tests::client::http_get_new_connection;
use lb_tests::mesh::{Mesh, MeshSpec};
use lb_tests::topology::NODE_UPLINK;

/// The bpf-linker release that works with the nightly's LLVM here (0.11+
/// needs a system LLVM that Debian 12 does not ship).
const BPF_LINKER_VERSION: &str = "0.10.0";

/// Debian packages the tests, the demo, the benchmarks and debugging use. `prometheus` is
/// the server the metrics test scrapes lbctl with; the test runs its own
/// instance, so the packaged service need not (and in a container without
/// systemd does not) run.
const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "iputils-ping",
    "ethtool",
    "nftables",
    "bpftool",
    "tcpdump",
    "socat",
    "curl",
    "prometheus",
    "gnuplot-nox",
    // A real Docker Engine (20.10, API 1.41) for the Swarm test, run in a test namespace, and
    // the busybox its task image is made of (`busybox httpd`).
    "docker.io",
    "busybox-static",
    // The HTTP load generator of the failover tests (new connections under load) and the
    // benchmarks.
    "hey",
    // `systemd-analyze verify` of the package's units (the machine need not run systemd).
    "systemd",
];

/// Where bpffs must be mounted for lbctl to pin maps.
const BPFFS: &str = "/sys/fs/bpf";

/// `f_type` of a bpffs mount (BPF_FS_MAGIC in linux/magic.h).
const BPF_FS_MAGIC: libc::__fsword_t = 0xcafe_4a11;

/// Port of the demo's service on the node.
const DEMO_PORT: u16 = 8080;

/// Requests the demo sends.
const DEMO_REQUESTS: usize = 4;

#[derive(Parser)]
#[command(about = "lbctl project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain and Debian packages, mount bpffs.
    Setup,
    /// Setup, fmt and clippy, build, then run every test.
    Test {
        /// Skip `cargo fmt --check` and `cargo clippy`.
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name
        /// filter, or `-- --nocapture` for the test binaries.
        #[arg(last = true)]
        cargo_test_args: Vec<OsString>,
    },
    /// Measure the data plane against its floor and against nftables, and the control plane:
    /// prints a table and writes JSON and plots (default target/bench/).
    Bench {
        /// Arguments for the bench itself, e.g. `--only packet,e2e`, `--seconds 5`,
        /// `--out DIR`, `--smoke` (a quick check that every case still works).
        #[arg(last = true)]
        bench_args: Vec<OsString>,
    },
    /// Run mutated frames of every kind through the real XDP and TC programs (BPF_PROG_RUN),
    /// checking the data plane's invariants after each (tests/tests/fuzz.rs). A failing frame
    /// is printed in hex and saved under target/fuzz-failures/.
    Fuzz {
        /// How many frames.
        #[arg(long, default_value_t = 10_000_000)]
        frames: u64,
        /// The seed of the mutations (default: from the clock; printed, to run it again).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Build the Debian package operators install on every node: the release binary, the
    /// systemd units (attach at boot, the daemon) and /etc/lbctl/lbctl.conf.
    Dist {
        /// Where the .deb goes.
        #[arg(long, default_value = "target/dist")]
        out: PathBuf,
    },
    /// Show the routing mesh: nodes in namespaces on one underlay, tasks behind some of them,
    /// requests to every node answered by tasks wherever they run.
    Demo {
        /// Tasks on each node, comma-separated: as many nodes as numbers.
        #[arg(long, default_value = "2,2,0", value_delimiter = ',', num_args = 1..)]
        tasks_per_node: Vec<usize>,
    },
}

fn main() -> Result<()> {
    // Before any thread exists, so changing the environment is sound.
    add_cargo_bin_to_path();
    let cli = Cli::parse();
    match cli.task {
        Task::Setup => setup(),
        Task::Test {
            no_lint,
            cargo_test_args,
        } => test(no_lint, &cargo_test_args),
        Task::Demo { tasks_per_node } => demo(tasks_per_node),
        Task::Bench { bench_args } => bench(&bench_args),
        Task::Dist { out } => dist(&out),
        Task::Fuzz { frames, seed } => fuzz(frames, seed),
    }
}

/// Prepends `~/.cargo/bin` to PATH when it is missing there, so that tools
/// `cargo install` puts there (bpf-linker) are found by this process and by
/// the builds it starts (lb-userspace's build script links with bpf-linker).
fn add_cargo_bin_to_path() {
    let Some(home) = std::env::var_os("HOME") else {
        return;
    };
    let cargo_bin = Path::new(&home).join(".cargo/bin");
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|p| p == cargo_bin) {
        return;
    }
    let joined = std::env::join_paths(
        std::iter::once(cargo_bin.clone()).chain(std::env::split_paths(&path)),
    );
    if let Ok(joined) = joined {
        // SAFETY: called first thing in main, while this process has a
        // single thread, so nothing reads the environment concurrently.
        unsafe { std::env::set_var("PATH", joined) };
    }
}

/// Prints a step header, so the output of a long run can be followed.
fn step(title: &str) {
    println!("\n==> {title}");
}

/// The workspace root (the parent of this crate), where cargo commands run.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// Runs `program args...` with inherited stdio and fails unless it exits 0.
fn run(program: &str, args: &[&str]) -> Result<()> {
    run_cmd(Command::new(program).args(args))
}

/// Runs `cmd` in the workspace root with inherited stdout/stderr and no
/// stdin (CI has none; nothing may wait for input), failing unless it exits
/// 0.
fn run_cmd(cmd: &mut Command) -> Result<()> {
    let line = describe(cmd);
    println!("$ {line}");
    let status = cmd
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("cannot run `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs `program args...` quietly and returns its stdout, or `None` if it
/// cannot run or exits non-zero (used to probe what is installed).
fn probe(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The command line of `cmd`, for logs and errors.
fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------- setup

/// Installs and mounts whatever is missing; every check is cheap so a
/// second run does nothing.
fn setup() -> Result<()> {
    step("setup: nightly rust-src (for -Z build-std=core)");
    let components = probe(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .unwrap_or_default();
    if components.lines().any(|c| c.starts_with("rust-src")) {
        println!("rust-src is installed");
    } else {
        run(
            "rustup",
            &["component", "add", "rust-src", "--toolchain", "nightly"],
        )?;
    }

    step(&format!("setup: bpf-linker {BPF_LINKER_VERSION}"));
    let version = probe("bpf-linker", &["--version"]).unwrap_or_default();
    if version.split_whitespace().nth(1) == Some(BPF_LINKER_VERSION) {
        println!("{}", version.trim());
    } else {
        if !version.is_empty() {
            println!("found {}, need {BPF_LINKER_VERSION}", version.trim());
        }
        let spec = format!("bpf-linker@{BPF_LINKER_VERSION}");
        // --force: a bpf-linker that is installed but does not answer
        // `--version` as expected is broken, and must be replaced.
        run(
            "cargo",
            &["+nightly", "install", &spec, "--locked", "--force"],
        )?;
    }

    step("setup: Debian packages");
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| {
            probe("dpkg-query", &["-W", "-f", "${Status}", pkg]).as_deref()
                != Some("install ok installed")
        })
        .collect();
    if missing.is_empty() {
        println!("all installed: {}", APT_PACKAGES.join(" "));
    } else {
        lb_tests::require_root().context("installing Debian packages needs root")?;
        run("apt-get", &["update", "-q"])?;
        let mut install = Command::new("apt-get");
        install
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing);
        run_cmd(&mut install)?;
    }

    step(&format!("setup: bpffs at {BPFFS}"));
    if is_bpffs(BPFFS)? {
        println!("mounted");
    } else {
        lb_tests::require_root().context("mounting bpffs needs root")?;
        run("mount", &["-t", "bpf", "bpf", BPFFS])?;
    }
    Ok(())
}

/// Whether `path` is the root of a bpffs mount.
fn is_bpffs(path: &str) -> Result<bool> {
    let c_path = std::ffi::CString::new(path)?;
    // SAFETY: statfs is plain data, for which all zeroes is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is NUL-terminated and st is a valid, writable statfs.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error()).context(format!("statfs {path}"));
    }
    Ok(st.f_type == BPF_FS_MAGIC)
}

// ---------------------------------------------------------------- test

/// Everything CI checks, in order, stopping at the first failure.
fn test(no_lint: bool, cargo_test_args: &[OsString]) -> Result<()> {
    setup()?;
    if no_lint {
        println!("\n(--no-lint: skipping fmt and clippy)");
    } else {
        step("cargo fmt --check");
        run("cargo", &["fmt", "--all", "--", "--check"])?;
        step("cargo clippy");
        run(
            "cargo",
            &[
                "clippy",
                "--workspace",
                "--exclude",
                "lb-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        )?;
    }
    step("build lbctl and the test binaries");
    build_binaries()?;

    step("remove namespaces and lbctl instances left by killed test runs");
    let swept = lb_tests::netns::sweep_stale()?;
    println!("{swept} stale namespace(s) and instance(s) removed");

    step("cargo test");
    let mut cmd = Command::new("cargo");
    cmd.args(["test", "--workspace", "--exclude", "lb-ebpf"])
        .args(cargo_test_args);
    let line = describe(&cmd);
    println!("$ {line}");
    let mut child = cmd
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{line}`"))?;
    // Echo the runner's output and add up its per-binary results, so the run closes with one
    // total: cargo's last line is that of a doc-test binary with nothing to run.
    let (mut passed, mut failed) = (0u64, 0u64);
    let stdout = child.stdout.take().expect("piped stdout");
    for text in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let text = text.context("reading cargo test output")?;
        println!("{text}");
        if let Some(rest) = text.strip_prefix("test result: ") {
            passed += count_before(rest, " passed");
            failed += count_before(rest, " failed");
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    println!("\ncargo xtask test: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// The number just before `label` in a cargo `test result:` line (`ok. 6 passed; 0 failed; ...`).
fn count_before(result: &str, label: &str) -> u64 {
    result
        .split(';')
        .find_map(|part| part.trim().strip_suffix(label))
        .and_then(|n| n.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Builds the binaries the tests and the demo run: `lbctl` and
/// `lb-testsrv` (cargo only builds a package's own binaries for its
/// integration tests, and lbctl belongs to another package).
fn build_binaries() -> Result<()> {
    run(
        "cargo",
        &["build", "-p", "lb-userspace", "-p", "lb-tests", "--bins"],
    )
}

// ---------------------------------------------------------------- bench

/// Builds everything in release and runs the `lbbench` bench target of lb-tests (see
/// tests/benches/lbbench/main.rs), which finds the release `lbctl` and `lb-testsrv` beside it.
/// `cargo xtask dist`: the release build of lbctl, packaged (see `lb_tests::dist`).
fn dist(out: &Path) -> Result<()> {
    setup()?;
    step("build lbctl (release)");
    run("cargo", &["build", "--release", "-p", "lb-userspace"])?;
    step("package");
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let deb = lb_tests::dist::build_deb(
        Path::new("target/release/lbctl"),
        env!("CARGO_PKG_VERSION"),
        out,
    )?;
    println!(
        "{}\ninstall on each node: dpkg -i {}; edit /etc/lbctl/lbctl.conf; systemctl enable --now lbctl-attach lbctl-daemon",
        deb.display(),
        deb.file_name().unwrap_or_default().to_string_lossy()
    );
    Ok(())
}

fn fuzz(frames: u64, seed: Option<u64>) -> Result<()> {
    setup()?;
    lb_tests::require_root().context("the fuzzer loads the data plane's programs")?;
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    step(&format!("fuzz: {frames} frames, seed {seed}"));
    // Optimised: the data plane runs in the kernel either way, but the mutations, the table
    // reads and the reference checks around each frame run several times faster.
    let mut cmd = Command::new("cargo");
    cmd.args([
        "test",
        "--release",
        "-p",
        "lb-tests",
        "--test",
        "fuzz",
        "--",
        "--nocapture",
    ])
    .env("LBCTL_FUZZ_FRAMES", frames.to_string())
    .env("LBCTL_FUZZ_SEED", seed.to_string());
    run_cmd(&mut cmd)
}

fn bench(bench_args: &[OsString]) -> Result<()> {
    setup()?;
    lb_tests::require_root().context("the benchmarks build namespaces and load BPF programs")?;
    step("build lbctl and lb-testsrv (release)");
    run(
        "cargo",
        &[
            "build",
            "--release",
            "-p",
            "lb-userspace",
            "-p",
            "lb-tests",
            "--bins",
        ],
    )?;
    let swept = lb_tests::netns::sweep_stale()?;
    if swept > 0 {
        println!("{swept} stale namespace(s) and instance(s) removed");
    }
    step("cargo bench");
    let mut cmd = Command::new("cargo");
    cmd.args(["bench", "-p", "lb-tests", "--bench", "lbbench", "--"])
        .args(bench_args);
    run_cmd(&mut cmd)
}

// ---------------------------------------------------------------- demo

/// Set by SIGINT/SIGTERM; the demo checks it between steps and unwinds
/// through its guards (lbctl purge, namespaces deleted) when it is set.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Makes SIGINT and SIGTERM set [`INTERRUPTED`] instead of killing the
/// process, so cleanup runs. Blocking calls are bounded (client timeouts,
/// short commands), so the flag is seen within seconds.
fn install_signal_handlers() -> Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: sigaction is plain data, for which all zeroes is valid
        // (empty mask, no flags).
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: the handler only stores to an atomic; action is valid.
        if unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error()).context("sigaction");
        }
    }
    Ok(())
}

/// Fails if a signal asked the demo to stop, so `?` unwinds through the
/// cleanup guards.
fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Runs the demo; on Ctrl-C/SIGTERM (or any failure) its guards have
/// already cleaned up when this returns.
fn demo(tasks_per_node: Vec<usize>) -> Result<()> {
    install_signal_handlers()?;
    let result = demo_steps(tasks_per_node);
    if INTERRUPTED.load(Ordering::SeqCst) {
        // A child may have died of the same Ctrl-C first: say why.
        return result.context("demo interrupted by a signal; cleaned up");
    }
    result
}

/// The demo proper, with [`check_interrupted`] between steps.
fn demo_steps(tasks_per_node: Vec<usize>) -> Result<()> {
    setup()?;
    check_interrupted()?;
    step("build lbctl and lb-testsrv");
    build_binaries()?;
    check_interrupted()?;

    let nodes = tasks_per_node.len();
    step(&format!(
        "topology: a client and {nodes} nodes on one underlay, tasks {tasks_per_node:?} per node"
    ));
    // Declared before the lbctl instances so that it is dropped after them: lbctl purge must
    // still find the node namespaces.
    let mesh = Mesh::build(MeshSpec {
        nodes,
        tasks_per_node,
        ..MeshSpec::default()
    })?;
    println!(
        "client {} at {}; underlay MTU {}, overlay (task) MTU {}",
        mesh.client().name(),
        mesh.client_ip(),
        mesh.spec().underlay_mtu,
        mesh.spec().overlay_mtu()
    );
    for i in 0..nodes {
        let tasks: Vec<String> = mesh
            .tasks_on(i)
            .map(|k| format!("{} at {}", mesh.task_name(k), mesh.task_addr(k)))
            .collect();
        println!(
            "node {} ({}) at {} on {NODE_UPLINK}: {}",
            mesh.node_name(i),
            mesh.node(i).name(),
            mesh.node_ip(i),
            if tasks.is_empty() {
                "no task".to_owned()
            } else {
                tasks.join(", ")
            }
        );
    }
    check_interrupted()?;

    let backends: Vec<String> = (0..mesh.task_count())
        .map(|k| mesh.task_backend(k, false))
        .collect();
    let port = DEMO_PORT.to_string();
    let mut service_add = vec!["service", "add", "web", port.as_str()];
    service_add.extend(backends.iter().map(String::as_str));
    let mut commands: Vec<Vec<String>> = vec![vec!["attach".into(), NODE_UPLINK.into()]];
    for j in 0..nodes {
        commands.push(vec![
            "node".into(),
            "add".into(),
            mesh.node_name(j),
            mesh.node_ip(j).to_string(),
        ]);
    }
    commands.push(service_add.iter().map(|s| s.to_string()).collect());
    let mut instances = Vec::new();
    for i in 0..nodes {
        step(&format!(
            "lbctl on {}: the same table on every node",
            mesh.node_name(i)
        ));
        let lbctl = Lbctl::new(mesh.node(i))?;
        for args in &commands {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            println!("$ lbctl {}", args.join(" "));
            print!("{}", lbctl.run(&args)?);
            check_interrupted()?;
        }
        instances.push(lbctl);
    }

    for i in 0..nodes {
        let addr = SocketAddrV4::new(mesh.node_ip(i), DEMO_PORT);
        step(&format!(
            "{DEMO_REQUESTS} HTTP requests from the client to {} ({addr}), each on a new connection",
            mesh.node_name(i)
        ));
        for n in 1..=DEMO_REQUESTS {
            let reply = mesh
                .client()
                .in_netns(|| http_get_new_connection(addr))
                .with_context(|| format!("request {n} to {addr}"))?;
            let task_node = (0..mesh.task_count())
                .find(|&k| mesh.task_name(k) == reply.backend)
                .map(|k| mesh.node_name(mesh.task_node(k)))
                .unwrap_or_else(|| "?".into());
            println!(
                "request {n}: answered by {} on {task_node:<3}, which saw the client as {} (client's real address {})",
                reply.backend,
                reply.client_seen,
                mesh.client_ip()
            );
            check_interrupted()?;
        }
    }

    // The seeds' demo: each node's own shell curls 127.0.0.1, its own address and the next
    // node's, and gets every task in turn, wherever it runs (socket load balancing).
    for i in 0..nodes {
        let next = (i + 1) % nodes;
        for target in [
            std::net::Ipv4Addr::LOCALHOST,
            mesh.node_ip(i),
            mesh.node_ip(next),
        ] {
            let url = format!("http://{target}:{DEMO_PORT}/");
            step(&format!(
                "on {} itself: curl {url}, {DEMO_REQUESTS} times",
                mesh.node_name(i)
            ));
            for n in 1..=DEMO_REQUESTS {
                let out = mesh.node(i).exec(["curl", "-sS", "-m", "5", &url])?;
                if !out.status.success() {
                    bail!(
                        "curl {url} on {}: {}",
                        mesh.node_name(i),
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
                let reply = lb_tests::client::Reply::parse(&String::from_utf8_lossy(&out.stdout))?;
                let task_node = (0..mesh.task_count())
                    .find(|&k| mesh.task_name(k) == reply.backend)
                    .map(|k| mesh.node_name(mesh.task_node(k)))
                    .unwrap_or_else(|| "?".into());
                println!(
                    "curl {n}: answered by {} on {task_node:<3}, which saw the client as {}",
                    reply.backend, reply.client_seen
                );
                check_interrupted()?;
            }
        }
    }

    let last = nodes - 1;
    step(&format!("lbctl stats on {}", mesh.node_name(last)));
    print!("{}", instances[last].run(&["stats"])?);

    step("cleanup");
    drop(instances);
    drop(mesh);
    println!("done");
    Ok(())
}
