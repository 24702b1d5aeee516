//! The migrations: the SQLite and PostgreSQL sets make the same schema, and a database of
//! an earlier version keeps its data through the upgrade.
//!
//! **Same schema.** `migrations/sqlite` and `migrations/postgres` are written by hand,
//! twice. Each set is applied as the server applies it (`Store::migrate`) to a fresh
//! database, and what the database made of it is read back from its catalog (SQLite:
//! `sqlite_master` and the `pragma_*` functions; PostgreSQL: `information_schema` and
//! `pg_catalog`) as *facts* both sides can state: a table; a column, its type class
//! (integer, text, bytes, ...), NOT NULL, its default and whether a value is generated
//! when none is given; primary keys, unique constraints, foreign keys (columns, referenced
//! table and columns, ON DELETE and ON UPDATE), CHECK constraints (the columns and the
//! constants they mention), indexes (columns in order, DESC, unique, partial) and views
//! and triggers by name. A fact only one side states is a difference. The differences
//! that are the dialects' and not the schema's are listed, each with its reason, in
//! [`DIALECT_ONLY`]; an entry no longer needed fails the test too. Not compared: sqlx's own
//! `_sqlx_migrations` and SQLite's internal `sqlite_*` tables. A second test adds a
//! column, a foreign key, a CHECK and an index to one side only, and declares one column
//! differently on each side, and expects exactly those facts: the comparison sees them.
//! These two need PostgreSQL (`ERN_TEST_DATABASE_URL`, the second pass of `scripts/test`);
//! without it they say they are skipped.
//!
//! **Upgrade.** A database is migrated up to an earlier version (0002: before the research
//! tables and the audit log; 0005: with them) and filled through SQL as that version
//! wrote it (registries, a centre, a physician with an Argon2id API key, a consent
//! officer, consent events, a case with two versions, an erased patient's tombstone and,
//! from 0004, MAC-chained audit entries of the first encoding). Then the server's migration
//! runs: every row of before is still there with its values, and the later migrations'
//! backfills hold (the decisions in force and the research rows, the protection level,
//! the audit versions and the rows to adopt). Last, the real server starts on it, takes the
//! key in use, answers the old physician's key and reads the case back, and the audit
//! chain, legacy entries and adopted rows included, verifies. On whichever database the
//! pass runs on.

use secrecy::ExposeSecret;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;

use ern_registry::audit::AuditKey;
use ern_registry::auth::{self, KeyHasher};
use ern_registry::config::ServeArgs;
use ern_registry::keys::MasterSecret;
use ern_registry::proto;
use ern_registry::pseudonym::{Pseudonymiser, RegistryRef};
use ern_registry::store::{Backend, Store};
use ring::rand::SystemRandom;
use ring::{hkdf, hmac};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Connection, Row};
use tempfile::TempDir;

use crate::helpers::{TestApp, bsn, fresh_database, get_case, national, record};

// ---------------------------------------------------------------------------------------
// The dialects' own differences
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Sqlite,
    Postgres,
}

/// Facts that only one side states, not because the schemas differ but because the
/// dialects do. Every entry says why; keep it short.
struct DialectOnly {
    side: Side,
    facts: &'static [&'static str],
    why: &'static str,
}

const DIALECT_ONLY: &[DialectOnly] = &[
    DialectOnly {
        side: Side::Sqlite,
        facts: &[
            "column access_epoch.id generated",
            "column audit_head.id generated",
            "column commit_barrier.id generated",
            "column console_credentials.principal_id generated",
            "column audit_log.seq generated",
            "column master_key.id generated",
            "column registries.id generated",
            "column research_log.seq generated",
            "column research_seq.id generated",
        ],
        why: "an INTEGER PRIMARY KEY is SQLite's rowid, which takes the next number when none \
              is given; PostgreSQL's BIGINT key (no identity) does not. The service always \
              gives these: the registry's number, the chain's next sequence number, row 1, \
              the research change's number (from the change counter), the principal whose \
              console credentials a row holds.",
    },
    DialectOnly {
        side: Side::Postgres,
        facts: &[
            "trigger api_keys.api_keys_access_truncate",
            "trigger centre_registries.centre_registries_access_truncate",
            "trigger centres.centres_access_truncate",
            "trigger principal_certificates.principal_certificates_access_truncate",
            "trigger principal_registries.principal_registries_access_truncate",
            "trigger principals.principals_access_truncate",
            "trigger registries.registries_access_truncate",
        ],
        why: "PostgreSQL's TRUNCATE fires no DELETE trigger, so the access epoch has triggers \
              on TRUNCATE too (migration 0022); SQLite has no TRUNCATE, and its DELETE fires \
              the row triggers.",
    },
    DialectOnly {
        side: Side::Postgres,
        facts: &["column api_keys.key_id not null"],
        why: "SQLite lets a PRIMARY KEY other than an INTEGER one hold NULL unless it is \
              declared NOT NULL (a documented legacy quirk); declaring it now takes a table \
              rebuild, and the one writer (Store::insert_api_key) binds a generated key id.",
    },
    DialectOnly {
        side: Side::Postgres,
        facts: &["column consent_events.patient not null"],
        why: "SQLite adds a column with a REFERENCES clause only without NOT NULL (migration \
              0019), and rebuilding the history to declare it would rewrite every consent \
              decision on file; the writer always binds the patient's number, and the \
              upgrade test checks that the migration left no decision without one.",
    },
];

/// What one side states and the other does not, less [`DIALECT_ONLY`].
struct Differences {
    sqlite_only: BTreeSet<String>,
    postgres_only: BTreeSet<String>,
    /// Entries of [`DIALECT_ONLY`] that matched no difference.
    unused: Vec<String>,
}

/// The facts of both sides with PostgreSQL's instants and flags stated as SQLite states
/// them. SQLite has no time and no boolean type: the store keeps an instant there as
/// integer milliseconds since the Unix epoch and a flag as 0/1, and `store::db` converts
/// (migration 0017). So a TIMESTAMPTZ column is an integer one whose default the epoch is
/// 0; a BOOLEAN column is an integer one whose defaults FALSE and TRUE are 0 and 1; and a
/// SQLite CHECK that such a column is 0 or 1 says what the BOOLEAN type says. Any other
/// difference in type, default or check stays one.
fn in_sqlite_terms(sqlite: &Schema, postgres: &Schema) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut columns: BTreeMap<String, &str> = BTreeMap::new();
    for fact in &postgres.facts {
        for class in ["timestamp", "boolean"] {
            if let Some(column) = fact
                .strip_prefix("column ")
                .and_then(|f| f.strip_suffix(&format!(" type {class}")))
            {
                columns.insert(column.to_string(), class);
            }
        }
    }
    let postgres_facts = postgres
        .facts
        .iter()
        .map(|fact| {
            for (column, class) in &columns {
                let at = format!("column {column}");
                let Some(rest) = fact.strip_prefix(&at) else {
                    continue;
                };
                let said = match (*class, rest) {
                    (_, r) if r == format!(" type {class}") => " type integer",
                    ("boolean", " default false") => " default 0",
                    ("boolean", " default true") => " default 1",
                    ("timestamp", " default '1970-01-01 00:00:00+00'") => " default 0",
                    _ => continue,
                };
                return format!("{at}{said}");
            }
            fact.clone()
        })
        .collect();
    let sqlite_facts = sqlite
        .facts
        .iter()
        .filter(|fact| {
            !columns.iter().any(|(column, class)| {
                let (table, name) = column.split_once('.').unwrap_or_default();
                *class == "boolean" && **fact == format!("check {table} ({name}): 0, 1")
            })
        })
        .cloned()
        .collect();
    (sqlite_facts, postgres_facts)
}

impl Differences {
    fn between(sqlite: &Schema, postgres: &Schema) -> Differences {
        let (sqlite_facts, postgres_facts) = in_sqlite_terms(sqlite, postgres);
        let mut sqlite_only: BTreeSet<String> =
            sqlite_facts.difference(&postgres_facts).cloned().collect();
        let mut postgres_only: BTreeSet<String> =
            postgres_facts.difference(&sqlite_facts).cloned().collect();
        let mut unused = Vec::new();
        for entry in DIALECT_ONLY {
            let only = match entry.side {
                Side::Sqlite => &mut sqlite_only,
                Side::Postgres => &mut postgres_only,
            };
            for fact in entry.facts {
                if !only.remove(*fact) {
                    unused.push(format!("{:?} only: {fact} ({})", entry.side, entry.why));
                }
            }
        }
        Differences {
            sqlite_only,
            postgres_only,
            unused,
        }
    }

    fn is_empty(&self) -> bool {
        self.sqlite_only.is_empty() && self.postgres_only.is_empty() && self.unused.is_empty()
    }
}

