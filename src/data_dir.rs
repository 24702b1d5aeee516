//! The files of an embedded (SQLite) database: who may read them, and which one server
//! may serve them.
//!
//! - **Modes.** The database and its `-wal`, `-shm` and `-journal` files, and the lock
//!   file, are the owner's only (0600); a directory created for them is 0700. SQLite
//!   creates a database 0644 and gives its `-wal` and `-shm` files the database's mode, so
//!   the database file is created here first, empty (which SQLite takes for an empty
//!   database), as 0600. Files an earlier version left readable by group or others are
//!   narrowed to 0600 at start-up, with a warning, rather than refused: they hold
//!   pseudonymised data, not the master secret, and refusing would stop every upgraded
//!   deployment until someone ran `chmod`. (The master key, which is a secret, is refused
//!   instead: `keys`.)
//! - **One server.** SQLite allows one writer at a time; two servers on one database
//!   both start, then fail each other's writes with "database is locked". `serve` takes an
//!   exclusive lock on `<database>.lock` (e.g. `registry.lock` beside `registry.db`) for
//!   its whole life and writes its process id into it, so a second server stops at start
//!   and names the first; and it locks the database file itself too, before SQLite opens
//!   it, so that moving or deleting the lock file does not let a second server in. The
//!   lock is the operating system's (`flock` on Unix): it goes
//!   with the process, also after `kill -9`, and a stale file with an old process id means
//!   nothing. Admin commands do not take it (short transactions, SQLite's busy timeout),
//!   and nothing here applies to PostgreSQL, where several servers are the scale-out design.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};

use tracing::warn;

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("cannot create data directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot create {path} (mode 0600): {source}")]
    CreateFile { path: PathBuf, source: io::Error },
    #[error(
        "{path} is readable by group or others and cannot be made private (chmod 600): {source}"
    )]
    Mode { path: PathBuf, source: io::Error },
    #[error("cannot lock {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
    #[error(
        "another ern-registry server ({holder}) is serving {database}: it holds the lock on \
         {lock}. Stop it first, or give this server a database of its own (--data-dir); two \
         servers on one SQLite database fail each other's writes. Admin commands may run \
         beside it"
    )]
    Locked {
        database: PathBuf,
        lock: PathBuf,
        holder: Holder,
    },
    #[error(
        "another ern-registry server is serving {database}: it holds the database file \
         itself locked, with its lock file {lock} moved or deleted while it ran. Stop it first (two servers on one \
         SQLite database fail each other's writes); admin commands may run beside it"
    )]
    DatabaseLocked { database: PathBuf, lock: PathBuf },
    #[error(
        "{database} is missing or empty, but {side} is there: the database was moved or \
         deleted while a server used it (that server may still be running, writing to \
         that file), or files were left behind. Not opened: SQLite would take the file \
         for a stale one and delete it, with every write in it not yet copied into the \
         database. Put the database back; only if no server uses it and the database was \
         deleted on purpose, remove {database}-wal and {database}-shm"
    )]
    WalWithoutDatabase { database: PathBuf, side: PathBuf },
    #[error(
        "{database} has {names} names (hard links, as `cp -al` or `rsync --link-dest` make): \
         SQLite keeps its -wal beside the name it opens, so a server or command through \
         another name would write a WAL of its own into the same database and corrupt it. \
         Not opened: keep one name (remove the other links; copy a database to back it up, \
         with `sqlite3 … .backup` or with the server stopped)"
    )]
    HardLinked { database: PathBuf, names: u64 },
    #[error(
        "{database} is missing, but a server holds its lock {lock}: the database it serves \
         was moved or deleted while it runs (it writes on through its open file). Not made \
         anew: put the database back, or stop that server first"
    )]
    MissingWhileServed { database: PathBuf, lock: PathBuf },
    #[error(
        "{shm} is missing, or not the one, while a server serves {database}: it was deleted \
         (or replaced) under that server, which goes on through its own, so a command here \
         would write past the server's view of the database (losing or corrupting writes). \
         Not opened: restart the server first (it refuses writes until then)"
    )]
    ShmMissingWhileServed { database: PathBuf, shm: PathBuf },
}

/// The process id a lock file names, if it names one.
#[derive(Debug)]
pub struct Holder(Option<u32>);

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(pid) => write!(f, "pid {pid}"),
            None => f.write_str("process id not yet written"),
        }
    }
}

