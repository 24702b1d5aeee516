//! Compiles the public contract in `proto/` with protox (pure Rust, no protoc to
//! install) and writes the descriptor set that server reflection serves; checks every SQL
//! statement written as a literal in `src/` against the SQLite schema of `migrations/`, with
//! the values bound to it and the columns read from it, by name and type
//! ([`check_statements`]).
use std::{env, fs, path::Path, path::PathBuf};

use prost::Message;

#[path = "tests/common/sql_literals.rs"]
mod sql_literals;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    check_statements()?;
    let files = [
        "proto/ern_registry/v1/common.proto",
        "proto/ern_registry/v1/case.proto",
        "proto/ern_registry/v1/consent.proto",
        "proto/ern_registry/v1/research.proto",
        "proto/ern_registry/v1/admin.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    // `sqlx::migrate!` embeds the migrations; it notices an edited file, not a new one.
    println!("cargo:rerun-if-changed=migrations");
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("ern_registry_descriptor.bin"), fds.encode_to_vec())?;
    // GA4GH Phenopacket v2, as published (proto/vendor/phenopackets, BSD-3-Clause): only
    // its descriptors, for the schema's JSON form (prost-reflect); the Rust types come
    // from the `phenopackets` crate, generated from the same files. Not served by
    // reflection: the contract carries a phenopacket as JSON text.
    let phenopackets = protox::compile(
        ["phenopackets/schema/v2/phenopackets.proto"],
        ["proto/vendor"],
    )?;
    fs::write(
        out.join("phenopackets_descriptor.bin"),
        phenopackets.encode_to_vec(),
    )?;
    let builder = tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // A body that is not a valid message is INVALID_ARGUMENT, not INTERNAL.
        .codec_path("crate::api::codec::StrictProstCodec")
        // Patient identifiers get a hand-written Debug that prints no identifier
        // (src/lib.rs), so no `{:?}` of a request can leak one into a log or an error.
        .skip_debug([
            ".ern_registry.v1.NationalIdentifier",
            ".ern_registry.v1.DemographicIdentifiers",
            // Its phenopacket text may carry an identifier in the fields the service
            // ignores (`subject.id`): printed by its length only.
            ".ern_registry.v1.SubmitPhenopacketRequest",
        ]);
    // Every message (and oneof) that can hold a patient identifier overwrites it when it
    // is dropped, on whatever path: an answer, an error, an early return, a cancelled
    // call, a panic unwinding. No handler has to remember to wipe anything. (Moving a
    // field out of these types is refused by the compiler: take it, or borrow it.)
    let builder = IDENTIFIER_TYPES.iter().fold(builder, |builder, path| {
        builder.type_attribute(path, "#[derive(zeroize::Zeroize, zeroize::ZeroizeOnDrop)]")
    });
    builder.compile_fds(fds)?;
    Ok(())
}

/// The generated types that hold patient identifiers: the identifier messages and the
/// wrappers through which a request carries them (a message's path also matches its
/// nested types, so their `oneof kind` enums get the derives too).
const IDENTIFIER_TYPES: [&str; 4] = [
    ".ern_registry.v1.NationalIdentifier",
    ".ern_registry.v1.DemographicIdentifiers",
    ".ern_registry.v1.PatientIdentifiers",
    ".ern_registry.v1.PatientRef",
];

/// Prepares every SQL statement written as a literal in `src/` that runs on SQLite (found
/// by `tests/common/sql_literals.rs`) on an in-memory database built by applying
/// `migrations/sqlite/` in order, and fails the build, naming each, if any does not
/// prepare (a misspelt table or column, or one a migration dropped), is given a number of
/// values other than its parameters', has a column read by name that it does not return, or
/// one read as a Rust type other than its declared type (`sql_literals::check`). Nothing is run. This is
/// compile-time checking without a database or committed query data: the schema is the
/// migrations'. PostgreSQL's are prepared by `tests/api/statements.rs` (its pass of
/// `scripts/test`), and `tests/api/migrations.rs` holds the two schemas to each other.
fn check_statements() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=src");
    let conn = rusqlite::Connection::open_in_memory()?;
    let mut migrations: Vec<PathBuf> = fs::read_dir("migrations/sqlite")?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    migrations.retain(|p| p.extension().is_some_and(|e| e == "sql"));
    migrations.sort();
    for migration in &migrations {
        conn.execute_batch(&fs::read_to_string(migration)?)
            .map_err(|e| format!("{}: {e}", migration.display()))?;
    }
    let found = sql_literals::statements(Path::new("src"));
    // A file syn cannot parse: the compiler reports a real syntax error; anything else
    // means its statements went unchecked, which must not pass unnoticed.
    for file in &found.unparsed {
        println!(
            "cargo:warning=src/{}: not parsed, so its SQL statements were not checked",
            file.strip_prefix("src").unwrap_or(file).display()
        );
    }
    let report = sql_literals::check(&found, sql_literals::Dialect::Sqlite, |sql| {
        sql_literals::describe_sqlite(&conn, sql)
    });
    if !report.failures.is_empty() {
        eprintln!(
            "{} problem(s) with the SQL statements of src/ on the schema of migrations/sqlite/:\n{}",
            report.failures.len(),
            report.failures.join("\n")
        );
        std::process::exit(1);
    }
    Ok(())
}
