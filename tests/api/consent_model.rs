//! The consent read model (`store::consent_model`) pinned to the rule (`ern_registry::consent`).
//!
//! Random consent histories are stored the way the writer stores them (`append_consent`:
//! the history and `consent_current`, one event at a time in the order generated, which
//! is not the order of the dates given; then the research row's eligibility), and every
//! SQL predicate of the read model is evaluated at many instants: exactly at each date
//! given and each expiry, a millisecond and a nanosecond either side, and random ones.
//! Each answer must be what `consent::is_active` / `consent::in_force` say:
//!
//! - over `consent_events` (`active_in_history`), and through `cases::get_case`: at every
//!   instant;
//! - over `consent_current` (`active_current`, also through `Store::expertise`), the
//!   event it holds, and over the research row (`research_eligible`): at every instant
//!   not before the latest date given of the scopes involved (what they are kept for:
//!   "now", after everything on file).
//!
//! Runs on SQLite, and on PostgreSQL with `ERN_TEST_DATABASE_URL` (`scripts/test`).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Duration, Utc};
use ern_registry::auth::Role;
use ern_registry::consent::{self, ConsentDecision, ConsentEvent, Decision, Scope, Source};
use ern_registry::service::consent::RegistryConsentRules;
use ern_registry::store::cases::{self, CaseRow, Representative};
use ern_registry::store::db;
use ern_registry::store::writer::ConsentRules;
use ern_registry::store::{Store, consent_model, writer_sql};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use tempfile::TempDir;

use crate::helpers::fresh_database;

const REGISTRY: &str = "ERN-LUNG";
const CENTRE: &str = "CM-CENTRE";

/// A fresh database with the migrations applied, a centre and a physician.
struct Model {
    store: Store,
    registry_id: i64,
    centre_id: i64,
    principal_id: i64,
    /// Numbers each stored history: its pseudonym and its (unique) diagnosis.
    next: AtomicU64,
    _dir: TempDir,
}

/// A history on file for one patient.
struct Stored {
    pseudonym: String,
    orphacode: i64,
    /// As `cases::load_consent` returns it: `seq` is the event id.
    events: Vec<ConsentEvent>,
}

/// What the SQL read model answers for a patient at an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Answers {
    /// `active_in_history` per scope, in `Scope::ALL` order.
    history: [bool; 3],
    /// `active_current` per scope.
    current: [bool; 3],
    /// The event `consent_current` holds per scope.
    current_event: [Option<i64>; 3],
    /// `research_eligible` over the research row.
    eligible: bool,
    /// `cases::get_case` finds the case.
    case_read: bool,
    /// `Store::expertise` counts the case.
    expertise: bool,
}

impl Model {
    async fn open() -> Model {
        let dir = tempfile::tempdir().unwrap();
        let url = fresh_database(&dir).await;
        let store = Store::connect(&url, 2).await.unwrap();
        store.migrate().await.unwrap();
        let registry_id = store.registry_by_code(REGISTRY).await.unwrap().unwrap().id;
        let centre_id = store
            .create_centre(CENTRE, "Consent model hospital", "NL", &[REGISTRY.into()])
            .await
            .unwrap();
        let principal_id = store
            .create_principal("cm-physician", Role::Physician, Some(CENTRE), &[])
            .await
            .unwrap();
        Model {
            store,
            registry_id,
            centre_id,
            principal_id,
            next: AtomicU64::new(1),
            _dir: dir,
        }
    }

