//! The SQLite writer's checkpoints, on a thread of their own.
//!
//! In WAL mode every commit appends pages to the `-wal` file, and a checkpoint copies them
//! back into the database file. By default SQLite runs that checkpoint inside the
//! committing connection, after a commit that takes the WAL past 1,000 pages: on the
//! writer's connection, so every caller queued behind the writer waited for it (15% of the
//! writer thread's time when filling a registry of a million patients).
//!
//! The writer's connection therefore has the automatic checkpoint off
//! (`wal_autocheckpoint = 0`), and this thread, `ern-checkpoint`, checkpoints on a
//! connection of its own while the writer goes on committing:
//!
//! - The writer nudges it after every commit (a bounded channel of one slot: a nudge never
//!   blocks the writer, and many commits make one nudge).
//! - On a nudge it runs `PRAGMA wal_checkpoint(PASSIVE)`, which copies what is committed
//!   without taking the write lock or waiting for anybody, and then rests for
//!   [`REST`], so that a busy writer gets at most a few checkpoints a second (each one
//!   syncs the WAL and the database file).
//! - **The WAL stays bounded.** A passive checkpoint cannot restart the WAL while the
//!   writer keeps appending, so under sustained load the file would grow without end.
//!   When the WAL holds more than [`RESTART_FRAMES`] frames after a pass, the thread runs
//!   `wal_checkpoint(RESTART)`, which takes the write lock for the short time it needs to
//!   copy the last frames (the passive pass has copied the rest) and makes the next commit
//!   write the WAL from its start. The writer waits for that lock through its busy timeout;
//!   a restart waits at most [`BUSY_WAIT`] for the writer's transaction and for readers
//!   of the old WAL, and is otherwise tried again at the next pass, so the bound is a soft
//!   one (it holds within a pass or two unless readers keep the old WAL busy throughout).
//! - A withdrawal's purge may find this thread's checkpoint under way: it retries until
//!   its own checkpoint runs (`super::purge`).
//!
//! Durability is untouched: a commit is durable when its WAL frames are synced
//! (`synchronous = FULL`), checkpoint or not. Erasure is untouched too: a withdrawal's
//! receipt still waits for its own `TRUNCATE` checkpoint (`super::purge`), which this
//! thread's checkpoints can only make shorter. When the writer stops, it drops its
//! nudger; this thread then ends and closes its connection before the writer closes its
//! own (the last connection to close checkpoints the whole WAL, as before).

use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::Duration;

use tracing::{debug, warn};

/// The pause after a checkpoint pass, before the next nudge is taken.
pub const REST: Duration = Duration::from_millis(100);

/// WAL frames (pages) after which a pass also restarts the WAL: 16,384 pages of 4 KiB,
/// 64 MiB. SQLite's own automatic checkpoint starts at 1,000 pages.
pub const RESTART_FRAMES: i64 = 16_384;

/// The longest a restart waits for the write lock and for readers of the old WAL.
pub const BUSY_WAIT: Duration = Duration::from_millis(100);

/// The writer's side: tells the checkpoint thread that something was committed.
pub struct Nudger(SyncSender<()>);

impl Nudger {
    /// Never blocks: a nudge already waiting covers this commit too.
    pub fn nudge(&self) {
        match self.0.try_send(()) {
            Ok(()) | Err(TrySendError::Full(())) | Err(TrySendError::Disconnected(())) => {}
        }
    }
}

/// What one `PRAGMA wal_checkpoint` reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// 1 if the checkpoint could not complete (a reader, or the write lock, was in the way).
    pub busy: i64,
    /// Frames in the WAL.
    pub log: i64,
    /// Frames of those copied into the database file.
    pub checkpointed: i64,
}

/// Runs `PRAGMA wal_checkpoint(mode)` on `conn`.
pub fn run(conn: &rusqlite::Connection, mode: &str) -> rusqlite::Result<Pass> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |row| {
        Ok(Pass {
            busy: row.get(0)?,
            log: row.get(1)?,
            checkpointed: row.get(2)?,
        })
    })
}

/// One pass: a passive checkpoint and, when the WAL has grown past `restart_frames`, a
/// restart. Returns the last checkpoint's report.
pub fn pass(conn: &rusqlite::Connection, restart_frames: i64) -> rusqlite::Result<Pass> {
    let passive = run(conn, "PASSIVE")?;
    if passive.log < restart_frames {
        return Ok(passive);
    }
    let restart = run(conn, "RESTART")?;
    debug!(
        frames = passive.log,
        busy = restart.busy,
        "the WAL was restarted"
    );
    Ok(restart)
}

