//! Integration tests: the real server on an ephemeral port, a real tonic client.
//! One test binary (link once); one module per feature.

mod helpers;
#[path = "../common/lp_attacker.rs"]
mod lp_attacker;
/// The input-edge properties the fuzz targets check, run here with proptest (`malformed`).
#[path = "../../fuzz/fuzz_targets/properties/mod.rs"]
mod properties;
#[path = "../common/sql_literals.rs"]
mod sql_literals;

mod abuse;
mod access;
mod audit;
mod audit_complete;
mod auth;
mod cases;
mod cli;
mod codes;
mod consent;
mod consent_model;
mod consent_oracle;
mod consent_races;
mod console;
mod console_browser;
mod demo;
mod disclosure;
mod durability;
mod every_method;
mod file_modes;
mod instance_races;
mod log_failures;
mod malformed;
mod master_key;
mod migrations;
mod officers;
mod outage;
mod phenopackets;
mod privacy;
mod pseudonyms;
mod research;
mod server_lock;
mod service;
mod shutdown;
mod statements;
mod statistics;
mod tls;
mod upload;
mod validation;
mod wire;
mod write_runs;
