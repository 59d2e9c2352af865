//! Logging to a file, and "export diagnostics": logs, versions, settings (without secrets)
//! and the last call's statistics in one text file a person can send to the province's IT
//! staff.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;

/// Where the log goes: `$XDG_DATA_HOME/diemcau/logs/diemcau.log` on Linux,
/// `%LOCALAPPDATA%\diemcau\logs\diemcau.log` on Windows.
pub fn log_path() -> PathBuf {
    dirs::data_local_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("diemcau")
        .join("logs")
        .join("diemcau.log")
}

/// Past this size the log moves to `diemcau.log.1` (replacing the older one) at start.
const ROTATE_BYTES: u64 = 5 << 20;

/// Starts logging to the file (appending; a second start that hands over to the running
/// app must not take its log away) and to stderr.
pub fn init_logging() -> PathBuf {
    let path = log_path();
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if std::fs::metadata(&path).is_ok_and(|m| m.len() > ROTATE_BYTES) {
        let _ = std::fs::rename(&path, path.with_extension("log.1"));
    }
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,webrtc=warn,rtc=warn,webrtc_ice=warn,tao=warn,wry=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    {
        Ok(file) => {
            let _ = builder.with_writer(Tee(Mutex::new(file))).try_init();
        }
        Err(_) => {
            let _ = builder.with_writer(std::io::stderr).try_init();
        }
    }
    path
}

/// Writes every log line to the file and to stderr.
struct Tee(Mutex<std::fs::File>);

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Tee {
    type Writer = TeeWriter<'a>;
    fn make_writer(&'a self) -> Self::Writer {
        TeeWriter(&self.0)
    }
}

struct TeeWriter<'a>(&'a Mutex<std::fs::File>);

impl Write for TeeWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("log lock poisoned"))?
            .write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The last `n` lines of a text file (empty if it cannot be read).
pub fn tail(path: &Path, n: usize) -> Vec<String> {
    let Ok(f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let mut lines: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    for line in std::io::BufReader::new(f).lines().map_while(Result::ok) {
        if lines.len() == n {
            lines.pop_front();
        }
        lines.push_back(line);
    }
    lines.into()
}

/// Everything in one report.
pub struct Bundle<'a> {
    pub versions: Vec<(&'static str, String)>,
    pub settings: &'a crate::settings::Settings,
    pub settings_paths: &'a crate::settings::Paths,
    pub last_call: Option<serde_json::Value>,
    pub log: &'a Path,
}

pub fn render(b: &Bundle<'_>) -> String {
    let mut out = String::new();
    out.push_str("# Điểm cầu — thông tin chẩn đoán (diagnostics)\n\n## Phiên bản\n");
    for (k, v) in &b.versions {
        out.push_str(&format!("{k}: {v}\n"));
    }
    out.push_str(&format!(
        "\n## Cấu hình (máy: {}, người dùng: {})\n",
        b.settings_paths.machine.display(),
        b.settings_paths.user.display()
    ));
    let mut shown = b.settings.clone();
    if shown.secret.is_some() {
        shown.secret = Some("(đã ẩn)".into());
    }
    if shown.token.is_some() {
        shown.token = Some("(đã ẩn)".into());
    }
    out.push_str(&toml::to_string_pretty(&shown).unwrap_or_default());
    out.push_str("\n## Cuộc họp gần nhất\n");
    match &b.last_call {
        Some(v) => out.push_str(&serde_json::to_string_pretty(v).unwrap_or_default()),
        None => out.push_str("(chưa có)"),
    }
    out.push_str(&format!("\n\n## Nhật ký ({})\n", b.log.display()));
    for l in tail(b.log, 2000) {
        out.push_str(&l);
        out.push('\n');
    }
    out
}

/// Writes the bundle into `dir` and returns the file's path.
pub fn export(b: &Bundle<'_>, dir: &Path) -> Result<PathBuf, String> {
    let _ = std::fs::create_dir_all(dir);
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let path = dir.join(format!("diemcau-chan-doan-{secs}.txt"));
    std::fs::write(&path, render(b))
        .map_err(|e| format!("Không ghi được tệp chẩn đoán vào {}: {e}", dir.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::{Paths, Settings};

    #[test]
    fn the_bundle_has_versions_settings_call_and_log_but_no_secret() {
        let dir = std::env::temp_dir().join(format!("diemcau-diag-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("diemcau.log");
        let lines: Vec<String> = (0..2500).map(|i| format!("dòng {i}")).collect();
        std::fs::write(&log, lines.join("\n")).unwrap();
        let settings = Settings {
            site: Some("xa-a".into()),
            secret: Some("khong-duoc-lo".into()),
            ..Default::default()
        };
        let paths = Paths {
            machine: dir.join("m.toml"),
            user: dir.join("u.toml"),
        };
        let b = Bundle {
            versions: vec![("diemcau", "0.1.0".into())],
            settings: &settings,
            settings_paths: &paths,
            last_call: Some(serde_json::json!({"site": "xa-a", "join_ms": 450.0})),
            log: &log,
        };
        let path = export(&b, &dir).unwrap();
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.contains("diemcau: 0.1.0"));
        assert!(text.contains("site = \"xa-a\""));
        assert!(text.contains("\"join_ms\": 450.0"));
        assert!(text.contains("dòng 2499") && !text.contains("dòng 499\n"));
        assert!(!text.contains("khong-duoc-lo"), "the secret leaked");
    }
}
