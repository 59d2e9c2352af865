//! The binaries as scripts and installers use them: `diemcau-server --dev` and
//! `diemcau-cli join ... --report json`, checked against the report contract.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use diemcau_e2e::{workspace_bin, MEDIA};
use serde_json::Value;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server() -> (Killed, String) {
    let mut child = Command::new(workspace_bin("diemcau-server"))
        .args(["--dev", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("diemcau-server starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("server prints its address");
    let url = line
        .trim()
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (Killed(child), url)
}

fn cli_join(url: &str, site: &str, duration: &str) -> Child {
    Command::new(workspace_bin("diemcau-cli"))
        .args([
            "join",
            "--server",
            url,
            "--site",
            site,
            "--room",
            "cli",
            "--video",
            "synthetic:320x180@15",
            "--audio",
            "synthetic",
            "--duration",
            duration,
            "--report",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("diemcau-cli starts")
}

fn report(child: Child) -> (Value, String) {
    let out = child.wait_with_output().expect("diemcau-cli finishes");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "diemcau-cli failed: {stderr}");
    let stdout = String::from_utf8(out.stdout).expect("utf-8 report");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "exactly one JSON object on stdout: {stdout}"
    );
    (
        serde_json::from_str(lines[0]).expect("report is JSON"),
        stderr,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_sites_report_each_other_in_the_contracted_json() {
    let _guard = MEDIA.lock().await;
    let (_server, url) = start_server();
    let a = cli_join(&url, "quynh-luu", "6");
    let b = cli_join(&url, "yen-thanh", "5");
    let ((ra, ea), (rb, _)) = tokio::task::spawn_blocking(move || (report(a), report(b)))
        .await
        .unwrap();
    for (r, me, other) in [
        (&ra, "quynh-luu", "yen-thanh"),
        (&rb, "yen-thanh", "quynh-luu"),
    ] {
        assert_eq!(r["site"], me);
        assert!(r["sent"]["video_frames"].as_u64().unwrap() > 30, "{r}");
        assert!(r["sent"]["audio_frames"].as_u64().unwrap() > 100, "{r}");
        let received = r["received"].as_array().expect("received is a list");
        let o = received
            .iter()
            .find(|x| x["site"] == other)
            .unwrap_or_else(|| panic!("{me} lists {other}: {r}"));
        for field in ["video_frames", "video_frames_verified", "audio_frames"] {
            assert!(o[field].as_u64().unwrap() > 0, "{field} in {o}");
        }
        assert!(r["latency_ms"]["p50"].as_f64().unwrap() > 0.0);
        assert!(
            r["latency_ms"]["p95"].as_f64().unwrap() >= r["latency_ms"]["p50"].as_f64().unwrap()
        );
        assert!(r["join_ms"].as_f64().unwrap() > 0.0);
        assert_eq!(r["transport"], "udp");
    }
    // Progress for people goes to stderr, in Vietnamese.
    assert!(ea.contains("Đã tham gia"), "{ea}");
}

/// `diemcau-cli join` against loopback port 9 (discard), where nothing listens.
fn join_nowhere(extra: &[&str]) -> std::process::Output {
    Command::new(workspace_bin("diemcau-cli"))
        .args(["join", "--server", "ws://127.0.0.1:9", "--site", "x"])
        .args(extra)
        .output()
        .expect("diemcau-cli runs")
}

#[test]
fn cli_refuses_unknown_sources_with_a_clear_message() {
    let out = join_nowhere(&["--video", "projector"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--video projector"));
}

#[test]
fn cli_says_in_vietnamese_when_the_server_is_unreachable() {
    let out = join_nowhere(&["--duration", "1"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Không kết nối được tới máy chủ"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn server_without_dev_refuses_to_start_unauthenticated() {
    let out = Command::new(workspace_bin("diemcau-server"))
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--dev"));
}
