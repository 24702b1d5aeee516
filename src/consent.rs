//! Consent: the rules that decide whether a patient's data may be stored or counted.
//!
//! Consent is kept per (registry, pseudonym) as an append-only history of decisions, one
//! scope each. The decision *in force* for a scope at an instant is the one with the latest
//! `given_at` at or before that instant (ties: the one recorded last). Ordering by when the
//! patient decided, not by when somebody typed it in, is deliberate: a stale attestation of
//! an old grant can never override a newer refusal or withdrawal, which is exactly the
//! "re-consent must be given after the withdrawal" rule of the design brief. An expired
//! grant counts as absent.
//!
//! This module is pure: no I/O, and it is the source of truth. The store states the same
//! rule in SQL once, in `store::consent_model`, for every read path (and keeps the table of
//! decisions in force with it); the property test `tests/api/consent_model.rs` pins that
//! SQL to [`in_force`] and [`is_active`] on random consent histories, on both databases.

use chrono::{DateTime, Datelike, Duration, Utc};

use crate::domain::FieldViolations;
use crate::domain::MIN_YEAR;

/// The latest year an expiry may name; a consent without expiry leaves it unset.
pub const MAX_EXPIRY_YEAR: i32 = 2200;

/// How far in the future a `given_at` may lie before it is rejected (clock skew between
/// the hospital's systems and ours).
pub const CLOCK_SKEW: Duration = Duration::minutes(5);

/// Longest accepted consent-form version label.
pub const MAX_FORM_VERSION_LEN: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    RegistryInclusion,
    ResearchUse,
    Recontact,
}

impl Scope {
    pub const ALL: [Scope; 3] = [
        Scope::RegistryInclusion,
        Scope::ResearchUse,
        Scope::Recontact,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::RegistryInclusion => "registry_inclusion",
            Scope::ResearchUse => "research_use",
            Scope::Recontact => "recontact",
        }
    }

    pub fn parse_db(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|scope| scope.as_str() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Granted,
    Refused,
    Withdrawn,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Granted => "granted",
            Decision::Refused => "refused",
            Decision::Withdrawn => "withdrawn",
        }
    }

    pub fn parse_db(s: &str) -> Option<Decision> {
        [Decision::Granted, Decision::Refused, Decision::Withdrawn]
            .into_iter()
            .find(|d| d.as_str() == s)
    }
}

/// Who put a decision on file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Attested by the treating physician with a submission.
    PhysicianAttestation,
    /// Recorded by a consent officer.
    ConsentOfficer,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::PhysicianAttestation => "physician_attestation",
            Source::ConsentOfficer => "consent_officer",
        }
    }
}

/// One consent decision for one scope, as it arrives (not yet on file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentDecision {
    pub scope: Scope,
    pub decision: Decision,
    pub given_at: DateTime<Utc>,
    pub form_version: String,
    pub expires_at: Option<DateTime<Utc>>,
}

/// A decision on file (or about to be, within the same transaction).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentEvent {
    /// Order of recording; larger is later. Events not yet written use `i64::MAX` and up.
    pub seq: i64,
    pub scope: Scope,
    pub decision: Decision,
    pub given_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// The decision in force for `scope` at `at`, if any.
pub fn in_force(events: &[ConsentEvent], scope: Scope, at: DateTime<Utc>) -> Option<&ConsentEvent> {
    events
        .iter()
        .filter(|e| e.scope == scope && e.given_at <= at)
        .max_by_key(|e| (e.given_at, e.seq))
}

/// Whether `scope` is granted and not expired at `at`.
pub fn is_active(events: &[ConsentEvent], scope: Scope, at: DateTime<Utc>) -> bool {
    in_force(events, scope, at)
        .is_some_and(|e| e.decision == Decision::Granted && e.expires_at.is_none_or(|exp| exp > at))
}

