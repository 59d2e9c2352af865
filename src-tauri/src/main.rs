//! `diemcau`, the desktop app commune and district staff open to join a province meeting: a
//! thin Tauri 2 shell over `diemcau-client`. Windows, tray, commands of a few lines and typed
//! events live here; the meeting engine knows nothing of them.
//!
//! ```text
//! diemcau [--join] [--server ws://…] [--site ID] [--room ROOM]
//! ```
//! `--join` joins with the configured identity as soon as the window is up (kiosk offices
//! that must be in every meeting); the other flags override the configuration for this run.

// A console window on Windows only for debug builds.
#![cfg_attr(not(debug_assertions), windows_subsystem = "windows")]

mod call;
mod diagnostics;
mod frames;
mod portal;
mod preview;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use clap::Parser;
use serde::Serialize;
use tauri::ipc::{Channel, InvokeResponseBody};
use tauri::{AppHandle, Manager, State};
use tracing::{info, warn};

use call::Call;
use diemcau_client::settings;
use settings::{Paths, Settings};

#[derive(Debug, Parser)]
#[command(name = "diemcau", version, about = "Điểm cầu — họp trực tuyến")]
struct Cli {
    /// Join the meeting at start with the configured identity.
    #[arg(long)]
    join: bool,
    /// Server address (ws://host:port), for this run.
    #[arg(long)]
    server: Option<String>,
    /// Site id, for this run.
    #[arg(long)]
    site: Option<String>,
    /// Room, for this run.
    #[arg(long)]
    room: Option<String>,
    /// Started by the log-on entry the installers make: the app opens only when the
    /// settings say `autostart = true` (the MSI's and the .deb's AUTOSTART=1).
    #[arg(long)]
    autostart: bool,
}

/// Everything the commands share.
struct App {
    paths: Paths,
    settings: Mutex<Settings>,
    /// Command-line values, re-applied over every saved change.
    overrides: Settings,
    auto_join: bool,
    problems: Vec<String>,
    call: Arc<Call>,
    preview: Mutex<Option<preview::Preview>>,
    log: PathBuf,
}

impl App {
    fn settings(&self) -> Settings {
        self.settings.lock().expect("lock poisoned").clone()
    }
}

/// What the window needs to draw its first screen.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct AppView {
    settings: Settings,
    complete: bool,
    room: String,
    language: String,
    auto_join: bool,
    /// The installer gave this machine an enrollment secret or a token.
    enrolled: bool,
    problems: Vec<String>,
    version: &'static str,
    in_call: bool,
}

async fn view(app: &App) -> AppView {
    let s = app.settings();
    AppView {
        complete: s.complete(),
        room: s.room_or_default(),
        language: s.language_or_default().into(),
        enrolled: s.secret.is_some() || s.token.is_some(),
        settings: s.user_part(),
        auto_join: app.auto_join,
        problems: app.problems.clone(),
        version: env!("CARGO_PKG_VERSION"),
        in_call: app.call.room().await.is_some(),
    }
}

#[tauri::command]
async fn app_state(app: State<'_, App>) -> Result<AppView, String> {
    Ok(view(&app).await)
}

#[tauri::command]
async fn save_settings(app: State<'_, App>, settings: Settings) -> Result<AppView, String> {
    settings.validate()?;
    let current = app.settings();
    // The user's file keeps only what the person changed: values from the machine file or
    // from this run's command line stay theirs (a new server in the machine file, a kiosk's
    // --server, must not be frozen into the user's file by an unrelated change).
    let user_before = settings::read(&app.paths.user).unwrap_or_default();
    let user = settings::changed(&user_before, &current, &settings);
    settings::save_user(&app.paths, &user)?;
    let machine = settings::read(&app.paths.machine).unwrap_or_default();
    *app.settings.lock().expect("lock poisoned") =
        machine.overlay(&user.user_part()).overlay(&app.overrides);
    info!("settings saved to {}", app.paths.user.display());
    Ok(view(&app).await)
}

