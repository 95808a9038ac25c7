//! A real Docker Engine for the tests: Debian's `dockerd` started inside one of the test's
//! network namespaces (so its `docker0`, `docker_gwbridge`, iptables rules and `ip_forward` are
//! that namespace's, gone with it), with a data root, an exec root and an API socket of its
//! own, offline (`DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1`: tasks never try a registry); and the
//! image the tasks run, made with `docker import` from `busybox-static`: `busybox httpd` with a
//! CGI script that answers which task it is and which client address it saw.
//!
//! `nsenter --net` rather than `ip netns exec`: the latter remounts `/sys` in a mount namespace
//! of its own, which hides the cgroup hierarchy dockerd needs.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::NetNs;

/// The image the tasks run.
pub const HTTPD_IMAGE: &str = "lbtest/httpd:1";
/// The path of the CGI script that answers `task=HOSTNAME client=REMOTE_ADDR`.
pub const WHOAMI_PATH: &str = "/cgi-bin/whoami";
/// How long dockerd may take to answer its API after it starts.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// How long dockerd may take to stop its containers and exit on SIGTERM.
const STOP_WITHIN: Duration = Duration::from_secs(30);

/// The Docker CLI that matches Debian's engine (a newer one elsewhere on PATH works too).
fn docker_cli() -> &'static str {
    if Path::new("/usr/bin/docker").exists() {
        "/usr/bin/docker"
    } else {
        "docker"
    }
}

/// A `dockerd` running in a test namespace. Stopped, with its files removed, when dropped.
pub struct Dockerd {
    child: Option<Child>,
    netns: String,
    dir: PathBuf,
}

impl Dockerd {
    /// Starts dockerd in `ns` and waits until its API answers.
    pub fn start(ns: &NetNs) -> Result<Dockerd> {
        if !Path::new("/usr/sbin/dockerd").exists() && which("dockerd").is_none() {
            bail!("dockerd is not installed: `cargo xtask setup` installs Debian's docker.io");
        }
        let dir = std::env::temp_dir().join(format!("{}-docker", ns.name()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let mut dockerd = Dockerd {
            child: None,
            netns: ns.name().to_owned(),
            dir,
        };
        dockerd.spawn()?;
        Ok(dockerd)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("dockerd.log"))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg("dockerd")
            .arg("--data-root")
            .arg(self.dir.join("data"))
            .arg("--exec-root")
            .arg(self.dir.join("exec"))
            .arg("--pidfile")
            .arg(self.dir.join("dockerd.pid"))
            .arg("-H")
            .arg(self.host())
            .env("DOCKER_SERVICE_PREFER_OFFLINE_IMAGE", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start dockerd")?;
        self.child = Some(child);
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if self
                .docker(&["version", "--format", "{{.Server.Version}}"])
                .is_ok()
            {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait()? {
                bail!("dockerd exited ({status}): {}", self.log_tail());
            }
            if Instant::now() > deadline {
                bail!(
                    "dockerd does not answer within {READY_WITHIN:?}: {}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Where its API listens, as `--docker-host` and `docker -H` take it.
    pub fn host(&self) -> String {
        format!("unix://{}", self.dir.join("docker.sock").display())
    }

    /// The end of its log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// `docker -H HOST ARGS...`: its standard output, or an error with its standard error.
    pub fn docker(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(docker_cli())
            .arg("-H")
            .arg(self.host())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("cannot run the docker CLI")?;
        if !out.status.success() {
            bail!(
                "docker {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Makes [`HTTPD_IMAGE`] from the host's `busybox` (Debian's busybox-static): `busybox
    /// httpd -f -p 80 -h /www`, whose CGI script answers `task=HOSTNAME client=REMOTE_ADDR`.
    pub fn import_httpd_image(&self) -> Result<()> {
        let busybox = which("busybox").context("busybox is not installed (busybox-static)")?;
        let root = self.dir.join("image");
        std::fs::create_dir_all(root.join("bin"))?;
        std::fs::create_dir_all(root.join("www/cgi-bin"))?;
        std::fs::copy(&busybox, root.join("bin/busybox"))?;
        for applet in [
            "sh", "httpd", "hostname", "echo", "sleep", "cat", "test", "touch", "rm",
        ] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
        }
        std::fs::write(root.join("www/index.html"), "lbctl test task\n")?;
        let script = root.join("www/cgi-bin/whoami");
        std::fs::write(
            &script,
            "#!/bin/sh\necho 'Content-Type: text/plain'\necho\necho \"task=$(hostname) client=$REMOTE_ADDR\"\n",
        )?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
        let tar = self.dir.join("image.tar");
        let status = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()?;
        if !status.success() {
            bail!("tar of the image root failed");
        }
        self.docker(&[
            "import",
            "-c",
            r#"CMD ["/bin/busybox", "httpd", "-f", "-p", "80", "-h", "/www"]"#,
            &tar.to_string_lossy(),
            HTTPD_IMAGE,
        ])?;
        Ok(())
    }

    /// Stops dockerd with SIGTERM (it stops its containers first) and waits for it.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_WITHIN;
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("dockerd did not stop within {STOP_WITHIN:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Stops and starts dockerd again, as `systemctl restart docker` does.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn()
    }

    /// Unmounts what dockerd left mounted under its folders (it unmounts on a clean stop) and
    /// removes them.
    fn remove_files(&self) {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let dir = self.dir.to_string_lossy().into_owned();
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|line| line.split_whitespace().nth(1))
            .filter(|point| point.starts_with(&dir))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for point in points {
            let _ = Command::new("umount").arg("-l").arg(point).status();
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("warning: cannot remove {}: {e}", self.dir.display());
        }
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("warning: {e:#}");
        }
        self.remove_files();
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_string_lossy()
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|path| path.is_file())
}

/// A task's answer to [`WHOAMI_PATH`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Whoami {
    /// The task's hostname (its container's short id).
    pub task: String,
    /// The client address the task saw.
    pub client: String,
}

/// `GET /cgi-bin/whoami` on a new connection to `addr`, from the calling thread's namespace.
pub fn whoami(addr: SocketAddrV4) -> Result<Whoami> {
    let stream = crate::client::connect(addr)?;
    ask(stream)
}

/// Sends the request on an open connection and reads the whole answer (busybox httpd closes
/// the connection after it).
pub fn ask(mut stream: TcpStream) -> Result<Whoami> {
    stream.write_all(format!("GET {WHOAMI_PATH} HTTP/1.0\r\nHost: lbctl\r\n\r\n").as_bytes())?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    // busybox httpd passes the CGI script's own header lines through, ended by "\n".
    let body = ["\r\n\r\n", "\n\n"]
        .iter()
        .filter_map(|end| text.split_once(end))
        .min_by_key(|(head, _)| head.len())
        .map(|(_, body)| body)
        .with_context(|| format!("no HTTP body in {text:?}"))?;
    let field = |name: &str| {
        body.split_whitespace()
            .find_map(|word| word.strip_prefix(name))
            .map(str::to_owned)
            .with_context(|| format!("no {name} in {body:?}"))
    };
    // httpd listens on an IPv6 socket: an IPv4 client is `[::ffff:A.B.C.D]`.
    let client = field("client=")?;
    let client = client.trim_start_matches('[').trim_end_matches(']');
    Ok(Whoami {
        task: field("task=")?,
        client: client.trim_start_matches("::ffff:").to_owned(),
    })
}
