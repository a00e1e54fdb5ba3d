//! Starts real etcd servers on loopback for the tests and the demo.
//!
//! Each member binds its client port itself (`127.0.0.1:0`) and we read
//! the port it reports in its log ("serving insecure client requests on
//! ..."); members of a cluster talk over Unix sockets in their directory,
//! so no port number is ever chosen by one process for another to bind.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Errors starting etcd.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("etcd could not be started ({0}); scripts/deps.sh installs Debian's etcd-server")]
    Spawn(std::io::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("etcd member {name} did not report its client address in {secs} s; its log ends: {tail}")]
    NoAddress { name: String, secs: u64, tail: String },
}

/// One running etcd member (killed when dropped).
#[derive(Debug)]
pub struct Etcd {
    pub name: String,
    /// Its client URL, `http://127.0.0.1:PORT`.
    pub url: String,
    child: Child,
    pub log: PathBuf,
}

const MARK: &str = "serving insecure client requests on ";

fn binary() -> String {
    std::env::var("CASTOR_ETCD").unwrap_or_else(|_| "etcd".into())
}

impl Etcd {
    /// A single-member etcd with its data under `dir`.
    pub fn start(dir: &Path) -> Result<Etcd, ServerError> {
        Ok(Etcd::cluster(dir, 1)?.pop().expect("one member"))
    }

    /// An `n`-member cluster with its data and sockets under `dir`.
    pub fn cluster(dir: &Path, n: usize) -> Result<Vec<Etcd>, ServerError> {
        std::fs::create_dir_all(dir)?;
        let names: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
        let initial = names.iter().map(|m| format!("{m}=unix://{m}:1")).collect::<Vec<_>>().join(",");
        let mut members = Vec::new();
        for name in &names {
            let log = dir.join(format!("{name}.log"));
            let peer = format!("unix://{name}:1");
            let _ = std::fs::remove_file(dir.join(format!("{name}:1")));
            let child = Command::new(binary())
                .current_dir(dir)
                .args(["--name", name, "--data-dir", &format!("{name}.data")])
                .args(["--listen-client-urls", "http://127.0.0.1:0", "--advertise-client-urls", "http://127.0.0.1:0"])
                .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &initial, "--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", "castor-test"])
                .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
                .args(["--enable-grpc-gateway=false"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?)
                .spawn()
                .map_err(ServerError::Spawn)?;
            members.push(Etcd { name: name.clone(), url: String::new(), child, log });
        }
        for m in &mut members {
            m.url = wait_for_address(m, Duration::from_secs(30))?;
        }
        Ok(members)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` (SIGSTOP freezes it, SIGCONT resumes it).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) takes no pointers; the pid is our own child's,
        // which we have not reaped (it cannot be reused while we hold it).
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT); //: a frozen member must be able to die
        self.kill();
    }
}

fn wait_for_address(m: &mut Etcd, limit: Duration) -> Result<String, ServerError> {
    let start = Instant::now();
    while start.elapsed() < limit {
        let f = std::fs::File::open(&m.log)?;
        for line in BufReader::new(f).lines().map_while(Result::ok) {
            if let Some(rest) = line.split(MARK).nth(1) {
                let addr = rest.split([',', ' ']).next().unwrap_or("");
                if !addr.is_empty() && !addr.ends_with(":0") {
                    return Ok(format!("http://{addr}"));
                }
            }
        }
        if let Ok(Some(_)) = m.child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = std::fs::read_to_string(&m.log).unwrap_or_default();
    let tail: String = text.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
    Err(ServerError::NoAddress { name: m.name.clone(), secs: limit.as_secs(), tail })
}
