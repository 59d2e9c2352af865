//! The desktop app `diemcau`, for real: WebKitGTK under Xvfb, driven over WebDriver
//! (tauri-driver + WebKitWebDriver), against the real `diemcau-server --dev` and headless
//! `diemcau-cli` sites. Screenshots go to `test-output/`.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diemcau_e2e::desktop::{output_dir, AppEnv, Display, Session, APP};
use diemcau_e2e::{dev_token, spawn_dev_server, workspace_bin, Proc, StderrLines};
use diemcau_protocol::Role;
use serde_json::Value;

const APP_SITE: &str = "nam-dan-kim-lien";

fn lock() -> std::sync::MutexGuard<'static, ()> {
    APP.lock().unwrap_or_else(|p| p.into_inner())
}

/// A headless site: its stderr lines as they come, its JSON report on stop.
struct Cli {
    child: Option<Child>,
    lines: StderrLines,
}

impl Cli {
    fn join(url: &str, site: &str, room: &str, extra: &[&str]) -> Cli {
        let mut child = Command::new(workspace_bin("diemcau-cli"))
            .args(["join", "--server", url, "--site", site, "--room", room])
            .args(["--duration", "600", "--report", "json"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("diemcau-cli starts");
        let lines = StderrLines::of(&mut child);
        Cli {
            child: Some(child),
            lines,
        }
    }

    /// Waits for a stderr line that `pick` accepts.
    fn wait_line(&mut self, timeout: Duration, what: &str, pick: impl Fn(&str) -> bool) -> String {
        self.lines.wait(timeout, what, pick)
    }

    /// SIGTERM: the site leaves and prints its report.
    fn stop(mut self) -> Value {
        let mut child = self.child.take().expect("running");
        let ok = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -TERM");
        let mut out = String::new();
        child
            .stdout
            .take()
            .expect("piped")
            .read_to_string(&mut out)
            .expect("report");
        let status = child.wait().expect("cli exits");
        assert!(status.success(), "diemcau-cli exited with {status}");
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("report {out:?}: {e}"))
    }
}

impl Drop for Cli {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What the report says was received from `site`.
fn received_from<'a>(report: &'a Value, site: &str) -> &'a Value {
    report["received"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["site"] == site))
        .unwrap_or_else(|| panic!("nothing received from {site}: {report}"))
}

fn machine_config(url: &str, room: &str, portal: Option<&str>) -> String {
    let mut s = format!("server = \"{url}\"\nsite = \"{APP_SITE}\"\nroom = \"{room}\"\n");
    if let Some(p) = portal {
        s.push_str(&format!("portal_url = \"{p}\"\n"));
    }
    s
}

fn app_bin() -> std::path::PathBuf {
    workspace_bin("diemcau")
}

const PREJOIN_READY: &str = "const s = document.getElementById('screen-prejoin'); \
     return !!s && !s.hidden && document.getElementById('join').textContent.length > 0";

/// Waits until an element matching `css` (which must not contain `'`) is in the page.
fn wait_element(app: &Session, css: &str, timeout: Duration, what: &str) {
    app.wait_until(
        &format!("return !!document.querySelector('{css}')"),
        timeout,
        what,
    );
}

/// Waits until the element `id` shows some text, and returns it.
fn text_of(app: &Session, id: &str, timeout: Duration) -> String {
    let v = app.wait_until(
        &format!("const e = document.getElementById('{id}'); return e && e.textContent"),
        timeout,
        &format!("text in #{id}"),
    );
    v.as_str().unwrap_or_default().to_string()
}

/// The contents of the file whose path the app announced in a notice ("…: PATH") that
/// mentions `marker`.
fn announced_file(app: &Session, marker: &str, what: &str) -> String {
    let path = app.wait_until(
        &format!(
            "const n = [...document.querySelectorAll('#notices li')].map(l => l.textContent) \
             .find(t => t.includes('{marker}')); return n ? n.split(': ').pop() : ''"
        ),
        Duration::from_secs(10),
        what,
    );
    let path = path.as_str().unwrap_or_default();
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{what} at {path}: {e}"))
}