    /// Stores `decisions` for a new patient with one case, as the writer does, in one
    /// transaction: the case represents the patient in research counts, each decision is
    /// appended in the order given (history and `consent_current`), then the research
    /// row's eligibility is refreshed from what is on file.
    async fn store(&self, decisions: &[ConsentDecision]) -> Stored {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let pseudonym = format!("R014-V001-CM{n:08}");
        let orphacode = 9_000_000 + n as i64;
        let row = CaseRow {
            birth_year_month: "2001-04".into(),
            sex: "female".into(),
            status: "alive".into(),
            onset_kind: "unknown".into(),
            orphacode: Some(orphacode),
            ..CaseRow::default()
        };
        let recorded = DateTime::from_timestamp_millis(1_750_000_000_000).unwrap();
        let mut tx = self.store.pool().begin().await.unwrap();
        let case_id = writer_sql::insert_case(
            &mut tx.db(),
            self.registry_id,
            &pseudonym,
            self.centre_id,
            self.principal_id,
            &row,
            recorded,
        )
        .await
        .unwrap();
        writer_sql::set_representative(
            &mut tx.db(),
            self.registry_id,
            &pseudonym,
            Representative {
                case_id,
                version: 1,
                centre_id: self.centre_id,
                row: &row,
                eligible: false,
                eligible_until: None,
            },
        )
        .await
        .unwrap();
        let mut events = Vec::with_capacity(decisions.len());
        for d in decisions {
            let id = writer_sql::append_consent(
                &mut tx.db(),
                self.registry_id,
                &pseudonym,
                d,
                self.principal_id,
                Source::ConsentOfficer,
                recorded,
            )
            .await
            .unwrap();
            events.push(ConsentEvent {
                seq: id,
                scope: d.scope,
                decision: d.decision,
                given_at: d.given_at,
                expires_at: d.expires_at,
            });
        }
        // As the writer refreshes it after consent events: the rules' eligibility from the
        // latest date given on.
        let (eligible, until) = match events.iter().map(|e| e.given_at).max() {
            Some(latest) => RegistryConsentRules.research_eligibility(&events, latest),
            None => (false, None),
        };
        writer_sql::set_eligibility(&mut tx.db(), self.registry_id, &pseudonym, eligible, until)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let mut conn = self.store.pool().acquire().await.unwrap();
        let loaded = cases::load_consent(&mut conn.db(), self.registry_id, &pseudonym)
            .await
            .unwrap();
        assert_eq!(loaded, events, "the history reads back as written");
        Stored {
            pseudonym,
            orphacode,
            events,
        }
    }

    async fn answers(&self, p: &Stored, now: DateTime<Utc>) -> Answers {
        let flag =
            |condition: String| format!("CAST(CASE WHEN {condition} THEN 1 ELSE 0 END AS BIGINT)");
        let mut columns = Vec::new();
        for scope in Scope::ALL {
            columns.push(flag(consent_model::active_in_history("p", scope, "$3")));
        }
        for scope in Scope::ALL {
            columns.push(flag(consent_model::active_current("p", scope, "$3")));
        }
        for scope in Scope::ALL {
            columns.push(format!(
                "(SELECT k.event_id FROM consent_current k WHERE k.registry_id = p.registry_id \
                   AND k.pseudonym = p.pseudonym AND k.scope = '{}')",
                scope.as_str()
            ));
        }
        columns.push(flag(consent_model::research_eligible("p", "$3")));
        let sql = format!(
            "SELECT {} FROM patients p WHERE p.registry_id = $1 AND p.pseudonym = $2",
            columns.join(", ")
        );
        let mut conn = self.store.pool().acquire().await.unwrap();
        let row = db::query(&sql)
            .bind(self.registry_id)
            .bind(p.pseudonym.as_str())
            .bind(now)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        let at = |i: usize| row.try_get::<i64>(i).unwrap() == 1;
        let case_read = cases::get_case(
            &mut conn.db(),
            self.registry_id,
            &p.pseudonym,
            self.centre_id,
            now,
            false,
        )
        .await
        .unwrap()
        .is_some();
        let expertise = self
            .store
            .expertise(&[p.orphacode], &[self.registry_id], &[], now)
            .await
            .unwrap();
        assert!(expertise.len() <= 1 && expertise.iter().all(|r| r.cases == 1));
        Answers {
            history: [at(0), at(1), at(2)],
            current: [at(3), at(4), at(5)],
            current_event: [
                row.try_get(6).unwrap(),
                row.try_get(7).unwrap(),
                row.try_get(8).unwrap(),
            ],
            eligible: at(9),
            case_read,
            expertise: !expertise.is_empty(),
        }
    }

