//! Helpers for the end-to-end tests: start a `--dev` room server in-process, join sites
//! with the real client engine, wait for events, find the workspace's binaries.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use diemcau_client::{JoinOptions, Room, RoomEvent};
use diemcau_server::{RunningServer, ServerConfig};
use tokio::sync::mpsc;

/// Media-heavy tests share two cores; they take this lock so they do not starve each other
/// (a starved encoder drops frames and the verification counts would measure the machine).
pub static MEDIA: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Logs of the in-process servers and clients on stderr when `DIEMCAU_TEST_LOG` is set (a
/// filter such as `info` or `diemcau_server=debug`), for a test that needs explaining.
pub fn test_log() {
    if let Ok(filter) = std::env::var("DIEMCAU_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// A `--dev` server on a free loopback port.
pub async fn dev_server() -> RunningServer {
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
    let mut cfg = ServerConfig::dev(addr);
    cfg.connect_timeout = Duration::from_secs(10);
    diemcau_server::start(cfg)
        .await
        .expect("dev server starts on loopback")
}

/// Joins `site` with the synthetic camera (320x180 at 15 fps, light on CPU) and tone.
pub async fn join(
    server: &RunningServer,
    site: &str,
    room: &str,
) -> (Room, mpsc::UnboundedReceiver<RoomEvent>) {
    join_with(server, site, room, None).await
}

/// [`join`] with a join token.
pub async fn join_with(
    server: &RunningServer,
    site: &str,
    room: &str,
    token: Option<String>,
) -> (Room, mpsc::UnboundedReceiver<RoomEvent>) {
    let mut opts = JoinOptions::synthetic(site, room);
    opts.token = token;
    opts.video = diemcau_client::VideoInput::Synthetic {
        width: 320,
        height: 180,
        fps: 15,
    };
    Room::connect(&server.url(), opts)
        .await
        .unwrap_or_else(|e| panic!("{site} could not join: {e}"))
}

/// Waits for the first event `pick` accepts; panics after `timeout` with `what`.
pub async fn wait_for<T>(
    events: &mut mpsc::UnboundedReceiver<RoomEvent>,
    timeout: Duration,
    what: &str,
    mut pick: impl FnMut(&RoomEvent) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(ev)) => {
                if let Some(t) = pick(&ev) {
                    return t;
                }
            }
            Ok(None) => panic!("event stream ended while waiting for {what}"),
            Err(_) => panic!("timed out after {timeout:?} waiting for {what}"),
        }
    }
}

/// Waits (10 s at most) until `events` show the spotlight on `site`.
pub async fn until_spotlight(events: &mut mpsc::UnboundedReceiver<RoomEvent>, site: &str) {
    wait_for(events, Duration::from_secs(10), "the spotlight", |e| {
        matches!(e, RoomEvent::Floor { state } if state.spotlight.as_deref() == Some(site))
            .then_some(())
    })
    .await;
}

/// Path of a binary built from this workspace (`cargo test --workspace` builds them).
pub fn workspace_bin(name: &str) -> PathBuf {
    // target/<profile>/deps/e2e-HASH (a test) or target/<profile>/diemcau-bench (a binary)
    // → target/<profile>/<name>
    let exe = std::env::current_exe().expect("test binary path");
    let mut dir = exe.parent().expect("a binary lives in a directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("deps lives in target/<profile>");
    }
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} not built; run `cargo build --workspace --bins` before the tests (scripts/test does)",
        path.display()
    );
    path
}

