//! The console's pages (maud): layout, forms with their errors next to the fields, tables.
//! Markup only; every value shown comes from a service's answer. maud escapes every
//! value; the one raw insertion is the SVG chart the server drew (`chart`).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::{Ctx, Form, PHENOTYPE};
use crate::aggregate::{DELAY_BANDS, DelayTable, Dimension, MAX_COUNT_DIMENSIONS, Quantiles};
use crate::auth::Role;
use crate::consent::{Decision, Scope};
use crate::domain::FieldViolations;
use crate::pseudonym::Pseudonym;
use crate::service::consent::{ConsentView, EXPIRED_DAYS, ExpiringLists, ExpiryList, Receipt};
use crate::service::research::{Counted, ExpertiseCentre};
use crate::store::Registry;
use crate::store::consent::WithdrawalReason;
use crate::store::console::ExpiringPage;

/// Field violations by form field name, shown next to the field.
#[derive(Debug, Default)]
pub struct Errors(BTreeMap<String, Vec<String>>);

impl Errors {
    pub fn from(v: &FieldViolations) -> Errors {
        let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for item in v.iter() {
            map.entry(item.field.clone())
                .or_default()
                .push(item.description.clone());
        }
        Errors(map)
    }

    fn of(&self, field: &str) -> Option<String> {
        self.0.get(field).map(|m| m.join("; "))
    }

    /// Errors of fields the page has no input for.
    fn others(&self, shown: &[&str]) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| !shown.contains(&k.as_str()))
            .map(|(k, v)| format!("{k}: {}", v.join("; ")))
            .collect()
    }
}

fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M UTC").to_string()
}

fn date(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d").to_string()
}

fn scope_label(s: Scope) -> &'static str {
    match s {
        Scope::RegistryInclusion => "REGISTRY_INCLUSION (inclusion in the registry)",
        Scope::ResearchUse => "RESEARCH_USE (counted in research)",
        Scope::Recontact => "RECONTACT (may be contacted for trials)",
    }
}

fn reason_label(r: WithdrawalReason) -> &'static str {
    match r {
        WithdrawalReason::PatientRequest => "the patient's request",
        WithdrawalReason::RepresentativeRequest => "the request of the patient's representative",
        WithdrawalReason::ConsentInvalid => "the consent on file is invalid",
        WithdrawalReason::Other => "another reason",
    }
}

fn decision_label(d: Decision) -> &'static str {
    match d {
        Decision::Granted => "granted",
        Decision::Refused => "refused",
        Decision::Withdrawn => "withdrawn",
    }
}

