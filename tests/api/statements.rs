//! Every SQL statement written as a literal in the service's source is prepared against the
//! real schema of the database under test, whether or not a test runs it: a misspelt table
//! or column, a column a migration dropped, or a statement one dialect does not accept fails
//! here, on SQLite in the first pass of `scripts/test` and on PostgreSQL in the second; so
//! does a statement given a number of values other than its parameters', a column read
//! by name that the function's statements do not return, or return twice, and a column
//! read as a Rust type other than its own.
//! (`build.rs` already checks the SQLite ones against `migrations/sqlite/`; this checks
//! them on a database the store migrated, and the PostgreSQL ones at all.) The statements
//! are found by `common/sql_literals.rs`, which says how; [`finder`] holds it to a made-up
//! source.

use ern_registry::store::{Backend, Store};

use crate::helpers::fresh_database;
use crate::sql_literals::{Dialect, Shape, check, describe_sqlite, statements};

#[tokio::test]
async fn every_literal_statement_of_the_source_prepares_on_the_schema() {
    let found = statements(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(
        found.unparsed.is_empty(),
        "files not parsed, so not checked: {:?}",
        found.unparsed
    );
    // The finder finds the store's statements (a guard against it silently finding none).
    assert!(
        found.statements.len() > 100,
        "only {} literal statements found under src/",
        found.statements.len()
    );
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_database(&dir).await;
    let store = Store::connect(&url, 2).await.unwrap();
    store.migrate().await.unwrap();
    let backend = store.backend();
    let report = match backend {
        Backend::Sqlite => {
            let path = store.sqlite_path().expect("a file database").to_owned();
            let conn = rusqlite::Connection::open(&path).unwrap();
            // Prepared, never run: nothing is written.
            check(&found, Dialect::Sqlite, |sql| describe_sqlite(&conn, sql))
        }
        Backend::Postgres => {
            use sqlx::{
                Column as _, Connection as _, Executor as _, Statement as _, TypeInfo as _,
            };
            let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
            let mut shapes = std::collections::HashMap::new();
            for s in found
                .statements
                .iter()
                .filter(|s| s.runs_on(Dialect::Postgres))
            {
                let shape = (&mut conn)
                    .prepare(s.sql.as_str())
                    .await
                    .map(|statement| {
                        (
                            statement
                                .parameters()
                                .map_or(0, |p| p.either(|types| types.len(), |n| n)),
                            statement
                                .columns()
                                .iter()
                                .map(|c| c.name().to_owned())
                                .collect::<Vec<_>>(),
                            statement
                                .columns()
                                .iter()
                                .map(|c| Some(c.type_info().name().to_owned()))
                                .collect::<Vec<_>>(),
                        )
                    })
                    .map_err(|e| e.to_string());
                shapes.insert(s.sql.clone(), shape);
            }
            check(&found, Dialect::Postgres, |sql| {
                let (params, columns, types) = shapes[sql].clone()?;
                Ok(Shape {
                    params,
                    columns,
                    types,
                })
            })
        }
    };
    eprintln!(
        "{backend:?}: {} statements prepared, {} bind counts, {} named reads and {} of their types checked",
        report.statements, report.binds, report.reads, report.typed
    );
    // The guards of the other two checks, as above.
    assert!(
        report.binds > 80,
        "only {} bind counts checked",
        report.binds
    );
    assert!(
        report.reads > 80,
        "only {} named reads checked",
        report.reads
    );
    assert!(
        report.failures.is_empty(),
        "{} problem(s) with the statements on {backend:?}:\n{}",
        report.failures.len(),
        report.failures.join("\n")
    );
    store.close().await;
}

/// The finder and the checks on a source made up for the purpose: each thing they must catch
/// is caught, and what they must leave alone is left alone.
mod finder {
    use crate::sql_literals::{Dialect, Found, Report, Rust, check, describe_sqlite, statements};

    /// The statements and reads of a `src/` holding `files` (path, text).
    fn find(files: &[(&str, &str)]) -> Found {
        let dir = tempfile::tempdir().unwrap();
        for (path, text) in files {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        statements(dir.path())
    }

    /// `found` checked on an in-memory SQLite database with two small tables.
    fn on_sqlite(found: &Found) -> Report {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT); \
             CREATE TABLE u (id INTEGER PRIMARY KEY, t_id INTEGER);",
        )
        .unwrap();
        check(found, Dialect::Sqlite, |sql| describe_sqlite(&conn, sql))
    }

    fn sqls(found: &Found) -> Vec<(&str, Option<Dialect>, Option<usize>)> {
        found
            .statements
            .iter()
            .map(|s| (s.sql.as_str(), s.only, s.binds))
            .collect()
    }

    #[test]
    fn finds_literals_constants_and_loops_but_not_tests_or_formats() {
        let found = find(&[
            (
                "a.rs",
                r#"
                const TOP: &str = "SELECT 1";
                struct S;
                impl S {
                    const ASSOC: &str = "SELECT 2";
                    async fn f(&self) {
                        const LOCAL: &str = "SELECT 3";
                        db::query(TOP).fetch_one(c).await;
                        query(Self::ASSOC).bind(1).fetch_one(c).await;
                        query(&LOCAL).execute(c).await;
                        query(S::ASSOC).fetch_one(c).await;
                        for sql in ["SELECT 4 WHERE $1", TOP] {
                            query(sql).bind(x).execute(c).await;
                        }
                        let mut q = query("SELECT 5");
                        q = q.bind(1);
                        q.execute(c).await;
                        query(&format!("SELECT {}", 6)).execute(c).await;
                        c.execute_raw("PRAGMA optimize").await;
                    }
                }
                #[cfg(test)]
                mod tests {
                    fn t() { query("SELECT from test module").execute(c); }
                }
                #[cfg(test)]
                mod more;
                #[test]
                fn t() { query("SELECT from test fn").execute(c); }
                "#,
            ),
            (
                "a/more.rs",
                r#"fn t() { query("SELECT from test file").execute(c); }"#,
            ),
        ]);
        assert_eq!(
            sqls(&found),
            [
                ("SELECT 1", None, Some(0)),
                ("SELECT 2", None, Some(1)),
                ("SELECT 3", None, Some(0)),
                ("SELECT 2", None, Some(0)),
                ("SELECT 4 WHERE $1", None, Some(1)),
                ("SELECT 1", None, Some(1)),
                // Bound elsewhere than in the chain that runs it: not counted.
                ("SELECT 5", None, None),
                ("PRAGMA optimize", None, Some(0)),
            ]
        );
        // The `format!` leaves the function open: its reads are not checked.
        assert_eq!(found.open.len(), 1);
        assert!(found.unparsed.is_empty());
    }

    #[test]
    fn a_backend_named_by_an_arm_or_a_condition_is_the_only_one() {
        let found = find(&[(
            "b.rs",
            r#"
            fn f(db: Db, backend: Backend) {
                match db {
                    Db::Pg(c) => query("SELECT pg").execute(c),
                    Db::Lite(c) => query("SELECT lite").execute(c),
                }
                if backend == Backend::Postgres {
                    query("SELECT then").execute(c);
                } else {
                    query("SELECT else").execute(c);
                }
                if let Db::Lite(c) = db { query("SELECT let").execute(c); } else { query("SELECT either").execute(c); }
                if !matches!(db, Db::Pg(_)) { query("SELECT negated").execute(c); }
            }
            "#,
        )]);
        let (pg, lite) = (Some(Dialect::Postgres), Some(Dialect::Sqlite));
        assert_eq!(
            sqls(&found),
            [
                ("SELECT pg", pg, Some(0)),
                ("SELECT lite", lite, Some(0)),
                ("SELECT then", pg, Some(0)),
                ("SELECT else", lite, Some(0)),
                ("SELECT let", lite, Some(0)),
                ("SELECT either", None, Some(0)),
                ("SELECT negated", None, Some(0)),
            ]
        );
    }

    #[test]
    fn the_checks_catch_a_bad_statement_a_wrong_bind_count_and_a_bad_read() {
        let report = on_sqlite(&find(&[(
            "c.rs",
            r#"
            fn good() {
                let r = query("SELECT id, name FROM t WHERE id = $1").bind(1).fetch_one(c)?;
                r.try_get::<i64>("id")?; r.try_get("name")?;
            }
            fn misspelt() { query("SELECT nme FROM t").fetch_one(c); }
            fn too_few() { query("SELECT id FROM t WHERE id = $1 AND name = $2").bind(1).execute(c); }
            fn too_many() { query("DELETE FROM t").bind(1).execute(c); }
            fn unknown() { let r = query("SELECT id FROM t").fetch_one(c)?; r.try_get("name")?; }
            fn shared() {
                let r = query("SELECT t.id, u.id FROM t JOIN u ON u.t_id = t.id").fetch_one(c)?;
                r.try_get("id")?;
            }
            fn open() {
                query(&format!("SELECT {}", 1)).execute(c);
                let r = query("SELECT id FROM t").fetch_one(c)?; r.try_get("anything")?;
            }
            fn handed_in(r: Row) { r.try_get("anything")?; }
            "#,
        )]));
        let failures = report.failures.join("\n");
        assert_eq!(report.failures.len(), 5, "{failures}");
        for expected in [
            "no such column: nme",
            "1 value(s) bound to 2 parameter(s)",
            "1 value(s) bound to 0 parameter(s)",
            "\"name\" read by name is returned by no statement of `unknown`",
            "\"id\" read by name is a name two columns share in the statement of `shared`",
        ] {
            assert!(
                failures.contains(expected),
                "{expected:?} not in:\n{failures}"
            );
        }
        // `good`'s two reads, `unknown`'s and `shared`'s; not `open`'s or `handed_in`'s.
        assert_eq!(report.reads, 4);
    }

    #[test]
    fn a_read_whose_type_the_source_gives_is_held_to_the_column() {
        let report = on_sqlite(&find(&[(
            "d.rs",
            r#"
            struct Named { id: i64, name: Option<String> }
            struct Wrong { id: String, name: i64 }
            fn right() {
                let r = query("SELECT id, name FROM t").fetch_one(c)?;
                let id: i64 = r.try_get("id")?;
                let (a, b): (i64, Option<String>) = (r.try_get("id")?, r.try_get("name")?);
                Named { id: r.try_get("id")?, name: r.try_get("name")? };
                r.try_get::<Option<DateTime<Utc>>>("id")?;
                // An expression's type SQLite does not know: not checked.
                let n: String = query("SELECT COUNT(*) AS n FROM t").fetch_one(c)?.try_get("n")?;
            }
            fn turbofish() { let r = query("SELECT name FROM t").fetch_one(c)?; r.try_get::<i64>("name")?; }
            fn annotated() { let r = query("SELECT id FROM t").fetch_one(c)?; let x: String = r.try_get("id")?; }
            fn tuple() {
                let r = query("SELECT id, name FROM t").fetch_one(c)?;
                let (a, b): (i64, bool) = (r.try_get("id")?, r.try_get("name")?);
            }
            fn field() { let r = query("SELECT id, name FROM t").fetch_one(c)?; Wrong { id: r.try_get("id")?, name: r.try_get("name")? }; }
            "#,
        )]));
        let failures = report.failures.join("\n");
        for expected in [
            "\"name\" read by name is read as Int but is TEXT in the statements of `turbofish`",
            "\"id\" read by name is read as Text but is INTEGER in the statements of `annotated`",
            "\"name\" read by name is read as Bool but is TEXT in the statements of `tuple`",
            "\"id\" read by name is read as Text but is INTEGER in the statements of `field`",
            "\"name\" read by name is read as Int but is TEXT in the statements of `field`",
        ] {
            assert!(
                failures.contains(expected),
                "{expected:?} not in:\n{failures}"
            );
        }
        assert_eq!(report.failures.len(), 5, "{failures}");
        // `right`'s 6 (not `n`), and 6 in the others (`tuple`'s "id" is right).
        assert_eq!(report.typed, 12);
    }

    #[test]
    fn postgresql_types_tell_instants_and_flags_from_integers() {
        let pg = Dialect::Postgres;
        assert_eq!(Rust::Int.reads(pg, "INT8"), Some(true));
        assert_eq!(Rust::Int.reads(pg, "INT4"), Some(true));
        assert_eq!(Rust::Time.reads(pg, "INT8"), Some(false));
        assert_eq!(Rust::Int.reads(pg, "TIMESTAMPTZ"), Some(false));
        assert_eq!(Rust::Bool.reads(pg, "BOOL"), Some(true));
        assert_eq!(Rust::Int.reads(pg, "BOOL"), Some(false));
        assert_eq!(Rust::Blob.reads(pg, "BYTEA"), Some(true));
        assert_eq!(Rust::Text.reads(pg, "JSONB"), None);
        // On SQLite instants and flags are integers.
        assert_eq!(Rust::Time.reads(Dialect::Sqlite, "INTEGER"), Some(true));
        assert_eq!(Rust::Bool.reads(Dialect::Sqlite, "INTEGER"), Some(true));
        assert_eq!(Rust::Text.reads(Dialect::Sqlite, "INTEGER"), Some(false));
    }

    /// What the review of the finder found it must not do: link a helper through a
    /// variable of the same name, take a shadowed loop variable for its literals, resolve
    /// another module's or another `impl`'s constant to this one's, type a struct literal
    /// of another path by a struct of the file, or fail a read whose type one of the
    /// function's statements has.
    #[test]
    fn what_the_finder_must_not_mistake() {
        let found = find(&[(
            "e.rs",
            r#"
            const SQL: &str = "SELECT id FROM t";
            struct A;
            impl A {
                const SQL: &str = "SELECT name FROM t";
                fn own() { query(Self::SQL).fetch_one(c); query(A::SQL).fetch_one(c); }
                fn via_self(&self) { let r = query("SELECT id FROM t").fetch_one(c)?; self.helper(&r); }
                fn helper(&self, r: &Row) { r.try_get("nothing")?; }
            }
            struct B;
            impl B {
                const SQL: &str = concat!("SELECT ", "1");
                fn not_a_literal() { query(Self::SQL).fetch_one(c); }
            }
            fn other_module() { query(other::SQL).fetch_one(c); }
            fn shadowed() {
                for sql in ["SELECT id FROM t"] { let sql = sql.replace("id", "name"); query(&sql).fetch_one(c); }
            }
            fn centre(r: &Row) { r.try_get("code")?; }
            fn rename(centre: i64) { query("UPDATE t SET name = 'x' WHERE id = $1").bind(centre).execute(c); }
            struct Named { id: String }
            fn other_path() { let r = query("SELECT id FROM t").fetch_one(c)?; pb::Named { id: r.try_get("id")? }; }
            fn either() {
                let a = query("SELECT id AS v FROM t").fetch_one(c)?;
                let b = query("SELECT name AS v FROM t").fetch_one(c)?;
                let v: String = b.try_get("v")?;
            }
            "#,
        )]);
        let texts: Vec<&str> = found.statements.iter().map(|s| s.sql.as_str()).collect();
        assert_eq!(
            texts,
            [
                "SELECT name FROM t",
                "SELECT name FROM t",
                "SELECT id FROM t",
                "UPDATE t SET name = 'x' WHERE id = $1",
                "SELECT id FROM t",
                "SELECT id AS v FROM t",
                "SELECT name AS v FROM t",
            ]
        );
        // `not_a_literal`, `other_module` and `shadowed` are open.
        assert_eq!(found.open.len(), 3);
        let report = on_sqlite(&found);
        // Only `via_self`'s helper is linked: "nothing" is no column of its statement.
        assert_eq!(
            report.failures,
            [
                "src/e.rs: the column \"nothing\" read by name is returned by no statement of `via_self` (read by `helper`)"
            ]
        );
    }

    /// The second review's cases: a name bound again inside a loop hides the loop's
    /// literals to the end of its block only; helpers are linked through each way of
    /// calling them, to the function of that name of the right `impl`; another backend's
    /// statement that returns no rows leaves the reads checked, one that may (any PRAGMA)
    /// does not; a name declared once with a literal and once without is not resolved.
    #[test]
    fn scopes_helpers_and_the_other_backend() {
        let found = find(&[(
            "f.rs",
            r#"
            const SQL: &str = "SELECT id FROM t";
            fn not_resolved() { const SQL: &str = concat!("SELECT ", "1"); query(SQL).fetch_one(c); }
            fn nested_block() {
                for sql in ["SELECT nme FROM t"] { if c { let sql = 1; } query(sql).execute(c); }
            }
            fn if_let() {
                for sql in ["SELECT 1"] { if let Some(sql) = other { query(sql).bind(x).execute(c); } }
            }
            fn free_helper(r: &Row) { r.try_get("free")?; }
            fn mapped(r: &Row) { r.try_get("mapped")?; }
            fn calls() {
                let r = query("SELECT id FROM t").fetch_one(c)?;
                free_helper(&r);
                rows.iter().map(mapped);
            }
            struct A;
            impl A {
                fn load() { let r = query("SELECT id FROM t").fetch_one(c)?; Self::from_row(&r); }
                fn from_row(r: &Row) { r.try_get("id")?; }
            }
            struct B;
            impl B {
                fn load() { let r = query("SELECT name FROM t").fetch_one(c)?; B::from_row(&r); }
                fn from_row(r: &Row) { r.try_get("name")?; r.try_get("b_only")?; }
            }
            fn other_backend_sets(db: Db) {
                if let Db::Pg(c) = db { query("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE").execute(c); }
                let r = query("SELECT id FROM t").fetch_one(c)?;
                r.try_get("set")?;
            }
            fn other_backend_pragma(db: Db) {
                if let Db::Pg(c) = db { query("PRAGMA journal_mode = WAL").fetch_one(c); }
                let r = query("SELECT id FROM t").fetch_one(c)?;
                r.try_get("journal_mode")?;
            }
            "#,
        )]);
        let report = on_sqlite(&found);
        let failures = report.failures.join("\n");
        for expected in [
            // The misspelling after a block that shadowed `sql` is still prepared.
            "no such column: nme",
            "\"free\" read by name is returned by no statement of `calls` (read by `free_helper`)",
            "\"mapped\" read by name is returned by no statement of `calls` (read by `mapped`)",
            "\"b_only\" read by name is returned by no statement of `load` (read by `from_row`)",
            "\"set\" read by name is returned by no statement of `other_backend_sets`",
        ] {
            assert!(
                failures.contains(expected),
                "{expected:?} not in:\n{failures}"
            );
        }
        // Not: A's helper held to B's statement, `if_let`'s shadowed `sql` taken for
        // "SELECT 1" (no parameter), the PRAGMA's function, `not_resolved`.
        assert_eq!(report.failures.len(), 5, "{failures}");
        assert!(
            !found.statements.iter().any(|s| s.sql == "SELECT 1"),
            "a shadowed loop variable or a constant declared without a literal was resolved"
        );
    }
}