/// Polls the room's report until every site in `from` has at least one verified picture.
pub async fn until_verified(room: &Room, from: &[&str], timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let r = room.report().await;
        let ok = from.iter().all(|s| {
            r.received
                .iter()
                .any(|x| x.site == *s && x.video_frames_verified > 0)
        });
        if ok {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} has no verified picture from all of {from:?} after {timeout:?}: {r:?}",
            r.site
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub mod desktop;
pub mod link;
pub mod netns;

pub use desktop::Proc;

/// What a child process writes to stderr, line by line (read on a thread of its own), and
/// everything seen so far for the failure message.
pub struct StderrLines {
    rx: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl StderrLines {
    /// Takes `child`'s piped stderr.
    pub fn of(child: &mut std::process::Child) -> StderrLines {
        use std::io::BufRead;
        let (tx, rx) = std::sync::mpsc::channel();
        let err = child.stderr.take().expect("piped stderr");
        // Drains the pipe to the end even when nobody listens any more, so the child never
        // blocks on a full stderr.
        // DIEMCAU_TEST_ECHO=1 copies every line to the test's stderr (for debugging a test).
        let echo = std::env::var_os("DIEMCAU_TEST_ECHO").is_some();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                if echo {
                    eprintln!("{l}");
                }
                let _ = tx.send(l);
            }
        });
        StderrLines {
            rx,
            seen: Vec::new(),
        }
    }

    /// Waits for a line that `pick` accepts; panics after `timeout` with `what` and every
    /// line seen.
    pub fn wait(&mut self, timeout: Duration, what: &str, pick: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if pick(&l) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "timed out after {timeout:?} waiting for {what}; got:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// The last line so far (read or waiting) that `pick` accepts.
    pub fn last(&mut self, pick: impl Fn(&str) -> bool) -> Option<String> {
        self.seen.extend(self.rx.try_iter());
        self.seen.iter().rev().find(|l| pick(l)).cloned()
    }

    /// Waits up to 20 s for a line containing `needle`.
    pub fn wait_for(&mut self, needle: &str) -> String {
        self.wait(Duration::from_secs(20), &format!("{needle:?}"), |l| {
            l.contains(needle)
        })
    }
}

impl Drop for StderrLines {
    /// A test that fails shows everything the process said, not only the lines it waited
    /// for (a site whose lines nobody waited for is otherwise silent in the failure).
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.seen.extend(self.rx.try_iter());
            eprintln!("--- a child's stderr ({} lines) ---", self.seen.len());
            for l in &self.seen {
                eprintln!("{l}");
            }
        }
    }
}

/// Adds `join` and what every test site passes to `diemcau-cli`: the server, the site, the
/// room, no speaker, and how many seconds to stay.
pub fn cli_join_args<'c>(
    cmd: &'c mut std::process::Command,
    url: &str,
    site: &str,
    room: &str,
    duration: &str,
) -> &'c mut std::process::Command {
    cmd.args([
        "join",
        "--server",
        url,
        "--site",
        site,
        "--room",
        room,
        "--speaker",
        "none",
        "--duration",
        duration,
    ])
}

/// The entry for `site` in a `diemcau-cli join --report json` report's `received` list;
/// panics, showing the report, when there is none.
pub fn received_from<'a>(report: &'a serde_json::Value, site: &str) -> &'a serde_json::Value {
    report["received"]
        .as_array()
        .and_then(|r| r.iter().find(|x| x["site"] == site))
        .unwrap_or_else(|| panic!("nothing received from {site}: {report}"))
}

/// The real `diemcau-server --dev` binary on a free loopback port, and its `ws://` address.
pub fn spawn_dev_server() -> (Proc, String) {
    spawn_server(&["--dev", "--listen", "127.0.0.1:0"])
}

/// The real `diemcau-server` with `args`, and the address from its first stdout line
/// (`listening ws://…` or `wss://…`).
pub fn spawn_server<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (Proc, String) {
    let mut cmd = std::process::Command::new(workspace_bin("diemcau-server"));
    cmd.args(args);
    let (server, line) = desktop::first_line(&mut cmd, "diemcau-server");
    let url = line
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (server, url)
}

/// A raw signalling connection: what a site says and hears, without media.
pub mod raw {
    use std::time::Duration;

