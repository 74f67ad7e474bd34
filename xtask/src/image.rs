//! `cargo xtask image`: the router's container image, built from
//! `deploy/Dockerfile`, and what building it offline takes: a Docker daemon
//! (this task starts its own when none answers, and stops it after) and,
//! with `--local-base`, a Debian bookworm base made by debootstrap instead
//! of pulled (`../shared/notes/kubernetes-offline.md`).
//!
//! The daemon this task starts keeps its images in the machine-wide cache,
//! so the local base is made once; it has no bridge and leaves iptables
//! alone, so a container it runs has the host's network or none.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::setup;

/// The Dockerfile, relative to the workspace root (also the build context).
const DOCKERFILE: &str = "deploy/Dockerfile";
/// Where `--prebuilt` puts the binary for the `prebuilt` stage.
const PREBUILT_DIR: &str = "deploy/prebuilt";
/// The chart whose `appVersion` tags the image, so its default values
/// name what this task builds.
const CHART: &str = "deploy/helm/prefix-router/Chart.yaml";
/// The runtime base `--local-base` makes and uses.
pub const LOCAL_BASE: &str = "local/bookworm:minbase";
/// How long a started daemon may take to answer.
const DAEMON_START: Duration = Duration::from_secs(60);
/// How long a started daemon may take to stop.
const DAEMON_STOP: Duration = Duration::from_secs(20);

/// Options of `cargo xtask image`.
#[derive(clap::Args)]
pub struct Args {
    /// Copy this machine's release build (setup builds it, eBPF object
    /// included) into the runtime base instead of building inside the image:
    /// no toolchain image is needed.
    #[arg(long)]
    prebuilt: bool,
    /// Use a Debian bookworm base made here by debootstrap (`local/bookworm:minbase`)
    /// as the runtime image: no registry is needed with `--prebuilt`.
    #[arg(long)]
    local_base: bool,
    /// The image's name; default `prefix-router:<the chart's appVersion>`.
    #[arg(long)]
    tag: Option<String>,
    /// The runtime base (the Dockerfile's `RUNTIME_IMAGE`).
    #[arg(long, conflicts_with = "local_base")]
    runtime_image: Option<String>,
    /// The toolchain image of the full build (`BUILD_IMAGE`).
    #[arg(long, conflicts_with = "prebuilt")]
    build_image: Option<String>,
    /// Also write the image as a docker-archive (`docker save`), e.g. for
    /// `ctr -n k8s.io images import`.
    #[arg(long, value_name = "FILE")]
    save: Option<PathBuf>,
}

/// Builds the image as `args` say.
pub fn run(args: Args) -> Result<()> {
    let root = setup::workspace_root()?;
    let binary = if args.prebuilt {
        let toolchain = setup::run()?;
        Some(toolchain.release_bin("router-daemon")?.to_path_buf())
    } else {
        None
    };
    let docker = Docker::ensure()?;
    let runtime = if args.local_base {
        docker.local_base()?;
        Some(LOCAL_BASE.to_owned())
    } else {
        args.runtime_image
    };
    let tag = match args.tag {
        Some(tag) => tag,
        None => default_tag(&root)?,
    };
    let build = Build {
        tag: &tag,
        prebuilt: binary.as_deref(),
        runtime_image: runtime.as_deref(),
        build_image: args.build_image.as_deref(),
    };
    docker.build(&root, &build)?;
    if let Some(file) = &args.save {
        setup::run_announced(docker.command().args(["save", "-o"]).arg(file).arg(&tag))?;
    }
    eprintln!("xtask image: built {tag}");
    Ok(())
}

/// What the tests need: the image built from this checkout's release
/// binary on the local base, and the daemon that holds it (kept running
/// while the value lives).
pub struct ForTests {
    /// The image's name, as the chart's default values give it.
    pub tag: String,
    /// The daemon, for the tests' `docker` commands (`DOCKER_HOST`).
    pub docker: Docker,
}

/// Builds the image the tests run: `--prebuilt --local-base`, from the
/// binary setup built.
pub fn for_tests(binary: &Path) -> Result<ForTests> {
    let root = setup::workspace_root()?;
    let docker = Docker::ensure()?;
    docker.local_base()?;
    let tag = default_tag(&root)?;
    docker.build(
        &root,
        &Build {
            tag: &tag,
            prebuilt: Some(binary),
            runtime_image: Some(LOCAL_BASE),
            build_image: None,
        },
    )?;
    Ok(ForTests { tag, docker })
}

