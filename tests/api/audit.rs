//! The audit log: every call recorded (in the transaction of the change it records),
//! nothing recorded that identifies a patient, and a chain that shows any tampering.

use ern_registry::audit::{AuditKey, Broken};
use ern_registry::auth::Role;
use ern_registry::keys::MasterSecret;
use ern_registry::proto::{self, admin_service_client::AdminServiceClient};
use ern_registry::store::db;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::helpers::*;

type Admin = AdminServiceClient<InterceptedService<Channel, Bearer>>;

impl TestApp {
    async fn admin(&self, name: &str) -> Admin {
        let token = self.principal(name, Role::Admin, None, &[]).await;
        let bearer = Bearer(Some(format!("Bearer {token}").parse().unwrap()));
        AdminServiceClient::with_interceptor(self.channel().await, bearer)
    }

    pub(crate) fn audit_key(&self) -> AuditKey {
        let master = MasterSecret::load(&self.dir.path().join("master.key")).unwrap();
        AuditKey::derive(&master)
    }

    async fn verify(&self) -> Result<i64, Broken> {
        self.store
            .verify_audit(&self.audit_key())
            .await
            .unwrap()
            .map(|v| v.head_seq)
    }

    async fn exec(&self, sql: &str) {
        self.store.pool().execute_raw(sql).await.unwrap();
    }
}

async fn entries(
    admin: &mut Admin,
    filter: proto::ListAuditEntriesRequest,
) -> Vec<proto::AuditEntry> {
    admin
        .list_audit_entries(filter)
        .await
        .unwrap()
        .into_inner()
        .entries
}

