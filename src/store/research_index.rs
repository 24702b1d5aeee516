//! The SQL behind the in-memory research index (`service::research`): the change log the
//! writer keeps, and the reads an instance loads its index from and catches up with.
//!
//! **Slots.** Every research row (`patients`) has a `slot`, a number per registry given
//! by the writer when it creates the row and kept while the row lives. An instance keeps
//! each patient's codes at their slot, so it can apply a change without holding the
//! patient's pseudonym. A slot is the largest in use plus one. On PostgreSQL it is given
//! at the end of the transaction, under the change counter's lock (below), so two
//! writers, of any instances, never give the same one. On SQLite, where one writer at a
//! time holds the database's write lock from the start of its transaction, the row gets
//! it in the statement that inserts it (`cases::slots_at_insert`): an index entry written
//! once, not moved by an `UPDATE` after the `INSERT` (a page less per submission
//! committed alone). A slot freed by an erasure may be given again (readers re-read the
//! slot either way).
//!
//! **The change log.** A writer transaction that changed research rows (a submission,
//! an update, a consent decision or a withdrawal that succeeded) ends, after its audit
//! entries and just before its commit, by raising the one-row counter `research_seq` by
//! a number for each slot it touched (on PostgreSQL, for each it may have touched,
//! counted in the statement that takes the lock) and writing one `research_log` row per
//! slot: the slots its patients have after it and, for the patients it withdraws, the
//! slots they had before ([`slots_before`], read under the patients' locks before any
//! command runs: a withdrawal of inclusion deletes the row, and with it the slot; nothing
//! else does). A log row names a registry and a slot, nothing else: no pseudonym, no
//! clinical value, so it needs no erasure. (A number may go unused; readers only read after a number.)
//!
//! **Why a reader misses nothing.** The counter's row lock is held from that `UPDATE`
//! to the commit, so these transactions commit one after the other in the order of their
//! numbers, and PostgreSQL makes a commit visible before it releases the transaction's
//! locks. A snapshot that shows `seq = n` therefore shows every log row numbered up to n
//! and none above: numbers are never committed out of order, which a sequence or an
//! identity column would allow (a later commit of a lower number, after a reader has
//! moved past it). Readers read the counter, the log after their position and the rows
//! of the slots it names in one snapshot ([`Store::research_changes`]). The lock is taken
//! after the audit chain's head, which every writer transaction already takes last: it
//! adds no new ordering between writers (`docs/scaling.md`, "Research index").
//!
//! Nothing here returns a pseudonym: rows are keyed by (registry, slot).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use tokio_stream::StreamExt;

use super::db::{self, Db};
use super::placeholders;
use super::{Backend, Result, Store, StoreError};

/// Log rows kept behind the newest change: an instance further behind reloads its index.
const LOG_KEPT: i64 = 1_000_000;
/// The log is pruned whenever the counter passes a multiple of this.
const PRUNE_EVERY: i64 = 4096;
/// Most slots in one `IN` list.
const CHUNK: usize = 500;
/// More changed slots than this since an instance's position: it reloads instead.
const MOST_CHANGES: usize = 50_000;

/// A patient's research row, as the index needs it: the values of the case that
/// represents them, banded as the SQL reference (`store::research`) bands them, their
/// centre, and until when they may be counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatientRow {
    pub registry_id: i64,
    pub slot: i64,
    pub centre_id: i64,
    pub orphacode: Option<i64>,
    pub diagnosis_year: Option<i64>,
    /// Index of the age band (`aggregate::AGE_BANDS`) at onset; `None`: unknown.
    pub onset_band: Option<i64>,
    /// Index of the age band at diagnosis; `None`: unknown.
    pub diagnosis_band: Option<i64>,
    /// Diagnostic delay in whole months; `None`: unknown.
    pub delay_months: Option<i64>,
    /// `None`: REGISTRY_INCLUSION and RESEARCH_USE are not both granted in the decisions
    /// in force; else they are, until this instant (milliseconds; `i64::MAX`: no expiry).
    pub counted_until: Option<i64>,
    /// The row as read ([`patient_columns`]): the text fields are read from it.
    text: String,
    /// Where the fields before sex, status, country, genes and phenotypes end.
    cuts: [usize; 5],
}

impl PatientRow {
    pub fn sex(&self) -> &str {
        &self.text[self.cuts[0] + 1..self.cuts[1]]
    }

    pub fn status(&self) -> &str {
        &self.text[self.cuts[1] + 1..self.cuts[2]]
    }

    /// The country of the patient's centre, when the row was written.
    pub fn country(&self) -> &str {
        &self.text[self.cuts[2] + 1..self.cuts[3]]
    }

    /// The gene symbols of the representative version (`patients.genes`).
    pub fn genes(&self) -> impl Iterator<Item = &str> {
        self.text[self.cuts[3] + 1..self.cuts[4]]
            .split(' ')
            .filter(|g| !g.is_empty())
    }

    /// The HPO terms of the representative version (`patients.phenotypes`).
    pub fn phenotypes(&self) -> impl Iterator<Item = &str> {
        self.text[self.cuts[4] + 1..]
            .split(' ')
            .filter(|t| !t.is_empty())
    }
}

/// A centre, as research answers name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CentreRow {
    pub id: i64,
    pub code: String,
    pub name: String,
    pub country: String,
}

