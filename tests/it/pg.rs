//! A real PostgreSQL for the sync tests: Debian's server binaries, run in a temporary
//! directory as an unprivileged user (PostgreSQL refuses to run as root). One shared server
//! per test run (a database per test); a test that takes the server down starts its own.
//! A missing PostgreSQL fails the test — `./scripts/test` installs it — it never skips.
//! It asks for a password (SCRAM, `initdb -A scram-sha-256`) and serves TLS with a
//! certificate for `localhost` that a CA of the test's own signed (`ca`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::common::{free_port, unique};

/// The superuser's password: the server asks for one (SCRAM), so the sync's password path is
/// exercised for real.
pub const PASSWORD: &str = "im-relay-test-password";

pub struct Postgres {
    pub port: u16,
    /// The CA that signed the server's certificate (PEM).
    pub ca: PathBuf,
    data: PathBuf,
    bin: PathBuf,
    child: Option<Child>,
    /// Commits reach the disk (a benchmark's server); the tests' servers skip it.
    fsync: bool,
}

/// Stops a shared server (`signal`) and removes `root` when the test process ends, however it
/// ends.
pub fn stop_with_tests(server: Option<&Child>, signal: &str, root: &Path) {
    let me = std::process::id();
    let pid = server.map_or(0, Child::id);
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "while kill -0 {me} 2>/dev/null; do sleep 1; done; kill -{signal} {pid}; \
             sleep 5; rm -rf '{}'",
            root.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}

/// Where Debian puts the server binaries (`initdb` and `postgres` are not on the PATH).
fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("IM_RELAY_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): \
             ./scripts/test installs Debian's `postgresql` package"
        )
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// `root` made the server's when it runs as `nobody` (`as_postgres_user`).
pub fn give_to_server_user(root: &Path) {
    if is_root() {
        let ok = Command::new("chown")
            .args(["-R", "nobody:nogroup"])
            .arg(root)
            .status()
            .unwrap()
            .success();
        assert!(ok, "chown of {}", root.display());
    }
}

/// `bin` as the unprivileged `nobody` when we are root (`setpriv` execs it directly, so the
/// child is the server itself).
pub fn as_postgres_user(bin: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

impl Postgres {
    /// The server every sync test shares.
    pub fn shared() -> &'static Postgres {
        static PG: OnceLock<Postgres> = OnceLock::new();
        PG.get_or_init(|| {
            let pg = Postgres::start();
            stop_with_tests(pg.child.as_ref(), "INT", pg.data.parent().unwrap());
            pg
        })
    }

    /// A server of its own, stopped and removed when dropped.
    pub fn start() -> Postgres {
        Postgres::start_with(false)
    }

    /// A server of its own whose commits are synced to disk, as in production.
    pub fn start_durable() -> Postgres {
        Postgres::start_with(true)
    }

    fn start_with(fsync: bool) -> Postgres {
        let bin = bin_dir();
        let root = std::env::temp_dir().join(format!("im-relay-pg-{}", unique()));
        let data = root.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let pwfile = root.join("pwfile");
        std::fs::write(&pwfile, PASSWORD).unwrap();
        let ca = write_certificates(&root);
        give_to_server_user(&root);
        let out = as_postgres_user(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-A",
                "scram-sha-256",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .expect("initdb runs");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pg = Postgres {
            port: free_port(),
            ca,
            data,
            bin,
            child: None,
            fsync,
        };
        pg.run();
        pg
    }

    /// Starts (or starts again) the server on its data directory and port.
    pub fn run(&mut self) {
        let root = self.data.parent().unwrap().to_path_buf();
        let log = std::fs::File::create(self.data.parent().unwrap().join("server.log")).unwrap();
        let child = as_postgres_user(&self.bin.join("postgres"))
            .arg("-D")
            .arg(&self.data)
            .args([
                "-p",
                &self.port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
            ])
            .arg("-k")
            .arg(&self.data)
            // Test data: durability is what sync's own commit order proves, not the disk's.
            .args(["-c", if self.fsync { "fsync=on" } else { "fsync=off" }])
            .args(["-c", "max_connections=200"])
            .args(["-c", "ssl=on"])
            .arg("-c")
            .arg(format!(
                "ssl_cert_file={}",
                root.join("server.crt").display()
            ))
            .arg("-c")
            .arg(format!(
                "ssl_key_file={}",
                root.join("server.key").display()
            ))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("postgres starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while postgres::Client::connect(&with_password(&self.url("postgres")), postgres::NoTls)
            .is_err()
        {
            assert!(Instant::now() < deadline, "PostgreSQL did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL: the database is gone at once, mid-transaction.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Its backends die with it; wait until the port is free again.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(Instant::now() < deadline, "PostgreSQL still answers");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The URL of database `db`, without the password (as `sync` takes it).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A new, empty database; its URL, without the password.
    pub fn database(&self) -> String {
        self.create_database("")
    }

    /// A new, empty database whose collation is ICU's `locale` (this machine has only C
    /// locales; PostgreSQL carries ICU's own).
    pub fn database_icu(&self, locale: &str) -> String {
        self.create_database(&format!(
            " TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE '{locale}'"
        ))
    }

    fn create_database(&self, options: &str) -> String {
        let name = format!("t_{}", unique().replace('-', "_"));
        let url = with_password(&self.url("postgres"));
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        c.batch_execute(&format!("CREATE DATABASE {name}{options}"))
            .unwrap();
        self.url(&name)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(self.data.parent().unwrap());
    }
}

/// A CA, and the server's certificate for `localhost` and 127.0.0.1 that it signed, in `root`
/// (the key readable by the server's user only, as PostgreSQL demands). Returns the CA's path.
fn write_certificates(root: &Path) -> PathBuf {
    let pki = crate::common::private_ca("im-relay test PostgreSQL CA", &["localhost", "127.0.0.1"]);
    let ca = root.join("ca.pem");
    std::fs::write(&ca, pki.ca_pem).unwrap();
    std::fs::write(root.join("server.crt"), pki.cert_pem).unwrap();
    let key_file = root.join("server.key");
    std::fs::write(&key_file, pki.key_pem).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    ca
}

/// `url` with the password in it, for the tests' own clients.
pub fn with_password(url: &str) -> String {
    url.replacen("postgres@", &format!("postgres:{PASSWORD}@"), 1)
}