#[derive(Debug, Serialize)]
struct Device {
    id: String,
    name: String,
}

#[derive(Debug, Serialize)]
struct Devices {
    cameras: Vec<Device>,
    microphones: Vec<Device>,
    speakers: Vec<Device>,
    /// Lists that could not be read (Vietnamese).
    problems: Vec<String>,
}

#[tauri::command]
async fn list_devices() -> Result<Devices, String> {
    tauri::async_runtime::spawn_blocking(|| {
        use diemcau_media::audio_device::{list_inputs, list_outputs};
        let mut problems = Vec::new();
        let cameras = diemcau_media::camera::list_cameras()
            .map(|v| {
                v.into_iter()
                    .map(|c| Device {
                        id: c.index.to_string(),
                        name: c.name,
                    })
                    .collect()
            })
            .unwrap_or_else(|e| {
                problems.push(format!("Không liệt kê được camera: {}", e.vi()));
                Vec::new()
            });
        let mut audio = |r: Result<Vec<diemcau_media::audio_device::AudioDeviceInfo>, _>| {
            r.map(|v| {
                v.into_iter()
                    .map(|d| Device {
                        id: d.id,
                        name: d.name,
                    })
                    .collect()
            })
            .unwrap_or_else(|e: diemcau_media::SourceError| {
                problems.push(format!("Không liệt kê được thiết bị âm thanh: {}", e.vi()));
                Vec::new()
            })
        };
        let microphones = audio(list_inputs());
        let speakers = audio(list_outputs());
        Devices {
            cameras,
            microphones,
            speakers,
            problems,
        }
    })
    .await
    .map_err(|e| format!("Lỗi khi liệt kê thiết bị: {e}"))
}

#[tauri::command]
async fn start_preview(
    handle: AppHandle,
    app: State<'_, App>,
    frames: Channel<InvokeResponseBody>,
) -> Result<(), String> {
    // The call holds the camera and microphone; the preview waits for the pre-join screen.
    if app.call.room().await.is_some() {
        return Ok(());
    }
    // Stop the old one first (off the main thread: it waits for its devices to close).
    stop_preview(app.clone()).await?;
    let fresh = preview::start(handle, &app.settings(), frames);
    if let Some(old) = app.preview.lock().expect("lock poisoned").replace(fresh) {
        // Two starts raced: keep the newest.
        drop(tauri::async_runtime::spawn_blocking(move || drop(old)));
    }
    Ok(())
}

#[tauri::command]
async fn stop_preview(app: State<'_, App>) -> Result<(), String> {
    let old = app.preview.lock().expect("lock poisoned").take();
    let _ = tauri::async_runtime::spawn_blocking(move || drop(old)).await;
    Ok(())
}

#[tauri::command]
async fn join(
    handle: AppHandle,
    app: State<'_, App>,
    frames: Channel<InvokeResponseBody>,
) -> Result<(), String> {
    stop_preview(app.clone()).await?;
    let settings = app.settings();
    app.call.join(handle, &settings, frames).await
}

#[tauri::command]
async fn leave(app: State<'_, App>) -> Result<(), String> {
    app.call.leave().await;
    Ok(())
}

/// Runs `f` on the room, or says there is no meeting.
async fn with_room(app: &App, f: impl FnOnce(&diemcau_client::Room)) -> Result<(), String> {
    match app.call.room().await {
        Some(room) => {
            f(&room);
            Ok(())
        }
        None => Err("Điểm cầu chưa vào cuộc họp.".into()),
    }
}

#[tauri::command]
async fn set_mic_muted(app: State<'_, App>, muted: bool) -> Result<(), String> {
    with_room(&app, |r| r.set_mic_muted(muted)).await
}