/// The database file of a SQLite URL (`sqlite://PATH?...` or `sqlite:PATH`); `None` for
/// in-memory databases and other URLs.
pub fn sqlite_path(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() || path == ":memory:" || query.split('&').any(|p| p == "mode=memory") {
        return None;
    }
    Some(PathBuf::from(path))
}

/// Creates `dir` and any missing parent as 0700; directories that exist keep their mode.
pub fn create_private_dir(dir: &Path) -> Result<(), DataDirError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .map_err(|source| DataDirError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })
}

fn create_parent(path: &Path) -> Result<(), DataDirError> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => create_private_dir(dir),
        None => Ok(()),
    }
}

/// Options that create a file as 0600 (the process umask can only narrow that).
fn private_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
}

/// Narrows `path` to 0600 if group or others have any access to it; a missing file is
/// left missing.
fn make_private(path: &Path) -> Result<(), DataDirError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = match fs::metadata(path) {
            Ok(meta) => meta.permissions().mode() & 0o7777,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(DataDirError::Mode {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        if mode & 0o077 != 0 {
            fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(|source| {
                DataDirError::Mode {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
            warn!(
                path = %path.display(),
                was = format!("{mode:04o}"),
                "made a data file private (0600): group or others could read it"
            );
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// `registry.db` → `registry.db-wal` (SQLite's names for its side files).
fn side_file(db: &Path, suffix: &str) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Before SQLite opens `db`: creates its directory (0700) and the database file (0600)
/// if missing, and narrows the database and its side files to 0600 if they are wider.
/// Refuses a database missing or empty beside a `-wal` or `-shm`, one with a hard link,
/// and, for a missing one, making it while a server holds its lock.
pub fn prepare_sqlite_files(db: &Path) -> Result<(), DataDirError> {
    prepare(db, false)
}

/// [`prepare_sqlite_files`], by a caller that holds the database's server lock already
/// (`lock_held`: `serve`) or not.
fn prepare(db: &Path, lock_held: bool) -> Result<(), DataDirError> {
    create_parent(db)?;
    // The file a link names, created and narrowed as itself (`create_new` through a
    // link whose target is missing fails, and SQLite would then create it by the umask).
    let db = &resolved(db);
    refuse_wal_without_database(db)?;
    create_parent(db)?;
    if matches!(fs::symlink_metadata(db), Err(e) if e.kind() == io::ErrorKind::NotFound) {
        // A missing database is made only under its server lock: a server that holds it
        // serves a database that was there, so it was moved or deleted since. Held until
        // the file is made and checked again.
        let _lock = match lock_held {
            true => None,
            false => Some(lock_to_make(db)?),
        };
        match private_options().write(true).create_new(true).open(db) {
            // Made just now: if a `-wal` or `-shm` has appeared beside it since the
            // check, the database was renamed away in that moment. Refused; the new empty
            // file is left, not removed by its name (a re-check of 2026-12-07 had the
            // database renamed back in between, and a removal by name deleted it), and
            // every command refuses it beside that WAL until the database is put back
            // over it.
            Ok(_) => refuse_wal_without_database(db)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(DataDirError::CreateFile {
                    path: db.to_path_buf(),
                    source,
                });
            }
        }
    }
    refuse_hard_links(db)?;
    if !lock_held {
        refuse_shm_missing_while_served(db)?;
    }
    make_private(db)?;
    for suffix in ["-wal", "-shm", "-journal"] {
        make_private(&side_file(db, suffix))?;
    }
    Ok(())
}

/// The lock file of the missing database `db`, locked by this process to make the file;
/// refused if a server holds it.
fn lock_to_make(db: &Path) -> Result<File, DataDirError> {
    let path = lock_path(db);
    let lock_err = |source| DataDirError::Lock {
        path: path.clone(),
        source,
    };
    let file = open_lock_file(&path)?;
    match try_lock_a_while(&file) {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(DataDirError::MissingWhileServed {
            database: db.to_path_buf(),
            lock: path,
        }),
        Err(TryLockError::Error(source)) => Err(lock_err(source)),
    }
}

/// Refuses a database `path` (resolved) that is missing or empty while its `-wal` or
/// `-shm` is there. A database renamed away while its server runs leaves that server's
/// `-wal` and `-shm` under the old name (it writes on through them). A server started
/// there would create a new database, and SQLite, finding a WAL beside an empty
/// database, deletes it: the re-check of 2026-12-07 lost 32 acknowledged writes so, and a
/// defences audit the next round lost 26 of 300 the same way through `audit verify`, an
/// admin command and `demo`, which is why every command checks it (through
/// [`prepare_sqlite_files`]), not only `serve`. SQLite itself never leaves these files
/// beside a missing or empty database (switching to WAL writes the header first).
fn refuse_wal_without_database(path: &Path) -> Result<(), DataDirError> {
    let empty = match fs::metadata(path) {
        Ok(meta) => meta.len() == 0,
        Err(e) => e.kind() == io::ErrorKind::NotFound,
    };
    if empty {
        for suffix in ["-wal", "-shm"] {
            let side = side_file(path, suffix);
            if fs::symlink_metadata(&side).is_ok() {
                return Err(DataDirError::WalWithoutDatabase {
                    database: path.to_path_buf(),
                    side,
                });
            }
        }
    }
    Ok(())
}

/// Refuses to open `db` (resolved) beside a server while its `-wal` is there and its
/// `-shm` is not, or is another than the one the server noted in its lock file
/// ([`ServerLock::record`]). The `-shm` is the WAL's index, through which every connection of every
/// process agrees on what the WAL holds; one deleted under a running server stays that
/// server's (it has it mapped), and SQLite here would make a new one, so the two would
/// each write the WAL as if alone. A defences audit of 2026-12-07 deleted it under a
/// loaded server and then ran admin commands: a revocation reported done and lost, keys
/// issued and missing, "database disk image is malformed", in 3 of 5 runs. (The server
/// notices the deletion itself and refuses writes: [`OpenFiles`].) Without a server, a
/// `-wal` without its `-shm` is what SQLite recovers from at open.
fn refuse_shm_missing_while_served(db: &Path) -> Result<(), DataDirError> {
    let (wal, shm) = (side_file(db, "-wal"), side_file(db, "-shm"));
    if fs::symlink_metadata(&wal).is_err() {
        return Ok(());
    }
    let lock = lock_path(db);
    // Held by a server: its lock file, or the database file itself (`hold_database`).
    let held = |path: &Path| {
        File::open(path)
            .ok()
            .is_some_and(|file| matches!(file.try_lock(), Err(TryLockError::WouldBlock)))
    };
    let refused = || DataDirError::ShmMissingWhileServed {
        database: db.to_path_buf(),
        shm: shm.clone(),
    };
    match file_id(&shm) {
        None if held(&lock) || held(db) => Err(refused()),
        None => Ok(()),
        // One the server did not open (made anew after it was deleted: a re-check of
        // 2026-12-07 had a `sqlite3` query make it, and a revocation was lost).
        Some(id) => match servers_shm(&lock) {
            Some(servers) if servers != id && held(&lock) => Err(refused()),
            _ => Ok(()),
        },
    }
}

/// The `-shm` identity a server noted in its lock file ([`ServerLock::record`]).
fn servers_shm(lock: &Path) -> Option<(u64, u64)> {
    let text = fs::read_to_string(lock).ok()?;
    let line = text.lines().find_map(|l| l.strip_prefix("shm "))?;
    let (dev, ino) = line.trim().split_once(' ')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// The files of a SQLite database a server has open, by device and inode: the database
/// and its `-shm`. Taken once the server's connections are open; [`OpenFiles::check`]
/// then tells whether either was deleted, moved or replaced since. SQLite does not notice:
/// a deleted database is written on through its open descriptor (a defences audit of
/// 2026-12-07 had 11,674 writes acknowledged into a deleted file, every one lost at the
/// restart), and a deleted `-shm` leaves this server and any other process each with an
/// index of its own ([`refuse_shm_missing_while_served`]). SQLite removes neither while
/// a connection is open, and the server's writer keeps one open for its whole life.
#[derive(Debug, Clone)]
pub struct OpenFiles {
    files: [(PathBuf, (u64, u64)); 2],
}

impl OpenFiles {
    /// The identity of `db`'s files now (`None`: either cannot be read).
    pub fn of(db: &Path) -> Option<OpenFiles> {
        let db = resolved(db);
        let id = |path: PathBuf| file_id(&path).map(|id| (path, id));
        Some(OpenFiles {
            files: [id(db.clone())?, id(side_file(&db, "-shm"))?],
        })
    }

    /// `Err` (what to tell the operator) when a file is no longer the one it was.
    pub fn check(&self) -> Result<(), String> {
        for (path, id) in &self.files {
            if file_id(path) != Some(*id) {
                return Err(format!(
                    "{} was deleted, moved or replaced while the server runs: its writes would \
                     not reach the database (or not be seen by other processes). Writes are \
                     refused, and health is NOT_SERVING, while it is so: put the file back if \
                     it was moved, else restart the server",
                    path.display()
                ));
            }
        }
        Ok(())
    }
}

/// A file's device and inode (`None`: not there, or not to be read).
fn file_id(path: &Path) -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
    }
    #[cfg(not(unix))]
    {
        fs::metadata(path).ok().map(|_| (0, 0))
    }
}

/// Refuses a database file with more than one name (a hard link, as `cp -al` or `rsync
/// --link-dest` make). SQLite keeps its `-wal` and `-shm` beside the name it opened, so
/// a command or server through another name writes a WAL of its own into the same
/// database: a re-check of 2026-12-07 ran admin commands through a hard link beside a
/// loaded server, whose principals never reached the server's view of the database, and
/// the next ones failed with "database disk image is malformed".
fn refuse_hard_links(db: &Path) -> Result<(), DataDirError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let Ok(meta) = fs::metadata(db)
            && meta.nlink() > 1
        {
            return Err(DataDirError::HardLinked {
                database: db.to_path_buf(),
                names: meta.nlink(),
            });
        }
    }
    #[cfg(not(unix))]
    let _ = db;
    Ok(())
}

/// The lock file of a database: `registry.db` → `registry.lock`.
pub fn lock_path(db: &Path) -> PathBuf {
    db.with_extension("lock")
}

/// The most symbolic links followed from a database path ([`resolved`]), as the kernel's
/// own bound on a path lookup.
const MAX_LINKS: usize = 40;

/// `db` with every symbolic link resolved: the file's own (followed even while its target
/// does not exist yet, as SQLite will create the target) and its directories'. The lock
/// is taken, and the files are created and narrowed, at that path, so a second server
/// given another path to the same file (through a link) finds the lock held. A hard link
/// is a second name of its own, with a lock file of its own: a database file with more
/// than one name is not opened at all ([`prepare_sqlite_files`]). Paths that cannot be resolved (a
/// directory not there yet, a loop of links) are returned as far as they were resolved.
fn resolved(db: &Path) -> PathBuf {
    let mut path = db.to_path_buf();
    for _ in 0..MAX_LINKS {
        let is_link = fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink());
        if !is_link {
            break;
        }
        let Ok(target) = fs::read_link(&path) else {
            break;
        };
        path = match path.parent() {
            Some(dir) if target.is_relative() => dir.join(target),
            _ => target,
        };
    }
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    match (dir.canonicalize(), path.file_name()) {
        (Ok(dir), Some(name)) => dir.join(name),
        _ => path,
    }
}

/// The exclusive lock of one server on a SQLite database, held until dropped: on its
/// lock file, and on the database file itself ([`ServerLock::hold_database`]).
#[derive(Debug)]
pub struct ServerLock {
    /// The lock file, holding this process's id while the lock is held.
    file: File,
    /// The database file, opened and `flock`ed by this server. Dropped only after the
    /// database is closed: closing any descriptor of a file ends every POSIX (`fcntl`)
    /// lock the process holds on it, SQLite's own included.
    database: Option<File>,
}

/// How often, and how far apart, a busy lock is tried again before the start is refused.
const LOCK_RETRIES: u32 = 20;
const LOCK_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

/// Opens the lock file `path` for reading and writing, made 0600 if missing (its content
/// kept), and narrowed to 0600 if wider.
fn open_lock_file(path: &Path) -> Result<File, DataDirError> {
    let file = private_options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|source| DataDirError::Lock {
            path: path.to_path_buf(),
            source,
        })?;
    make_private(path)?;
    Ok(file)
}

/// `flock`s `file`, trying a busy lock again for a short while before giving up. A lock
/// just released can look held for a moment: a process that forks (to start a child)
/// while another thread drops the lock keeps a copy of its descriptor until the child
/// execs.
fn try_lock_a_while(file: &File) -> Result<(), TryLockError> {
    let mut tries = 0;
    loop {
        match file.try_lock() {
            Err(TryLockError::WouldBlock) if tries < LOCK_RETRIES => {
                tries += 1;
                std::thread::sleep(LOCK_RETRY_PAUSE);
            }
            other => return other,
        }
    }
}

impl ServerLock {
    /// Takes the lock of `db` (creating its directory and the lock file, 0700 and 0600)
    /// and writes this process's id into it; refuses, naming the holder, if another
    /// process (or another server in this one) holds it.
    pub fn acquire(db: &Path) -> Result<ServerLock, DataDirError> {
        create_parent(db)?;
        let path = lock_path(&resolved(db));
        create_parent(&path)?;
        let lock_err = |source| DataDirError::Lock {
            path: path.clone(),
            source,
        };
        let mut file = open_lock_file(&path)?;
        match try_lock_a_while(&file) {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = (&file).take(64).read_to_string(&mut text);
                return Err(DataDirError::Locked {
                    database: db.to_path_buf(),
                    lock: path,
                    holder: Holder(text.lines().next().and_then(|l| l.trim().parse().ok())),
                });
            }
            Err(TryLockError::Error(source)) => return Err(lock_err(source)),
        }
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .and_then(|()| file.flush())
            .map_err(lock_err)?;
        Ok(ServerLock {
            file,
            database: None,
        })
    }

    /// Notes the identity of the database's `-shm` (`files`) in the lock file, after the
    /// process id: "shm DEVICE INODE". An admin command beside the server compares the
    /// `-shm` it finds with it ([`refuse_shm_missing_while_served`]).
    pub fn record(&mut self, files: &OpenFiles) -> io::Result<()> {
        let (_, (dev, ino)) = &files.files[1];
        writeln!(self.file, "shm {dev} {ino}")?;
        self.file.flush()
    }

    /// Also locks the database file `db` itself (created 0600 if missing, as
    /// [`prepare_sqlite_files`] does), before SQLite opens it: the lock file can be moved
    /// or deleted while its server runs (a defences audit of 2026-12-07 moved it aside and
    /// started a second server, which took a new one). So a second server finds the file
    /// itself held (a hard link, a second name, is refused before: [`prepare_sqlite_files`]);
    /// and one whose database was renamed away from under the first finds that server's
    /// `-wal` or `-shm` beside a missing or empty file, and is refused too. `flock` on Linux: independent
    /// of SQLite's `fcntl` locks, on a local file system.
    pub fn hold_database(&mut self, db: &Path) -> Result<(), DataDirError> {
        let path = resolved(db);
        prepare(db, true)?;
        let file = OpenOptions::new()
            .read(true)
            .open(&path)
            .map_err(|source| DataDirError::Lock {
                path: path.clone(),
                source,
            })?;
        match try_lock_a_while(&file) {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                // Nothing of SQLite is open on it in this process yet, so closing this
                // descriptor takes no lock of SQLite's.
                return Err(DataDirError::DatabaseLocked {
                    database: db.to_path_buf(),
                    lock: lock_path(&path),
                });
            }
            Err(TryLockError::Error(source)) => {
                return Err(DataDirError::Lock { path, source });
            }
        }
        self.database = Some(file);
        Ok(())
    }
}

