//! Research: aggregates for researchers (counts, diagnostic delay) and where the
//! expertise is, for physicians and researchers.
//!
//! Who may ask what, the rate of questions, and that no table leaves before
//! `aggregate::suppress` has proven it safe against the registry's rules: all here. The
//! counting is done by the in-memory research index ([`ResearchIndex`], private module
//! `index`: columns of codes per registry, kept in step with every commit of every
//! instance) or, when the server runs without it (`--research-index=false`), by the
//! database (`store::research`, the reference the index is tested against); `aggregate`
//! assembles and protects. Nothing here ever sees a row or a pseudonym.

mod index;
#[cfg(test)]
mod index_tests;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tracing::{info, warn};

use super::{Call, ServiceError, Services};
use crate::aggregate::suppress::Rules;
use crate::aggregate::{
    self, CountTable, DelayTable, Dimension, Filter, Key, Known, QueryError, TableBuilder,
};
use crate::auth::{AuthError, Principal, Role};
use crate::domain::{CodeCatalog, CodeSystem, HpoTerm, Lookup};
use crate::domain::{FieldViolations, RegistryCode};
use crate::ratelimit::ItemGate;
use crate::store::db::Db;
use crate::store::research::{ExpertiseRow, PhenotypeFilter, ResearchError, Selection};
use crate::store::writer::AfterCommit;
use crate::store::{Registry, Store, StoreError};

/// The research index, as the rest of the service sees it: built at start-up, told of
/// the writer's commits, and otherwise reachable only by the use cases of this module.
pub struct ResearchIndex {
    index: Arc<index::Index>,
    /// Scans of the index at once: one per core. A scan runs on a blocking thread; without
    /// a bound, a flood of queries (each within its principal's limit, from many
    /// principals) would take as many threads, and the memory of their counts, at once.
    scans: Arc<tokio::sync::Semaphore>,
}

impl ResearchIndex {
    /// Gives a slot to research rows without one, then loads the index from the database;
    /// logs how long it took and how much memory it holds (also as metrics).
    pub async fn load(store: &Store) -> Result<ResearchIndex, StoreError> {
        let started = Instant::now();
        let numbered = crate::store::research_index::number_unnumbered(store).await?;
        if numbered > 0 {
            warn!(
                rows = numbered,
                "research rows without a slot were given one"
            );
        }
        let index = index::Index::load(store).await?;
        let size = index.size();
        let seconds = started.elapsed().as_secs_f64();
        metrics::gauge!("ern_research_index_load_seconds").set(seconds);
        metrics::gauge!("ern_research_index_patients").set(size.patients as f64);
        metrics::gauge!("ern_research_index_bytes").set(size.bytes as f64);
        info!(
            patients = size.patients,
            bytes = size.bytes,
            bytes_per_patient = size.bytes / size.patients.max(1),
            seconds,
            "research index loaded"
        );
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        Ok(ResearchIndex {
            index: Arc::new(index),
            scans: Arc::new(tokio::sync::Semaphore::new(cores)),
        })
    }

    /// What the writer calls after each commit, once it has answered: the index catches
    /// up (unless another catch-up, a query's or another writer's, is under way, or the
    /// index must be loaded again: then a task of the runtime this is called on catches
    /// up as soon as it may, [`index::follow_up`]). On PostgreSQL that task also catches
    /// up every [`FOLLOW_UP_EVERY`], for the commits of other instances.
    pub fn after_commit(&self, store: &Store) -> Arc<dyn AfterCommit> {
        let (left, waiting) = tokio::sync::mpsc::channel(1);
        let every = (store.backend() == crate::store::Backend::Postgres).then_some(FOLLOW_UP_EVERY);
        tokio::spawn(index::follow_up(
            Arc::downgrade(&self.index),
            waiting,
            every,
        ));
        Arc::new(CatchUp {
            index: Arc::clone(&self.index),
            left: Some(left),
        })
    }

    /// Catches up, then runs `query` on the index off the async runtime.
    async fn query<T: Send + 'static>(
        &self,
        query: impl FnOnce(&index::Index) -> Result<T, ResearchError> + Send + 'static,
    ) -> Result<T, ResearchError> {
        self.index.catch_up().await?;
        let index = Arc::clone(&self.index);
        // Waits in turn (the call's deadline bounds the wait); never closed.
        let permit = Arc::clone(&self.scans).acquire_owned().await.map_err(|_| {
            ResearchError::Store(StoreError::Invalid("the research index is closed".into()))
        })?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            query(&index)
        })
        .await
        .map_err(|_| {
            ResearchError::Store(StoreError::Invalid(
                "a research index query panicked".into(),
            ))
        })?
    }
}