impl ForTests {
    /// Writes the images the single-node cluster needs as docker-archives
    /// into `out`: the router image, vllm-sim (`vllm-sim:test`, the `sim`
    /// binary on the local base) and the pause container
    /// (`k8s.gcr.io/pause:3.2`, the `pause` binary alone), so containerd
    /// never pulls.
    pub fn archives(&self, sim: &Path, pause: &Path, out: &Path) -> Result<Vec<PathBuf>> {
        fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let contexts = [
            (
                "vllm-sim:test",
                sim,
                format!(
                    "FROM {LOCAL_BASE}\nCOPY vllm-sim /usr/local/bin/vllm-sim\nUSER 65534:65534\n\
                     ENTRYPOINT [\"/usr/local/bin/vllm-sim\"]\n"
                ),
                "vllm-sim",
            ),
            (
                "k8s.gcr.io/pause:3.2",
                pause,
                "FROM scratch\nCOPY pause /pause\nENTRYPOINT [\"/pause\"]\n".to_owned(),
                "pause",
            ),
        ];
        let mut archives = Vec::new();
        for (tag, binary, dockerfile, name) in contexts {
            let context = out.join(format!("{name}.context"));
            if context.exists() {
                fs::remove_dir_all(&context)?;
            }
            fs::create_dir_all(&context)?;
            fs::copy(binary, context.join(name))
                .with_context(|| format!("copying {}", binary.display()))?;
            fs::write(context.join("Dockerfile"), dockerfile)?;
            setup::run_announced(
                self.docker
                    .command()
                    .args(["build", "-q", "-t", tag])
                    .arg(&context)
                    .stdout(Stdio::null()),
            )?;
            fs::remove_dir_all(&context)?;
            archives.push((tag.to_owned(), out.join(format!("{name}.tar"))));
        }
        archives.push((self.tag.clone(), out.join("router.tar")));
        let mut files = Vec::new();
        for (tag, file) in archives {
            setup::run_announced(
                self.docker
                    .command()
                    .args(["save", "-o"])
                    .arg(&file)
                    .arg(&tag),
            )?;
            files.push(file);
        }
        Ok(files)
    }
}

/// One `docker build`.
struct Build<'a> {
    tag: &'a str,
    /// The binary for the `prebuilt` target; None: the full build.
    prebuilt: Option<&'a Path>,
    runtime_image: Option<&'a str>,
    build_image: Option<&'a str>,
}

/// `prefix-router:<appVersion>` from the chart.
fn default_tag(root: &Path) -> Result<String> {
    let chart = root.join(CHART);
    let text =
        fs::read_to_string(&chart).with_context(|| format!("reading {}", chart.display()))?;
    let version = text
        .lines()
        .find_map(|line| line.strip_prefix("appVersion:"))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .with_context(|| format!("{} has no appVersion", chart.display()))?;
    Ok(format!("prefix-router:{version}"))
}

/// A Docker daemon to talk to: the caller's, or one this task started.
pub struct Docker {
    /// `DOCKER_HOST` for the client; None: the client's default.
    host: Option<String>,
    /// The daemon this task started, stopped on drop.
    started: Option<Child>,
}