impl fmt::Display for Differences {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "the two migration sets make different schemas")?;
        for (title, facts) in [
            ("in migrations/sqlite only", &self.sqlite_only),
            ("in migrations/postgres only", &self.postgres_only),
        ] {
            if !facts.is_empty() {
                writeln!(f, "{title}:")?;
                for fact in facts {
                    writeln!(f, "    {fact}")?;
                }
            }
        }
        if !self.unused.is_empty() {
            writeln!(f, "DIALECT_ONLY entries no longer needed (remove them):")?;
            for entry in &self.unused {
                writeln!(f, "    {entry}")?;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// The tests of the comparison
// ---------------------------------------------------------------------------------------

/// Whether a PostgreSQL is configured; if not, says that `what` is skipped (as
/// `outage.rs` does; `cargo test -- --show-output` shows it).
fn postgres_configured(what: &str) -> bool {
    if std::env::var("ERN_TEST_DATABASE_URL").is_ok_and(|url| !url.is_empty()) {
        return true;
    }
    eprintln!(
        "skipped: {what} needs PostgreSQL (ERN_TEST_DATABASE_URL); scripts/test runs it in \
         its PostgreSQL pass"
    );
    false
}

#[tokio::test]
async fn the_sqlite_and_postgresql_migrations_make_the_same_schema() {
    if !postgres_configured("the comparison of the two migration sets") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sqlite = migrated(&dir, Backend::Sqlite, "same", None).await;
    let postgres = migrated(&dir, Backend::Postgres, "same", None).await;
    // The comparison read both catalogs, not two empty lists.
    for fact in [
        "table case_genes",
        "column consent_events.id generated",
        "column registries.protection_level default 1",
        "column audit_log.target default ''",
        "primary key consent_current (patient, scope)",
        "unique cases (patient, centre_id)",
        "foreign key case_genes (case_id, version) -> case_versions (case_id, version) \
         on delete cascade on update no action",
        "check principals (role): 'admin', 'consent_officer', 'physician', 'researcher'",
        "check registries (id): 1, 999",
        "index consent_events.consent_events_in_force (patient, scope, given_at, id)",
    ] {
        assert!(sqlite.facts.contains(fact), "SQLite lacks {fact:?}");
        assert!(postgres.facts.contains(fact), "PostgreSQL lacks {fact:?}");
    }
    let differences = Differences::between(&sqlite, &postgres);
    assert!(differences.is_empty(), "{differences}");
}

#[tokio::test]
async fn the_comparison_sees_a_column_a_foreign_key_a_check_and_an_index_of_one_dialect() {
    if !postgres_configured("the test of the migration comparison") {
        return;
    }
    let added: BTreeSet<String> = [
        "column centres.probe_level",
        "column centres.probe_level type integer",
        "column centres.probe_level not null",
        "column centres.probe_level default 3",
        "check centres (probe_level): 2",
        "column centres.probe_registry_id",
        "column centres.probe_registry_id type integer",
        "foreign key centres (probe_registry_id) -> registries (id) on delete cascade \
         on update no action",
        "index centres.centres_probe (probe_registry_id, code desc)",
    ]
    .map(String::from)
    .into();
    let probe = |integer: &str| {
        format!(
            "ALTER TABLE centres ADD COLUMN probe_registry_id {integer} \
                 REFERENCES registries (id) ON DELETE CASCADE;\n\
             ALTER TABLE centres ADD COLUMN probe_level {integer} NOT NULL DEFAULT 3 \
                 CHECK (probe_level > 2);\n\
             CREATE INDEX centres_probe ON centres (probe_registry_id, code DESC);\n"
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let sqlite = migrated(&dir, Backend::Sqlite, "plain", None).await;
    let postgres = migrated(&dir, Backend::Postgres, "plain", None).await;

    let more = migrated(&dir, Backend::Sqlite, "more", Some(&probe("INTEGER"))).await;
    let differences = Differences::between(&more, &postgres);
    assert_eq!(differences.sqlite_only, added, "{differences}");
    assert!(differences.postgres_only.is_empty(), "{differences}");
    assert!(differences.unused.is_empty(), "{differences}");

    let more = migrated(&dir, Backend::Postgres, "more", Some(&probe("BIGINT"))).await;
    let differences = Differences::between(&sqlite, &more);
    assert_eq!(differences.postgres_only, added, "{differences}");
    assert!(differences.sqlite_only.is_empty(), "{differences}");

    // One column on both sides, declared differently: each property is a difference.
    let sqlite_probe = "ALTER TABLE centres ADD COLUMN probe TEXT;\n\
                        CREATE INDEX centres_probe ON centres (probe);\n";
    let postgres_probe = "ALTER TABLE centres ADD COLUMN probe INTEGER NOT NULL DEFAULT -1;\n\
                          CREATE UNIQUE INDEX centres_probe ON centres (probe) WHERE probe > 0;\n";
    let differences = Differences::between(
        &migrated(&dir, Backend::Sqlite, "other", Some(sqlite_probe)).await,
        &migrated(&dir, Backend::Postgres, "other", Some(postgres_probe)).await,
    );
    let set = |facts: &[&str]| facts.iter().map(|f| f.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(
        differences.sqlite_only,
        set(&[
            "column centres.probe type text",
            "index centres.centres_probe (probe)",
        ]),
        "{differences}"
    );
    assert_eq!(
        differences.postgres_only,
        set(&[
            "column centres.probe type integer32",
            "column centres.probe not null",
            "column centres.probe default -1",
            "index centres.centres_probe (probe) unique partial",
        ]),
        "{differences}"
    );
}

fn migrations_dir(backend: Backend) -> PathBuf {
    let dialect = match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(dialect)
}

/// The schema of a fresh database of `backend` after its migrations, as the server applies
/// them, or (with `extra`) after a copy of them with one more migration.
async fn migrated(dir: &TempDir, backend: Backend, name: &str, extra: Option<&str>) -> Schema {
    let url = match backend {
        Backend::Sqlite => format!(
            "sqlite://{}?mode=rwc",
            dir.path().join(format!("{name}.db")).display()
        ),
        Backend::Postgres => fresh_database(dir).await,
    };
    let store = Store::connect(&url, 1).await.unwrap();
    match extra {
        None => store.migrate().await.unwrap(),
        Some(sql) => {
            let copy = dir.path().join(format!("{name}-{backend:?}"));
            std::fs::create_dir(&copy).unwrap();
            for entry in std::fs::read_dir(migrations_dir(backend)).unwrap() {
                let path = entry.unwrap().path();
                std::fs::copy(&path, copy.join(path.file_name().unwrap())).unwrap();
            }
            std::fs::write(copy.join("9999_probe.sql"), sql).unwrap();
            let pool = any_pool(&url).await;
            Migrator::new(copy.as_path())
                .await
                .unwrap()
                .run(&pool)
                .await
                .unwrap();
            pool.close().await;
        }
    }
    store.close().await;
    schema(&url).await
}

// ---------------------------------------------------------------------------------------
// Schemas as facts
// ---------------------------------------------------------------------------------------

/// A schema as the facts both dialects can state about it (see the module documentation).
#[derive(Debug, Default)]
struct Schema {
    facts: BTreeSet<String>,
    /// The columns of every table, in order.
    columns: BTreeMap<String, Vec<String>>,
}

struct Column<'a> {
    name: &'a str,
    /// [`sqlite_class`], [`postgres_class`].
    class: &'a str,
    not_null: bool,
    /// As [`default_text`] gives it.
    default: Option<String>,
    /// A value is assigned when an insert gives none (SQLite's rowid, an identity).
    generated: bool,
}

impl Schema {
    fn table(&mut self, table: &str) {
        self.facts.insert(format!("table {table}"));
        self.columns.entry(table.to_string()).or_default();
    }

    fn column(&mut self, table: &str, column: Column<'_>) {
        let at = format!("column {table}.{}", column.name);
        self.facts.insert(format!("{at} type {}", column.class));
        if column.not_null {
            self.facts.insert(format!("{at} not null"));
        }
        if column.generated {
            self.facts.insert(format!("{at} generated"));
        } else if let Some(default) = column.default {
            self.facts.insert(format!("{at} default {default}"));
        }
        self.facts.insert(at);
        self.columns
            .entry(table.to_string())
            .or_default()
            .push(column.name.to_string());
    }

    /// A primary key or unique constraint.
    fn key(&mut self, kind: &str, table: &str, columns: &[String]) {
        self.facts
            .insert(format!("{kind} {table} ({})", columns.join(", ")));
    }

    fn foreign_key(
        &mut self,
        table: &str,
        columns: &[String],
        target: &str,
        target_columns: &[String],
        on_delete: &str,
        on_update: &str,
    ) {
        self.facts.insert(format!(
            "foreign key {table} ({}) -> {target} ({}) on delete {on_delete} on update {on_update}",
            columns.join(", "),
            target_columns.join(", "),
        ));
    }

    /// A CHECK constraint of `table` (its columns known already), given as the tokens
    /// between its parentheses: the columns and the constants it mentions. Operators are
    /// left out: the dialects spell them differently (`BETWEEN`, `IN` against PostgreSQL's
    /// `>= AND <=`, `= ANY (ARRAY[...])`).
    fn check(&mut self, table: &str, expression: &[Token]) {
        let columns = &self.columns[table];
        let mut mentioned = BTreeSet::new();
        let mut constants = Vec::new();
        for token in normalise(expression) {
            match token {
                Token::Word(word) => {
                    if let Some(column) = columns.iter().find(|c| c.eq_ignore_ascii_case(&word)) {
                        mentioned.insert(column.clone());
                    }
                }
                Token::Str(_) | Token::Num(_) => constants.push(render(&[token])),
                Token::Punct(_) => {}
            }
        }
        constants.sort();
        self.facts.insert(format!(
            "check {table} ({}): {}",
            mentioned.into_iter().collect::<Vec<_>>().join(", "),
            constants.join(", ")
        ));
    }

    fn index(&mut self, table: &str, name: &str, columns: &[String], unique: bool, partial: bool) {
        let mut fact = format!("index {table}.{name} ({})", columns.join(", "));
        if unique {
            fact.push_str(" unique");
        }
        if partial {
            fact.push_str(" partial");
        }
        self.facts.insert(fact);
    }
}

/// A pool of sqlx's `Any` driver on `url`: the database seen from outside the service, as
/// an earlier version of it wrote it.
async fn any_pool(url: &str) -> AnyPool {
    sqlx::any::install_default_drivers();
    AnyPool::connect(url).await.unwrap()
}

async fn schema(url: &str) -> Schema {
    if url.starts_with("sqlite:") {
        sqlite_schema(url).await
    } else {
        postgres_schema(url).await
    }
}

/// SQLite's type affinity rules (and the names that say boolean or time) as a class.
fn sqlite_class(declared: &str) -> &'static str {
    let t = declared.to_ascii_uppercase();
    if t.contains("INT") {
        "integer"
    } else if t.starts_with("BOOL") {
        "boolean"
    } else if t.contains("TIMESTAMP") || t.contains("DATE") || t.starts_with("TIME") {
        "timestamp"
    } else if t.contains("CHAR") || t.contains("CLOB") || t.contains("TEXT") {
        "text"
    } else if t.is_empty() || t.contains("BLOB") {
        "bytes"
    } else if t.contains("REAL") || t.contains("FLOA") || t.contains("DOUB") {
        "real"
    } else {
        "numeric"
    }
}

/// PostgreSQL's `information_schema` data type as a class. SQLite's integers are 64-bit,
/// so a 32- or 16-bit PostgreSQL integer is a class of its own.
fn postgres_class(data_type: &str) -> &str {
    match data_type {
        "bigint" => "integer",
        "integer" => "integer32",
        "smallint" => "integer16",
        "text" | "character varying" | "character" => "text",
        "bytea" => "bytes",
        "boolean" => "boolean",
        "real" | "double precision" => "real",
        "numeric" => "numeric",
        t if t.starts_with("timestamp") || t.starts_with("time ") || t == "date" => "timestamp",
        other => other,
    }
}

async fn sqlite_schema(url: &str) -> Schema {
    let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
    let mut schema = Schema::default();
    let tables: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, sql FROM sqlite_master WHERE type = 'table' \
         AND substr(name, 1, 7) <> 'sqlite_' AND name <> '_sqlx_migrations' ORDER BY name",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    for (table, sql) in &tables {
        schema.table(table);
        let tokens = lex(sql);
        let without_rowid = tokens.ends_with(&[word("without"), word("rowid")]);
        let columns: Vec<(String, String, i64, Option<String>, i64)> = sqlx::query_as(
            "SELECT name, type, \"notnull\", dflt_value, pk FROM pragma_table_info($1) ORDER BY cid",
        )
        .bind(table)
        .fetch_all(&mut conn)
        .await
        .unwrap();
        let indexes: Vec<(String, i64, String, i64)> = sqlx::query_as(
            "SELECT name, \"unique\", origin, partial FROM pragma_index_list($1) ORDER BY name",
        )
        .bind(table)
        .fetch_all(&mut conn)
        .await
        .unwrap();
        let mut key: Vec<(i64, &str, &str)> = columns
            .iter()
            .filter(|c| c.4 > 0)
            .map(|c| (c.4, c.0.as_str(), c.1.as_str()))
            .collect();
        key.sort();
        // The rowid itself: no index of its own, and never NULL.
        let rowid_alias = key.len() == 1
            && key[0].2.eq_ignore_ascii_case("integer")
            && !indexes.iter().any(|i| i.2 == "pk");
        for (name, declared, not_null, default, in_key) in &columns {
            let in_key = *in_key > 0;
            schema.column(
                table,
                Column {
                    name,
                    class: sqlite_class(declared),
                    not_null: *not_null == 1 || (in_key && (rowid_alias || without_rowid)),
                    default: default.as_deref().map(default_text),
                    generated: in_key && rowid_alias,
                },
            );
        }
        if !key.is_empty() {
            let key: Vec<String> = key.iter().map(|k| k.1.to_string()).collect();
            schema.key("primary key", table, &key);
        }
        for (index, unique, origin, partial) in &indexes {
            let columns: Vec<(Option<String>, i64)> = sqlx::query_as(
                "SELECT name, \"desc\" FROM pragma_index_xinfo($1) WHERE key = 1 ORDER BY seqno",
            )
            .bind(index)
            .fetch_all(&mut conn)
            .await
            .unwrap();
            let columns: Vec<String> = columns
                .into_iter()
                .map(|(name, desc)| {
                    let name = name.unwrap_or_else(|| "<expression>".into());
                    if desc == 1 {
                        format!("{name} desc")
                    } else {
                        name
                    }
                })
                .collect();
            match origin.as_str() {
                "pk" => {}
                "u" => schema.key("unique", table, &columns),
                _ => schema.index(table, index, &columns, *unique == 1, *partial == 1),
            }
        }
        let references: Vec<(i64, String, String, Option<String>, String, String)> =
            sqlx::query_as(
                "SELECT id, \"table\", \"from\", \"to\", on_update, on_delete \
                 FROM pragma_foreign_key_list($1) ORDER BY id, seq",
            )
            .bind(table)
            .fetch_all(&mut conn)
            .await
            .unwrap();
        let mut by_id: BTreeMap<i64, Vec<_>> = BTreeMap::new();
        for reference in references {
            by_id.entry(reference.0).or_default().push(reference);
        }
        for parts in by_id.values() {
            let target = &parts[0].1;
            let from: Vec<String> = parts.iter().map(|p| p.2.clone()).collect();
            let mut to: Vec<String> = parts.iter().filter_map(|p| p.3.clone()).collect();
            if to.len() != from.len() {
                // REFERENCES t without columns: t's primary key.
                to = sqlx::query_scalar(
                    "SELECT name FROM pragma_table_info($1) WHERE pk > 0 ORDER BY pk",
                )
                .bind(target)
                .fetch_all(&mut conn)
                .await
                .unwrap();
            }
            let (on_update, on_delete) = (&parts[0].4, &parts[0].5);
            schema.foreign_key(
                table,
                &from,
                target,
                &to,
                &on_delete.to_lowercase(),
                &on_update.to_lowercase(),
            );
        }
        for expression in checks(&tokens) {
            schema.check(table, expression);
        }
    }
    let others: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT type, name, tbl_name FROM sqlite_master WHERE type IN ('view', 'trigger')",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    for (kind, name, table) in others {
        schema.facts.insert(match kind.as_str() {
            "view" => format!("view {name}"),
            _ => format!("trigger {table}.{name}"),
        });
    }
    conn.close().await.unwrap();
    schema
}

/// The tables of the schema in use (`public`), ours only.
const PG_TABLES: &str = "t.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema()) \
     AND t.relkind IN ('r', 'p') AND t.relname <> '_sqlx_migrations'";

/// A constraint as read from `pg_constraint`: table, kind, columns, referenced table and
/// columns, ON DELETE, ON UPDATE, definition.
type PgConstraint = (
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    String,
    String,
    String,
);

async fn postgres_schema(url: &str) -> Schema {
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    let mut schema = Schema::default();
    let tables: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT t.relname::text FROM pg_class t WHERE {PG_TABLES} ORDER BY 1"
    ))
    .fetch_all(&mut conn)
    .await
    .unwrap();
    for table in &tables {
        schema.table(table);
    }
    let columns: Vec<(String, String, String, String, Option<String>, String)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text, data_type::text, is_nullable::text, \
                    column_default::text, is_identity::text \
             FROM information_schema.columns WHERE table_schema = current_schema() \
             ORDER BY table_name, ordinal_position",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    for (table, name, data_type, nullable, default, identity) in &columns {
        if !tables.contains(table) {
            continue;
        }
        let serial = default
            .as_deref()
            .is_some_and(|d| d.starts_with("nextval("));
        schema.column(
            table,
            Column {
                name,
                class: postgres_class(data_type),
                not_null: nullable == "NO",
                default: default.as_deref().map(default_text),
                generated: identity == "YES" || serial,
            },
        );
    }
    // Columns of a key (`conkey`/`confkey`), in the key's order.
    let key_columns = |relation: &str, key: &str| {
        format!(
            "(SELECT string_agg(a.attname::text, ',' ORDER BY k.ord) \
              FROM unnest(con.{key}) WITH ORDINALITY AS k(attnum, ord) \
              JOIN pg_attribute a ON a.attrelid = con.{relation} AND a.attnum = k.attnum)"
        )
    };
    let constraints: Vec<PgConstraint> = sqlx::query_as(&format!(
        "SELECT t.relname::text, con.contype::text, {}, r.relname::text, {}, \
                    con.confdeltype::text, con.confupdtype::text, pg_get_constraintdef(con.oid) \
             FROM pg_constraint con \
             JOIN pg_class t ON t.oid = con.conrelid \
             LEFT JOIN pg_class r ON r.oid = con.confrelid \
             WHERE {PG_TABLES} AND con.contype IN ('p', 'u', 'f', 'c')",
        key_columns("conrelid", "conkey"),
        key_columns("confrelid", "confkey"),
    ))
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let split = |list: &Option<String>| -> Vec<String> {
        list.as_deref()
            .map(|l| l.split(',').map(String::from).collect())
            .unwrap_or_default()
    };
    let action = |code: &str| match code {
        "a" => "no action".to_string(),
        "r" => "restrict".to_string(),
        "c" => "cascade".to_string(),
        "n" => "set null".to_string(),
        "d" => "set default".to_string(),
        other => other.to_string(),
    };
    for (table, kind, columns, target, target_columns, on_delete, on_update, definition) in
        &constraints
    {
        match kind.as_str() {
            "p" => schema.key("primary key", table, &split(columns)),
            "u" => schema.key("unique", table, &split(columns)),
            "f" => schema.foreign_key(
                table,
                &split(columns),
                target.as_deref().unwrap_or_default(),
                &split(target_columns),
                &action(on_delete),
                &action(on_update),
            ),
            _ => {
                for expression in checks(&lex(definition)) {
                    schema.check(table, expression);
                }
            }
        }
    }
    // Indexes of their own, not those behind a primary key or unique constraint.
    let indexes: Vec<(String, String, bool, bool, Option<String>)> = sqlx::query_as(&format!(
        "SELECT t.relname::text, i.relname::text, x.indisunique, x.indpred IS NOT NULL, \
                (SELECT string_agg(CASE WHEN k.attnum = 0 THEN '<expression>' ELSE a.attname::text END \
                                   || CASE WHEN (x.indoption[(k.ord - 1)::int]::int & 1) = 1 THEN ' desc' ELSE '' END, \
                                   ',' ORDER BY k.ord) \
                 FROM unnest(x.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
                 LEFT JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum \
                 WHERE k.ord <= x.indnkeyatts) \
         FROM pg_index x \
         JOIN pg_class i ON i.oid = x.indexrelid \
         JOIN pg_class t ON t.oid = x.indrelid \
         WHERE {PG_TABLES} AND NOT EXISTS ( \
             SELECT 1 FROM pg_constraint con WHERE con.conindid = x.indexrelid \
             AND con.conrelid = x.indrelid AND con.contype IN ('p', 'u', 'x'))"
    ))
    .fetch_all(&mut conn)
    .await
    .unwrap();
    for (table, index, unique, partial, columns) in &indexes {
        schema.index(table, index, &split(columns), *unique, *partial);
    }
    let views: Vec<String> = sqlx::query_scalar(
        "SELECT viewname::text FROM pg_views WHERE schemaname = current_schema()",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    for view in views {
        schema.facts.insert(format!("view {view}"));
    }
    let triggers: Vec<(String, String)> = sqlx::query_as(&format!(
        "SELECT t.relname::text, g.tgname::text FROM pg_trigger g \
         JOIN pg_class t ON t.oid = g.tgrelid WHERE {PG_TABLES} AND NOT g.tgisinternal"
    ))
    .fetch_all(&mut conn)
    .await
    .unwrap();
    for (table, trigger) in triggers {
        schema.facts.insert(format!("trigger {table}.{trigger}"));
    }
    conn.close().await.unwrap();
    schema
}

