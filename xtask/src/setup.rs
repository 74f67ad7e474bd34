//! `cargo xtask setup`: makes this machine able to build the eBPF object, then
//! builds the release binaries. Every other task runs it first.
//!
//! Steps, each detected cheaply (no network) and installed only when missing:
//! 1. the nightly toolchain (`rustup toolchain list`), which aya-build uses
//!    through `rustup run nightly cargo build -Z build-std=core`;
//! 2. its `rust-src` component (`rustup component list --installed`);
//! 3. `bpf-linker` 0.13.0 (`bpf-linker --version`, on `PATH` or in
//!    `$CARGO_HOME/bin`), installed with `cargo install`; building it needs
//! 4. LLVM 22's development files (`/usr/lib/llvm-22/bin/llvm-config` and
//!    `libLLVM.so*`), from Debian's `llvm-22-dev`, checked only when
//!    bpf-linker has to be built;
//! 5. `cargo build --release --workspace`, which embeds the eBPF object in
//!    `router-daemon`.
//!
//! A step that cannot be done (not root, no apt-get, no rustup) is reported
//! with the command that would fix it, and setup carries on: router-daemon's
//! build script then embeds an empty object and the daemon uses its userspace
//! dataplane. Under `CI=true` a missing eBPF toolchain is an error.
//!
//! Output: one line per step that does work, or `setup: toolchain ready`.
use std::{
    collections::HashMap,
    env,
    ffi::{OsStr, OsString},
    fs,
    io::{self, BufRead as _, BufReader, IsTerminal as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// The bpf-linker release the eBPF build is pinned to.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The cargo feature of bpf-linker that matches [`LLVM_PREFIX`].
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";
/// Where Debian's `llvm-22-dev` installs LLVM.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// The Debian package with LLVM 22's development files.
const LLVM_APT_PACKAGE: &str = "llvm-22-dev";
/// The package whose build script embeds the eBPF object.
const DAEMON_PACKAGE: &str = "router-daemon";
/// The file name of the embedded object in that build script's `OUT_DIR`.
const EBPF_OBJECT: &str = "router-ebpf";

/// What the other tasks need once setup is done.
pub struct Toolchain {
    /// The workspace root.
    root: PathBuf,
    /// `PATH` for cargo and the binaries: the caller's, plus where the eBPF
    /// tools were found when that was not on it.
    path: OsString,
    /// Release executables the build produced, by target name.
    executables: HashMap<String, PathBuf>,
}

impl Toolchain {
    /// `$CARGO` (the cargo that runs xtask), in the workspace root, with the
    /// `PATH` on which the eBPF tools are found.
    pub fn cargo(&self) -> Command {
        let mut cmd = Command::new(cargo_program());
        cmd.current_dir(&self.root).env("PATH", &self.path);
        cmd
    }

    /// The workspace root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `PATH` with the tools setup found or installed.
    pub fn path(&self) -> &OsStr {
        &self.path
    }

    /// The path of the release executable `name` that setup built.
    pub fn release_bin(&self, name: &str) -> Result<&Path> {
        self.executables
            .get(name)
            .map(PathBuf::as_path)
            .with_context(|| format!("`cargo build --release --workspace` built no `{name}`"))
    }
}

/// True when running under CI (`CI=true`), where a missing eBPF toolchain is
/// an error instead of a fallback to the userspace dataplane.
pub fn is_ci() -> bool {
    env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Runs every setup step, then builds the workspace in release mode.
pub fn run() -> Result<Toolchain> {
    let root = workspace_root()?;
    let mut steps = Steps::new();
    steps.nightly();
    steps.bpf_linker();

    let complete = steps.missing.is_empty();
    for missing in &steps.missing {
        eprintln!(
            "setup: missing {}\n       fix: {}",
            missing.what, missing.fix
        );
    }
    if !complete {
        if is_ci() {
            bail!("the eBPF toolchain is incomplete, and CI=true requires it");
        }
        eprintln!(
            "setup: building without the eBPF object; router-daemon will use its userspace dataplane"
        );
    }

    let mut toolchain = Toolchain {
        root,
        path: steps.path,
        executables: HashMap::new(),
    };
    let mut built = build(&toolchain)?;
    let mut did_work = steps.did_work || built.compiled;

    // The daemon's build script reruns only when PATH or its sources change,
    // so an empty object built before the toolchain was installed stays.
    let skip = env::var_os("AYA_BUILD_SKIP").is_some();
    if complete && !skip && built.ebpf_object_empty() {
        eprintln!(
            "setup: the embedded eBPF object is empty though the toolchain is ready; rebuilding {DAEMON_PACKAGE}"
        );
        did_work = true;
        let mut clean = toolchain.cargo();
        clean.args(["clean", "--quiet", "--release", "--package", DAEMON_PACKAGE]);
        check_status(&mut clean)?;
        built = build(&toolchain)?;
        if built.ebpf_object_empty() {
            let msg = "router-daemon embedded an empty eBPF object though the toolchain is installed; see its build script's warnings above";
            if is_ci() {
                bail!(msg);
            }
            eprintln!("setup: warning: {msg}");
        }
    }
    toolchain.executables = built.executables;

    if !did_work && complete {
        eprintln!("setup: toolchain ready");
    }
    Ok(toolchain)
}

/// A piece of the eBPF toolchain that setup could not install.
struct Missing {
    /// What is missing, and what for.
    what: String,
    /// The command that would install it.
    fix: String,
}

/// The toolchain steps' shared state.
struct Steps {
    /// `PATH` as the children will see it.
    path: OsString,
    /// Whether any step installed something.
    did_work: bool,
    /// What could not be installed.
    missing: Vec<Missing>,
}

impl Steps {
    fn new() -> Self {
        Self {
            path: env::var_os("PATH").unwrap_or_default(),
            did_work: false,
            missing: Vec::new(),
        }
    }

    /// Announces a step that does work.
    fn work(&mut self, what: &str) {
        self.did_work = true;
        eprintln!("setup: {what}");
    }

    fn missing(&mut self, what: impl Into<String>, fix: impl Into<String>) {
        self.missing.push(Missing {
            what: what.into(),
            fix: fix.into(),
        });
    }

    /// Finds `program` on `PATH`, or else in `$CARGO_HOME/bin`, which is then
    /// appended to `PATH` so that cargo and build scripts find it too.
    fn find(&mut self, program: &str) -> Option<PathBuf> {
        if let Some(found) = find_in(program, &self.path) {
            return Some(found);
        }
        let found = executable(&cargo_bin_dir().join(program))?;
        self.path = join_paths(env::split_paths(&self.path).chain([cargo_bin_dir()]));
        Some(found)
    }

    /// Steps 1 and 2: the nightly toolchain and its `rust-src`.
    fn nightly(&mut self) {
        let Some(rustup) = self.find("rustup") else {
            self.missing(
                "rustup, which provides the nightly toolchain that builds the eBPF object",
                "curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y \
                 && rustup toolchain install nightly --profile minimal --component rust-src",
            );
            return;
        };
        let toolchains = stdout_of(Command::new(&rustup).args(["toolchain", "list"]));
        let has_nightly = toolchains.lines().any(|line| {
            line.split_whitespace()
                .next()
                .is_some_and(|name| name == "nightly" || name.starts_with("nightly-"))
        });
        if !has_nightly {
            let args = [
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ];
            self.work("installing the nightly toolchain with rust-src (rustup)");
            if !succeeds(Command::new(&rustup).args(args)) {
                self.missing(
                    "the nightly toolchain, which builds the eBPF object",
                    format!("rustup {}", args.join(" ")),
                );
                return;
            }
        }

        let components = stdout_of(Command::new(&rustup).args([
            "component",
            "list",
            "--toolchain",
            "nightly",
            "--installed",
        ]));
        if !components.lines().any(|line| line.trim() == "rust-src") {
            let args = ["component", "add", "rust-src", "--toolchain", "nightly"];
            self.work("adding rust-src to the nightly toolchain (rustup)");
            if !succeeds(Command::new(&rustup).args(args)) {
                self.missing(
                    "the nightly toolchain's rust-src component (for -Z build-std=core)",
                    format!("rustup {}", args.join(" ")),
                );
            }
        }
    }

    /// Step 3: bpf-linker, built against LLVM 22 (step 4) when missing.
    fn bpf_linker(&mut self) {
        if self.find("bpf-linker").is_some_and(|p| bpf_linker_ok(&p)) {
            return;
        }
        let install = format!(
            "LLVM_PREFIX={LLVM_PREFIX} cargo install bpf-linker@{BPF_LINKER_VERSION} --locked \
             --force --no-default-features --features {BPF_LINKER_LLVM_FEATURE}"
        );
        if !self.llvm(&install) {
            return;
        }
        self.work(&format!(
            "installing bpf-linker {BPF_LINKER_VERSION} with cargo install (takes several minutes)"
        ));
        let bpf_linker = format!("bpf-linker@{BPF_LINKER_VERSION}");
        let installed = succeeds(
            Command::new(cargo_program())
                .args(["install", &bpf_linker, "--locked", "--force"])
                .args([
                    "--no-default-features",
                    "--features",
                    BPF_LINKER_LLVM_FEATURE,
                ])
                .env("LLVM_PREFIX", LLVM_PREFIX),
        );
        let bin_dir = install_bin_dir();
        let linker = bin_dir.join("bpf-linker");
        if !installed || !bpf_linker_ok(&linker) {
            self.missing(
                format!("bpf-linker {BPF_LINKER_VERSION}, which links the eBPF object"),
                install,
            );
            return;
        }
        // Another bpf-linker earlier on PATH would still shadow this one.
        if self.find("bpf-linker").as_deref() != Some(linker.as_path()) {
            self.path = join_paths([bin_dir].into_iter().chain(env::split_paths(&self.path)));
        }
    }

    /// Step 4: LLVM 22's development files, which building bpf-linker needs.
    /// `install_linker` is the command that would follow, for the report.
    fn llvm(&mut self, install_linker: &str) -> bool {
        if llvm_installed() {
            return true;
        }
        let what = format!(
            "LLVM 22 development files ({LLVM_PREFIX}, Debian package {LLVM_APT_PACKAGE}), \
             needed to build bpf-linker"
        );
        // SAFETY: geteuid has no preconditions and cannot fail.
        let is_root = unsafe { libc::geteuid() } == 0;
        let apt_get = self.find("apt-get");
        let Some(apt_get) = apt_get.filter(|_| is_root) else {
            let sudo = if is_root { "" } else { "sudo " };
            self.missing(
                what,
                format!(
                    "{sudo}apt-get update && {sudo}apt-get install -y {LLVM_APT_PACKAGE} \
                     && {install_linker}"
                ),
            );
            return false;
        };
        self.work(&format!("installing {LLVM_APT_PACKAGE} (apt-get)"));
        let apt = |args: &[&str]| {
            succeeds(
                Command::new(&apt_get)
                    .args(args)
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .stdin(Stdio::null()),
            )
        };
        let installed = apt(&["update", "-qq"])
            && apt(&[
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                LLVM_APT_PACKAGE,
            ]);
        if !installed || !llvm_installed() {
            self.missing(
                what,
                format!(
                    "apt-get update && apt-get install -y {LLVM_APT_PACKAGE} && {install_linker}"
                ),
            );
            return false;
        }
        true
    }
}

/// The outcome of `cargo build --release --workspace`.
struct Build {
    /// Whether cargo printed anything but its closing `Finished` line.
    compiled: bool,
    /// Release executables, by target name.
    executables: HashMap<String, PathBuf>,
    /// `OUT_DIR` of the daemon's build script, where the eBPF object is.
    daemon_out_dir: Option<PathBuf>,
}

impl Build {
    /// True when the daemon's build script left an empty (or no) object.
    fn ebpf_object_empty(&self) -> bool {
        self.daemon_out_dir
            .as_ref()
            .is_some_and(|dir| fs::metadata(dir.join(EBPF_OBJECT)).map_or(true, |m| m.len() == 0))
    }
}

/// Step 5: `cargo build --release --workspace`. cargo's output is shown,
/// except a lone `Finished` line when there was nothing to do.
fn build(toolchain: &Toolchain) -> Result<Build> {
    let mut cmd = toolchain.cargo();
    cmd.args(["build", "--release", "--workspace"])
        .arg("--message-format=json-render-diagnostics")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if io::stderr().is_terminal() {
        cmd.arg("--color=always");
    }
    let mut child = cmd.spawn().context("starting cargo build")?;
    let stdout = child.stdout.take().context("cargo build has no stdout")?;
    let stderr = child.stderr.take().context("cargo build has no stderr")?;

    let messages = thread::spawn(move || read_build_messages(stdout));
    let mut compiled = false;
    for line in BufReader::new(stderr).split(b'\n') {
        let line = line.context("reading cargo build's output")?;
        let line = String::from_utf8_lossy(&line);
        let plain = strip_ansi(&line);
        if is_nested_status(&plain)
            || (!compiled && (plain.trim().is_empty() || is_status(&plain, "Finished")))
        {
            continue;
        }
        if !compiled {
            compiled = true;
            eprintln!("setup: cargo build --release --workspace");
        }
        eprintln!("{line}");
    }
    let status = child.wait().context("waiting for cargo build")?;
    let (executables, daemon_out_dir) = messages
        .join()
        .map_err(|_| anyhow::anyhow!("the cargo message reader panicked"))?;
    if !status.success() {
        bail!("`cargo build --release --workspace` failed ({status})");
    }
    Ok(Build {
        compiled,
        executables,
        daemon_out_dir,
    })
}

/// Collects executables and the daemon build script's `OUT_DIR` from cargo's
/// JSON messages.
fn read_build_messages(stdout: impl io::Read) -> (HashMap<String, PathBuf>, Option<PathBuf>) {
    let mut executables = HashMap::new();
    let mut daemon_out_dir = None;
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let package_id = msg["package_id"].as_str().unwrap_or_default();
        match msg["reason"].as_str() {
            Some("compiler-artifact") => {
                if let (Some(name), Some(exe)) =
                    (msg["target"]["name"].as_str(), msg["executable"].as_str())
                {
                    executables.insert(name.to_owned(), PathBuf::from(exe));
                }
            }
            Some("build-script-executed") if is_package(package_id, DAEMON_PACKAGE) => {
                daemon_out_dir = msg["out_dir"].as_str().map(PathBuf::from);
            }
            _ => {}
        }
    }
    (executables, daemon_out_dir)
}

/// Whether a cargo package id (`path+file:///…/router-daemon#0.1.0`, or the
/// older `router-daemon 0.1.0 (path+file://…)`) names `package`.
fn is_package(package_id: &str, package: &str) -> bool {
    package_id.starts_with(&format!("{package} "))
        || package_id.split_once('#').is_some_and(|(url, version)| {
            url.ends_with(&format!("/{package}")) || version.starts_with(&format!("{package}@"))
        })
}

/// Whether `line` is a cargo status line with this verb (`   Compiling x`).
fn is_status(line: &str, verb: &str) -> bool {
    line.trim_start()
        .strip_prefix(verb)
        .is_some_and(|rest| rest.starts_with(' '))
}

/// Whether `line` is a status line of the nested eBPF build, which aya-build
/// forwards as build script warnings (`warning: router-daemon@0.1.0:
/// Compiling core …`) and cargo replays on every build, even a fresh one.
fn is_nested_status(line: &str) -> bool {
    const VERBS: [&str; 12] = [
        "Adding",
        "Blocking",
        "Building",
        "Checking",
        "Compiling",
        "Downloaded",
        "Downloading",
        "Finished",
        "Fresh",
        "Locking",
        "Running",
        "Updating",
    ];
    line.strip_prefix("warning: ")
        .and_then(|rest| rest.split_once(": "))
        .is_some_and(|(package, message)| {
            package.contains('@') && VERBS.iter().any(|verb| is_status(message, verb))
        })
}

/// Removes ANSI colour sequences (`ESC [ … letter`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Where built and downloaded tools are kept across clones (CI's clone
/// starts with an empty `target/`): `$XDG_CACHE_HOME` or `~/.cache`, under
/// `prefix-router`.
pub fn cache_dir() -> Result<PathBuf> {
    let base = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .context("neither XDG_CACHE_HOME nor HOME is set")?;
    Ok(base.join("prefix-router"))
}

/// The workspace root: the parent of this crate's directory.
pub fn workspace_root() -> Result<PathBuf> {
    let manifest_dir = env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .context("xtask's directory has no parent")
}

/// `$CARGO`, set by cargo for the programs it runs; `cargo` otherwise.
fn cargo_program() -> OsString {
    env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// `$CARGO_HOME/bin`, where rustup and `cargo install` put programs.
fn cargo_bin_dir() -> PathBuf {
    let home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env::var_os("HOME").unwrap_or_default()).join(".cargo"));
    home.join("bin")
}

/// Where `cargo install` puts binaries: `$CARGO_INSTALL_ROOT/bin` or
/// `$CARGO_HOME/bin`.
fn install_bin_dir() -> PathBuf {
    env::var_os("CARGO_INSTALL_ROOT")
        .map_or_else(cargo_bin_dir, |root| PathBuf::from(root).join("bin"))
}

/// Whether `path` runs and reports the pinned bpf-linker version.
fn bpf_linker_ok(path: &Path) -> bool {
    stdout_of(Command::new(path).arg("--version"))
        .split_whitespace()
        .nth(1)
        .is_some_and(|version| version == BPF_LINKER_VERSION)
}

/// Whether LLVM 22's `llvm-config` and shared library are installed.
fn llvm_installed() -> bool {
    let prefix = Path::new(LLVM_PREFIX);
    prefix.join("bin/llvm-config").is_file()
        && fs::read_dir(prefix.join("lib")).is_ok_and(|entries| {
            entries.filter_map(Result::ok).any(|entry| {
                entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with("libLLVM.so")
            })
        })
}

/// Stops a child this process started: SIGTERM, then SIGKILL once `grace`
/// has passed; `what` names it in the message about the kill.
pub fn terminate(child: &mut Child, what: &str, grace: Duration) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) has no memory-safety preconditions; the child is
        // not reaped yet, so its pid still names it.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + grace;
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    if matches!(child.try_wait(), Ok(None)) {
        eprintln!("xtask: {what} did not stop within {grace:?}; killing it");
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Whether `program` is an executable on the caller's `PATH`.
pub fn on_path(program: &str) -> bool {
    env::var_os("PATH").is_some_and(|path| find_in(program, &path).is_some())
}

/// Installs Debian `packages` (`apt-get update`, then `apt-get install`
/// without recommends); needs root.
pub fn apt_install(packages: &[&str]) -> Result<()> {
    run_announced(Command::new("apt-get").args(["update", "-q"]))?;
    run_announced(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// The first executable `program` on `path`.
fn find_in(program: &str, path: &OsStr) -> Option<PathBuf> {
    env::split_paths(path).find_map(|dir| executable(&dir.join(program)))
}

/// `path` if it is an executable file.
fn executable(path: &Path) -> Option<PathBuf> {
    let meta = fs::metadata(path).ok()?;
    (meta.is_file() && meta.permissions().mode() & 0o111 != 0).then(|| path.to_path_buf())
}

/// Joins directories into a `PATH` value; a directory that cannot be in
/// one (it contains `:`) is left out.
fn join_paths(dirs: impl IntoIterator<Item = PathBuf>) -> OsString {
    let dirs: Vec<PathBuf> = dirs.into_iter().collect();
    env::join_paths(&dirs).unwrap_or_else(|_| {
        env::join_paths(
            dirs.iter()
                .filter(|d| !d.as_os_str().as_encoded_bytes().contains(&b':')),
        )
        .unwrap_or_default()
    })
}

/// The standard output of a command that succeeded, or "" (no stdin).
fn stdout_of(cmd: &mut Command) -> String {
    cmd.stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default()
}

/// Runs a command with inherited output; true if it ran and succeeded.
fn succeeds(cmd: &mut Command) -> bool {
    match cmd.status() {
        Ok(status) => status.success(),
        Err(err) => {
            eprintln!("setup: cannot run {:?}: {err}", cmd.get_program());
            false
        }
    }
}

/// Runs a command with inherited output and fails unless it succeeds.
pub fn check_status(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{} failed ({status})", describe(cmd));
    }
    Ok(())
}

/// Announces `cmd` on stderr (`xtask: ...`), then runs it as
/// [`check_status`] does.
pub fn run_announced(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {}", describe(cmd));
    check_status(cmd)
}

/// A command as a shell-like string, for messages.
pub fn describe(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program())
        .file_name()
        .unwrap_or(cmd.get_program())
        .to_string_lossy()
        .into_owned();
    let args = cmd.get_args().map(|arg| arg.to_string_lossy().into_owned());
    [program]
        .into_iter()
        .chain(args)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_status_lines_are_recognised() {
        let nested = "warning: router-daemon@0.1.0:    Compiling core v0.0.0 (/x)";
        assert!(is_nested_status(nested));
        assert!(is_nested_status(
            "warning: router-daemon@0.1.0:     Finished `release` profile"
        ));
        // Real warnings, from the nested build or a build script, stay.
        assert!(!is_nested_status(
            "warning: router-daemon@0.1.0: warning: unused variable"
        ));
        assert!(!is_nested_status(
            "warning: router-daemon@0.1.0: building without the eBPF object"
        ));
        assert!(!is_nested_status("   Compiling router-daemon v0.1.0"));
        assert!(is_status("    Finished `release` profile", "Finished"));
        assert!(!is_status("FinishedX", "Finished"));
    }

    #[test]
    fn package_ids_are_matched() {
        assert!(is_package(
            "path+file:///work/main/router-daemon#0.1.0",
            "router-daemon"
        ));
        assert!(is_package(
            "path+file:///work/main/daemon#router-daemon@0.1.0",
            "router-daemon"
        ));
        assert!(is_package(
            "router-daemon 0.1.0 (path+file:///work/main/router-daemon)",
            "router-daemon"
        ));
        assert!(!is_package(
            "path+file:///work/main/router-daemon-extra#0.1.0",
            "router-daemon"
        ));
    }

    #[test]
    fn ansi_colours_are_stripped() {
        assert_eq!(
            strip_ansi("\x1b[1m\x1b[92m    Finished\x1b[0m `release`"),
            "    Finished `release`"
        );
    }
}