/// Where loaded rows go. Per slot, its patient row comes before its other cases.
pub trait IndexSink {
    /// The slot changed: forget what it held (its row, if it has one, follows).
    fn clear(&mut self, registry_id: i64, slot: i64);
    fn patient(&mut self, row: PatientRow) -> Result<()>;
    /// A case of the patient other than the one that represents them (another centre's),
    /// with the diagnosis of its current version: "where is the expertise" counts cases.
    fn other_case(
        &mut self,
        registry_id: i64,
        slot: i64,
        centre_id: i64,
        orphacode: Option<i64>,
    ) -> Result<()>;
}

/// What changed after an instance's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Changes {
    /// Nothing: the index is as of `through`.
    None { through: i64 },
    /// The changed slots went to the sink; the index is as of `through` once they apply.
    Loaded { through: i64 },
    /// Too far behind (the log was pruned past the position, or too much changed):
    /// reload everything.
    Reload,
}

/// A research row as the index reads it: one text value, "|"-separated, with some fields
/// packed into one integer first. A driver's work is per value (on SQLite each value is
/// copied and freed under the library's allocator lock, by two threads), and a load reads
/// a million rows: one value per row takes half the time of six. [`patient_row`] unpacks
/// it. Assumes slots below 2^32, years from -1 to 2^30 and delays below 2^32 months (the
/// writer's values are far inside); sex, status, country, genes and phenotypes never hold
/// a "|". The expiry is integer milliseconds on both databases ([`Backend::millis_sql`]).
fn patient_columns(backend: Backend) -> String {
    format!(
        "(p.registry_id * 4294967296 + p.slot) || '|' \
         || (p.centre_id * 64 + COALESCE({onset}, 7) * 8 + COALESCE({diagnosis}, 7)) || '|' \
         || COALESCE(CAST(p.orphacode AS TEXT), '') || '|' \
         || ((COALESCE(p.diagnosis_year, -1) + 1) * 4294967296 \
             + COALESCE(p.delay_months + 1, 0)) || '|' \
         || (CASE WHEN NOT p.eligible THEN '' \
             ELSE CAST(COALESCE({until}, 9223372036854775807) AS TEXT) END) || '|' \
         || p.sex || '|' || p.status || '|' || p.country || '|' || p.genes || '|' \
         || p.phenotypes",
        onset = super::research::age_band("p.onset_age_days"),
        diagnosis = super::research::age_band("p.diagnosis_age_days"),
        until = backend.millis_sql("p.eligible_until"),
    )
}

/// Unpacks the research row in column `packed` of `r` ([`patient_columns`]).
fn patient_row(r: &db::Row) -> Result<PatientRow> {
    unpack_patient(r.try_get("packed")?)
}

/// Unpacks a research row's text ([`patient_columns`]).
fn unpack_patient(text: String) -> Result<PatientRow> {
    let corrupt = || StoreError::Corrupt("research row does not unpack".into());
    let bars: Vec<usize> = text.match_indices('|').map(|(i, _)| i).collect();
    let [a, b, c, d, e, f, g, h, i] = bars[..] else {
        return Err(corrupt());
    };
    let number = |from: usize, to: usize| -> Result<Option<i64>> {
        let field = &text[from..to];
        if field.is_empty() {
            return Ok(None);
        }
        field.parse().map(Some).map_err(|_| corrupt())
    };
    let registry_slot = number(0, a)?.ok_or_else(corrupt)?;
    let centre_bands = number(a + 1, b)?.ok_or_else(corrupt)?;
    let orphacode = number(b + 1, c)?;
    let year_months = number(c + 1, d)?.ok_or_else(corrupt)?;
    let counted_until = number(d + 1, e)?;
    let band = |b: i64| (b != 7).then_some(b);
    let known = |v: i64| (v >= 0).then_some(v);
    Ok(PatientRow {
        registry_id: registry_slot >> 32,
        slot: registry_slot & 0xffff_ffff,
        centre_id: centre_bands >> 6,
        onset_band: band((centre_bands >> 3) & 7),
        diagnosis_band: band(centre_bands & 7),
        orphacode,
        diagnosis_year: known((year_months >> 32) - 1),
        delay_months: known((year_months & 0xffff_ffff) - 1),
        counted_until,
        cuts: [e, f, g, h, i],
        text,
    })
}

/// Parts of a load read at once, and parts of each table.
const LOAD_TASKS: usize = 2;
/// Rows handed to the sink at a time (the sink is locked once per batch).
const LOAD_BATCH: usize = 2048;

/// One part of a load ([`Store::research_load`]).
#[derive(Debug, Clone, Copy)]
enum Part {
    /// The research rows whose slot is `part` modulo [`LOAD_TASKS`].
    Patients {
        part: i64,
    },
    Others,
}

/// A load task's result: the change number its snapshot is as of.
fn joined(done: Option<std::result::Result<Result<i64>, tokio::task::JoinError>>) -> Result<i64> {
    match done {
        Some(Ok(result)) => result,
        Some(Err(e)) => Err(StoreError::Invalid(format!(
            "a research index load task failed: {e}"
        ))),
        None => Ok(i64::MAX),
    }
}

