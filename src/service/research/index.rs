//! The research index: research queries answered from memory.
//!
//! Per registry, one entry per research row (`patients`: the patient, represented by the
//! case that first entered the registry), stored as columns of small integer codes, one column per
//! dimension: diagnosis, sex, onset and diagnosis age bands, country, centre, diagnosis
//! year, patient status, diagnostic delay (whole months) and the set of genes; beside
//! them the instant until which the patient may be counted, and the patient's cases at
//! other centres (for "where is the expertise", which counts cases). A code stands for a
//! value of a per-registry dictionary (a gene-set code for a set of gene symbols, which are
//! coded once for all registries); age bands and months of delay come banded by the SQL
//! expressions the reference uses (`store::research_index::patient_columns`). A query
//! turns each dictionary into a map from code to its group (or to "filtered out"), then
//! counts in one pass over the columns, a chunk at a time and one column at a time (the
//! way analytical engines group), and hands the non-empty groups to
//! `aggregate::TableBuilder` / `DelayBuilder`, exactly as the SQL reference
//! (`store::research`) streams them. Suppression then runs as before.
//!
//! **Consent.** `until` holds, per patient, the end of their research eligibility: both
//! REGISTRY_INCLUSION and RESEARCH_USE granted in the decisions in force, until the
//! earlier expiry (the research row's `eligible`, `eligible_until`). A query counts a
//! patient only when `until` lies after its own instant, so an expiry takes effect at its
//! millisecond with no write. Every other change (a withdrawal, a refusal, a new consent,
//! an erasure) reaches the index through the change log before the query runs: the writer
//! applies its own commits once it has answered them, unless another catch-up is under
//! way or the index must be loaded again (left to [`follow_up`], which catches up as soon
//! as it may, and on PostgreSQL every `FOLLOW_UP_EVERY` for the other instances' commits)
//! (`store::writer::AfterCommit`; a COMMIT whose outcome is unknown is applied by the
//! next catch-up if it landed), and every query first catches up with every change any
//! instance committed
//! ([`Index::catch_up`]; why that misses nothing: `store::research_index`).
//!
//! **What it holds.** No pseudonym and no identifier. An entry is found by its *slot*, a
//! number the writer gives each research row (`patients.slot`) for as long as the row
//! lives: the change log names the slots it touched, and an instance re-reads those
//! slots' rows. A per-patient key is needed to apply a change to one patient; the slot is
//! that key, and it means nothing outside the database that gave it. The values are those
//! the research rows hold already (coded, and only those research answers group on).
//!
//! **Who reaches it.** This module is private to `service::research`: only the research
//! use cases query it, and they protect every table before it leaves.
//!
//! **Memory.** 34 bytes per slot (an `i64`, nine `u16` and two `u32` codes), plus the
//! growth room of the columns (at most an eighth), the dictionaries (small: one entry per
//! distinct value) and the other cases of patients seen at several centres.

use std::borrow::Borrow;
use std::borrow::BorrowMut;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::aggregate::{
    AGE_BANDS, DelayBuilder, Dimension, Filter, Key, MAX_TABLE_CELLS, QueryError, TableBuilder,
};
use crate::domain::ORPHA_UNDIAGNOSED;
use crate::store::db::Db;
use crate::store::research::{ExpertiseRow, ResearchError, Selection};
use crate::store::research_index::{CentreRow, Changes, IndexSink, PatientRow};
use crate::store::{Store, StoreError};

/// `until` of a slot without a research row.
const ABSENT: i64 = i64::MIN;
/// `until` of a patient not eligible for research (consent not granted).
const NOT_ELIGIBLE: i64 = i64::MIN + 1;
/// Code of an unknown age band.
const NO_BAND: u16 = AGE_BANDS.len() as u16;
/// Gene-set code of "no gene" (the first entry of every gene-set dictionary).
const NO_GENES: u32 = 0;
/// A row's group while it is filtered out.
const SKIP: u64 = u64::MAX;
/// Rows per step of a scan.
const CHUNK: usize = 1024;
/// Largest table of counters a scan keeps as an array (else a hash map of the groups met).
const DENSE_CELLS: u64 = 1 << 20;

/// A dictionary: values and their codes, in order of first appearance. (Neither this nor
/// the columns implement `Debug`: a printed index would be row-level data in a log.)
struct Dict<T> {
    values: Vec<T>,
    codes: HashMap<T, u32>,
}

impl<T> Default for Dict<T> {
    fn default() -> Self {
        Dict {
            values: Vec::new(),
            codes: HashMap::new(),
        }
    }
}

impl<T: Eq + Hash + Clone> Dict<T> {
    /// The code of `value`, added if new; at most `limit` codes.
    fn code<Q>(&mut self, value: &Q, limit: u32, what: &str) -> Result<u32, StoreError>
    where
        T: Borrow<Q>,
        Q: Eq + Hash + ToOwned<Owned = T> + ?Sized,
    {
        if let Some(&code) = self.codes.get(value) {
            return Ok(code);
        }
        let code = self.values.len() as u32;
        if code >= limit {
            return Err(StoreError::Invalid(format!(
                "research index: more than {limit} values of {what} in one registry"
            )));
        }
        self.values.push(value.to_owned());
        self.codes.insert(value.to_owned(), code);
        Ok(code)
    }

    fn bytes(&self, value_bytes: impl Fn(&T) -> usize) -> usize {
        let per = std::mem::size_of::<T>();
        self.values.capacity() * per
            + self.codes.capacity() * (per + 4 + 1)
            + self
                .values
                .iter()
                .map(|v| 2 * value_bytes(v))
                .sum::<usize>()
    }
}

const U16_CODES: u32 = 1 << 16;

