//! Integration tests: the real server on an ephemeral port, a real tonic client.
//! One test binary (link once); one module per feature.

mod helpers;
#[path = "../common/lp_attacker.rs"]
mod lp_attacker;

mod access;
mod audit;
mod auth;
mod cases;
mod consent;
mod consent_oracle;
mod consent_races;
mod disclosure;
mod durability;
mod officers;
mod privacy;
mod pseudonyms;
mod research;
mod service;
mod tls;
mod validation;
