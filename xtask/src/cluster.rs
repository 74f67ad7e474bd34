//! A whole single-node Kubernetes on this machine, for the chart's
//! end-to-end test: etcd, kube-apiserver, controller-manager, scheduler,
//! kubelet and kube-proxy (1.20.2, built once by [`crate::kube::ensure_node`]) on
//! Debian's containerd with the CNI bridge plugin. No image is pulled: the
//! pause, router and simulator images are imported into containerd.
//!
//! Everything stays on this machine: the node address 10.245.0.1/32 sits on
//! `lo`, pods get 10.244.0.0/24 on the `cni0` bridge (no masquerading, and
//! a FORWARD rule drops whatever would leave it), services 10.96.0.0/16.
//! [`Cluster`] tears it all down by PID when dropped, and puts back the
//! sysctls kubelet and kube-proxy change. The recipe is
//! `../shared/notes/k8s-cluster/`'s, done here in code.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::setup;

/// Where the cluster keeps its state (certificates, etcd, containerd,
/// kubelet); removed at the end.
const STATE: &str = "/tmp/prefix-router-cluster";
/// The node's address, on `lo`.
pub const NODE_IP: &str = "10.245.0.1";
/// The node's name.
pub const NODE_NAME: &str = "node1";
/// The pod network's bridge.
const BRIDGE: &str = "cni0";
/// Host sysctls kubelet and kube-proxy change, restored at the end.
const SYSCTLS: [&str; 4] = [
    "kernel.panic",
    "kernel.panic_on_oops",
    "vm.overcommit_memory",
    "net.ipv4.conf.all.route_localnet",
];
/// The rule that keeps pod traffic on the bridge.
const FORWARD_DROP: [&str; 6] = ["-i", BRIDGE, "!", "-o", BRIDGE, "-j"];
/// Bound on each wait for a component.
const WAIT: Duration = Duration::from_secs(120);
/// The users of the token file: name, token, groups.
const USERS: [(&str, &str, &str); 5] = [
    ("admin", "admin", "system:masters"),
    ("kubelet", "system:node:node1", "system:nodes"),
    ("kcm", "system:kube-controller-manager", ""),
    ("sched", "system:kube-scheduler", ""),
    ("proxy", "system:kube-proxy", ""),
];

/// A running single-node cluster; dropping it tears it down.
pub struct Cluster {
    /// Its processes, in start order.
    procs: Vec<(&'static str, Child)>,
    bins: PathBuf,
    sysctls: Vec<(String, String)>,
    added_address: bool,
    added_rule: bool,
}

impl Cluster {
    /// Starts the cluster with the binaries in `bins`, imports the
    /// docker-archives `images` into its containerd, and waits until the
    /// node is Ready and the default ServiceAccount exists.
    pub fn start(bins: &Path, images: &[PathBuf]) -> Result<Self> {
        let state = Path::new(STATE);
        if state.exists() {
            fs::remove_dir_all(state).with_context(|| format!("removing {STATE}"))?;
        }
        fs::create_dir_all(state.join("logs"))?;
        let mut cluster = Self {
            procs: Vec::new(),
            bins: bins.to_path_buf(),
            sysctls: SYSCTLS
                .iter()
                .map(|key| Ok(((*key).to_owned(), sysctl_get(key)?)))
                .collect::<Result<_>>()?,
            added_address: false,
            added_rule: false,
        };
        if !ip_on_lo()? {
            setup::run_announced(Command::new("ip").args([
                "addr",
                "add",
                &format!("{NODE_IP}/32"),
                "dev",
                "lo",
            ]))?;
            cluster.added_address = true;
        }
        setup::run_announced(
            Command::new("iptables")
                .args(["-I", "FORWARD"])
                .args(FORWARD_DROP)
                .arg("DROP"),
        )?;
        cluster.added_rule = true;
        write_pki(state)?;
        write_configs(state)?;

        cluster.spawn(
            "containerd",
            Command::new("containerd")
                .arg("-c")
                .arg(state.join("containerd.toml")),
        )?;
        wait_for("containerd", || {
            cluster
                .ctr()
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success())
        })?;
        for image in images {
            setup::run_announced(
                cluster
                    .ctr()
                    .args(["-n", "k8s.io", "images", "import"])
                    .arg(image)
                    .stdout(Stdio::null()),
            )?;
        }
        cluster.start_control_plane(state)?;
        cluster.start_node(state)?;
        wait_for("the node to be Ready", || {
            cluster
                .kubectl()
                .args([
                    "get",
                    "node",
                    NODE_NAME,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
                ])
                .output()
                .is_ok_and(|o| o.stdout == b"True")
        })?;
        wait_for("the default ServiceAccount", || {
            cluster
                .kubectl()
                .args(["get", "serviceaccount", "default"])
                .output()
                .is_ok_and(|o| o.status.success())
        })?;
        Ok(cluster)
    }

