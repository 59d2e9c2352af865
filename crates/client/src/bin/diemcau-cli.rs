//! `diemcau-cli`: the headless Điểm cầu site, for kiosks, installers' scripts and tests.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use diemcau_client::control::ControlSession;
use diemcau_client::{AudioInput, JoinOptions, Room, RoomEvent, SpeakerOutput, VideoInput};
use diemcau_protocol::{ChairCommand, FloorMode};

#[derive(Debug, Parser)]
#[command(name = "diemcau-cli", version, about = "Điểm cầu headless site")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Join a room, publish, receive and verify, then print a report.
    Join(JoinArgs),
    /// List cameras, microphones and speakers.
    Devices {
        /// One JSON object: {"cameras":[...],"audio_inputs":[{"id","name"}],"audio_outputs":[...]}
        #[arg(long)]
        json: bool,
    },
    /// Give a chair command (needs a chair token). Exits non-zero with the server's reason
    /// when refused. ACTION: floor-mode MODE | grant SITE | revoke SITE | mute SITE |
    /// mute-all | ask-unmute SITE | remove SITE | spotlight [SITE] | lock [on|off] |
    /// lower-hand SITE | lower-all | roll-call start | roll-call mark SITE present|absent |
    /// roll-call export | upstream on|off (a district relay: join the district's meeting to
    /// the province's, or take it out)
    Chair(ChairArgs),
    /// The machine-wide settings the desktop app and `join` start from
    /// (`/etc/diemcau/config.toml`, `%ProgramData%\DiemCau\config.toml`).
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Write the given values and keep the others (what the MSI and the .deb run). An
    /// empty value leaves that setting as it is.
    Set {
        #[command(flatten)]
        values: ConfigValues,
        /// Another file than the machine-wide one.
        #[arg(long)]
        file: Option<std::path::PathBuf>,
    },
    /// Print the machine-wide settings (the enrollment secret masked).
    Show {
        #[arg(long)]
        file: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
struct ConfigValues {
    /// Server address, ws://… or wss://… (SERVER_URL).
    #[arg(long)]
    server: Option<String>,
    /// This office's site id (SITE_ID).
    #[arg(long)]
    site: Option<String>,
    /// Enrollment secret (SITE_KEY).
    #[arg(long)]
    secret: Option<String>,
    /// Room (ROOM).
    #[arg(long)]
    room: Option<String>,
    /// The Covid-19 information portal (PORTAL_URL).
    #[arg(long)]
    portal_url: Option<String>,
    /// vi or en (LANGUAGE).
    #[arg(long)]
    language: Option<String>,
    /// 1: open the app at log-on, 0: do not (AUTOSTART).
    #[arg(long)]
    autostart: Option<String>,
}

#[derive(Debug, clap::Args)]
struct ChairArgs {
    /// The action and its arguments.
    #[arg(required = true, num_args = 1..)]
    action: Vec<String>,
    #[arg(long)]
    server: String,
    /// A chair token (from `diemcau-server token issue`).
    #[arg(long)]
    token: String,
    /// Room (default: the token's room, or hop-tinh for a token valid in any room).
    #[arg(long)]
    room: Option<String>,
    /// Reason for `roll-call mark SITE absent`.
    #[arg(long)]
    reason: Option<String>,
}

#[derive(Debug, clap::Args)]
struct JoinArgs {
    /// Server address, e.g. ws://127.0.0.1:7600 (default: the machine-wide settings).
    #[arg(long)]
    server: Option<String>,
    /// This site's id in the directory (default: the machine-wide settings).
    #[arg(long)]
    site: Option<String>,
    /// Join token (not needed by a --dev server).
    #[arg(long)]
    token: Option<String>,
    /// Room name (default: the machine-wide settings, else hop-tinh).
    #[arg(long)]
    room: Option<String>,
    /// Picture source: synthetic[:WxH[@FPS]] | camera[:N] | none
    #[arg(long, default_value = "synthetic")]
    video: String,
    /// Sound source: synthetic | mic[:ID] | none (ids from `diemcau-cli devices`)
    #[arg(long, default_value = "synthetic")]
    audio: String,
    /// Where remote sound plays: default | ID | none | null (played out at a speaker's pace
    /// into nothing, for the report's audio_playout). Given twice, the last one counts.
    #[arg(long, default_value = "default", overrides_with = "speaker")]
    speaker: String,
    /// Seconds to stay in the room.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Report format on stdout when leaving: json | none
    #[arg(long, default_value = "json", value_parser = ["json", "none"])]
    report: String,
    /// Upper bound for the video bitrate (kbit/s), all layers together.
    #[arg(long, default_value_t = 1500)]
    max_video_kbps: u32,
    /// At most this many picture layers (simulcast: 320x180, 640x360, 1280x720 of a 720p
    /// camera; a smaller camera is sent in fewer). 1 sends one stream whose size follows the
    /// uplink.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=3))]
    layers: u8,
    /// Offer only TCP candidates (as if UDP were blocked).
    #[arg(long)]
    tcp_only: bool,
    /// Sound only, both ways (for a link too thin for pictures): no picture is sent
    /// (overrides --video) and none is received.
    #[arg(long)]
    audio_only: bool,
    /// Enrollment secret (SITE_KEY from the installer), traded for a token when no
    /// --token is given.
    #[arg(long)]
    secret: Option<String>,
    /// Raise the hand this many seconds after joining.
    #[arg(long)]
    raise_hand_after: Option<f64>,
    /// Say yes when the chair asks this site to unmute.
    #[arg(long)]
    accept_unmute: bool,
    /// Seconds between progress lines ("đã gửi … nhận …").
    #[arg(long, default_value_t = 5.0, value_parser = parse_progress_every)]
    progress_every: f64,
}

fn parse_progress_every(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.2..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?}: give seconds between 0.2 and 3600")),
    }
}

