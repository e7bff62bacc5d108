//! A throwaway nats-server with JetStream for tests: its own temp dir, a free 127.0.0.1
//! port, stopped and started again on the same port and store (outages), killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The nats-server binary: `$WALHOOK_NATS_SERVER`, Debian's /usr/sbin/nats-server, or PATH.
pub fn nats_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("WALHOOK_NATS_SERVER") {
        return PathBuf::from(p);
    }
    for p in ["/usr/sbin/nats-server", "/usr/bin/nats-server"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    PathBuf::from("nats-server")
}

/// A running (or stopped) nats-server.
pub struct NatsServer {
    child: Option<Child>,
    /// Its client port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
}

impl NatsServer {
    /// A server with JetStream and nothing else configured.
    pub async fn start() -> NatsServer {
        Self::start_with("").await
    }

    /// A server whose config file also holds `extra` (authorization, max_payload …).
    pub async fn start_with(extra: &str) -> NatsServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = super::free_port();
        let store = dir.path().join("js");
        let conf = format!(
            "listen: 127.0.0.1:{port}\njetstream {{\n  store_dir: \"{}\"\n}}\n{extra}\n",
            store.display()
        );
        std::fs::write(dir.path().join("nats.conf"), conf).expect("write nats.conf");
        let mut server = NatsServer {
            child: None,
            port,
            dir,
        };
        server.resume().await;
        server
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }

    /// Starts the server (again) on the same port and store, and waits until it answers.
    pub async fn resume(&mut self) {
        assert!(self.child.is_none(), "nats-server is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("nats.log"))
            .expect("nats log");
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(self.dir.path().join("nats.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start nats-server ({e}); install the Debian package nats-server")
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && self.log().contains("Server is ready")
            {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("nats-server exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not start within 30 s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the server (SIGTERM, then waits); its store is kept for `resume`.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A JetStream context on the server.
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        let client = async_nats::connect(self.url())
            .await
            .expect("connect to the test nats-server");
        async_nats::jetstream::new(client)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