// ---------------------------------------------------------------------------------------
// Just enough SQL lexing for CHECK constraints and defaults
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Token {
    /// A keyword or identifier: lower-cased unless it was quoted.
    Word(String),
    /// A string constant, unquoted.
    Str(String),
    Num(String),
    Punct(String),
}

fn word(w: &str) -> Token {
    Token::Word(w.to_string())
}

fn punct(p: &str) -> Token {
    Token::Punct(p.to_string())
}

/// Tokens of `sql`, comments left out.
fn lex(sql: &str) -> Vec<Token> {
    let chars: Vec<char> = sql.chars().collect();
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '-' && at(i + 1) == '-' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            i += 2;
            while i < chars.len() && !(chars[i] == '*' && at(i + 1) == '/') {
                i += 1;
            }
            i += 2;
        } else if c == '\'' || c == '"' || c == '`' {
            // A string or a quoted identifier; the quote doubled stands for itself.
            let mut text = String::new();
            i += 1;
            while i < chars.len() {
                if chars[i] == c {
                    if at(i + 1) == c {
                        text.push(c);
                        i += 2;
                        continue;
                    }
                    break;
                }
                text.push(chars[i]);
                i += 1;
            }
            i += 1;
            tokens.push(if c == '\'' {
                Token::Str(text)
            } else {
                Token::Word(text)
            });
        } else if c.is_ascii_digit() || (c == '.' && at(i + 1).is_ascii_digit()) {
            let start = i;
            while at(i).is_ascii_alphanumeric() || at(i) == '.' {
                i += 1;
            }
            tokens.push(Token::Num(chars[start..i].iter().collect()));
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while at(i).is_alphanumeric() || at(i) == '_' || at(i) == '$' {
                i += 1;
            }
            let w: String = chars[start..i].iter().collect();
            tokens.push(Token::Word(w.to_lowercase()));
        } else {
            let two: String = [c, at(i + 1)].iter().collect();
            if ["::", ">=", "<=", "<>", "!=", "==", "||"].contains(&two.as_str()) {
                tokens.push(Token::Punct(two));
                i += 2;
            } else {
                tokens.push(Token::Punct(c.to_string()));
                i += 1;
            }
        }
    }
    tokens
}