#[test]
fn the_app_joins_shows_moving_video_raises_a_hand_and_is_verified_by_a_headless_site() {
    let _g = lock();
    let (_server, url) = spawn_dev_server();
    let room = "hop-app";
    let chair = dev_token("nghe-an", Role::Chair, room);
    let mut cli = Cli::join(&url, "nghe-an", room, &["--token", &chair]);
    cli.wait_line(Duration::from_secs(30), "the chair site to join", |l| {
        l.contains("Đã tham gia")
    });

    let display = Display::start();
    let env = AppEnv::new("call", &display, &machine_config(&url, room, None));
    let app = Session::start(&app_bin(), &[], &env);
    app.wait_until(
        PREJOIN_READY,
        Duration::from_secs(60),
        "the pre-join screen",
    );
    // Vietnamese with its diacritics, in the DOM and (see the screenshot) on screen.
    assert_eq!(
        app.exec("return document.getElementById('join').textContent"),
        "Tham gia"
    );
    assert_eq!(app.exec("return document.characterSet"), "UTF-8");
    let out = output_dir();
    app.screenshot(&out.join("app-1-prejoin.png"));

    app.click("#join");
    let tile = "document.querySelector('.tile[data-site=\"nghe-an\"] canvas')";
    let frames = format!("const c = {tile}; return c ? Number(c.dataset.frames || 0) : 0");
    app.wait_until(
        &format!("const c = {tile}; return !!c && Number(c.dataset.frames) >= 20"),
        Duration::from_secs(60),
        "20 pictures from the chair's site drawn in its tile",
    );
    // Moving video: more pictures drawn, and the pixels differ (the test pattern moves).
    let pixels = format!("return {tile}.toDataURL('image/png')");
    let (f1, p1) = (app.exec(&frames).as_f64().unwrap_or(0.0), app.exec(&pixels));
    app.wait_until(
        &format!(
            "const c = {tile}; return Number(c.dataset.frames) >= {}",
            f1 + 15.0
        ),
        Duration::from_secs(30),
        "15 more pictures",
    );
    let p2 = app.exec(&pixels);
    assert_ne!(p1, p2, "the remote tile's pixels did not change");
    assert_eq!(
        app.exec(&format!("return {tile}.dataset.renderer")),
        "webgl",
        "the tile is not drawn with WebGL"
    );
    // The self view shows what this site sends.
    app.wait_until(
        "return Number(document.getElementById('self-view').dataset.frames || 0) >= 5",
        Duration::from_secs(10),
        "pictures in the self view",
    );
    // The roster groups the sites by the administrative tree.
    wait_element(
        &app,
        &format!(
            "#roster .node[data-site=\"nghe-an\"] .node[data-site=\"nam-dan\"] \
             .node[data-site=\"{APP_SITE}\"]"
        ),
        Duration::from_secs(10),
        "province → district → commune in the roster",
    );
    app.screenshot(&out.join("app-2-call.png"));
    display.screenshot(&out.join("app-2-call-screen.png"));

    // Raise a hand: the button says so, the roster shows it, the chair's site sees it.
    app.click("#raise");
    wait_element(
        &app,
        &format!("#roster .node[data-site=\"{APP_SITE}\"] .hand"),
        Duration::from_secs(10),
        "the raised hand in the roster",
    );
    assert_eq!(
        app.exec("return document.getElementById('raise').textContent"),
        "Hạ tay"
    );
    cli.wait_line(Duration::from_secs(10), "the chair to see the hand", |l| {
        l.contains("Hàng chờ phát biểu") && l.contains(APP_SITE)
    });
    app.screenshot(&out.join("app-3-hand.png"));

    // The link quality: graded in the pill, with its figures in the tooltip, and per tile.
    app.wait_until(
        "const q = document.getElementById('quality'); \
         return ['good', 'fair', 'poor'].includes(q.dataset.q) && q.title.includes('kbit/s')",
        Duration::from_secs(10),
        "the quality pill",
    );
    wait_element(
        &app,
        ".tile[data-site=\"nghe-an\"][data-q]",
        Duration::from_secs(10),
        "the chair's tile graded",
    );
    // Sound only: the others' pictures stop coming (two quiet seconds), then come back.
    app.click("#sound-only");
    app.wait_until(
        "return document.getElementById('sound-only').textContent === 'Bật lại hình'",
        Duration::from_secs(5),
        "the button to offer pictures back",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut last, mut since) = (app.exec(&frames).as_f64().unwrap_or(0.0), Instant::now());
    while since.elapsed() < Duration::from_secs(2) {
        assert!(
            Instant::now() < deadline,
            "pictures still arrive with sound only"
        );
        std::thread::sleep(Duration::from_millis(250));
        let now = app.exec(&frames).as_f64().unwrap_or(0.0);
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    app.click("#sound-only");
    app.wait_until(
        &format!(
            "const c = {tile}; return Number(c.dataset.frames) >= {}",
            last + 10.0
        ),
        Duration::from_secs(15),
        "pictures again after sound only",
    );

    let report = cli.stop();
    let hands: Vec<&str> = report["hand_queue"]
        .as_array()
        .map(|a| a.iter().filter_map(|h| h["site"].as_str()).collect())
        .unwrap_or_default();
    assert!(hands.contains(&APP_SITE), "hand queue {hands:?}");
    // The app has no camera here: it sends the labelled test pattern, which the chair's
    // site checks picture by picture.
    let from_app = received_from(&report, APP_SITE);
    let verified = from_app["video_frames_verified"].as_u64().unwrap_or(0);
    let got = from_app["video_frames"].as_u64().unwrap_or(0);
    assert!(
        verified >= 15,
        "only {verified} verified pictures from the app: {from_app}"
    );
    assert!(
        verified * 10 >= got * 9,
        "{verified} of {got} verified: {from_app}"
    );
    app.close();
}

#[test]
fn kiosk_start_publishes_video_that_a_cli_site_verifies() {
    let _g = lock();
    let (_server, url) = spawn_dev_server();
    let mut cli = Cli::join(&url, "xa-kiem-tra", "hop-tinh", &[]);
    cli.wait_line(Duration::from_secs(30), "the site to join", |l| {
        l.contains("Đã tham gia")
    });
    // Exactly what an office's autostart runs; no WebDriver, no configuration file.
    let display = Display::start();
    let env = AppEnv::new("kiosk", &display, "");
    let mut cmd = Command::new("xvfb-run");
    cmd.args(["-a"])
        .arg(app_bin())
        .args(["--join", "--server", &url, "--site", APP_SITE])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in &env.vars {
        if k != "DISPLAY" {
            cmd.env(k, v);
        }
    }
    let app = Proc::group(&mut cmd);
    // The site prints what it has verified every 5 s.
    let line = cli.wait_line(
        Duration::from_secs(90),
        "verified pictures from the app",
        |l| {
            l.split(&format!("{APP_SITE}: "))
                .nth(1)
                .is_some_and(|rest| {
                    // "N hình (M đã kiểm)"
                    rest.split(['(', ' '])
                        .filter_map(|w| w.parse::<u64>().ok())
                        .nth(1)
                        .is_some_and(|m| m >= 30)
                })
        },
    );
    let report = cli.stop();
    let from_app = received_from(&report, APP_SITE);
    assert!(
        from_app["video_frames_verified"].as_u64().unwrap_or(0) >= 30,
        "{line}\n{from_app}"
    );
    drop(app);
    assert!(env.log_text().contains("joining"), "{}", env.log_text());
}

/// A local stand-in for the province's portal, serving one UTF-8 page until stopped.
struct Portal {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const PORTAL_PAGE: &str = "<!doctype html><html lang=\"vi\"><head><meta charset=\"utf-8\">\
<title>Cổng thông tin Covid-19 Nghệ An</title></head><body>\
<h1 id=\"portal-heading\">Cổng thông tin phòng chống dịch Covid-19</h1>\
<p>Số ca mắc mới hôm nay: 0. Xin chào các điểm cầu!</p></body></html>";

impl Portal {
    fn start(port: u16) -> Portal {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("portal port");
        let port = listener.local_addr().expect("bound").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut buf = [0u8; 4096];
                        let _ = conn.read(&mut buf);
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{PORTAL_PAGE}",
                            PORTAL_PAGE.len()
                        );
                        let _ = conn.write_all(resp.as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Portal {
            port,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }
}

impl Drop for Portal {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Calls one of the app's commands from the current window; "ok" or the refusal.
const TRY_IPC: &str = "const done = arguments[arguments.length - 1]; \
    const ipc = window.__TAURI_INTERNALS__; \
    if (!ipc) { done('refused: no IPC in this page'); return; } \
    ipc.invoke('app_state', {}).then(() => done('ok'), (e) => done('refused: ' + String(e)));";

#[test]
fn the_portal_window_cannot_call_the_app_and_shows_an_offline_page_when_down() {
    let _g = lock();
    let (_server, url) = spawn_dev_server();
    let portal = Portal::start(0);
    let portal_url = portal.url();
    let display = Display::start();
    let env = AppEnv::new(
        "portal",
        &display,
        &machine_config(&url, "hop-cong", Some(&portal_url)),
    );
    let app = Session::start(&app_bin(), &[], &env);
    app.wait_until(
        PREJOIN_READY,
        Duration::from_secs(60),
        "the pre-join screen",
    );
    // The main window may call its commands: the control for the refusal below.
    assert_eq!(app.exec_async(TRY_IPC), "ok");

    // "Export diagnostics" writes one file with versions, settings and the log.
    app.click("#export-diag");
    let diag = announced_file(&app, "diemcau-chan-doan", "the diagnostics file");
    assert!(
        diag.contains("diemcau: 0.1.0") && diag.contains("webview:"),
        "{diag}"
    );
    assert!(
        diag.contains("Điểm cầu starting"),
        "no log in the diagnostics:\n{diag}"
    );
    let main_url = app.url();

    app.click("#open-portal");
    app.switch_to_window_where(
        |u| u.starts_with(&portal_url),
        Duration::from_secs(30),
        "the portal page",
    );
    assert_eq!(
        text_of(&app, "portal-heading", Duration::from_secs(20)),
        "Cổng thông tin phòng chống dịch Covid-19"
    );
    let answer = app.exec_async(TRY_IPC);
    let answer = answer.as_str().unwrap_or_default();
    assert!(
        answer.starts_with("refused") && answer.contains("not allowed"),
        "the portal called the app: {answer}"
    );
    let out = output_dir();
    // WebKitWebDriver's screenshot hangs on a second window; the screen's is taken instead.
    display.screenshot(&out.join("app-4-portal.png"));

    // The portal goes down: opening it again shows the offline page, itself without rights.
    let port = portal.port;
    drop(portal);
    app.switch_to_window_where(|u| u == main_url, Duration::from_secs(5), "the main window");
    app.click("#open-portal");
    app.switch_to_window_where(
        |u| u.contains("portal-offline.html"),
        Duration::from_secs(30),
        "the offline page",
    );
    assert_eq!(
        text_of(&app, "offline-title", Duration::from_secs(20)),
        "Không mở được cổng thông tin"
    );
    let answer = app.exec_async(TRY_IPC);
    assert!(
        answer.as_str().unwrap_or_default().starts_with("refused"),
        "the offline page called the app: {answer}"
    );
    display.screenshot(&out.join("app-5-portal-offline.png"));

    // Back up: "Thử lại" brings the portal back.
    let _portal = Portal::start(port);
    app.click("#retry");
    app.switch_to_window_where(
        |u| u.starts_with(&portal_url),
        Duration::from_secs(30),
        "the portal again after retry",
    );
    app.close();
}

/// The chair's view: a commune raises its hand, the chair (in the app) sees it, gives it the
/// floor in chair-only mode, and exports the roll-call.
#[test]
fn the_chair_sees_a_raised_hand_gives_the_floor_and_exports_the_roll_call() {
    let _g = lock();
    let (_server, url) = spawn_dev_server();
    let room = "hop-chu-toa";
    let token = dev_token("nghe-an", Role::Chair, room);
    let config =
        format!("server = \"{url}\"\nsite = \"nghe-an\"\nroom = \"{room}\"\ntoken = \"{token}\"\n");
    let display = Display::start();
    let env = AppEnv::new("chair", &display, &config);
    let app = Session::start(&app_bin(), &["--join"], &env);
    app.wait_until(
        "const p = document.getElementById('chair-panel'); return !!p && !p.hidden",
        Duration::from_secs(60),
        "the chair's panel",
    );
    // Only the chair and the site it invites may speak.
    app.exec(
        "const s = document.getElementById('floor-mode'); s.value = 'chair_only'; \
         s.dispatchEvent(new Event('change')); return true",
    );
    let mut commune = Cli::join(
        &url,
        "tp-vinh-le-loi",
        room,
        &["--raise-hand-after", "1", "--accept-unmute"],
    );
    let hand = "#chair-hands li[data-site=\"tp-vinh-le-loi\"] .grant";
    wait_element(
        &app,
        hand,
        Duration::from_secs(30),
        "the commune's hand in the chair's queue",
    );
    // The server confirmed the mode (the panel shows the floor state it sent back).
    app.wait_until(
        "return document.getElementById('chair-panel').dataset.mode === 'chair_only'",
        Duration::from_secs(10),
        "chair-only mode confirmed by the server",
    );
    app.screenshot(&output_dir().join("app-6-chair-hand.png"));
    app.click(hand);
    commune.wait_line(Duration::from_secs(10), "the floor at the commune", |l| {
        l.contains("Chủ tọa đã cho phép bạn phát biểu")
    });
    wait_element(
        &app,
        "#chair-granted [data-site=\"tp-vinh-le-loi\"]",
        Duration::from_secs(10),
        "the granted site in the chair's panel",
    );
    app.screenshot(&output_dir().join("app-7-chair-granted.png"));

    // Roll-call: start it, mark an absent district with the reason the chair types.
    app.click("#roll-start");
    let row = "#roll-list li[data-site=\"con-cuong\"]";
    wait_element(&app, row, Duration::from_secs(10), "the roll-call list");
    app.click("#roll-details summary");
    app.exec(&format!(
        "document.querySelector('{row} input').value = 'Mất điện'; return true"
    ));
    app.click(&format!("{row} button:last-of-type"));
    app.wait_until(
        &format!(
            "const r = document.querySelector('{row}'); return !!r && r.dataset.key.includes('Mất điện')"
        ),
        Duration::from_secs(10),
        "the reason recorded by the server",
    );
    app.click("#roll-export");
    let csv = announced_file(&app, ".csv", "the exported roll-call");
    assert!(
        csv.starts_with("site,name,path,status,connected,reason"),
        "{csv}"
    );
    assert!(csv.contains("tp-vinh-le-loi"), "{csv}");
    assert!(
        csv.lines()
            .any(|l| l.starts_with("con-cuong,") && l.contains("absent") && l.contains("Mất điện")),
        "{csv}"
    );
    drop(commune);
    app.close();
}

/// A second start on the same desktop does not open a second app: it hands over to the
/// first (which comes to the front) and exits.
#[test]
fn a_second_start_hands_over_to_the_running_app() {
    let _g = lock();
    let display = Display::start();
    let env = AppEnv::new(
        "single",
        &display,
        "server = \"ws://127.0.0.1:9\"\nsite = \"xa-a\"\n",
    );
    let start = || {
        let mut cmd = Command::new(app_bin());
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        for (k, v) in &env.vars {
            cmd.env(k, v);
        }
        cmd.spawn().expect("the app starts")
    };
    let mut first = Proc(start());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !env.log_text().contains("Điểm cầu starting") {
        assert!(Instant::now() < deadline, "the first app did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The window is up when the preview runs.
    while !env.log_text().contains("preview:") {
        assert!(
            Instant::now() < deadline,
            "the first app shows no window:\n{}",
            env.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut second = Proc(start());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = second.0.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "the second start kept running");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
    assert!(
        first.0.try_wait().expect("wait").is_none(),
        "the first app went away"
    );
}
