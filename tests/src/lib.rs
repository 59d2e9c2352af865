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
    let mut opts = JoinOptions::synthetic(site, room);
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

/// Path of a binary built from this workspace (`cargo test --workspace` builds them).
pub fn workspace_bin(name: &str) -> PathBuf {
    // target/<profile>/deps/e2e-HASH → target/<profile>/<name>
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("test binary lives in target/<profile>/deps");
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} not built; run the tests with `cargo test --workspace`",
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