/// Reads one part in its own snapshot, handing rows to `sink` a batch at a time.
async fn load_part<S: IndexSink + Send>(
    store: Store,
    part: Part,
    sink: Arc<Mutex<S>>,
) -> Result<i64> {
    let mut tx = snapshot(&store).await?;
    let (through, _) = counter(&mut tx.db()).await?;
    let lock = || sink.lock().unwrap_or_else(|e| e.into_inner());
    match part {
        Part::Patients { part } => {
            let sql = format!(
                "SELECT {} AS packed FROM patients p WHERE p.slot IS NOT NULL AND p.slot % $1 = $2",
                patient_columns(store.backend())
            );
            let mut db = tx.db();
            let mut rows = db::query(&sql)
                .bind(LOAD_TASKS as i64)
                .bind(part)
                .fetch(&mut db);
            let mut batch = Vec::with_capacity(LOAD_BATCH);
            while let Some(row) = rows.next().await {
                batch.push(patient_row(&row?)?);
                if batch.len() == LOAD_BATCH {
                    let mut sink = lock();
                    for row in batch.drain(..) {
                        sink.patient(row)?;
                    }
                }
            }
            let mut sink = lock();
            for row in batch {
                sink.patient(row)?;
            }
        }
        Part::Others => {
            // Patients with more than one case are few: found on the (patient, centre)
            // index first.
            let rows = db::query(
                "SELECT p.registry_id, p.slot, c.centre_id, v.orphacode \
                 FROM (SELECT patient FROM cases GROUP BY patient HAVING COUNT(*) > 1) m \
                 JOIN cases c ON c.patient = m.patient \
                 JOIN patients p ON p.registry_id = c.registry_id AND p.patient = m.patient \
                     AND c.id <> p.case_id \
                 JOIN case_versions v ON v.case_id = c.id AND v.version = c.current_version \
                 WHERE p.slot IS NOT NULL",
            )
            .fetch_all(&mut tx.db())
            .await?;
            let mut sink = lock();
            for row in rows {
                sink.other_case(
                    row.try_get("registry_id")?,
                    row.try_get("slot")?,
                    row.try_get("centre_id")?,
                    row.try_get("orphacode")?,
                )?;
            }
        }
    }
    tx.rollback().await?;
    Ok(through)
}

/// Opens a read-only transaction on one snapshot (PostgreSQL: REPEATABLE READ; SQLite's
/// read transaction keeps the snapshot of its first read). On PostgreSQL the BEGIN and
/// its modes go as one simple query, one round trip (the catch-up after each commit is on
/// the path of a submission's answer). `SET TRANSACTION`, not `BEGIN ISOLATION LEVEL`, for
/// the writer's reason (`writer::begin_sql`): on a connection found inside a transaction
/// that already read, it fails instead of reading that transaction's snapshot. A
/// connection whose transaction does not end in a ROLLBACK the database answered is
/// closed, not put back into the pool ([`db::RawTx`]).
async fn snapshot(store: &Store) -> Result<db::RawTx> {
    store
        .pool()
        .begin_raw(match store.backend() {
            Backend::Postgres => {
                "BEGIN; SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
            }
            Backend::Sqlite => "BEGIN",
        })
        .await
}

/// (change number, pruned through) of the counter.
async fn counter(conn: &mut Db<'_>) -> Result<(i64, i64)> {
    let row = db::query("SELECT seq, pruned_through FROM research_seq WHERE id = 1")
        .fetch_one(&mut *conn)
        .await?;
    Ok((row.try_get("seq")?, row.try_get("pruned_through")?))
}

impl Store {
    /// Every centre (for the labels of research answers).
    pub async fn research_centres(&self, ids: Option<&[i64]>) -> Result<Vec<CentreRow>> {
        let rows = match ids {
            None => {
                db::query("SELECT id, code, name, country FROM centres")
                    .fetch_all(self.pool())
                    .await?
            }
            Some([]) => return Ok(Vec::new()),
            Some(ids) => {
                let sql = format!(
                    "SELECT id, code, name, country FROM centres WHERE id IN ({})",
                    placeholders(1, ids.len())
                );
                let mut q = db::query(&sql).persistent(super::cacheable(ids.len()));
                for id in ids {
                    q = q.bind(*id);
                }
                q.fetch_all(self.pool()).await?
            }
        };
        rows.iter()
            .map(|r| {
                Ok(CentreRow {
                    id: r.try_get("id")?,
                    code: r.try_get("code")?,
                    name: r.try_get("name")?,
                    country: r.try_get("country")?,
                })
            })
            .collect()
    }