/// The expressions of the `CHECK (...)` constraints among `tokens`, without their
/// parentheses.
fn checks(tokens: &[Token]) -> Vec<&[Token]> {
    let mut found = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        if tokens[i] == word("check") && tokens.get(i + 1) == Some(&punct("(")) {
            let start = i + 2;
            let mut depth = 1;
            let mut j = start;
            while j < tokens.len() && depth > 0 {
                if tokens[j] == punct("(") {
                    depth += 1;
                } else if tokens[j] == punct(")") {
                    depth -= 1;
                }
                j += 1;
            }
            found.push(&tokens[start..j - 1]);
            i = j;
        } else {
            i += 1;
        }
    }
    found
}

/// Words that continue a type name after its first (`double precision`, `character
/// varying`, `timestamp with time zone`).
const TYPE_WORDS: &[&str] = &["precision", "varying", "with", "without", "time", "zone"];
const NUMERIC_TYPES: &[&str] = &[
    "integer", "bigint", "smallint", "numeric", "real", "double", "int", "int2", "int4", "int8",
];

/// `tokens` with both dialects' spellings of a constant made one: PostgreSQL's casts taken
/// out (`''::text` is `''`; a quoted number cast to a number, as PostgreSQL prints negative
/// constants, is that number) and a unary minus joined to its number.
fn normalise(tokens: &[Token]) -> Vec<Token> {
    let mut out: Vec<Token> = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i] {
            Token::Punct(p) if p == "::" => {
                i += 1;
                let mut numeric = false;
                let mut first = true;
                while let Some(Token::Word(w)) = tokens.get(i) {
                    if !first && !TYPE_WORDS.contains(&w.as_str()) {
                        break;
                    }
                    numeric |= NUMERIC_TYPES.contains(&w.as_str());
                    first = false;
                    i += 1;
                }
                if tokens.get(i) == Some(&punct("(")) {
                    while i < tokens.len() && tokens[i] != punct(")") {
                        i += 1;
                    }
                    i += 1;
                }
                while tokens.get(i) == Some(&punct("[")) && tokens.get(i + 1) == Some(&punct("]")) {
                    i += 2;
                }
                if let Some(Token::Str(s)) = out.last()
                    && numeric
                    && s.parse::<f64>().is_ok()
                {
                    let n = s.clone();
                    *out.last_mut().unwrap() = Token::Num(n);
                }
            }
            Token::Num(n) if out.last() == Some(&punct("-")) && unary(&out[..out.len() - 1]) => {
                out.pop();
                out.push(Token::Num(format!("-{n}")));
                i += 1;
            }
            token => {
                out.push(token.clone());
                i += 1;
            }
        }
    }
    out
}

/// Whether a `-` after `before` is a sign: it follows no operand (nothing, an operator, an
/// opening parenthesis, a comma or a keyword).
fn unary(before: &[Token]) -> bool {
    const KEYWORDS: &[&str] = &[
        "and", "or", "not", "between", "in", "is", "like", "when", "then", "else", "default",
        "check",
    ];
    match before.last() {
        None => true,
        Some(Token::Punct(p)) => p != ")",
        Some(Token::Word(w)) => KEYWORDS.contains(&w.as_str()),
        Some(Token::Str(_) | Token::Num(_)) => false,
    }
}

fn render(tokens: &[Token]) -> String {
    let mut text = String::new();
    for (i, token) in tokens.iter().enumerate() {
        let spaced = |t: &Token| !matches!(t, Token::Punct(_));
        if i > 0 && spaced(token) && spaced(&tokens[i - 1]) {
            text.push(' ');
        }
        match token {
            Token::Word(w) => text.push_str(w),
            Token::Str(s) => {
                text.push('\'');
                text.push_str(&s.replace('\'', "''"));
                text.push('\'');
            }
            Token::Num(n) => text.push_str(n),
            Token::Punct(p) => text.push_str(p),
        }
    }
    text
}

/// A column default as both dialects can state it: casts out, outer parentheses off.
fn default_text(raw: &str) -> String {
    let mut tokens = normalise(&lex(raw));
    while tokens.len() >= 2 && tokens[0] == punct("(") && {
        // The first parenthesis closes at the very end.
        let mut depth = 0;
        tokens.iter().enumerate().all(|(i, t)| {
            if *t == punct("(") {
                depth += 1;
            } else if *t == punct(")") {
                depth -= 1;
            }
            depth > 0 || i == tokens.len() - 1
        })
    } {
        tokens = tokens[1..tokens.len() - 1].to_vec();
    }
    render(&tokens)
}

#[test]
fn constants_read_the_same_in_both_dialects() {
    assert_eq!(default_text("''::text"), "''");
    assert_eq!(default_text("''"), "''");
    assert_eq!(default_text("'-1'::integer"), "-1");
    assert_eq!(default_text("-1"), "-1");
    assert_eq!(default_text("(1)"), "1");
    assert_eq!(default_text("'a'::character varying"), "'a'");
    assert_eq!(default_text("now()"), "now()");
    let sqlite = lex(
        "CREATE TABLE t (\n  a INTEGER CHECK (a BETWEEN -5 AND 10), -- a (comment)\n  \
                      b TEXT CHECK (b IN ('x', 'it''s'))\n)",
    );
    let postgres = lex("CHECK (((a >= '-5'::integer) AND (a <= 10)))");
    let both: Vec<Vec<Token>> = checks(&sqlite).into_iter().map(normalise).collect();
    assert_eq!(both.len(), 2);
    assert!(both[0].contains(&Token::Num("-5".into())), "{both:?}");
    assert!(both[1].contains(&Token::Str("it's".into())), "{both:?}");
    let pg = normalise(checks(&postgres)[0]);
    assert!(pg.contains(&Token::Num("-5".into())), "{pg:?}");
    assert!(pg.contains(&Token::Num("10".into())), "{pg:?}");
}

