//! Consent: consent officers record, read and withdraw consent, and look up erasure
//! receipts.
//!
//! Writes go through the writer (partitioned by patient), so a withdrawal is serialised
//! with every submission about the same patient, and the erasure commits in the same
//! transaction as the withdrawal. Nothing here returns clinical data, and nothing names
//! who recorded a decision or erased a record (nor the form label they typed) to anyone
//! but the recorder and the recorder's centre ([`recorder_visible_to`]): that name tells
//! which centre treats the patient.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use ring::rand::SecureRandom;
use tokio::sync::watch;

use super::{Call, ServiceError, Services};
use crate::auth::{Principal, Role};
use crate::consent::{self, ConsentDecision, ConsentEvent, Decision, InclusionRefused, Scope};
use crate::pseudonym::{PatientIdentity, Pseudonym};
use crate::store::Registry;
use crate::store::consent::{self as consent_store, ConsentRecord, Erasure, WithdrawalReason};
use crate::store::console::{ExpiringPage, ExpiryCursor};
use crate::store::writer::{Command, ConsentRules, Output, RecordConsent, Withdraw};

/// The registry's consent rules as the writer applies them in its transaction
/// (`store::writer::ConsentRules`): the rules of `crate::consent`, at the instant
/// [`effective_at`] gives.
#[derive(Debug, Default, Clone, Copy)]
pub struct RegistryConsentRules;

impl ConsentRules for RegistryConsentRules {
    fn effective_at(&self, history: &[ConsentEvent], now: DateTime<Utc>) -> DateTime<Utc> {
        effective_at(history, now)
    }

    fn may_store_case(
        &self,
        history: &[ConsentEvent],
        at: DateTime<Utc>,
    ) -> Result<(), InclusionRefused> {
        consent::check_inclusion(history, at)
    }

    fn ends_inclusion(
        &self,
        before: &[ConsentEvent],
        after: &[ConsentEvent],
        at: DateTime<Utc>,
    ) -> bool {
        let inclusion = Scope::RegistryInclusion;
        if consent::is_active(after, inclusion, at) {
            return false;
        }
        // In force before and not after; or a refusal recorded now, also over an inclusion
        // that had expired already (its record is hidden, not erased: only a withdrawal
        // erases, and a refusal must not leave the record on file).
        let decided = |events| consent::in_force(events, inclusion, at).map(|e| e.seq);
        consent::is_active(before, inclusion, at)
            || consent::in_force(after, inclusion, at)
                .is_some_and(|e| e.decision == Decision::Refused && Some(e.seq) != decided(before))
    }

    fn research_eligibility(
        &self,
        history: &[ConsentEvent],
        at: DateTime<Utc>,
    ) -> (bool, Option<DateTime<Utc>>) {
        consent::research_eligibility(history, at)
    }
}

/// The instant at which a command applies the consent rules: its own time, or the latest
/// date given on file when that is later.
///
/// A command's time is taken when its request arrives, on its instance's clock, before it
/// queues and waits for the patient's lock. By the time it reads the history, another
/// instance (or a command that arrived later and overtook it here) may have committed a
/// decision dated after it, typically a withdrawal. That decision is on file, so it
/// precedes this command's write and must be in force for it; at the command's own time
/// it would not be yet, and a submission would be stored after the erasure. Nothing on
/// file is dated ahead of the clock that recorded it (a date given up to 5 minutes ahead
/// is recorded as "now"), so this moves the instant only by that delay and by the clock
/// skew between instances.
pub fn effective_at(events: &[ConsentEvent], now: DateTime<Utc>) -> DateTime<Utc> {
    events.iter().map(|e| e.given_at).fold(now, DateTime::max)
}

/// A consent officer's access to one registry. Only [`open`] makes one.
#[derive(Debug, Clone)]
pub struct ConsentAccess {
    principal: Principal,
    registry: Registry,
}