impl Drop for ServerLock {
    /// Empties the lock file while it is still held, so no process id is left in it once
    /// its server is gone (a refused start included: one whose database file was held
    /// through a hard link left its id beside the link).
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server is not started beside a WAL whose database is gone or empty (renamed
    /// away while its server ran): SQLite would delete that server's WAL.
    #[test]
    fn a_wal_or_shm_without_its_database_is_not_started_beside() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("registry.db");
        for (suffix, database) in [
            ("-wal", None),
            ("-shm", None),
            ("-wal", Some(&b""[..])),
            ("-shm", Some(&b""[..])),
        ] {
            let _ = fs::remove_file(&db);
            if let Some(content) = database {
                fs::write(&db, content).unwrap();
            }
            let side = side_file(&db, suffix);
            fs::write(&side, b"frames").unwrap();
            let mut lock = ServerLock::acquire(&db).unwrap();
            match lock.hold_database(&db) {
                Err(DataDirError::WalWithoutDatabase { side: named, .. }) => {
                    assert_eq!(named, side.canonicalize().unwrap());
                }
                other => panic!("{suffix} {database:?}: {other:?}"),
            }
            assert_eq!(fs::read(&side).unwrap(), b"frames", "left as it was");
            fs::remove_file(&side).unwrap();
            let lock_file = lock_path(&resolved(&db));
            assert_eq!(
                fs::read_to_string(&lock_file).unwrap(),
                format!("{}\n", std::process::id())
            );
            drop(lock);
            // A refused start leaves no process id behind.
            assert_eq!(fs::read_to_string(&lock_file).unwrap(), "");
        }
        // A database with its WAL (a server stopped by kill -9) is held as usual.
        fs::write(&db, [0u8; 4096]).unwrap();
        fs::write(side_file(&db, "-wal"), b"frames").unwrap();
        let mut lock = ServerLock::acquire(&db).unwrap();
        lock.hold_database(&db).unwrap();
    }