    use diemcau_protocol::{ClientMessage, ErrorCode, ServerMessage, PROTOCOL_VERSION};
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    type Ws = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    pub struct Raw {
        ws: Ws,
    }

    impl Raw {
        pub async fn connect(url: &str) -> Raw {
            let (ws, _) = tokio_tungstenite::connect_async(url)
                .await
                .expect("websocket connects");
            Raw { ws }
        }

        pub async fn send_text(&mut self, text: &str) {
            self.ws
                .send(Message::Text(text.to_string().into()))
                .await
                .expect("send");
        }

        pub async fn send(&mut self, msg: &ClientMessage) {
            self.send_text(&msg.encode()).await;
        }

        pub async fn send_binary(&mut self, data: Vec<u8>) {
            self.ws
                .send(Message::Binary(data.into()))
                .await
                .expect("send");
        }

        /// The next server message; `None` once the server closed the connection.
        pub async fn next(&mut self) -> Option<ServerMessage> {
            loop {
                let m = tokio::time::timeout(Duration::from_secs(5), self.ws.next())
                    .await
                    .expect("server answers within 5 s");
                match m {
                    Some(Ok(Message::Text(t))) => {
                        return Some(
                            ServerMessage::decode(&t).expect("server sends valid messages"),
                        )
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                    Some(Ok(_)) => continue,
                }
            }
        }

        /// Skips messages until `pick` accepts one; panics if the connection closes first.
        pub async fn wait<T>(
            &mut self,
            what: &str,
            mut pick: impl FnMut(&ServerMessage) -> Option<T>,
        ) -> T {
            loop {
                match self.next().await {
                    Some(m) => {
                        if let Some(t) = pick(&m) {
                            return t;
                        }
                    }
                    None => panic!("connection closed while waiting for {what}"),
                }
            }
        }

        /// The next error's code and whether it is fatal.
        pub async fn error(&mut self, what: &str) -> (ErrorCode, bool) {
            self.wait(what, |m| match m {
                ServerMessage::Error { code, fatal, .. } => Some((*code, *fatal)),
                _ => None,
            })
            .await
        }

        /// Sends `join` and returns the first answer (welcome or error).
        pub async fn join(
            &mut self,
            site: &str,
            room: &str,
            token: Option<&str>,
            control: bool,
        ) -> ServerMessage {
            self.join_as(site, room, token, control, false).await
        }

        /// [`Raw::join`] with the `resume` flag of a site coming back.
        pub async fn join_as(
            &mut self,
            site: &str,
            room: &str,
            token: Option<&str>,
            control: bool,
            resume: bool,
        ) -> ServerMessage {
            self.join_full(site, room, token, control, resume, false)
                .await
        }

        /// [`Raw::join`] as a district relay (`relay: true`).
        pub async fn join_relay(&mut self, site: &str, room: &str, token: &str) -> ServerMessage {
            self.join_full(site, room, Some(token), false, false, true)
                .await
        }

        async fn join_full(
            &mut self,
            site: &str,
            room: &str,
            token: Option<&str>,
            control: bool,
            resume: bool,
            relay: bool,
        ) -> ServerMessage {
            self.send(&ClientMessage::Join {
                v: PROTOCOL_VERSION,
                room: room.into(),
                site: site.into(),
                token: token.map(str::to_string),
                control,
                resume,
                relay,
            })
            .await;
            self.wait("welcome or error", |m| {
                matches!(
                    m,
                    ServerMessage::Welcome { .. } | ServerMessage::Error { .. }
                )
                .then(|| m.clone())
            })
            .await
        }
    }
}

/// A token signed with the public development key.
pub fn dev_token(site: &str, role: diemcau_protocol::Role, room: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    diemcau_protocol::token::Key::dev().sign(&diemcau_protocol::token::Claims {
        site: site.into(),
        role,
        room: room.into(),
        iat: now,
        exp: now + 3600,
    })
}