#[tokio::test]
async fn every_call_is_recorded_with_its_outcome_and_no_identifier() {
    let app = TestApp::spawn().await;
    let mut dr = app.physician("dr-audit", "NL-AMC").await;
    let canary = bsn(4242);
    let accepted = dr
        .submit_case(submission("ERN-LUNG", national("NL", &canary)))
        .await
        .unwrap()
        .into_inner();
    let mut refused = submission("ERN-LUNG", national("NL", &bsn(4243)));
    refused.consent.clear();
    assert_eq!(
        dr.submit_case(refused).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    dr.get_case(get_case("ERN-LUNG", &accepted.pseudonym))
        .await
        .unwrap();
    let mut anonymous = app.client(None).await;
    assert_eq!(
        anonymous
            .get_case(get_case("ERN-LUNG", &accepted.pseudonym))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );

    let mut admin = app.admin("admin-1").await;
    let all = entries(&mut admin, Default::default()).await;
    let summary: Vec<(&str, &str, &str, &str)> = all
        .iter()
        .map(|e| {
            (
                e.method.as_str(),
                e.principal.as_str(),
                e.registry.as_str(),
                e.outcome.as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("CaseService/SubmitCase", "dr-audit", "ERN-LUNG", "OK"),
            (
                "CaseService/SubmitCase",
                "dr-audit",
                "ERN-LUNG",
                "FAILED_PRECONDITION"
            ),
            ("CaseService/GetCase", "dr-audit", "ERN-LUNG", "OK"),
        ]
    );
    // The refused call is not an entry of its own: refusals before authentication are
    // summarised per peer (below, and `tests/api/abuse.rs`).
    assert_eq!(all[0].role, "physician");
    assert_eq!(all[0].centre, "NL-AMC");
    assert!(all.windows(2).all(|w| w[1].seq == w[0].seq + 1));

    // Filters, and the listing itself is recorded.
    let denied = entries(
        &mut admin,
        proto::ListAuditEntriesRequest {
            outcome: "UNAUTHENTICATED".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(denied.len(), 0);
    let listings = entries(
        &mut admin,
        proto::ListAuditEntriesRequest {
            method: "AdminService/ListAuditEntries".into(),
            principal: "admin-1".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(listings.len(), 2);

    // No identifier and no pseudonym anywhere in the log.
    let rows = db::query(
        "SELECT principal, role, centre, method, registry, outcome, target, row_hashes, mac \
         FROM audit_log",
    )
    .fetch_all(app.store.pool())
    .await
    .unwrap();
    let pseudonym = &accepted.pseudonym[accepted.pseudonym.len() - 16..];
    for row in rows {
        for i in 0..9 {
            let text: String = row.try_get(i).unwrap();
            assert!(!text.contains(&canary[..6]), "{text}");
            assert!(!text.contains(pseudonym), "{text}");
        }
    }
    // The three calls and the three listings.
    assert_eq!(app.verify().await.unwrap() as usize, all.len() + 3);

    // At shutdown the refused call goes into the chain as its peer's summary entry.
    let mut app = app;
    app.stop_server().await;
    let refused: Vec<(String, String, String, i64)> = db::query(
        "SELECT principal, method, outcome, items FROM audit_log WHERE principal_id IS NULL",
    )
    .fetch_all(app.store.pool())
    .await
    .unwrap()
    .iter()
    .map(|r| {
        (
            r.get::<String>(0),
            r.get::<String>(1),
            r.get::<String>(2),
            r.get::<i64>(3),
        )
    })
    .collect();
    assert_eq!(
        refused,
        [(
            "peer:127.0.0.1".to_string(),
            "CaseService/GetCase".to_string(),
            "UNAUTHENTICATED".to_string(),
            1
        )]
    );
    assert_eq!(app.verify().await.unwrap() as usize, all.len() + 4);
}

/// Makes every insert into the audit log fail.
async fn block_audit(app: &TestApp) {
    if app.is_sqlite() {
        app.exec(
            "CREATE TRIGGER audit_block BEFORE INSERT ON audit_log \
             BEGIN SELECT RAISE(ABORT, 'audit blocked'); END;",
        )
        .await;
    } else {
        app.exec(
            "CREATE FUNCTION audit_block() RETURNS trigger AS $$ \
             BEGIN RAISE EXCEPTION 'audit blocked'; END $$ LANGUAGE plpgsql; \
             CREATE TRIGGER audit_block BEFORE INSERT ON audit_log \
             FOR EACH ROW EXECUTE FUNCTION audit_block();",
        )
        .await;
    }
}

#[tokio::test]
async fn a_call_that_cannot_be_audited_fails_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let mut dr = app.physician("dr-audit", "NL-AMC").await;
    let accepted = dr
        .submit_case(submission("ERN-LUNG", national("NL", &bsn(1))))
        .await
        .unwrap()
        .into_inner();
    block_audit(&app).await;

    // A write: refused, and its change rolled back with the entry (same transaction).
    let err = dr
        .submit_case(submission("ERN-LUNG", national("NL", &bsn(2))))
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::Internal | Code::Unavailable),
        "{err:?}"
    );
    assert_eq!(app.count("cases").await, 1);
    assert_eq!(app.count("consent_events").await, 2);

    // A read: no answer without its entry.
    let err = dr
        .get_case(get_case("ERN-LUNG", &accepted.pseudonym))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("audit"));
}

#[tokio::test]
async fn any_tampering_breaks_the_chain_at_the_first_entry_touched() {
    let app = TestApp::spawn().await;
    let mut dr = app.physician("dr-audit", "NL-AMC").await;
    for seed in 0..6 {
        dr.submit_case(submission("ERN-LUNG", national("NL", &bsn(seed))))
            .await
            .unwrap();
    }
    assert_eq!(app.verify().await, Ok(6));

    // Flip one value of entry 3, column by column; each breaks the chain at entry 3.
    let at_later = format!("at = {}", app.one_ms_later("at"));
    let edits = [
        ("at", at_later.as_str()),
        ("principal_id", "principal_id = principal_id + 1"),
        ("principal", "principal = 'dr-other'"),
        ("role", "role = 'admin'"),
        ("centre", "centre = 'NL-XXX'"),
        ("method", "method = 'CaseService/GetCase'"),
        ("registry", "registry = 'ERN-EYE'"),
        ("outcome", "outcome = 'PERMISSION_DENIED'"),
        ("items", "items = items + 1"),
    ];
    for (column, set) in edits {
        let before: String = db::query(&format!(
            "SELECT CAST({column} AS TEXT) FROM audit_log WHERE seq = 3"
        ))
        .fetch_one(app.store.pool())
        .await
        .unwrap()
        .try_get(0)
        .unwrap();
        app.exec(&format!("UPDATE audit_log SET {set} WHERE seq = 3"))
            .await;
        assert_eq!(app.verify().await, Err(Broken::Mac { seq: 3 }), "{column}");
        let restore = match column {
            // (An instant's text reads back as the instant on both databases.)
            "principal_id" | "items" => format!("{column} = {before}"),
            _ => format!("{column} = '{before}'"),
        };
        app.exec(&format!("UPDATE audit_log SET {restore} WHERE seq = 3"))
            .await;
        assert_eq!(app.verify().await, Ok(6), "{column} restored");
    }
    // PostgreSQL keeps microseconds: a time moved within its millisecond leaves the MAC
    // (over whole milliseconds) as it was, and is told by itself. (It was taken as intact:
    // a defences audit.)
    if app.database_url.starts_with("postgres") {
        app.exec("UPDATE audit_log SET at = at + INTERVAL '300 microseconds' WHERE seq = 5")
            .await;
        assert_eq!(
            app.verify().await,
            Err(Broken::PartOfAMillisecond { seq: 5 })
        );
        app.exec("UPDATE audit_log SET at = at - INTERVAL '300 microseconds' WHERE seq = 5")
            .await;
        assert_eq!(app.verify().await, Ok(6));
    }
    // One hex digit of a MAC.
    app.exec(
        "UPDATE audit_log SET mac = CASE WHEN substr(mac, 1, 1) = '0' THEN '1' ELSE '0' END \
         || substr(mac, 2) WHERE seq = 4",
    )
    .await;
    assert_eq!(app.verify().await, Err(Broken::Mac { seq: 4 }));
}

#[tokio::test]
async fn deleting_or_swapping_entries_is_found_and_the_command_names_the_entry() {
    let app = TestApp::spawn().await;
    let mut dr = app.physician("dr-audit", "NL-AMC").await;
    for seed in 0..6 {
        dr.submit_case(submission("ERN-LUNG", national("NL", &bsn(seed))))
            .await
            .unwrap();
    }
    let verify = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_ern-registry"))
            .args([
                "--database-url",
                &app.database_url,
                "audit",
                "verify",
                "--master-key-file",
            ])
            .arg(app.dir.path().join("master.key"))
            .env_remove("ERN_MASTER_KEY_FILE")
            .output()
            .unwrap()
    };
    let out = verify();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("6 entries"));

    // Swap entries 3 and 4 (each keeps its content and MAC, in the other's place).
    app.exec("UPDATE audit_log SET seq = -4 WHERE seq = 4")
        .await;
    app.exec("UPDATE audit_log SET seq = 4 WHERE seq = 3").await;
    app.exec("UPDATE audit_log SET seq = 3 WHERE seq = -4")
        .await;
    let out = verify();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("entry 3"), "{stderr}");

    // A deleted entry.
    let app = TestApp::spawn().await;
    let mut dr = app.physician("dr-audit", "NL-AMC").await;
    for seed in 0..6 {
        dr.submit_case(submission("ERN-LUNG", national("NL", &bsn(seed))))
            .await
            .unwrap();
    }
    app.exec("DELETE FROM audit_log WHERE seq = 2").await;
    assert_eq!(
        app.verify().await,
        Err(Broken::Missing {
            expected: 2,
            found: 3
        })
    );
}