    /// A missing database is not made while a server holds its lock (its database was
    /// moved away while it ran); made once the lock is free.
    #[test]
    fn a_missing_database_is_not_made_while_a_server_holds_its_lock() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("registry.db");
        let server = ServerLock::acquire(&db).unwrap();
        match prepare_sqlite_files(&db) {
            Err(DataDirError::MissingWhileServed { .. }) => {}
            other => panic!("{other:?}"),
        }
        assert!(!db.exists());
        drop(server);
        prepare_sqlite_files(&db).unwrap();
        assert!(db.exists());
        // And the server holding the lock makes it itself.
        fs::remove_file(&db).unwrap();
        let mut server = ServerLock::acquire(&db).unwrap();
        server.hold_database(&db).unwrap();
        assert!(db.exists());
    }

    /// A database file with a second name is not opened: SQLite would keep a WAL beside
    /// each name.
    #[test]
    fn a_database_with_a_hard_link_is_not_opened() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("registry.db");
        prepare_sqlite_files(&db).unwrap();
        let other = dir.path().join("backup.db");
        fs::hard_link(&db, &other).unwrap();
        for name in [&db, &other] {
            match prepare_sqlite_files(name) {
                Err(DataDirError::HardLinked { names: 2, .. }) => {}
                other => panic!("{}: {other:?}", name.display()),
            }
        }
        fs::remove_file(&other).unwrap();
        prepare_sqlite_files(&db).unwrap();
    }

    #[test]
    fn a_database_path_is_resolved_through_links_also_to_a_file_not_there_yet() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let real = root.join("real");
        fs::create_dir(&real).unwrap();
        let db = real.join("registry.db");
        // A link to a file that does not exist yet, a relative one, a link to a link, a
        // linked directory: each resolves to the file SQLite will open.
        let links = root.join("links");
        fs::create_dir(&links).unwrap();
        std::os::unix::fs::symlink(&db, links.join("absolute.db")).unwrap();
        std::os::unix::fs::symlink("../real/registry.db", links.join("relative.db")).unwrap();
        std::os::unix::fs::symlink(links.join("relative.db"), links.join("twice.db")).unwrap();
        std::os::unix::fs::symlink(&real, root.join("linked")).unwrap();
        for path in [
            links.join("absolute.db"),
            links.join("relative.db"),
            links.join("twice.db"),
            root.join("linked/registry.db"),
            db.clone(),
        ] {
            assert_eq!(resolved(&path), db, "{}", path.display());
        }
        // Created through the link, as itself and private.
        prepare_sqlite_files(&links.join("twice.db")).unwrap();
        assert!(fs::symlink_metadata(&db).unwrap().file_type().is_file());
        #[cfg(unix)]
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&fs::metadata(&db).unwrap().permissions())
                & 0o777,
            0o600
        );
        // A loop ends.
        std::os::unix::fs::symlink(links.join("b.db"), links.join("a.db")).unwrap();
        std::os::unix::fs::symlink(links.join("a.db"), links.join("b.db")).unwrap();
        let _ = resolved(&links.join("a.db"));
    }

    #[test]
    fn sqlite_urls_name_their_file() {
        for (url, path) in [
            (
                "sqlite://data/registry.db?mode=rwc",
                Some("data/registry.db"),
            ),
            (
                "sqlite:///var/lib/ern/registry.db",
                Some("/var/lib/ern/registry.db"),
            ),
            ("sqlite:registry.db", Some("registry.db")),
            ("sqlite::memory:", None),
            ("sqlite://:memory:", None),
            ("sqlite://x.db?mode=memory", None),
            ("postgres://ern@db/ern", None),
        ] {
            assert_eq!(sqlite_path(url), path.map(PathBuf::from), "{url}");
        }
        assert_eq!(
            lock_path(Path::new("data/registry.db")),
            Path::new("data/registry.lock")
        );
        assert_eq!(
            side_file(Path::new("data/registry.db"), "-wal"),
            Path::new("data/registry.db-wal")
        );
    }
}
