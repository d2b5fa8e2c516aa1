//! One SQLite database, one writer thread, group commit.
//!
//! Every job runs on the database's own OS thread (never on a tokio worker)
//! inside a `SAVEPOINT`, within an `IMMEDIATE` transaction that the thread
//! shares among all jobs waiting in its queue, up to [`MAX_BATCH`]. One
//! `COMMIT` (one fsync of the WAL, `synchronous=FULL`) then makes the whole
//! batch durable, and only after that does each caller get its result. So a
//! caller that sends a message after `Db::run` returns always announces a
//! durable write, and concurrent callers share the fsync.
//!
//! A job that returns `Err` is rolled back to its savepoint and does not
//! disturb the others in its batch. A failed `COMMIT` is fatal: after a failed
//! fsync the file's state is unknown, so the process aborts and recovers from
//! the log on restart.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::oneshot;

/// Most jobs that share one SQLite transaction and one fsync.
pub const MAX_BATCH: usize = 512;
/// Most jobs waiting for the writer thread; past this callers get `Busy`.
pub const MAX_QUEUE: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The queue is full: the service is overloaded. Nothing was written.
    #[error("database queue is full")]
    Busy,
    /// The job failed and was rolled back; nothing it did was written.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The writer thread is gone (the service is stopping).
    #[error("database is closed")]
    Closed,
}

type Done = Box<dyn FnOnce(Result<(), String>) + Send>;
type Job = Box<dyn FnOnce(&Connection) -> Done + Send>;

/// A handle to the writer thread. Cheap to clone.
#[derive(Clone)]
pub struct Db {
    sender: mpsc::SyncSender<Job>,
    path: PathBuf,
}

/// `conn.execute` through the connection's statement cache: SQLite parses
/// each statement once, not on every call.
pub fn exec(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

/// `conn.query_row` through the statement cache.
pub fn row<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    conn.prepare_cached(sql)?.query_row(params, f)
}

/// Opens (creating if needed) a database for durable writes and applies the
/// migrations not yet applied, tracked by `PRAGMA user_version`.
pub fn open(path: &Path, migrations: &[&str]) -> rusqlite::Result<Connection> {
    // One thread owns the connection, so SQLite's own per-call mutexes
    // (the "serialized" mode) are pure overhead.
    let mut conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
            | rusqlite::OpenFlags::SQLITE_OPEN_CREATE
            | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.set_prepared_statement_cache_capacity(128);
    // WAL with synchronous=FULL: the WAL is fsynced at every COMMIT, so a
    // committed transaction survives a power cut, not only a process kill.
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    assert_eq!(mode.to_lowercase(), "wal", "SQLite refused WAL mode");
    conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")?;
    let sync: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
    assert_eq!(sync, 2, "synchronous must be FULL");
    let version: usize =
        conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize;
    for (i, sql) in migrations.iter().enumerate().skip(version) {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(conn)
}

impl Db {
    /// Starts the writer thread on an opened connection.
    pub fn start(conn: Connection, name: &str) -> Db {
        let path = conn.path().map(PathBuf::from).unwrap_or_default();
        let (sender, receiver) = mpsc::sync_channel::<Job>(MAX_QUEUE);
        std::thread::Builder::new()
            .name(format!("db-{name}"))
            .spawn({
                let name = name.to_owned();
                move || writer_loop(conn, receiver, name)
            })
            .expect("spawn db writer thread");
        Db { sender, path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the writer thread inside the current batch and returns
    /// its result once the batch is durable.
    pub async fn run<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<T, DbError>>();
        let job: Job = Box::new(move |conn: &Connection| {
            let result = run_in_savepoint(conn, f);
            Box::new(move |committed: Result<(), String>| {
                let result = match committed {
                    Ok(()) => result.map_err(DbError::from),
                    Err(_) => Err(DbError::Closed),
                };
                let _ = tx.send(result);
            })
        });
        self.sender.try_send(job).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => DbError::Busy,
            mpsc::TrySendError::Disconnected(_) => DbError::Closed,
        })?;
        rx.await.map_err(|_| DbError::Closed)?
    }
}

fn run_in_savepoint<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    exec(conn, "SAVEPOINT job", [])?;
    match f(conn) {
        Ok(v) => {
            exec(conn, "RELEASE job", [])?;
            Ok(v)
        }
        Err(e) => {
            exec(conn, "ROLLBACK TO job", [])?;
            exec(conn, "RELEASE job", [])?;
            Err(e)
        }
    }
}

fn writer_loop(conn: Connection, receiver: mpsc::Receiver<Job>, name: String) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    let mut done: Vec<Done> = Vec::with_capacity(MAX_BATCH);
    // Blocks until the first job; then takes whatever else is already
    // queued. No timer: under load the queue fills while the previous fsync
    // runs, so batches grow by themselves, and an idle service adds no wait.
    while let Ok(first) = receiver.recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if let Err(e) = exec(&conn, "BEGIN IMMEDIATE", []) {
            tracing::error!(error = %e, "BEGIN failed; aborting the process");
            std::process::abort();
        }
        let started = std::time::Instant::now();
        let jobs = batch.len();
        for job in batch.drain(..) {
            done.push(job(&conn));
        }
        let exec_us = started.elapsed().as_micros() as u64;
        // Delay point `<name>.commit` (tests only): a slow disk, every
        // batch's fsync taking this much longer.
        if let Some(d) = crate::fault::delay_for(format_args!("{name}.commit")) {
            std::thread::sleep(d);
        }
        // The one place where a batch becomes durable: with WAL and
        // synchronous=FULL, COMMIT returns after the WAL is fsynced.
        if let Err(e) = exec(&conn, "COMMIT", []) {
            tracing::error!(error = %e, "COMMIT failed; the log's state is unknown, aborting");
            std::process::abort();
        }
        metrics::histogram!("twopc_log_batch_size", "log" => name.clone()).record(jobs as f64);
        metrics::histogram!("twopc_log_commit_seconds", "log" => name.clone())
            .record(started.elapsed().as_secs_f64() - exec_us as f64 / 1e6);
        tracing::trace!(
            jobs,
            exec_us,
            commit_us = started.elapsed().as_micros() as u64 - exec_us,
            "batch durable"
        );
        for d in done.drain(..) {
            d(Ok(()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_commit_and_failed_jobs_roll_back_alone() {
        let dir = tempfile_dir();
        let conn = open(
            &dir.join("t.db"),
            &["CREATE TABLE t (k INTEGER PRIMARY KEY)"],
        )
        .unwrap();
        let db = Db::start(conn, "test");
        let mut handles = vec![];
        for k in 0..100i64 {
            let db = db.clone();
            handles.push(tokio::spawn(async move {
                db.run(move |c| {
                    c.execute("INSERT INTO t (k) VALUES (?1)", [k])?;
                    if k % 10 == 0 {
                        // Fails after writing: must be rolled back alone.
                        c.execute("INSERT INTO t (k) VALUES (?1)", [k])?;
                    }
                    Ok(k)
                })
                .await
            }));
        }
        let mut failed = 0;
        for h in handles {
            if h.await.unwrap().is_err() {
                failed += 1;
            }
        }
        assert_eq!(failed, 10);
        let n: i64 = db
            .run(|c| c.query_row("SELECT count(*) FROM t", [], |r| r.get(0)))
            .await
            .unwrap();
        assert_eq!(n, 90);
        drop(db);
        // Reopening applies no migration twice and sees the rows.
        let conn = open(
            &dir.join("t.db"),
            &["CREATE TABLE t (k INTEGER PRIMARY KEY)"],
        )
        .unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 90);
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("twopc-db-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