/// Starts the checkpoint thread on `conn` (the writer's connection must have
/// `wal_autocheckpoint = 0`). Returns the writer's nudger and the thread, to be joined
/// after the nudger is dropped.
pub fn start(conn: rusqlite::Connection) -> std::io::Result<(Nudger, std::thread::JoinHandle<()>)> {
    // A restart waits for the writer's transaction and for readers of the old WAL, and
    // blocks new writers meanwhile: bounded here, so the writer never stalls for long. A
    // restart that runs out of time is tried again at the next pass.
    conn.busy_timeout(BUSY_WAIT)
        .map_err(std::io::Error::other)?;
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name("ern-checkpoint".into())
        .spawn(move || checkpoint_thread(conn, rx))?;
    Ok((Nudger(tx), thread))
}

fn checkpoint_thread(conn: rusqlite::Connection, nudges: Receiver<()>) {
    while nudges.recv().is_ok() {
        if let Err(e) = pass(&conn, RESTART_FRAMES) {
            // Nothing is lost: the frames stay in the WAL, and the next pass (or the last
            // connection to close) copies them.
            warn!(error = %e, "a WAL checkpoint failed; the next commit retries it");
        }
        std::thread::sleep(REST);
    }
    if let Err((_, e)) = conn.close() {
        warn!(error = %e, "the checkpoint thread's SQLite connection did not close cleanly");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &std::path::Path) -> rusqlite::Connection {
        let conn = rusqlite::Connection::open(path).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
             PRAGMA wal_autocheckpoint = 0;",
        )
        .unwrap();
        conn
    }

    fn write_pages(conn: &rusqlite::Connection, rows: usize) {
        conn.execute_batch("BEGIN").unwrap();
        for _ in 0..rows {
            conn.execute("INSERT INTO t (v) VALUES (randomblob(3000))", [])
                .unwrap();
        }
        conn.execute_batch("COMMIT").unwrap();
    }

    #[test]
    fn the_writer_never_checkpoints_and_a_pass_copies_everything_committed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let writer = open(&path);
        writer
            .execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
            .unwrap();
        // Far past SQLite's automatic threshold of 1,000 pages: with it on, the writer
        // would have checkpointed on its own.
        write_pages(&writer, 2_000);
        let size = || std::fs::metadata(&path).unwrap().len();
        assert!(
            size() < 100_000,
            "the writer checkpointed: {} bytes",
            size()
        );
        let checkpointer = open(&path);
        let report = pass(&checkpointer, RESTART_FRAMES).unwrap();
        assert_eq!(report.busy, 0);
        assert!(report.log > 1_000, "{report:?}");
        assert_eq!(report.checkpointed, report.log, "{report:?}");
        assert!(size() > 2_000 * 3_000, "{} bytes", size());
    }

    #[test]
    fn a_wal_past_the_bound_is_restarted_so_it_does_not_grow() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let writer = open(&path);
        writer
            .execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
            .unwrap();
        let checkpointer = open(&path);
        let bound = 200;
        let mut largest = 0;
        for _ in 0..10 {
            write_pages(&writer, 150);
            let report = pass(&checkpointer, bound).unwrap();
            assert_eq!(report.busy, 0, "{report:?}");
            largest = largest.max(report.log);
        }
        // 10 x 150 rows of a page each: without restarts the WAL would hold over 1,500
        // frames; with them it never holds much more than the bound plus one batch.
        assert!(largest < bound + 400, "largest WAL {largest} frames");
    }

    #[test]
    fn the_thread_checkpoints_after_a_nudge_and_ends_when_the_writer_goes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let writer = open(&path);
        writer
            .execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
            .unwrap();
        write_pages(&writer, 500);
        let size = || std::fs::metadata(&path).unwrap().len();
        assert!(size() < 100_000, "{} bytes", size());
        let (nudger, thread) = start(open(&path)).unwrap();
        nudger.nudge();
        nudger.nudge(); // a second nudge while one waits is absorbed
        drop(nudger);
        // The thread takes the waiting nudge, checkpoints, and ends: joining proves both.
        thread.join().unwrap();
        assert!(size() > 500 * 3_000, "{} bytes", size());
    }
}