    /// Compares every answer of the SQL with the rule at `now`.
    async fn agrees(&self, p: &Stored, now: DateTime<Utc>) -> Result<Answers, TestCaseError> {
        let sql = self.answers(p, now).await;
        let events = &p.events;
        let active = |scope| consent::is_active(events, scope, now);
        // `consent_current` and the research row hold the latest decision on file: the one
        // in force at any instant not before its date given.
        let settled = |scopes: &[Scope]| {
            events
                .iter()
                .filter(|e| scopes.contains(&e.scope))
                .all(|e| e.given_at <= now)
        };
        let context = || {
            format!(
                "at {now:?} ({} ms), events {events:#?}",
                now.timestamp_millis()
            )
        };
        for (i, scope) in Scope::ALL.into_iter().enumerate() {
            prop_assert_eq!(
                sql.history[i],
                active(scope),
                "consent_events, {:?}, {}",
                scope,
                context()
            );
            let latest = consent::in_force(events, scope, DateTime::<Utc>::MAX_UTC);
            prop_assert_eq!(
                sql.current_event[i],
                latest.map(|e| e.seq),
                "the event consent_current holds, {:?}, {}",
                scope,
                context()
            );
            if settled(&[scope]) {
                prop_assert_eq!(
                    sql.current[i],
                    active(scope),
                    "consent_current, {:?}, {}",
                    scope,
                    context()
                );
            }
        }
        prop_assert_eq!(
            sql.case_read,
            active(Scope::RegistryInclusion),
            "get_case, {}",
            context()
        );
        if settled(&[Scope::RegistryInclusion, Scope::ResearchUse]) {
            // A research grant dated before the latest withdrawal or refusal of inclusion
            // counts for nothing after it (docs/consent.md, "Erasure").
            let left = events
                .iter()
                .filter(|e| {
                    e.scope == Scope::RegistryInclusion
                        && matches!(
                            e.decision,
                            consent::Decision::Withdrawn | consent::Decision::Refused
                        )
                        && e.given_at <= now
                })
                .map(|e| e.given_at)
                .max();
            let fresh = consent::in_force(events, Scope::ResearchUse, now)
                .is_some_and(|e| left.is_none_or(|w| e.given_at >= w));
            let counted = active(Scope::RegistryInclusion) && active(Scope::ResearchUse) && fresh;
            prop_assert_eq!(sql.eligible, counted, "research row, {}", context());
            prop_assert_eq!(sql.expertise, counted, "expertise, {}", context());
        }
        Ok(sql)
    }

