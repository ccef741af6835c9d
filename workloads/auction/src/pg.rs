//! A private PostgreSQL cluster for tests: initdb in a temporary directory (as user `postgres`,
//! since PostgreSQL refuses to run as root), started with `pg_ctl`, stopped and removed on drop.

use std::ffi::CString;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Where Debian's PostgreSQL 15 keeps its programs.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The database the front ends use.
pub const DATABASE: &str = "auction";
/// How long PostgreSQL lets a transaction sit idle before it ends the session (and so aborts it):
/// a frozen owner's open BID transaction cannot block a takeover for longer than this.
pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "2s";

/// Why the cluster could not be started.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// PostgreSQL's programs are not there.
    #[error(
        "PostgreSQL 15 is not installed ({PG_BIN}/initdb missing): apt-get install postgresql"
    )]
    NotInstalled,
    /// The `postgres` user does not exist.
    #[error("there is no user `postgres`: apt-get install postgresql")]
    NoUser,
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// A PostgreSQL program failed.
    #[error("{what} failed ({status}): {stderr}")]
    Program {
        /// Which program.
        what: String,
        /// Its exit status.
        status: String,
        /// What it said.
        stderr: String,
    },
    /// Creating the database failed.
    #[error("creating database {DATABASE}: {0}")]
    CreateDb(#[from] postgres::Error),
}

/// Whether PostgreSQL 15 is installed (tests skip without it).
pub fn installed() -> Result<(), PgError> {
    if !Path::new(PG_BIN).join("initdb").exists() || !Path::new(PG_BIN).join("pg_ctl").exists() {
        return Err(PgError::NotInstalled);
    }
    postgres_ids().map(|_| ())
}

fn postgres_ids() -> Result<(u32, u32), PgError> {
    let name = CString::new("postgres").map_err(|_| PgError::NoUser)?;
    // SAFETY: getpwnam takes a NUL-terminated string and returns NULL or a pointer to a static
    // passwd record, read at once (no other thread of ours calls getpwnam concurrently in tests
    // that matter; the fields are copied before returning).
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Err(PgError::NoUser);
    }
    // SAFETY: pw is non-null and points to a valid passwd record (see above).
    let ids = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Ok(ids)
}

/// A running private cluster; stopped and its directory removed on drop.
pub struct Cluster {
    dir: tempfile::TempDir,
    port: u16,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PgError {
    let what = what.into();
    move |source| PgError::Io { what, source }
}

fn as_postgres(args: &[&str]) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).args(args);
    c
}

fn run(what: &str, mut cmd: Command) -> Result<Output, PgError> {
    let out = cmd.output().map_err(io(format!("running {what}")))?;
    if !out.status.success() {
        return Err(PgError::Program {
            what: what.to_string(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

impl Cluster {
    /// Creates and starts a cluster listening on `listen` (TCP, `port`) and on a unix socket in
    /// its directory, with trust authentication for local, 127.0.0.1/32 and 10.0.0.0/8, and the
    /// database [`DATABASE`].
    pub fn start(listen: &[IpAddr], port: u16) -> Result<Cluster, PgError> {
        installed()?;
        let (uid, gid) = postgres_ids()?;
        let dir = tempfile::Builder::new()
            .prefix("bd-auction-pg")
            .tempdir()
            .map_err(io("creating the cluster's directory"))?;
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
            .map_err(io("giving the cluster's directory to postgres"))?;
        let cluster = Cluster { dir, port };
        let data = cluster.data();
        let data_s = data.to_string_lossy().into_owned();
        run(
            "initdb",
            as_postgres(&[
                &format!("{PG_BIN}/initdb"),
                "-D",
                &data_s,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ]),
        )?;
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhost all all 127.0.0.1/32 trust\nhost all all 10.0.0.0/8 trust\n",
        )
        .map_err(io("writing pg_hba.conf"))?;
        let addrs: Vec<String> = listen.iter().map(ToString::to_string).collect();
        let options = format!(
            "-c listen_addresses='{}' -c port={port} -c unix_socket_directories='{}' \
             -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
             -c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_TIMEOUT} \
             -c max_connections=50",
            addrs.join(","),
            cluster.socket_dir().display()
        );
        run(
            "pg_ctl start",
            as_postgres(&[
                &format!("{PG_BIN}/pg_ctl"),
                "-D",
                &data_s,
                "-l",
                &cluster.dir.path().join("log").to_string_lossy(),
                "-o",
                &options,
                "-w",
                "-t",
                "60",
                "start",
            ]),
        )?;
        let mut admin = postgres::Client::connect(
            &format!(
                "host={} port={port} user=postgres dbname=postgres",
                cluster.socket_dir().display()
            ),
            postgres::NoTls,
        )?;
        admin.batch_execute(&format!("CREATE DATABASE {DATABASE}"))?;
        Ok(cluster)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The connection string for a front end's `--db`, reaching the cluster at `host`.
    pub fn conninfo(&self, host: IpAddr) -> String {
        format!(
            "host={host} port={} user=postgres dbname={DATABASE} connect_timeout=5",
            self.port
        )
    }

    /// A client connected through the unix socket (for checks).
    pub fn client(&self) -> Result<postgres::Client, PgError> {
        Ok(postgres::Client::connect(
            &format!(
                "host={} port={} user=postgres dbname={DATABASE}",
                self.socket_dir().display(),
                self.port
            ),
            postgres::NoTls,
        )?)
    }

    /// The server's log so far (for a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.data().to_string_lossy().into_owned();
        let stopped = as_postgres(&[
            &format!("{PG_BIN}/pg_ctl"),
            "-D",
            &data,
            "-m",
            "immediate",
            "-w",
            "stop",
        ])
        .output();
        if let Err(e) = stopped {
            tracing::warn!("stopping the test cluster in {data}: {e}");
        }
    }
}