#[tokio::test]
async fn a_listing_gives_a_next_page_only_when_one_follows() {
    let app = TestApp::spawn().await;
    let mut dr = app.physician("dr-pages", "NL-AMC").await;
    for n in 0..3 {
        dr.submit_case(submission("ERN-LUNG", national("NL", &bsn(7100 + n))))
            .await
            .unwrap();
    }
    let mut admin = app.admin("admin-pages").await;
    let page = |limit: u32, after_seq: u64| proto::ListAuditEntriesRequest {
        method: "CaseService/SubmitCase".into(),
        limit,
        after_seq,
        ..Default::default()
    };
    // Exactly full and the last: no token to an empty page.
    let full = admin
        .list_audit_entries(page(3, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(full.entries.len(), 3);
    assert_eq!(full.next_after_seq, 0);
    // Pages of two: a token after the first, none after the second (one entry).
    let first = admin
        .list_audit_entries(page(2, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.entries.len(), 2);
    assert_eq!(first.next_after_seq, first.entries[1].seq);
    let second = admin
        .list_audit_entries(page(2, first.next_after_seq))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.entries.len(), 1);
    assert_eq!(second.entries[0].seq, full.entries[2].seq);
    assert_eq!(second.next_after_seq, 0);
    // Pages of one: tokens after the first two, none after the third.
    let mut after = 0;
    let mut tokens = Vec::new();
    for _ in 0..3 {
        let p = admin
            .list_audit_entries(page(1, after))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(p.entries.len(), 1);
        tokens.push(p.next_after_seq);
        after = p.entries[0].seq;
    }
    assert_eq!(tokens, [full.entries[0].seq, full.entries[1].seq, 0]);
}
