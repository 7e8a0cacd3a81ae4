//! A real MariaDB for the sync tests: Debian's `mariadb-server` (10.11) binaries, run in a
//! temporary directory as an unprivileged user, one shared server per test run (a database
//! per test). It asks for a password (the `im` user's, `mysql_native_password`), so the
//! sync's password path is exercised. A missing MariaDB fails the test — `./scripts/test`
//! installs it — it never skips.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use mysql::prelude::Queryable;

use crate::common::{free_port, unique};
use crate::pg::{as_postgres_user, give_to_server_user, stop_with_tests};

pub const PASSWORD: &str = "im-relay-test-password";

pub struct Mariadb {
    pub port: u16,
    root: PathBuf,
    child: Option<Child>,
}

fn binary(name: &str) -> PathBuf {
    ["/usr/sbin", "/usr/bin"]
        .iter()
        .map(|d| PathBuf::from(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("MariaDB is not installed (no {name}): ./scripts/test installs Debian's `mariadb-server`")
        })
}

impl Mariadb {
    /// The server every test shares.
    pub fn shared() -> &'static Mariadb {
        static DB: OnceLock<Mariadb> = OnceLock::new();
        DB.get_or_init(|| {
            let db = Mariadb::start();
            stop_with_tests(db.child.as_ref(), "TERM", &db.root);
            db
        })
    }

    pub fn start() -> Mariadb {
        let root = std::env::temp_dir().join(format!("im-relay-mariadb-{}", unique()));
        let data = root.join("data");
        std::fs::create_dir_all(&data).unwrap();
        // Run at every start: the user the tests (and sync) log in as, with a password.
        std::fs::write(
            root.join("init.sql"),
            format!(
                "CREATE USER IF NOT EXISTS 'im'@'127.0.0.1' IDENTIFIED BY '{PASSWORD}';\n\
                 GRANT ALL ON *.* TO 'im'@'127.0.0.1';\n"
            ),
        )
        .unwrap();
        give_to_server_user(&root);
        let out = as_postgres_user(&binary("mariadb-install-db"))
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"])
            .output()
            .expect("mariadb-install-db runs");
        assert!(
            out.status.success(),
            "mariadb-install-db failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let child = as_postgres_user(&binary("mariadbd"))
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--port={port}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--socket={}", root.join("sock").display()))
            .arg(format!("--pid-file={}", root.join("pid").display()))
            .arg(format!("--log-error={}", root.join("error.log").display()))
            .arg(format!("--init-file={}", root.join("init.sql").display()))
            .args([
                "--skip-name-resolve",
                "--max-connections=200",
                // Test data: durability is what sync's own commit order proves.
                "--innodb-flush-log-at-trx-commit=2",
                "--innodb-buffer-pool-size=64M",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mariadbd starts");
        let db = Mariadb {
            port,
            root,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while mysql::Conn::new(mysql::Opts::from_url(&with_password(&db.url("mysql"))).unwrap())
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "MariaDB did not start: {}",
                std::fs::read_to_string(db.root.join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        db
    }

    /// The URL of database `db`, without the password (as `sync` takes it).
    pub fn url(&self, db: &str) -> String {
        format!("mysql://im@127.0.0.1:{}/{db}", self.port)
    }

    /// A new, empty database (its default collation a linguistic, case-insensitive one, as a
    /// DBA's might be); its URL, without the password.
    pub fn database(&self) -> String {
        let name = format!("t_{}", unique().replace('-', "_"));
        let mut c =
            mysql::Conn::new(mysql::Opts::from_url(&with_password(&self.url("mysql"))).unwrap())
                .unwrap();
        c.query_drop(format!(
            "CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
        ))
        .unwrap();
        self.url(&name)
    }
}

impl Drop for Mariadb {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// `url` with the password in it, for the tests' own clients.
pub fn with_password(url: &str) -> String {
    url.replacen("im@", &format!("im:{PASSWORD}@"), 1)
}
