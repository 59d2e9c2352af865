//! The installers as an installer uses them: the MSI built on Linux (wixl), read back
//! (msiinfo), installed silently with properties into a throw-away Wine prefix, its
//! installed `diemcau-cli.exe` joining a Linux room server from the settings the MSI wrote,
//! then a major upgrade that keeps those settings, a refused downgrade and an uninstall;
//! and the .deb installed with `dpkg -i`.
//!
//! The Windows programs are cross-built by `installers/build-msi` (scripts/test builds them
//! before the tests, so here it only packs).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use diemcau_e2e::{spawn_server, workspace_bin};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

/// A scratch directory, removed when the test ends (passed or not).
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("diemcau-install-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every file under `dir` (not following links).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => todo.push(e.path()),
                Ok(t) if t.is_file() => out.push(e.path()),
                _ => {}
            }
        }
    }
    out
}

fn run(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what} does not start: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// What `cmd` printed on stdout, after it succeeded.
fn stdout(cmd: &mut Command, what: &str) -> String {
    String::from_utf8(run(cmd, what).stdout).unwrap_or_else(|e| panic!("{what}: not UTF-8: {e}"))
}

/// Runs an installer script; its last stdout line is the package's path.
fn build(script: &str, args: &[&str]) -> PathBuf {
    let mut cmd = Command::new(repo().join("installers").join(script));
    // Without the variables cargo sets for a test (CARGO_PKG_NAME…): ring's build script
    // watches some of them, and a change would make cargo build everything again instead of
    // finding it built.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO") && k != "CARGO_HOME" && k != "CARGO_TARGET_DIR" {
            cmd.env_remove(&*k);
        }
    }
    let path = stdout(cmd.args(args).stderr(Stdio::inherit()), script);
    PathBuf::from(path.lines().last().expect("the package's path").trim())
}

fn msi_table(msi: &Path, table: &str) -> String {
    // UTF-8: the MSI's code page is 65001.
    stdout(
        Command::new("msiinfo").arg("export").arg(msi).arg(table),
        "msiinfo export",
    )
}

/// The rows of an exported table (after its three header lines), split into columns.
fn rows(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .skip(3)
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect()
}

fn row<'a>(rows: &'a [Vec<String>], key: &str) -> &'a [String] {
    rows.iter()
        .find(|r| r[0] == key)
        .unwrap_or_else(|| panic!("no row {key} in {rows:?}"))
}

/// A Wine prefix of its own (and a HOME of its own: Wine links the prefix's Desktop and
/// Documents there), with the shim Rust's std needs under Wine 8.
struct Wine {
    prefix: PathBuf,
    home: PathBuf,
}

impl Wine {
    fn new(dir: &Path) -> Wine {
        let w = Wine {
            prefix: dir.join("prefix"),
            home: dir.join("home"),
        };
        std::fs::create_dir_all(&w.home).unwrap();
        run(w.cmd("wineboot").arg("-i"), "wineboot -i");
        run(w.cmd("wineserver").arg("-w"), "wineserver -w");
        // Rust's std imports ProcessPrng from bcryptprimitives.dll (Windows 10+), which Wine 8
        // lacks: a few lines that answer it from advapi32's RtlGenRandom.
        let shim = dir.join("bcryptprimitives.c");
        std::fs::write(&shim, SHIM).unwrap();
        run(
            Command::new("x86_64-w64-mingw32-gcc")
                .args(["-shared", "-O2", "-s", "-o"])
                .arg(w.system32().join("bcryptprimitives.dll"))
                .arg(&shim)
                .arg("-ladvapi32"),
            "mingw gcc (the bcryptprimitives shim)",
        );
        w
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("WINEPREFIX", &self.prefix)
            .env("HOME", &self.home)
            .env("WINEDEBUG", "-all")
            // No menu entries or .desktop files written for the Linux desktop.
            .env("WINEDLLOVERRIDES", "winemenubuilder.exe=d")
            .env_remove("DISPLAY")
            .env_remove("WAYLAND_DISPLAY");
        c
    }

