//! The web console (/ui): off without a token, login and sessions, CSRF on every write,
//! and the whole flow in headless Chromium against a running walhook: the overview shows a
//! failing listener, search finds a notification by entity id, the event page shows the
//! payload exactly as the listener received it, retry from the Failed page moves the
//! notification to New and then Processed; the listeners page shows an Event Grid webhook's
//! validation handshake and sends test events (as `walhook test-listener` does).
//!
//! The browser test needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs
//! them); without them it is skipped, unless $CI is set, where it fails.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use fantoccini::{ClientBuilder, Locator};
use reqwest::StatusCode;
use reqwest::header::{COOKIE, LOCATION, ORIGIN, SET_COOKIE};
use serde_json::json;
use support::receiver::{Receiver, Reply};
use support::{CUSTOMER_ENTITY, Daemon, TestDb, config_toml, eventually, free_port};
use tokio_util::sync::CancellationToken;
use walhook::admin::{self, AdminState, Health};
use walhook::config::Config;
use walhook::console::{ConsoleDeps, History};
use walhook::metrics::Metrics;

const TOKEN: &str = "correct-horse-battery-staple-0123456789";

/// A client that shows redirects instead of following them.
fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// Writes the token file into `dir` and returns the `[admin]` section naming it.
fn admin_section(dir: &Path, port: u16, token: Option<&str>) -> String {
    let mut s = format!("[admin]\nlisten = \"127.0.0.1:{port}\"\n");
    if let Some(token) = token {
        let path = dir.join("console.token");
        std::fs::write(&path, format!("{token}\n")).unwrap();
        s.push_str(&format!("token_file = \"{}\"\n", path.display()));
    }
    s
}