    /// The admin's kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        Path::new(STATE).join("admin.kubeconfig")
    }

    /// `kubectl` (1.20, as the cluster) with the admin's kubeconfig.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.bins.join("kubectl"));
        cmd.arg("--kubeconfig").arg(self.kubeconfig());
        cmd
    }

    /// The directory of its components' logs (`kubelet.log`, `containerd.log`, ...).
    pub fn logs(&self) -> PathBuf {
        Path::new(STATE).join("logs")
    }

    /// The directory of the cluster's binaries (kubectl among them).
    pub fn bins(&self) -> &Path {
        &self.bins
    }

    /// `ctr` talking to the cluster's containerd.
    fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(Path::new(STATE).join("containerd.sock"));
        cmd
    }

    /// Starts `name` in the background, its output in `logs/<name>.log`.
    fn spawn(&mut self, name: &'static str, cmd: &mut Command) -> Result<()> {
        let log = Path::new(STATE).join("logs").join(format!("{name}.log"));
        let file = fs::File::create(&log)?;
        eprintln!(
            "xtask cluster: {} (log: {})",
            setup::describe(cmd),
            log.display()
        );
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.procs.push((name, child));
        Ok(())
    }

    /// etcd, the API server, controller-manager and scheduler.
    fn start_control_plane(&mut self, state: &Path) -> Result<()> {
        let pki = state.join("pki");
        let p = |file: &str| pki.join(file).display().to_string();
        self.spawn(
            "etcd",
            Command::new("etcd")
                .args(["--name", "local", "--data-dir"])
                .arg(state.join("etcd"))
                .args(["--listen-client-urls", "http://127.0.0.1:2379"])
                .args(["--advertise-client-urls", "http://127.0.0.1:2379"])
                .args(["--listen-peer-urls", "http://127.0.0.1:2380"])
                .args(["--initial-advertise-peer-urls", "http://127.0.0.1:2380"])
                .args(["--initial-cluster", "local=http://127.0.0.1:2380"])
                .args(["--listen-metrics-urls", "http://127.0.0.1:2381"]),
        )?;
        let bins = self.bins.clone();
        self.spawn(
            "apiserver",
            Command::new(bins.join("kube-apiserver"))
                .args(["--etcd-servers=http://127.0.0.1:2379", "--secure-port=6443"])
                .args([
                    "--insecure-port=0",
                    &format!("--advertise-address={NODE_IP}"),
                ])
                .arg(format!("--tls-cert-file={}", p("apiserver.crt")))
                .arg(format!("--tls-private-key-file={}", p("apiserver.key")))
                .arg(format!("--client-ca-file={}", p("ca.crt")))
                .arg(format!(
                    "--token-auth-file={}",
                    state.join("tokens.csv").display()
                ))
                .args(["--authorization-mode=Node,RBAC", "--allow-privileged=true"])
                .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
                .arg(format!("--service-account-key-file={}", p("sa.pub")))
                .arg(format!(
                    "--service-account-signing-key-file={}",
                    p("sa.key")
                ))
                .arg("--service-cluster-ip-range=10.96.0.0/16")
                .arg(format!(
                    "--kubelet-client-certificate={}",
                    p("kubelet-client.crt")
                ))
                .arg(format!("--kubelet-client-key={}", p("kubelet-client.key")))
                .arg("--kubelet-preferred-address-types=InternalIP,Hostname"),
        )?;
        wait_for("the API server", || {
            self.kubectl()
                .args(["get", "--raw", "/readyz"])
                .output()
                .is_ok_and(|o| o.status.success())
        })?;
        let kcm = state.join("kcm.kubeconfig");
        self.spawn(
            "controller-manager",
            Command::new(bins.join("kube-controller-manager"))
                .args(as_user(&kcm))
                .arg(format!(
                    "--service-account-private-key-file={}",
                    p("sa.key")
                ))
                .arg(format!("--root-ca-file={}", p("ca.crt")))
                .args([
                    "--use-service-account-credentials=true",
                    "--leader-elect=false",
                ])
                .args(["--bind-address=127.0.0.1", "--allocate-node-cidrs=false"]),
        )?;
        let sched = state.join("sched.kubeconfig");
        self.spawn(
            "scheduler",
            Command::new(bins.join("kube-scheduler"))
                .args(as_user(&sched))
                .args(["--leader-elect=false", "--bind-address=127.0.0.1"]),
        )
    }

    /// kubelet and kube-proxy.
    fn start_node(&mut self, state: &Path) -> Result<()> {
        let bins = self.bins.clone();
        self.spawn(
            "kubelet",
            Command::new(bins.join("kubelet"))
                .arg(format!("--config={}", state.join("kubelet.yaml").display()))
                .arg(format!(
                    "--kubeconfig={}",
                    state.join("kubelet.kubeconfig").display()
                ))
                .arg("--container-runtime=remote")
                .arg(format!(
                    "--container-runtime-endpoint=unix://{}",
                    state.join("containerd.sock").display()
                ))
                .arg(format!("--hostname-override={NODE_NAME}"))
                .arg(format!("--node-ip={NODE_IP}"))
                .arg(format!("--root-dir={}", state.join("kubelet").display())),
        )?;
        self.spawn(
            "kube-proxy",
            Command::new(bins.join("kube-proxy"))
                .arg(format!(
                    "--kubeconfig={}",
                    state.join("proxy.kubeconfig").display()
                ))
                .args([
                    "--proxy-mode=iptables",
                    &format!("--hostname-override={NODE_NAME}"),
                ])
                .args(["--cluster-cidr=10.244.0.0/16", "--oom-score-adj=0"])
                .args([
                    "--conntrack-max-per-core=0",
                    "--conntrack-tcp-timeout-established=0",
                ])
                .args([
                    "--conntrack-tcp-timeout-close-wait=0",
                    "--bind-address=127.0.0.1",
                ])
                .args(["--metrics-bind-address=127.0.0.1:10249"])
                .args(["--healthz-bind-address=127.0.0.1:10256"]),
        )
    }
}

