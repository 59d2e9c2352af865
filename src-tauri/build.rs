//! Declares the app's own commands so that capabilities can grant them per window: the main
//! window gets them (capabilities/main.json), the portal window gets nothing.

/// Every `#[tauri::command]` the app registers. A command missing here is refused everywhere.
const COMMANDS: &[&str] = &[
    "app_state",
    "save_settings",
    "list_devices",
    "start_preview",
    "stop_preview",
    "join",
    "leave",
    "set_mic_muted",
    "set_camera_off",
    "set_sound_only",
    "raise_hand",
    "lower_hand",
    "reply_unmute",
    "chair",
    "open_portal",
    "export_diagnostics",
];

fn main() {
    tauri_build::try_build(
        tauri_build::Attributes::new()
            .app_manifest(tauri_build::AppManifest::new().commands(COMMANDS)),
    )
    .expect("tauri-build: config, capabilities or icons are wrong");
}