/// One registry's columns; entry `i` is slot `i`.
struct Columns {
    until: Vec<i64>,
    diagnosis: Vec<u16>,
    sex: Vec<u16>,
    onset_band: Vec<u16>,
    diagnosis_band: Vec<u16>,
    country: Vec<u16>,
    centre: Vec<u16>,
    year: Vec<u16>,
    status: Vec<u16>,
    delay: Vec<u16>,
    genes: Vec<u32>,
    /// Each slot's set of HPO terms (a code of `phenotype_sets`).
    phenotypes: Vec<u32>,
    /// Cases at other centres than the representative one: (centre, diagnosis) codes.
    others: HashMap<u32, Vec<(u16, u16)>>,
    /// Slots with a research row.
    present: usize,
    diagnoses: Dict<Option<i64>>,
    sexes: Dict<String>,
    countries: Dict<String>,
    centres: Dict<i64>,
    years: Dict<Option<i64>>,
    statuses: Dict<String>,
    delays: Dict<Option<i64>>,
    /// Sets of gene codes (of [`Data::gene_symbols`]), sorted.
    gene_sets: Dict<Vec<u32>>,
    /// Sets of HPO term codes (of [`Data::phenotype_terms`]), sorted.
    phenotype_sets: Dict<Vec<u32>>,
}

impl Columns {
    fn new() -> Columns {
        let mut gene_sets = Dict::default();
        gene_sets.values.push(Vec::new());
        gene_sets.codes.insert(Vec::new(), NO_GENES);
        let mut phenotype_sets = Dict::default();
        phenotype_sets.values.push(Vec::new());
        phenotype_sets.codes.insert(Vec::new(), NO_GENES);
        Columns {
            until: Vec::new(),
            diagnosis: Vec::new(),
            sex: Vec::new(),
            onset_band: Vec::new(),
            diagnosis_band: Vec::new(),
            country: Vec::new(),
            centre: Vec::new(),
            year: Vec::new(),
            status: Vec::new(),
            delay: Vec::new(),
            genes: Vec::new(),
            phenotypes: Vec::new(),
            others: HashMap::new(),
            present: 0,
            diagnoses: Dict::default(),
            sexes: Dict::default(),
            countries: Dict::default(),
            centres: Dict::default(),
            years: Dict::default(),
            statuses: Dict::default(),
            delays: Dict::default(),
            gene_sets,
            phenotype_sets,
        }
    }

    fn len(&self) -> usize {
        self.until.len()
    }

    /// Makes room for `slot`, growing by an eighth at a time (not doubling: the budget is
    /// per patient).
    fn ensure(&mut self, slot: usize) {
        if slot < self.len() {
            return;
        }
        let len = slot + 1;
        fn grow<T: Clone>(v: &mut Vec<T>, len: usize, fill: T) {
            if len > v.capacity() {
                let want = len.max(v.capacity() + v.capacity() / 8 + 64);
                v.reserve_exact(want - v.len());
            }
            v.resize(len, fill);
        }
        grow(&mut self.until, len, ABSENT);
        for column in self.code_columns() {
            grow(column, len, 0);
        }
        grow(&mut self.genes, len, NO_GENES);
        grow(&mut self.phenotypes, len, NO_GENES);
    }

    /// The nine columns of small codes, one entry per slot.
    fn code_columns(&mut self) -> [&mut Vec<u16>; 9] {
        [
            &mut self.diagnosis,
            &mut self.sex,
            &mut self.onset_band,
            &mut self.diagnosis_band,
            &mut self.country,
            &mut self.centre,
            &mut self.year,
            &mut self.status,
            &mut self.delay,
        ]
    }

    fn shrink(&mut self) {
        self.until.shrink_to_fit();
        for column in self.code_columns() {
            column.shrink_to_fit();
        }
        self.genes.shrink_to_fit();
        self.phenotypes.shrink_to_fit();
        self.others.shrink_to_fit();
    }

    fn clear(&mut self, slot: usize) {
        if slot < self.len() {
            if self.until[slot] != ABSENT {
                self.present -= 1;
            }
            self.until[slot] = ABSENT;
            // The slot as if never used: an erased patient's coded values do not stay
            // in memory beside the slot (a query skips an absent slot in any case).
            for column in self.code_columns() {
                column[slot] = 0;
            }
            self.genes[slot] = NO_GENES;
            self.phenotypes[slot] = NO_GENES;
        }
        self.others.remove(&(slot as u32));
    }

    fn set(
        &mut self,
        slot: usize,
        row: &PatientRow,
        genes: u32,
        phenotypes: u32,
    ) -> Result<(), StoreError> {
        self.ensure(slot);
        let code16 = |code: u32| code as u16;
        let diagnosis = code16(
            self.diagnoses
                .code(&row.orphacode, U16_CODES, "diagnosis")?,
        );
        let sex = code16(self.sexes.code(row.sex(), U16_CODES, "sex")?);
        let country = code16(self.countries.code(row.country(), U16_CODES, "country")?);
        let centre = code16(self.centres.code(&row.centre_id, U16_CODES, "centre")?);
        let year = code16(self.years.code(&row.diagnosis_year, U16_CODES, "year")?);
        let status = code16(self.statuses.code(row.status(), U16_CODES, "status")?);
        let delay = code16(self.delays.code(&row.delay_months, U16_CODES, "delay")?);
        let band = |b: Option<i64>| match b {
            None => Ok(NO_BAND),
            Some(b) if (0..i64::from(NO_BAND)).contains(&b) => Ok(b as u16),
            Some(_) => Err(StoreError::Corrupt("research row: age band".into())),
        };
        let (onset_band, diagnosis_band) = (band(row.onset_band)?, band(row.diagnosis_band)?);
        if self.until[slot] == ABSENT {
            self.present += 1;
        }
        self.until[slot] = match row.counted_until {
            None => NOT_ELIGIBLE,
            // An expiry at or before the epoch: never counted, and never ABSENT.
            Some(t) => t.max(NOT_ELIGIBLE),
        };
        self.diagnosis[slot] = diagnosis;
        self.sex[slot] = sex;
        self.onset_band[slot] = onset_band;
        self.diagnosis_band[slot] = diagnosis_band;
        self.country[slot] = country;
        self.centre[slot] = centre;
        self.year[slot] = year;
        self.status[slot] = status;
        self.delay[slot] = delay;
        self.genes[slot] = genes;
        self.phenotypes[slot] = phenotypes;
        Ok(())
    }

