//! Wire types of meeting control: hands, floor, chair commands, roll-call.

use serde::{Deserialize, Serialize};

use crate::SiteId;

/// Who may speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FloorMode {
    /// Everyone may speak (unless muted).
    #[default]
    Open,
    /// Only the chair and the one site the chair gave the floor to; others raise a hand.
    ChairOnly,
    /// The chair and every site the chair granted the microphone to.
    Granted,
}

impl FloorMode {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "open" => Some(FloorMode::Open),
            "chair-only" | "chair_only" => Some(FloorMode::ChairOnly),
            "granted" => Some(FloorMode::Granted),
            _ => None,
        }
    }
}

/// The floor as one site sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FloorState {
    pub mode: FloorMode,
    /// Sites the chair gave the floor (microphone) to.
    pub granted: Vec<SiteId>,
    /// Sites the chair muted; the server drops their audio.
    pub muted: Vec<SiteId>,
    pub spotlight: Option<SiteId>,
    pub locked: bool,
    /// Whether the server forwards the recipient's own audio now.
    pub you_may_speak: bool,
}

/// A room's whole meeting state, as a parent room sends it to a relay (which shows each of
/// its sites its own view of it). The roll-call stays with the parent.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MeetingSnapshot {
    /// Raised hands in queue order: site and when it went up (ms since the Unix epoch).
    pub hands: Vec<(SiteId, u64)>,
    pub mode: FloorMode,
    pub granted: Vec<SiteId>,
    pub muted: Vec<SiteId>,
    pub asked_unmute: Vec<SiteId>,
    pub spotlight: Option<SiteId>,
    pub locked: bool,
}

/// One raised hand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hand {
    pub site: SiteId,
    pub name: String,
    /// Ancestors in the administrative tree, root first.
    pub path: Vec<SiteId>,
    /// 1-based place in the whole queue (by the time the hand went up).
    pub place: u32,
    /// When the hand went up, ms since the Unix epoch.
    pub raised_at_ms: u64,
}

/// A command only the chair may give.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum ChairCommand {
    FloorMode {
        mode: FloorMode,
    },
    Grant {
        site: SiteId,
    },
    Revoke {
        site: SiteId,
    },
    Mute {
        site: SiteId,
    },
    MuteAll,
    AskUnmute {
        site: SiteId,
    },
    Remove {
        site: SiteId,
    },
    /// `None` clears the spotlight.
    Spotlight {
        site: Option<SiteId>,
    },
    Lock {
        locked: bool,
    },
    LowerHand {
        site: SiteId,
    },
    LowerAll,
    /// Starts (or restarts) a roll-call: every mark is cleared.
    RollCallStart,
    /// Marks a site present, or absent with an optional reason.
    RollCallMark {
        site: SiteId,
        present: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Asks for the roll-call as CSV (answered with `roll_call_csv`).
    RollCallExport,
    /// On a district relay: join the district's meeting to the parent (province) room
    /// (`on`), or take it out and run it alone. Refused on a server without `--upstream`.
    Upstream {
        on: bool,
    },
}

impl ChairCommand {
    /// The command's name as in the audit log and the CLI.
    pub fn name(&self) -> &'static str {
        match self {
            ChairCommand::FloorMode { .. } => "floor-mode",
            ChairCommand::Grant { .. } => "grant",
            ChairCommand::Revoke { .. } => "revoke",
            ChairCommand::Mute { .. } => "mute",
            ChairCommand::MuteAll => "mute-all",
            ChairCommand::AskUnmute { .. } => "ask-unmute",
            ChairCommand::Remove { .. } => "remove",
            ChairCommand::Spotlight { .. } => "spotlight",
            ChairCommand::Lock { .. } => "lock",
            ChairCommand::LowerHand { .. } => "lower-hand",
            ChairCommand::LowerAll => "lower-all",
            ChairCommand::RollCallStart => "roll-call-start",
            ChairCommand::RollCallMark { .. } => "roll-call-mark",
            ChairCommand::RollCallExport => "roll-call-export",
            ChairCommand::Upstream { .. } => "upstream",
        }
    }

    /// The site the command acts on, if any.
    pub fn target(&self) -> Option<&str> {
        match self {
            ChairCommand::Grant { site }
            | ChairCommand::Revoke { site }
            | ChairCommand::Mute { site }
            | ChairCommand::AskUnmute { site }
            | ChairCommand::Remove { site }
            | ChairCommand::LowerHand { site }
            | ChairCommand::RollCallMark { site, .. } => Some(site),
            ChairCommand::Spotlight { site } => site.as_deref(),
            _ => None,
        }
    }
}

/// A site's line in the roll-call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RollStatus {
    Present,
    Absent,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollEntry {
    pub site: SiteId,
    pub name: String,
    pub path: Vec<SiteId>,
    pub status: RollStatus,
    /// Whether the site is connected right now.
    pub connected: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// RFC 4180 CSV of a roll-call: `site,name,path,status,connected,reason`.
pub fn roll_call_csv(entries: &[RollEntry]) -> String {
    fn field(s: &str) -> String {
        if s.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    }
    let mut out = String::from("site,name,path,status,connected,reason\r\n");
    for e in entries {
        let status = match e.status {
            RollStatus::Present => "present",
            RollStatus::Absent => "absent",
        };
        out.push_str(&format!(
            "{},{},{},{},{},{}\r\n",
            field(&e.site),
            field(&e.name),
            field(&e.path.join("/")),
            status,
            e.connected,
            field(e.reason.as_deref().unwrap_or(""))
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chair_command_wire_form() {
        let c = ChairCommand::Grant {
            site: "tp-vinh".into(),
        };
        let j = serde_json::to_string(&c).unwrap();
        assert_eq!(j, r#"{"action":"grant","site":"tp-vinh"}"#);
        assert_eq!(serde_json::from_str::<ChairCommand>(&j).unwrap(), c);
        assert_eq!(c.name(), "grant");
        assert_eq!(c.target(), Some("tp-vinh"));
        let m: ChairCommand =
            serde_json::from_str(r#"{"action":"floor_mode","mode":"chair_only"}"#).unwrap();
        assert_eq!(
            m,
            ChairCommand::FloorMode {
                mode: FloorMode::ChairOnly
            }
        );
    }

    #[test]
    fn csv_quotes_what_needs_quoting() {
        let e = RollEntry {
            site: "x".into(),
            name: "UBND xã \"A\", huyện B".into(),
            path: vec!["p".into(), "d".into()],
            status: RollStatus::Absent,
            connected: false,
            reason: Some("mất điện".into()),
        };
        let csv = roll_call_csv(&[e]);
        assert_eq!(
            csv,
            "site,name,path,status,connected,reason\r\nx,\"UBND xã \"\"A\"\", huyện B\",p/d,absent,false,mất điện\r\n"
        );
    }
}