/// The admin endpoint with the console, in this process, on a database that does not
/// exist: enough for everything that happens before a page reads the queue.
struct InProcess {
    base: String,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl InProcess {
    async fn start(token: Option<&str>) -> InProcess {
        InProcess::start_with(token, "").await
    }

    /// With these `[[listener]]` blocks.
    async fn start_with(token: Option<&str>, listeners: &str) -> InProcess {
        let dir = tempfile::tempdir().unwrap();
        let listener = admin::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let text = config_toml(
            "postgres://walhook@127.0.0.1:1/nothing",
            &format!(
                "{}{CUSTOMER_ENTITY}{listeners}",
                admin_section(dir.path(), addr.port(), token)
            ),
        );
        let config = Config::parse(&text, &dir.path().join("walhook.toml")).unwrap();
        let (_tx, rx) = tokio::sync::watch::channel(Arc::new(config));
        // Keep the sender: the console follows the channel.
        std::mem::forget(_tx);
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::new());
        let app = admin::router(AdminState {
            metrics: metrics.clone(),
            health: health.clone(),
        })
        .merge(walhook::console::router(ConsoleDeps {
            config: rx,
            metrics,
            health,
            history: Arc::new(History::new()),
        }));
        let shutdown = CancellationToken::new();
        tokio::spawn(admin::serve_router(listener, app, shutdown.clone()));
        InProcess {
            base: format!("http://{addr}"),
            shutdown,
            _dir: dir,
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Logs in with `token` and returns the `name=value` of the session cookie.
async fn login(base: &str, token: &str) -> String {
    let r = http()
        .post(format!("{base}/ui/login"))
        .form(&[("token", token), ("next", "/ui/failed")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER, "login");
    assert_eq!(r.headers()[LOCATION], "/ui/failed");
    let cookie = r.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/ui"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    assert!(
        !cookie.contains(token),
        "the cookie must not hold the token: {cookie}"
    );
    cookie.split(';').next().unwrap().to_owned()
}

#[tokio::test]
async fn the_console_is_off_without_a_token_file_and_metrics_stay_open() {
    let server = InProcess::start(None).await;
    for path in ["/ui", "/ui/login", "/ui/failed", "/ui/static/console.css"] {
        let r = http()
            .get(format!("{}{path}", server.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
        let body = r.text().await.unwrap();
        assert_eq!(body.lines().count(), 1, "{body}");
        assert!(body.contains("token_file"), "{body}");
    }
    let r = http()
        .post(format!("{}/ui/login", server.base))
        .form(&[("token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    for path in ["/metrics", "/healthz"] {
        let r = http()
            .get(format!("{}{path}", server.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
    }
}

#[tokio::test]
async fn pages_need_a_login_and_writes_need_the_csrf_token() {
    let server = InProcess::start(Some(TOKEN)).await;
    let base = &server.base;

    // No session: reads go to the login form, writes are refused.
    let r = http()
        .get(format!("{base}/ui/failed?listener=a"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        r.headers()[LOCATION],
        "/ui/login?next=%2Fui%2Ffailed%3Flistener%3Da"
    );
    let r = http()
        .post(format!("{base}/ui/failed/retry"))
        .form(&[("id", "1")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // A cookie that is not a session is no better.
    let r = http()
        .post(format!("{base}/ui/failed/retry"))
        .header(COOKIE, format!("walhook_console={TOKEN}"))
        .form(&[("id", "1")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // /metrics and /healthz stay open.
    let r = http().get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // A wrong token shows the form again.
    let r = http()
        .post(format!("{base}/ui/login"))
        .form(&[("token", "wrong-token-wrong-token-wrong")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().get(SET_COOKIE).is_none());
    assert!(r.text().await.unwrap().contains("Wrong token."));

    let session = login(base, TOKEN).await;
    let r = http()
        .get(format!("{base}/ui/login"))
        .header(COOKIE, &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER, "logged in: no form");
    let headers = r.headers();
    assert_eq!(headers["x-frame-options"], "DENY");
    assert!(
        headers["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'none'")
    );
    assert_eq!(headers["cache-control"], "no-store");

    // Logged in, but without the CSRF token, or with another one: refused.
    for form in [vec![("id", "1")], vec![("id", "1"), ("csrf", "0000")]] {
        let r = http()
            .post(format!("{base}/ui/failed/retry"))
            .header(COOKIE, &session)
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{form:?}");
        assert!(r.text().await.unwrap().contains("CSRF"));
    }
    // From another site, even a complete form is refused.
    let r = http()
        .post(format!("{base}/ui/logout"))
        .header(COOKIE, &session)
        .header(ORIGIN, "https://attacker.example")
        .form(&[("csrf", "whatever")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
}

// ---------------------------------------------------------------------------------------------
// the browser

/// chromedriver on a free port, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    names
        .iter()
        .flat_map(|n| std::env::split_paths(&path).map(move |d| d.join(n)))
        .find(|p| p.is_file())
}

/// The browser and its driver, or `None` to skip (never under $CI).
fn browser_programs() -> Option<(PathBuf, PathBuf)> {
    let found = (
        find_program(&["chromium", "chromium-browser", "google-chrome"]),
        find_program(&["chromedriver"]),
    );
    match found {
        (Some(browser), Some(driver)) => Some((browser, driver)),
        _ if std::env::var_os("CI").is_some() => panic!(
            "chromium and chromedriver are needed for the console's browser tests: apt-get install chromium chromium-driver"
        ),
        _ => {
            eprintln!(
                "skipping: chromium or chromedriver not found (apt-get install chromium chromium-driver)"
            );
            None
        }
    }
}

async fn start_driver(program: &Path) -> Driver {
    let port = free_port();
    let child = Command::new(program)
        .arg(format!("--port={port}"))
        .arg("--allowed-ips=127.0.0.1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let url = format!("http://127.0.0.1:{port}");
    let status = format!("{url}/status");
    eventually(Duration::from_secs(30), "chromedriver ready", || async {
        let r = reqwest::get(&status).await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    Driver { child, url }
}

async fn browser(driver: &Driver, chromium: &Path, profile: &Path) -> fantoccini::Client {
    let args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ]
    .iter()
    .map(|a| (*a).to_owned())
    .chain([format!("--user-data-dir={}", profile.display())])
    .collect::<Vec<_>>();
    let caps = json!({
        "browserName": "chrome",
        "goog:chromeOptions": { "binary": chromium, "args": args },
    });
    let serde_json::Value::Object(caps) = caps else {
        unreachable!()
    };
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("WebDriver session with headless chromium")
}

async fn status_of(c: &tokio_postgres::Client, entity_id: &str) -> Vec<(i64, String)> {
    c.query(
        "SELECT id, status FROM walhook.notification WHERE entity_id = $1 ORDER BY id",
        &[&entity_id],
    )
    .await
    .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    .unwrap_or_default()
}

async fn wait_status(c: &tokio_postgres::Client, entity_id: &str, status: &str) -> i64 {
    eventually(
        Duration::from_secs(60),
        &format!("customer {entity_id}'s notification {status}"),
        || async {
            let rows = status_of(c, entity_id).await;
            rows.iter().find(|(_, s)| s == status).map(|(id, _)| *id)
        },
    )
    .await
}

/// The first element matching `css`, waiting for it to appear; on a timeout the panic
/// shows the page.
async fn element(b: &fantoccini::Client, css: &str) -> fantoccini::elements::Element {
    match b
        .wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::Css(css))
        .await
    {
        Ok(e) => e,
        Err(e) => {
            let url = b
                .current_url()
                .await
                .map(|u| u.to_string())
                .unwrap_or_default();
            let source = b.source().await.unwrap_or_default();
            panic!("{css}: {e} on {url}:\n{source}");
        }
    }
}

/// The visible text of the first element matching `css`, found again if the page
/// changed under it.
async fn text(b: &fantoccini::Client, css: &str) -> String {
    for _ in 0..20 {
        match element(b, css).await.text().await {
            Ok(t) => return t,
            Err(fantoccini::error::CmdError::Standard(e))
                if e.error == fantoccini::error::ErrorStatus::StaleElementReference =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{css}: {e}"),
        }
    }
    panic!("{css}: the page kept changing");
}

/// Waits until the browser's address contains `part` (the page it navigates to).
async fn wait_url(b: &fantoccini::Client, part: &str) {
    eventually(
        Duration::from_secs(20),
        &format!("a page at {part}"),
        || async {
            let url = b.current_url().await.ok()?;
            url.as_str().contains(part).then_some(())
        },
    )
    .await;
}

/// Opens `path`, which sends the browser to the login form, logs in with the token and
/// waits to be back at `path`.
async fn log_in(b: &fantoccini::Client, base: &str, path: &str) {
    b.goto(&format!("{base}{path}")).await.unwrap();
    element(b, "input[name=token]")
        .await
        .send_keys(TOKEN)
        .await
        .unwrap();
    b.find(Locator::Css("form button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    eventually(
        Duration::from_secs(20),
        &format!("{path} after login"),
        || async {
            let url = b.current_url().await.ok()?;
            (url.path() == path).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_browser_shows_failures_finds_payloads_and_retries() {
    let Some((chromium, chromedriver)) = browser_programs() else {
        return;
    };
    let db = TestDb::new();
    db.execute("CREATE TABLE customer (id int PRIMARY KEY, name text); ALTER TABLE customer REPLICA IDENTITY FULL;")
        .await;
    let hook = Receiver::start().await;
    hook.respond_with(|_, _| Reply::status(500).body("listener is down"));
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let blocks = format!(
        "{}{CUSTOMER_ENTITY}\n[[listener]]\nname = \"crm\"\nurl = \"{}\"\nmax_attempts = 1\n",
        admin_section(dir.path(), port, Some(TOKEN)),
        hook.url("/hook?api_key=do-not-show-me")
    );
    let _daemon = Daemon::start(&config_toml(&db.url, &blocks));
    eventually(Duration::from_secs(60), "walhook streaming", || async {
        let r = reqwest::get(format!("{base}/readyz")).await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    let c = db.client().await;
    c.batch_execute(
        "INSERT INTO customer VALUES (4242, 'Ada <script>alert(1)</script>'), (7, 'Bob')",
    )
    .await
    .unwrap();
    let failed = wait_status(&c, "4242", "Failed").await;
    wait_status(&c, "7", "Failed").await;

    let driver = start_driver(&chromedriver).await;
    let b = browser(&driver, &chromium, &dir.path().join("chromium-profile")).await;

    // Log in: the overview sends us to the form and back.
    log_in(&b, &base, "/ui").await;
    assert_eq!(text(&b, "main h1").await, "Overview");

    // The overview shows the listener's failures.
    let row = "table.listeners tr[data-listener=crm]";
    assert_eq!(text(&b, &format!("{row} td.failed")).await, "2");
    let health = text(&b, &format!("{row} td:nth-child(2)")).await;
    assert!(["failing", "idle"].contains(&health.as_str()), "{health}");
    assert!(text(&b, &format!("{row} td.comment")).await.contains("500"));
    let page = b.source().await.unwrap();
    assert!(
        !page.contains("do-not-show-me"),
        "the listener URL's secret is shown"
    );
    screenshot(&b, "overview").await;

    // Search by entity id finds the notification; its row links to the event page.
    b.goto(&format!("{base}/ui/notifications")).await.unwrap();
    let search = b.form(Locator::Css("form.search")).await.unwrap();
    search.set_by_name("entity_id", "4242").await.unwrap();
    search.submit().await.unwrap();
    wait_url(&b, "entity_id=4242").await;
    let link = format!("table.notifications tr#n{failed} td a");
    assert_eq!(text(&b, &link).await, failed.to_string());
    assert_eq!(
        text(&b, &format!("tr#n{failed} td.entity-id")).await,
        "4242"
    );
    b.find(Locator::Css(&link))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();

    // The event page shows the payload exactly as the listener received it.
    let shown = text(&b, "article.payload[data-listener=crm] pre.payload-body").await;
    let received = hook
        .requests()
        .into_iter()
        .map(|r| String::from_utf8(r.body.to_vec()).unwrap())
        .find(|body| body.contains("\"entityid\":\"4242\""))
        .expect("the receiver got customer 4242");
    assert_eq!(shown, received);
    assert!(
        b.source()
            .await
            .unwrap()
            .contains("&lt;script&gt;alert(1)&lt;/script&gt;")
    );

    // Without the CSRF token, or without a session, retry is refused and nothing moves.
    let cookie = b.get_named_cookie("walhook_console").await.unwrap();
    let session = format!("walhook_console={}", cookie.value());
    for (cookie, status) in [(Some(session.as_str()), 403), (None, 401)] {
        let mut r = http()
            .post(format!("{base}/ui/failed/retry"))
            .form(&[("id", failed.to_string())]);
        if let Some(cookie) = cookie {
            r = r.header(COOKIE, cookie);
        }
        assert_eq!(r.send().await.unwrap().status().as_u16(), status);
    }
    assert_eq!(
        status_of(&c, "4242").await,
        vec![(failed, "Failed".to_owned())]
    );

    // Retry from the Failed page: New at once (the listener now takes its time to answer
    // 200), then Processed.
    hook.respond_with(|_, _| Reply::status(200).after(Duration::from_secs(5)));
    b.goto(&format!("{base}/ui/failed")).await.unwrap();
    element(&b, &format!("input[name=id][value=\"{failed}\"]"))
        .await
        .click()
        .await
        .unwrap();
    b.find(Locator::Id("retry-selected"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    assert!(
        text(&b, "p.notice")
            .await
            .starts_with("Requeued 1 notification")
    );
    assert_eq!(
        status_of(&c, "4242").await,
        vec![(failed, "New".to_owned())]
    );
    wait_status(&c, "4242", "Processed").await;
    b.goto(&format!("{base}/ui/notifications?entity_id=4242"))
        .await
        .unwrap();
    assert_eq!(
        text(&b, &format!("tr#n{failed} span.badge")).await,
        "Processed"
    );

    // Discard the other one with a reason (the page asks for confirmation first).
    b.goto(&format!("{base}/ui/failed")).await.unwrap();
    element(&b, "input[data-select-all]")
        .await
        .click()
        .await
        .unwrap();
    b.find(Locator::Css("input[name=reason]"))
        .await
        .unwrap()
        .send_keys("customer 7 was deleted upstream")
        .await
        .unwrap();
    b.find(Locator::Id("discard-selected"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.accept_alert().await.unwrap();
    assert!(
        text(&b, "p.notice")
            .await
            .starts_with("Discarded 1 notification")
    );
    let reason: String = c
        .query_one(
            "SELECT reason FROM walhook.discarded WHERE entity_id = '7'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(reason, "customer 7 was deleted upstream");

    b.close().await.unwrap();
}

/// Saves a screenshot of the page and prints where, in a directory of this test run that
/// outlives it, so the printed path can be opened.
async fn screenshot(b: &fantoccini::Client, name: &str) {
    let shots = std::env::temp_dir().join(format!("walhook-console-test-{}", std::process::id()));
    std::fs::create_dir_all(&shots).unwrap();
    let shot = shots.join(format!("{name}.png"));
    std::fs::write(&shot, b.screenshot().await.unwrap()).unwrap();
    println!("screenshot of the {name} page: {}", shot.display());
}

/// Clicks the first element matching `css`, waiting for it to appear.
async fn click(b: &fantoccini::Client, css: &str) {
    element(b, css).await.click().await.unwrap();
}

/// The browser's session cookie as a `Cookie` header value.
async fn browser_session(b: &fantoccini::Client) -> String {
    let cookie = b.get_named_cookie("walhook_console").await.unwrap();
    format!("walhook_console={}", cookie.value())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_test_event_delivers_a_sample_to_the_listener_and_shows_its_answer_or_the_failure_in_plain_words()
 {
    let Some((chromium, chromedriver)) = browser_programs() else {
        return;
    };
    const API_KEY: &str = "listener-api-key-4b8e1d";
    let hook = Receiver::start().await;
    hook.respond_with(|r, _| {
        let key = r.header("x-api-key").unwrap_or("none").to_owned();
        Reply::status(200).body(&format!("thanks; you sent key {key}"))
    });
    let dead = free_port();
    let listeners = format!(
        "\n[[listener]]\nname = \"crm\"\nurl = \"{}\"\nheaders = {{ \"X-Api-Key\" = \"{API_KEY}\" }}\n\n[[listener]]\nname = \"down\"\nurl = \"http://127.0.0.1:{dead}/hook\"\n",
        hook.url("/hook?api_key=do-not-show-me")
    );
    // No database: a test send records nothing in the queue.
    let server = InProcess::start_with(Some(TOKEN), &listeners).await;
    let base = &server.base;
    let driver = start_driver(&chromedriver).await;
    let profile = tempfile::tempdir().unwrap();
    let b = browser(&driver, &chromium, profile.path()).await;
    log_in(&b, base, "/ui/listeners").await;

    // The receiver gets a sample event with the listener's headers; the page shows its
    // answer, with the listener's secret masked.
    click(
        &b,
        "section.listener[data-listener=crm] form.test-send button",
    )
    .await;
    let result = "section.test-result[data-listener=crm]";
    let notice = text(&b, &format!("{result} p.notice")).await;
    assert!(
        notice.starts_with("Delivered: the listener accepted a sample Customer.Created event"),
        "{notice}"
    );
    assert!(notice.contains(" with HTTP 200 OK in "), "{notice}");
    let received = hook.requests();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].json()["type"], "Customer.Created");
    assert_eq!(received[0].header("x-api-key"), Some(API_KEY));
    assert_eq!(
        text(&b, &format!("{result} pre.answer")).await,
        "thanks; you sent key ***"
    );
    let page = b.source().await.unwrap();
    for secret in [API_KEY, "do-not-show-me"] {
        assert!(!page.contains(secret), "{secret} is shown");
    }

    // Reloading the result page sends nothing (the POST redirected), and another session
    // does not see the result.
    let shown_at = b.current_url().await.unwrap();
    assert!(
        shown_at.as_str().contains("/ui/listeners?test="),
        "{shown_at}"
    );
    b.refresh().await.unwrap();
    element(&b, result).await;
    assert_eq!(hook.count(), 1);
    let other = login(base, TOKEN).await;
    let r = http()
        .get(shown_at.as_str())
        .header(COOKIE, &other)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let other_page = r.text().await.unwrap();
    assert!(other_page.contains("data-listener=\"crm\""), "{other_page}");
    assert!(!other_page.contains("test-result"), "{other_page}");

    // Nobody listens at the other listener's address: the page says so in plain words.
    click(
        &b,
        "section.listener[data-listener=down] form.test-send button",
    )
    .await;
    let error = text(&b, "section.test-result[data-listener=down] p.error").await;
    assert!(
        error.starts_with(&format!(
            "Not delivered: connection refused by 127.0.0.1:{dead}"
        )),
        "{error}"
    );
    assert!(
        error.ends_with("walhook would retry such a failure."),
        "{error}"
    );
    screenshot(&b, "listeners").await;

    // Without the CSRF token, or without the session cookie, the POST is refused and
    // sends nothing.
    let session = browser_session(&b).await;
    let csrf = element(&b, "section.listener[data-listener=crm] input[name=csrf]")
        .await
        .attr("value")
        .await
        .unwrap()
        .expect("the form carries the CSRF token");
    let attempts = [
        (Some(session.as_str()), vec![("listener", "crm")], 403),
        (
            Some(session.as_str()),
            vec![("listener", "crm"), ("csrf", "0000")],
            403,
        ),
        (
            None,
            vec![("listener", "crm"), ("csrf", csrf.as_str())],
            401,
        ),
    ];
    for (cookie, form, status) in attempts {
        let mut r = http().post(format!("{base}/ui/listeners/test")).form(&form);
        if let Some(cookie) = cookie {
            r = r.header(COOKIE, cookie);
        }
        assert_eq!(
            r.send().await.unwrap().status().as_u16(),
            status,
            "{form:?}"
        );
    }
    assert_eq!(hook.count(), 1, "a refused POST sent a test event");
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listeners_page_shows_an_event_grid_webhook_awaiting_validation_until_it_answers_the_handshake()
 {
    let Some((chromium, chromedriver)) = browser_programs() else {
        return;
    };
    const API_KEY: &str = "grid-api-key-9d2c41";
    let is_validation = |r: &support::receiver::Received| {
        r.header("aeg-event-type") == Some("SubscriptionValidation")
    };
    let db = TestDb::new();
    db.execute("CREATE TABLE customer (id int PRIMARY KEY, name text);")
        .await;
    // The listener is not ready for the handshake yet.
    let grid = Receiver::start().await;
    grid.respond_with(|_, _| Reply::status(500).body("not ready yet"));
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let blocks = format!(
        "{}{CUSTOMER_ENTITY}\n[[listener]]\nname = \"grid\"\nurl = \"{}\"\nformat = \"eventgrid\"\nbackoff = {{ initial = \"100ms\", max = \"1s\" }}\nheaders = {{ \"X-Api-Key\" = \"{API_KEY}\" }}\n",
        admin_section(dir.path(), port, Some(TOKEN)),
        grid.url("/events")
    );
    let _daemon = Daemon::start(&config_toml(&db.url, &blocks));
    eventually(
        Duration::from_secs(60),
        "a validation event refused by the listener",
        || async { grid.requests().iter().any(is_validation).then_some(()) },
    )
    .await;

    let driver = start_driver(&chromedriver).await;
    let b = browser(&driver, &chromium, &dir.path().join("chromium-profile")).await;
    log_in(&b, &base, "/ui/listeners").await;
    let state = "section.listener[data-listener=grid] dd.validation";
    assert_eq!(
        element(&b, state)
            .await
            .attr("data-state")
            .await
            .unwrap()
            .as_deref(),
        Some("awaiting")
    );
    let awaiting = text(&b, state).await;
    assert!(awaiting.starts_with("awaiting validation "), "{awaiting}");

    // The listener now answers validation events with their code: after the next
    // handshake the page says it is validated.
    grid.respond_with(move |r, _| {
        if !is_validation(r) {
            return Reply::status(200);
        }
        let code = r.json()[0]["data"]["validationCode"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        Reply::status(200)
            .header("content-type", "application/json")
            .body(&format!("{{\"validationResponse\":\"{code}\"}}"))
    });
    let validated = eventually(
        Duration::from_secs(60),
        "the listeners page saying validated",
        || async {
            b.refresh().await.ok()?;
            let line = text(&b, state).await;
            line.starts_with("validated ").then_some(line)
        },
    )
    .await;
    assert!(
        validated.ends_with("it answered with the validation code"),
        "{validated}"
    );
    assert_eq!(
        element(&b, state)
            .await
            .attr("data-state")
            .await
            .unwrap()
            .as_deref(),
        Some("validated")
    );
    assert!(!b.source().await.unwrap().contains(API_KEY));
    screenshot(&b, "validated-listener").await;
    b.close().await.unwrap();
}