/// Resolves on Ctrl-C, or SIGTERM on Unix.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn devices(json: bool) -> ExitCode {
    use diemcau_media::audio_device::{list_inputs, list_outputs};
    let inputs = list_inputs().unwrap_or_else(|e| {
        eprintln!("{}", e.vi());
        Vec::new()
    });
    let outputs = list_outputs().unwrap_or_else(|e| {
        eprintln!("{}", e.vi());
        Vec::new()
    });
    let as_json = |v: &[diemcau_media::audio_device::AudioDeviceInfo]| {
        v.iter()
            .map(|d| serde_json::json!({"id": d.id, "name": d.name}))
            .collect::<Vec<_>>()
    };
    let cameras = diemcau_media::camera::list_cameras().unwrap_or_else(|e| {
        eprintln!("{}", e.vi());
        Vec::new()
    });
    if json {
        let cams: Vec<_> = cameras
            .iter()
            .map(|c| {
                serde_json::json!({
                    "id": format!("camera:{}", c.index),
                    "index": c.index,
                    "name": c.name,
                    "formats": c.modes.iter().map(|m| serde_json::json!({
                        "width": m.width, "height": m.height, "fps": m.fps, "format": m.format.name()
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let out = serde_json::json!({
            "cameras": cams,
            "audio_inputs": as_json(&inputs),
            "audio_outputs": as_json(&outputs),
        });
        println!("{out}");
    } else {
        println!("Camera (--video camera:N):");
        if cameras.is_empty() {
            println!("  (không tìm thấy camera nào / no camera found)");
        }
        for c in &cameras {
            println!("  camera:{}\t{}\t{} chế độ", c.index, c.name, c.modes.len());
        }
        println!("Micro (--audio mic:ID):");
        for d in &inputs {
            println!("  {}\t{}", d.id, d.name);
        }
        println!("Loa (--speaker ID):");
        for d in &outputs {
            println!("  {}\t{}", d.id, d.name);
        }
    }
    ExitCode::SUCCESS
}

fn parse_chair(a: &ChairArgs) -> Result<ChairCommand, String> {
    let words: Vec<&str> = a.action.iter().map(String::as_str).collect();
    let site = |w: Option<&&str>| {
        w.map(|s| s.to_string())
            .ok_or_else(|| format!("{}: which site?", words.join(" ")))
    };
    Ok(match words.as_slice() {
        ["floor-mode", mode] => ChairCommand::FloorMode {
            mode: FloorMode::parse(mode)
                .ok_or_else(|| format!("floor mode {mode:?}: open, chair-only or granted"))?,
        },
        ["grant", rest @ ..] => ChairCommand::Grant {
            site: site(rest.first())?,
        },
        ["revoke", rest @ ..] => ChairCommand::Revoke {
            site: site(rest.first())?,
        },
        ["mute", rest @ ..] => ChairCommand::Mute {
            site: site(rest.first())?,
        },
        ["mute-all"] => ChairCommand::MuteAll,
        ["ask-unmute", rest @ ..] => ChairCommand::AskUnmute {
            site: site(rest.first())?,
        },
        ["remove", rest @ ..] => ChairCommand::Remove {
            site: site(rest.first())?,
        },
        ["spotlight"] | ["spotlight", "none"] => ChairCommand::Spotlight { site: None },
        ["spotlight", s] => ChairCommand::Spotlight {
            site: Some(s.to_string()),
        },
        ["lock"] | ["lock", "on"] => ChairCommand::Lock { locked: true },
        ["lock", "off"] | ["unlock"] => ChairCommand::Lock { locked: false },
        ["lower-hand", rest @ ..] => ChairCommand::LowerHand {
            site: site(rest.first())?,
        },
        ["lower-all"] => ChairCommand::LowerAll,
        ["roll-call"] | ["roll-call", "start"] => ChairCommand::RollCallStart,
        ["roll-call", "export"] => ChairCommand::RollCallExport,
        ["upstream", "on"] => ChairCommand::Upstream { on: true },
        ["upstream", "off"] => ChairCommand::Upstream { on: false },
        ["roll-call", "mark", s, status] => ChairCommand::RollCallMark {
            site: s.to_string(),
            present: match *status {
                "present" => true,
                "absent" => false,
                other => return Err(format!("{other:?}: present or absent")),
            },
            reason: a.reason.clone(),
        },
        _ => return Err(format!("unknown chair action {:?}", words.join(" "))),
    })
}

async fn chair(args: ChairArgs) -> ExitCode {
    let command = match parse_chair(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let Some(claims) = diemcau_protocol::token::peek(&args.token) else {
        eprintln!("--token is not a join token (dc1.…)");
        return ExitCode::from(2);
    };
    let room = args.room.clone().unwrap_or_else(|| {
        if claims.room == "*" {
            "hop-tinh".into()
        } else {
            claims.room.clone()
        }
    });
    let mut session =
        match ControlSession::connect(&args.server, &claims.site, &room, &args.token).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{}", e.vi());
                eprintln!("detail: {e}");
                return ExitCode::from(1);
            }
        };
    let name = command.name();
    let result = session.command(command).await;
    session.leave();
    match result {
        Ok(csv) => {
            if let Some(csv) = csv {
                print!("{csv}");
            }
            eprintln!("{name}: xong (done)");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{name}: {}", e.vi());
            eprintln!("detail: {e}");
            ExitCode::from(4)
        }
    }
}

fn parse_video(s: &str) -> Result<VideoInput, String> {
    if s == "none" {
        return Ok(VideoInput::None);
    }
    if let Some(rest) = s.strip_prefix("synthetic") {
        let spec = rest.strip_prefix(':').unwrap_or("");
        if spec.is_empty() {
            return Ok(VideoInput::Synthetic {
                width: 640,
                height: 360,
                fps: 15,
            });
        }
        let (size, fps) = spec.split_once('@').unwrap_or((spec, "15"));
        let (w, h) = size
            .split_once('x')
            .ok_or_else(|| format!("--video {s}: expected synthetic:WIDTHxHEIGHT[@FPS]"))?;
        let parse = |v: &str| {
            v.parse::<usize>()
                .map_err(|_| format!("--video {s}: {v:?} is not a number"))
        };
        return Ok(VideoInput::Synthetic {
            width: parse(w)?,
            height: parse(h)?,
            fps: fps
                .parse()
                .map_err(|_| format!("--video {s}: {fps:?} is not a frame rate"))?,
        });
    }
    if let Some(rest) = s.strip_prefix("camera") {
        let index = match rest.strip_prefix(':') {
            None if rest.is_empty() => 0,
            Some(n) => n
                .parse()
                .map_err(|_| format!("--video {s}: camera:N takes a number"))?,
            None => return Err(format!("--video {s}: expected camera or camera:N")),
        };
        return Ok(VideoInput::Camera {
            index,
            width: 1280,
            height: 720,
            fps: 30,
        });
    }
    Err(format!(
        "--video {s}: expected synthetic[:WxH[@FPS]], camera[:N] or none"
    ))
}

fn parse_audio(s: &str) -> Result<AudioInput, String> {
    match s {
        "none" => Ok(AudioInput::None),
        "synthetic" => Ok(AudioInput::Synthetic),
        "mic" => Ok(AudioInput::Mic(None)),
        m if m.starts_with("mic:") => Ok(AudioInput::Mic(Some(m["mic:".len()..].to_string()))),
        _ => Err(format!("--audio {s}: expected synthetic, mic[:ID] or none")),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error,diemcau_client=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match cli.command {
        Command::Join(args) => runtime.block_on(join(args)),
        Command::Chair(args) => runtime.block_on(chair(args)),
        Command::Devices { json } => devices(json),
        Command::Config(c) => config(c),
    }
}

fn config(command: ConfigCommand) -> ExitCode {
    use diemcau_client::settings::{self, Paths, Settings};
    let machine = |file: Option<std::path::PathBuf>| file.unwrap_or(Paths::from_env().machine);
    match command {
        ConfigCommand::Set { values, file } => {
            let path = machine(file);
            let autostart = match values.autostart.as_deref().map(str::trim) {
                None | Some("") => None,
                Some("1" | "true" | "yes") => Some(true),
                Some("0" | "false" | "no") => Some(false),
                Some(other) => {
                    eprintln!("AUTOSTART phải là 1 hoặc 0 (đang là \"{other}\").");
                    return ExitCode::from(2);
                }
            };
            let given = Settings {
                autostart,
                server: values.server,
                site: values.site,
                secret: values.secret,
                room: values.room,
                portal_url: values.portal_url,
                language: values.language,
                ..Default::default()
            };
            match settings::update_machine(&path, &given) {
                Ok(_) => {
                    eprintln!("Đã ghi cấu hình vào {}", path.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(2)
                }
            }
        }
        ConfigCommand::Show { file } => {
            let path = machine(file);
            match settings::read(&path) {
                Ok(mut s) => {
                    if s.secret.is_some() {
                        s.secret = Some("********".into());
                    }
                    println!("# {}", path.display());
                    print!("{}", toml::to_string_pretty(&s).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

/// What `join` connects with: the command line, else the machine-wide settings.
#[derive(Debug)]
struct Target {
    server: String,
    site: String,
    room: String,
    secret: Option<String>,
    token: Option<String>,
}

impl JoinArgs {
    /// The command line, completed from the machine-wide settings when it lacks the server
    /// or the site. The file's secret and token go only with the file's own site and server:
    /// never to a server or for a site named on the command line.
    fn target(&self) -> Result<Target, String> {
        use diemcau_client::settings::{self, Paths, Settings};
        let path = Paths::from_env().machine;
        let machine = if self.server.is_none() || self.site.is_none() {
            settings::read(&path)
                .map_err(|e| format!("{e}\nKhông tham gia được: thiếu --server hoặc --site."))?
                .non_empty()
        } else {
            Settings::default()
        };
        let missing = |flag: &str, what: &str| {
            format!(
                "Chưa có {what}: dùng tùy chọn --{flag} hoặc ghi vào {} (diemcau-cli config set).",
                path.display()
            )
        };
        let from_file = self.server.is_none() && self.site.is_none();
        Ok(Target {
            server: self
                .server
                .clone()
                .or(machine.server.clone())
                .ok_or_else(|| missing("server", "địa chỉ máy chủ"))?,
            site: self
                .site
                .clone()
                .or(machine.site.clone())
                .ok_or_else(|| missing("site", "mã điểm cầu"))?,
            room: self
                .room
                .clone()
                .unwrap_or_else(|| machine.room_or_default()),
            secret: self.secret.clone().or(machine.secret.filter(|_| from_file)),
            token: self.token.clone().or(machine.token.filter(|_| from_file)),
        })
    }
}

async fn join(args: JoinArgs) -> ExitCode {
    let target = match args.target() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let (video, audio) = match (parse_video(&args.video), parse_audio(&args.audio)) {
        (Ok(v), Ok(a)) => (v, a),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if !(0.0..=86_400.0).contains(&args.duration) {
        eprintln!("--duration must be between 0 and 86400 seconds");
        return ExitCode::from(2);
    }
    if args
        .raise_hand_after
        .is_some_and(|s| !(0.0..=86_400.0).contains(&s))
    {
        eprintln!("--raise-hand-after must be between 0 and 86400 seconds");
        return ExitCode::from(2);
    }
    let mut opts = JoinOptions::synthetic(&target.site, &target.room);
    opts.token = target.token.clone();
    opts.secret = target.secret.clone();
    opts.video = video;
    opts.audio = audio;
    opts.max_video_bitrate_bps = args.max_video_kbps.saturating_mul(1000);
    opts.video_layers = usize::from(args.layers);
    opts.udp = !args.tcp_only;
    if args.audio_only {
        opts.video = VideoInput::None;
        opts.receive_video = false;
    }
    opts.speaker = match args.speaker.as_str() {
        "none" => SpeakerOutput::None,
        "default" => SpeakerOutput::Default,
        "null" => SpeakerOutput::Null,
        id => SpeakerOutput::Device(id.to_string()),
    };
    eprintln!(
        "[{}] Đang kết nối tới {} (phòng {})…",
        target.site, target.server, target.room
    );
    let (room, mut events) = match Room::connect(&target.server, opts).await {
        Ok(x) => x,
        Err(e) => {
            eprintln!("[{}] {}", target.site, e.vi());
            eprintln!("[{}] detail: {e}", target.site);
            return ExitCode::from(1);
        }
    };
    let deadline = tokio::time::sleep(Duration::from_secs_f64(args.duration));
    tokio::pin!(deadline);
    let hand_at = tokio::time::sleep(Duration::from_secs_f64(
        args.raise_hand_after
            .unwrap_or(f64::MAX / 4.0)
            .clamp(0.0, 1e9),
    ));
    tokio::pin!(hand_at);
    let mut hand_pending = args.raise_hand_after.is_some();
    let mut had_floor = false;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(args.progress_every));
    tick.tick().await;
    let mut lost = false;
    // Ctrl-C (SIGINT) or SIGTERM ends the meeting early, report and all.
    let stop = stop_signal();
    tokio::pin!(stop);
    let mut last_grade = None;
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            _ = &mut stop => {
                eprintln!("[{}] Dừng theo yêu cầu", target.site);
                break;
            }
            _ = &mut hand_at, if hand_pending => {
                hand_pending = false;
                room.raise_hand();
                eprintln!("[{}] Giơ tay phát biểu", target.site);
            }
            _ = tick.tick() => {
                let r = room.report().await;
                let parts: Vec<String> = r.received.iter().map(|s| format!(
                    "{}: {} hình ({} đã kiểm), {} tiếng", s.site, s.video_frames, s.video_frames_verified, s.audio_frames)).collect();
                let buffer = r.audio_playout.as_ref().map(|p| format!("; đệm tiếng {:.0} ms (mục tiêu {:.0} ms)", p.delay_now_ms, p.target_ms)).unwrap_or_default();
                eprintln!("[{}] đã gửi {} hình, {} tiếng; nhận {}{buffer}", target.site, r.sent.video_frames, r.sent.audio_frames,
                    if parts.is_empty() { "chưa có gì".to_string() } else { parts.join("; ") });
            }
            ev = events.recv() => match ev {
                None => break,
                Some(ev) => match ev {
                    RoomEvent::Joined { you, sites, .. } => eprintln!(
                        "[{}] Đã tham gia với tên \"{}\"; trong phòng có {} điểm cầu khác", target.site, you.name, sites.len()),
                    RoomEvent::SiteJoined { site } => eprintln!("[{}] {} ({}) vào phòng", target.site, site.name, site.id),
                    RoomEvent::SiteLeft { site, .. } => eprintln!("[{}] {site} rời phòng", target.site),
                    RoomEvent::MediaConnected => eprintln!("[{}] Đã kết nối hình và tiếng", target.site),
                    RoomEvent::TrackAdded { site, kind: diemcau_protocol::MediaKind::Audio } => {
                        eprintln!("[{}] Đang nhận tiếng từ {site}", target.site)
                    }
                    RoomEvent::FirstVerifiedFrame { site, since_join } => eprintln!(
                        "[{}] Hình đầu tiên từ {site} sau {} ms", target.site, since_join.as_millis()),
                    RoomEvent::ServerError { code, message, fatal } => {
                        eprintln!("[{}] Máy chủ báo lỗi: {} ({message})", target.site, code.vi());
                        if fatal { lost = true; break; }
                    }
                    RoomEvent::DeviceError { message } => eprintln!("[{}] {message}", target.site),
                    RoomEvent::Hands { queue, total } => {
                        if let Some(me) = queue.iter().find(|h| h.site == target.site) {
                            eprintln!("[{}] Tay của bạn: thứ {} / {total}", target.site, me.place);
                        }
                        // A chair or district sees the others' hands too.
                        let others: Vec<&str> = queue
                            .iter()
                            .filter(|h| h.site != target.site)
                            .map(|h| h.site.as_str())
                            .collect();
                        if !others.is_empty() {
                            eprintln!("[{}] Hàng chờ phát biểu: {}", target.site, others.join(", "));
                        }
                    }
                    RoomEvent::Floor { state } => {
                        let granted = state.you_may_speak && state.granted.contains(&target.site);
                        if granted && !had_floor {
                            eprintln!("[{}] Chủ tọa đã cho phép bạn phát biểu", target.site);
                        }
                        had_floor = granted;
                    }
                    RoomEvent::AskUnmute { by } => {
                        eprintln!("[{}] Chủ tọa ({by}) đề nghị bạn bật micro", target.site);
                        room.reply_unmute(args.accept_unmute);
                    }
                    RoomEvent::VideoLayer { site, width, height } => eprintln!(
                        "[{}] Hình từ {site}: {width}x{height}", target.site),
                    RoomEvent::Reconnecting { reason } => {
                        eprintln!("[{}] Mất kết nối ({reason}); đang kết nối lại…", target.site)
                    }
                    RoomEvent::Reconnected { after } => eprintln!(
                        "[{}] Đã kết nối lại sau {} ms", target.site, after.as_millis()),
                    RoomEvent::VideoPausedForLink { paused: true } => eprintln!(
                        "[{}] Đường truyền quá yếu: tạm dừng gửi hình, vẫn giữ tiếng", target.site),
                    RoomEvent::VideoPausedForLink { paused: false } => eprintln!(
                        "[{}] Đường truyền đã tốt lên: gửi hình trở lại", target.site),
                    RoomEvent::ReceiveVideoPausedForLink { paused: true } => eprintln!(
                        "[{}] Đường truyền về quá yếu: tạm ngừng nhận hình, vẫn giữ tiếng", target.site),
                    RoomEvent::ReceiveVideoPausedForLink { paused: false } => eprintln!(
                        "[{}] Thử nhận hình trở lại", target.site),
                    RoomEvent::Upstream { connected: false, chosen: true } => eprintln!(
                        "[{}] Huyện đã tách khỏi cuộc họp của tỉnh; cuộc họp của huyện vẫn tiếp tục", target.site),
                    RoomEvent::Upstream { connected: false, .. } => eprintln!(
                        "[{}] Mất kết nối với tỉnh; cuộc họp của huyện vẫn tiếp tục", target.site),
                    RoomEvent::Upstream { connected: true, .. } => eprintln!(
                        "[{}] Đã kết nối với tỉnh", target.site),
                    // Told when the grade changes, not every two seconds.
                    RoomEvent::Quality(q) if last_grade != Some(q.grade) => {
                        last_grade = Some(q.grade);
                        eprintln!("[{}] Chất lượng đường truyền: {} ({})", target.site, q.grade.vi(), q.vi());
                    }
                    RoomEvent::Disconnected { reason } => {
                        eprintln!("[{}] Mất kết nối với máy chủ ({reason})", target.site);
                        lost = true;
                        break;
                    }
                    _ => {}
                }
            }
        }
    }
    let report = room.leave().await;
    eprintln!("[{}] Đã rời phòng", target.site);
    if args.report == "json" {
        match serde_json::to_string(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("report: {e}"),
        }
    }
    if lost {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    }
}