    /// Streams every research row and the patients' other cases into `sink`; returns
    /// the change number the load is as of.
    ///
    /// The rows are read by several tasks at once (shares of `patients`, the other
    /// cases), each on its own connection and snapshot: a
    /// million rows through one connection take seconds, mostly per-row work of the
    /// driver. Each snapshot is as of some change number; the load is as of the lowest.
    /// A slot changed after that number may have been read at different changes by
    /// different tasks, but it is named in the log after that number, so the first
    /// catch-up (before any query is answered) reads it again, whole.
    pub async fn research_load<S: IndexSink + Send + 'static>(
        &self,
        sink: Arc<Mutex<S>>,
    ) -> Result<i64> {
        // Each part scans its table in key order and keeps one row in LOAD_TASKS: the
        // database's scan is cheap, the driver's work per row returned is not. (Ranges of
        // slots would read rows in slot order, one index lookup each.)
        let mut parts: Vec<Part> = Vec::new();
        for part in 0..LOAD_TASKS as i64 {
            parts.push(Part::Patients { part });
        }
        parts.push(Part::Others);
        let mut tasks = tokio::task::JoinSet::new();
        let mut through = i64::MAX;
        for part in parts {
            while tasks.len() >= LOAD_TASKS {
                through = through.min(joined(tasks.join_next().await)?);
            }
            tasks.spawn(load_part(self.clone(), part, Arc::clone(&sink)));
        }
        while let Some(done) = tasks.join_next().await {
            through = through.min(joined(Some(done))?);
        }
        if through == i64::MAX {
            // No rows at all: the counter now.
            let mut conn = self.pool().acquire().await?;
            through = counter(&mut conn.db()).await?.0;
        }
        Ok(through)
    }

    /// The changes committed after change `applied`, from one snapshot: each changed slot
    /// is cleared in `sink`, then its row and other cases (if it still has a row) are
    /// given. A slot may be named more than once: the last state wins, as the rows are
    /// read after the log.
    ///
    /// Read through the pool, or with `on`: the SQLite writer's own connection, outside a
    /// transaction, after its commit and its answers (`super::writer`), where the reads are direct
    /// calls into the engine instead of round trips to a pool connection's thread.
    pub async fn research_changes(
        &self,
        applied: i64,
        sink: &mut impl IndexSink,
        on: Option<Db<'_>>,
    ) -> Result<Changes> {
        match on {
            None => {
                let mut tx = snapshot(self).await?;
                let changes = changes_in(&mut tx.db(), self.backend(), applied, sink).await;
                // Ended without waiting for it, in a task of its own: the writer's next
                // batch (which waits for this catch-up) does not wait for that round trip.
                // The transaction only read.
                tx.rollback_in_background();
                changes
            }
            Some(mut db) => {
                // One read transaction: one snapshot for the log and the rows.
                db.execute_raw("BEGIN").await?;
                let changes = changes_in(&mut db, self.backend(), applied, sink).await;
                // Always ended: the writer's next batch begins its own transaction here.
                db.execute_raw("ROLLBACK").await?;
                changes
            }
        }
    }
}

/// [`Store::research_changes`] in the snapshot of `db`'s open transaction.
async fn changes_in(
    db: &mut Db<'_>,
    backend: Backend,
    applied: i64,
    sink: &mut impl IndexSink,
) -> Result<Changes> {
    // The counter and the log after `applied`, in one statement (a row of NULLs when
    // nothing was logged after it).
    let rows = db::query(
        "SELECT s.seq, s.pruned_through, l.registry_id, l.slot FROM research_seq s \
         LEFT JOIN research_log l ON l.seq > $1 WHERE s.id = 1",
    )
    .persistent(true)
    .bind(applied)
    .fetch_all(&mut *db)
    .await?;
    let Some(first) = rows.first() else {
        return Err(StoreError::Corrupt(
            "the research change counter is missing".into(),
        ));
    };
    let (through, pruned_through): (i64, i64) =
        (first.try_get("seq")?, first.try_get("pruned_through")?);
    if through == applied {
        return Ok(Changes::None { through });
    }
    if pruned_through > applied || through < applied {
        return Ok(Changes::Reload);
    }
    let mut slots: BTreeMap<i64, BTreeSet<i64>> = BTreeMap::new();
    for r in &rows {
        if let (Some(registry_id), Some(slot)) = (
            r.try_get::<Option<i64>>("registry_id")?,
            r.try_get::<Option<i64>>("slot")?,
        ) {
            slots.entry(registry_id).or_default().insert(slot);
        }
    }
    if slots.values().map(BTreeSet::len).sum::<usize>() > MOST_CHANGES {
        return Ok(Changes::Reload);
    }
    for (&registry_id, set) in &slots {
        for &slot in set {
            sink.clear(registry_id, slot);
        }
        let set: Vec<i64> = set.iter().copied().collect();
        // Through the pool, chunks of up to CHUNK slots; on the writer's connection, the
        // power-of-two shapes it keeps prepared.
        for chunk in db.chunks(&set, CHUNK) {
            load_slots(db, backend, registry_id, chunk, sink).await?;
        }
    }
    Ok(Changes::Loaded { through })
}

/// A list of pseudonyms (`IN (...)`, or one array on PostgreSQL).
const PSEUDONYMS: db::List = db::List(db::Ty::Text);

/// The rows of `slots` of a registry, with their other cases, in one statement. On
/// SQLite, `INDEXED BY` and `CROSS JOIN` make it start from the slots, as PostgreSQL's
/// planner does: without statistics SQLite takes an equality on `registry_id` for a few
/// rows and scanned the registry's rows (and cases) instead, at every catch-up.
async fn load_slots(
    db: &mut Db<'_>,
    backend: Backend,
    registry_id: i64,
    slots: &[i64],
    sink: &mut impl IndexSink,
) -> Result<()> {
    const SLOTS: db::List = db::List(db::Ty::Int);
    let list = SLOTS.sql(db, 2, slots.len());
    let by_slot = match backend {
        Backend::Sqlite => "patients p INDEXED BY patients_slot",
        Backend::Postgres => "patients p",
    };
    let sql = format!(
        "SELECT 0 AS kind, {patient} AS packed FROM {by_slot} \
         WHERE p.registry_id = $1 AND p.slot {list} \
         UNION ALL \
         SELECT 1, CAST(p.slot AS TEXT) || '|' || c.centre_id || '|' \
                   || COALESCE(CAST(v.orphacode AS TEXT), '') \
         FROM {by_slot} CROSS JOIN cases c \
         JOIN case_versions v ON v.case_id = c.id AND v.version = c.current_version \
         WHERE p.registry_id = $1 AND p.slot {list} \
           AND c.patient = p.patient \
           AND c.id <> p.case_id \
         ORDER BY 1",
        patient = patient_columns(backend),
    );
    // Kept prepared when small (a catch-up after each commit of a quiet server names a
    // slot or two): the statement is long, and parsing it was a cost of every commit.
    let mut q = db::query(&sql)
        .persistent(SLOTS.keeps(db, slots.len()))
        .bind(registry_id);
    for slot in slots {
        q = q.bind(*slot);
    }
    let q = q.list(db, 2, &SLOTS)?;
    for row in q.fetch_all(&mut *db).await? {
        if row.try_get::<i64>("kind")? == 0 {
            sink.patient(patient_row(&row)?)?;
            continue;
        }
        let text: String = row.try_get("packed")?;
        let corrupt = || StoreError::Corrupt("another case does not unpack".into());
        let mut fields = text.split('|');
        let (Some(slot), Some(centre), Some(orphacode), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(corrupt());
        };
        let number = |s: &str| s.parse::<i64>().map_err(|_| corrupt());
        sink.other_case(
            registry_id,
            number(slot)?,
            number(centre)?,
            (!orphacode.is_empty())
                .then(|| number(orphacode))
                .transpose()?,
        )?;
    }
    Ok(())
}

