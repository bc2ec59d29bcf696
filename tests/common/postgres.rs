//! A throwaway PostgreSQL 15 cluster: `initdb` into a temp dir, started on a
//! free loopback port, stopped and removed on drop (also when a test panics).
//! As root, the server runs as the `postgres` OS user (initdb refuses root).
//! Debian's `postgresql-15` must be installed (`.ci/run` does it); without it
//! the tests fail and say so.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = "/usr/lib/postgresql/15/bin";

pub struct Postgres {
    dir: tempfile::TempDir,
    pub port: u16,
}

fn as_postgres(program: &str) -> Command {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    if is_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", program]);
        c
    } else {
        Command::new(program)
    }
}

impl Postgres {
    pub fn start() -> Postgres {
        let initdb = format!("{BIN}/initdb");
        assert!(
            Path::new(&initdb).exists(),
            "PostgreSQL 15 is not installed: apt-get install postgresql-15 (as .ci/run does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let _ = Command::new("chown")
            .args(["-R", "postgres"])
            .arg(dir.path())
            .status();
        let data = dir.path().join("db");
        let out = as_postgres(&initdb)
            .args([
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pg = Postgres {
            dir,
            port: super::server::free_port(),
        };
        pg.start_server();
        pg
    }

    fn pg_ctl(&self, args: &[&str]) -> std::process::Output {
        let data = self.dir.path().join("db");
        as_postgres(&format!("{BIN}/pg_ctl"))
            .arg("-D")
            .arg(&data)
            .args(args)
            .output()
            .unwrap()
    }

    /// Starts (or restarts) the server and waits until it accepts connections.
    pub fn start_server(&self) {
        let log = self.dir.path().join("pg.log");
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let out = self.pg_ctl(&["-l", log.to_str().unwrap(), "-w", "-o", &options, "start"]);
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A fast stop: the service sees PostgreSQL go away.
    pub fn stop_server(&self) {
        let out = self.pg_ctl(&["-m", "fast", "-w", "stop"]);
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    /// `snapshot_meta.sequence`, or 0 before the first snapshot / when unreachable.
    pub async fn snapshot_sequence(&self) -> u64 {
        let Ok((client, connection)) =
            tokio_postgres::connect(&self.url(), tokio_postgres::NoTls).await
        else {
            return 0;
        };
        tokio::spawn(connection);
        match client
            .query_opt("SELECT sequence FROM snapshot_meta WHERE id = 1", &[])
            .await
        {
            Ok(Some(row)) => row.get::<_, i64>(0) as u64,
            _ => 0,
        }
    }

    /// `snapshot_meta.outbox_watermark` of the newest snapshot (None: Kafka
    /// was off). Panics when there is no snapshot.
    pub async fn outbox_watermark(&self) -> Option<u64> {
        let (client, connection) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .expect("PostgreSQL reachable");
        tokio::spawn(connection);
        let watermark: Option<i64> = client
            .query_one(
                "SELECT outbox_watermark FROM snapshot_meta WHERE id = 1",
                &[],
            )
            .await
            .expect("a snapshot")
            .get(0);
        watermark.map(|w| w as u64)
    }

    /// Waits until a snapshot at `sequence` or later is durable.
    pub async fn wait_snapshot(&self, sequence: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let at = self.snapshot_sequence().await;
            if at >= sequence {
                return at;
            }
            assert!(
                Instant::now() < deadline,
                "no snapshot at {sequence} within {timeout:?} (at {at})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.signal_all("CONT");
        let _ = self.pg_ctl(&["-m", "immediate", "stop"]);
    }
}

impl Postgres {
    /// Restarts the server with TLS on (`cert_pem` / `key_pem` its identity)
    /// and accepting TCP connections over TLS only: a plaintext client is
    /// refused.
    pub fn require_tls(&self, cert_pem: &str, key_pem: &str) {
        let data = self.dir.path().join("db");
        std::fs::write(data.join("server.crt"), cert_pem).unwrap();
        std::fs::write(data.join("server.key"), key_pem).unwrap();
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        std::io::Write::write_all(&mut conf, b"\nssl = on\n").unwrap();
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
        )
        .unwrap();
        let _ = Command::new("chown")
            .args(["-R", "postgres"])
            .arg(&data)
            .status();
        let _ = Command::new("chmod")
            .arg("600")
            .arg(data.join("server.key"))
            .status();
        self.stop_server();
        self.start_server();
    }

    /// SIGSTOP to the server and every backend: a hung database (connections
    /// open, nothing answers), not a stopped one.
    pub fn freeze(&self) {
        self.signal_all("STOP");
    }

    pub fn thaw(&self) {
        self.signal_all("CONT");
    }

    fn signal_all(&self, signal: &str) {
        let Ok(pid) = std::fs::read_to_string(self.dir.path().join("db/postmaster.pid")) else {
            return;
        };
        let Some(postmaster) = pid.lines().next() else {
            return;
        };
        let signal = format!("-{signal}");
        let _ = Command::new("pkill")
            .args([signal.as_str(), "-P", postmaster])
            .status();
        let _ = Command::new("kill").args([&signal, postmaster]).status();
    }
}
