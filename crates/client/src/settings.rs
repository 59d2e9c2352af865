//! Settings: a machine-wide file the installer writes, and per-user overrides.
//!
//! | what | Linux | Windows |
//! |---|---|---|
//! | machine-wide (installer) | `/etc/diemcau/config.toml` | `%ProgramData%\DiemCau\config.toml` |
//! | per user (the app) | `$XDG_CONFIG_HOME/diemcau/settings.toml` | `%APPDATA%\diemcau\settings.toml` |
//!
//! `DIEMCAU_MACHINE_CONFIG` and `DIEMCAU_USER_CONFIG` name other files (tests, portable
//! use). A user value wins over the machine's; the command line wins over both. The
//! enrollment secret and token are read from the machine file only and never written back.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Every setting; `None` means "not set here".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Signalling address, `ws://host:port` or `wss://…`.
    pub server: Option<String>,
    /// This office's site id from the province directory.
    pub site: Option<String>,
    pub room: Option<String>,
    /// `vi` (default) or `en`.
    pub language: Option<String>,
    /// The Covid-19 information portal shown in its own window.
    pub portal_url: Option<String>,
    /// Further origins the portal may navigate to (e.g. its CDN or login page).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub portal_origins: Vec<String>,
    /// Camera index (`None`: the first camera).
    pub camera: Option<u32>,
    /// Send no picture at all (an office without a camera that does not want the pattern).
    pub no_camera: Option<bool>,
    /// cpal device id of the microphone / speaker (`None`: the system default).
    pub microphone: Option<String>,
    pub speaker: Option<String>,
    /// Open the app at log-on (the installers' AUTOSTART; their log-on entry always runs
    /// `diemcau --autostart`, which looks here).
    pub autostart: Option<bool>,
    /// Enrollment secret (machine file only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Join token (machine file only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

pub const DEFAULT_ROOM: &str = "hop-tinh";

impl Settings {
    /// `self` with every field `over` sets replaced.
    pub fn overlay(mut self, over: &Settings) -> Settings {
        macro_rules! take {
            ($($f:ident),*) => {$( if over.$f.is_some() { self.$f = over.$f.clone(); } )*};
        }
        take!(
            server, site, room, language, portal_url, camera, no_camera, microphone, speaker,
            autostart
        );
        take!(secret, token);
        if !over.portal_origins.is_empty() {
            self.portal_origins = over.portal_origins.clone();
        }
        self
    }

    /// `self` without the values that are blank (an installer's unset property).
    pub fn non_empty(&self) -> Settings {
        fn keep(v: &Option<String>) -> Option<String> {
            v.as_deref()
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
        }
        Settings {
            server: keep(&self.server),
            site: keep(&self.site),
            room: keep(&self.room),
            language: keep(&self.language),
            portal_url: keep(&self.portal_url),
            microphone: keep(&self.microphone),
            speaker: keep(&self.speaker),
            secret: keep(&self.secret),
            token: keep(&self.token),
            ..self.clone()
        }
    }

    /// What a user may change (no secrets), for the per-user file.
    pub fn user_part(&self) -> Settings {
        Settings {
            secret: None,
            token: None,
            ..self.clone()
        }
    }

    /// Whether the app knows enough to join (else the first-run screen shows).
    pub fn complete(&self) -> bool {
        self.server.as_deref().is_some_and(|s| !s.trim().is_empty())
            && self.site.as_deref().is_some_and(|s| !s.trim().is_empty())
    }

    pub fn room_or_default(&self) -> String {
        self.room
            .clone()
            .filter(|r| !r.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_ROOM.into())
    }

    pub fn language_or_default(&self) -> &str {
        match self.language.as_deref() {
            Some("en") => "en",
            _ => "vi",
        }
    }

    /// A user's answer checked: a site id and server address that can work.
    pub fn validate(&self) -> Result<(), String> {
        // A quote or a control character has no place in any value, and on the installer's
        // command line a quote (or a backslash before one) would move the values around.
        for (name, v) in [
            ("server", &self.server),
            ("site", &self.site),
            ("room", &self.room),
            ("language", &self.language),
            ("portal_url", &self.portal_url),
            ("microphone", &self.microphone),
            ("speaker", &self.speaker),
            ("secret", &self.secret),
            ("token", &self.token),
        ] {
            if v.as_deref()
                .is_some_and(|v| v.chars().any(|c| c == '"' || c.is_control()))
            {
                return Err(format!(
                    "Giá trị của {name} không được chứa dấu ngoặc kép hay ký tự điều khiển."
                ));
            }
        }
        if let Some(s) = &self.server {
            let s = s.trim();
            if !(s.starts_with("ws://") || s.starts_with("wss://")) {
                return Err(format!(
                    "Địa chỉ máy chủ phải bắt đầu bằng ws:// hoặc wss:// (đang là \"{s}\")."
                ));
            }
        }
        if let Some(site) = &self.site {
            if !diemcau_protocol::directory::is_valid_site_id(site.trim()) {
                return Err(format!(
                    "Mã điểm cầu \"{site}\" không hợp lệ: chỉ dùng chữ thường không dấu, số và dấu gạch ngang."
                ));
            }
        }
        if let Some(u) = &self.portal_url {
            if !u.trim().is_empty() {
                let ok =
                    url::Url::parse(u.trim()).is_ok_and(|u| matches!(u.scheme(), "http" | "https"));
                if !ok {
                    return Err(format!("Địa chỉ cổng thông tin \"{u}\" không hợp lệ."));
                }
            }
        }
        if let Some(l) = &self.language {
            if !matches!(l.trim(), "vi" | "en" | "") {
                return Err(format!(
                    "Ngôn ngữ \"{l}\" không có: chỉ có vi (tiếng Việt) hoặc en (English)."
                ));
            }
        }
        Ok(())
    }
}