/// The research slots a writer transaction's patients hold before its commands run (read
/// under their locks): a withdrawal deletes the research row, and with it the slot the
/// change log must name.
#[derive(Debug, Default)]
pub(super) struct Before(BTreeMap<(i64, String), i64>);

/// Reads the slots of `patients` (registry, pseudonym), inside the writer's transaction.
pub(super) async fn slots_before(
    conn: &mut Db<'_>,
    patients: &BTreeSet<(i64, &str)>,
) -> Result<Before> {
    let mut before = Before::default();
    for ((registry_id, pseudonym), slot) in slots_of(conn, patients).await? {
        if let Some(slot) = slot {
            before.0.insert((registry_id, pseudonym), slot);
        }
    }
    Ok(before)
}

/// (registry, pseudonym) → slot (NULL: a row created in this transaction) of the research
/// rows of `patients` that exist.
async fn slots_of(
    conn: &mut Db<'_>,
    patients: &BTreeSet<(i64, &str)>,
) -> Result<Vec<((i64, String), Option<i64>)>> {
    let mut by_registry: BTreeMap<i64, Vec<&str>> = BTreeMap::new();
    for &(registry_id, pseudonym) in patients {
        by_registry.entry(registry_id).or_default().push(pseudonym);
    }
    let mut out = Vec::new();
    for (registry_id, pseudonyms) in by_registry {
        for chunk in conn.chunks(&pseudonyms, CHUNK) {
            let sql = format!(
                "SELECT k.pseudonym, p.slot FROM patient_keys k \
                 JOIN patients p ON p.registry_id = k.registry_id AND p.patient = k.id \
                 WHERE k.registry_id = $1 AND k.pseudonym {}",
                PSEUDONYMS.sql(conn, 2, chunk.len())
            );
            let mut q = db::query(&sql)
                .persistent(PSEUDONYMS.keeps(conn, chunk.len()))
                .bind(registry_id);
            for p in chunk {
                q = q.bind(*p);
            }
            let q = q.list(conn, 2, &PSEUDONYMS)?;
            for row in q.fetch_all(&mut *conn).await? {
                out.push((
                    (registry_id, row.try_get("pseudonym")?),
                    row.try_get("slot")?,
                ));
            }
        }
    }
    Ok(out)
}

