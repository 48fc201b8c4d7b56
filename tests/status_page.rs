//! The status page (`GET /` on the admin endpoint) in a real browser:
//! headless Chromium driven through ChromeDriver (WebDriver), against the
//! real daemon. It shows a backend going down when its server stops, stays
//! read-only until a token is entered, refuses a wrong token, drains with
//! the right one (the status API then says `drain`), and fits a phone's
//! width. A screenshot is written to `target/status-page.png`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};

const TOKEN: &str = "page-t0ken";

/// ChromeDriver on a port of its choosing, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start() -> Driver {
        let mut child = Command::new("chromedriver")
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "chromedriver runs (Debian package chromium-driver; scripts/test.sh installs it)",
            );
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(port) = line
                    .split("started successfully on port ")
                    .nth(1)
                    .and_then(|rest| rest.trim_end_matches('.').parse::<u16>().ok())
                {
                    let _ = tx.send(port);
                }
            }
        });
        let port = rx
            .recv_timeout(DEADLINE)
            .expect("chromedriver says which port it listens on");
        Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver, profile: &std::path::Path) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1200,700",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    within(
        "a Chromium session",
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&driver.url),
    )
    .await
    .expect("ChromeDriver starts Chromium")
}

async fn text(c: &Client, css: &str) -> Option<String> {
    c.find(Locator::Css(css)).await.ok()?.text().await.ok()
}

async fn displayed(c: &Client, css: &str) -> bool {
    match c.find(Locator::Css(css)).await {
        Ok(e) => e.is_displayed().await.unwrap_or(false),
        Err(_) => false,
    }
}

async fn admin_state(admin: std::net::SocketAddr, backend: &str) -> String {
    let (status, body) = http(admin, "GET", "/api/v1/status", &[], "").await;
    assert_eq!(status, 200, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    doc["listeners"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == backend)
        .unwrap_or_else(|| panic!("no backend {backend} in {body}"))["admin_state"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn enter_token(c: &Client, token: &str) {
    let input = c.find(Locator::Css("#token")).await.unwrap();
    input.send_keys(token).await.unwrap();
    c.find(Locator::Css("#unlock"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("click {css}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_health_and_drains_with_a_token_in_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let (web1, web2) = (
        NamedBackend::start("web1").await,
        NamedBackend::start("web2").await,
    );
    let fast = "[listener.health_check]\ninterval = \"300ms\"\ntimeout = \"200ms\"\n";
    let toml = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n{}{fast}",
        token_file.display(),
        listener_toml(
            "roundrobin",
            "",
            &[b("web1", web1.addr), b("web2", web2.addr)]
        )
    );
    let d = Daemon::start(&toml);
    let admin = d.admin.unwrap();
    let proxy = d.addr("l");
    // Traffic, so the counters move.
    for _ in 0..4 {
        connect_named(proxy).await;
    }

    let driver = Driver::start();
    let c = browser(&driver, &dir.path().join("profile")).await;
    c.goto(&format!("http://{admin}/")).await.unwrap();
    assert_eq!(c.title().await.unwrap(), "switchyard status");

    // Both backends up, with the traffic counted.
    for name in ["web1", "web2"] {
        let row = format!("tr[data-backend=\"{name}\"]");
        eventually_some(&format!("{name} shown up"), || async {
            (text(&c, &format!("{row} td.health")).await? == "up").then_some(())
        })
        .await;
        let total: u64 = text(&c, &format!("{row} td.total"))
            .await
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(total, 2, "{name}: round robin gave it 2 of 4");
        assert_eq!(text(&c, &format!("{row} td.admin")).await.unwrap(), "ready");
    }

    // The server behind web2 stops: its row turns down, with the reason,
    // and stands out.
    web2.stop();
    let health = eventually_some("web2 shown down", || async {
        let t = text(&c, "tr[data-backend=\"web2\"] td.health").await?;
        t.starts_with("down").then_some(t)
    })
    .await;
    assert!(health.contains("connection refused"), "{health}");
    let class = c
        .find(Locator::Css("tr[data-backend=\"web2\"]"))
        .await
        .unwrap()
        .attr("class")
        .await
        .unwrap();
    assert_eq!(class.as_deref(), Some("down"));
    assert!(
        text(&c, "#updated").await.unwrap().contains("1 down"),
        "summary counts the down backend"
    );

    // Read-only without a token: no state buttons, a token field.
    assert!(displayed(&c, "#token").await);
    assert!(!displayed(&c, "tr[data-backend=\"web1\"] button[data-state=\"drain\"]").await);

    // A wrong token is refused by the daemon and forgotten by the page.
    enter_token(&c, "not-the-token").await;
    eventually_some("buttons after a token", || async {
        displayed(&c, "tr[data-backend=\"web1\"] button[data-state=\"maint\"]")
            .await
            .then_some(())
    })
    .await;
    click(&c, "tr[data-backend=\"web1\"] button[data-state=\"maint\"]").await;
    let notice = eventually_some("the refusal shown", || async {
        let t = text(&c, "#notice").await?;
        t.contains("refused").then_some(t)
    })
    .await;
    assert!(notice.contains("token"), "{notice}");
    assert_eq!(admin_state(admin, "web1").await, "ready");
    eventually_some("read-only again", || async {
        (!displayed(&c, "tr[data-backend=\"web1\"] button[data-state=\"drain\"]").await)
            .then_some(())
    })
    .await;

    // The right token: drain web1 with a click; the API says so.
    enter_token(&c, TOKEN).await;
    eventually_some("buttons after the right token", || async {
        displayed(&c, "tr[data-backend=\"web1\"] button[data-state=\"drain\"]")
            .await
            .then_some(())
    })
    .await;
    click(&c, "tr[data-backend=\"web1\"] button[data-state=\"drain\"]").await;
    eventually_some("web1 drained (status API)", || async {
        (admin_state(admin, "web1").await == "drain").then_some(())
    })
    .await;
    eventually_some("web1 shown drained", || async {
        (text(&c, "tr[data-backend=\"web1\"] td.admin").await? == "drain").then_some(())
    })
    .await;

    let png = c.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG screenshot");
    let shot = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/status-page.png");
    std::fs::write(&shot, &png).unwrap();

    // A phone's width: nothing wider than the screen, every backend a card.
    c.set_window_size(390, 844).await.unwrap();
    let fits = c
        .execute(
            "return document.documentElement.scrollWidth <= window.innerWidth",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(fits, serde_json::json!(true), "page wider than a phone");
    assert!(
        !displayed(&c, "thead").await,
        "column headings become labels"
    );
    assert!(displayed(&c, "tr[data-backend=\"web2\"] td.health").await);

    c.close().await.unwrap();
}