impl Drop for Cluster {
    /// Tears everything down: workloads, processes (by PID, last started
    /// first), pod sandboxes, kubelet mounts, iptables chains, the bridge,
    /// the node address, and puts the sysctls back.
    fn drop(&mut self) {
        let _ = self
            .kubectl()
            .args([
                "delete",
                "daemonset,deployment,pod",
                "--all",
                "--grace-period=1",
            ])
            .args(["--wait=true", "--timeout=60s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let containerd = self
            .procs
            .iter()
            .position(|(name, _)| *name == "containerd");
        let mut procs = std::mem::take(&mut self.procs);
        // containerd last: the kubelet's and the sandboxes' teardown need it.
        let kept = containerd.map(|at| procs.remove(at));
        for (name, child) in procs.iter_mut().rev() {
            setup::terminate(child, name, Duration::from_secs(10));
        }
        let _ = Command::new(self.bins.join("kube-proxy"))
            .arg("--cleanup")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some((name, mut child)) = kept {
            let listed = self
                .ctr()
                .args(["-n", "k8s.io", "containers", "ls", "-q"])
                .output();
            for id in listed
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
                .lines()
            {
                let _ = self
                    .ctr()
                    .args(["-n", "k8s.io", "tasks", "kill", "-s", "SIGKILL", id])
                    .output();
                let _ = self
                    .ctr()
                    .args(["-n", "k8s.io", "tasks", "rm", "-f", id])
                    .output();
                let _ = self
                    .ctr()
                    .args(["-n", "k8s.io", "containers", "rm", id])
                    .output();
            }
            setup::terminate(&mut child, name, Duration::from_secs(10));
        }
        // Kubelet-owned chains survive `kube-proxy --cleanup`: drop every
        // line that names a KUBE chain.
        if let Ok(saved) = Command::new("iptables-save").output() {
            let kept: String = String::from_utf8_lossy(&saved.stdout)
                .lines()
                .filter(|line| !line.contains("KUBE"))
                .map(|line| format!("{line}\n"))
                .collect();
            if let Ok(mut restore) = Command::new("iptables-restore")
                .stdin(Stdio::piped())
                .spawn()
            {
                if let Some(stdin) = restore.stdin.as_mut() {
                    use std::io::Write as _;
                    let _ = stdin.write_all(kept.as_bytes());
                }
                let _ = restore.wait();
            }
        }
        if self.added_rule {
            let _ = Command::new("iptables")
                .args(["-D", "FORWARD"])
                .args(FORWARD_DROP)
                .arg("DROP")
                .status();
        }
        if let Ok(mounts) = fs::read_to_string("/proc/mounts") {
            let mut ours: Vec<&str> = mounts
                .lines()
                .filter_map(|line| line.split_whitespace().nth(1))
                .filter(|point| point.starts_with(STATE))
                .collect();
            ours.sort_unstable_by(|a, b| b.cmp(a));
            for point in ours {
                let _ = Command::new("umount").arg(point).status();
            }
        }
        let _ = Command::new("ip")
            .args(["link", "del", BRIDGE])
            .stderr(Stdio::null())
            .status();
        if self.added_address {
            let _ = Command::new("ip")
                .args(["addr", "del", &format!("{NODE_IP}/32"), "dev", "lo"])
                .status();
        }
        for (key, value) in &self.sysctls {
            let _ = Command::new("sysctl")
                .args(["-qw", &format!("{key}={value}")])
                .status();
        }
        let _ = fs::remove_dir_all("/var/lib/cni/networks/k8s-local");
        let _ = fs::remove_dir_all(STATE);
    }
}

/// The flags that make a control-plane component act, authenticate and
/// authorize as the user of `kubeconfig`.
fn as_user(kubeconfig: &Path) -> [String; 3] {
    [
        "--kubeconfig",
        "--authentication-kubeconfig",
        "--authorization-kubeconfig",
    ]
    .map(|flag| format!("{flag}={}", kubeconfig.display()))
}

/// Polls `ready` every 500 ms until it holds, for at most [`WAIT`].
fn wait_for(what: &str, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    while !ready() {
        if Instant::now() > deadline {
            bail!("waited {WAIT:?} for {what}; logs in {STATE}/logs");
        }
        thread::sleep(Duration::from_millis(500));
    }
    Ok(())
}

/// The value of sysctl `key`.
fn sysctl_get(key: &str) -> Result<String> {
    let out = Command::new("sysctl").args(["-n", key]).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Whether the node address is on `lo` already.
fn ip_on_lo() -> Result<bool> {
    let out = Command::new("ip")
        .args(["-4", "addr", "show", "dev", "lo"])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).contains(&format!("{NODE_IP}/32")))
}

/// A CA, the API server's certificate, its client certificate for the
/// kubelet, and the service-account key pair, with openssl.
fn write_pki(state: &Path) -> Result<()> {
    let pki = state.join("pki");
    fs::create_dir_all(&pki)?;
    fs::write(
        pki.join("apiserver.ext"),
        format!(
            "subjectAltName=DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,\
             DNS:kubernetes.default.svc.cluster.local,DNS:localhost,IP:127.0.0.1,IP:10.96.0.1,\
             IP:{NODE_IP}\nextendedKeyUsage=serverAuth\n"
        ),
    )?;
    fs::write(pki.join("client.ext"), "extendedKeyUsage=clientAuth\n")?;
    let openssl = |args: &[&str]| {
        setup::check_status(
            Command::new("openssl")
                .args(args)
                .current_dir(&pki)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=prefix-router-test-ca",
    ])?;
    for (name, subject, ext) in [
        ("apiserver", "/CN=kube-apiserver", "apiserver.ext"),
        (
            "kubelet-client",
            "/O=system:masters/CN=kube-apiserver-kubelet-client",
            "client.ext",
        ),
    ] {
        let (key, csr, crt) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
        );
        openssl(&[
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", subject,
        ])?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "2",
            "-extfile",
            ext,
        ])?;
    }
    openssl(&["genrsa", "-out", "sa.key", "2048"])?;
    openssl(&["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"])
}

