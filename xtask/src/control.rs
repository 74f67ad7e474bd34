//! Steering a running `cargo xtask run` from another terminal:
//! `cargo xtask sim stop N` stops simulator `sim-N`, `cargo xtask sim start
//! N` starts it again on its port, so the router can be watched following
//! a backend that leaves and comes back (its log, and `/metrics`:
//! `router_backend_up`, `router_backend_ejected`).
//!
//! The running fleet listens on a Unix socket, `target/xtask/run.sock`;
//! each connection carries one command line and gets one reply line. The
//! fleet's supervisor does the work on its own thread (children must be
//! started there, see `run`).
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

/// How long a command may take (a start waits for the simulator's health).
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Options of `cargo xtask sim`.
#[derive(clap::Args)]
pub struct Args {
    /// What to do.
    #[command(subcommand)]
    action: Action,
}

/// What `cargo xtask sim` can do to a running `cargo xtask run`.
#[derive(clap::Subcommand, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Stop simulator sim-N (SIGTERM, then SIGKILL after 3 s).
    Stop {
        /// Its number, as in its log prefix `[sim-N]`.
        n: usize,
    },
    /// Start simulator sim-N again, on the same port.
    Start {
        /// Its number, as in its log prefix `[sim-N]`.
        n: usize,
    },
}

impl Action {
    /// The command line sent over the socket.
    fn to_line(self) -> String {
        match self {
            Action::Stop { n } => format!("stop {n}"),
            Action::Start { n } => format!("start {n}"),
        }
    }

    /// Parses a command line.
    fn parse(line: &str) -> Result<Self, String> {
        let mut words = line.split_whitespace();
        let (verb, n) = (words.next(), words.next().map(str::parse::<usize>));
        match (verb, n, words.next()) {
            (Some("stop"), Some(Ok(n)), None) => Ok(Action::Stop { n }),
            (Some("start"), Some(Ok(n)), None) => Ok(Action::Start { n }),
            _ => Err(format!(
                "unknown command {line:?}: expected `stop N` or `start N`"
            )),
        }
    }
}

/// Where a running fleet of the workspace at `root` listens.
pub fn socket_path(root: &Path) -> PathBuf {
    root.join("target").join("xtask").join("run.sock")
}

/// `cargo xtask sim ...`: sends the action to the running fleet and prints
/// its reply.
pub fn run(args: Args, root: &Path) -> Result<()> {
    let path = socket_path(root);
    let mut stream = UnixStream::connect(&path).with_context(|| {
        format!(
            "no `cargo xtask run` is running here ({} does not answer)",
            path.display()
        )
    })?;
    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
    writeln!(stream, "{}", args.action.to_line())?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .context("reading the fleet's reply")?;
    let reply = reply.trim_end();
    match reply.strip_prefix("error: ") {
        Some(err) => bail!("{err}"),
        None if reply.is_empty() => bail!("the fleet closed the connection without a reply"),
        None => {
            println!("{reply}");
            Ok(())
        }
    }
}

/// One command received, to be answered with [`Request::reply`].
pub struct Request {
    /// What was asked.
    pub action: Action,
    reply: mpsc::Sender<Result<String, String>>,
}

impl Request {
    /// Sends the outcome back to the caller.
    pub fn reply(self, outcome: Result<String, String>) {
        // The caller may have given up waiting.
        let _ = self.reply.send(outcome);
    }
}

/// Listens on `path` (replacing a stale socket) and hands each command to
/// the returned receiver, on a thread of its own.
pub fn listen(path: &Path) -> Result<mpsc::Receiver<Request>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if UnixStream::connect(path).is_ok() {
        bail!(
            "another `cargo xtask run` is running here ({} answers)",
            path.display()
        );
    }
    // A socket left by a fleet that was killed.
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    let (requests, received) = mpsc::channel();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            if serve(stream, &requests).is_err() {
                // The supervisor is gone: the fleet is stopping.
                return;
            }
        }
    });
    Ok(received)
}

/// Reads one command from `stream`, passes it on and writes the reply.
/// Errs only when nobody receives commands any more.
fn serve(stream: UnixStream, requests: &mpsc::Sender<Request>) -> Result<(), ()> {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    if BufReader::new(&stream).read_line(&mut line).is_err() {
        return Ok(());
    }
    let outcome = match Action::parse(line.trim()) {
        Ok(action) => {
            let (reply, replied) = mpsc::channel();
            requests.send(Request { action, reply }).map_err(|_| ())?;
            replied
                .recv_timeout(REPLY_TIMEOUT)
                .unwrap_or_else(|_| Err("the fleet did not answer in time".to_owned()))
        }
        Err(err) => Err(err),
    };
    let line = match outcome {
        Ok(done) => done,
        Err(err) => format!("error: {err}"),
    };
    let _ = writeln!(&stream, "{line}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_and_bad_ones_are_refused() {
        for action in [Action::Stop { n: 0 }, Action::Start { n: 12 }] {
            assert_eq!(Action::parse(&action.to_line()), Ok(action));
        }
        for bad in ["", "stop", "stop x", "restart 1", "stop 1 2"] {
            assert!(Action::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_command_reaches_the_fleet_and_its_reply_comes_back() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("xtask-control-{}", std::process::id()));
        let path = dir.join("run.sock");
        let received = listen(&path)?;
        assert!(listen(&path).is_err(), "a second fleet is refused");
        let fleet = thread::spawn(move || -> Result<()> {
            let request = received.recv_timeout(REPLY_TIMEOUT)?;
            assert_eq!(request.action, Action::Stop { n: 1 });
            request.reply(Ok("sim-1 stopped".to_owned()));
            let request = received.recv_timeout(REPLY_TIMEOUT)?;
            request.reply(Err("there is no sim-9".to_owned()));
            Ok(())
        });
        let ask = |line: &str| -> Result<String> {
            let mut stream = UnixStream::connect(&path)?;
            writeln!(stream, "{line}")?;
            let mut reply = String::new();
            BufReader::new(stream).read_line(&mut reply)?;
            Ok(reply)
        };
        assert_eq!(ask("stop 1")?, "sim-1 stopped\n");
        assert_eq!(ask("start 9")?, "error: there is no sim-9\n");
        assert!(ask("reboot")?.starts_with("error: unknown command"));
        fleet.join().expect("fleet thread")?;
        let _ = std::fs::remove_dir_all(dir);
        Ok(())
    }
}