    fn wine(&self, args: &[&str]) -> Command {
        let mut c = self.cmd("wine");
        c.args(args);
        c
    }

    fn drive_c(&self) -> PathBuf {
        self.prefix.join("drive_c")
    }

    fn system32(&self) -> PathBuf {
        self.drive_c().join("windows").join("system32")
    }

    fn install_dir(&self) -> PathBuf {
        self.drive_c().join("Program Files").join("DiemCau")
    }

    fn config(&self) -> PathBuf {
        self.drive_c()
            .join("ProgramData")
            .join("DiemCau")
            .join("config.toml")
    }

    /// `msiexec` with `args`; its exit status (Wine keeps only the low 8 bits: 1603 → 67).
    fn msiexec(&self, args: &[&str]) -> std::process::ExitStatus {
        let status = self
            .wine(&["msiexec"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("wine msiexec starts");
        run(self.cmd("wineserver").arg("-w"), "wineserver -w");
        status
    }

    fn reg_query(&self, key: &str) -> String {
        let out = self
            .wine(&["reg", "query", key, "/s"])
            .output()
            .expect("wine reg starts");
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Every `.lnk` file in the prefix and its HOME.
    fn shortcuts(&self) -> Vec<PathBuf> {
        [
            self.drive_c().join("users"),
            self.drive_c().join("ProgramData"),
            self.home.clone(),
        ]
        .iter()
        .flat_map(|d| files_under(d))
        .filter(|p| p.extension().is_some_and(|x| x == "lnk"))
        .collect()
    }
}

impl Drop for Wine {
    fn drop(&mut self) {
        let _ = self.cmd("wineserver").arg("-k").status();
    }
}

const SHIM: &str = r#"#include <windows.h>
BOOLEAN WINAPI SystemFunction036(PVOID, ULONG);
__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len) {
    while (len > 0) {
        ULONG n = len > 0x10000000 ? 0x10000000 : (ULONG)len;
        if (!SystemFunction036(data, n)) return FALSE;
        data += n; len -= n;
    }
    return TRUE;
}
"#;

const WEBVIEW2_KEY: &str =
    r"HKLM\SOFTWARE\Microsoft\EdgeUpdate\Clients\{F3017226-FE2A-4295-8BDF-00C3A9A7E4C5}";

/// A directory with one commune that enrolls with a secret (the installer's SITE_KEY).
const DIRECTORY: &str = r#"
[[site]]
id = "nghe-an"
name = "UBND tỉnh Nghệ An"
level = "province"

[[site]]
id = "nam-dan"
name = "UBND huyện Nam Đàn"
parent = "nghe-an"
level = "district"

[[site]]
id = "nam-dan-kim-lien"
name = "UBND xã Kim Liên"
parent = "nam-dan"
level = "commune"
secret = "khoa-kim-lien-2021"

[[site]]
id = "con-cuong"
name = "UBND huyện Con Cuông"
parent = "nghe-an"
level = "district"
"#;

fn report(out: &Output, who: &str) -> Value {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{who} failed: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rfind(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("{who} printed no report: {stdout}\n{stderr}"));
    serde_json::from_str(line).expect("the report is JSON")
}

/// How many of `from`'s pictures `report` verified, and how many `from` sent.
fn verified(report: &Value, from: &Value) -> (u64, u64) {
    let site = from["site"].as_str().unwrap();
    let got = report["received"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["site"] == site)
        .unwrap_or_else(|| panic!("{} does not list {site}: {report}", report["site"]));
    (
        got["video_frames_verified"].as_u64().unwrap(),
        from["sent"]["video_frames"].as_u64().unwrap(),
    )
}

#[test]
fn the_msi_installs_silently_configures_joins_upgrades_and_uninstalls() {
    let dir = TempDir::new("msi");
    let out = dir.join("dist");
    let out_s = out.to_str().unwrap();
    let msi = build("build-msi", &["--version", "0.1.0", "--out", out_s]);
    let newer = build("build-msi", &["--version", "0.1.1", "--out", out_s]);
    assert_eq!(msi.file_name().unwrap(), "diemcau-0.1.0-x64.msi");
    let size = std::fs::metadata(&msi).unwrap().len();
    eprintln!("MSI size: {:.1} MB", size as f64 / 1e6);

    // The tables, read back.
    let props = rows(&msi_table(&msi, "Property"));
    let prop = |k: &str| row(&props, k)[1].clone();
    assert_eq!(prop("ProductName"), "Điểm cầu");
    assert_eq!(prop("ProductVersion"), "0.1.0");
    assert_eq!(prop("ALLUSERS"), "1", "per-machine");
    let upgrade_code = prop("UpgradeCode");
    assert_eq!(upgrade_code, "{6B0E3C57-2D1A-4E8F-9C4B-7A3D5E1F0C92}");
    assert_ne!(
        prop("ProductCode"),
        rows(&msi_table(&newer, "Property"))
            .iter()
            .find(|r| r[0] == "ProductCode")
            .unwrap()[1],
        "a major upgrade needs a new ProductCode"
    );
    assert_eq!(
        rows(&msi_table(&newer, "Property"))
            .iter()
            .find(|r| r[0] == "UpgradeCode")
            .unwrap()[1],
        upgrade_code
    );
    let secure = prop("SecureCustomProperties");
    for p in [
        "SERVER_URL",
        "SITE_ID",
        "SITE_KEY",
        "ROOM",
        "PORTAL_URL",
        "LANGUAGE",
        "AUTOSTART",
        "DESKTOP_SHORTCUT",
    ] {
        assert!(
            secure.split(';').any(|s| s == p),
            "{p} not secure: {secure}"
        );
    }
    assert_eq!(prop("MsiHiddenProperties"), "SITE_KEY");
    let files = msi_table(&msi, "File");
    for f in ["diemcau.exe", "diemcau-cli.exe", "WebView2Loader.dll"] {
        assert!(files.contains(f), "{f} missing from File: {files}");
    }
    let components = rows(&msi_table(&msi, "Component"));
    assert_eq!(
        row(&components, "DesktopShortcut")[4],
        "DESKTOP_SHORTCUT=\"1\""
    );
    // The log-on entry is always installed (it opens the app only when the settings say so),
    // so an uninstall removes it whatever AUTOSTART was.
    assert_eq!(row(&components, "Autostart")[4], "");
    let shortcuts = rows(&msi_table(&msi, "Shortcut"));
    for s in ["MenuShortcut", "DesktopShortcut"] {
        assert_eq!(row(&shortcuts, s)[2], "DIEMCAU|Điểm cầu");
    }
    let upgrade = msi_table(&msi, "Upgrade");
    assert!(upgrade.contains(&upgrade_code), "{upgrade}");
    let launch = msi_table(&msi, "LaunchCondition");
    assert!(launch.contains("WebView2"), "{launch}");
    let actions = rows(&msi_table(&msi, "CustomAction"));
    let write = row(&actions, "WriteConfig");
    assert!(write[3].starts_with("config set"), "{write:?}");
    assert_eq!(
        write[1].parse::<u32>().unwrap() & 0x2000,
        0x2000,
        "SITE_KEY on the command line must stay out of logs"
    );

    // The programs import only what Windows itself has: no MinGW runtime DLL.
    let mingw_runtime = ["libstdc++", "libgcc", "libwinpthread", "libssp"];
    let stage = msi.parent().unwrap().join("extract");
    std::fs::create_dir_all(&stage).unwrap();
    run(
        Command::new("msiextract").arg("-C").arg(&stage).arg(&msi),
        "msiextract",
    );
    for exe in ["diemcau.exe", "diemcau-cli.exe"] {
        let path = files_under(&stage)
            .into_iter()
            .find(|p| p.file_name().is_some_and(|n| n == exe))
            .unwrap_or_else(|| panic!("{exe} not in the MSI"));
        let dump = stdout(
            Command::new("x86_64-w64-mingw32-objdump")
                .arg("-p")
                .arg(&path),
            "objdump -p",
        );
        let dlls: Vec<&str> = dump
            .lines()
            .filter_map(|l| l.trim().strip_prefix("DLL Name: "))
            .collect();
        assert!(dlls.iter().any(|d| d.eq_ignore_ascii_case("kernel32.dll")));
        for d in &dlls {
            let lower = d.to_ascii_lowercase();
            assert!(
                !mingw_runtime.iter().any(|m| lower.starts_with(m)),
                "{exe} needs {d}, which Windows does not have: {dlls:?}"
            );
        }
    }

    // A throw-away Windows.
    let wine = Wine::new(&dir);
    let directory = dir.join("directory.toml");
    std::fs::write(&directory, DIRECTORY).unwrap();
    let (_server, url) = spawn_server(&[
        "--dev",
        "--listen",
        "127.0.0.1:0",
        "--directory",
        directory.to_str().unwrap(),
    ]);
    let msi_s = format!("Z:{}", msi.display()).replace('/', "\\");
    let newer_s = format!("Z:{}", newer.display()).replace('/', "\\");
    let server = format!("SERVER_URL={url}");
    let preset = [
        server.as_str(),
        "SITE_ID=nam-dan-kim-lien",
        "SITE_KEY=khoa-kim-lien-2021",
        "ROOM=hop-thu",
        "AUTOSTART=1",
    ];

    // No WebView2 runtime: the install stops before touching the machine.
    let mut args = vec!["/i", msi_s.as_str(), "/qn"];
    args.extend(preset);
    // 1603 (fatal error), of which Wine keeps the low 8 bits.
    assert_eq!(
        wine.msiexec(&args).code(),
        Some(1603 & 0xff),
        "installed without WebView2"
    );
    assert!(!wine.install_dir().join("diemcau.exe").exists());
    run(
        &mut wine.wine(&[
            "reg",
            "add",
            WEBVIEW2_KEY,
            "/v",
            "pv",
            "/t",
            "REG_SZ",
            "/d",
            "120.0.2210.91",
            "/reg:32",
            "/f",
        ]),
        "wine reg add (WebView2)",
    );

    // A value that cannot work stops the install and rolls it back.
    let bad = [
        "/i",
        msi_s.as_str(),
        "/qn",
        "SERVER_URL=http://hop.example",
        "SITE_ID=xa-a",
    ];
    assert!(
        !wine.msiexec(&bad).success(),
        "installed with SERVER_URL=http://…"
    );
    assert!(
        !wine.install_dir().join("diemcau.exe").exists(),
        "not rolled back"
    );
    assert!(!wine.config().exists());

    // Silent, preset install.
    let status = wine.msiexec(&args);
    assert!(status.success(), "msiexec /i: {status}");
    for f in ["diemcau.exe", "diemcau-cli.exe", "WebView2Loader.dll"] {
        assert!(wine.install_dir().join(f).is_file(), "{f} not installed");
    }
    let config = std::fs::read_to_string(wine.config()).expect("the MSI wrote the settings");
    for line in [
        format!("server = \"{url}\""),
        "site = \"nam-dan-kim-lien\"".into(),
        "secret = \"khoa-kim-lien-2021\"".into(),
        "room = \"hop-thu\"".into(),
        "autostart = true".into(),
    ] {
        assert!(config.contains(&line), "{line} not in {config}");
    }
    // The Start-menu shortcut, and the desktop one (DESKTOP_SHORTCUT defaults to 1).
    let links = wine.shortcuts();
    assert_eq!(links.len(), 2, "{links:?}");
    assert!(
        links
            .iter()
            .any(|l| l.ends_with("Programs/Điểm cầu/Điểm cầu.lnk")),
        "{links:?}"
    );
    assert!(
        links
            .iter()
            .any(|l| l.starts_with(&wine.home) && l.ends_with("Điểm cầu.lnk")),
        "{links:?}"
    );
    let run_key = wine.reg_query(r"HKLM\Software\Microsoft\Windows\CurrentVersion\Run");
    assert!(run_key.contains("diemcau.exe\" --autostart"), "{run_key}");

    // The installed command line runs.
    let cli = r"C:\Program Files\DiemCau\diemcau-cli.exe".to_string();
    let out = run(
        &mut wine.wine(&[&cli, "--version"]),
        "diemcau-cli.exe --version",
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "diemcau-cli 0.1.0"
    );

    // It joins the Linux server from the settings the MSI wrote (no --server, --site or
    // --secret: the enrollment secret is traded for a token) and a Linux site verifies it.
    let windows = wine
        .wine(&[
            &cli,
            "join",
            "--video",
            "synthetic:320x180@15",
            "--speaker",
            "none",
            "--duration",
            "10",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("wine diemcau-cli.exe starts");
    let linux = Command::new(workspace_bin("diemcau-cli"))
        .args([
            "join",
            "--server",
            &url,
            "--site",
            "con-cuong",
            "--room",
            "hop-thu",
        ])
        .args(["--video", "synthetic:320x180@15", "--speaker", "none"])
        .args(["--duration", "9"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("diemcau-cli starts");
    let lin = report(&linux.wait_with_output().unwrap(), "the Linux site");
    let win = report(
        &windows.wait_with_output().unwrap(),
        "diemcau-cli.exe under Wine",
    );
    assert_eq!(win["site"], "nam-dan-kim-lien");
    let (got, sent) = verified(&lin, &win);
    assert!(
        sent > 30 && got as f64 >= 0.5 * sent as f64,
        "the Linux site verified {got} of the {sent} pictures the Windows site sent"
    );
    let (got, sent) = verified(&win, &lin);
    assert!(
        sent > 30 && got as f64 >= 0.5 * sent as f64,
        "the Windows site verified {got} of the {sent} pictures the Linux site sent"
    );

    // A major upgrade passing none of the settings keeps every one (the shortcut choice is
    // not a setting: given again).
    let status = wine.msiexec(&["/i", &newer_s, "/qn", "DESKTOP_SHORTCUT=0"]);
    assert!(status.success(), "upgrade: {status}");
    assert_eq!(std::fs::read_to_string(wine.config()).unwrap(), config);
    let uninstall = wine.reg_query(r"HKLM\Software\Microsoft\Windows\CurrentVersion\Uninstall");
    assert!(uninstall.contains("0.1.1"), "{uninstall}");
    assert!(
        !uninstall.contains("0.1.0"),
        "the old version is still registered: {uninstall}"
    );
    let links = wine.shortcuts();
    assert_eq!(
        links.len(),
        1,
        "DESKTOP_SHORTCUT=0 keeps the Start menu's: {links:?}"
    );
    assert!(!links[0].starts_with(&wine.home), "{links:?}");
    // Going back is refused.
    assert!(!wine.msiexec(&["/i", &msi_s, "/qn"]).success());

    // Uninstall: the program, its shortcut and log-on entry go; the office's settings stay
    // for a reinstall (docs/deployment.md says how to remove them too).
    let status = wine.msiexec(&["/x", &newer_s, "/qn"]);
    assert!(status.success(), "msiexec /x: {status}");
    assert!(!wine.install_dir().join("diemcau.exe").exists());
    assert!(wine.shortcuts().is_empty(), "{:?}", wine.shortcuts());
    let run_key = wine.reg_query(r"HKLM\Software\Microsoft\Windows\CurrentVersion\Run");
    assert!(!run_key.contains("diemcau.exe"), "{run_key}");
    assert!(wine.config().is_file());
}

/// dpkg -i into this machine (root), preset from the environment like the MSI's
/// properties, then purge. An /etc/diemcau already here is put back after.
#[test]
fn the_deb_installs_presets_and_purges() {
    assert!(
        Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout == b"0\n"),
        "dpkg -i needs root"
    );
    let dir = TempDir::new("deb");
    let deb = build(
        "build-deb",
        &["--profile", "dev", "--out", dir.to_str().unwrap()],
    );
    assert_eq!(deb.file_name().unwrap(), "diemcau_0.1.0_amd64.deb");
    let info = stdout(
        Command::new("dpkg-deb").arg("--info").arg(&deb),
        "dpkg-deb --info",
    );
    assert!(info.contains("Package: diemcau"), "{info}");
    assert!(info.contains("libwebkit2gtk-4.1-0"), "{info}");
    let contents = stdout(
        Command::new("dpkg-deb").arg("--contents").arg(&deb),
        "dpkg-deb --contents",
    );
    for f in [
        "./usr/bin/diemcau",
        "./usr/bin/diemcau-cli",
        "./usr/share/applications/diemcau.desktop",
        "./usr/share/icons/hicolor/128x128/apps/diemcau.png",
    ] {
        assert!(contents.contains(f), "{f} not in the package: {contents}");
    }

    // This machine's own diemcau, if any, is not ours to replace.
    assert!(
        !Command::new("dpkg")
            .args(["-s", "diemcau"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success(),
        "a diemcau package is installed on this machine; the test would replace it"
    );
    let saved = dir.join("etc-diemcau");
    let had_config = Path::new("/etc/diemcau").exists();
    if had_config {
        run(
            Command::new("cp").args(["-a", "/etc/diemcau"]).arg(&saved),
            "saving /etc/diemcau",
        );
    }
    let _restore = Restore(had_config.then(|| saved.clone()));

    run(
        Command::new("dpkg")
            .arg("-i")
            .arg(&deb)
            .env("DIEMCAU_SERVER_URL", "wss://hop.nghean.gov.vn")
            .env("DIEMCAU_SITE_ID", "nam-dan-kim-lien")
            .env("DIEMCAU_SITE_KEY", "khoa-kim-lien-2021")
            .env("DIEMCAU_AUTOSTART", "1"),
        "dpkg -i",
    );
    let out = run(
        Command::new("/usr/bin/diemcau-cli").arg("--version"),
        "diemcau-cli --version",
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "diemcau-cli 0.1.0"
    );
    let config = std::fs::read_to_string("/etc/diemcau/config.toml").unwrap();
    assert!(
        config.contains("server = \"wss://hop.nghean.gov.vn\""),
        "{config}"
    );
    assert!(
        config.contains("secret = \"khoa-kim-lien-2021\""),
        "{config}"
    );
    assert!(config.contains("autostart = true"), "{config}");
    assert!(Path::new("/etc/xdg/autostart/diemcau.desktop").is_file());
    // The installed app starts far enough to answer --help (its libraries resolve).
    run(
        Command::new("/usr/bin/diemcau").arg("--help"),
        "diemcau --help",
    );
    // A reinstall passing only a room changes the room and keeps the rest.
    run(
        Command::new("dpkg")
            .arg("-i")
            .arg(&deb)
            .env("DIEMCAU_ROOM", "hop-huyen"),
        "dpkg -i again",
    );
    let again = std::fs::read_to_string("/etc/diemcau/config.toml").unwrap();
    assert!(again.contains("room = \"hop-huyen\"\n"), "{again}");
    assert_eq!(again.replace("room = \"hop-huyen\"\n", ""), config);
    run(
        Command::new("dpkg").args(["--purge", "diemcau"]),
        "dpkg --purge",
    );
    assert!(!Path::new("/usr/bin/diemcau-cli").exists());
    assert!(!Path::new("/etc/xdg/autostart/diemcau.desktop").exists());
    assert!(
        !Path::new("/etc/diemcau").exists(),
        "purge keeps /etc/diemcau"
    );
}

/// Purges the test's package and puts a saved /etc/diemcau back, however the test ends.
struct Restore(Option<PathBuf>);

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = Command::new("dpkg")
            .args(["--purge", "diemcau"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(saved) = &self.0 {
            let _ = std::fs::remove_dir_all("/etc/diemcau");
            let _ = Command::new("cp")
                .args(["-a"])
                .arg(saved)
                .arg("/etc/diemcau")
                .status();
        }
    }
}
