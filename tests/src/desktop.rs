//! Driving the real desktop app: an Xvfb display, a private D-Bus session, `tauri-driver`
//! (with Debian's `WebKitWebDriver` behind it) and a small W3C WebDriver client over HTTP.
//!
//! Every app gets fresh config, data and runtime directories, so tests never share window
//! state, logs or the single-instance lock.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Apps are serialised: WebKit allows one automation session at a time, and two apps on two
/// cores would measure the machine rather than the app.
pub static APP: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A child process, killed on drop (with its whole process group when started with
/// [`Proc::group`]: `xvfb-run` leaves its Xvfb and the app behind otherwise).
#[derive(Debug)]
pub struct Proc(pub Child);

impl Proc {
    /// Starts `cmd` as the leader of a new process group.
    pub fn group(cmd: &mut Command) -> Proc {
        use std::os::unix::process::CommandExt;
        Proc(cmd.process_group(0).spawn().expect("the command starts"))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A group leader's pid is its group id; for a lone process this is a no-op.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Starts `cmd` with its stdout piped and returns it with its first stdout line (trimmed):
/// the address or display a server reports when it is ready.
pub fn first_line(cmd: &mut Command, what: &str) -> (Proc, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{what} does not start: {e}"));
    let stdout = child.stdout.take().expect("piped stdout");
    let child = Proc(child);
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("{what} reports nothing: {e}"));
    (child, line.trim().to_string())
}

/// Where a tool lives: on PATH or in cargo's bin directory.
pub fn tool(name: &str) -> PathBuf {
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(std::env::var_os("CARGO_HOME").map(|h| PathBuf::from(h).join("bin")))
        .chain(std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin")));
    for dir in candidates {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} is not installed; scripts/setup installs it (apt: xvfb dbus webkit2gtk-driver; cargo: tauri-driver)")
}

/// A headless X display and a D-Bus session bus, for as long as this lives.
#[derive(Debug)]
pub struct Display {
    pub display: String,
    pub dbus: String,
    _xvfb: Proc,
    _bus: Proc,
}

impl Display {
    pub fn start() -> Display {
        // -displayfd: Xvfb picks a free display number and writes it to us when ready.
        let (xvfb, number) = first_line(
            Command::new(tool("Xvfb")).args([
                "-displayfd",
                "1",
                "-screen",
                "0",
                "1280x800x24",
                "-nolisten",
                "tcp",
            ]),
            "Xvfb",
        );
        let (bus, dbus) = first_line(
            Command::new(tool("dbus-daemon")).args(["--session", "--nofork", "--print-address=1"]),
            "dbus-daemon",
        );
        Display {
            display: format!(":{number}"),
            dbus,
            _xvfb: xvfb,
            _bus: bus,
        }
    }

    /// A PNG of the whole screen (ImageMagick's `import`).
    pub fn screenshot(&self, path: &Path) {
        let ok = Command::new("import")
            .args(["-window", "root"])
            .arg(path)
            .env("DISPLAY", &self.display)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "screenshot of {} failed", self.display);
    }
}

/// Fresh per-app directories and environment.
#[derive(Debug)]
pub struct AppEnv {
    pub root: PathBuf,
    pub machine_config: PathBuf,
    pub vars: Vec<(String, String)>,
}

impl AppEnv {
    /// `machine_config` is written as the installer would.
    pub fn new(name: &str, display: &Display, machine_config: &str) -> AppEnv {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let root = std::env::temp_dir().join(format!(
            "diemcau-app-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&root);
        for d in ["config", "data", "runtime", "home"] {
            std::fs::create_dir_all(root.join(d)).expect("temp dirs");
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(
                root.join("runtime"),
                std::fs::Permissions::from_mode(0o700),
            );
        }
        let machine = root.join("machine.toml");
        std::fs::write(&machine, machine_config).expect("machine config");
        let s = |p: PathBuf| p.display().to_string();
        let vars = vec![
            ("DISPLAY".into(), display.display.clone()),
            ("DBUS_SESSION_BUS_ADDRESS".into(), display.dbus.clone()),
            ("XDG_CONFIG_HOME".into(), s(root.join("config"))),
            ("XDG_DATA_HOME".into(), s(root.join("data"))),
            ("XDG_RUNTIME_DIR".into(), s(root.join("runtime"))),
            ("HOME".into(), s(root.join("home"))),
            ("DIEMCAU_MACHINE_CONFIG".into(), s(machine.clone())),
            // No GPU here: WebKit's DMA-BUF renderer draws nothing under Xvfb.
            ("WEBKIT_DISABLE_DMABUF_RENDERER".into(), "1".into()),
            ("LIBGL_ALWAYS_SOFTWARE".into(), "1".into()),
            ("RUST_LOG".into(), "info,webrtc=warn,rtc=warn".into()),
        ];
        AppEnv {
            root,
            machine_config: machine,
            vars,
        }
    }

    /// The app's log file (see `src-tauri/src/diagnostics.rs`).
    pub fn log(&self) -> PathBuf {
        self.root.join("data/diemcau/logs/diemcau.log")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }
}

/// `tauri-driver` and one WebDriver session with the app.
#[derive(Debug)]
pub struct Session {
    base: String,
    _driver: Proc,
}

impl Session {
    /// Starts tauri-driver and the app `binary` with `args` in `env`.
    pub fn start(binary: &Path, args: &[&str], env: &AppEnv) -> Session {
        let (port, native) = (free_port(), free_port());
        let mut cmd = Command::new(tool("tauri-driver"));
        cmd.args([
            "--port",
            &port.to_string(),
            "--native-port",
            &native.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        for (k, v) in &env.vars {
            cmd.env(k, v);
        }
        let driver = Proc::group(&mut cmd);
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while ureq::get(&format!("{base}/status")).call().is_err() {
            assert!(Instant::now() < deadline, "tauri-driver did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {"tauri:options": {
            "application": binary.display().to_string(),
            "args": args,
        }}}});
        let resp = post(&format!("{base}/session"), &caps)
            .unwrap_or_else(|e| panic!("WebDriver session: {e}\n{}", env.log_text()));
        let id = resp["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session id in {resp}"))
            .to_string();
        Session {
            base: format!("{base}/session/{id}"),
            _driver: driver,
        }
    }

    fn get(&self, path: &str) -> Value {
        let url = format!("{}{path}", self.base);
        match agent().get(&url).call() {
            Ok(r) => r.into_json::<Value>().expect("JSON from WebDriver")["value"].take(),
            Err(e) => panic!("GET {path}: {}", describe(e)),
        }
    }

    fn post(&self, path: &str, body: &Value) -> Result<Value, String> {
        post(&format!("{}{path}", self.base), body).map(|mut v| v["value"].take())
    }

    /// Runs `script` in the current window and returns its value.
    pub fn exec(&self, script: &str) -> Value {
        self.post("/execute/sync", &json!({"script": script, "args": []}))
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Runs `script`, which calls `arguments[0]` (its callback) with the result.
    pub fn exec_async(&self, script: &str) -> Value {
        self.post("/execute/async", &json!({"script": script, "args": []}))
            .unwrap_or_else(|e| panic!("async script failed: {e}\n{script}"))
    }

    /// Waits until `script` returns something truthy; panics with `what` after `timeout`.
    pub fn wait_until(&self, script: &str, timeout: Duration, what: &str) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self
                .post("/execute/sync", &json!({"script": script, "args": []}))
                .unwrap_or(Value::Null);
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64().is_some_and(|x| x != 0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return v;
            }
            if Instant::now() >= deadline {
                let page = self
                    .post(
                        "/execute/sync",
                        &json!({"script": "return document.body.innerText.slice(0, 3000) + '\\n' + \
                            [...document.querySelectorAll('canvas')].map(c => (c.closest('[data-site]')?.dataset.site ?? c.id) + '=' + c.dataset.frames).join(' ')", "args": []}),
                    )
                    .unwrap_or_default();
                panic!(
                    "timed out after {timeout:?} waiting for {what}; the window shows:\n{}",
                    page.as_str().unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Clicks the element `css` the way a person does (WebDriver element click).
    pub fn click(&self, css: &str) {
        let el = self
            .post("/element", &json!({"using": "css selector", "value": css}))
            .unwrap_or_else(|e| panic!("no element {css}: {e}"));
        let id = el
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("odd element reference {el}"))
            .to_string();
        self.post(&format!("/element/{id}/click"), &json!({}))
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// The window handles (main and, when open, the portal).
    pub fn windows(&self) -> Vec<String> {
        self.get("/window/handles")
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn switch_to(&self, handle: &str) {
        self.post("/window", &json!({"handle": handle}))
            .unwrap_or_else(|e| panic!("switch to window {handle}: {e}"));
    }

    pub fn url(&self) -> String {
        self.get("/url").as_str().unwrap_or_default().to_string()
    }

    /// Switches to the window whose URL satisfies `pick`, waiting up to `timeout`.
    pub fn switch_to_window_where(
        &self,
        pick: impl Fn(&str) -> bool,
        timeout: Duration,
        what: &str,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            for h in self.windows() {
                self.switch_to(&h);
                let url = self.url();
                if pick(&url) {
                    return url;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no window with {what} after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The current window as a PNG (WebDriver screenshot).
    pub fn screenshot(&self, path: &Path) {
        use base64::Engine;
        let b64 = self.get("/screenshot");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap_or_default())
            .expect("WebDriver screenshots are base64");
        std::fs::write(path, bytes).expect("write screenshot");
    }

    /// Ends the session (and so the app).
    pub fn close(self) {}
}

impl Drop for Session {
    /// Also on a failed test: the app closes, then the driver's group goes.
    fn drop(&mut self) {
        let _ = agent().delete(&self.base).call();
    }
}

/// WebDriver calls never hang a test: a stuck call fails it.
fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build()
}

fn post(url: &str, body: &Value) -> Result<Value, String> {
    match agent().post(url).send_json(body.clone()) {
        Ok(r) => r.into_json::<Value>().map_err(|e| e.to_string()),
        Err(e) => Err(describe(e)),
    }
}

fn describe(e: ureq::Error) -> String {
    match e {
        ureq::Error::Status(code, r) => {
            let mut body = String::new();
            let _ = r.into_reader().take(4096).read_to_string(&mut body);
            format!("HTTP {code}: {body}")
        }
        e => e.to_string(),
    }
}

/// Where tests put screenshots: `test-output/` at the workspace root.
pub fn output_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .join("test-output");
    std::fs::create_dir_all(&dir).expect("test-output dir");
    dir
}