fn page(title: &str, ctx: Option<&Ctx>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="referrer" content="no-referrer";
                title { (title) " · ERN registry console" }
                link rel="stylesheet" href="/console.css";
            }
            body {
                // The first stop of the Tab key: past the navigation to the page's content.
                a.skip href="#main" { "Skip to the content" }
                header {
                    strong { "ERN registry console" }
                    @if let Some(ctx) = ctx {
                        nav aria-label="Main" {
                            a href="/home" { "Home" }
                            @match ctx.principal.role {
                                Role::ConsentOfficer => {
                                    a href="/officer" { "Find a patient" }
                                    a href="/officer/expiring" { "Expiring consents" }
                                    a href="/officer/receipt" { "Erasure receipts" }
                                }
                                Role::Researcher => {
                                    a href="/research" { "Research tables" }
                                    a href="/expertise" { "Where is the expertise" }
                                }
                                Role::Physician => {
                                    a href="/cases" { "My centre's cases" }
                                    a href="/expertise" { "Where is the expertise" }
                                }
                                Role::Admin => {}
                            }
                        }
                        span.who {
                            (ctx.principal.name) " (" (ctx.principal.role.as_str().replace('_', " ")) ") "
                        }
                        form method="post" action="/sign-out" {
                            input type="hidden" name="csrf" value=(ctx.csrf);
                            button.link type="submit" { "Sign out" }
                        }
                    }
                }
                main id="main" tabindex="-1" {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// A page with a title and one message (errors, not found).
pub fn message(title: &str, text: &str) -> Markup {
    page(
        title,
        None,
        html! { p { (text) } p { a href="/home" { "Back to the console" } } },
    )
}

fn csrf(ctx: &Ctx) -> Markup {
    html! { input type="hidden" name="csrf" value=(ctx.csrf); }
}

/// A labelled text input with its error (if any) next to it. The browser is asked not to
/// keep what is typed (`autocomplete="off"`): these fields take patients' identifiers,
/// pseudonyms and receipt ids, which a shared workstation's form history would offer to
/// the next user.
fn input(label: &str, name: &str, kind: &str, value: &str, errors: &Errors) -> Markup {
    let id = name.replace(['.', '[', ']'], "-");
    let error = errors.of(name);
    let error_id = format!("{id}-error");
    html! {
        label for=(id) { (label) }
        @if let Some(e) = &error {
            input id=(id) type=(kind) name=(name) value=(value) autocomplete="off" aria-invalid="true" aria-describedby=(error_id);
            span.error id=(error_id) { (e) }
        } @else {
            input id=(id) type=(kind) name=(name) value=(value) autocomplete="off";
        }
    }
}

fn select(
    label: &str,
    name: &str,
    options: &[(String, String)],
    chosen: &str,
    errors: &Errors,
) -> Markup {
    select_id(
        &name.replace(['.', '[', ']'], "-"),
        label,
        name,
        options,
        chosen,
        errors,
    )
}

/// [`select`] with an explicit id (a page with several forms of the same field).
fn select_id(
    id: &str,
    label: &str,
    name: &str,
    options: &[(String, String)],
    chosen: &str,
    errors: &Errors,
) -> Markup {
    let error = errors.of(name);
    let error_id = format!("{id}-error");
    html! {
        label for=(id) { (label) }
        select id=(id) name=(name) aria-invalid=[error.as_ref().map(|_| "true")]
            aria-describedby=[error.as_ref().map(|_| error_id.as_str())] {
            @for (value, text) in options {
                option value=(value) selected[value == chosen] { (text) }
            }
        }
        @if let Some(e) = &error { span.error id=(error_id) { (e) } }
    }
}

fn registry_options(registries: &[String]) -> Vec<(String, String)> {
    registries.iter().map(|r| (r.clone(), r.clone())).collect()
}

pub fn sign_in(csrf: &str, error: Option<&str>, name: &str) -> Markup {
    page(
        "Sign in",
        None,
        html! {
            @if let Some(e) = error { p.error role="alert" { (e) } }
            form.stack method="post" action="/sign-in" {
                input type="hidden" name="csrf" value=(csrf);
                label for="name" { "Name" }
                input id="name" name="name" type="text" autocomplete="username" required value=(name);
                label for="password" { "Password" }
                input id="password" name="password" type="password" autocomplete="current-password" required;
                label for="code" { "Code from your authenticator app (6 digits)" }
                input id="code" name="code" type="text" inputmode="numeric" autocomplete="one-time-code" pattern="[0-9 ]{6,7}" required;
                button type="submit" { "Sign in" }
            }
        },
    )
}

pub fn home(ctx: &Ctx) -> Markup {
    page(
        "Welcome",
        Some(ctx),
        html! {
            p { "You are signed in as " strong { (ctx.principal.name) } "." }
            @match ctx.principal.role {
                Role::ConsentOfficer => ul {
                    li { a href="/officer" { "Find a patient" } ": see the consent in force and its history, record a decision, withdraw." }
                    li { a href="/officer/expiring" { "Expiring consents" } ": consents that expire soon or have expired, to follow up." }
                    li { a href="/officer/receipt" { "Erasure receipts" } ": look a receipt up by its id." }
                },
                Role::Researcher => ul {
                    li { a href="/research" { "Research tables" } ": counts and the diagnostic delay, small counts suppressed." }
                    li { a href="/expertise" { "Where is the expertise" } " for a diagnosis." }
                },
                Role::Physician => ul {
                    li { a href="/cases" { "My centre's cases" } ": read a case of your centre by its pseudonym." }
                    li { a href="/expertise" { "Where is the expertise" } " for a diagnosis." }
                },
                Role::Admin => p { "The console has no pages for administrators; use the admin command line." },
            }
        },
    )
}

pub fn officer_find(ctx: &Ctx, registries: &[String], form: &Form, errors: &Errors) -> Markup {
    let regs = registry_options(registries);
    let chosen = form.get("registry");
    let shown = [
        "registry",
        "national.issuing_country",
        "national.value",
        "demographic.given_names",
        "demographic.family_name",
        "demographic.date_of_birth",
        "demographic.sex_at_birth",
        "demographic.place_of_birth",
        "demographic.country_of_birth",
        "pseudonym",
    ];
    let sexes: Vec<(String, String)> = ["", "female", "male", "undetermined", "unknown"]
        .iter()
        .map(|s| {
            (
                s.to_string(),
                if s.is_empty() {
                    "choose".into()
                } else {
                    s.to_string()
                },
            )
        })
        .collect();
    // Identifiers typed are never echoed back into the page.
    html! {
        p { "Identifiers and pseudonyms are sent in the form only: they never appear in an address, a log or your browser history." }
        @for e in errors.others(&shown) { p.error { (e) } }
        form.stack method="post" action="/officer/patient" {
            (csrf(ctx))
            input type="hidden" name="kind" value="national";
            fieldset {
                legend { "By national identifier" }
                (select_id("registry-national", "Registry", "registry", &regs, chosen, errors))
                (input("Issuing country (e.g. NL)", "national.issuing_country", "text", "", errors))
                (input("National identifier (e.g. BSN)", "national.value", "text", "", errors))
                button type="submit" { "Find by national identifier" }
            }
        }
        form.stack method="post" action="/officer/patient" {
            (csrf(ctx))
            input type="hidden" name="kind" value="demographic";
            fieldset {
                legend { "By name, birth date and place" }
                (select_id("registry-demographic", "Registry", "registry", &regs, chosen, &Errors::default()))
                (input("Given names", "demographic.given_names", "text", "", errors))
                (input("Family name", "demographic.family_name", "text", "", errors))
                (input("Date of birth (YYYY-MM-DD)", "demographic.date_of_birth", "text", "", errors))
                (select("Sex at birth", "demographic.sex_at_birth", &sexes, "", errors))
                (input("Place of birth", "demographic.place_of_birth", "text", "", errors))
                (input("Country of birth (e.g. NL)", "demographic.country_of_birth", "text", "", errors))
                button type="submit" { "Find by demographic identifiers" }
            }
        }
        form.stack method="post" action="/officer/patient" {
            (csrf(ctx))
            input type="hidden" name="kind" value="pseudonym";
            fieldset {
                legend { "By pseudonym" }
                (select_id("registry-pseudonym", "Registry", "registry", &regs, chosen, &Errors::default()))
                (input("Pseudonym", "pseudonym", "text", "", errors))
                button type="submit" { "Find by pseudonym" }
            }
        }
    }
    .pipe(|body| page("Find a patient", Some(ctx), body))
}

trait Pipe: Sized {
    fn pipe<T>(self, f: impl FnOnce(Self) -> T) -> T {
        f(self)
    }
}
impl Pipe for Markup {}

fn patient_hidden(ctx: &Ctx, registry: &str, pseudonym: &str) -> Markup {
    html! {
        (csrf(ctx))
        input type="hidden" name="registry" value=(registry);
        input type="hidden" name="pseudonym" value=(pseudonym);
    }
}

pub fn officer_patient(
    ctx: &Ctx,
    registry: &str,
    view: &ConsentView,
    notice: Option<&str>,
    errors: &Errors,
) -> Markup {
    let pseudonym = view.pseudonym.as_str();
    let scopes: Vec<(String, String)> = std::iter::once((String::new(), "choose".to_string()))
        .chain(
            Scope::ALL
                .into_iter()
                .map(|s| (s.as_str().to_string(), scope_label(s).to_string())),
        )
        .collect();
    let decisions = vec![
        (String::new(), "choose".to_string()),
        ("granted".to_string(), "granted".to_string()),
        ("refused".to_string(), "refused".to_string()),
    ];
    let reasons: Vec<(String, String)> = std::iter::once((String::new(), "choose".to_string()))
        .chain(
            [
                WithdrawalReason::PatientRequest,
                WithdrawalReason::RepresentativeRequest,
                WithdrawalReason::ConsentInvalid,
                WithdrawalReason::Other,
            ]
            .into_iter()
            .map(|r| (r.as_str().to_string(), reason_label(r).to_string())),
        )
        .collect();
    let shown = [
        "scope",
        "decision",
        "given_at",
        "form_version",
        "expires_at",
        "scopes",
        "reason",
    ];
    let body = html! {
        @if let Some(n) = notice { p.notice role="status" { (n) } }
        @for e in errors.others(&shown) { p.error { (e) } }
        p { "Registry " strong { (registry) } ", pseudonym " span.pseudonym { (pseudonym) } }
        h2 { "Consent in force (" (time(view.at)) ")" }
        table {
            thead { tr { th scope="col" { "Scope" } th scope="col" { "Decision" } th scope="col" { "In force" } th scope="col" { "Given at" } th scope="col" { "Expires" } } }
            tbody {
                @for s in &view.in_force {
                    tr {
                        td { (s.scope.as_str()) }
                        @match &s.in_force {
                            None => { td { "none on file" } td { "no" } td {} td {} }
                            Some(e) => {
                                td { (decision_label(e.decision)) }
                                td { @if e.active { "yes" } @else { "no" } }
                                td { (date(e.given_at)) }
                                td { @if let Some(x) = e.expires_at { (date(x)) } @else { "never" } }
                            }
                        }
                    }
                }
            }
        }
        h2 { "History" }
        @if view.events.is_empty() {
            p { "No decision on file." }
        } @else {
            table {
                thead { tr { th scope="col" { "#" } th scope="col" { "Scope" } th scope="col" { "Decision" } th scope="col" { "Given at" } th scope="col" { "Expires" } th scope="col" { "Form" } th scope="col" { "Recorded" } th scope="col" { "By" } } }
                tbody {
                    @for e in &view.events {
                        tr {
                            td.num { (e.id) }
                            td { (e.scope.as_str()) }
                            td { (decision_label(e.decision)) }
                            td { (date(e.given_at)) }
                            td { @if let Some(x) = e.expires_at { (date(x)) } }
                            td { (e.form_version) }
                            td { (time(e.recorded_at)) }
                            td { @if e.recorded_by.is_empty() { "(another centre)" } @else { (e.recorded_by) } }
                        }
                    }
                }
            }
        }
        h2 { "Record a decision" }
        form.stack method="post" action="/officer/record" {
            (patient_hidden(ctx, registry, pseudonym))
            (select("Scope", "scope", &scopes, "", errors))
            (select("Decision", "decision", &decisions, "", errors))
            (input("Consent form version", "form_version", "text", "", errors))
            (input("Given at (date)", "given_at", "date", "", errors))
            (input("Expires at (date, optional)", "expires_at", "date", "", errors))
            button type="submit" { "Record the decision" }
        }
        h2 { "Withdraw consent" }
        form.stack method="post" action="/officer/withdraw" {
            (patient_hidden(ctx, registry, pseudonym))
            @let scopes_error = errors.of("scopes");
            fieldset aria-describedby=[scopes_error.as_ref().map(|_| "scopes-error")] {
                legend { "Scopes to withdraw" }
                @if let Some(e) = &scopes_error { p.error id="scopes-error" { (e) } }
                @for s in Scope::ALL {
                    @let id = format!("w-{}", s.as_str());
                    div {
                        input type="checkbox" id=(id) name=(format!("scope.{}", s.as_str())) value="on";
                        " "
                        label for=(id) { (scope_label(s)) }
                    }
                }
            }
            (select("Reason", "reason", &reasons, "", errors))
            button type="submit" { "Withdraw…" }
            p { "You will be asked to confirm, and told exactly what will be erased." }
        }
    };
    page("Patient consent", Some(ctx), body)
}

pub fn confirm_withdrawal(
    ctx: &Ctx,
    registry: &str,
    pseudonym: &Pseudonym,
    scopes: &[Scope],
    reason: WithdrawalReason,
    form: &Form,
) -> Markup {
    let erases = scopes.contains(&Scope::RegistryInclusion);
    let keep = form.hidden_except(|k| k == "confirm");
    let body = html! {
        p { "Patient " span.pseudonym { (pseudonym.as_str()) } " in registry " strong { (registry) } "." }
        p { "You are about to withdraw, because of " (reason_label(reason)) ":" }
        ul { @for s in scopes { li { (scope_label(*s)) } } }
        @if erases {
            div.warning role="alert" {
                p { strong { "This erases the patient's clinical data in " (registry) ", now and for good:" } }
                ul {
                    li { "every case record of this pseudonym in " (registry) ", submitted by any centre, with all of its versions and gene rows;" }
                    li { "the patient is no longer counted in any research result from the moment the withdrawal is committed;" }
                    li { "the patient's research-use and recontact grants in force are withdrawn with it (a later inclusion needs new ones)." }
                }
                p { "Kept: the consent history (append-only, with this withdrawal added) and an erasure tombstone (pseudonym, time, reason, the numbers erased; no clinical data). A later submission needs a consent given after this withdrawal. You get a printable erasure receipt." }
            }
        } @else {
            p.notice { "No clinical data is erased: REGISTRY_INCLUSION is not withdrawn. From now on the withdrawn scopes are no longer in force." }
        }
        form method="post" action="/officer/withdraw" {
            @for (k, v) in &keep { input type="hidden" name=(k) value=(v.as_str()); }
            input type="hidden" name="confirm" value="yes";
            button.danger type="submit" { @if erases { "Withdraw and erase" } @else { "Withdraw" } }
        }
        form method="post" action="/officer/patient" {
            (csrf(ctx))
            input type="hidden" name="kind" value="pseudonym";
            input type="hidden" name="registry" value=(registry);
            input type="hidden" name="pseudonym" value=(pseudonym.as_str());
            button type="submit" { "Cancel" }
        }
    };
    page("Confirm the withdrawal", Some(ctx), body)
}

pub fn receipt(ctx: &Ctx, r: &Receipt, fresh: bool) -> Markup {
    let body = html! {
        @if fresh { p.notice.noprint role="status" { "The withdrawal is committed and the record is erased. Print this receipt with your browser's Print command (Ctrl+P)." } }
        div.receipt {
            h2 { "Erasure receipt" }
            table {
                tr { th scope="row" { "Receipt" } td.pseudonym { (r.receipt_id) } }
                tr { th scope="row" { "Registry" } td { (r.registry) } }
                tr { th scope="row" { "Pseudonym" } td.pseudonym { (r.pseudonym) } }
                tr { th scope="row" { "Erased at" } td { (time(r.erased_at)) } }
                tr { th scope="row" { "Erased by" } td { @if r.erased_by.is_empty() { "(an officer of another centre)" } @else { (r.erased_by) } } }
                tr { th scope="row" { "Reason" } td { (reason_label(r.reason)) } }
                tr { th scope="row" { "Case records erased" } td.num { (r.cases_erased) } }
                tr { th scope="row" { "Versions erased" } td.num { (r.versions_erased) } }
            }
            p { "The clinical data of this pseudonym in this registry was erased in the same transaction as the withdrawal and pushed out of the database files before this receipt was issued." }
        }
    };
    page("Erasure receipt", Some(ctx), body)
}

/// The receipt lookup form, always empty (after an error too: nothing typed is shown back).
pub fn receipt_lookup(ctx: &Ctx, errors: &Errors) -> Markup {
    page(
        "Erasure receipts",
        Some(ctx),
        html! {
            form.stack method="post" action="/officer/receipt" {
                (csrf(ctx))
                (input("Receipt id (rcpt-…)", "receipt_id", "text", "", errors))
                button type="submit" { "Show the receipt" }
            }
        },
    )
}

/// One page of an expiry list: its rows, each with a button to open the patient, and a
/// button to the next page when rows follow.
fn expiry_rows(ctx: &Ctx, days: i64, list: ExpiryList, page: &ExpiringPage) -> Markup {
    let name = match list {
        ExpiryList::Soon => "soon",
        ExpiryList::Expired => "expired",
    };
    html! {
        @if page.items.is_empty() { p { "None." } } @else {
            table {
                thead { tr { th scope="col" { "Registry" } th scope="col" { "Pseudonym" } th scope="col" { "Scope" } th scope="col" { "Expires" } th scope="col" { "Open" } } }
                tbody {
                    @for e in &page.items {
                        tr {
                            td { (e.registry_code) }
                            td.pseudonym { (e.pseudonym) }
                            td { (e.scope.as_str()) }
                            td { (date(e.expires_at)) }
                            td {
                                form method="post" action="/officer/patient" {
                                    (csrf(ctx))
                                    input type="hidden" name="kind" value="pseudonym";
                                    input type="hidden" name="registry" value=(e.registry_code);
                                    input type="hidden" name="pseudonym" value=(e.pseudonym);
                                    button.link type="submit" { "open" }
                                }
                            }
                        }
                    }
                }
            }
            @if let (true, Some(last)) = (page.more, page.items.last()) {
                @let cursor = last.cursor();
                form method="post" action="/officer/expiring" {
                    (csrf(ctx))
                    input type="hidden" name="list" value=(name);
                    input type="hidden" name="days" value=(days);
                    input type="hidden" name="after.expires_at" value=(cursor.expires_at.timestamp_millis());
                    input type="hidden" name="after.registry_id" value=(cursor.registry_id);
                    input type="hidden" name="after.pseudonym" value=(cursor.pseudonym);
                    input type="hidden" name="after.scope" value=(cursor.scope);
                    button type="submit" { "Next " (page.items.len()) " after " (date(last.expires_at)) }
                }
            }
        }
    }
}

pub fn expiring(ctx: &Ctx, days: i64, lists: &ExpiringLists) -> Markup {
    page(
        "Expiring consents",
        Some(ctx),
        html! {
            form method="get" action="/officer/expiring" {
                label for="days" { "Expiring within (days) " }
                input id="days" name="days" type="number" min="1" max="365" autocomplete="off" value=(days);
                " "
                button type="submit" { "Show" }
            }
            h2 { "Expiring in the next " (days) " days" }
            (expiry_rows(ctx, days, ExpiryList::Soon, &lists.soon))
            h2 { "Expired in the last " (EXPIRED_DAYS) " days" }
            (expiry_rows(ctx, days, ExpiryList::Expired, &lists.expired))
        },
    )
}

/// A later page of one expiry list.
pub fn expiring_more(ctx: &Ctx, days: i64, list: ExpiryList, rows: &ExpiringPage) -> Markup {
    let title = match list {
        ExpiryList::Soon => format!("Expiring in the next {days} days (continued)"),
        ExpiryList::Expired => format!("Expired in the last {EXPIRED_DAYS} days (continued)"),
    };
    page(
        "Expiring consents",
        Some(ctx),
        html! {
            h2 { (title) }
            (expiry_rows(ctx, days, list, rows))
            p { a href={ "/officer/expiring?days=" (days) } { "Back to the first page" } }
        },
    )
}

/// The names the releases in force give to codes among a table's labels, per dimension
/// (diagnoses and genes); shown beside the codes.
#[derive(Debug, Default)]
pub struct CodeNames(Vec<(Dimension, String, String)>);

impl CodeNames {
    pub fn insert(&mut self, dimension: Dimension, code: String, name: String) {
        self.0.push((dimension, code, name));
    }

    fn get(&self, dimension: Dimension, code: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(d, c, _)| *d == dimension && c == code)
            .map(|(_, _, n)| n.as_str())
    }

    /// A label with its name beside it, when the release gives one.
    fn label(&self, dimension: Option<Dimension>, label: &str) -> Markup {
        match dimension.and_then(|d| self.get(d, label)) {
            Some(name) => html! { (label) " " span.name { (name) } },
            None => html! { (label) },
        }
    }

    /// Labels of several dimensions joined by " / ", each with its name.
    fn labels(&self, dimensions: &[Dimension], labels: &[String]) -> Markup {
        html! {
            @for (i, l) in labels.iter().enumerate() {
                @if i > 0 { " / " }
                (self.label(dimensions.get(i).copied(), l))
            }
        }
    }
}

fn dimension_options() -> Vec<(String, String)> {
    std::iter::once((String::new(), "(none)".to_string()))
        .chain(Dimension::ALL.into_iter().map(|d| {
            (
                d.name().to_string(),
                d.name().to_lowercase().replace('_', " "),
            )
        }))
        .collect()
}

pub fn research_form(ctx: &Ctx, registries: &[String], form: &Form, errors: &Errors) -> Markup {
    let regs = registry_options(registries);
    let dims = dimension_options();
    let mut shown: Vec<String> = vec!["registry".into()];
    for i in 0..MAX_COUNT_DIMENSIONS {
        shown.push(format!("group_by[{i}]"));
    }
    for i in 0..super::FORM_FILTERS {
        shown.push(format!("filters[{i}].dimension"));
        shown.push(format!("filters[{i}].values"));
        shown.push(format!("filters[{i}].include_descendants"));
    }
    let mut filter_dims = dims.clone();
    filter_dims.push((PHENOTYPE.to_string(), "phenotype (HPO term)".to_string()));
    let shown_refs: Vec<&str> = shown.iter().map(String::as_str).collect();
    page(
        "Research tables",
        Some(ctx),
        html! {
            p { "Counts of patients with consent to research use in force now. A count from 1 to k-1 (k is set per registry) is never shown, and neither is any other count that would let someone work it out from the totals." }
            @for e in errors.others(&shown_refs) { p.error { (e) } }
            form.stack method="post" action="/research/count" {
                (csrf(ctx))
                (select("Registry", "registry", &regs, form.get("registry"), errors))
                fieldset {
                    legend { "Group by (up to 4, none for the total alone; the first is the rows; the diagnostic delay uses the first 3)" }
                    @for i in 0..MAX_COUNT_DIMENSIONS {
                        @let name = format!("group_by[{i}]");
                        (select(&format!("Dimension {}", i + 1), &name, &dims, form.get(&name), errors))
                    }
                }
                fieldset {
                    legend { "Filters (values separated by commas, as the table labels them: ORPHA:558, female, NL, 2020, ...; phenotype: HPO terms such as HP:0001250)" }
                    @for i in 0..super::FORM_FILTERS {
                        @let d = format!("filters[{i}].dimension");
                        @let v = format!("filters[{i}].values");
                        @let x = format!("filters[{i}].include_descendants");
                        @let x_id = x.replace(['.', '[', ']'], "-");
                        (select(&format!("Filter {} dimension", i + 1), &d, &filter_dims, form.get(&d), errors))
                        (input(&format!("Filter {} values", i + 1), &v, "text", form.get(&v), errors))
                        @let x_error = errors.of(&x);
                        @let x_error_id = format!("{x_id}-error");
                        div.check {
                            input type="checkbox" id=(x_id) name=(x) value="on" checked[!form.get(&x).is_empty()]
                                aria-invalid=[x_error.as_ref().map(|_| "true")]
                                aria-describedby=[x_error.as_ref().map(|_| x_error_id.as_str())];
                            " "
                            label for=(x_id) { "Filter " (i + 1) ": also count the diagnoses' subtypes (Orphanet classification) or the terms below the phenotypes (HPO), in the releases in force" }
                            @if let Some(e) = &x_error { " " span.error id=(x_error_id) { (e) } }
                        }
                    }
                }
                button type="submit" { "Count patients" }
                " "
                button type="submit" formaction="/research/delay" { "Diagnostic delay" }
            }
        },
    )
}

fn cell(value: Option<u64>) -> Markup {
    match value {
        Some(n) => html! { td.num { (n) } },
        None => html! { td.suppressed title="suppressed" { "suppressed" } },
    }
}

/// Said above a table that lists no category (docs/privacy.md, "Small groups").
const COLLAPSED: &str = "Every count of this question is suppressed, so no row or column is listed: they would only tell which categories its patients fall in. Ask about a larger group.";

/// Why a cell is hidden, in one sentence.
fn why_hidden(k: i64) -> String {
    format!(
        "A cell reads \"suppressed\" when it counts between 1 and {} patients, when it is a 0 beside a suppressed total of its row or column (it would tell what a small group lacks), or when showing it would let someone work such a count out from the other cells and the totals.",
        k - 1
    )
}

pub fn count_table(
    ctx: &Ctx,
    registry: &Registry,
    counted: &Counted,
    form: &Form,
    names: &CodeNames,
) -> Markup {
    let t = &counted.table;
    let p = &t.protected;
    let ncols = t.column_labels.len();
    let one_way = t.column_dimensions.is_empty();
    let unit = if counted.by_gene {
        "patient-gene pairs"
    } else {
        "patients"
    };
    let keep = form.hidden_except(|_| false);
    let body = html! {
        p {
            "Registry " strong { (registry.code) } ", k = " strong { (registry.min_cell_count) }
            ", p = " strong { (registry.protection_level) }
            ", " strong { (t.suppressed()) } " cells suppressed, unit: " (unit)
            ", as of " (time(counted.as_of)) "."
        }
        p.notice { (why_hidden(registry.min_cell_count)) }
        @if t.row_labels.is_empty() && p.grand_total.is_none() {
            p.notice { (COLLAPSED) }
        }
        table {
            thead {
                tr {
                    th scope="col" { (t.row_dimension.map_or("", |d| d.name())) }
                    @if one_way { th scope="col" { "count" } } @else {
                        @for labels in &t.column_labels { th scope="col" { (names.labels(&t.column_dimensions, labels)) } }
                        th scope="col" { "total" }
                    }
                }
            }
            tbody {
                @for (r, label) in t.row_labels.iter().enumerate() {
                    tr {
                        th scope="row" { (names.label(t.row_dimension, label)) }
                        @for c in &p.cells[r * ncols..(r + 1) * ncols] { (cell(*c)) }
                        @if !one_way { (cell(p.row_totals[r])) }
                    }
                }
                @if !one_way {
                    tr {
                        th scope="row" { "total" }
                        // One per column, as the API gives them: a table that matched
                        // nobody has none (`api::research`).
                        @for c in p.col_totals.iter().take(ncols) { (cell(*c)) }
                        (cell(p.grand_total))
                    }
                } @else {
                    tr { th scope="row" { "total" } (cell(p.grand_total)) }
                }
            }
        }
        form method="post" action="/research/count.csv" {
            @for (k, v) in &keep { input type="hidden" name=(k) value=(v.as_str()); }
            button type="submit" { "Download as CSV" }
        }
        p { a href="/research" { "Ask another question" } }
    };
    page("Patient counts", Some(ctx), body)
}

fn csv_field(s: &str) -> String {
    // Quoted, and a leading formula character defused (a spreadsheet would run it).
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_string()
    };
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The table as CSV: suppressed cells as `suppressed`; a comment line with k and as-of.
pub fn count_csv(registry: &Registry, counted: &Counted) -> String {
    let t = &counted.table;
    let p = &t.protected;
    let ncols = t.column_labels.len();
    let one_way = t.column_dimensions.is_empty();
    let v = |c: Option<u64>| c.map_or("suppressed".to_string(), |n| n.to_string());
    let mut out = format!(
        "# registry {}, k = {}, p = {}, suppressed = {}, as of {}\n",
        registry.code,
        registry.min_cell_count,
        registry.protection_level,
        t.suppressed(),
        counted.as_of.to_rfc3339()
    );
    let mut head = vec![csv_field(t.row_dimension.map_or("", |d| d.name()))];
    if one_way {
        head.push(csv_field("count"));
    } else {
        head.extend(t.column_labels.iter().map(|l| csv_field(&l.join(" / "))));
        head.push(csv_field("total"));
    }
    out.push_str(&head.join(","));
    out.push('\n');
    for (r, label) in t.row_labels.iter().enumerate() {
        let mut row = vec![csv_field(label)];
        row.extend(p.cells[r * ncols..(r + 1) * ncols].iter().map(|c| v(*c)));
        if !one_way {
            row.push(v(p.row_totals[r]));
        }
        out.push_str(&row.join(","));
        out.push('\n');
    }
    let mut total = vec![csv_field("total")];
    if !one_way {
        total.extend(p.col_totals.iter().take(ncols).map(|c| v(*c)));
    }
    total.push(v(p.grand_total));
    out.push_str(&total.join(","));
    out.push('\n');
    out
}

fn quantile_cells(q: Option<Quantiles>) -> Markup {
    match q {
        Some(q) => {
            html! { td.num { (q.p25) } td.num { (q.median) } td.num { (q.p75) } td.num { (q.p90) } }
        }
        None => html! { td.suppressed colspan="4" { "not published" } },
    }
}

pub fn delay(
    ctx: &Ctx,
    registry: &Registry,
    table: &DelayTable,
    grouped: &[Dimension],
    as_of: DateTime<Utc>,
    svg: &str,
    names: &CodeNames,
) -> Markup {
    let body = html! {
        p {
            "Registry " strong { (registry.code) } ", k = " strong { (registry.min_cell_count) }
            ", p = " strong { (registry.protection_level) }
            ", " strong { (table.suppressed) } " cells suppressed, as of " (time(as_of)) "."
            " Delay from onset to diagnosis, patients per band; quantiles (years) only for groups whose every count is published, and for all patients only when no count is hidden."
        }
        p.notice { (why_hidden(registry.min_cell_count)) }
        figure.chart {
            (PreEscaped(svg))
            figcaption { "Patients per delay band and group; a suppressed count is drawn as no bar and marked with an \"s\". The same numbers are in the table below." }
        }
        @if table.groups.is_empty() && table.grand_total.is_none() {
            p.notice { (COLLAPSED) }
        }
        table {
            thead {
                tr {
                    th scope="col" { "group" }
                    @for (band, _) in DELAY_BANDS { th scope="col" { (band) } }
                    th scope="col" { "total" }
                    th scope="col" { "p25" } th scope="col" { "median" } th scope="col" { "p75" } th scope="col" { "p90" }
                }
            }
            tbody {
                @for g in &table.groups {
                    tr {
                        th scope="row" { @if g.labels.is_empty() { "all" } @else { (names.labels(grouped, &g.labels)) } }
                        @for b in &g.bands { (cell(*b)) }
                        (cell(g.total))
                        (quantile_cells(g.quantiles))
                    }
                }
                tr {
                    th scope="row" { "total" }
                    @if table.band_totals.is_empty() {
                        @for _ in DELAY_BANDS { (cell(None)) }
                    } @else {
                        @for b in &table.band_totals { (cell(*b)) }
                    }
                    (cell(table.grand_total))
                    (quantile_cells(table.overall))
                }
            }
        }
        p { a href="/research" { "Ask another question" } }
    };
    page("Diagnostic delay", Some(ctx), body)
}

/// The centres grouped by country, in country order (each list keeps its order).
fn by_country(centres: &[ExpertiseCentre]) -> BTreeMap<&str, Vec<&ExpertiseCentre>> {
    let mut map: BTreeMap<&str, Vec<&ExpertiseCentre>> = BTreeMap::new();
    for c in centres {
        map.entry(c.country.as_str()).or_default().push(c);
    }
    map
}

pub fn expertise(
    ctx: &Ctx,
    orphacodes: &str,
    found: Option<(&[ExpertiseCentre], DateTime<Utc>)>,
    errors: &Errors,
) -> Markup {
    let body = html! {
        @for e in errors.others(&["orphacodes"]) { p.error { (e) } }
        form.stack method="post" action="/expertise" {
            (csrf(ctx))
            (input("Orphacodes (separated by commas, e.g. ORPHA:558)", "orphacodes", "text", orphacodes, errors))
            button type="submit" { "Find centres" }
        }
        @if let Some((centres, as_of)) = found {
            p { "As of " (time(as_of)) ". Volumes are bands of consented cases, never exact numbers; over several codes, the sum of each code's band." }
            @if centres.is_empty() { p { "No centre has consented cases of these diagnoses." } } @else {
                @for (country, list) in &by_country(centres) {
                    h2 { (country) }
                    table {
                        thead { tr { th scope="col" { "Centre" } th scope="col" { "Name" } th scope="col" { "Registry" } th scope="col" { "Cases (band)" } } }
                        tbody {
                            @for c in list {
                                tr { td { (c.centre_code) } td { (c.centre_name) } td { (c.registry) } td { (c.volume.label()) } }
                            }
                        }
                    }
                }
            }
        }
    };
    page("Where is the expertise", Some(ctx), body)
}

pub fn case_form(ctx: &Ctx, registries: &[String], chosen: &str, errors: &Errors) -> Markup {
    let regs = registry_options(registries);
    page(
        "My centre's cases",
        Some(ctx),
        html! {
            @for e in errors.others(&["registry", "pseudonym"]) { p.error { (e) } }
            form.stack method="post" action="/cases" {
                (csrf(ctx))
                (select("Registry", "registry", &regs, chosen, errors))
                (input("Pseudonym", "pseudonym", "text", "", errors))
                button type="submit" { "Read the case" }
            }
        },
    )
}

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn case(ctx: &Ctx, registry: &str, view: &crate::service::cases::CaseView) -> Markup {
    let opt = |d: &Option<crate::domain::PartialDate>| {
        d.as_ref().map_or(String::new(), ToString::to_string)
    };
    page(
        "Case",
        Some(ctx),
        html! {
            p { "Registry " strong { (registry) } ", pseudonym " span.pseudonym { (view.pseudonym.as_str()) } ", centre " (view.centre_code) " (" (view.country) ")" }
            table {
                thead { tr { th scope="col" { "Version" } th scope="col" { "Recorded" } th scope="col" { "By" } th scope="col" { "Born" } th scope="col" { "Sex" } th scope="col" { "Status" } th scope="col" { "Diagnosis" } th scope="col" { "Diagnosed" } th scope="col" { "First contact" } th scope="col" { "Genes" } th scope="col" { "HPO" } } }
                tbody {
                    @for v in view.versions.iter().rev() {
                        @let r = &v.record;
                        tr {
                            td.num { (v.version) }
                            td { (time(v.recorded_at)) }
                            td { (v.recorded_by) }
                            td { (r.birth) }
                            td { (r.sex.as_str()) }
                            td { (r.status.as_str()) }
                            td { @if let Some(o) = &r.orphacode { (o) } @else if r.undiagnosed { "undiagnosed" } }
                            td { (opt(&r.diagnosis_date)) }
                            td { (opt(&r.first_contact)) }
                            td { (r.genetic_findings.iter().map(|g| g.gene.to_string()).collect::<Vec<_>>().join(" ")) }
                            td { (join(&r.hpo_terms)) }
                        }
                    }
                }
            }
            p { a href="/cases" { "Read another case" } }
        },
    )
}