/// The token file, a kubeconfig per user, containerd's and the kubelet's
/// configuration and the CNI network.
fn write_configs(state: &Path) -> Result<()> {
    let ca = state.join("pki/ca.crt");
    let mut tokens = String::new();
    for (user, name, groups) in USERS {
        let token = format!("{user}-token-{}", std::process::id());
        tokens.push_str(&format!("{token},{name},{user},\"{groups}\"\n"));
        fs::write(
            state.join(format!("{user}.kubeconfig")),
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster: {{server: \
                 \"https://127.0.0.1:6443\", certificate-authority: {}}}\nusers:\n- name: {user}\n  \
                 user: {{token: {token}}}\ncontexts:\n- name: local\n  context: {{cluster: local, \
                 user: {user}}}\ncurrent-context: local\n",
                ca.display()
            ),
        )?;
    }
    fs::write(state.join("tokens.csv"), tokens)?;
    let cni = state.join("cni");
    fs::create_dir_all(&cni)?;
    fs::write(
        cni.join("10-local.conflist"),
        format!(
            r#"{{"cniVersion": "0.4.0", "name": "k8s-local", "plugins": [
  {{"type": "bridge", "bridge": "{BRIDGE}", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {{"type": "host-local", "ranges": [[{{"subnet": "10.244.0.0/24", "gateway": "10.244.0.1"}}]],
            "routes": [{{"dst": "0.0.0.0/0"}}]}}}},
  {{"type": "portmap", "capabilities": {{"portMappings": true}}}}]}}
"#
        ),
    )?;
    fs::write(
        state.join("containerd.toml"),
        format!(
            r#"version = 2
root = "{state}/containerd"
state = "{state}/containerd-state"
[grpc]
  address = "{state}/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "k8s.gcr.io/pause:3.2"
  # This VM lacks CAP_SYS_RESOURCE: never ask runc for a lower oom_score_adj.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
"#,
            state = state.display(),
            cni = cni.display()
        ),
    )?;
    // The node shares a disk with the build: by the kubelet's defaults a
    // clean clone's `target/` can leave less than 15% of it available,
    // which taints the node with disk pressure (no pod is scheduled) and
    // garbage-collects the imported images (which cannot be pulled). Only
    // a nearly full disk stops this node.
    fs::write(
        state.join("kubelet.yaml"),
        format!(
            "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n\
             authentication:\n  anonymous: {{enabled: false}}\n  webhook: {{enabled: true}}\n  \
             x509: {{clientCAFile: {}}}\nauthorization: {{mode: Webhook}}\ncgroupDriver: cgroupfs\n\
             failSwapOn: false\nclusterDomain: cluster.local\noomScoreAdj: 0\nreadOnlyPort: 0\n\
             address: {NODE_IP}\nevictionHard: {{memory.available: 100Mi, nodefs.available: 1%, \
             nodefs.inodesFree: 1%, imagefs.available: 1%}}\nimageGCHighThresholdPercent: 100\n\
             imageGCLowThresholdPercent: 99\n",
            ca.display()
        ),
    )?;
    Ok(())
}
