//! The consent read model: the one SQL form of the consent rule, for every statement that
//! reads clinical data or counts patients, and for the writer's table of decisions in force.
//!
//! The rule itself is [`crate::consent`] (pure Rust, the source of truth): the decision in
//! force for a scope at an instant is the one with the latest `given_at` at or before it
//! (ties: the one recorded last, i.e. the larger event id), and the scope is *active* when
//! that decision is granted and has no expiry or one after the instant (an expiry at the
//! instant itself has passed). Reads cannot load a history and call that code: the check
//! must sit in the statement that returns the rows, so that no withdrawal can commit between
//! "is consent in force?" and "read the row". So the store states the rule in SQL, here and
//! only here, built from two pieces: the order in which decisions supersede each other
//! (`Order`) and what makes a decision active (`active`, `unexpired`). Three tables
//! hold consent, and each has its predicate:
//!
//! - `consent_events`, the history: [`active_in_history`] (case reads, at any instant);
//! - `consent_current`, the decision in force per scope, which [`record_current`] keeps in
//!   the transaction of every append to the history: [`active_current`] (expertise);
//! - `patients.eligible` / `eligible_until`, the research eligibility the writer derives
//!   with [`crate::consent::research_eligibility`]: [`research_eligible`] (research counts).
//!
//! The last two hold the *latest* decision on file, which is the one in force at any
//! instant not before its `given_at`; they answer for "now" only. That is enough because
//! nothing on file is dated after the clock that recorded it (a date given ahead of the
//! clock is recorded as "now", a withdrawal at the latest date on file if that is later),
//! so only clock skew between instances can date a decision after another instance's
//! "now", and then for that skew only. Instants are kept to the millisecond; a query's
//! bound instant is rounded down to it (`db`), and so agrees with the Rust rule for any
//! instant, to the nanosecond, against times stored in whole milliseconds.
//!
//! `tests/api/consent_model.rs` pins every predicate here to `crate::consent` on random
//! consent histories, on SQLite and on PostgreSQL. Migration `0003_research` backfilled
//! `consent_current` and `patients` with the same rule written out by hand (migrations are
//! frozen); `tests/api/research.rs` checks that backfill against what the writer keeps.

use super::db::{self, Db};

use super::Result;
use crate::consent::{ConsentDecision, Decision, Scope};

/// The order in which the decisions of one scope supersede each other: by the date given,
/// then by the order of recording (the event id). Over a row of `consent_events` (id
/// column `id`) or of `consent_current` (`event_id`).
struct Order {
    given_at: String,
    id: String,
}

impl Order {
    /// A row of `consent_events` under `alias`.
    fn event(alias: &str) -> Order {
        Order {
            given_at: format!("{alias}.given_at"),
            id: format!("{alias}.id"),
        }
    }

    /// A row of `consent_current` under `alias`.
    fn current(alias: &str) -> Order {
        Order {
            given_at: format!("{alias}.given_at"),
            id: format!("{alias}.event_id"),
        }
    }

    /// SQL: this decision supersedes `other` (given later, or at the same instant and
    /// recorded later).
    fn supersedes(&self, other: &Order) -> String {
        let (g, i, og, oi) = (&self.given_at, &self.id, &other.given_at, &other.id);
        format!("({g} > {og} OR ({g} = {og} AND {i} > {oi}))")
    }

    /// SQL: `ORDER BY` the latest decision first.
    fn latest_first(&self) -> String {
        format!("ORDER BY {} DESC, {} DESC", self.given_at, self.id)
    }
}

/// SQL: an expiry (a column that may be NULL) has not passed at `now`: there is none, or it
/// lies after `now`.
fn unexpired(expires_at: &str, now: &str) -> String {
    format!("({expires_at} IS NULL OR {expires_at} > {now})")
}

/// SQL: the decision in the row `alias` (a `consent_events` or `consent_current` row) makes
/// its scope active at `now`: granted and not expired.
fn active(alias: &str, now: &str) -> String {
    format!(
        "({alias}.state = '{granted}' AND {unexpired})",
        granted = Decision::Granted.as_str(),
        unexpired = unexpired(&format!("{alias}.expires_at"), now),
    )
}

/// SQL condition, from the history: `scope` is active at `now` (a parameter such as `$4`)
/// for the patient `alias.patient` (the patient number, migration 0019);
/// `consent::is_active` in SQL.
/// Never NULL, so it may be negated.
pub fn active_in_history(alias: &str, scope: Scope, now: &str) -> String {
    let x = Order::event("x");
    format!(
        "COALESCE((SELECT CASE WHEN {active} THEN 1 ELSE 0 END \
                   FROM consent_events x \
                   WHERE x.patient = {alias}.patient AND x.scope = '{scope}' AND x.given_at <= {now} \
                   {latest_first} LIMIT 1), 0) = 1",
        active = active("x", now),
        scope = scope.as_str(),
        latest_first = x.latest_first(),
    )
}