/// How often an instance's research index on PostgreSQL catches up with the other
/// instances' commits when no query does (an erasure on one instance leaves the others'
/// memory within this, `docs/privacy.md`).
pub const FOLLOW_UP_EVERY: Duration = Duration::from_secs(10);

struct CatchUp {
    index: Arc<index::Index>,
    /// Told when the writer leaves its changes: `None` in tests of the index that leave
    /// them to the queries.
    left: Option<tokio::sync::mpsc::Sender<()>>,
}

impl AfterCommit for CatchUp {
    fn after_commit<'a>(
        &'a self,
        on: Option<Db<'a>>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let caught_up = match self.index.catch_up_after_commit(on).await {
                Ok(caught_up) => caught_up,
                Err(e) => {
                    // Queries catch up before they answer: they will apply it, or fail.
                    warn!(error = %e, "research index: catching up after a commit failed");
                    false
                }
            };
            if !caught_up && let Some(left) = &self.left {
                // Full: a follow-up is pending already, and will read this commit too.
                let _ = left.try_send(());
            }
        })
    }
}

/// Where research tables are protected: a bounded pool of blocking threads, so that one
/// large table cannot stall other calls on the async runtime, and a deadline per query.
/// A table not proven safe by its deadline is never published (fail closed). Each
/// principal's questions take turns ([`ProtectionPool::turn`], before they are counted):
/// its others wait apart from everyone else's, so one principal's questions hold at most
/// one worker, take at most one place in the queue for the workers, and do no counting
/// while they wait.
pub struct ProtectionPool {
    permits: Arc<tokio::sync::Semaphore>,
    /// One question at a time per principal.
    turns: ItemGate,
    budget: Duration,
}

/// A principal's turn for one question ([`ProtectionPool::turn`]), held until its table
/// is protected (or the question fails).
pub struct Turn {
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl ProtectionPool {
    /// At most `workers` protections at once, one question per principal at a time, each
    /// given `budget` to wait for its turn, and `budget` from the moment it asks for a
    /// worker (waiting for one counts) to be protected.
    pub fn new(workers: usize, budget: Duration) -> Self {
        ProtectionPool {
            permits: Arc::new(tokio::sync::Semaphore::new(workers.max(1))),
            turns: ItemGate::new(1),
            budget,
        }
    }

    /// Waits until `principal`'s earlier questions are done, at most the budget.
    pub async fn turn(&self, principal: i64) -> Result<Turn, ServiceError> {
        tokio::time::timeout(self.budget, self.turns.enter(principal))
            .await
            .map(|permit| Turn { _permit: permit })
            .map_err(|_| {
                ServiceError::Busy(
                    "your earlier research questions are still being answered (one at a time per researcher); retry",
                )
            })
    }

    /// Runs `work` (given its deadline) on a blocking thread, in `turn`, once a worker is
    /// free.
    pub async fn run<T: Send + 'static>(
        &self,
        turn: Turn,
        work: impl FnOnce(Instant) -> Result<T, QueryError> + Send + 'static,
    ) -> Result<T, ServiceError> {
        let asked = Instant::now();
        let deadline = asked + self.budget;
        let permit =
            tokio::time::timeout_at(deadline.into(), Arc::clone(&self.permits).acquire_owned())
                .await
                .map_err(|_| ServiceError::Busy("every research worker is busy"))?
                .map_err(|_| ServiceError::Unavailable)?;
        // Waiting for a worker took from the budget: a table not proven safe in what was
        // left may be provable alone, so that is not the table's fault. (A wait of a
        // millisecond or less is none.)
        let waited = asked.elapsed() > (self.budget / 4).max(Duration::from_millis(1));
        let joined = tokio::task::spawn_blocking(move || {
            let _held = (turn, permit);
            work(deadline)
        })
        .await
        .map_err(|_| {
            ServiceError::Internal(StoreError::Invalid("table protection panicked".into()))
        })?;
        joined.map_err(|e| match e {
            QueryError::Unprovable if waited => ServiceError::Busy(
                "the table could not be proven safe in the time left after waiting for a research worker; retry",
            ),
            e => ServiceError::from(ResearchError::Query(e)),
        })
    }
}

impl From<ResearchError> for ServiceError {
    fn from(err: ResearchError) -> Self {
        match err {
            ResearchError::Store(e) => ServiceError::Internal(e),
            ResearchError::Query(QueryError::TooFine) => {
                let mut v = FieldViolations::new();
                v.push("group_by", QueryError::TooFine.to_string());
                ServiceError::Invalid(v)
            }
            ResearchError::Query(e @ QueryError::Unprovable) => {
                ServiceError::Precondition(e.to_string())
            }
            ResearchError::Query(QueryError::Invalid(msg)) => {
                ServiceError::Internal(StoreError::Invalid(msg))
            }
        }
    }
}

