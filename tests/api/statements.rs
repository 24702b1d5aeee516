//! Every SQL statement written as a literal in the service's source is prepared against the
//! real schema of the database under test, whether or not a test runs it: a misspelt table
//! or column, a column a migration dropped, or a statement one dialect does not accept fails
//! here, on SQLite in the first pass of `scripts/test` and on PostgreSQL in the second.
//! (`build.rs` already prepares the SQLite ones against `migrations/sqlite/`; this checks
//! them on a database the store migrated, and the PostgreSQL ones at all.) The statements
//! are found by `common/sql_literals.rs`, which says how.

use ern_registry::store::{Backend, Store};

use crate::helpers::fresh_database;
use crate::sql_literals::{Dialect, statements};

#[tokio::test]
async fn every_literal_statement_of_the_source_prepares_on_the_schema() {
    let found = statements(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(
        found.unparsed.is_empty(),
        "files not parsed, so not checked: {:?}",
        found.unparsed
    );
    let statements = found.statements;
    // The finder finds the store's statements (a guard against it silently finding none).
    assert!(
        statements.len() > 100,
        "only {} literal statements found under src/",
        statements.len()
    );
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_database(&dir).await;
    let store = Store::connect(&url, 2).await.unwrap();
    store.migrate().await.unwrap();
    let backend = store.backend();
    let mut failures = Vec::new();
    let mut checked = 0;
    match backend {
        Backend::Sqlite => {
            let path = store.sqlite_path().expect("a file database").to_owned();
            let conn = rusqlite::Connection::open(&path).unwrap();
            for s in statements.iter().filter(|s| s.runs_on(Dialect::Sqlite)) {
                checked += 1;
                // Prepared, never run: nothing is written.
                if let Err(e) = conn.prepare(&s.sql) {
                    failures.push(format!("{}: {e}\n    {}", s.file.display(), s.sql));
                }
            }
        }
        Backend::Postgres => {
            use sqlx::{Connection as _, Executor as _};
            let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
            for s in statements.iter().filter(|s| s.runs_on(Dialect::Postgres)) {
                checked += 1;
                if let Err(e) = (&mut conn).prepare(s.sql.as_str()).await {
                    failures.push(format!("{}: {e}\n    {}", s.file.display(), s.sql));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} statements do not prepare on {backend:?}:\n{}",
        failures.len(),
        failures.join("\n")
    );
    store.close().await;
}