// ---------------------------------------------------------------------------------------
// Upgrade from an earlier version
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_database_of_version_0002_keeps_its_data_and_gets_the_backfills() {
    upgrade_from(2).await;
}

#[tokio::test]
async fn a_database_of_version_0005_keeps_its_data_and_its_audit_chain() {
    upgrade_from(5).await;
}

/// Migration 0019 on SQLite builds `cases`, their versions, the versions' genes and HPO
/// terms and the research rows anew (SQLite cannot drop a UNIQUE constraint), and the
/// decisions in force too: every row of every table, every column of before included
/// (the later ones: `code_releases`, `slot`, `genes`, `phenotypes`), keeps the values it
/// had, the case ids the versions and research rows refer to among them, and every row
/// carries its patient's number. On PostgreSQL the migration adds columns in place; the
/// upgrades from 0002 and 0005 run through it there.
#[tokio::test]
async fn migration_0019_rebuilds_the_case_tables_without_losing_a_value() {
    let dir = tempfile::tempdir().unwrap();
    let (url, store, pool) = at_version(&dir, 18).await;
    if store.backend() != Backend::Sqlite {
        store.close().await;
        return;
    }
    let pool = &pool;
    // The registries as the first start seeds them (src/erns.csv).
    seed_registries(pool, 0).await;
    let r = scalar(pool, "SELECT id FROM registries WHERE code = 'ERN-LUNG'").await;
    exec(
        pool,
        &format!(
            "INSERT INTO centres (id, code, name, country, created_at) \
             VALUES (1, 'NL-AMC', 'a', 'NL', 0), (2, 'BE-UZL', 'b', 'BE', 0); \
         INSERT INTO principals (id, name, role, centre_id, created_at) \
             VALUES (1, 'dr-a', 'physician', 1, 0), (2, 'dr-b', 'physician', 2, 0); \
         INSERT INTO consent_events (id, registry_id, pseudonym, scope, state, given_at, \
                 form_version, expires_at, recorded_by, recorded_at, source, audit_seq) VALUES \
             (1, {r}, 'R001-V001-B', 'registry_inclusion', 'granted', 10, 'v1', NULL, 1, 11, \
              'physician_attestation', 0), \
             (2, {r}, 'R001-V001-B', 'research_use', 'granted', 10, 'v1', 99999, 1, 11, \
              'physician_attestation', 0), \
             (3, {r}, 'R001-V001-A', 'registry_inclusion', 'granted', 20, 'v2', NULL, 2, 21, \
              'physician_attestation', NULL), \
             (4, {r}, 'R001-V001-C', 'registry_inclusion', 'refused', 30, 'v2', NULL, 1, 31, \
              'consent_officer', NULL); \
         INSERT INTO consent_current (registry_id, pseudonym, scope, event_id, state, given_at, \
                 expires_at) VALUES \
             ({r}, 'R001-V001-B', 'registry_inclusion', 1, 'granted', 10, NULL), \
             ({r}, 'R001-V001-B', 'research_use', 2, 'granted', 10, 99999), \
             ({r}, 'R001-V001-A', 'registry_inclusion', 3, 'granted', 20, NULL), \
             ({r}, 'R001-V001-C', 'registry_inclusion', 4, 'refused', 30, NULL); \
         INSERT INTO cases (id, registry_id, pseudonym, centre_id, current_version, created_at, \
                 updated_at) VALUES \
             (5, {r}, 'R001-V001-B', 1, 2, 12, 40), (7, {r}, 'R001-V001-B', 2, 1, 13, 13), \
             (9, {r}, 'R001-V001-A', 1, 1, 22, 22); \
         INSERT INTO case_versions (case_id, version, recorded_at, recorded_by, \
                 birth_year_month, sex, status, date_of_death, first_contact_date, onset_kind, \
                 onset_date, undiagnosed, orphacode, diagnosis_date, icd10, icd11, omim, \
                 hpo_terms, icf_codes, genetic_findings, diagnosis_year, onset_age_days, \
                 diagnosis_age_days, delay_days, code_releases) VALUES \
             (5, 1, 12, 1, '2001-02', 'female', 'alive', NULL, '2010-01', 'date', '2003', 0, \
              586, '2012-05-06', 'E84.0', 'CA25', '219700', 'HP:0001', 'b230', 'CFTR|c.1', \
              2012, 700, 4100, 3400, NULL), \
             (5, 2, 40, 1, '2001-02', 'female', 'deceased', '2020-01', '2010-01', 'date', \
              '2003', 0, 586, '2012-05-06', 'E84.0', 'CA25', '219700', 'HP:0001 HP:0002', '', \
              'CFTR|c.1|c.2 SCNN1A', 2012, 700, 4100, 3400, 'hpo=2025-01-16'), \
             (7, 1, 13, 2, '2001-02', 'female', 'alive', NULL, NULL, 'unknown', NULL, 1, NULL, \
              NULL, '', '', '', '', '', '', NULL, NULL, NULL, NULL, ''), \
             (9, 1, 22, 2, '1999-12', 'male', 'alive', NULL, NULL, 'congenital', NULL, 0, 166, \
              NULL, '', '', '', 'HP:0003', '', '', NULL, 0, NULL, NULL, NULL); \
         INSERT INTO case_genes (case_id, version, gene) VALUES \
             (5, 1, 'CFTR'), (5, 2, 'CFTR'), (5, 2, 'SCNN1A'); \
         INSERT INTO case_phenotypes (case_id, version, term) VALUES \
             (5, 1, 'HP:0001'), (5, 2, 'HP:0001'), (5, 2, 'HP:0002'), (9, 1, 'HP:0003'); \
         INSERT INTO patients (registry_id, pseudonym, case_id, version, centre_id, country, \
                 orphacode, sex, status, diagnosis_year, onset_age_days, diagnosis_age_days, \
                 delay_days, eligible, eligible_until, slot, genes, phenotypes) VALUES \
             ({r}, 'R001-V001-B', 5, 2, 1, 'NL', 586, 'female', 'deceased', 2012, 700, 4100, \
              3400, 1, 99999, 0, 'CFTR SCNN1A', 'HP:0001 HP:0002'), \
             ({r}, 'R001-V001-A', 9, 1, 1, 'NL', 166, 'male', 'alive', NULL, 0, NULL, NULL, 0, \
              NULL, NULL, '', 'HP:0003');"
        ),
    )
    .await;
    let mut before = BTreeMap::new();
    for (table, columns) in schema(&url).await.columns {
        let columns = columns.join(", ");
        let rows = rows(pool, &table, &columns).await;
        before.insert(table, (columns, rows));
    }
    for table in [
        "consent_events",
        "consent_current",
        "cases",
        "case_versions",
        "case_genes",
        "case_phenotypes",
        "patients",
    ] {
        assert!(!before[table].1.is_empty(), "{table} is empty");
    }

    store.migrate().await.unwrap();

    for (table, (columns, rows_before)) in &before {
        assert_eq!(
            &rows(pool, table, columns).await,
            rows_before,
            "{table} changed in migration 0019"
        );
    }
    // A number per patient, and each row with its patient's.
    assert_eq!(
        rows(pool, "patient_keys", "registry_id, pseudonym").await,
        ["A", "B", "C"].map(|p| format!("{r} | R001-V001-{p}"))
    );
    for table in ["consent_events", "consent_current", "cases", "patients"] {
        let sql = format!(
            "SELECT COUNT(*) FROM {table} t WHERE NOT EXISTS (SELECT 1 FROM patient_keys k \
             WHERE k.id = t.patient AND k.registry_id = t.registry_id \
               AND k.pseudonym = t.pseudonym)"
        );
        assert_eq!(
            scalar(pool, &sql).await,
            0,
            "{table} without its patient's number"
        );
    }
    // The rebuilt tables' foreign keys hold and point at the new tables: a case's versions,
    // genes and HPO terms go with it.
    assert_eq!(
        scalar(pool, "SELECT COUNT(*) FROM pragma_foreign_key_check").await,
        0
    );
    exec(
        pool,
        "DELETE FROM patients WHERE case_id = 7; DELETE FROM cases WHERE id = 7",
    )
    .await;
    assert_eq!(
        scalar(pool, "SELECT COUNT(*) FROM case_versions WHERE case_id = 7").await,
        0
    );
    exec(pool, "DELETE FROM patients; DELETE FROM cases WHERE id = 5").await;
    for table in ["case_versions", "case_genes", "case_phenotypes"] {
        let sql = format!("SELECT COUNT(*) FROM {table} WHERE case_id = 5");
        assert_eq!(
            scalar(pool, &sql).await,
            0,
            "{table} kept rows of a deleted case"
        );
    }
    let sql = "SELECT COUNT(*) FROM sqlite_schema WHERE name LIKE '%before_keys%' \
               OR sql LIKE '%before_keys%'";
    assert_eq!(scalar(pool, sql).await, 0);
    store.close().await;
}