/// SQL condition, from `consent_current`: `scope` is active at `now` for the patient
/// `alias.patient`. Equals [`active_in_history`] for any `now` not
/// before the latest `given_at` of the scope on file (see the module documentation).
pub fn active_current(alias: &str, scope: Scope, now: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM consent_current k \
                 WHERE k.patient = {alias}.patient AND k.scope = '{scope}' AND {active})",
        scope = scope.as_str(),
        active = active("k", now),
    )
}

/// SQL condition: the patient of the research row `alias` (a `patients` row) may be counted
/// at `now`: REGISTRY_INCLUSION and RESEARCH_USE granted (`eligible`, kept by the writer
/// from `consent::research_eligibility`) and the earlier of their expiries not passed.
pub fn research_eligible(alias: &str, now: &str) -> String {
    format!(
        "({alias}.eligible AND {unexpired})",
        unexpired = unexpired(&format!("{alias}.eligible_until"), now),
    )
}

/// Keeps `consent_current` in step with a decision just appended to the history as
/// `event_id`: it becomes the scope's row unless the row on file supersedes it. Runs in the
/// writer's transaction, with the append.
pub(in crate::store) async fn record_current(
    conn: &mut Db<'_>,
    patient: i64,
    registry_id: i64,
    pseudonym: &str,
    event_id: i64,
    decision: &ConsentDecision,
) -> Result<()> {
    let sql = format!(
        "INSERT INTO consent_current (patient, registry_id, pseudonym, scope, event_id, state, \
                                      given_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) {}",
        current_unless_superseded(),
    );
    db::query(&sql)
        .bind(patient)
        .bind(registry_id)
        .bind(pseudonym)
        .bind(decision.scope.as_str())
        .bind(event_id)
        .bind(decision.decision.as_str())
        .bind(decision.given_at)
        .bind(decision.expires_at)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The `ON CONFLICT` clause of an insert into `consent_current`: a patient's row of a
/// scope takes the new decision unless the one it holds supersedes it.
fn current_unless_superseded() -> String {
    format!(
        "ON CONFLICT (patient, scope) DO UPDATE \
         SET event_id = excluded.event_id, state = excluded.state, given_at = excluded.given_at, \
             expires_at = excluded.expires_at \
         WHERE {}",
        Order::current("excluded").supersedes(&Order::current("consent_current")),
    )
}

/// [`record_current_many`] as a part of a PostgreSQL data-modifying `WITH`, for the
/// events the part named `events` inserted (its `RETURNING` gives `id, patient,
/// registry_id, pseudonym, scope, state, given_at, expires_at`): the history and the
/// current decisions in one round trip (`cases::append_consent_many`; issue 14).
pub(in crate::store) fn current_of_inserted(events: &str) -> String {
    format!(
        "INSERT INTO consent_current (patient, registry_id, pseudonym, scope, event_id, state, \
                                      given_at, expires_at) \
         SELECT patient, registry_id, pseudonym, scope, id, state, given_at, expires_at \
         FROM {events} {}",
        current_unless_superseded(),
    )
}

/// [`record_current`] for many decisions just appended, in one multi-row upsert: each is
/// (patient number, registry id, pseudonym, event id, decision). No two may share
/// (patient, scope): one statement may not update a row twice.
pub(in crate::store) async fn record_current_many(
    conn: &mut Db<'_>,
    decisions: &[(i64, i64, &str, i64, &ConsentDecision)],
) -> Result<()> {
    if decisions.is_empty() {
        return Ok(());
    }
    use db::Ty::{Int, Text, Time};
    const ROWS: db::Rows = db::Rows::of(&[Int, Int, Text, Text, Int, Text, Time, Time]);
    let sql = format!(
        "INSERT INTO consent_current (patient, registry_id, pseudonym, scope, event_id, state, \
                                      given_at, expires_at) \
         {} {}",
        ROWS.sql(conn, decisions.len()),
        current_unless_superseded(),
    );
    let mut query = db::query(&sql).persistent(ROWS.keeps(conn, decisions.len()));
    for (patient, registry_id, pseudonym, event_id, decision) in decisions {
        query = query
            .bind(*patient)
            .bind(*registry_id)
            .bind(*pseudonym)
            .bind(decision.scope.as_str())
            .bind(*event_id)
            .bind(decision.decision.as_str())
            .bind(decision.given_at)
            .bind(decision.expires_at);
    }
    query.rows(conn, &ROWS)?.execute(&mut *conn).await?;
    Ok(())
}