impl Docker {
    /// The caller's daemon if `docker info` answers; otherwise a `dockerd`
    /// started here (installing Debian's `docker.io` first if needed).
    fn ensure() -> Result<Self> {
        let caller = Self {
            host: None,
            started: None,
        };
        if setup::on_path("docker") && caller.answers() {
            return Ok(caller);
        }
        if !setup::on_path("dockerd") || !setup::on_path("docker") {
            setup::apt_install(&["docker.io"])?;
        }
        let dir = setup::cache_dir()?.join("docker");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let socket = dir.join("docker.sock");
        let log = dir.join("dockerd.log");
        let log_file =
            fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut dockerd = Command::new("dockerd");
        dockerd
            .arg("--host")
            .arg(format!("unix://{}", socket.display()))
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            // No docker0 bridge and no iptables rules: containers get the
            // host's network or none, and nothing leaves the machine.
            .args(["--bridge", "none", "--iptables=false", "--ip6tables=false"])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        eprintln!(
            "xtask: {} (log: {})",
            setup::describe(&dockerd),
            log.display()
        );
        let child = dockerd.spawn().context("starting dockerd")?;
        let started = Self {
            host: Some(format!("unix://{}", socket.display())),
            started: Some(child),
        };
        let deadline = Instant::now() + DAEMON_START;
        while !started.answers() {
            if Instant::now() > deadline {
                bail!(
                    "dockerd did not answer within {DAEMON_START:?}; see {}",
                    log.display()
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
        Ok(started)
    }

    /// `DOCKER_HOST` for clients of this daemon; None: their default.
    pub fn host(&self) -> Option<&str> {
        self.host.as_deref()
    }

    /// A `docker` command talking to this daemon.
    fn command(&self) -> Command {
        let mut cmd = Command::new("docker");
        if let Some(host) = &self.host {
            cmd.env("DOCKER_HOST", host);
        }
        cmd
    }

    /// Whether `docker info` succeeds.
    fn answers(&self) -> bool {
        self.command()
            .arg("info")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }

    /// Makes [`LOCAL_BASE`] unless the daemon has it: debootstrap's minbase
    /// bookworm (about 30 s from the Debian mirror), imported as one layer.
    fn local_base(&self) -> Result<()> {
        let has = self
            .command()
            .args(["image", "inspect", LOCAL_BASE])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if has {
            return Ok(());
        }
        if !setup::on_path("debootstrap") {
            setup::apt_install(&["debootstrap"])?;
        }
        let rootfs = setup::cache_dir()?.join("bookworm-minbase.partial");
        if rootfs.exists() {
            fs::remove_dir_all(&rootfs)
                .with_context(|| format!("removing {}", rootfs.display()))?;
        }
        setup::run_announced(
            Command::new("debootstrap")
                .args(["--variant=minbase", "bookworm"])
                .arg(&rootfs)
                .arg("http://deb.debian.org/debian")
                .stdout(Stdio::null()),
        )?;
        let mut tar = Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .args(["-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .context("starting tar")?;
        let stdout = tar.stdout.take().context("tar's standard output")?;
        let mut import = self.command();
        import
            .args(["import", "-", LOCAL_BASE])
            .stdin(stdout)
            .stdout(Stdio::null());
        let imported = setup::run_announced(&mut import);
        let tarred = tar.wait().context("waiting for tar")?;
        fs::remove_dir_all(&rootfs).with_context(|| format!("removing {}", rootfs.display()))?;
        imported?;
        if !tarred.success() {
            bail!("tar of the debootstrapped base failed ({tarred})");
        }
        Ok(())
    }

    /// `docker build` of [`DOCKERFILE`] from the workspace root.
    fn build(&self, root: &Path, build: &Build) -> Result<()> {
        let staged = root.join(PREBUILT_DIR).join("router-daemon");
        let mut cmd = self.command();
        cmd.current_dir(root)
            .args(["build", "-f", DOCKERFILE, "-t", build.tag]);
        if let Some(binary) = build.prebuilt {
            fs::copy(binary, &staged)
                .with_context(|| format!("copying {} to {}", binary.display(), staged.display()))?;
            cmd.args(["--target", "prebuilt"]);
        }
        if let Some(image) = build.runtime_image {
            cmd.args(["--build-arg", &format!("RUNTIME_IMAGE={image}")]);
        }
        if let Some(image) = build.build_image {
            cmd.args(["--build-arg", &format!("BUILD_IMAGE={image}")]);
        }
        cmd.arg(".");
        let built = setup::run_announced(&mut cmd);
        if build.prebuilt.is_some() {
            // Not left for a later full build to pick up by accident.
            fs::remove_file(&staged).with_context(|| format!("removing {}", staged.display()))?;
        }
        built
    }
}

impl Drop for Docker {
    /// Stops a daemon this task started: SIGTERM (it stops its containers
    /// and its containerd), then SIGKILL after [`DAEMON_STOP`].
    fn drop(&mut self) {
        if let Some(child) = &mut self.started {
            setup::terminate(child, "dockerd", DAEMON_STOP);
        }
    }
}