/// The last statements of a writer transaction whose commands changed the research rows
/// of `changed` (registry, pseudonym): gives rows without a slot theirs (every new row on
/// PostgreSQL; on SQLite, where rows get theirs as they are inserted, none as a rule) and logs every
/// slot touched, under the change counter's lock (module doc).
pub(super) async fn log_changes(
    conn: &mut Db<'_>,
    before: &Before,
    changed: &BTreeSet<(i64, &str)>,
) -> Result<()> {
    if changed.is_empty() {
        return Ok(());
    }
    if matches!(conn, Db::Pg(_)) {
        return log_changes_pg(conn, before, changed).await;
    }
    let mut touched: BTreeSet<(i64, i64)> = BTreeSet::new();
    for &(registry_id, pseudonym) in changed {
        if let Some(&slot) = before.0.get(&(registry_id, pseudonym.to_owned())) {
            touched.insert((registry_id, slot));
        }
    }
    let mut unnumbered: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    for ((registry_id, pseudonym), slot) in slots_of(conn, changed).await? {
        match slot {
            Some(slot) => {
                touched.insert((registry_id, slot));
            }
            None => unnumbered.entry(registry_id).or_default().push(pseudonym),
        }
    }
    let new = unnumbered.values().map(Vec::len).sum::<usize>();
    let count = touched.len() + new;
    if count == 0 {
        return Ok(());
    }
    // The lock: held to the commit (module doc).
    let row = db::query(
        "UPDATE research_seq SET seq = seq + $1 WHERE id = 1 RETURNING seq, pruned_through",
    )
    .bind(count as i64)
    .fetch_one(&mut *conn)
    .await?;
    let (last, pruned_through): (i64, i64) = (row.try_get("seq")?, row.try_get("pruned_through")?);
    for (registry_id, pseudonyms) in unnumbered {
        let largest: Option<i64> =
            db::query("SELECT MAX(slot) AS largest FROM patients WHERE registry_id = $1")
                .bind(registry_id)
                .fetch_one(&mut *conn)
                .await?
                .try_get("largest")?;
        let mut next = largest.map_or(0, |s| s + 1);
        for chunk in conn.chunks(&pseudonyms, CHUNK) {
            // Slots next, next + 1, ...: one per row, in pseudonym order.
            let sql = format!(
                "UPDATE patients SET slot = n.slot \
                 FROM (SELECT p.registry_id, p.patient, \
                              $2 + ROW_NUMBER() OVER (ORDER BY p.pseudonym) - 1 AS slot \
                       FROM patient_keys k \
                       JOIN patients p ON p.registry_id = k.registry_id AND p.patient = k.id \
                       WHERE k.registry_id = $1 AND p.slot IS NULL AND k.pseudonym {}) AS n \
                 WHERE patients.registry_id = n.registry_id AND patients.patient = n.patient",
                PSEUDONYMS.sql(conn, 3, chunk.len())
            );
            let mut q = db::query(&sql)
                .persistent(PSEUDONYMS.keeps(conn, chunk.len()))
                .bind(registry_id)
                .bind(next);
            for p in chunk {
                q = q.bind(p.as_str());
            }
            let done = q.list(conn, 3, &PSEUDONYMS)?.execute(&mut *conn).await?;
            if done.rows_affected() != chunk.len() as u64 {
                return Err(StoreError::Corrupt(
                    "research rows changed while their slots were given".into(),
                ));
            }
            for _ in chunk {
                touched.insert((registry_id, next));
                next += 1;
            }
        }
    }
    // A new row may take the slot an erasure of this transaction freed: one log row then
    // names both, and a number goes unused (harmless: readers read after a number).
    let touched: Vec<(i64, i64)> = touched.into_iter().collect();
    let mut seq = last - touched.len() as i64;
    const ROWS: db::Rows = db::Rows::of(&[db::Ty::Int; 3]);
    for chunk in conn.chunks(&touched, CHUNK) {
        let sql = format!(
            "INSERT INTO research_log (seq, registry_id, slot) {}",
            ROWS.sql(conn, chunk.len())
        );
        let mut q = db::query(&sql).persistent(ROWS.keeps(conn, chunk.len()));
        for &(registry_id, slot) in chunk {
            seq += 1;
            q = q.bind(seq).bind(registry_id).bind(slot);
        }
        q.rows(conn, &ROWS)?.execute(&mut *conn).await?;
    }
    prune_if_due(conn, last, count as i64, pruned_through).await
}