impl ConsentAccess {
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

/// Requires the consent-officer role (again: deny by default) and a registry of the
/// officer's.
pub async fn open(
    services: &Services,
    principal: &Principal,
    registry_code: &str,
    field: &str,
    call: &mut Call,
) -> Result<ConsentAccess, ServiceError> {
    principal.require_role(Role::ConsentOfficer)?;
    let registry = services
        .registry_for(call, principal, registry_code, field)
        .await?;
    Ok(ConsentAccess {
        principal: principal.clone(),
        registry,
    })
}

/// Requires the consent-officer role, for calls that name no registry (a receipt
/// lookup: the receipt names it).
pub fn require_officer(principal: &Principal) -> Result<(), ServiceError> {
    Ok(principal.require_role(Role::ConsentOfficer)?)
}

/// The pseudonym of a patient named by identifiers: derived (rate limited and counted
/// per officer, like a physician's). The identity is dropped here.
pub async fn resolve(
    services: &Services,
    access: &ConsentAccess,
    identity: PatientIdentity,
) -> Result<Pseudonym, ServiceError> {
    services
        .derive_pseudonym(&access.principal, &access.registry, &identity)
        .await
}

/// Now, by the services' clock, at the millisecond precision the store keeps.
pub fn now_millis(services: &Services) -> DateTime<Utc> {
    let now = services.clock.now();
    DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now)
}

/// A decision on file as the viewer may see it: to anyone but the recorder's centre,
/// without the recorder's name or the form label.
#[derive(Debug, Clone)]
pub struct EventView {
    pub id: i64,
    pub scope: Scope,
    pub decision: Decision,
    pub given_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub recorded_at: DateTime<Utc>,
    /// Empty unless the viewer may see it.
    pub recorded_by: String,
    /// Empty unless the viewer may see it.
    pub form_version: String,
    pub source: String,
}

/// The decision in force for one scope at an instant, if any.
#[derive(Debug, Clone)]
pub struct ScopeStatus {
    pub scope: Scope,
    pub in_force: Option<InForce>,
}

#[derive(Debug, Clone)]
pub struct InForce {
    pub decision: Decision,
    /// Granted and not expired at the instant.
    pub active: bool,
    pub given_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// A patient's consent as an officer sees it.
#[derive(Debug, Clone)]
pub struct ConsentView {
    pub pseudonym: Pseudonym,
    /// The instant `in_force` is evaluated at.
    pub at: DateTime<Utc>,
    pub in_force: Vec<ScopeStatus>,
    /// The whole history (GetConsent) or the decisions just recorded (RecordConsent).
    pub events: Vec<EventView>,
}

/// What a withdrawal did.
#[derive(Debug, Clone)]
pub struct Withdrawn {
    pub view: ConsentView,
    /// When REGISTRY_INCLUSION was withdrawn: the erasure, after its purge.
    pub receipt: Option<Receipt>,
}

/// An erasure receipt as the viewer may see it.
#[derive(Debug, Clone)]
pub struct Receipt {
    pub receipt_id: String,
    pub registry: String,
    pub pseudonym: String,
    pub erased_at: DateTime<Utc>,
    /// Empty unless the viewer may see it.
    pub erased_by: String,
    pub reason: WithdrawalReason,
    pub cases_erased: i64,
    pub versions_erased: i64,
}

/// Whether `viewer` may see who recorded a decision (or erased a record): the recorder
/// themself, and principals of the recorder's centre. A recorder's name (and the form
/// label their centre typed, which often names the hospital) tells which centre treats
/// the patient; an officer of another centre, or of the ERN, acts on the patient's
/// consent without needing that.
pub fn recorder_visible_to(
    viewer: &Principal,
    recorder_id: i64,
    recorder_centre: Option<i64>,
) -> bool {
    viewer.id == recorder_id
        || viewer
            .centre
            .as_ref()
            .is_some_and(|c| recorder_centre == Some(c.id))
}

fn event_view(e: &ConsentRecord, viewer: &Principal) -> EventView {
    let shown = recorder_visible_to(viewer, e.recorder_id, e.recorder_centre);
    EventView {
        id: e.id,
        scope: e.scope,
        decision: e.decision,
        given_at: e.given_at,
        expires_at: e.expires_at,
        recorded_at: e.recorded_at,
        recorded_by: if shown {
            e.recorded_by.clone()
        } else {
            String::new()
        },
        form_version: if shown {
            e.form_version.clone()
        } else {
            String::new()
        },
        source: e.source.clone(),
    }
}

/// The decision in force per scope at `at` (`consent::in_force`, `consent::is_active`).
pub fn status_at(history: &[ConsentRecord], at: DateTime<Utc>) -> Vec<ScopeStatus> {
    let events: Vec<ConsentEvent> = history
        .iter()
        .map(|e| ConsentEvent {
            seq: e.id,
            scope: e.scope,
            decision: e.decision,
            given_at: e.given_at,
            expires_at: e.expires_at,
        })
        .collect();
    Scope::ALL
        .into_iter()
        .map(|scope| ScopeStatus {
            scope,
            in_force: consent::in_force(&events, scope, at).map(|e| InForce {
                decision: e.decision,
                active: consent::is_active(&events, scope, at),
                given_at: e.given_at,
                expires_at: e.expires_at,
            }),
        })
        .collect()
}

async fn history(
    services: &Services,
    registry_id: i64,
    pseudonym: &str,
) -> Result<Vec<ConsentRecord>, ServiceError> {
    let mut conn = services.store.reader().await?;
    Ok(consent_store::history(&mut conn.db(), registry_id, pseudonym).await?)
}

/// The order of a bulk call's entries per patient (RecordConsents): an entry is recorded only
/// once every earlier entry naming the same patient (by identifiers or by pseudonym) has
/// finished; entries of different patients run concurrently. An entry's patient is known
/// only once its pseudonym is derived, so each entry first waits for every earlier one to
/// have derived its own (or failed), which costs one derivation's time, not a write's.
pub struct PatientOrder {
    turns: Vec<watch::Sender<Turn>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Turn {
    /// Not yet known which patient the entry names.
    Pending,
    /// The entry names this (registry, pseudonym) and is being recorded.
    Patient(i64, String),
    /// Finished, or failed before naming a patient.
    Done,
}

impl PatientOrder {
    pub fn new(entries: usize) -> Arc<PatientOrder> {
        Arc::new(PatientOrder {
            turns: (0..entries)
                .map(|_| watch::Sender::new(Turn::Pending))
                .collect(),
        })
    }