/// Research eligibility from a consent history: whether REGISTRY_INCLUSION and
/// RESEARCH_USE are both granted in the decisions in force at `at`, the research grant
/// dated at or after the latest REGISTRY_INCLUSION decision that was not a grant (a
/// withdrawal or a refusal), and until when (the earlier of their expiries; `None`: no
/// expiry). Expiry is left to the query, which compares it with its own time.
pub fn research_eligibility(
    events: &[ConsentEvent],
    at: DateTime<Utc>,
) -> (bool, Option<DateTime<Utc>>) {
    let mut until: Option<DateTime<Utc>> = None;
    // The latest time the patient left the registry or declined it (a REGISTRY_INCLUSION
    // decision withdrawn or refused): a research grant dated before it, whenever it was
    // recorded, was signed for a stay in the registry that has ended, or that the patient
    // then declined, and does not carry over into a later inclusion.
    let left = events
        .iter()
        .filter(|e| {
            e.scope == Scope::RegistryInclusion
                && e.decision != Decision::Granted
                && e.given_at <= at
        })
        .map(|e| e.given_at)
        .max();
    for scope in [Scope::RegistryInclusion, Scope::ResearchUse] {
        match in_force(events, scope, at) {
            Some(e)
                if e.decision == Decision::Granted
                    && (scope != Scope::ResearchUse || left.is_none_or(|w| e.given_at >= w)) =>
            {
                if let Some(exp) = e.expires_at {
                    until = Some(until.map_or(exp, |u| u.min(exp)));
                }
            }
            _ => return (false, None),
        }
    }
    (true, until)
}

/// The scopes a withdrawal of `named` at `at` withdraws: those named and, when
/// REGISTRY_INCLUSION is among them, the RESEARCH_USE and RECONTACT grants in force.
/// Leaving the registry ends the patient's other grants too (docs/consent.md, "Erasure").
pub fn withdrawn_scopes(events: &[ConsentEvent], named: &[Scope], at: DateTime<Utc>) -> Vec<Scope> {
    let mut scopes = named.to_vec();
    if scopes.contains(&Scope::RegistryInclusion) {
        for scope in [Scope::ResearchUse, Scope::Recontact] {
            let granted =
                in_force(events, scope, at).is_some_and(|e| e.decision == Decision::Granted);
            if granted && !scopes.contains(&scope) {
                scopes.push(scope);
            }
        }
    }
    scopes
}

/// A record may not be stored: no REGISTRY_INCLUSION consent is in force.
///
/// Deliberately says nothing about *why* (nothing on file, refused, withdrawn, expired):
/// it is said to a physician, who may be of any centre of the ERN and may have sent the
/// identifiers of someone they do not treat. Telling the states apart would let them
/// learn, from one refused submission, that a person was in the registry and left it, or
/// refused it. Consent officers see the state through `ConsentService`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "no REGISTRY_INCLUSION consent in force for this patient in this registry, so nothing was stored: attest the patient's current consent with the request, or have a consent officer record it"
)]
pub struct InclusionRefused;

/// Decides whether a record may be stored: REGISTRY_INCLUSION granted and not expired.
pub fn check_inclusion(events: &[ConsentEvent], at: DateTime<Utc>) -> Result<(), InclusionRefused> {
    if is_active(events, Scope::RegistryInclusion, at) {
        Ok(())
    } else {
        Err(InclusionRefused)
    }
}

/// One attested decision as it arrives, before any check (built by `api::convert` from the
/// wire): the scope and decision if the values name one, the times if present (`Some(None)`:
/// present but not a valid time).
#[derive(Debug, Clone, Copy)]
pub struct AttestationItem<'a> {
    pub scope: Option<Scope>,
    pub decision: Option<Decision>,
    pub given_at: Option<Option<DateTime<Utc>>>,
    pub form_version: &'a str,
    pub expires_at: Option<Option<DateTime<Utc>>>,
}

/// `t` to the millisecond (truncated), the precision instants are stored with.
fn to_millis(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t)
}