/// The registry's disclosure rules, as the store keeps them (checked there on write).
fn rules_of(registry: &Registry) -> Result<Rules, ServiceError> {
    let level = |v: i64| u64::try_from(v).unwrap_or(0);
    Rules::new(
        level(registry.min_cell_count),
        level(registry.protection_level),
    )
    .map_err(|e| ServiceError::Internal(StoreError::Invalid(e.to_string())))
}

/// The day (UTC) by which every record a scan just counted was stored: read after the
/// scan, so that a record committed after the question's `as_of` (across midnight) is
/// covered too; the future-date rule needs it (`aggregate::needs_a_future_date`).
fn after_the_scan(services: &Services) -> chrono::NaiveDate {
    services.clock.now().date_naive()
}

/// Takes one question from the principal's research allowance.
fn take_question(services: &Services, principal: &Principal) -> Result<(), ServiceError> {
    services
        .research_limiter
        .check(principal.id)
        .inspect_err(|_| {
            metrics::counter!("ern_rate_limited_total", "limit" => "research_queries").increment(1);
        })?;
    Ok(())
}

/// A researcher's access to one registry of their ERNs, one question taken from their
/// allowance. Only [`open`] makes one.
#[derive(Debug, Clone)]
pub struct ResearchAccess {
    principal: Principal,
    registry: Registry,
}