    fn bytes(&self) -> usize {
        let string = |s: &String| s.capacity();
        self.until.capacity() * 8
            + (self.diagnosis.capacity()
                + self.sex.capacity()
                + self.onset_band.capacity()
                + self.diagnosis_band.capacity()
                + self.country.capacity()
                + self.centre.capacity()
                + self.year.capacity()
                + self.status.capacity()
                + self.delay.capacity())
                * 2
            + self.genes.capacity() * 4
            + self.phenotypes.capacity() * 4
            + self.others.capacity() * (4 + 24 + 1)
            + self
                .others
                .values()
                .map(|v| v.capacity() * 4)
                .sum::<usize>()
            + self.diagnoses.bytes(|_| 0)
            + self.sexes.bytes(string)
            + self.countries.bytes(string)
            + self.centres.bytes(|_| 0)
            + self.years.bytes(|_| 0)
            + self.statuses.bytes(string)
            + self.delays.bytes(|_| 0)
            + self.gene_sets.bytes(|s| s.capacity() * 4)
            + self.phenotype_sets.bytes(|s| s.capacity() * 4)
    }
}

/// Everything the index holds, as of change `applied`.
struct Data {
    applied: i64,
    centres: HashMap<i64, CentreRow>,
    /// Gene symbols, for every registry.
    gene_symbols: Dict<String>,
    /// HPO terms, for every registry.
    phenotype_terms: Dict<String>,
    registries: HashMap<i64, Columns>,
}

impl Data {
    fn new(applied: i64, centres: Vec<CentreRow>) -> Data {
        Data {
            applied,
            centres: centres.into_iter().map(|c| (c.id, c)).collect(),
            gene_symbols: Dict::default(),
            phenotype_terms: Dict::default(),
            registries: HashMap::new(),
        }
    }

    fn patients(&self) -> usize {
        self.registries.values().map(|c| c.present).sum()
    }

    fn bytes(&self) -> usize {
        self.registries.values().map(Columns::bytes).sum::<usize>()
            + self.gene_symbols.bytes(String::capacity)
            + self.phenotype_terms.bytes(String::capacity)
            + self
                .centres
                .values()
                .map(|c| 64 + c.code.len() + c.name.len() + c.country.len())
                .sum::<usize>()
    }
}

fn slot_of(slot: i64) -> Result<usize, StoreError> {
    u32::try_from(slot)
        .map(|s| s as usize)
        .map_err(|_| StoreError::Corrupt("research slot out of range".into()))
}

/// Applies loaded rows to [`Data`] (owned by a load, borrowed by a catch-up).
struct Loader<D> {
    data: D,
    /// Gene codes of the row being applied.
    genes: Vec<u32>,
    /// HPO term codes of the row being applied.
    terms: Vec<u32>,
}

impl<D: BorrowMut<Data>> Loader<D> {
    fn new(data: D) -> Self {
        Loader {
            data,
            genes: Vec::new(),
            terms: Vec::new(),
        }
    }

    fn columns(&mut self, registry_id: i64) -> &mut Columns {
        self.data
            .borrow_mut()
            .registries
            .entry(registry_id)
            .or_insert_with(Columns::new)
    }
}

impl<D: BorrowMut<Data>> IndexSink for Loader<D> {
    fn clear(&mut self, registry_id: i64, slot: i64) {
        if let Ok(slot) = slot_of(slot) {
            self.columns(registry_id).clear(slot);
        }
    }

    fn patient(&mut self, row: PatientRow) -> Result<(), StoreError> {
        let slot = slot_of(row.slot)?;
        let data = self.data.borrow_mut();
        if !data.centres.contains_key(&row.centre_id) {
            return Err(StoreError::Corrupt(
                "research row of an unknown centre".into(),
            ));
        }
        self.genes.clear();
        for gene in row.genes() {
            self.genes
                .push(data.gene_symbols.code(gene, u32::MAX, "genes")?);
        }
        self.genes.sort_unstable();
        self.genes.dedup();
        self.terms.clear();
        for term in row.phenotypes() {
            self.terms
                .push(data.phenotype_terms.code(term, u32::MAX, "phenotypes")?);
        }
        self.terms.sort_unstable();
        self.terms.dedup();
        let columns = data
            .registries
            .entry(row.registry_id)
            .or_insert_with(Columns::new);
        let genes = columns
            .gene_sets
            .code(self.genes.as_slice(), u32::MAX, "gene sets")?;
        let phenotypes =
            columns
                .phenotype_sets
                .code(self.terms.as_slice(), u32::MAX, "phenotype sets")?;
        columns.set(slot, &row, genes, phenotypes)
    }

    fn other_case(
        &mut self,
        registry_id: i64,
        slot: i64,
        centre_id: i64,
        orphacode: Option<i64>,
    ) -> Result<(), StoreError> {
        let slot = slot_of(slot)?;
        if !self.data.borrow().centres.contains_key(&centre_id) {
            return Err(StoreError::Corrupt("a case of an unknown centre".into()));
        }
        let columns = self.columns(registry_id);
        let centre = columns.centres.code(&centre_id, U16_CODES, "centre")? as u16;
        let diagnosis = columns.diagnoses.code(&orphacode, U16_CODES, "diagnosis")? as u16;
        columns
            .others
            .entry(slot as u32)
            .or_default()
            .push((centre, diagnosis));
        Ok(())
    }
}

/// What a catch-up read, applied under the write lock once complete.
#[derive(Default)]
struct Collected(Vec<Loaded>);

enum Loaded {
    Clear(i64, i64),
    Patient(PatientRow),
    Other(i64, i64, i64, Option<i64>),
}

impl IndexSink for Collected {
    fn clear(&mut self, registry_id: i64, slot: i64) {
        self.0.push(Loaded::Clear(registry_id, slot));
    }
    fn patient(&mut self, row: PatientRow) -> Result<(), StoreError> {
        self.0.push(Loaded::Patient(row));
        Ok(())
    }
    fn other_case(
        &mut self,
        registry_id: i64,
        slot: i64,
        centre_id: i64,
        orphacode: Option<i64>,
    ) -> Result<(), StoreError> {
        self.0
            .push(Loaded::Other(registry_id, slot, centre_id, orphacode));
        Ok(())
    }
}