/// Migration 0017 (instants TIMESTAMPTZ, flags BOOLEAN on PostgreSQL; nothing to convert
/// on SQLite) keeps every instant to the millisecond, at the edges too (before 1970, a
/// millisecond either side of the epoch, year 9999), and every flag, and the store reads
/// them back as the instants and flags they were. On whichever database the pass runs on.
#[tokio::test]
async fn migration_0017_keeps_every_instant_to_the_millisecond_and_every_flag() {
    const INSTANTS: [i64; 9] = [
        -86_400_001,
        -1,
        0,
        1,
        T0 + 123,
        32_503_680_000_123, // 3000-01-01T00:00:00.123Z
        // After the year 4253 a float8 product of n milliseconds rounds: these read back a
        // millisecond early through one.
        253_402_300_799_997,
        253_402_300_799_001,
        253_402_300_799_999, // 9999-12-31T23:59:59.999Z
    ];
    let dir = tempfile::tempdir().unwrap();
    let (_, store, pool) = &at_version(&dir, 16).await;
    exec(
        pool,
        "INSERT INTO registries (id, code, name, scope, created_at) \
         VALUES (900, 'TEST-0017', 'not seeded', 'a test', 0); \
         INSERT INTO principals (id, name, role, centre_id, created_at) \
         VALUES (900, 'co-old', 'consent_officer', NULL, 0);",
    )
    .await;
    for (i, ms) in INSTANTS.iter().enumerate() {
        let expires = if i % 2 == 0 {
            "NULL".to_string()
        } else {
            (ms + 1).to_string()
        };
        exec(
            pool,
            &format!(
                "INSERT INTO consent_events (id, registry_id, pseudonym, scope, state, given_at, \
                                             form_version, expires_at, recorded_by, recorded_at, \
                                             source) \
                 VALUES ({id}, 900, 'R900-P{i}', 'research_use', 'granted', {ms}, 'v1', \
                         {expires}, 900, {ms}, 'physician_attestation'); \
                 INSERT INTO code_releases (id, system, version, released_on, imported_at, \
                                            source, terms, in_force, staged_at) \
                 VALUES ({id}, 'hpo', 'v{i}', NULL, {ms}, 'a file', 1, {flag}, {staged}); \
                 INSERT INTO code_terms (release_id, code, label, obsolete, replaced_by) \
                 VALUES ({id}, 'HP:0000001', 'All', {flag}, NULL);",
                id = i + 1,
                flag = i64::from(i == 1),
                staged = if i == 1 {
                    "NULL".to_string()
                } else {
                    ms.to_string()
                },
            ),
        )
        .await;
    }
    let tables = [
        ("consent_events", "id, given_at, expires_at, recorded_at"),
        ("code_releases", "id, imported_at, in_force, staged_at"),
        ("code_terms", "release_id, obsolete"),
    ];
    let mut before = Vec::new();
    for (table, columns) in tables {
        before.push(rows(pool, table, columns).await);
    }
    assert!(before[0].contains(&format!(
        "8 | {} | 253402300799002 | {}",
        INSTANTS[7], INSTANTS[7]
    )));

    store.migrate().await.unwrap();
    for ((table, columns), rows_before) in tables.iter().zip(&before) {
        assert_eq!(&rows(pool, table, columns).await, rows_before, "{table}");
    }
    // Read by the store as instants and flags.
    use ern_registry::store::db;
    let read = db::query("SELECT given_at, expires_at FROM consent_events ORDER BY id")
        .fetch_all(store.pool())
        .await
        .unwrap();
    for (i, (row, ms)) in read.iter().zip(INSTANTS).enumerate() {
        let given: chrono::DateTime<chrono::Utc> = row.try_get(0).unwrap();
        let expires: Option<chrono::DateTime<chrono::Utc>> = row.try_get(1).unwrap();
        assert_eq!(given.timestamp_millis(), ms);
        assert_eq!(
            expires.map(|t| t.timestamp_millis()),
            (i % 2 == 1).then_some(ms + 1)
        );
    }
    let flags = db::query("SELECT in_force FROM code_releases ORDER BY id")
        .fetch_scalars::<bool>(store.pool())
        .await
        .unwrap();
    let expected: Vec<bool> = (0..INSTANTS.len()).map(|i| i == 1).collect();
    assert_eq!(flags, expected);
    // The release in force is found by its partial index's own test, on both databases.
    assert_eq!(store.code_releases_in_force().await.unwrap(), [2]);
    store.close().await;
}

/// 2024-03-01T10:00:00Z, in milliseconds.
const T0: i64 = 1_709_287_200_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;
/// 2030-01-01T00:00:00Z: when patient A's RESEARCH_USE consent expires.
const RESEARCH_EXPIRY: i64 = 1_893_456_000_000;
const REGISTRY: &str = "ERN-LUNG";

const MINUTE: i64 = 60_000;

/// The rows of `table` as text (the `columns`' values joined by ` | `, NULL as `NULL`),
/// sorted.
///
/// An instant reads as its integer milliseconds and a flag as 0 or 1 on both databases: as
/// SQLite keeps them, and as PostgreSQL kept them before migration 0017 made them
/// TIMESTAMPTZ and BOOLEAN. So a row reads the same before and after that conversion
/// exactly when every value came through it unchanged.
async fn rows(pool: &AnyPool, table: &str, columns: &str) -> Vec<String> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut conn = pool.acquire().await.unwrap();
    if conn.backend_name() == "PostgreSQL" {
        for row in sqlx::query(&format!(
            "SELECT column_name::TEXT, data_type::TEXT FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = '{table}'"
        ))
        .fetch_all(&mut *conn)
        .await
        .unwrap()
        {
            types.insert(row.get(0), row.get(1));
        }
    }
    drop(conn);
    let values: Vec<String> = columns
        .split(", ")
        .map(|c| {
            let value = match types.get(c).map(String::as_str) {
                Some("timestamp with time zone") => {
                    format!("CAST(FLOOR(EXTRACT(EPOCH FROM \"{c}\") * 1000) AS BIGINT)")
                }
                Some("boolean") => format!("CAST(\"{c}\" AS INTEGER)"),
                _ => format!("\"{c}\""),
            };
            format!("COALESCE(CAST({value} AS TEXT), 'NULL')")
        })
        .collect();
    let sql = format!("SELECT {} FROM {table}", values.join(" || ' | ' || "));
    let mut rows: Vec<String> = sqlx::query(&sql)
        .fetch_all(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|row| row.get(0))
        .collect();
    rows.sort();
    rows
}

/// The one integer `sql` returns (a count, an id from `RETURNING`).
async fn scalar(pool: &AnyPool, sql: &str) -> i64 {
    sqlx::query(sql)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get::<i64, _>(0)
}

async fn exec(pool: &AnyPool, sql: &str) {
    sqlx::raw_sql(sql)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

fn null_or(value: Option<i64>) -> String {
    value.map_or_else(|| "NULL".to_string(), |v| v.to_string())
}

/// An audit entry of the first encoding (before migration 0009).
struct LegacyEntry {
    at: i64,
    principal_id: Option<i64>,
    principal: &'static str,
    role: &'static str,
    centre: &'static str,
    method: &'static str,
    registry: &'static str,
    outcome: &'static str,
    items: i64,
}

/// The MAC of a version 1 entry. That encoding is frozen (every database of before 0009
/// holds it), so it is written out here from its description (src/audit.rs) rather than
/// taken from the code that must go on verifying it.
fn mac_v1(master: &MasterSecret, previous: &str, seq: i64, e: &LegacyEntry) -> String {
    struct Len32;
    impl hkdf::KeyType for Len32 {
        fn len(&self) -> usize {
            32
        }
    }
    let mut key = [0u8; 32];
    hkdf::Salt::new(hkdf::HKDF_SHA256, b"ern-registry")
        .extract(master.expose_secret())
        .expand(&[b"ern-registry audit log key v1"], Len32)
        .unwrap()
        .fill(&mut key)
        .unwrap();
    let mut ctx = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, &key));
    ctx.update(b"ern-registry audit v1");
    ctx.update(&if previous.is_empty() {
        vec![0u8; 32]
    } else {
        hex::decode(previous).unwrap()
    });
    let principal_id = e
        .principal_id
        .map_or_else(Vec::new, |id| id.to_be_bytes().to_vec());
    let fields: [&[u8]; 10] = [
        &seq.to_be_bytes(),
        &e.at.to_be_bytes(),
        &principal_id,
        e.principal.as_bytes(),
        e.role.as_bytes(),
        e.centre.as_bytes(),
        e.method.as_bytes(),
        e.registry.as_bytes(),
        e.outcome.as_bytes(),
        &e.items.to_be_bytes(),
    ];
    for field in fields {
        ctx.update(&(field.len() as u64).to_be_bytes());
        ctx.update(field);
    }
    hex::encode(ctx.sign().as_ref())
}

/// What the earlier version wrote, and what the upgrade must make of it.
struct Legacy {
    /// The physician's API key (stored as an Argon2id hash, as then).
    token: String,
    /// Patient A: a case of two versions, every scope decided.
    a: String,
    /// Consent events and tombstones written: all to be adopted by the audit.
    rows_to_adopt: i64,
    /// `consent_current` and `patients` as [`rows`] reads them, as the writer keeps them.
    consent_current: Vec<String>,
    patients: Vec<String>,
    /// Methods of the audit entries written, in order.
    audit_methods: Vec<&'static str>,
}

/// Version `version` of a case: the cystic fibrosis record of `helpers::record` (its HPO
/// and ICF codes from version 2 on), with the derived values the writer stored.
async fn case_version(pool: &AnyPool, case: i64, version: i64, at: i64, by: i64, sex: &str) {
    let (hpo, icf) = if version >= 2 {
        ("HP:0006528", "b440")
    } else {
        ("", "")
    };
    exec(
        pool,
        &format!(
            "INSERT INTO case_versions (case_id, version, recorded_at, recorded_by, \
                 birth_year_month, sex, status, date_of_death, first_contact_date, onset_kind, \
                 onset_date, undiagnosed, orphacode, diagnosis_date, icd10, icd11, omim, \
                 hpo_terms, icf_codes, genetic_findings, diagnosis_year, onset_age_days, \
                 diagnosis_age_days, delay_days) \
             VALUES ({case}, {version}, {at}, {by}, '2015-06', '{sex}', 'alive', NULL, '2016-02', \
                 'date', '2015-09', 0, 586, '2016-03-14', 'E84.0', 'CA25', 'OMIM:219700', \
                 '{hpo}', '{icf}', 'CFTR|NM_000492.4:c.1521_1523del', 2016, 92, 272, 180); \
             INSERT INTO case_genes (case_id, version, gene) VALUES ({case}, {version}, 'CFTR');"
        ),
    )
    .await;
}