#[tauri::command]
async fn set_camera_off(app: State<'_, App>, off: bool) -> Result<(), String> {
    with_room(&app, |r| r.set_camera_off(off)).await
}

/// Sound only both ways, for a link too thin for pictures (`on`): the server stops sending
/// the others' pictures, and the camera is set to `camera_off` (off for sound only; back to
/// what the person had chosen before when sound only ends).
#[tauri::command]
async fn set_sound_only(app: State<'_, App>, on: bool, camera_off: bool) -> Result<(), String> {
    with_room(&app, |r| {
        r.set_camera_off(camera_off);
        r.set_receive_video(!on);
    })
    .await
}

#[tauri::command]
async fn raise_hand(app: State<'_, App>) -> Result<(), String> {
    with_room(&app, |r| r.raise_hand()).await
}

#[tauri::command]
async fn lower_hand(app: State<'_, App>) -> Result<(), String> {
    with_room(&app, |r| r.lower_hand()).await
}

#[tauri::command]
async fn reply_unmute(app: State<'_, App>, accept: bool) -> Result<(), String> {
    with_room(&app, |r| {
        r.reply_unmute(accept);
        if accept {
            r.set_mic_muted(false);
        }
    })
    .await
}

/// A chair command (refused by the server unless this site joined as the chair). The
/// roll-call export is written as CSV into the Downloads folder; its path is returned.
#[tauri::command]
async fn chair(
    app: State<'_, App>,
    command: diemcau_protocol::ChairCommand,
) -> Result<Option<String>, String> {
    let room = app.call.room().await.ok_or("Điểm cầu chưa vào cuộc họp.")?;
    let export = matches!(command, diemcau_protocol::ChairCommand::RollCallExport);
    info!(command = command.name(), target = ?command.target(), "chair command");
    let answer = room.chair(command).await.map_err(|e| e.vi())?;
    if !export {
        return Ok(None);
    }
    let csv = answer.ok_or("Máy chủ không gửi danh sách điểm danh.")?;
    let dir = downloads();
    let _ = std::fs::create_dir_all(&dir);
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let path = dir.join(format!("diem-danh-{secs}.csv"));
    std::fs::write(&path, csv)
        .map_err(|e| format!("Không ghi được tệp điểm danh vào {}: {e}", dir.display()))?;
    Ok(Some(path.display().to_string()))
}

/// Where exported files go: the Downloads folder, else home, else the temp folder.
fn downloads() -> PathBuf {
    dirs::download_dir()
        .or_else(dirs::home_dir)
        .unwrap_or_else(std::env::temp_dir)
}

#[tauri::command]
async fn open_portal(handle: AppHandle, app: State<'_, App>) -> Result<(), String> {
    let s = app.settings();
    let url = s
        .portal_url
        .clone()
        .filter(|u| !u.trim().is_empty())
        .ok_or("Chưa đặt địa chỉ cổng thông tin Covid-19 trong phần Cài đặt.")?;
    let url = url::Url::parse(url.trim())
        .map_err(|_| format!("Địa chỉ cổng thông tin \"{url}\" không hợp lệ."))?;
    portal::open(
        handle,
        url,
        s.portal_origins.clone(),
        s.language_or_default().into(),
    )
    .await
}

#[tauri::command]
async fn export_diagnostics(app: State<'_, App>) -> Result<String, String> {
    let settings = app.settings();
    let last_call = app.call.last_report.lock().expect("lock poisoned").clone();
    let webkit = tauri::webview_version().unwrap_or_default();
    let bundle = diagnostics::Bundle {
        versions: vec![
            ("diemcau", env!("CARGO_PKG_VERSION").into()),
            ("tauri", tauri::VERSION.into()),
            ("webview", webkit),
            (
                "os",
                format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
            ),
        ],
        settings: &settings,
        settings_paths: &app.paths,
        last_call,
        log: &app.log,
    };
    let path = diagnostics::export(&bundle, &downloads())?;
    info!("diagnostics written to {}", path.display());
    Ok(path.display().to_string())
}