impl Collected {
    fn centres(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self
            .0
            .iter()
            .filter_map(|l| match l {
                Loaded::Patient(row) => Some(row.centre_id),
                Loaded::Other(_, _, centre, _) => Some(*centre),
                _ => None,
            })
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    fn apply(self, loader: &mut Loader<&mut Data>) -> Result<(), StoreError> {
        for loaded in self.0 {
            match loaded {
                Loaded::Clear(registry_id, slot) => loader.clear(registry_id, slot),
                Loaded::Patient(row) => loader.patient(row)?,
                Loaded::Other(registry_id, slot, centre, orphacode) => {
                    loader.other_case(registry_id, slot, centre, orphacode)?
                }
            }
        }
        Ok(())
    }
}

/// Loads everything, from one snapshot.
async fn load(store: &Store) -> Result<Data, StoreError> {
    let centres = store.research_centres(None).await?;
    let loader = Arc::new(Mutex::new(Loader::new(Data::new(0, centres))));
    let through = store.research_load(Arc::clone(&loader)).await?;
    let loader = Arc::try_unwrap(loader)
        .map_err(|_| StoreError::Invalid("a research index load task outlived it".into()))?
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    let mut data = loader.data;
    for columns in data.registries.values_mut() {
        columns.shrink();
    }
    data.applied = through;
    Ok(data)
}

/// Sizes of the index, for the start-up log, the metrics and the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Size {
    pub patients: usize,
    pub bytes: usize,
}

/// The index, shared by the research use cases and the writer's hook.
pub(super) struct Index {
    store: Store,
    data: RwLock<Data>,
    /// One catch-up at a time: each reads from the position the last one reached. Holds
    /// whether the index must be loaded again (found by a catch-up that may not reload:
    /// the writer's, which then reads nothing more until a catch-up that may reload, a
    /// query's or [`follow_up`]'s, has begun).
    turn: tokio::sync::Mutex<bool>,
    /// Catch-ups begun: each takes the next number once it has the turn.
    begun: AtomicU64,
    /// The number of the last catch-up that succeeded.
    succeeded: AtomicU64,
    /// The largest number of `begun` seen by the writer when it left a commit to others:
    /// a catch-up numbered above it began after that commit, and read it.
    left_behind: AtomicU64,
}

