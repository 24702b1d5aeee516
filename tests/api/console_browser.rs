//! The web console in a real browser: headless Chromium (Debian's `chromium`), driven
//! through WebDriver (`chromedriver`, Debian's `chromium-driver`) with fantoccini.
//!
//! An officer signs in with password and TOTP, finds a patient by BSN, withdraws the
//! registry inclusion through the confirmation page and gets the printable receipt, then
//! looks it up again by its id; a researcher counts patients in a table and gets the
//! diagnostic-delay chart. Along the way the browser's view of the session cookie is
//! checked (HttpOnly, Secure over http://127.0.0.1, SameSite=Strict) and screenshots are
//! saved to `target/console-screenshots/` (some are copied into docs/console/).
//!
//! A third test does an officer's errand with the keyboard alone (Tab, Enter and typing):
//! sign in, open the expiry list from the navigation, open a patient from it, with a
//! visible focus outline on every stop and the stops in reading order.
//!
//! Without chromedriver the tests say so loudly and pass, unless `CI` is set: then they
//! fail (`scripts/test` installs chromium and chromium-driver).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use ern_registry::auth::Role;
use ern_registry::clock::Clock;
use ern_registry::config::ServeArgs;
use ern_registry::service::console::current_code;
use fantoccini::actions::{InputSource, KeyAction, KeyActions};
use fantoccini::{Client, ClientBuilder, Locator};

use crate::console::{PASSWORD, cohort, console_app, console_user};
use crate::helpers::*;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// chromedriver on a free port, stopped (by its pid) when dropped.
struct Driver {
    child: Child,
    port: u16,
    _profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// chromedriver, or `None` (with a loud message) when it is not installed and this is
/// not CI.
fn driver() -> Option<Driver> {
    if !Path::new(CHROMEDRIVER).exists() {
        if std::env::var_os("CI").is_some() {
            panic!(
                "{CHROMEDRIVER} is missing on CI: scripts/test installs chromium and chromium-driver"
            );
        }
        eprintln!(
            "\n*** SKIPPED: the console's browser test needs {CHROMEDRIVER} and {CHROMIUM} \
             (apt-get install chromium chromium-driver); scripts/test installs them ***\n"
        );
        return None;
    }
    let port = free_port();
    let child = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    Some(Driver {
        child,
        port,
        _profile: tempfile::tempdir().unwrap(),
    })
}

async fn browser(driver: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": CHROMIUM,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                "--window-size=1200,900",
                format!("--user-data-dir={}", driver._profile.path().display()),
            ]
        }),
    );
    // chromedriver takes a moment to listen: a bounded number of tries.
    let url = format!("http://127.0.0.1:{}", driver.port);
    let mut last = None;
    for _ in 0..100 {
        match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps.clone())
            .connect(&url)
            .await
        {
            Ok(client) => return client,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("cannot start a WebDriver session: {last:?}");
}

fn screenshots() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    std::fs::write(screenshots().join(format!("{name}.png")), png).unwrap();
}

async fn fill(c: &Client, id: &str, text: &str) {
    let field = c.find(Locator::Id(id)).await.unwrap();
    field.clear().await.unwrap();
    field.send_keys(text).await.unwrap();
}