    /// Entry `index`'s place: [`record`] waits there for its turn.
    pub fn turn(self: &Arc<Self>, index: usize) -> EntryTurn {
        EntryTurn {
            order: self.clone(),
            index,
        }
    }

    /// Entry `index` names `patient`: waits until every earlier entry naming it is done.
    async fn arrive(&self, index: usize, registry_id: i64, pseudonym: &str) {
        let patient = Turn::Patient(registry_id, pseudonym.to_owned());
        self.turns[index].send_replace(patient.clone());
        for earlier in &self.turns[..index] {
            let mut turn = earlier.subscribe();
            let known = turn
                .wait_for(|t| *t != Turn::Pending)
                .await
                .map(|t| t.clone());
            if known.is_ok_and(|t| t == patient) {
                let _ = turn.wait_for(|t| *t == Turn::Done).await;
            }
        }
    }
}

/// An entry's place in its call's [`PatientOrder`]. Marks its entry done when dropped:
/// finished, failed or stopped at any point.
pub struct EntryTurn {
    order: Arc<PatientOrder>,
    index: usize,
}

impl Drop for EntryTurn {
    fn drop(&mut self) {
        self.order.turns[self.index].send_replace(Turn::Done);
    }
}

/// Records an officer's decisions (granted or refused) for one patient, effective `now`
/// (given at, at the latest, now); answers the decisions recorded and those in force.
/// An entry of a bulk call first waits for its `turn`: every earlier entry of the call
/// naming the same patient is done.
pub async fn record(
    services: &Services,
    access: &ConsentAccess,
    pseudonym: Pseudonym,
    decisions: Vec<ConsentDecision>,
    now: DateTime<Utc>,
    turn: Option<&EntryTurn>,
    call: &mut Call,
) -> Result<ConsentView, ServiceError> {
    if let Some(turn) = turn {
        turn.order
            .arrive(turn.index, access.registry.id, pseudonym.as_str())
            .await;
    }
    let command = Command::RecordConsent(RecordConsent {
        registry_id: access.registry.id,
        pseudonym: pseudonym.as_str().to_owned(),
        principal_id: access.principal.id,
        decisions,
        now,
    });
    let ids = match services.write(command, call).await? {
        Output::Consent(ids) => ids,
        _ => return Err(ServiceError::Unavailable),
    };
    let history = history(services, access.registry.id, pseudonym.as_str()).await?;
    Ok(ConsentView {
        events: history
            .iter()
            .filter(|e| ids.contains(&e.id))
            .map(|e| event_view(e, &access.principal))
            .collect(),
        in_force: status_at(&history, now),
        at: now,
        pseudonym,
    })
}

/// A fresh receipt id: "rcpt-" and 128 random bits in hex.
fn new_receipt_id() -> Result<String, ServiceError> {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| ServiceError::Unavailable)?;
    Ok(format!("rcpt-{}", hex::encode(bytes)))
}

/// Whether `text` has the form of a receipt id as issued.
pub fn is_receipt_id(text: &str) -> bool {
    text.len() == 37
        && text.starts_with("rcpt-")
        && text[5..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// Withdraws consent for `scopes`, effective now. Withdrawing REGISTRY_INCLUSION erases
/// the patient's record in the registry; the receipt is answered after the purge.
pub async fn withdraw(
    services: &Services,
    access: &ConsentAccess,
    pseudonym: Pseudonym,
    scopes: Vec<Scope>,
    reason: WithdrawalReason,
    call: &mut Call,
) -> Result<Withdrawn, ServiceError> {
    let now = now_millis(services);
    let receipt_id = new_receipt_id()?;
    let command = Command::Withdraw(Withdraw {
        registry_id: access.registry.id,
        pseudonym: pseudonym.as_str().to_owned(),
        principal_id: access.principal.id,
        scopes,
        reason,
        receipt_id: receipt_id.clone(),
        now,
    });
    let erased = match services.write(command, call).await? {
        Output::Withdrawn { erased, .. } => erased,
        _ => return Err(ServiceError::Unavailable),
    };
    let history = history(services, access.registry.id, pseudonym.as_str()).await?;
    let receipt = erased.map(|(cases, versions)| Receipt {
        receipt_id,
        registry: access.registry.code.clone(),
        pseudonym: pseudonym.as_str().to_owned(),
        erased_at: now,
        erased_by: access.principal.name.clone(),
        reason,
        cases_erased: cases,
        versions_erased: versions,
    });
    Ok(Withdrawn {
        view: ConsentView {
            in_force: status_at(&history, now),
            at: now,
            events: Vec::new(),
            pseudonym,
        },
        receipt,
    })
}

/// A patient's consent history and the decisions in force at `at`.
pub async fn get(
    services: &Services,
    access: &ConsentAccess,
    pseudonym: Pseudonym,
    at: DateTime<Utc>,
) -> Result<ConsentView, ServiceError> {
    let history = history(services, access.registry.id, pseudonym.as_str()).await?;
    Ok(ConsentView {
        in_force: status_at(&history, at),
        events: history
            .iter()
            .map(|e| event_view(e, &access.principal))
            .collect(),
        at,
        pseudonym,
    })
}

/// An erasure receipt by its id, for an officer of the registry it belongs to (to any
/// other: NOT_FOUND, as if it did not exist).
pub async fn receipt(
    services: &Services,
    principal: &Principal,
    receipt_id: &str,
    call: &mut Call,
) -> Result<Receipt, ServiceError> {
    require_officer(principal)?;
    let mut conn = services.store.reader().await?;
    let not_found =
        || ServiceError::NotFound("no erasure receipt with this id in your registries".into());
    let erasure: Erasure = consent_store::erasure_by_receipt(&mut conn.db(), receipt_id)
        .await?
        .ok_or_else(not_found)?;
    // A receipt of a registry the officer does not serve is not theirs to see.
    if !principal.registries.contains(&erasure.registry_id) {
        return Err(not_found());
    }
    call.registry(&erasure.registry_code);
    call.items(1);
    // Who erased it, as in the consent history: for the eraser's centre only.
    let shown = recorder_visible_to(principal, erasure.eraser_id, erasure.eraser_centre);
    Ok(Receipt {
        receipt_id: erasure.receipt_id,
        registry: erasure.registry_code,
        pseudonym: erasure.pseudonym,
        erased_at: erasure.erased_at,
        erased_by: if shown {
            erasure.erased_by
        } else {
            String::new()
        },
        reason: erasure.reason,
        cases_erased: erasure.cases_erased,
        versions_erased: erasure.versions_erased,
    })
}

/// Consents to follow up: granted decisions in force in the officer's registries that
/// expire within `days` from now, and those that expired in the last
/// [`EXPIRED_DAYS`] days; a page of each ([`EXPIRING_PAGE`] rows, soonest first).
pub struct ExpiringLists {
    pub at: DateTime<Utc>,
    pub soon: ExpiringPage,
    pub expired: ExpiringPage,
}

/// Which expiry list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpiryList {
    /// Expiring within the next days asked for.
    Soon,
    /// Expired in the last [`EXPIRED_DAYS`] days.
    Expired,
}

/// Rows of an expiry list per page.
pub const EXPIRING_PAGE: i64 = 100;

/// How far back the list of expired consents reaches.
pub const EXPIRED_DAYS: i64 = 90;

/// The first page of both expiry lists of an officer's registries (`ExpiringLists`).
pub async fn expiring(
    services: &Services,
    principal: &Principal,
    days: i64,
    call: &mut Call,
) -> Result<ExpiringLists, ServiceError> {
    require_officer(principal)?;
    let at = services.clock.now();
    let soon = expiring_page(services, principal, ExpiryList::Soon, days, at, None).await?;
    let expired = expiring_page(services, principal, ExpiryList::Expired, days, at, None).await?;
    call.items(soon.items.len() + expired.items.len());
    Ok(ExpiringLists { at, soon, expired })
}

/// The page of one expiry list that follows `after` (the last row the officer saw).
pub async fn expiring_next(
    services: &Services,
    principal: &Principal,
    list: ExpiryList,
    days: i64,
    after: &ExpiryCursor,
    call: &mut Call,
) -> Result<(DateTime<Utc>, ExpiringPage), ServiceError> {
    require_officer(principal)?;
    let at = services.clock.now();
    let page = expiring_page(services, principal, list, days, at, Some(after)).await?;
    call.items(page.items.len());
    Ok((at, page))
}

async fn expiring_page(
    services: &Services,
    principal: &Principal,
    list: ExpiryList,
    days: i64,
    at: DateTime<Utc>,
    after: Option<&ExpiryCursor>,
) -> Result<ExpiringPage, ServiceError> {
    let registries: Vec<i64> = principal.registries.iter().copied().collect();
    let (from, to) = match list {
        ExpiryList::Soon => (at, at + chrono::Duration::days(days)),
        ExpiryList::Expired => (at - chrono::Duration::days(EXPIRED_DAYS), at),
    };
    Ok(services
        .store
        .consents_expiring(&registries, from, to, after, EXPIRING_PAGE)
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries of one patient go one after another in the call's order; an entry of
    /// another patient does not wait for them; an entry waits for earlier ones only to
    /// name their patient, and one that fails before naming any lets the others go.
    #[tokio::test]
    async fn a_bulk_calls_entries_of_one_patient_take_turns_in_order() {
        async fn soon<F: std::future::Future>(f: F) -> Option<F::Output> {
            tokio::time::timeout(std::time::Duration::from_millis(200), f)
                .await
                .ok()
        }
        let order = PatientOrder::new(4);
        let turns: Vec<EntryTurn> = (0..4).map(|i| order.turn(i)).collect();
        // Entry 3 (patient A of registry 1) waits while entry 0 has not named its patient.
        let mut last = Box::pin(order.arrive(3, 1, "A"));
        assert!(soon(last.as_mut()).await.is_none(), "entry 0 not yet named");
        // Entry 0 names the same patient: entry 3 waits for it to be done.
        assert!(soon(order.arrive(0, 1, "A")).await.is_some());
        assert!(soon(last.as_mut()).await.is_none(), "entry 0 not done");
        // Entries 1 (patient B) and 2 (the same pseudonym in another registry: another
        // patient) go at once, although entry 0 is not done; entry 3 does not wait for
        // them to be done.
        assert!(soon(order.arrive(1, 1, "B")).await.is_some());
        assert!(soon(order.arrive(2, 2, "A")).await.is_some());
        assert!(
            soon(last.as_mut()).await.is_none(),
            "entry 0 still not done"
        );
        let mut turns = turns.into_iter();
        drop(turns.next());
        assert!(soon(last.as_mut()).await.is_some(), "entry 0 done");
        // An entry that fails before naming its patient lets the later ones go.
        let order = PatientOrder::new(2);
        let (failed, _later) = (order.turn(0), order.turn(1));
        let mut waiting = Box::pin(order.arrive(1, 1, "A"));
        assert!(soon(waiting.as_mut()).await.is_none());
        drop(failed);
        assert!(soon(waiting.as_mut()).await.is_some());
    }

    #[test]
    fn consent_applies_at_the_latest_date_on_file_when_it_is_later() {
        let t = |s: i64| DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap();
        let event = |seq, decision, given_at| ConsentEvent {
            seq,
            scope: Scope::RegistryInclusion,
            decision,
            given_at,
            expires_at: None,
        };
        let granted = event(1, Decision::Granted, t(0));
        // A withdrawal committed by another instance, dated after this command arrived.
        let withdrawn = event(2, Decision::Withdrawn, t(5));
        let events = [granted.clone(), withdrawn];
        assert!(consent::check_inclusion(&events, t(3)).is_ok());
        let at = effective_at(&events, t(3));
        assert_eq!(at, t(5));
        assert!(consent::check_inclusion(&events, at).is_err());
        // Nothing later on file: the command's own time.
        assert_eq!(effective_at(&[granted], t(3)), t(3));
    }
    #[test]
    fn ending_inclusion_is_a_grant_in_force_before_and_not_after_or_a_new_refusal() {
        let t = |s: i64| DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap();
        let event = |seq, decision| ConsentEvent {
            seq,
            scope: Scope::RegistryInclusion,
            decision,
            given_at: t(seq),
            expires_at: None,
        };
        let granted = vec![event(1, Decision::Granted)];
        let refused = vec![event(1, Decision::Granted), event(2, Decision::Refused)];
        let rules = RegistryConsentRules;
        assert!(rules.ends_inclusion(&granted, &refused, t(3)));
        assert!(!rules.ends_inclusion(&granted, &granted, t(3)));
        // A refusal recorded now ends it too, whatever was in force before (the writer
        // refuses it only while the registry holds a record).
        assert!(rules.ends_inclusion(&[], &refused, t(3)));
        // A grant that had expired: the record is hidden, and a refusal over it is one.
        let expired = vec![ConsentEvent {
            expires_at: Some(t(2)),
            ..event(1, Decision::Granted)
        }];
        let expired_then_refused = vec![expired[0].clone(), event(2, Decision::Refused)];
        assert!(rules.ends_inclusion(&expired, &expired_then_refused, t(3)));
        assert!(!rules.ends_inclusion(&expired, &expired, t(3)));
        // A call that adds no inclusion decision (the refusal in force was on file
        // before): nothing ends now.
        assert!(!rules.ends_inclusion(&refused, &refused, t(3)));
        // Another grant over the expired one: not a refusal.
        let regranted = vec![expired[0].clone(), event(2, Decision::Granted)];
        assert!(!rules.ends_inclusion(&expired, &regranted, t(3)));
        // A decision about another scope over the expired inclusion: not a refusal of it.
        let other_scope = vec![
            expired[0].clone(),
            ConsentEvent {
                scope: Scope::ResearchUse,
                ..event(2, Decision::Refused)
            },
        ];
        assert!(!rules.ends_inclusion(&expired, &other_scope, t(3)));
    }
}
