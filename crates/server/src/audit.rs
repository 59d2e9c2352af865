//! The audit log: every privileged action and every refusal, one JSON object per line,
//! appended and flushed as it happens, so it survives a crash or restart.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::warn;

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Milliseconds since the Unix epoch.
    pub ts_ms: u64,
    pub room: String,
    /// The site that acted (as it claimed, for refusals).
    pub actor: String,
    /// The actor's role, when known.
    pub role: Option<String>,
    /// Remote address of the connection.
    pub from: String,
    /// `join`, `enroll`, or a chair command name.
    pub action: String,
    pub target: Option<String>,
    /// `ok` or `refused`.
    pub outcome: String,
    pub reason: Option<String>,
}

/// Where audit entries go. Without a file they only reach the log output.
#[derive(Debug)]
pub struct AuditLog {
    path: Option<PathBuf>,
    file: Option<File>,
}

impl AuditLog {
    pub fn disabled() -> Self {
        AuditLog {
            path: None,
            file: None,
        }
    }

    /// Opens (creating if needed) an append-only log file.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(AuditLog {
            path: Some(path.to_path_buf()),
            file: Some(file),
        })
    }

    pub fn record(&mut self, entry: &AuditEntry) {
        tracing::info!(
            target: "audit",
            room = %entry.room, actor = %entry.actor, action = %entry.action,
            target_site = ?entry.target, outcome = %entry.outcome, reason = ?entry.reason,
            "audit"
        );
        let Some(f) = self.file.as_mut() else {
            return;
        };
        let line = serde_json::to_string(entry).expect("audit entries serialise");
        // Written through to the OS at once (survives a server restart or crash); not
        // fsync'd, which would stall the media engine on every entry.
        if let Err(e) = writeln!(f, "{line}").and_then(|_| f.flush()) {
            warn!(path = ?self.path, "audit log write failed: {e}");
        }
    }
}

/// Reads an audit log back; lines that do not parse are skipped (a torn last line after a
/// power cut, say).
pub fn read(path: &Path) -> std::io::Result<Vec<AuditEntry>> {
    let f = File::open(path)?;
    Ok(BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(action: &str) -> AuditEntry {
        AuditEntry {
            ts_ms: 1,
            room: "r".into(),
            actor: "xa".into(),
            role: Some("commune".into()),
            from: "127.0.0.1:5".into(),
            action: action.into(),
            target: None,
            outcome: "refused".into(),
            reason: Some("forbidden".into()),
        }
    }

    #[test]
    fn entries_append_across_reopen_and_torn_lines_are_skipped() {
        let dir = std::env::temp_dir().join(format!("diemcau-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("audit.jsonl");
        let _ = std::fs::remove_file(&p);
        AuditLog::open(&p).unwrap().record(&entry("grant"));
        {
            let mut f = OpenOptions::new().append(true).open(&p).unwrap();
            write!(f, "{{\"ts_ms\": 2, \"room\"").unwrap(); // torn write
            writeln!(f).unwrap();
        }
        AuditLog::open(&p).unwrap().record(&entry("mute"));
        let back = read(&p).unwrap();
        assert_eq!(back, vec![entry("grant"), entry("mute")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
