//! nginx as the classic L7 proxy: round-robin over the two backends with
//! kept-alive upstream connections, adapted from
//! `../shared/bench/nginx-proxy.conf.in`. Two server blocks share one
//! nginx: the first with nginx's default response buffering (case a, as
//! `peers.sh` runs it), the second with `proxy_buffering off`, as nginx is
//! set up in front of streaming LLM servers (cases b and c; buffering would
//! hold SSE events back, and spool a 100 MB body to a temp file).
use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// Where nginx listens and what it proxies to.
pub struct Layout<'a> {
    /// The run's temporary directory: config, pid file, logs, temp paths.
    pub dir: &'a Path,
    /// The buffered listener (case a).
    pub buffered: SocketAddr,
    /// The unbuffered listener (cases b and c).
    pub streaming: SocketAddr,
    /// The backends.
    pub backends: &'a [SocketAddr],
    /// `worker_processes`: `auto` or a number.
    pub workers: &'a str,
    /// The open-file limit to give the workers.
    pub nofile: u64,
}

/// Writes the configuration and returns its path.
fn write_config(layout: &Layout<'_>) -> Result<PathBuf> {
    let dir = layout.dir.display();
    let nofile = layout.nofile.max(1024);
    // Each proxied connection takes two descriptors.
    let worker_connections = nofile / 2;
    let servers: String = layout
        .backends
        .iter()
        .map(|addr| format!("        server {addr};\n"))
        .collect();
    let config = format!(
        "# nginx as a plain L7 reverse proxy (written by router-bench).
worker_processes {workers};
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
worker_rlimit_nofile {nofile};
events {{ worker_connections {worker_connections}; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path {dir}/ptmp_body;
    proxy_temp_path {dir}/ptmp_proxy;
    fastcgi_temp_path {dir}/ptmp_fastcgi;
    uwsgi_temp_path {dir}/ptmp_uwsgi;
    scgi_temp_path {dir}/ptmp_scgi;
    upstream backends {{
{servers}        keepalive 512;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen {buffered} backlog=4096;
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}
    server {{
        listen {streaming} backlog=4096;
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_buffering off;
        }}
    }}
}}
",
        workers = layout.workers,
        buffered = layout.buffered,
        streaming = layout.streaming,
    );
    let path = layout.dir.join("nginx.conf");
    fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Writes `layout`'s configuration, has nginx check it, and returns the
/// command that runs it and the configuration's path.
pub fn prepare(nginx: &Path, layout: &Layout<'_>) -> Result<(Command, PathBuf)> {
    let config = write_config(layout)?;
    check(nginx, layout.dir, &config)?;
    Ok((command(nginx, layout.dir, &config), config))
}

/// The command that runs nginx in the foreground with `config`, its
/// prefix and logs in `dir`.
fn command(nginx: &Path, dir: &Path, config: &Path) -> Command {
    let mut cmd = Command::new(nginx);
    cmd.arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(config)
        .arg("-e")
        .arg(dir.join("nginx-error.log"));
    cmd
}

/// Checks the configuration with `nginx -t`.
fn check(nginx: &Path, dir: &Path, config: &Path) -> Result<()> {
    let out = command(nginx, dir, config)
        .arg("-t")
        .arg("-q")
        .output()
        .with_context(|| format!("running {} -t", nginx.display()))?;
    if !out.status.success() {
        bail!(
            "nginx -t rejected {}: {}",
            config.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `nginx -v`'s version string.
pub fn version(nginx: &Path) -> String {
    Command::new(nginx)
        .arg("-v")
        .output()
        .ok()
        .map(|out| {
            String::from_utf8_lossy(&out.stderr)
                .trim()
                .trim_start_matches("nginx version: ")
                .to_owned()
        })
        .unwrap_or_else(|| "?".into())
}

/// nginx on `PATH`, else in `/usr/sbin` (Debian's place, not on a normal
/// user's `PATH`).
pub fn find() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("nginx"))
            .find(|candidate| candidate.is_file())
    });
    on_path.or_else(|| {
        let sbin = PathBuf::from("/usr/sbin/nginx");
        sbin.is_file().then_some(sbin)
    })
}