    /// Stores `decisions` and compares at `extra` instants and around every date on file.
    async fn check(
        &self,
        decisions: &[ConsentDecision],
        extra: &[DateTime<Utc>],
    ) -> Result<(), TestCaseError> {
        let p = self.store(decisions).await;
        let mut instants: BTreeSet<DateTime<Utc>> = extra.iter().copied().collect();
        let dates = decisions
            .iter()
            .flat_map(|d| std::iter::once(d.given_at).chain(d.expires_at));
        for date in dates {
            for ns in [-1_000_000, -1, 0, 1, 1_000_000] {
                instants.insert(date + Duration::nanoseconds(ns));
            }
        }
        for now in instants {
            self.agrees(&p, now).await?;
        }
        Ok(())
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn at_ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap()
}

fn decision(
    scope: Scope,
    decision: Decision,
    given_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
) -> ConsentDecision {
    ConsentDecision {
        scope,
        decision,
        given_at,
        form_version: "CM-1".into(),
        expires_at,
    }
}

/// A random history and random instants: dates on a coarse grid of seconds (so that dates
/// given, expiries and instants often coincide) with a few milliseconds of jitter, after
/// 1970 or before it (negative milliseconds); expiries before, at or after the date given.
fn histories() -> impl Strategy<Value = (Vec<ConsentDecision>, Vec<DateTime<Utc>>)> {
    let base = prop_oneof![Just(1_700_000_000_000i64), Just(-2_000_000_000_000i64)];
    let scope = prop_oneof![
        3 => Just(Scope::RegistryInclusion),
        3 => Just(Scope::ResearchUse),
        1 => Just(Scope::Recontact),
    ];
    let state = prop_oneof![
        3 => Just(Decision::Granted),
        1 => Just(Decision::Refused),
        1 => Just(Decision::Withdrawn),
    ];
    let date = (0i64..8, prop_oneof![3 => Just(0i64), 1 => 1i64..3]);
    let event = (
        scope,
        state,
        date.clone(),
        proptest::option::weighted(0.6, date),
    );
    let instant = (-2_000i64..10_000, 0i64..1_000_000);
    base.prop_flat_map(move |base| {
        let ms = move |(s, jitter): (i64, i64)| at_ms(base + s * 1_000 + jitter);
        (
            proptest::collection::vec(event.clone(), 0..=8).prop_map(move |events| {
                events
                    .into_iter()
                    .map(|(scope, state, given, expires)| {
                        decision(scope, state, ms(given), expires.map(ms))
                    })
                    .collect::<Vec<_>>()
            }),
            proptest::collection::vec(instant.clone(), 0..4).prop_map(move |instants| {
                instants
                    .into_iter()
                    .map(|(offset_ms, ns)| at_ms(base + offset_ms) + Duration::nanoseconds(ns))
                    .collect::<Vec<_>>()
            }),
        )
    })
}

#[test]
fn sql_consent_model_agrees_with_the_rules_on_random_histories() {
    let rt = runtime();
    let model = rt.block_on(Model::open());
    let mut runner = TestRunner::new(Config {
        cases: 96,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&histories(), |(decisions, instants)| {
        rt.block_on(model.check(&decisions, &instants))
    });
    if let Err(err) = result {
        panic!("{err}");
    }
}

#[test]
fn an_expiry_at_the_instant_has_passed_and_a_date_given_at_it_is_in_force() {
    let rt = runtime();
    let model = rt.block_on(Model::open());
    let t = |s: i64| at_ms(1_700_000_000_000 + s * 1_000);
    let history = [
        decision(
            Scope::RegistryInclusion,
            Decision::Granted,
            t(0),
            Some(t(10)),
        ),
        decision(Scope::ResearchUse, Decision::Granted, t(5), None),
    ];
    rt.block_on(async {
        let p = model.store(&history).await;
        let at_expiry = model.agrees(&p, t(10)).await.unwrap();
        assert!(
            !at_expiry.history[0] && !at_expiry.current[0],
            "{at_expiry:?}"
        );
        assert!(!at_expiry.case_read && !at_expiry.eligible && !at_expiry.expertise);
        let before_expiry = model
            .agrees(&p, t(10) - Duration::nanoseconds(1))
            .await
            .unwrap();
        assert!(before_expiry.case_read && before_expiry.eligible && before_expiry.expertise);
        let at_given = model.agrees(&p, t(5)).await.unwrap();
        assert!(at_given.history[1] && at_given.current[1] && at_given.eligible);
        let before_given = model
            .agrees(&p, t(5) - Duration::nanoseconds(1))
            .await
            .unwrap();
        assert!(!before_given.history[1] && before_given.case_read);
    });
}

#[test]
fn a_grant_recorded_after_a_withdrawal_but_given_before_it_stays_superseded() {
    let rt = runtime();
    let model = rt.block_on(Model::open());
    let t = |s: i64| at_ms(1_700_000_000_000 + s * 1_000);
    // Recorded in this order: a withdrawal, then an old form (given before it), then a
    // refusal and a grant given at the same instant (the one recorded last wins).
    let history = [
        decision(Scope::RegistryInclusion, Decision::Granted, t(0), None),
        decision(Scope::ResearchUse, Decision::Granted, t(0), None),
        decision(Scope::RegistryInclusion, Decision::Withdrawn, t(5), None),
        decision(Scope::RegistryInclusion, Decision::Granted, t(3), None),
        decision(Scope::ResearchUse, Decision::Refused, t(4), None),
        decision(Scope::ResearchUse, Decision::Granted, t(4), None),
    ];
    rt.block_on(async {
        let p = model.store(&history).await;
        let now = model.agrees(&p, t(6)).await.unwrap();
        assert!(
            !now.case_read && !now.current[0] && now.current[1],
            "{now:?}"
        );
        assert_eq!(now.current_event[0], Some(p.events[2].seq));
        assert_eq!(now.current_event[1], Some(p.events[5].seq));
        let before = model.agrees(&p, t(4)).await.unwrap();
        assert!(before.case_read && before.history[1], "{before:?}");
    });
}
