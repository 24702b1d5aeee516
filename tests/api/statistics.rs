//! PostgreSQL's planner statistics follow the registry's growth (`store::statistics`): a
//! table is analyzed once more than 500 rows, and more than a tenth of the rows its last
//! analysis counted, changed since; not before, and not again until it changes that much
//! once more; and not by a server connected as a role that does not own the tables. On
//! SQLite there is nothing to do. Runs on whichever database the pass runs
//! on; the rows are inserted in SQL, as an import would grow a table.

use std::time::{Duration, Instant};

use ern_registry::store::statistics::{MIN_CHANGES, refresh};
use ern_registry::store::{Backend, Store, db};

use crate::helpers::fresh_database;

/// Waits until PostgreSQL's statistics count at least `changes` changes to `centres`
/// since its last analysis (a backend reports its counts within about a second of its
/// transaction). Bounded: the test fails rather than hang.
async fn until_counted(store: &Store, changes: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let counted: i64 = db::query(
            "SELECT n_mod_since_analyze FROM pg_stat_user_tables \
             WHERE schemaname = current_schema() AND relname = 'centres'",
        )
        .fetch_scalar(store.pool())
        .await
        .unwrap();
        if counted >= changes {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "PostgreSQL counted {counted} of {changes} changes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn add_centres(store: &Store, from: i64, n: i64) {
    store
        .pool()
        .execute_raw(&format!(
            "INSERT INTO centres (code, name, country, created_at) \
             SELECT 'XX-' || i, 'centre ' || i, 'XX', CURRENT_TIMESTAMP \
             FROM generate_series({from}, {}) AS i",
            from + n - 1
        ))
        .await
        .unwrap();
}

/// A fresh database of the pass, migrated: its URL and a store on it.
async fn migrated(dir: &tempfile::TempDir) -> (String, Store) {
    let url = fresh_database(dir).await;
    let store = Store::connect(&url, 2).await.unwrap();
    store.migrate().await.unwrap();
    (url, store)
}

#[tokio::test]
async fn a_table_is_analyzed_once_it_has_changed_enough_and_not_before() {
    let dir = tempfile::tempdir().unwrap();
    let (url, store) = migrated(&dir).await;
    if store.backend() == Backend::Sqlite {
        assert!(refresh(&store).await.unwrap().is_empty());
        return;
    }
    // Only this test analyzes the table: autovacuum, which may look at any moment, would
    // reset the counts it checks (its rule is much the same).
    store
        .pool()
        .execute_raw("ALTER TABLE centres SET (autovacuum_enabled = false)")
        .await
        .unwrap();
    // The seeded registries are fewer than the floor; nothing else changed.
    refresh(&store).await.unwrap();
    assert!(refresh(&store).await.unwrap().is_empty());

    // Below the floor: left alone.
    add_centres(&store, 0, MIN_CHANGES - 100).await;
    until_counted(&store, MIN_CHANGES - 100).await;
    assert!(refresh(&store).await.unwrap().is_empty());
    // Past it: analyzed, and then not again.
    add_centres(&store, MIN_CHANGES, 9_600).await;
    until_counted(&store, 10_000).await;
    assert_eq!(refresh(&store).await.unwrap(), ["centres"]);
    let analyzed: Option<chrono::DateTime<chrono::Utc>> = db::query(
        "SELECT last_analyze FROM pg_stat_user_tables \
         WHERE schemaname = current_schema() AND relname = 'centres'",
    )
    .fetch_scalar(store.pool())
    .await
    .unwrap();
    assert!(analyzed.is_some());
    assert!(refresh(&store).await.unwrap().is_empty());

    // 10,000 rows counted: 600 more changes are past the floor but not a tenth of them.
    add_centres(&store, 20_000, 600).await;
    until_counted(&store, 600).await;
    assert!(refresh(&store).await.unwrap().is_empty());
    add_centres(&store, 30_000, 500).await;
    until_counted(&store, 1_100).await;

    // A server connected as a role that does not own the tables (PostgreSQL would skip
    // them with a warning) leaves them to autovacuum: nothing to do.
    let suffix: String = url
        .rsplit('_')
        .next()
        .unwrap_or("x")
        .chars()
        .take(12)
        .collect();
    let role = format!("ern_not_owner_{suffix}");
    store
        .pool()
        .execute_raw(&format!("CREATE ROLE {role} LOGIN"))
        .await
        .unwrap();
    let mut as_role = url::Url::parse(&url).unwrap();
    as_role.set_username(&role).unwrap();
    let other = Store::connect(as_role.as_str(), 1).await.unwrap();
    assert!(refresh(&other).await.unwrap().is_empty());
    other.close().await;
    store
        .pool()
        .execute_raw(&format!("DROP ROLE {role}"))
        .await
        .unwrap();

    assert_eq!(refresh(&store).await.unwrap(), ["centres"]);
    store.close().await;
}

/// Migrations 0018 and 0019, on PostgreSQL: looking up one case (registry, pseudonym,
/// centre, as `find_case` and `get_case` do) is a lookup of the patient's number on
/// `patient_keys`' unique key and then of the case on (patient, centre), whatever the
/// planner knows, here with 20,000 cases of one centre never analyzed (autovacuum off for
/// both tables): no plan reads the centre's cases and filters. Both as a statement with
/// its values and as the generic plan of a prepared one.
#[tokio::test]
async fn one_case_is_looked_up_by_all_three_columns_without_statistics() {
    let dir = tempfile::tempdir().unwrap();
    let (_, store) = migrated(&dir).await;
    if store.backend() == Backend::Sqlite {
        return;
    }
    let mut conn = store.pool().acquire().await.unwrap();
    let mut db = conn.db();
    db.execute_raw(
        "ALTER TABLE cases SET (autovacuum_enabled = false); \
         ALTER TABLE patient_keys SET (autovacuum_enabled = false); \
         INSERT INTO centres (id, code, name, country, created_at) \
         VALUES (900, 'XX-ONE', 'one centre', 'XX', CURRENT_TIMESTAMP); \
         INSERT INTO patient_keys (registry_id, pseudonym) \
         SELECT 13, 'R013-V001-' || i FROM generate_series(1, 20000) AS i; \
         INSERT INTO cases (patient, registry_id, pseudonym, centre_id, current_version, \
                            created_at, updated_at) \
         SELECT id, registry_id, pseudonym, 900, 1, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP \
         FROM patient_keys; \
         PREPARE one_case (bigint, text, bigint) AS \
         SELECT id, current_version FROM cases \
         WHERE patient = (SELECT id FROM patient_keys WHERE registry_id = $1 AND pseudonym = $2) \
           AND centre_id = $3; \
         SET plan_cache_mode = force_generic_plan;",
    )
    .await
    .unwrap();
    for explain in [
        "EXPLAIN SELECT id, current_version FROM cases \
         WHERE patient = (SELECT id FROM patient_keys \
                          WHERE registry_id = 13 AND pseudonym = 'R013-V001-77') \
           AND centre_id = 900",
        "EXPLAIN EXECUTE one_case (13, 'R013-V001-77', 900)",
    ] {
        let plan: Vec<String> = db::query(explain)
            .persistent(false)
            .fetch_scalars(&mut db)
            .await
            .unwrap();
        let plan = plan.join("\n");
        assert!(
            plan.contains("pseudonym =")
                && plan.contains("patient =")
                && plan.matches("Index").count() >= 2
                && !plan.contains("Filter"),
            "{explain}:\n{plan}"
        );
        assert!(!plan.contains("Seq Scan"), "{explain}:\n{plan}");
    }
}