/// Checks the consent a physician attests with a submission. Only GRANTED and REFUSED may
/// be attested (withdrawal is the consent officers' business); each scope at most once;
/// `given_at` not in the future; `expires_at` after `given_at`.
pub fn check_attestation(
    items: &[AttestationItem<'_>],
    now: DateTime<Utc>,
) -> Result<Vec<ConsentDecision>, FieldViolations> {
    let mut violations = FieldViolations::new();
    let mut out = Vec::with_capacity(items.len());
    if items.len() > Scope::ALL.len() {
        violations.push("consent", "at most one decision per scope (3)");
        return Err(violations);
    }
    let mut seen = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let path = |f: &str| format!("consent[{i}].{f}");
        let scope = item.scope;
        if scope.is_none() {
            violations.push(
                path("scope"),
                "must be REGISTRY_INCLUSION, RESEARCH_USE or RECONTACT",
            );
        }
        if let Some(s) = scope {
            if seen.contains(&s) {
                violations.push(path("scope"), "each scope may appear only once");
            }
            seen.push(s);
        }
        let decision = match item.decision {
            Some(d @ (Decision::Granted | Decision::Refused)) => Some(d),
            Some(Decision::Withdrawn) => {
                violations.push(
                    path("state"),
                    "must be GRANTED or REFUSED here; a consent officer records withdrawals with ConsentService.WithdrawConsent",
                );
                None
            }
            None => {
                violations.push(path("state"), "must be GRANTED or REFUSED");
                None
            }
        };
        let given_at = match item.given_at {
            None => {
                violations.push(path("given_at"), "is required");
                None
            }
            Some(None) => {
                violations.push(path("given_at"), "is not a valid timestamp");
                None
            }
            Some(Some(t)) if t > now + CLOCK_SKEW => {
                violations.push(path("given_at"), "must not be in the future");
                None
            }
            // The same earliest year as every date of a record.
            Some(Some(t)) if t.year() < MIN_YEAR => {
                violations.push(path("given_at"), format!("must not be before {MIN_YEAR}"));
                None
            }
            // A time slightly ahead of ours (clock skew) is recorded as now, so nothing
            // on file ever lies in the future and a withdrawal made now supersedes it.
            // To the millisecond, as it is stored: decided on what is kept.
            Some(Some(t)) => Some(to_millis(t.min(now))),
        };
        let form_version = item.form_version.trim();
        if form_version.is_empty() {
            violations.push(path("form_version"), "is required");
        } else if form_version.len() > MAX_FORM_VERSION_LEN
            || !form_version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || " -_.:/()".contains(c))
        {
            violations.push(
                path("form_version"),
                "must be at most 64 characters of letters, digits, spaces and -_.:/()",
            );
        }
        let expires_at = match item.expires_at {
            None => None,
            Some(None) => {
                violations.push(path("expires_at"), "is not a valid timestamp");
                None
            }
            Some(Some(t)) => {
                // After the given_at sent, not the one recorded (a time ahead by the
                // clock's skew is recorded as now).
                let sent = item.given_at.flatten();
                if sent.is_some_and(|g| to_millis(t) <= to_millis(g)) {
                    violations.push(path("expires_at"), "must be after given_at");
                } else if t.year() > MAX_EXPIRY_YEAR {
                    violations.push(
                        path("expires_at"),
                        format!(
                            "must not be after {MAX_EXPIRY_YEAR} (leave it unset for no expiry)"
                        ),
                    );
                }
                Some(to_millis(t))
            }
        };
        if let (Some(scope), Some(decision), Some(given_at)) = (scope, decision, given_at) {
            out.push(ConsentDecision {
                scope,
                decision,
                given_at,
                form_version: form_version.to_owned(),
                expires_at,
            });
        }
    }
    violations.into_result().map(|()| out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn research_eligibility_needs_both_scopes_and_ends_at_the_earlier_expiry() {
        let event = |seq, scope, decision, given: i64, expires: Option<i64>| ConsentEvent {
            seq,
            scope,
            decision,
            given_at: t(given),
            expires_at: expires.map(t),
        };
        let inclusion = event(1, Scope::RegistryInclusion, Decision::Granted, 0, Some(50));
        let research = event(2, Scope::ResearchUse, Decision::Granted, 0, Some(40));
        assert_eq!(
            research_eligibility(std::slice::from_ref(&inclusion), t(10)),
            (false, None)
        );
        assert_eq!(
            research_eligibility(&[inclusion.clone(), research.clone()], t(10)),
            (true, Some(t(40)))
        );
        let withdrawn = event(3, Scope::ResearchUse, Decision::Withdrawn, 5, None);
        assert_eq!(
            research_eligibility(&[inclusion, research, withdrawn], t(10)),
            (false, None)
        );
    }

    #[test]
    fn withdrawing_inclusion_withdraws_the_other_grants_in_force() {
        use Decision::{Granted, Refused};
        use Scope::{Recontact as C, RegistryInclusion as I, ResearchUse as R};
        let history = [
            ev(1, I, Granted, 0),
            ev(2, R, Granted, 0),
            ev(3, C, Refused, 0),
        ];
        assert_eq!(withdrawn_scopes(&history, &[I], t(1)), [I, R]);
        assert_eq!(withdrawn_scopes(&history, &[R], t(1)), [R]);
        assert_eq!(withdrawn_scopes(&history, &[I, R], t(1)), [I, R]);
    }

    /// A research grant dated before the patient's latest withdrawal from the registry
    /// does not make them eligible again with a later inclusion, whenever it was recorded;
    /// one dated at or after it does.
    #[test]
    fn a_research_grant_from_before_a_withdrawal_counts_for_nothing_after_it() {
        use Decision::{Granted, Withdrawn};
        use Scope::{RegistryInclusion as I, ResearchUse as R};
        let left_and_back = vec![
            ev(1, I, Granted, 0),
            ev(2, I, Withdrawn, 10),
            ev(3, I, Granted, 20),
            // Recorded after the withdrawal, dated before it.
            ev(4, R, Granted, 5),
        ];
        assert_eq!(research_eligibility(&left_and_back, t(30)), (false, None));
        // Before the withdrawal it counted.
        let before = [ev(1, I, Granted, 0), ev(4, R, Granted, 5)];
        assert_eq!(research_eligibility(&before, t(6)), (true, None));
        let mut renewed = left_and_back.clone();
        renewed.push(ev(5, R, Granted, 20));
        assert_eq!(research_eligibility(&renewed, t(30)), (true, None));
        // Never withdrawn: a grant of any date counts.
        assert_eq!(
            research_eligibility(&[ev(1, I, Granted, 0), ev(2, R, Granted, -5)], t(1)),
            (true, None)
        );
    }

    /// A refusal of inclusion ends a stay in the registry as a withdrawal does: a research
    /// grant dated before it does not carry over into a later inclusion. A refusal before
    /// the research grant leaves it counting.
    #[test]
    fn a_research_grant_from_before_a_refusal_of_inclusion_counts_for_nothing_after_it() {
        use Decision::{Granted, Refused};
        use Scope::{RegistryInclusion as I, ResearchUse as R};
        let declined_and_back = [
            ev(1, I, Granted, 0),
            ev(2, R, Granted, 1),
            ev(3, I, Refused, 10),
            ev(4, I, Granted, 20),
        ];
        assert_eq!(
            research_eligibility(&declined_and_back, t(30)),
            (false, None)
        );
        assert_eq!(research_eligibility(&declined_and_back, t(5)), (true, None));
        let refused_first = [
            ev(1, I, Refused, 0),
            ev(2, R, Granted, 1),
            ev(3, I, Granted, 2),
        ];
        assert_eq!(research_eligibility(&refused_first, t(3)), (true, None));
        // The same day as the refusal counts, as for a withdrawal.
        let same_day = [
            ev(1, I, Refused, 0),
            ev(2, R, Granted, 0),
            ev(3, I, Granted, 0),
        ];
        assert_eq!(research_eligibility(&same_day, t(1)), (true, None));
    }

    fn t(days: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).unwrap() + Duration::days(days)
    }

    fn ev(seq: i64, scope: Scope, decision: Decision, given: i64) -> ConsentEvent {
        ConsentEvent {
            seq,
            scope,
            decision,
            given_at: t(given),
            expires_at: None,
        }
    }

    /// Storage is refused at `at`, with `decision` as the inclusion decision in force
    /// (the refusal itself does not say which).
    fn assert_refused(events: &[ConsentEvent], at: DateTime<Utc>, decision: Option<Decision>) {
        assert_eq!(check_inclusion(events, at), Err(InclusionRefused));
        assert_eq!(
            in_force(events, Scope::RegistryInclusion, at).map(|e| e.decision),
            decision
        );
    }

    #[test]
    fn missing_inclusion_is_refused() {
        let events = [ev(1, Scope::ResearchUse, Decision::Granted, 0)];
        assert_refused(&events, t(1), None);
    }

    #[test]
    fn granted_inclusion_allows_storage() {
        let events = [ev(1, Scope::RegistryInclusion, Decision::Granted, 0)];
        assert_eq!(check_inclusion(&events, t(1)), Ok(()));
    }

    #[test]
    fn refused_inclusion_is_refused() {
        let events = [ev(1, Scope::RegistryInclusion, Decision::Refused, 0)];
        assert_refused(&events, t(1), Some(Decision::Refused));
    }

    #[test]
    fn withdrawal_overrides_earlier_grant() {
        let events = [
            ev(1, Scope::RegistryInclusion, Decision::Granted, 0),
            ev(2, Scope::RegistryInclusion, Decision::Withdrawn, 5),
        ];
        assert_refused(&events, t(6), Some(Decision::Withdrawn));
    }

    #[test]
    fn stale_grant_recorded_after_withdrawal_does_not_reinstate() {
        // Recorded later (seq 3), but given before the withdrawal: the withdrawal stands.
        let events = [
            ev(1, Scope::RegistryInclusion, Decision::Granted, 0),
            ev(2, Scope::RegistryInclusion, Decision::Withdrawn, 5),
            ev(3, Scope::RegistryInclusion, Decision::Granted, 4),
        ];
        assert_refused(&events, t(6), Some(Decision::Withdrawn));
    }

    #[test]
    fn consent_given_after_withdrawal_reinstates() {
        let events = [
            ev(1, Scope::RegistryInclusion, Decision::Granted, 0),
            ev(2, Scope::RegistryInclusion, Decision::Withdrawn, 5),
            ev(3, Scope::RegistryInclusion, Decision::Granted, 7),
        ];
        assert_eq!(check_inclusion(&events, t(8)), Ok(()));
        // ... but not before it was given.
        assert_refused(&events, t(6), Some(Decision::Withdrawn));
    }

    #[test]
    fn expired_grant_counts_as_absent() {
        let mut e = ev(1, Scope::RegistryInclusion, Decision::Granted, 0);
        e.expires_at = Some(t(10));
        let events = [e];
        assert_eq!(check_inclusion(&events, t(9)), Ok(()));
        assert_refused(&events, t(10), Some(Decision::Granted));
        assert!(!is_active(&events, Scope::RegistryInclusion, t(11)));
    }

    #[test]
    fn scopes_are_independent() {
        let events = [
            ev(1, Scope::RegistryInclusion, Decision::Granted, 0),
            ev(2, Scope::ResearchUse, Decision::Refused, 0),
        ];
        assert!(is_active(&events, Scope::RegistryInclusion, t(1)));
        assert!(!is_active(&events, Scope::ResearchUse, t(1)));
        assert!(!is_active(&events, Scope::Recontact, t(1)));
    }

    #[test]
    fn same_instant_ties_go_to_the_later_recording() {
        let events = [
            ev(1, Scope::RegistryInclusion, Decision::Granted, 0),
            ev(2, Scope::RegistryInclusion, Decision::Refused, 0),
        ];
        assert_refused(&events, t(1), Some(Decision::Refused));
    }
}