/// Where the settings live on this machine.
#[derive(Debug, Clone)]
pub struct Paths {
    pub machine: PathBuf,
    pub user: PathBuf,
}

impl Paths {
    pub fn from_env() -> Paths {
        let machine = std::env::var_os("DIEMCAU_MACHINE_CONFIG")
            .map(PathBuf::from)
            .unwrap_or_else(machine_default);
        let user = std::env::var_os("DIEMCAU_USER_CONFIG")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                dirs::config_dir()
                    .unwrap_or_else(std::env::temp_dir)
                    .join("diemcau")
                    .join("settings.toml")
            });
        Paths { machine, user }
    }
}

fn machine_default() -> PathBuf {
    if cfg!(windows) {
        std::env::var_os("ProgramData")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(r"C:\ProgramData"))
            .join("DiemCau")
            .join("config.toml")
    } else {
        PathBuf::from("/etc/diemcau/config.toml")
    }
}

/// Reads one settings file; a missing file is empty settings, a broken one an error a
/// person can act on.
pub fn read(path: &Path) -> Result<Settings, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).map_err(|e| {
            format!(
                "Tệp cấu hình {} bị lỗi, đang dùng giá trị mặc định: {}",
                path.display(),
                e.message()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Settings::default()),
        Err(e) => Err(format!(
            "Không đọc được tệp cấu hình {}: {e}",
            path.display()
        )),
    }
}

/// The user's file after a save: `before` (the user's file) with every field the person
/// changed (`after` differs from what was in effect, `current`) set to its new value.
pub fn changed(before: &Settings, current: &Settings, after: &Settings) -> Settings {
    let mut out = before.user_part();
    macro_rules! keep {
        ($($f:ident),*) => {$( if after.$f != current.$f { out.$f = after.$f.clone(); } )*};
    }
    keep!(
        server, site, room, language, portal_url, camera, no_camera, microphone, speaker, autostart
    );
    if after.portal_origins != current.portal_origins {
        out.portal_origins = after.portal_origins.clone();
    }
    out
}

/// The machine's settings with the user's on top, and any problems met on the way.
pub fn load(paths: &Paths) -> (Settings, Vec<String>) {
    let mut problems = Vec::new();
    let mut get = |p: &Path| {
        read(p).unwrap_or_else(|e| {
            problems.push(e);
            Settings::default()
        })
    };
    let machine = get(&paths.machine);
    let user = get(&paths.user).user_part();
    (machine.overlay(&user), problems)
}

/// Writes the user's part of `settings` (never secrets) atomically.
pub fn save_user(paths: &Paths, settings: &Settings) -> Result<(), String> {
    write_file(&paths.user, &settings.user_part())
}

/// The installer's step (`diemcau-cli config set`, run by the MSI and the .deb): the
/// machine file with every field `given` sets replaced and the rest kept, so that an
/// upgrade or a repair that passes no values keeps the office's settings. Empty values
/// count as "not given" (an MSI property left unset arrives as ""). Returns what is now
/// in the file.
pub fn update_machine(path: &Path, given: &Settings) -> Result<Settings, String> {
    let given = given.non_empty();
    given.validate()?;
    let now = read(path)?.overlay(&given);
    write_file(path, &now)?;
    Ok(now)
}