impl ResearchAccess {
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

/// Requires the researcher role, takes one question from the allowance, and requires a
/// registry of the researcher's.
pub async fn open(
    services: &Services,
    principal: &Principal,
    registry_code: &str,
    call: &mut Call,
) -> Result<ResearchAccess, ServiceError> {
    principal.require_role(Role::Researcher)?;
    take_question(services, principal)?;
    let registry = services
        .registry_for(call, principal, registry_code, "registry")
        .await?;
    Ok(ResearchAccess {
        principal: principal.clone(),
        registry,
    })
}

/// A protected count table, as of `as_of`.
pub struct Counted {
    pub table: CountTable,
    /// Grouped by gene: the unit is patient-gene pairs, not patients.
    pub by_gene: bool,
    pub as_of: DateTime<Utc>,
}

/// What a question asks along the code releases in force.
#[derive(Debug, Clone, Default)]
pub struct Along {
    /// The DIAGNOSIS filter's Orphacodes stand for themselves and all their subtypes
    /// (the Orphanet classification of the release in force).
    pub diagnosis_subtypes: bool,
    /// Only patients with one of these HPO terms (or, with `phenotype_descendants`, a
    /// term below one of them in the HPO release in force).
    pub phenotypes: Vec<HpoTerm>,
    pub phenotype_descendants: bool,
}

/// Expands the question's filters along the releases in force (`catalog`): the
/// DIAGNOSIS filter's codes with their subtypes, the phenotypes with their descendants.
/// FAILED_PRECONDITION when the release it needs is not in force (or gives no
/// hierarchy). A code the release does not know expands to itself only (it matches what
/// is stored under it, nothing else). Suppression works on the table as always: the
/// expansion only decides which patients are counted.
fn expand(
    catalog: &CodeCatalog,
    mut filters: Vec<Filter>,
    along: &Along,
) -> Result<(Vec<Filter>, Option<PhenotypeFilter>), ServiceError> {
    if along.diagnosis_subtypes
        && let Some(f) = filters
            .iter_mut()
            .find(|f| f.dimension == Dimension::Diagnosis)
    {
        let mut values: Vec<Key> = Vec::new();
        for value in &f.values {
            let codes = match value {
                Key::Int(n) => catalog
                    .expand(CodeSystem::Orphanet, &format!("ORPHA:{n}"), true)
                    .ok_or_else(|| {
                        ServiceError::Precondition(
                            "no Orphanet release with its classifications is in force, so \
                             Orphacodes cannot stand for their subtypes: ask without \
                             include_descendants"
                                .into(),
                        )
                    })?,
                _ => Vec::new(),
            };
            let numbers = codes
                .iter()
                .filter_map(|c| c.strip_prefix("ORPHA:")?.parse::<i64>().ok());
            for key in std::iter::once(value.clone()).chain(numbers.map(Key::Int)) {
                if !values.contains(&key) {
                    values.push(key);
                }
            }
        }
        f.values = values;
    }
    let phenotypes = if along.phenotypes.is_empty() {
        None
    } else {
        let roots: Vec<String> = along.phenotypes.iter().map(|t| t.to_string()).collect();
        if along.phenotype_descendants {
            let Some(release) = catalog.release(CodeSystem::Hpo) else {
                return Err(ServiceError::Precondition(
                    "no HPO release is in force, so a term cannot stand for its \
                     descendants: ask without include_descendants"
                        .into(),
                ));
            };
            // Each term asked for stands for itself (what is stored under it, also when the
            // release does not know it), for the term the release stores it as (an
            // alternative id, an obsolete term's replacement), and for the terms below.
            let mut roots = roots;
            for root in roots.clone() {
                if let crate::domain::Lookup::Replaced { by, .. } = release.lookup(&root, true) {
                    roots.push(by);
                }
            }
            let mut terms: Vec<String> = roots.clone();
            for root in &roots {
                for t in release.descendants(root) {
                    terms.push(t.to_owned());
                }
            }
            terms.sort();
            terms.dedup();
            Some(PhenotypeFilter {
                roots,
                descendants_in: Some(release.info.id),
                terms,
            })
        } else {
            // Each term also for the term a release in force stores it as (an alternative
            // id, an obsolete term's replacement): submissions store that one.
            let mut roots = roots;
            if let Some(release) = catalog.release(CodeSystem::Hpo) {
                for root in roots.clone() {
                    if let crate::domain::Lookup::Replaced { by, .. } = release.lookup(&root, true)
                    {
                        roots.push(by);
                    }
                }
            }
            roots.sort();
            roots.dedup();
            Some(PhenotypeFilter {
                terms: roots.clone(),
                roots,
                descendants_in: None,
            })
        }
    };
    Ok((filters, phenotypes))
}

/// Counts consented patients grouped by `group_by`, filtered; protected.
pub async fn count_patients(
    services: &Services,
    access: &ResearchAccess,
    group_by: Vec<Dimension>,
    filters: Vec<Filter>,
    along: &Along,
    call: &mut Call,
) -> Result<Counted, ServiceError> {
    let (filters, phenotypes) = expand(&services.codes.get(), filters, along)?;
    // The principal's earlier questions are answered first; this one is counted after.
    let turn = services.protection.turn(access.principal.id).await?;
    let selection = Selection {
        registry_id: access.registry.id,
        group_by,
        filters,
        phenotypes,
        now: services.clock.now(),
    };
    let rules = rules_of(&access.registry)?;
    let builder = match &services.research_index {
        Some(index) => {
            let sel = selection.clone();
            index.query(move |i| i.count(&sel)).await?
        }
        None => {
            let mut builder = TableBuilder::new();
            services
                .store
                .count_patients(&selection, &mut builder)
                .await?;
            builder
        }
    };
    let group_by = selection.group_by.clone();
    let known = Known::from_filters(&selection.filters).asked_on(after_the_scan(services));
    // Grouped by gene, a table of fewer than k patients publishes no count (the pair rule
    // of `aggregate::suppress`): it lists no row or column, as every such table.
    let table = services
        .protection
        .run(turn, move |deadline| {
            builder.finish(&group_by, &known, rules, deadline)
        })
        .await?;
    call.items(table.protected.cells.len());
    info!(
        principal = access.principal.id,
        registry = %access.registry.code,
        dimensions = selection.group_by.len(),
        filters = selection.filters.len() + usize::from(selection.phenotypes.is_some()),
        cells = table.protected.cells.len(),
        suppressed = table.suppressed(),
        "research count"
    );
    Ok(Counted {
        table,
        by_gene: selection.group_by.contains(&Dimension::Gene),
        as_of: selection.now,
    })
}

/// Diagnostic delay per group, protected; quantiles only for fully published groups.
pub async fn diagnostic_delay(
    services: &Services,
    access: &ResearchAccess,
    group_by: Vec<Dimension>,
    filters: Vec<Filter>,
    along: &Along,
    call: &mut Call,
) -> Result<(DelayTable, DateTime<Utc>), ServiceError> {
    let (filters, phenotypes) = expand(&services.codes.get(), filters, along)?;
    // The principal's earlier questions are answered first; this one is counted after.
    let turn = services.protection.turn(access.principal.id).await?;
    let selection = Selection {
        registry_id: access.registry.id,
        group_by,
        filters,
        phenotypes,
        now: services.clock.now(),
    };
    let rules = rules_of(&access.registry)?;
    let (dimensions, filters) = (
        selection.group_by.len(),
        selection.filters.len() + usize::from(selection.phenotypes.is_some()),
    );
    let builder = match &services.research_index {
        Some(index) => {
            let sel = selection.clone();
            index.query(move |i| i.diagnostic_delay(&sel)).await?
        }
        None => services.store.diagnostic_delay(&selection).await?,
    };
    let known = Known::from_filters(&selection.filters).asked_on(after_the_scan(services));
    let table = services
        .protection
        .run(turn, move |deadline| {
            builder.finish(&known, rules, deadline)
        })
        .await?;
    call.items(table.groups.len());
    info!(
        principal = access.principal.id,
        registry = %access.registry.code,
        dimensions,
        filters,
        groups = table.groups.len(),
        cells = table.groups.len() * crate::aggregate::DELAY_BANDS.len(),
        suppressed = table.suppressed,
        "research diagnostic delay"
    );
    Ok((table, selection.now))
}

/// A physician's or researcher's access to "where is the expertise", one question taken
/// from their allowance. Only [`open_expertise`] makes one.
pub struct ExpertiseAccess {
    principal: Principal,
}

/// Requires a physician or a researcher, and takes one question from the allowance.
pub fn open_expertise(
    services: &Services,
    principal: &Principal,
) -> Result<ExpertiseAccess, ServiceError> {
    require_expertise_role(principal)?;
    take_question(services, principal)?;
    Ok(ExpertiseAccess {
        principal: principal.clone(),
    })
}

/// Requires a physician or a researcher, taking nothing from the allowance (the web
/// console's form, before a question is asked).
pub fn require_expertise_role(principal: &Principal) -> Result<(), ServiceError> {
    if !matches!(principal.role, Role::Physician | Role::Researcher) {
        return Err(AuthError::WrongRole {
            needed: "physician or researcher",
        }
        .into());
    }
    Ok(())
}

/// Requires the researcher role, taking nothing from the allowance (the web console's
/// form, before a question is asked).
pub fn require_researcher(principal: &Principal) -> Result<(), ServiceError> {
    Ok(principal.require_role(Role::Researcher)?)
}

/// The registries the principal of `access` may search for expertise: a researcher's own; for a
/// physician every registry (finding where expertise is, for a referral, is their use of
/// it); restricted to `asked` when given (a malformed code is a violation of
/// `registries[i]`, one no registry has NOT_FOUND, one not allowed PERMISSION_DENIED).
pub async fn expertise_registries(
    services: &Services,
    access: &ExpertiseAccess,
    asked: &[String],
    v: &mut FieldViolations,
) -> Result<Vec<Registry>, ServiceError> {
    let principal = &access.principal;
    let all = services.store.list_registries().await?;
    // A code no registry has is NOT_FOUND before membership is looked at, as for every
    // other call that names a registry (`docs/security.md`).
    for code in asked {
        if let Ok(code) = RegistryCode::parse(code)
            && !all.iter().any(|r| r.code == code.as_str())
        {
            return Err(ServiceError::NotFound(super::NO_SUCH_REGISTRY.into()));
        }
    }
    let allowed: Vec<Registry> = match principal.role {
        Role::Physician => all,
        Role::Researcher => all
            .into_iter()
            .filter(|r| principal.registries.contains(&r.id))
            .collect(),
        _ => {
            return Err(AuthError::WrongRole {
                needed: "physician or researcher",
            }
            .into());
        }
    };
    if asked.is_empty() {
        return Ok(allowed);
    }
    let mut chosen = Vec::new();
    for (i, code) in asked.iter().enumerate() {
        let Ok(code) = RegistryCode::parse(code) else {
            v.push(format!("registries[{i}]"), "is not a registry code");
            continue;
        };
        match allowed.iter().find(|r| r.code == code.as_str()) {
            Some(r) => chosen.push(r.clone()),
            None => {
                return Err(AuthError::ForeignRegistry {
                    registry: code.as_str().into(),
                }
                .into());
            }
        }
    }
    Ok(chosen)
}

/// A centre with expertise, its number of cases shown only as a volume band.
#[derive(Debug, Clone)]
pub struct ExpertiseCentre {
    pub centre_code: String,
    pub centre_name: String,
    pub country: String,
    pub registry: String,
    pub volume: aggregate::VolumeBand,
}

/// The centres with consented cases of `orphacodes` in `registries` (optionally in
/// `countries`): largest band first, within a band by centre code, never by the exact
/// count.
pub async fn find_expertise(
    services: &Services,
    access: &ExpertiseAccess,
    orphacodes: &[i64],
    countries: &[String],
    registries: &[Registry],
    call: &mut Call,
) -> Result<(Vec<ExpertiseCentre>, DateTime<Utc>), ServiceError> {
    // The bounds every caller gets, whatever reads its question (gRPC checks them field
    // by field first; the console's form comes here as it is).
    let mut v = FieldViolations::new();
    if orphacodes.is_empty() || orphacodes.len() > crate::aggregate::MAX_EXPERTISE_CODES {
        v.push(
            "orphacodes",
            format!(
                "give 1 to {} Orphacodes",
                crate::aggregate::MAX_EXPERTISE_CODES
            ),
        );
    }
    if orphacodes.contains(&i64::from(crate::domain::ORPHA_UNDIAGNOSED)) {
        v.push(
            "orphacodes",
            "ORPHA:616874 is the code of undiagnosed cases, not a diagnosis",
        );
    }
    v.into_result()?;
    let now = services.clock.now();
    let ids: Vec<i64> = registries.iter().map(|r| r.id).collect();
    // Each code is counted on its own and given its band; a centre's volume over several
    // codes is the sum of those bands (the sum of their lower bounds to the sum of their
    // upper bounds). So an answer is a function of the one-code answers: the band of a
    // union of codes, asked for with overlapping sets ({A, B}, {A, C}, {B, C}), would pin
    // a code's count below k (docs/privacy.md, "Where is the expertise").
    let mut codes = orphacodes.to_vec();
    codes.sort_unstable();
    codes.dedup();
    // Counted per centre, registry and code, in one scan (or one statement).
    let rows: Vec<ExpertiseRow> = match &services.research_index {
        Some(index) => {
            let (codes, countries) = (codes.clone(), countries.to_vec());
            let at = now.timestamp_millis();
            index
                .query(move |i| Ok(i.expertise(&codes, &ids, &countries, at)))
                .await?
        }
        None => {
            services
                .store
                .expertise(&codes, &ids, countries, now)
                .await?
        }
    };
    let mut by_centre: BTreeMap<(String, i64), ExpertiseCentre> = BTreeMap::new();
    for row in rows {
        let Some(registry) = registries.iter().find(|r| r.id == row.registry_id) else {
            continue;
        };
        let band = aggregate::volume_band(
            row.cases,
            registry.min_cell_count as u64,
            registry.protection_level as u64,
        );
        by_centre
            .entry((row.centre_code.clone(), row.registry_id))
            .and_modify(|c| {
                c.volume.min += band.min;
                c.volume.max = c.volume.max.zip(band.max).map(|(a, b)| a + b);
            })
            .or_insert(ExpertiseCentre {
                volume: band,
                centre_code: row.centre_code,
                centre_name: row.centre_name,
                country: row.country,
                registry: registry.code.clone(),
            });
    }
    let mut centres: Vec<ExpertiseCentre> = by_centre.into_values().collect();
    centres.sort_by(|a, b| {
        b.volume
            .min
            .cmp(&a.volume.min)
            .then_with(|| a.centre_code.cmp(&b.centre_code))
            .then_with(|| a.registry.cmp(&b.registry))
    });
    call.items(centres.len());
    info!(
        principal = access.principal.id,
        role = access.principal.role.as_str(),
        registries = registries.len(),
        codes = orphacodes.len(),
        centres = centres.len(),
        "research expertise"
    );
    Ok((centres, now))
}

/// The preferred label of each code among `labels` (published group values of
/// `dimension`: "ORPHA:558", "CFTR"), from the release in force; codes it does not name
/// are left out.
pub fn names(
    services: &Services,
    dimension: Dimension,
    labels: &[String],
) -> Vec<(String, String)> {
    let system = match dimension {
        Dimension::Diagnosis => CodeSystem::Orphanet,
        Dimension::Gene => CodeSystem::Hgnc,
        _ => return Vec::new(),
    };
    let catalog = services.codes.get();
    let mut out: Vec<(String, String)> = Vec::new();
    for label in labels {
        if out.iter().any(|(c, _)| c == label) {
            continue;
        }
        if let Some(name) = catalog.label(system, label) {
            out.push((label.clone(), name.to_owned()));
        }
    }
    out
}

/// Why `code` is not a code of the release in force of `system` at all (neither a code,
/// current or obsolete, nor another name of one): "HP:0001251 is not a code of HPO
/// 2025-01-16; near matches: …". `None` when the release holds it, or when no release
/// of `system` is in force (then nothing can be said). The web console refuses such
/// filter values; the API counts them as codes nothing is stored under.
pub fn not_in_release(catalog: &CodeCatalog, system: CodeSystem, code: &str) -> Option<String> {
    let release = catalog.release(system)?;
    if release.knows(code) {
        return None;
    }
    match release.lookup(code, false) {
        Lookup::Rejected(why) => Some(format!("{code} {why}")),
        _ => None,
    }
}

/// Current Orphacodes whose preferred name starts with `prefix` (case-insensitive), with
/// their names, at most `limit`: FAILED_PRECONDITION without an Orphanet release in force.
pub fn diseases_named(
    services: &Services,
    prefix: &str,
    limit: usize,
) -> Result<Vec<(String, String)>, ServiceError> {
    let catalog = services.codes.get();
    let release = catalog.release(CodeSystem::Orphanet).ok_or_else(|| {
        ServiceError::Precondition(
            "no Orphanet release is in force: search by Orphacode instead of by name".into(),
        )
    })?;
    Ok(release
        .search_labels(prefix, limit)
        .into_iter()
        .map(|(c, l)| (c.to_owned(), l.to_owned()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A phenotype filter's term stands for itself (known to the release or not), for the
    /// term the release stores it as (an alternative id), and with descendants for the
    /// terms below that one: with and without descendants alike.
    #[test]
    fn a_phenotype_filter_follows_an_alternative_id_and_keeps_unknown_terms() {
        use crate::domain::{AliasKind, Release, ReleaseInfo};
        let mut hpo = Release::new(ReleaseInfo {
            id: 7,
            system: CodeSystem::Hpo,
            version: "test".into(),
            released_on: None,
            imported_at: DateTime::UNIX_EPOCH,
            source: String::new(),
            terms: 0,
            in_force: true,
        });
        hpo.add_term("HP:0001250".into(), "Seizure".into(), false, None);
        hpo.add_term("HP:0002069".into(), "Tonic-clonic".into(), false, None);
        hpo.add_parent("HP:0002069".into(), "HP:0001250".into());
        hpo.add_alias("HP:0001262".into(), "HP:0001250".into(), AliasKind::AltId);
        let catalog = CodeCatalog::new(vec![hpo]);
        let terms = |asked: &str, descendants: bool| {
            let along = Along {
                diagnosis_subtypes: false,
                phenotypes: vec![HpoTerm::parse(asked).unwrap()],
                phenotype_descendants: descendants,
            };
            let (_, filter) = expand(&catalog, Vec::new(), &along).unwrap();
            filter.unwrap().terms
        };
        assert_eq!(terms("HP:0001262", false), ["HP:0001250", "HP:0001262"]);
        assert_eq!(
            terms("HP:0001262", true),
            ["HP:0001250", "HP:0001262", "HP:0002069"]
        );
        assert_eq!(terms("HP:9999999", false), ["HP:9999999"]);
        assert_eq!(terms("HP:9999999", true), ["HP:9999999"]);
    }

    /// A one-way table with small cells, so protection has work to do.
    fn builder() -> TableBuilder {
        let mut b = TableBuilder::new();
        for (i, n) in [1u64, 2, 30, 3, 40].into_iter().enumerate() {
            b.add(vec![Key::Int(i as i64)], n).unwrap();
        }
        b
    }

    #[tokio::test]
    async fn a_table_not_proven_in_time_is_refused_not_published() {
        let pool = ProtectionPool::new(1, Duration::ZERO);
        let rules = Rules::new(5, 1).unwrap();
        let b = builder();
        let err = pool
            .run(pool.turn(1).await.unwrap(), move |deadline| {
                b.finish(&[Dimension::Sex], &Known::nothing(), rules, deadline)
            })
            .await
            .unwrap_err();
        assert_eq!(err.outcome(), crate::outcome::Outcome::FailedPrecondition);
        let message = err.to_string();
        assert!(message.contains("coarser") || message.contains("fewer"));
    }

    #[tokio::test]
    async fn protection_runs_within_its_budget_off_the_runtime() {
        let pool = ProtectionPool::new(1, Duration::from_secs(5));
        let rules = Rules::new(5, 1).unwrap();
        let b = builder();
        let table = pool
            .run(pool.turn(1).await.unwrap(), move |deadline| {
                b.finish(&[Dimension::Sex], &Known::nothing(), rules, deadline)
            })
            .await
            .unwrap();
        assert_eq!(table.protected.cells[0], None);
        assert_eq!(table.protected.grand_total, Some(76));
    }

    /// The work runs on a thread of its own: while it blocks, a task of the same
    /// (single-threaded) runtime still runs. Run inline, it would wait for that task for
    /// ever (here: until its 5 s timeout, and fail).
    #[tokio::test(flavor = "current_thread")]
    async fn protection_work_does_not_block_the_runtime() {
        let pool = ProtectionPool::new(1, Duration::from_secs(10));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let other_task = tokio::spawn(async move {
            tokio::task::yield_now().await;
            tx.send(()).unwrap();
        });
        let got = pool
            .run(pool.turn(1).await.unwrap(), move |_deadline| {
                rx.recv_timeout(Duration::from_secs(5))
                    .map_err(|_| QueryError::Invalid("the runtime was blocked".into()))
            })
            .await;
        assert!(got.is_ok(), "{got:?}");
        other_task.await.unwrap();
    }

    /// Principal 1's protection running `work` on a worker: returns once it has started.
    async fn busy_worker(
        pool: &Arc<ProtectionPool>,
        work: impl FnOnce() + Send + 'static,
    ) -> tokio::task::JoinHandle<Result<(), ServiceError>> {
        let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
        let pool = Arc::clone(pool);
        let busy = tokio::spawn(async move {
            let turn = pool.turn(1).await.unwrap();
            pool.run(turn, move |_| {
                let _ = started_tx.send(());
                work();
                Ok(())
            })
            .await
        });
        started.await.unwrap();
        busy
    }

    /// At most `workers` tables are protected at once; a query that finds them all busy
    /// until its deadline is refused as UNAVAILABLE (retry later), never queued past it.
    #[tokio::test]
    async fn a_query_finding_every_worker_busy_is_unavailable_at_its_deadline() {
        let pool = Arc::new(ProtectionPool::new(1, Duration::from_millis(300)));
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let busy = busy_worker(&pool, move || {
            let _ = wait.recv_timeout(Duration::from_secs(10));
        })
        .await;
        let turn = pool.turn(2).await.unwrap();
        let refused = pool.run(turn, |_| Ok(())).await.unwrap_err();
        assert!(matches!(refused, ServiceError::Busy(_)), "{refused:?}");
        assert_eq!(refused.outcome(), crate::outcome::Outcome::Unavailable);
        release.send(()).unwrap();
        busy.await.unwrap().unwrap();
        // The worker is free again.
        pool.run(pool.turn(2).await.unwrap(), |_| Ok(()))
            .await
            .unwrap();
    }

    /// One principal's tables are protected one at a time: however many of its heavy
    /// questions are in flight, they hold one worker, and another principal's question
    /// gets the other at once; its own next one waits for its turn, and is refused at its
    /// deadline if the first is still running.
    #[tokio::test]
    async fn one_principals_questions_hold_one_worker_however_many_it_asks() {
        let pool = Arc::new(ProtectionPool::new(2, Duration::from_millis(300)));
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let wait = Arc::new(std::sync::Mutex::new(wait));
        let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel::<()>();
        let heavy: Vec<_> = (0..3)
            .map(|_| {
                let (pool, wait, started_tx) =
                    (Arc::clone(&pool), Arc::clone(&wait), started_tx.clone());
                tokio::spawn(async move {
                    let turn = pool.turn(1).await?;
                    pool.run(turn, move |_| {
                        let _ = started_tx.send(());
                        let _ = wait.lock().unwrap().recv_timeout(Duration::from_secs(10));
                        Ok(())
                    })
                    .await
                })
            })
            .collect();
        started.recv().await.unwrap();
        // Principal 2 is not kept waiting by principal 1's other two questions.
        pool.run(pool.turn(2).await.unwrap(), |_| Ok(()))
            .await
            .unwrap();
        // Principal 1's others wait for their turn, past their budget.
        tokio::time::sleep(Duration::from_millis(400)).await;
        release.send(()).unwrap();
        let mut outcomes: Vec<bool> = Vec::new();
        for task in heavy {
            outcomes.push(task.await.unwrap().is_ok());
        }
        outcomes.sort();
        assert_eq!(
            outcomes,
            [false, false, true],
            "one ran, two timed out waiting"
        );
        assert!(started.try_recv().is_err(), "only one of principal 1's ran");
    }

    /// A table not proven safe after a long wait for a worker may be provable alone: the
    /// caller is told to retry (UNAVAILABLE), not to ask a coarser question.
    #[tokio::test]
    async fn a_table_not_proven_after_waiting_for_a_worker_is_busy_not_too_fine() {
        let pool = Arc::new(ProtectionPool::new(1, Duration::from_millis(400)));
        let busy = busy_worker(&pool, || std::thread::sleep(Duration::from_millis(200))).await;
        let turn = pool.turn(2).await.unwrap();
        let err = pool
            .run(turn, |_| Err::<(), _>(QueryError::Unprovable))
            .await
            .unwrap_err();
        assert!(matches!(err, ServiceError::Busy(_)), "{err:?}");
        busy.await.unwrap().unwrap();
        // Without the wait, the same failure asks for a coarser question.
        let turn = pool.turn(2).await.unwrap();
        let err = pool
            .run(turn, |_| Err::<(), _>(QueryError::Unprovable))
            .await
            .unwrap_err();
        assert_eq!(err.outcome(), crate::outcome::Outcome::FailedPrecondition);
    }
}