async fn choose(c: &Client, id: &str, value: &str) {
    c.find(Locator::Id(id))
        .await
        .unwrap()
        .select_by_value(value)
        .await
        .unwrap();
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

/// Waits (a bounded number of polls) for the page titled `expected`: a click that
/// submits a form returns before the next page is there.
async fn expect_heading(c: &Client, expected: &str) {
    let mut seen = String::new();
    for _ in 0..200 {
        if let Ok(h1) = c.find(Locator::Css("h1")).await
            && let Ok(text) = h1.text().await
        {
            if text == expected {
                return;
            }
            seen = text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("expected the page {expected:?}, still on {seen:?}");
}

async fn sign_in(c: &Client, base: &str, app: &TestApp, name: &str, secret: &[u8]) {
    c.goto(&format!("{base}/sign-in")).await.unwrap();
    fill(c, "name", name).await;
    fill(c, "password", PASSWORD).await;
    fill(c, "code", &current_code(secret, app.clock.now())).await;
    shot(c, &format!("sign-in-{name}")).await;
    click(c, "form button[type=submit]").await;
    expect_heading(c, "Welcome").await;
}

#[tokio::test]
async fn an_officer_signs_in_with_totp_withdraws_and_prints_the_receipt_in_chromium() {
    let Some(driver) = driver() else { return };
    let app = console_app(ServeArgs::default()).await;
    let secret = console_user(
        &app,
        "officer-eye",
        Role::ConsentOfficer,
        None,
        &["ERN-EYE"],
    )
    .await;
    let mut physician = app.physician("dr-eye", "NL-AMC").await;
    let patient = bsn(31_337);
    physician
        .submit_case(submission("ERN-EYE", national("NL", &patient)))
        .await
        .unwrap();
    let base = format!("http://{}", app.console.unwrap());
    let c = browser(&driver).await;

    sign_in(&c, &base, &app, "officer-eye", &secret).await;
    // The browser keeps the session cookie as the server set it: a Secure cookie over
    // http://127.0.0.1 (a secure context), HttpOnly, SameSite=Strict.
    let cookie = c.get_named_cookie("__Host-ern-session").await.unwrap();
    assert_eq!(cookie.secure(), Some(true));
    assert_eq!(cookie.http_only(), Some(true));
    assert_eq!(format!("{:?}", cookie.same_site()), "Some(Strict)");
    assert_eq!(cookie.path(), Some("/"));

    c.goto(&format!("{base}/officer")).await.unwrap();
    choose(&c, "registry-national", "ERN-EYE").await;
    fill(&c, "national-issuing_country", "NL").await;
    fill(&c, "national-value", &patient).await;
    shot(&c, "officer-find").await;
    c.find(Locator::Id("national-value"))
        .await
        .unwrap()
        .send_keys("\u{E007}") // Enter submits the form: no mouse needed.
        .await
        .unwrap();
    expect_heading(&c, "Patient consent").await;
    let page = c.source().await.unwrap();
    assert!(page.contains("REGISTRY_INCLUSION") || page.contains("registry_inclusion"));
    assert!(!page.contains(&patient), "the BSN is not shown back");
    assert!(!c.current_url().await.unwrap().as_str().contains(&patient));
    shot(&c, "officer-patient").await;

    click(&c, "#w-registry_inclusion").await;
    choose(&c, "reason", "patient_request").await;
    click(&c, "form[action='/officer/withdraw'] button[type=submit]").await;
    expect_heading(&c, "Confirm the withdrawal").await;
    let warning = c
        .find(Locator::Css(".warning"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        warning.contains("This erases the patient's clinical data in ERN-EYE"),
        "{warning}"
    );
    shot(&c, "officer-confirm-withdrawal").await;
    assert_eq!(app.count("cases").await, 1);
    click(&c, "button.danger").await;
    expect_heading(&c, "Erasure receipt").await;
    assert_eq!(app.count("cases").await, 0);
    let receipt = c
        .find(Locator::Css(".receipt"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(receipt.contains("Case records erased"), "{receipt}");
    let id = {
        let at = receipt.find("rcpt-").unwrap();
        receipt[at..at + 37].to_owned()
    };
    shot(&c, "officer-receipt").await;

    c.goto(&format!("{base}/officer/receipt")).await.unwrap();
    fill(&c, "receipt_id", &id).await;
    click(&c, "form[action='/officer/receipt'] button").await;
    expect_heading(&c, "Erasure receipt").await;
    let url = c.current_url().await.unwrap();
    assert!(!url.as_str().contains("rcpt-"), "{url}");

    // Sign out: the session is gone, pages send the browser to sign in.
    click(&c, "header form button").await;
    expect_heading(&c, "Sign in").await;
    c.goto(&format!("{base}/home")).await.unwrap();
    expect_heading(&c, "Sign in").await;
    c.close().await.unwrap();
}

#[tokio::test]
async fn a_researcher_sees_a_table_and_the_delay_chart_in_chromium() {
    let Some(driver) = driver() else { return };
    let app = console_app(ServeArgs::default()).await;
    let secret = console_user(&app, "researcher-eye", Role::Researcher, None, &["ERN-EYE"]).await;
    cohort(&app, 40).await;
    let base = format!("http://{}", app.console.unwrap());
    let c = browser(&driver).await;
    sign_in(&c, &base, &app, "researcher-eye", &secret).await;

    c.goto(&format!("{base}/research")).await.unwrap();
    choose(&c, "registry", "ERN-EYE").await;
    choose(&c, "group_by-0-", "SEX").await;
    choose(&c, "group_by-1-", "COUNTRY").await;
    shot(&c, "research-form").await;
    click(&c, "button:not([formaction])[type=submit]:not(.link)").await;
    expect_heading(&c, "Patient counts").await;
    let table = c
        .find(Locator::Css("main table"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(table.contains("female"), "{table}");
    assert!(table.contains("40"), "{table}");
    shot(&c, "research-table").await;

    c.goto(&format!("{base}/research")).await.unwrap();
    choose(&c, "registry", "ERN-EYE").await;
    choose(&c, "group_by-0-", "SEX").await;
    click(&c, "button[formaction='/research/delay']").await;
    expect_heading(&c, "Diagnostic delay").await;
    let chart = c.find(Locator::Css("figure.chart svg")).await.unwrap();
    let (_, _, width, height) = chart.rectangle().await.unwrap();
    assert!(
        width > 100.0 && height > 100.0,
        "the chart is drawn: {width}x{height}"
    );
    // The stylesheet applied (CSP allows it as a file): the header is coloured.
    let bg = c
        .find(Locator::Css("header"))
        .await
        .unwrap()
        .css_value("background-color")
        .await
        .unwrap();
    assert_eq!(bg, "rgba(18, 58, 94, 1)");
    shot(&c, "research-delay").await;
    c.close().await.unwrap();
}

const TAB: char = '\u{E004}';
const ENTER: char = '\u{E007}';

/// Presses and releases one key, as a keyboard does (no element targeted).
async fn press(c: &Client, key: char) {
    let keys = KeyActions::new("keyboard".into())
        .then(KeyAction::Down { value: key })
        .then(KeyAction::Up { value: key });
    c.perform_actions(keys).await.unwrap();
}

/// Types into the focused element.
async fn type_text(c: &Client, text: &str) {
    for ch in text.chars() {
        press(c, ch).await;
    }
}

/// Whether nothing has the focus (the document's `body` is the active element).
async fn on_body(c: &Client) -> bool {
    let el = c.active_element().await.unwrap();
    el.tag_name().await.unwrap().eq_ignore_ascii_case("body")
}

/// The focused element, described ("input#name", "a:Expiring consents"), after checking
/// that its focus is visible (a solid outline of at least 2px).
async fn focused(c: &Client) -> String {
    let el = c.active_element().await.unwrap();
    let tag = el.tag_name().await.unwrap();
    let id = el.attr("id").await.unwrap().unwrap_or_default();
    let text = el.text().await.unwrap_or_default();
    let what = if id.is_empty() {
        format!("{tag}:{}", text.trim())
    } else {
        format!("{tag}#{id}")
    };
    let style = el.css_value("outline-style").await.unwrap();
    let width = el.css_value("outline-width").await.unwrap();
    let px: f64 = width.trim_end_matches("px").parse().unwrap_or(0.0);
    assert!(
        style != "none" && px >= 2.0,
        "no visible focus on {what}: outline {style} {width}"
    );
    what
}

/// Tabs (at most 40 times) until the focused element is `target`; returns every stop.
///
/// A Tab pressed while a page that has just loaded is not yet taking keys leaves the
/// focus on `body`: on a loaded machine Chromium can drop that first key. Only then (the
/// page had no focus before the first Tab, and still has none) is the Tab pressed again,
/// at most 20 times; a Tab that moves the focus from an element to `body` still fails
/// `focused`.
async fn tab_to(c: &Client, target: &str) -> Vec<String> {
    let mut stops = Vec::new();
    let unfocused_page = on_body(c).await;
    for _ in 0..40 {
        press(c, TAB).await;
        let mut retries = 0;
        while unfocused_page && stops.is_empty() && retries < 20 && on_body(c).await {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            press(c, TAB).await;
            retries += 1;
        }
        let now = focused(c).await;
        stops.push(now.clone());
        if now == target {
            return stops;
        }
    }
    panic!("Tab never reached {target}: {stops:?}");
}

#[tokio::test]
async fn an_officer_does_an_errand_with_the_keyboard_alone_in_chromium() {
    let Some(driver) = driver() else { return };
    let app = console_app(ServeArgs::default()).await;
    let secret = console_user(
        &app,
        "officer-eye",
        Role::ConsentOfficer,
        None,
        &["ERN-EYE"],
    )
    .await;
    // A patient whose research consent expires in ten days.
    let mut physician = app.physician("dr-keys", "NL-AMC").await;
    let mut request = submission("ERN-EYE", national("NL", &bsn(4242)));
    request.consent[1].expires_at = Some(ern_registry::api::convert::timestamp_to_proto(
        app.clock.now() + chrono::Duration::days(10),
    ));
    physician.submit_case(request).await.unwrap();
    let base = format!("http://{}", app.console.unwrap());
    let c = browser(&driver).await;

    // Sign in: the skip link first, then the fields in the order they are read.
    c.goto(&format!("{base}/sign-in")).await.unwrap();
    let stops = tab_to(&c, "input#name").await;
    assert_eq!(stops, ["a:Skip to the content", "input#name"]);
    type_text(&c, "officer-eye").await;
    assert_eq!(tab_to(&c, "input#password").await, ["input#password"]);
    type_text(&c, PASSWORD).await;
    assert_eq!(tab_to(&c, "input#code").await, ["input#code"]);
    type_text(&c, &current_code(&secret, app.clock.now())).await;
    press(&c, ENTER).await;
    expect_heading(&c, "Welcome").await;

    // The navigation, in order, to the expiry list.
    let stops = tab_to(&c, "a:Expiring consents").await;
    assert_eq!(
        stops,
        [
            "a:Skip to the content",
            "a:Home",
            "a:Find a patient",
            "a:Expiring consents"
        ]
    );
    press(&c, ENTER).await;
    expect_heading(&c, "Expiring consents").await;
    shot(&c, "keyboard-expiring").await;

    // Past the rest of the header to the page's form, then the list's "open" button.
    let stops = tab_to(&c, "button:open").await;
    let at = |name: &str| {
        stops
            .iter()
            .position(|s| s == name)
            .unwrap_or_else(|| panic!("{name} not in {stops:?}"))
    };
    assert!(at("button:Sign out") < at("input#days"), "{stops:?}");
    assert!(at("input#days") < at("button:Show"), "{stops:?}");
    press(&c, ENTER).await;
    expect_heading(&c, "Patient consent").await;
    let page = c.source().await.unwrap();
    assert!(page.contains("research_use") || page.contains("Research use"));
    shot(&c, "keyboard-patient").await;
    c.close().await.unwrap();
}