impl Index {
    /// Loads the index from the database.
    pub(super) async fn load(store: &Store) -> Result<Index, StoreError> {
        let data = load(store).await?;
        Ok(Index {
            store: store.clone(),
            data: RwLock::new(data),
            turn: tokio::sync::Mutex::new(false),
            begun: AtomicU64::new(0),
            succeeded: AtomicU64::new(0),
            left_behind: AtomicU64::new(0),
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, Data> {
        self.data.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Data> {
        self.data.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Catch-ups begun so far.
    #[cfg(test)]
    pub(super) fn begun(&self) -> u64 {
        self.begun.load(Ordering::SeqCst)
    }

    /// Takes the catch-up turn as a query's catch-up does, and holds it until dropped.
    #[cfg(test)]
    pub(super) async fn hold_turn(&self) -> tokio::sync::MutexGuard<'_, bool> {
        self.turn.lock().await
    }

    pub(super) fn size(&self) -> Size {
        let data = self.read();
        Size {
            patients: data.patients(),
            bytes: data.bytes(),
        }
    }

    /// Applies every change committed (by any instance) before it started: reads the
    /// counter, the change log after the index's position and the rows of the slots it
    /// names, in one snapshot (`store::research_index`), then applies them at once.
    pub(super) async fn catch_up(&self) -> Result<(), StoreError> {
        let turn = self.turn.lock().await;
        self.catch_up_holding(turn, None, true).await.map(drop)
    }

    /// [`Index::catch_up`] after the writer's commit, reading the changes on `on` (the
    /// SQLite writer's own connection, right after its commit) instead of through the
    /// pool; skipped while another catch-up is under way, so that the writer never waits
    /// for a query's, and when the index must be loaded again (poisoned by a panic, or
    /// too far behind), which takes seconds at a million patients: [`follow_up`] (or the
    /// next query, which catches up before it counts in any case) does it. Once a reload
    /// is found due, the writer reads no more changes (each read would stop at the same
    /// verdict) until the index has been reloaded.
    ///
    /// `Ok(false)`, or an error: the changes were left (to [`Index::catch_up_left`], or
    /// to a query).
    pub(super) async fn catch_up_after_commit(
        &self,
        on: Option<Db<'_>>,
    ) -> Result<bool, StoreError> {
        let caught_up = match self.turn.try_lock() {
            Ok(turn) if !*turn => self.catch_up_holding(turn, on, false).await,
            _ => Ok(false),
        };
        if !matches!(caught_up, Ok(true)) {
            // Read after the commit: the catch-up holding the turn now, or the one that
            // just failed, has this number or a lower one.
            self.left_behind
                .fetch_max(self.begun.load(Ordering::SeqCst), Ordering::SeqCst);
        }
        caught_up
    }

    /// [`Index::catch_up`] for the commits the writer left: nothing to do if a catch-up
    /// that began after the last of them has succeeded since (a query's, say).
    pub(super) async fn catch_up_left(&self) -> Result<(), StoreError> {
        let turn = self.turn.lock().await;
        if !*turn
            && !self.data.is_poisoned()
            && self.succeeded.load(Ordering::SeqCst) > self.left_behind.load(Ordering::SeqCst)
        {
            return Ok(());
        }
        self.catch_up_holding(turn, None, true).await.map(drop)
    }

    /// Catches up while holding the turn (one catch-up at a time per instance); loads the
    /// index again where it must be only if `may_reload` (otherwise marks the reload due
    /// in the turn, and leaves the index as it is).
    ///
    /// `Ok(true)`: the index holds every change committed before the catch-up began.
    async fn catch_up_holding(
        &self,
        reload_due: tokio::sync::MutexGuard<'_, bool>,
        on: Option<Db<'_>>,
        may_reload: bool,
    ) -> Result<bool, StoreError> {
        let number = self.begun.fetch_add(1, Ordering::SeqCst) + 1;
        let caught_up = self.catch_up_numbered(reload_due, on, may_reload).await;
        if matches!(caught_up, Ok(true)) {
            self.succeeded.store(number, Ordering::SeqCst);
        }
        caught_up
    }

    async fn catch_up_numbered(
        &self,
        mut reload_due: tokio::sync::MutexGuard<'_, bool>,
        on: Option<Db<'_>>,
        may_reload: bool,
    ) -> Result<bool, StoreError> {
        if may_reload {
            // A query's catch-up: it reloads if it must, so none is due after it (if it
            // fails, the writer finds out again).
            *reload_due = false;
        }
        if self.data.is_poisoned() {
            if !may_reload {
                *reload_due = true;
                return Ok(false);
            }
            // An apply panicked half-way: start again from the database.
            let fresh = load(&self.store).await?;
            *self.write() = fresh;
            self.data.clear_poison();
            return Ok(true);
        }
        let applied = self.read().applied;
        let mut collected = Collected::default();
        match self
            .store
            .research_changes(applied, &mut collected, on)
            .await?
        {
            Changes::None { .. } => Ok(true),
            Changes::Reload if !may_reload => {
                *reload_due = true;
                Ok(false)
            }
            Changes::Reload => {
                let fresh = load(&self.store).await?;
                *self.write() = fresh;
                Ok(true)
            }
            Changes::Loaded { through } => {
                let known = {
                    let data = self.read();
                    collected
                        .centres()
                        .into_iter()
                        .filter(|id| !data.centres.contains_key(id))
                        .collect::<Vec<_>>()
                };
                let centres = self.store.research_centres(Some(&known)).await?;
                let mut data = self.write();
                data.centres.extend(centres.into_iter().map(|c| (c.id, c)));
                collected.apply(&mut Loader::new(&mut *data))?;
                data.applied = through;
                Ok(true)
            }
        }
    }

    /// Counts consented patients per group (`sel.now` is the query's instant).
    pub(super) fn count(&self, sel: &Selection) -> Result<TableBuilder, ResearchError> {
        self.count_within(sel, MAX_TABLE_CELLS)
    }

    /// [`Self::count`], refused as too fine past `max_cells` groups.
    pub(super) fn count_within(
        &self,
        sel: &Selection,
        max_cells: usize,
    ) -> Result<TableBuilder, ResearchError> {
        let data = self.read();
        let mut table = TableBuilder::new();
        let Some(columns) = data.registries.get(&sel.registry_id) else {
            if sel.group_by.is_empty() {
                table.add(Vec::new(), 0)?;
            }
            return Ok(table);
        };
        let plan = Plan::new(columns, &data, sel, false)?;
        // More non-empty cells than a table may have is refused during the scan, not after
        // a group per patient was built: a cell is one group, except by gene, where a cell
        // (a set of genes) may add to groups of other cells.
        let cap = (!plan.by_gene()).then_some(max_cells);
        let Some(counts) = plan.scan(columns, sel.now.timestamp_millis(), cap) else {
            return Err(QueryError::TooFine.into());
        };
        if sel.group_by.is_empty() {
            table.add(Vec::new(), counts.get(0))?;
            return Ok(table);
        }
        for (keys, n) in plan.groups(&counts, max_cells)? {
            table.add(keys, n)?;
        }
        Ok(table)
    }

    /// Histograms of the diagnostic delay (whole months) per group, in group order.
    pub(super) fn diagnostic_delay(&self, sel: &Selection) -> Result<DelayBuilder, ResearchError> {
        let data = self.read();
        let mut builder = DelayBuilder::new(&sel.group_by);
        let Some(columns) = data.registries.get(&sel.registry_id) else {
            return Ok(builder);
        };
        let plan = Plan::new(columns, &data, sel, true)?;
        let Some(counts) = plan.scan(columns, sel.now.timestamp_millis(), None) else {
            return Err(QueryError::TooFine.into());
        };
        // A group per (group, months): the builder bounds the groups it keeps.
        for (mut keys, n) in plan.groups(&counts, usize::MAX)? {
            let Some(Key::Int(months)) = keys.pop() else {
                return Err(QueryError::Invalid("delay group without months".into()).into());
            };
            builder.add(keys, months, n)?;
        }
        Ok(builder)
    }

    /// Centres with cases (current versions) of `orphacodes` in `registries`, optionally
    /// only in `countries`, counting the cases of patients eligible at `now`.
    pub(super) fn expertise(
        &self,
        orphacodes: &[i64],
        registries: &[i64],
        countries: &[String],
        now: i64,
    ) -> Vec<ExpertiseRow> {
        let data = self.read();
        let mut rows = Vec::new();
        for &registry_id in registries {
            let Some(columns) = data.registries.get(&registry_id) else {
                continue;
            };
            // Each diagnosis value's place among the codes asked for, if asked for: cases
            // are counted per centre and code.
            let wanted: Vec<Option<usize>> = columns
                .diagnoses
                .values
                .iter()
                .map(|code| code.and_then(|c| orphacodes.iter().position(|&o| o == c)))
                .collect();
            let centre_ok: Vec<bool> = columns
                .centres
                .values
                .iter()
                .map(|id| {
                    data.centres
                        .get(id)
                        .is_some_and(|c| countries.is_empty() || countries.contains(&c.country))
                })
                .collect();
            let ncentres = columns.centres.values.len();
            let mut cases = vec![0u64; ncentres * orphacodes.len()];
            let diagnosis = Step::new(
                Column::Narrow(&columns.diagnosis),
                wanted
                    .iter()
                    .map(|w| w.map_or(SKIP, |j| j as u64))
                    .collect(),
                ncentres as u64,
            );
            let centre = Step::new(
                Column::Narrow(&columns.centre),
                centre_ok
                    .iter()
                    .enumerate()
                    .map(|(code, &ok)| if ok { code as u64 } else { SKIP })
                    .collect(),
                1,
            );
            scan(&columns.until, now, &[diagnosis, centre], |cell| {
                cases[cell as usize] += 1;
            });
            for (&slot, others) in &columns.others {
                if columns.until[slot as usize] <= now {
                    continue;
                }
                for &(centre, diagnosis) in others {
                    if let Some(j) = wanted[diagnosis as usize]
                        && centre_ok[centre as usize]
                    {
                        cases[j * ncentres + centre as usize] += 1;
                    }
                }
            }
            for (cell, &n) in cases.iter().enumerate() {
                if n == 0 {
                    continue;
                }
                let (j, code) = (cell / ncentres, cell % ncentres);
                let Some(centre) = data.centres.get(&columns.centres.values[code]) else {
                    continue;
                };
                rows.push(ExpertiseRow {
                    centre_code: centre.code.clone(),
                    centre_name: centre.name.clone(),
                    country: centre.country.clone(),
                    registry_id,
                    orphacode: orphacodes[j],
                    cases: n,
                });
            }
        }
        rows
    }
}

/// A code column of the scan.
#[derive(Clone, Copy)]
enum Column<'a> {
    Narrow(&'a [u16]),
    Wide(&'a [u32]),
}

/// One column's part in a scan: each code's group (times `stride`), or `SKIP`.
struct Step<'a> {
    column: Column<'a>,
    map: Vec<u64>,
    stride: u64,
}

impl<'a> Step<'a> {
    fn new(column: Column<'a>, groups: Vec<u64>, stride: u64) -> Step<'a> {
        let map = groups
            .into_iter()
            .map(|g| if g == SKIP { SKIP } else { g * stride })
            .collect();
        Step {
            column,
            map,
            stride,
        }
    }
}

/// Passes the cell of every row eligible at `now` and in no filtered-out group to `count`:
/// a chunk of rows at a time, one column at a time over the chunk.
fn scan(until: &[i64], now: i64, steps: &[Step<'_>], mut count: impl FnMut(u64)) {
    let mut cells = [0u64; CHUNK];
    let mut start = 0;
    while start < until.len() {
        let end = (start + CHUNK).min(until.len());
        let cells = &mut cells[..end - start];
        for (cell, &u) in cells.iter_mut().zip(&until[start..end]) {
            *cell = if u > now { 0 } else { SKIP };
        }
        for step in steps {
            let map = &step.map[..];
            match step.column {
                Column::Narrow(codes) => {
                    for (cell, &code) in cells.iter_mut().zip(&codes[start..end]) {
                        let g = map[code as usize];
                        *cell = if *cell == SKIP || g == SKIP {
                            SKIP
                        } else {
                            *cell + g
                        };
                    }
                }
                Column::Wide(codes) => {
                    for (cell, &code) in cells.iter_mut().zip(&codes[start..end]) {
                        let g = map[code as usize];
                        *cell = if *cell == SKIP || g == SKIP {
                            SKIP
                        } else {
                            *cell + g
                        };
                    }
                }
            }
        }
        for &cell in cells.iter() {
            if cell != SKIP {
                count(cell);
            }
        }
        start = end;
    }
}

/// Counters of a scan, per cell.
enum Counts {
    Dense(Vec<u64>),
    Sparse(HashMap<u64, u64>),
}

impl Counts {
    fn get(&self, cell: u64) -> u64 {
        match self {
            Counts::Dense(v) => v.get(cell as usize).copied().unwrap_or(0),
            Counts::Sparse(m) => m.get(&cell).copied().unwrap_or(0),
        }
    }

    /// How many cells are not empty.
    fn non_empty(&self) -> usize {
        match self {
            Counts::Dense(v) => v.iter().filter(|n| **n > 0).count(),
            Counts::Sparse(m) => m.len(),
        }
    }

    /// Non-zero cells, ascending.
    fn cells(&self) -> Vec<(u64, u64)> {
        match self {
            Counts::Dense(v) => v
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(|(c, n)| (c as u64, *n))
                .collect(),
            Counts::Sparse(m) => {
                let mut cells: Vec<(u64, u64)> = m.iter().map(|(c, n)| (*c, *n)).collect();
                cells.sort_unstable();
                cells
            }
        }
    }
}

/// The groups of one dimension (or of the delay's months): per group its key, or for
/// genes the keys a gene set stands for.
enum Groups {
    Keys(Vec<Key>),
    GeneSets(Vec<Vec<Key>>),
}

impl Groups {
    fn len(&self) -> usize {
        match self {
            Groups::Keys(k) => k.len(),
            Groups::GeneSets(s) => s.len(),
        }
    }
}

/// A query turned into scan steps: the grouped dimensions (and months, for the delay)
/// first, in order, then the filters on other dimensions.
struct Plan<'a> {
    steps: Vec<Step<'a>>,
    groups: Vec<Groups>,
    cells: u64,
}

/// Each code's key of a dimension other than the gene.
fn keys_of<'c>(
    columns: &'c Columns,
    centres: &HashMap<i64, CentreRow>,
    dim: Dimension,
) -> Result<(Column<'c>, Vec<Key>), QueryError> {
    let text = |d: &Dict<String>| d.values.iter().map(|s| Key::Text(s.clone())).collect();
    let optional = |d: &Dict<Option<i64>>| {
        d.values
            .iter()
            .map(|v| v.map_or(Key::Missing, Key::Int))
            .collect()
    };
    let bands = || {
        (0..AGE_BANDS.len() as i64)
            .map(Key::Int)
            .chain(std::iter::once(Key::Missing))
            .collect()
    };
    Ok(match dim {
        Dimension::Diagnosis => (
            Column::Narrow(&columns.diagnosis),
            columns
                .diagnoses
                .values
                .iter()
                .map(|v| Key::Int(v.unwrap_or(i64::from(ORPHA_UNDIAGNOSED))))
                .collect(),
        ),
        Dimension::Sex => (Column::Narrow(&columns.sex), text(&columns.sexes)),
        Dimension::OnsetAgeBand => (Column::Narrow(&columns.onset_band), bands()),
        Dimension::DiagnosisAgeBand => (Column::Narrow(&columns.diagnosis_band), bands()),
        Dimension::Country => (Column::Narrow(&columns.country), text(&columns.countries)),
        Dimension::Centre => (
            Column::Narrow(&columns.centre),
            columns
                .centres
                .values
                .iter()
                .map(|id| {
                    centres
                        .get(id)
                        .map(|c| Key::Text(c.code.clone()))
                        .ok_or_else(|| QueryError::Invalid("unknown centre in the index".into()))
                })
                .collect::<Result<_, _>>()?,
        ),
        Dimension::DiagnosisYear => (Column::Narrow(&columns.year), optional(&columns.years)),
        Dimension::PatientStatus => (Column::Narrow(&columns.status), text(&columns.statuses)),
        Dimension::Gene => {
            return Err(QueryError::Invalid("genes are grouped by set".into()));
        }
    })
}

/// Per gene set, the gene keys it contributes: its genes (or "none" for the empty set),
/// only those `filter` allows when given.
fn gene_keys(columns: &Columns, symbols: &Dict<String>, filter: Option<&Filter>) -> Vec<Vec<Key>> {
    let allowed = |key: &Key| filter.is_none_or(|f| f.values.contains(key));
    columns
        .gene_sets
        .values
        .iter()
        .map(|set| {
            if set.is_empty() {
                [Key::Missing].into_iter().filter(allowed).collect()
            } else {
                set.iter()
                    .map(|&g| Key::Text(symbols.values[g as usize].clone()))
                    .filter(allowed)
                    .collect()
            }
        })
        .collect()
}

impl<'a> Plan<'a> {
    fn new(
        columns: &'a Columns,
        data: &Data,
        sel: &Selection,
        by_months: bool,
    ) -> Result<Plan<'a>, QueryError> {
        let (group_by, filters) = (&sel.group_by[..], &sel.filters[..]);
        let (centres, symbols) = (&data.centres, &data.gene_symbols);
        let filter_of = |dim: Dimension| filters.iter().find(|f| f.dimension == dim);
        // (column, each code's group or SKIP, the groups), for the grouped dimensions.
        let mut grouped: Vec<(Column<'a>, Vec<u64>, Groups)> = Vec::new();
        for &dim in group_by {
            if dim == Dimension::Gene {
                let sets = gene_keys(columns, symbols, filter_of(dim));
                let mut groups = Vec::new();
                let map = sets
                    .into_iter()
                    .map(|keys| {
                        if keys.is_empty() {
                            SKIP
                        } else {
                            groups.push(keys);
                            groups.len() as u64 - 1
                        }
                    })
                    .collect();
                grouped.push((Column::Wide(&columns.genes), map, Groups::GeneSets(groups)));
            } else {
                let (column, keys) = keys_of(columns, centres, dim)?;
                let filter = filter_of(dim);
                let mut order: BTreeMap<&Key, u64> = BTreeMap::new();
                for key in &keys {
                    if filter.is_none_or(|f| f.values.contains(key)) {
                        order.insert(key, 0);
                    }
                }
                for (i, group) in order.values_mut().enumerate() {
                    *group = i as u64;
                }
                let map = keys
                    .iter()
                    .map(|k| order.get(k).copied().unwrap_or(SKIP))
                    .collect();
                let groups = Groups::Keys(order.keys().map(|k| (*k).clone()).collect());
                grouped.push((column, map, groups));
            }
        }
        if by_months {
            let mut order: BTreeMap<i64, u64> = BTreeMap::new();
            for months in columns.delays.values.iter().flatten() {
                order.insert(*months, 0);
            }
            for (i, group) in order.values_mut().enumerate() {
                *group = i as u64;
            }
            let map = columns
                .delays
                .values
                .iter()
                .map(|m| m.and_then(|m| order.get(&m).copied()).unwrap_or(SKIP))
                .collect();
            let groups = Groups::Keys(order.keys().map(|m| Key::Int(*m)).collect());
            grouped.push((Column::Narrow(&columns.delay), map, groups));
        }
        // Strides: the first dimension varies slowest, so cells ascend in group order.
        let mut cells: u64 = 1;
        let mut strides = vec![0u64; grouped.len()];
        for (i, (_, _, groups)) in grouped.iter().enumerate().rev() {
            strides[i] = cells;
            cells = cells
                .checked_mul(groups.len().max(1) as u64)
                .filter(|&c| c < SKIP / 2)
                // More possible cells than a counter can number: far past any table
                // that could be published.
                .ok_or(QueryError::TooFine)?;
        }
        let mut steps = Vec::new();
        let mut groups = Vec::new();
        for ((column, map, g), stride) in grouped.into_iter().zip(strides) {
            steps.push(Step::new(column, map, stride));
            groups.push(g);
        }
        // Filters on dimensions not grouped by: in or out.
        for filter in filters {
            if group_by.contains(&filter.dimension) {
                continue;
            }
            let (column, allowed): (Column<'a>, Vec<bool>) = if filter.dimension == Dimension::Gene
            {
                let sets = gene_keys(columns, symbols, Some(filter));
                (
                    Column::Wide(&columns.genes),
                    sets.iter().map(|keys| !keys.is_empty()).collect(),
                )
            } else {
                let (column, keys) = keys_of(columns, centres, filter.dimension)?;
                (
                    column,
                    keys.iter().map(|k| filter.values.contains(k)).collect(),
                )
            };
            let map = allowed
                .into_iter()
                .map(|ok| if ok { 0 } else { SKIP })
                .collect();
            steps.push(Step::new(column, map, 0));
        }
        // Phenotypes: a slot's set of terms is in when it holds any term asked for.
        if let Some(f) = &sel.phenotypes {
            let wanted: HashSet<u32> = f
                .terms
                .iter()
                .filter_map(|t| data.phenotype_terms.codes.get(t.as_str()).copied())
                .collect();
            let map = columns
                .phenotype_sets
                .values
                .iter()
                .map(|set| {
                    if set.iter().any(|t| wanted.contains(t)) {
                        0
                    } else {
                        SKIP
                    }
                })
                .collect();
            steps.push(Step::new(Column::Wide(&columns.phenotypes), map, 0));
        }
        Ok(Plan {
            steps,
            groups,
            cells,
        })
    }

    /// Whether a cell stands for a set of genes (grouped by gene).
    fn by_gene(&self) -> bool {
        self.groups.iter().any(|g| matches!(g, Groups::GeneSets(_)))
    }

    /// Counts per cell; `None` when more than `cap` cells are non-empty (the sparse
    /// counter stops growing there; the dense one is bounded by `DENSE_CELLS`).
    fn scan(&self, columns: &Columns, now: i64, cap: Option<usize>) -> Option<Counts> {
        let cap = cap.unwrap_or(usize::MAX);
        if self.cells <= DENSE_CELLS {
            let mut counts = vec![0u64; self.cells as usize];
            scan(&columns.until, now, &self.steps, |cell| {
                counts[cell as usize] += 1;
            });
            let counts = Counts::Dense(counts);
            (counts.non_empty() <= cap).then_some(counts)
        } else {
            let mut counts: HashMap<u64, u64> = HashMap::new();
            let mut over = false;
            scan(&columns.until, now, &self.steps, |cell| {
                if let Some(n) = counts.get_mut(&cell) {
                    *n += 1;
                } else if counts.len() < cap {
                    counts.insert(cell, 1);
                } else {
                    over = true;
                }
            });
            (!over).then_some(Counts::Sparse(counts))
        }
    }

    /// The non-empty groups with their keys (in the order of the dimensions), ascending:
    /// a gene set's count goes to each gene it stands for. Refused (too fine) as soon as
    /// there are more than `limit`.
    fn groups(&self, counts: &Counts, limit: usize) -> Result<Vec<(Vec<Key>, u64)>, QueryError> {
        let strides: Vec<u64> = self.steps[..self.groups.len()]
            .iter()
            .map(|s| s.stride)
            .collect();
        let by_gene = self.by_gene();
        let mut out = Vec::new();
        let mut expanded: BTreeMap<Vec<Key>, u64> = BTreeMap::new();
        for (cell, n) in counts.cells() {
            let mut combos: Vec<Vec<Key>> = vec![Vec::with_capacity(self.groups.len())];
            for (groups, stride) in self.groups.iter().zip(&strides) {
                let i = ((cell / stride) % groups.len().max(1) as u64) as usize;
                match groups {
                    Groups::Keys(keys) => {
                        for combo in &mut combos {
                            combo.push(keys[i].clone());
                        }
                    }
                    Groups::GeneSets(sets) => {
                        combos = combos
                            .into_iter()
                            .flat_map(|combo| {
                                sets[i].iter().map(move |gene| {
                                    let mut c = combo.clone();
                                    c.push(gene.clone());
                                    c
                                })
                            })
                            .collect();
                    }
                }
            }
            if by_gene {
                for combo in combos {
                    *expanded.entry(combo).or_default() += n;
                }
            } else {
                out.extend(combos.into_iter().map(|c| (c, n)));
            }
            if out.len().max(expanded.len()) > limit {
                return Err(QueryError::TooFine);
            }
        }
        if by_gene {
            out.extend(expanded);
        }
        Ok(out)
    }
}

/// Catches up the index whenever the writer left its changes (a query's catch-up held
/// the turn, or a reload is due, or its catch-up failed: [`Index::catch_up_left`]), and
/// every `every` if given (on PostgreSQL [`super::FOLLOW_UP_EVERY`], for the changes other
/// instances commit), so that no change, an erasure least of all, waits in the database
/// for the next research query: erased values leave the index a catch-up after the
/// erasure, whether or not anyone asks a question. A catch-up that fails (or panics: the
/// next one then loads the index again) is tried again after a second, then at most
/// every 30 s, until one succeeds. Ends when every sender of `left` is dropped (the
/// writers stopped) or the index is.
pub(super) async fn follow_up(
    index: std::sync::Weak<Index>,
    mut left: tokio::sync::mpsc::Receiver<()>,
    every: Option<std::time::Duration>,
) {
    use std::time::Duration;
    let mut tick = every.map(|every| {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    });
    let mut retry: Option<Duration> = None;
    loop {
        // `Some(true)`: the writer left changes; `Some(false)`: a tick or a retry.
        let woken = match (retry, tick.as_mut()) {
            (Some(after), _) => {
                tokio::time::sleep(after).await;
                Some(false)
            }
            (None, Some(tick)) => tokio::select! {
                biased;
                left = left.recv() => left.map(|()| true),
                _ = tick.tick() => Some(false),
            },
            (None, None) => left.recv().await.map(|()| true),
        };
        let (Some(writer_left), false) = (woken, left.is_closed()) else {
            return;
        };
        let Some(index) = index.upgrade() else {
            return;
        };
        // On a task of its own, so that a panic (an apply that failed half-way) ends
        // that catch-up and not this loop.
        let caught_up = tokio::spawn(async move {
            if writer_left {
                index.catch_up_left().await
            } else {
                index.catch_up().await
            }
        })
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Invalid(
                "a research index catch-up panicked".into(),
            ))
        });
        match caught_up {
            Ok(()) => {
                if retry.is_some() {
                    tracing::info!("research index: caught up again");
                }
                retry = None;
            }
            Err(e) => {
                if retry.is_none() {
                    tracing::warn!(error = %e, "research index: catching up failed; trying again");
                }
                retry = Some(retry.map_or(Duration::from_secs(1), |r| {
                    (r * 2).min(Duration::from_secs(30))
                }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_costs_thirty_four_bytes_in_the_columns() {
        let mut c = Columns::new();
        c.ensure(999);
        c.shrink();
        let fixed = c.until.capacity() * 8
            + c.diagnosis.capacity() * 2 * 9
            + c.genes.capacity() * 4
            + c.phenotypes.capacity() * 4;
        assert_eq!(fixed, 1000 * 34);
    }

    /// An erased patient's coded values leave memory when the erasure is applied: the
    /// slot is left as a slot never used.
    #[test]
    fn a_cleared_slot_keeps_none_of_its_values() {
        let mut c = Columns::new();
        c.ensure(7);
        c.until[7] = i64::MAX;
        c.present = 1;
        for (i, column) in c.code_columns().into_iter().enumerate() {
            column[7] = i as u16 + 1;
        }
        c.genes[7] = 3;
        c.phenotypes[7] = 4;
        c.others.insert(7, vec![(1, 1)]);
        c.clear(7);
        let mut never_used = Columns::new();
        never_used.ensure(7);
        assert_eq!(c.until, never_used.until);
        assert_eq!(c.present, 0);
        for (a, b) in c.code_columns().into_iter().zip(never_used.code_columns()) {
            assert_eq!(a, b);
        }
        assert_eq!(c.genes, never_used.genes);
        assert_eq!(c.phenotypes, never_used.phenotypes);
        assert!(c.others.is_empty());
    }
}
