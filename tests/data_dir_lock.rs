//! One edgebridge per `data_dir`, with real processes: a second `edgebridge run` on a
//! data_dir in use is refused at start, names the holder's pid on stderr, exits non-zero
//! and touches nothing; the first keeps working; after the first is killed with SIGKILL
//! (its lock file left behind) a new process starts on the same data_dir.

mod common;
#[path = "common/gateway.rs"]
mod gateway;

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, publish_seq_with, seq_payload};
use rumqttc::QoS;

const WAIT: Duration = Duration::from_secs(60);

/// An `edgebridge run` child with its stdout and stderr in files (a pipe nobody reads
/// could fill up and stall it).
struct Process {
    child: Child,
    name: String,
    dir: PathBuf,
}

impl Process {
    fn start(config: &Path, dir: &Path, name: &str) -> Process {
        let out = |stream: &str| {
            fs::File::create(dir.join(format!("{name}.{stream}"))).expect("create log file")
        };
        let child = Command::new(env!("CARGO_BIN_EXE_edgebridge"))
            .args(["run", "--config"])
            .arg(config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(out("stdout"))
            .stderr(out("stderr"))
            .spawn()
            .expect("start edgebridge");
        Process {
            child,
            name: name.to_string(),
            dir: dir.to_path_buf(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn output(&self, stream: &str) -> String {
        fs::read_to_string(self.dir.join(format!("{}.{stream}", self.name))).unwrap_or_default()
    }

    /// Waits until the process exits; panics with its output after [`WAIT`].
    async fn exit_status(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} still runs after {WAIT:?}:\n{}{}",
                self.name,
                self.output("stdout"),
                self.output("stderr")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the admin endpoint at `admin` answers `/readyz` with 200; panics if the
    /// process exits first or after [`WAIT`].
    async fn wait_ready(&mut self, admin: SocketAddr) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "{} exited ({status}) before it was ready:\n{}{}",
                    self.name,
                    self.output("stdout"),
                    self.output("stderr")
                );
            }
            if TcpStream::connect(admin).is_ok()
                && gateway::http_get(admin, "/readyz").await.0 == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready after {WAIT:?}:\n{}{}",
                self.name,
                self.output("stdout"),
                self.output("stderr")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn signal(&self, sig: &str) {
        let sent = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status();
        assert!(sent.is_ok_and(|s| s.success()), "kill {sig} {}", self.pid());
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A config in `dir` named `name`.toml: data_dir `dir/data`, the admin endpoint and one
/// device listener on the given ports, every message to the file `dir/out.ndjson`;
/// `extra` adds sinks and rules.
fn config(dir: &Path, name: &str, admin: u16, devices: u16, extra: &str) -> PathBuf {
    let body = gateway::FILE_SINK.replace("{dir}", &dir.display().to_string());
    let toml = format!(
        "[gateway]\ndata_dir = \"{}\"\nshutdown_grace = \"2s\"\n[admin]\nbind = \"127.0.0.1:{admin}\"\n\
         [[listeners]]\nname = \"devices\"\nbind = \"127.0.0.1:{devices}\"\n{body}{extra}",
        dir.join("data").display()
    );
    let path = dir.join(format!("{name}.toml"));
    fs::write(&path, toml).expect("write config");
    path
}

/// Publishes seq `seq` of device 1 to `port` and waits until `out.ndjson` in `dir` has it.
async fn delivered_through(port: u16, dir: &Path, seq: u64) {
    let opts = rumqttc::MqttOptions::new(format!("dev-{seq}"), "127.0.0.1", port);
    let acked = publish_seq_with(opts, "a/b", 1, seq..seq + 1, QoS::AtLeastOnce).await;
    assert_eq!(acked, 1, "the gateway acks the message");
    let out = dir.join("out.ndjson");
    let want = String::from_utf8(seq_payload(1, seq)).expect("utf-8");
    let arrived = || {
        fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|v| v["payload"] == want.as_str())
    };
    let deadline = Instant::now() + WAIT;
    while !arrived() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(arrived(), "{want} in {}", out.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_a_data_dir_in_use_is_refused_and_a_killed_holder_does_not_block() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let (admin, devices) = (free_port(), free_port());
    let admin_addr: SocketAddr = ([127, 0, 0, 1], admin).into();
    let first_config = config(dir, "first", admin, devices, "");
    let mut first = Process::start(&first_config, dir, "first");
    first.wait_ready(admin_addr).await;
    assert!(
        dir.join("data/buffers/local").is_dir(),
        "a running gateway has its buffer under data_dir/buffers"
    );

    // The second: the same data_dir and the same ports (had it bound a port before
    // checking the lock, it would fail on that instead), and a sink of its own whose
    // buffer would appear if it opened anything.
    let spare = "\n[sinks.spare]\ntype = \"file\"\npath = \"{dir}/spare.ndjson\"\n\
                 [[rules]]\nname = \"spare\"\nfrom = \"#\"\nto = [\"spare\"]\n"
        .replace("{dir}", &dir.display().to_string());
    let second_config = config(dir, "second", admin, devices, &spare);
    let mut second = Process::start(&second_config, dir, "second");
    let status = second.exit_status().await;
    let stderr = second.output("stderr");
    assert!(!status.success(), "refused with a non-zero exit: {status}");
    assert!(
        stderr.contains(&format!("pid {}", first.pid())) && stderr.contains("in use"),
        "stderr names the holder's pid: {stderr}"
    );
    assert!(
        !dir.join("data/buffers/spare").exists(),
        "the refused process opened no buffer"
    );
    assert!(
        !second.output("stdout").contains("edgebridge started"),
        "{}",
        second.output("stdout")
    );

    // The first keeps working.
    delivered_through(devices, dir, 0).await;

    // SIGKILL: no clean shutdown; the lock file with the dead pid stays behind.
    first.signal("-KILL");
    assert!(!first.exit_status().await.success());
    let lock = dir.join("data/lock");
    let stale = fs::read_to_string(&lock).expect("the lock file stays");
    assert_eq!(stale.trim(), first.pid().to_string());

    let (admin, devices) = (free_port(), free_port());
    let admin_addr: SocketAddr = ([127, 0, 0, 1], admin).into();
    let third_config = config(dir, "third", admin, devices, "");
    let mut third = Process::start(&third_config, dir, "third");
    third.wait_ready(admin_addr).await;
    let holder = fs::read_to_string(&lock).expect("lock file");
    assert_eq!(
        holder.trim(),
        third.pid().to_string(),
        "the new holder's pid"
    );
    delivered_through(devices, dir, 1).await;
    third.signal("-TERM");
    assert!(
        third.exit_status().await.success(),
        "{}",
        third.output("stderr")
    );
}

/// An address another process holds stops the start before anything else happens: the
/// process exits non-zero, names the listener (or the admin endpoint) and the address on
/// stderr, and has opened no buffer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_address_stops_the_start_before_any_buffer_opens() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port to hold");
    let port = taken.local_addr().expect("held address").port();
    let buffers = dir.join("data").join("buffers");
    for (name, admin, devices, says) in [
        (
            "devices-taken",
            free_port(),
            port,
            format!("listener devices: cannot bind 127.0.0.1:{port}"),
        ),
        (
            "admin-taken",
            port,
            free_port(),
            format!("cannot bind admin address 127.0.0.1:{port}"),
        ),
    ] {
        let path = config(dir, name, admin, devices, "");
        let mut process = Process::start(&path, dir, name);
        let status = process.exit_status().await;
        let stderr = process.output("stderr");
        assert!(!status.success(), "{name}: exited with {status}:\n{stderr}");
        assert!(stderr.contains(&says), "{name}: {says:?} in:\n{stderr}");
        assert!(
            !buffers.exists(),
            "{name}: no buffer opened, but {} exists",
            buffers.display()
        );
    }
}