fn tray(app: &tauri::App) -> tauri::Result<()> {
    use tauri::menu::{Menu, MenuItem};
    use tauri::tray::TrayIconBuilder;
    let show = MenuItem::with_id(app, "show", "Mở Điểm cầu", true, None::<&str>)?;
    let quit_item = MenuItem::with_id(app, "quit", "Thoát", true, None::<&str>)?;
    let menu = Menu::with_items(app, &[&show, &quit_item])?;
    let mut b = TrayIconBuilder::with_id("main")
        .tooltip("Điểm cầu")
        .menu(&menu)
        .on_menu_event(|app, ev| match ev.id().as_ref() {
            "show" => show_main(app),
            "quit" => quit(app),
            _ => {}
        });
    if let Some(icon) = app.default_window_icon() {
        b = b.icon(icon.clone());
    }
    b.build(app)?;
    Ok(())
}

/// Hangs up (for at most 3 s) and quits: the window's close button and the tray's Thoát.
fn quit(app: &AppHandle) {
    let call = app.state::<App>().call.clone();
    tauri::async_runtime::block_on(async {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), call.leave()).await;
    });
    app.exit(0);
}

fn show_main(app: &AppHandle) {
    if let Some(w) = app.get_webview_window("main") {
        let _ = w.unminimize();
        let _ = w.show();
        let _ = w.set_focus();
    }
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let log = diagnostics::init_logging();
    let paths = Paths::from_env();
    let (loaded, problems) = settings::load(&paths);
    for p in &problems {
        warn!("{p}");
    }
    if cli.autostart && loaded.autostart != Some(true) {
        info!("log-on start, autostart is off in the settings: not opening");
        return;
    }
    let overrides = Settings {
        server: cli.server.clone(),
        site: cli.site.clone(),
        room: cli.room.clone(),
        ..Default::default()
    };
    let state = App {
        settings: Mutex::new(loaded.overlay(&overrides)),
        overrides,
        auto_join: cli.join,
        problems,
        paths,
        call: Arc::new(Call::default()),
        preview: Mutex::new(None),
        log,
    };
    info!(
        version = env!("CARGO_PKG_VERSION"),
        machine = %state.paths.machine.display(),
        user = %state.paths.user.display(),
        "Điểm cầu starting"
    );

    let result = tauri::Builder::default()
        // First: a second start only brings the running window forward.
        .plugin(tauri_plugin_single_instance::init(|app, _argv, _cwd| {
            show_main(app)
        }))
        .plugin(
            tauri_plugin_window_state::Builder::new()
                .with_denylist(&[portal::LABEL])
                .build(),
        )
        .manage(state)
        .setup(|app| {
            if let Err(e) = tray(app) {
                warn!("no tray icon: {e}");
            }
            Ok(())
        })
        .on_window_event(|window, event| {
            // Closing the main window hangs up and quits, portal or not.
            if window.label() == "main" {
                if let tauri::WindowEvent::CloseRequested { .. } = event {
                    let app = window.app_handle().clone();
                    let call = app.state::<App>().call.clone();
                    tauri::async_runtime::block_on(async {
                        let _ =
                            tokio::time::timeout(std::time::Duration::from_secs(3), call.leave())
                                .await;
                    });
                    app.exit(0);
                }
            }
        })
        .invoke_handler(tauri::generate_handler![
            app_state,
            save_settings,
            list_devices,
            start_preview,
            stop_preview,
            join,
            leave,
            set_mic_muted,
            set_camera_off,
            set_sound_only,
            raise_hand,
            lower_hand,
            reply_unmute,
            chair,
            open_portal,
            export_diagnostics
        ])
        .run(tauri::generate_context!());
    if let Err(e) = result {
        eprintln!("Điểm cầu không khởi động được: {e}");
        std::process::exit(1);
    }
}