fn write_file(path: &Path, settings: &Settings) -> Result<(), String> {
    let text =
        toml::to_string_pretty(settings).map_err(|e| format!("Không lưu được cấu hình: {e}"))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("Không tạo được thư mục {}: {e}", dir.display()))?;
    }
    // A fresh name made here and nowhere else (create_new), so that nobody can have prepared
    // the file the installer, running as the system, then moves into place.
    let tmp = path.with_extension(format!("toml.{:016x}.tmp", rand::random::<u64>()));
    let write = || {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("Không lưu được cấu hình vào {}: {e}", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("diemcau-settings-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_user_overrides_the_machine_but_never_its_secret() {
        let d = temp("overlay");
        let paths = Paths {
            machine: d.join("machine.toml"),
            user: d.join("user").join("settings.toml"),
        };
        std::fs::write(
            &paths.machine,
            "server = \"wss://hop.nghean.gov.vn\"\nsite = \"nghi-loc-nghi-phong\"\nsecret = \"s3cret\"\nportal_url = \"https://covid.example\"\n",
        )
        .unwrap();
        let (s, problems) = load(&paths);
        assert!(problems.is_empty(), "{problems:?}");
        assert!(s.complete());
        assert_eq!(s.room_or_default(), DEFAULT_ROOM);
        let changed = Settings {
            room: Some("hop-huyen".into()),
            language: Some("en".into()),
            ..s.clone()
        };
        save_user(&paths, &changed).unwrap();
        let written = std::fs::read_to_string(&paths.user).unwrap();
        assert!(
            !written.contains("s3cret"),
            "secret leaked into the user file"
        );
        let (again, _) = load(&paths);
        assert_eq!(again.room.as_deref(), Some("hop-huyen"));
        assert_eq!(again.language_or_default(), "en");
        assert_eq!(again.secret.as_deref(), Some("s3cret"));
        assert_eq!(again.server.as_deref(), Some("wss://hop.nghean.gov.vn"));
    }

    #[test]
    fn the_installer_step_replaces_what_it_is_given_and_keeps_the_rest() {
        let d = temp("installer");
        let file = d.join("ProgramData").join("DiemCau").join("config.toml");
        let first = Settings {
            server: Some("ws://10.0.0.1:7600".into()),
            site: Some("xa-a".into()),
            secret: Some("k1".into()),
            portal_url: Some(String::new()),
            ..Default::default()
        };
        let now = update_machine(&file, &first).unwrap();
        assert_eq!(now.secret.as_deref(), Some("k1"));
        assert_eq!(now.portal_url, None, "an unset property was written");
        // An upgrade passing nothing but the room keeps the rest.
        let upgrade = Settings {
            server: Some(" ".into()),
            room: Some("hop-huyen".into()),
            ..Default::default()
        };
        update_machine(&file, &upgrade).unwrap();
        let (s, problems) = load(&Paths {
            machine: file.clone(),
            user: d.join("none.toml"),
        });
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(s.server.as_deref(), Some("ws://10.0.0.1:7600"));
        assert_eq!(s.site.as_deref(), Some("xa-a"));
        assert_eq!(s.room.as_deref(), Some("hop-huyen"));
        assert_eq!(s.secret.as_deref(), Some("k1"));
        // Bad values are refused and the file is untouched: what a secret ending in a
        // backslash becomes on the MSI's command line, a language the app does not have.
        let shifted = Settings {
            secret: Some("k\" --room hop-thu".into()),
            ..Default::default()
        };
        assert!(update_machine(&file, &shifted)
            .unwrap_err()
            .contains("ngoặc kép"));
        let bad = Settings {
            language: Some("fr".into()),
            ..Default::default()
        };
        assert!(update_machine(&file, &bad)
            .unwrap_err()
            .contains("Ngôn ngữ"));
        assert_eq!(read(&file).unwrap(), s);
    }

    #[test]
    fn a_save_keeps_only_what_the_person_changed() {
        let machine = Settings {
            server: Some("ws://10.0.0.1:7600".into()),
            site: Some("xa-a".into()),
            ..Default::default()
        };
        // This run's --server override is in effect.
        let current = Settings {
            server: Some("ws://127.0.0.1:9".into()),
            ..machine.clone()
        };
        let after = Settings {
            microphone: Some("alsa:testmic".into()),
            ..current.clone()
        };
        let user = changed(&Settings::default(), &current, &after);
        assert_eq!(user.microphone.as_deref(), Some("alsa:testmic"));
        assert_eq!(
            user.server, None,
            "the override leaked into the user's file"
        );
        assert_eq!(user.site, None, "the machine's value was copied");
        // A later change of server in the machine file still reaches this user.
        let moved = Settings {
            server: Some("wss://hop.nghean.gov.vn".into()),
            ..machine
        };
        assert_eq!(
            moved.overlay(&user).server.as_deref(),
            Some("wss://hop.nghean.gov.vn")
        );
    }

    #[test]
    fn a_broken_file_is_reported_and_the_rest_still_loads() {
        let d = temp("broken");
        let paths = Paths {
            machine: d.join("machine.toml"),
            user: d.join("settings.toml"),
        };
        std::fs::write(&paths.machine, "server = \"ws://10.0.0.1:7600\"\n").unwrap();
        std::fs::write(&paths.user, "server = [unclosed").unwrap();
        let (s, problems) = load(&paths);
        assert_eq!(s.server.as_deref(), Some("ws://10.0.0.1:7600"));
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("bị lỗi"), "{problems:?}");
        // Nothing set at all: the first-run screen.
        assert!(!Settings::default().complete());
    }

    #[test]
    fn validation_explains_bad_answers_in_vietnamese() {
        let bad_server = Settings {
            server: Some("http://x".into()),
            ..Default::default()
        };
        assert!(bad_server.validate().unwrap_err().contains("ws://"));
        let bad_site = Settings {
            site: Some("Xã Nghi Phú".into()),
            ..Default::default()
        };
        assert!(bad_site.validate().unwrap_err().contains("không hợp lệ"));
        let good = Settings {
            server: Some("ws://127.0.0.1:7600".into()),
            site: Some("xa-a".into()),
            portal_url: Some("http://127.0.0.1:8080/".into()),
            ..Default::default()
        };
        assert_eq!(good.validate(), Ok(()));
    }
}