/// Writes, through SQL, what a server of migration `version` (2 to 8) stored: the seeded
/// registries, a centre of ERN-LUNG with a physician (an Argon2id key), a registry-level
/// consent officer, and three patients of ERN-LUNG: A (inclusion and research use granted,
/// research use until 2030, recontact refused; a case updated once), B (inclusion withdrawn:
/// the case erased, a tombstone) and C (research use refused; a case). From 0003 the writer
/// also kept `consent_current` and `patients`, from 0004 an audit entry per call; from 0005
/// a certificate could be bound.
/// The registries as the first start seeds them (src/erns.csv), created at `at` (integer
/// milliseconds: the databases of before migration 0017 and SQLite's).
async fn seed_registries(pool: &AnyPool, at: i64) {
    for (i, line) in include_str!("../../src/erns.csv")
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .enumerate()
    {
        let fields: Vec<&str> = line.splitn(3, ',').map(str::trim).collect();
        sqlx::query(
            "INSERT INTO registries (id, code, name, scope, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(i as i64 + 1)
        .bind(fields[0])
        .bind(fields[1])
        .bind(fields[2])
        .bind(at)
        .execute(pool)
        .await
        .unwrap();
    }
}

async fn write_legacy(pool: &AnyPool, master: &MasterSecret, version: i64) -> Legacy {
    // The registries, seeded at first start as today (src/erns.csv); one with its own k.
    seed_registries(pool, T0 - DAY).await;
    exec(
        pool,
        "UPDATE registries SET min_cell_count = 7 WHERE code = 'ERN-LUNG'",
    )
    .await;
    let registry = scalar(pool, "SELECT id FROM registries WHERE code = 'ERN-LUNG'").await;
    let before = T0 - DAY;
    let centre = scalar(
        pool,
        &format!(
            "INSERT INTO centres (code, name, country, created_at) \
             VALUES ('NL-AMC', 'NL-AMC hospital', 'NL', {before}) RETURNING id"
        ),
    )
    .await;
    let physician = scalar(
        pool,
        &format!(
            "INSERT INTO principals (name, role, centre_id, created_at) \
             VALUES ('dr-old', 'physician', {centre}, {before}) RETURNING id"
        ),
    )
    .await;
    let officer = scalar(
        pool,
        &format!(
            "INSERT INTO principals (name, role, centre_id, created_at) \
             VALUES ('co-old', 'consent_officer', NULL, {before}) RETURNING id"
        ),
    )
    .await;
    exec(
        pool,
        &format!(
            "INSERT INTO centre_registries (centre_id, registry_id) VALUES ({centre}, {registry}); \
             INSERT INTO principal_registries (principal_id, registry_id) \
             VALUES ({officer}, {registry});"
        ),
    )
    .await;

    // The physician's key, hashed with Argon2id as keys were then.
    let issued = auth::issue_key(&SystemRandom::new(), &KeyHasher::derive(master)).unwrap();
    let token = issued.token.expose_secret().to_string();
    let argon2 = argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon2::Params::new(19 * 1024, 2, 1, None).unwrap(),
    );
    let salt = argon2::password_hash::SaltString::encode_b64(&[7u8; 16]).unwrap();
    let secret = &token.as_bytes()[21..];
    let phc = argon2::password_hash::PasswordHasher::hash_password(&argon2, secret, &salt)
        .unwrap()
        .to_string();
    sqlx::query(
        "INSERT INTO api_keys (key_id, principal_id, secret_hash, created_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(&issued.key_id)
    .bind(physician)
    .bind(phc)
    .bind(before)
    .execute(pool)
    .await
    .unwrap();

    // The patients' pseudonyms, derived as the service derives them.
    let pseudonymiser = Pseudonymiser::new(master);
    let pseudonym = |seed: u32| {
        let identity =
            ern_registry::api::convert::patient_identity(&national("NL", &bsn(seed))).unwrap();
        let registry = RegistryRef {
            seq: registry as u16,
            code: REGISTRY,
            key_version: 1,
        };
        pseudonymiser
            .derive(registry, &identity)
            .as_str()
            .to_string()
    };
    let (a, b, c) = (pseudonym(9001), pseudonym(9002), pseudonym(9003));

    // Their consent history: A decided at T0, B an hour later (inclusion withdrawn at
    // T0 + 10 days), C a day later.
    let withdrawn = T0 + 10 * DAY;
    let decisions: [(&str, &str, &str, i64, Option<i64>); 8] = [
        (&a, "registry_inclusion", "granted", T0, None),
        (&a, "research_use", "granted", T0, Some(RESEARCH_EXPIRY)),
        (&a, "recontact", "refused", T0, None),
        (&b, "registry_inclusion", "granted", T0 + HOUR, None),
        (&b, "research_use", "granted", T0 + HOUR, None),
        (&b, "registry_inclusion", "withdrawn", withdrawn, None),
        (&c, "registry_inclusion", "granted", T0 + DAY, None),
        (&c, "research_use", "refused", T0 + DAY, None),
    ];
    let mut consent_current = Vec::new();
    let mut in_force = Vec::new();
    for (i, &(patient, scope, state, given, expires)) in decisions.iter().enumerate() {
        let (by, source) = if state == "withdrawn" {
            (officer, "consent_officer")
        } else {
            (physician, "physician_attestation")
        };
        let id = scalar(
            pool,
            &format!(
                "INSERT INTO consent_events (registry_id, pseudonym, scope, state, given_at, \
                     form_version, expires_at, recorded_by, recorded_at, source) \
                 VALUES ({registry}, '{patient}', '{scope}', '{state}', {given}, 'ERN-2024-01', \
                     {}, {by}, {}, '{source}') RETURNING id",
                null_or(expires),
                given + MINUTE,
            ),
        )
        .await;
        // In force: the latest decision per scope (B's first inclusion is withdrawn).
        if i != 3 {
            let values = format!("{id}, '{state}', {given}, {}", null_or(expires));
            in_force.push(format!("({registry}, '{patient}', '{scope}', {values})"));
            consent_current.push(format!(
                "{registry} | {patient} | {scope} | {id} | {state} | {given} | {}",
                null_or(expires)
            ));
        }
        if state == "withdrawn" {
            exec(
                pool,
                &format!(
                    "INSERT INTO erasures (receipt_id, registry_id, pseudonym, erased_at, \
                         erased_by, reason, cases_erased, versions_erased, consent_event_id) \
                     VALUES ('0f1e2d3c4b5a69788796a5b4c3d2e1f0', {registry}, '{patient}', {}, \
                         {officer}, 'patient_request', 1, 1, {id})",
                    given + MINUTE
                ),
            )
            .await;
        }
    }

    // Their cases at NL-AMC: A's updated once, C's; B's was erased with the withdrawal.
    let insert_case = |patient: &str, version: i64, created: i64, updated: i64| {
        format!(
            "INSERT INTO cases (registry_id, pseudonym, centre_id, current_version, created_at, \
                 updated_at) \
             VALUES ({registry}, '{patient}', {centre}, {version}, {created}, {updated}) \
             RETURNING id"
        )
    };
    let case_a = scalar(pool, &insert_case(&a, 2, T0 + MINUTE, T0 + 5 * DAY)).await;
    case_version(pool, case_a, 1, T0 + MINUTE, physician, "female").await;
    case_version(pool, case_a, 2, T0 + 5 * DAY, physician, "female").await;
    let case_c = scalar(
        pool,
        &insert_case(&c, 1, T0 + DAY + MINUTE, T0 + DAY + MINUTE),
    )
    .await;
    case_version(pool, case_c, 1, T0 + DAY + MINUTE, physician, "male").await;
    // Research rows: A eligible until its research use expires; C not eligible.
    let research = [
        (&a, case_a, 2, "female", 1, RESEARCH_EXPIRY.to_string()),
        (&c, case_c, 1, "male", 0, "NULL".to_string()),
    ];
    let patients = research
        .iter()
        .map(|(patient, case, current, sex, eligible, until)| {
            format!(
                "{registry} | {patient} | {case} | {current} | {centre} | NL | 586 | {sex} | \
                 alive | 2016 | 92 | 272 | 180 | {eligible} | {until}"
            )
        })
        .collect();
    if version >= 3 {
        exec(
            pool,
            &format!(
                "INSERT INTO consent_current (registry_id, pseudonym, scope, event_id, state, \
                     given_at, expires_at) VALUES {}",
                in_force.join(", ")
            ),
        )
        .await;
        for (patient, case, current, sex, eligible, until) in &research {
            exec(
                pool,
                &format!(
                    "INSERT INTO patients (registry_id, pseudonym, case_id, version, centre_id, \
                         country, orphacode, sex, status, diagnosis_year, onset_age_days, \
                         diagnosis_age_days, delay_days, eligible, eligible_until) \
                     VALUES ({registry}, '{patient}', {case}, {current}, {centre}, 'NL', 586, \
                         '{sex}', 'alive', 2016, 92, 272, 180, {eligible}, {until})"
                ),
            )
            .await;
        }
    }

    // The audit log of those calls, MAC-chained in the first encoding.
    let mut audit_methods = Vec::new();
    if version >= 4 {
        let dr = |at: i64, method: &'static str| LegacyEntry {
            at,
            principal_id: Some(physician),
            principal: "dr-old",
            role: "physician",
            centre: "NL-AMC",
            method,
            registry: REGISTRY,
            outcome: "OK",
            items: 1,
        };
        let entries = [
            dr(T0 + MINUTE, "CaseService/SubmitCase"),
            dr(T0 + HOUR + MINUTE, "CaseService/SubmitCase"),
            dr(T0 + DAY + MINUTE, "CaseService/SubmitCase"),
            dr(T0 + 5 * DAY, "CaseService/UpdateCase"),
            LegacyEntry {
                at: withdrawn + MINUTE,
                principal_id: Some(officer),
                principal: "co-old",
                role: "consent_officer",
                centre: "",
                method: "ConsentService/WithdrawConsent",
                registry: REGISTRY,
                outcome: "OK",
                items: 1,
            },
            // Calls refused before authentication, summed up per peer.
            LegacyEntry {
                at: withdrawn + HOUR,
                principal_id: None,
                principal: "peer:192.0.2.7",
                role: "",
                centre: "",
                method: "CaseService/GetCase",
                registry: "",
                outcome: "UNAUTHENTICATED",
                items: 3,
            },
        ];
        let mut previous = String::new();
        for (seq, e) in (1..).zip(&entries) {
            let mac = mac_v1(master, &previous, seq, e);
            sqlx::query(
                "INSERT INTO audit_log (seq, at, principal_id, principal, role, centre, method, \
                                        registry, outcome, items, mac) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            )
            .bind(seq)
            .bind(e.at)
            .bind(e.principal_id)
            .bind(e.principal)
            .bind(e.role)
            .bind(e.centre)
            .bind(e.method)
            .bind(e.registry)
            .bind(e.outcome)
            .bind(e.items)
            .bind(&mac)
            .execute(pool)
            .await
            .unwrap();
            audit_methods.push(e.method);
            previous = mac;
        }
        exec(
            pool,
            &format!(
                "UPDATE audit_head SET seq = {}, mac = '{previous}' WHERE id = 1",
                entries.len()
            ),
        )
        .await;
    }
    if version >= 5 {
        exec(
            pool,
            &format!(
                "INSERT INTO principal_certificates (principal_id, fingerprint, created_at) \
                 VALUES ({officer}, '{}', {before})",
                "ab".repeat(32)
            ),
        )
        .await;
    }
    Legacy {
        token,
        a: a.clone(),
        rows_to_adopt: decisions.len() as i64 + 1,
        consent_current,
        patients,
        audit_methods,
    }
}

/// A database of migration `version`, filled as that version filled it, migrated as the
/// server migrates at start, then served.
/// A fresh database migrated up to `version` as the server of that version left it: its
/// URL, a store on it (not migrated further) and a pool of sqlx's `Any` driver.
async fn at_version(dir: &TempDir, version: i64) -> (String, Store, AnyPool) {
    let url = fresh_database(dir).await;
    let store = Store::connect(&url, 2).await.unwrap();
    let mut earlier = Migrator::new(migrations_dir(store.backend()))
        .await
        .unwrap();
    earlier.migrations.to_mut().retain(|m| m.version <= version);
    assert_eq!(earlier.migrations.last().map(|m| m.version), Some(version));
    let pool = any_pool(&url).await;
    earlier.run(&pool).await.unwrap();
    (url, store, pool)
}

async fn upgrade_from(version: i64) {
    let dir = tempfile::tempdir().unwrap();
    let master = MasterSecret::create_new(&dir.path().join("master.key")).unwrap();
    let (url, store, pool) = at_version(&dir, version).await;
    let pool = &pool;
    let legacy = write_legacy(pool, &master, version).await;
    let mut before = BTreeMap::new();
    for (table, columns) in schema(&url).await.columns {
        let columns = columns.join(", ");
        let rows = rows(pool, &table, &columns).await;
        before.insert(table, (columns, rows));
    }

    store.migrate().await.unwrap();

    // Every row of before, with the values it had.
    for (table, (columns, rows_before)) in &before {
        assert_eq!(
            &rows(pool, table, columns).await,
            rows_before,
            "{table} changed in the upgrade from {version:04}"
        );
    }
    for table in [
        "registries",
        "principals",
        "api_keys",
        "consent_events",
        "case_versions",
    ] {
        assert!(!before[table].1.is_empty(), "{table} is empty");
    }
    // 0003: the decisions in force, and one research row per patient with a case.
    let mut expected = legacy.consent_current.clone();
    expected.sort();
    let columns = "registry_id, pseudonym, scope, event_id, state, given_at, expires_at";
    assert_eq!(rows(pool, "consent_current", columns).await, expected);
    let mut expected = legacy.patients.clone();
    expected.sort();
    let columns = "registry_id, pseudonym, case_id, version, centre_id, country, orphacode, sex, \
                   status, diagnosis_year, onset_age_days, diagnosis_age_days, delay_days, \
                   eligible, eligible_until";
    assert_eq!(rows(pool, "patients", columns).await, expected);
    // 0006: every registry at the least protection level.
    let sql = "SELECT COUNT(*) FROM registries WHERE protection_level <> 1";
    assert_eq!(scalar(pool, sql).await, 0);
    // 0019: a number for every patient of before, and every row of the history, the
    // decisions in force, the cases and the research rows carries its patient's.
    let sql = "SELECT COUNT(*) FROM (SELECT registry_id, pseudonym FROM consent_events \
               UNION SELECT registry_id, pseudonym FROM cases) AS p";
    let patients = scalar(pool, sql).await;
    assert!(patients > 1, "{patients} patients before");
    assert_eq!(
        scalar(pool, "SELECT COUNT(*) FROM patient_keys").await,
        patients
    );
    for table in ["consent_events", "consent_current", "cases", "patients"] {
        let sql = format!(
            "SELECT COUNT(*) FROM {table} t WHERE t.patient IS NULL OR NOT EXISTS \
             (SELECT 1 FROM patient_keys k WHERE k.id = t.patient \
              AND k.registry_id = t.registry_id AND k.pseudonym = t.pseudonym)"
        );
        assert_eq!(
            scalar(pool, &sql).await,
            0,
            "{table} without its patient's number"
        );
    }
    // 0007: no fingerprint yet (the first start records it).
    assert_eq!(scalar(pool, "SELECT COUNT(*) FROM master_key").await, 0);
    // 0004, 0009: entries of before are of version 1, without target or rows; every
    // consent event and tombstone is to be adopted (0), and none is yet.
    let entries = legacy.audit_methods.len() as i64;
    assert_eq!(
        rows(pool, "audit_head", "id, seq, rows_adopted").await,
        [format!("1 | {entries} | 0")]
    );
    let sql =
        "SELECT COUNT(*) FROM audit_log WHERE version = 1 AND target = '' AND row_hashes = ''";
    assert_eq!(scalar(pool, sql).await, entries);
    let adopted_by = |seq: i64| {
        format!(
            "SELECT (SELECT COUNT(*) FROM consent_events WHERE audit_seq = {seq}) \
                  + (SELECT COUNT(*) FROM erasures WHERE audit_seq = {seq})"
        )
    };
    assert_eq!(scalar(pool, &adopted_by(0)).await, legacy.rows_to_adopt);
    store.close().await;

    // The server starts on it with the key in use, and records that key; keys hashed with
    // Argon2id as then are accepted while they are migrated (the operator's flag).
    let app = TestApp::spawn_on_with(
        ServeArgs {
            accept_argon2_key_hashes: true,
            ..ServeArgs::default()
        },
        dir,
        url,
    )
    .await;
    assert_eq!(
        app.store.master_fingerprint().await.unwrap(),
        Some(master.fingerprint())
    );
    // The physician's key of before works (and is hashed anew); the case reads back.
    let mut dr = app.client(Some(&legacy.token)).await;
    let case = dr
        .get_case(get_case(REGISTRY, &legacy.a))
        .await
        .expect("the case of before reads back")
        .into_inner()
        .case
        .unwrap();
    assert_eq!(
        (case.centre.as_str(), case.country.as_str()),
        ("NL-AMC", "NL")
    );
    let stored = |version: u32, at: i64, record: proto::CaseRecord| proto::CaseVersion {
        version,
        recorded_at: Some(prost_types::Timestamp {
            seconds: at / 1000,
            nanos: 0,
        }),
        recorded_by: "dr-old".into(),
        record: Some(record),
        code_releases: String::new(),
    };
    let mut first = record();
    first.hpo_terms.clear();
    first.icf_codes.clear();
    assert_eq!(case.current, Some(stored(2, T0 + 5 * DAY, record())));
    assert_eq!(case.history, [stored(1, T0 + MINUTE, first)]);
    let pool = &any_pool(&app.database_url).await;
    let hash: String = sqlx::query("SELECT secret_hash FROM api_keys")
        .fetch_one(pool)
        .await
        .unwrap()
        .get(0);
    assert!(hash.starts_with(auth::HMAC_HASH_PREFIX), "{hash}");

    // The first entry written adopted every row of before; the whole chain verifies.
    let methods: Vec<String> = sqlx::query("SELECT method FROM audit_log ORDER BY seq")
        .fetch_all(pool)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut expected = legacy.audit_methods.clone();
    expected.extend(["AuditLog/AdoptRows", "CaseService/GetCase"]);
    assert_eq!(methods, expected);
    assert_eq!(
        scalar(pool, &adopted_by(entries + 1)).await,
        legacy.rows_to_adopt
    );
    let verified = app
        .store
        .verify_audit(&AuditKey::derive(&master))
        .await
        .unwrap()
        .expect("the audit chain of before and after verifies");
    assert_eq!(verified.entries, entries as u64 + 2);
    assert_eq!(verified.unadopted, 0);
    app.stop().await;
}