#[cfg(test)]
mod attestation_tests {
    use super::*;

    fn item(given_at: DateTime<Utc>, expires_at: DateTime<Utc>) -> AttestationItem<'static> {
        AttestationItem {
            scope: Some(Scope::RegistryInclusion),
            decision: Some(Decision::Granted),
            given_at: Some(Some(given_at)),
            form_version: "F-1",
            expires_at: Some(Some(expires_at)),
        }
    }

    /// A given_at ahead of the clock by less than its skew is recorded as now; its expiry
    /// is still compared with the time sent, so no expiry before the signature passes.
    #[test]
    fn an_expiry_is_after_the_given_at_sent_not_the_one_recorded() {
        let now = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let ahead = now + Duration::minutes(4);
        let err = check_attestation(&[item(ahead, now + Duration::minutes(2))], now).unwrap_err();
        assert_eq!(
            err.iter().map(|v| v.field.as_str()).collect::<Vec<_>>(),
            ["consent[0].expires_at"]
        );
        let ok = check_attestation(&[item(ahead, now + Duration::minutes(6))], now).unwrap();
        assert_eq!(ok[0].given_at, now, "recorded as now");
        assert!(
            check_attestation(
                &[item(now + Duration::minutes(6), now + Duration::days(1))],
                now
            )
            .is_err()
        );
    }
}