/// Prunes the log to its last [`LOG_KEPT`] rows when the counter, raised by `count` to
/// `last`, passed a multiple of [`PRUNE_EVERY`].
async fn prune_if_due(conn: &mut Db<'_>, last: i64, count: i64, pruned_through: i64) -> Result<()> {
    if last / PRUNE_EVERY > (last - count) / PRUNE_EVERY && last - LOG_KEPT > pruned_through {
        let through = last - LOG_KEPT;
        db::query("DELETE FROM research_log WHERE seq <= $1")
            .bind(through)
            .execute(&mut *conn)
            .await?;
        db::query("UPDATE research_seq SET pruned_through = $1 WHERE id = 1")
            .bind(through)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// [`log_changes`] on PostgreSQL in two statements where it takes five (issue 14: a
/// round trip each): the counter's lock, raised by a number for every slot the
/// transaction may have touched (the rows of `changed` and the slots `before` names,
/// counted in the statement); then, in one statement under the lock, the slots of the
/// rows without one (the largest in use plus one, read after the lock was taken, so no
/// other writer can give the same), and the log rows of every slot touched, each once. A
/// slot named twice (a withdrawal that kept the row) leaves a number unused, as an
/// erasure's freed slot given again does.
async fn log_changes_pg(
    conn: &mut Db<'_>,
    before: &Before,
    changed: &BTreeSet<(i64, &str)>,
) -> Result<()> {
    let gone: Vec<(i64, i64)> = changed
        .iter()
        .filter_map(|&(registry_id, pseudonym)| {
            before
                .0
                .get(&(registry_id, pseudonym.to_owned()))
                .map(|&slot| (registry_id, slot))
        })
        .collect();
    // The lock: held to the commit (module doc). Not taken when nothing is touched.
    let Some(row) = db::query(
        "WITH c AS (SELECT COUNT(*) AS n \
                    FROM UNNEST($2::bigint[], $3::text[]) AS w(registry_id, pseudonym) \
                    JOIN patient_keys k \
                      ON k.registry_id = w.registry_id AND k.pseudonym = w.pseudonym \
                    JOIN patients p ON p.registry_id = k.registry_id AND p.patient = k.id) \
         UPDATE research_seq SET seq = seq + $1 + c.n FROM c \
         WHERE id = 1 AND $1 + c.n > 0 \
         RETURNING seq, pruned_through, $1 + c.n AS reserved",
    )
    .bind(gone.len() as i64)
    .bind_array(conn, db::Ty::Int, changed.iter().map(|c| c.0))?
    .bind_array(conn, db::Ty::Text, changed.iter().map(|c| c.1))?
    .fetch_optional(&mut *conn)
    .await?
    else {
        // Nothing touched (no lock taken) — unless the counter's row is missing.
        let counters: i64 = db::query("SELECT COUNT(*) AS n FROM research_seq WHERE id = 1")
            .fetch_one(&mut *conn)
            .await?
            .try_get("n")?;
        if counters != 1 {
            return Err(StoreError::Corrupt(
                "the research change counter's row is missing".into(),
            ));
        }
        return Ok(());
    };
    let (last, pruned_through, reserved): (i64, i64, i64) = (
        row.try_get("seq")?,
        row.try_get("pruned_through")?,
        row.try_get("reserved")?,
    );
    let row = db::query(
        "WITH w AS (SELECT * FROM UNNEST($2::bigint[], $3::text[]) AS w(registry_id, pseudonym)), \
         rows AS (SELECT p.registry_id, p.patient, p.pseudonym, p.slot FROM w \
                  JOIN patient_keys k \
                    ON k.registry_id = w.registry_id AND k.pseudonym = w.pseudonym \
                  JOIN patients p ON p.registry_id = k.registry_id AND p.patient = k.id), \
         fresh AS (SELECT r.registry_id, r.patient, \
                          COALESCE((SELECT MAX(q.slot) FROM patients q \
                                    WHERE q.registry_id = r.registry_id), -1) \
                          + ROW_NUMBER() OVER (PARTITION BY r.registry_id \
                                               ORDER BY r.pseudonym) AS slot \
                   FROM rows r WHERE r.slot IS NULL), \
         numbered AS (UPDATE patients SET slot = fresh.slot FROM fresh \
                      WHERE patients.registry_id = fresh.registry_id \
                        AND patients.patient = fresh.patient AND patients.slot IS NULL \
                      RETURNING patients.registry_id, patients.slot), \
         touched AS (SELECT registry_id, slot FROM numbered \
                     UNION SELECT registry_id, slot FROM rows WHERE slot IS NOT NULL \
                     UNION SELECT * FROM UNNEST($4::bigint[], $5::bigint[])), \
         logged AS (INSERT INTO research_log (seq, registry_id, slot) \
                    SELECT $1 + ROW_NUMBER() OVER (ORDER BY registry_id, slot), registry_id, slot \
                    FROM touched RETURNING seq) \
         SELECT (SELECT COUNT(*) FROM fresh) AS fresh, \
                (SELECT COUNT(*) FROM numbered) AS numbered, \
                (SELECT COUNT(*) FROM logged) AS logged",
    )
    .bind(last - reserved)
    .bind_array(conn, db::Ty::Int, changed.iter().map(|c| c.0))?
    .bind_array(conn, db::Ty::Text, changed.iter().map(|c| c.1))?
    .bind_array(conn, db::Ty::Int, gone.iter().map(|g| g.0))?
    .bind_array(conn, db::Ty::Int, gone.iter().map(|g| g.1))?
    .fetch_one(&mut *conn)
    .await?;
    let (fresh, numbered, logged): (i64, i64, i64) = (
        row.try_get("fresh")?,
        row.try_get("numbered")?,
        row.try_get("logged")?,
    );
    if numbered != fresh || logged > reserved {
        return Err(StoreError::Corrupt(
            "research rows changed while their slots were given".into(),
        ));
    }
    prune_if_due(conn, last, reserved, pruned_through).await
}

/// Gives a slot to every research row without one (rows written before the writer gave
/// slots, e.g. restored from a dump of an earlier version) and logs them. Called at
/// start-up, before the index is loaded.
pub async fn number_unnumbered(store: &Store) -> Result<u64> {
    // The counter's lock first, then the rows without a slot: another instance starting at
    // the same time numbers them first, or after this one commits, and finds none left
    // (rather than the same rows, whose numbering it would then take for a concurrent
    // change).
    let mut tx = under_the_counters_lock(store).await?;
    // On the (registry, slot) index, registry by registry.
    let rows = db::query(
        "SELECT registry_id, pseudonym FROM patients \
         WHERE registry_id IN (SELECT id FROM registries) AND slot IS NULL",
    )
    .fetch_all(&mut tx)
    .await?;
    if rows.is_empty() {
        tx.rollback().await?;
        return Ok(0);
    }
    let owned: Vec<(i64, String)> = rows
        .iter()
        .map(|r| Ok((r.try_get("registry_id")?, r.try_get("pseudonym")?)))
        .collect::<Result<_>>()?;
    let changed: BTreeSet<(i64, &str)> = owned.iter().map(|(r, p)| (*r, p.as_str())).collect();
    log_changes(&mut tx.db(), &Before::default(), &changed).await?;
    tx.commit().await?;
    Ok(owned.len() as u64)
}

/// A transaction holding the change counter's lock, for a start-up step that changes
/// research rows and logs them. As the writer's transactions: the counter's lock orders,
/// and on PostgreSQL READ COMMITTED reads what was committed before it was granted.
async fn under_the_counters_lock(store: &Store) -> Result<db::Tx> {
    let mut tx = store.pool().begin().await?;
    if store.backend() == Backend::Postgres {
        tx.db()
            .execute_raw("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .await?;
    }
    db::query("UPDATE research_seq SET seq = seq WHERE id = 1")
        .execute(&mut tx)
        .await?;
    Ok(tx)
}

/// Research rows per transaction of [`fill_delay_months`].
const FILL_ROUND: i64 = 5_000;

/// Fills in the delay in whole calendar months of research rows stored before it was kept
/// (migration 0026), or whose ages a later rule changed (migration 0027: an onset dated to
/// a day early in the birth month, `domain::birth_midpoint`), from the dates of the version
/// that represents each: the months, and the ages at onset and at diagnosis and the delay
/// in days with them, as the writer gives them (`cases::to_row`); and logs them (another
/// instance's index catches up). Versions stored before keep theirs: only research rows
/// are read for research. Called at start-up, before the index is loaded and research is
/// answered; a no-op once done. Rounds of [`FILL_ROUND`] rows, each a transaction under the
/// change counter's lock (as [`number_unnumbered`]): instances starting together fill each
/// row once. A row whose version's dates do not parse is left without months and counted
/// ([`DelaysFilled::unreadable`]).
pub async fn fill_delay_months(store: &Store) -> Result<DelaysFilled> {
    let mut done = DelaysFilled::default();
    let mut after: (i64, i64) = (i64::MIN, i64::MIN);
    loop {
        let mut tx = under_the_counters_lock(store).await?;
        let rows = db::query(
            "SELECT p.registry_id, p.patient, p.pseudonym, v.birth_year_month, v.onset_kind, \
                    v.onset_date, v.diagnosis_date \
             FROM patients p \
             JOIN case_versions v ON v.case_id = p.case_id AND v.version = p.version \
             WHERE p.delay_days IS NOT NULL AND p.delay_months IS NULL \
               AND (p.registry_id > $1 OR (p.registry_id = $1 AND p.patient > $2)) \
             ORDER BY p.registry_id, p.patient LIMIT $3",
        )
        .bind(after.0)
        .bind(after.1)
        .bind(FILL_ROUND)
        .fetch_all(&mut tx)
        .await?;
        let Some(last) = rows.last() else {
            tx.rollback().await?;
            return Ok(done);
        };
        if done == DelaysFilled::default() {
            // Once, after an upgrade: about 15,000 rows a second on SQLite (measured),
            // a minute for a million.
            tracing::info!(
                "filling in the diagnostic delay in whole months of research rows stored \
                 before it was kept, or whose ages a later rule changed (once, after the \
                 upgrade; research is answered after it)"
            );
        }
        after = (last.try_get("registry_id")?, last.try_get("patient")?);
        let mut values: Vec<(i64, i64, [i64; 4])> = Vec::with_capacity(rows.len());
        let mut pseudonyms: Vec<(i64, String)> = Vec::with_capacity(rows.len());
        for row in &rows {
            // A row with a delay in days has both dates, and its version's columns parse;
            // one that does not (changed outside the service) keeps no months, so it is in
            // no delay table, and is counted, not a reason to refuse the start.
            let derived = super::cases::derived_of_columns(
                &row.try_get::<String>("birth_year_month")?,
                &row.try_get::<String>("onset_kind")?,
                row.try_get::<Option<String>>("onset_date")?.as_deref(),
                row.try_get::<Option<String>>("diagnosis_date")?.as_deref(),
            );
            let Ok(super::cases::Derived {
                onset_age_days: Some(onset),
                diagnosis_age_days: Some(diagnosis),
                delay_days: Some(days),
                delay_months: Some(months),
            }) = derived
            else {
                done.unreadable += 1;
                continue;
            };
            let registry_id: i64 = row.try_get("registry_id")?;
            values.push((
                registry_id,
                row.try_get("patient")?,
                [onset, diagnosis, days, months],
            ));
            pseudonyms.push((registry_id, row.try_get("pseudonym")?));
        }
        for chunk in values.chunks(CHUNK) {
            const COLUMNS: usize = 6;
            let mut tuples = String::with_capacity(chunk.len() * 128);
            for i in 0..chunk.len() {
                tuples.push_str(if i > 0 { ", (" } else { "(" });
                for c in 1..=COLUMNS {
                    let sep = if c < COLUMNS { ", " } else { ")" };
                    tuples.push_str(&format!("CAST(${} AS BIGINT){sep}", COLUMNS * i + c));
                }
            }
            let sql = format!(
                "UPDATE patients SET onset_age_days = u.onset_age, \
                        diagnosis_age_days = u.diagnosis_age, delay_days = u.days, \
                        delay_months = u.months \
                 FROM (SELECT column1 AS registry_id, column2 AS patient, column3 AS onset_age, \
                              column4 AS diagnosis_age, column5 AS days, column6 AS months \
                       FROM (VALUES {tuples}) AS v) AS u \
                 WHERE patients.registry_id = u.registry_id AND patients.patient = u.patient"
            );
            let mut q = db::query(&sql).persistent(false);
            for &(registry_id, patient, derived) in chunk {
                q = q.bind(registry_id).bind(patient);
                for value in derived {
                    q = q.bind(value);
                }
            }
            let done = q.execute(&mut tx).await?;
            if done.rows_affected() != chunk.len() as u64 {
                return Err(StoreError::Corrupt(
                    "research rows changed while their delays were filled in".into(),
                ));
            }
        }
        let changed: BTreeSet<(i64, &str)> =
            pseudonyms.iter().map(|(r, p)| (*r, p.as_str())).collect();
        log_changes(&mut tx.db(), &Before::default(), &changed).await?;
        tx.commit().await?;
        done.filled += values.len() as u64;
    }
}

/// What [`fill_delay_months`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DelaysFilled {
    /// Research rows given their delay in months.
    pub filled: u64,
    /// Research rows with a delay in days whose version's dates do not parse (changed
    /// outside the service): left without months, in no delay table.
    pub unreadable: u64,
}
