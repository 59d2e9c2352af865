//! `diemcau-cli`: the headless Điểm cầu site, for kiosks, installers' scripts and tests.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use diemcau_client::{AudioInput, JoinOptions, Room, RoomEvent, VideoInput};

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
}

#[derive(Debug, clap::Args)]
struct JoinArgs {
    /// Server address, e.g. ws://127.0.0.1:7600
    #[arg(long)]
    server: String,
    /// This site's id in the directory.
    #[arg(long)]
    site: String,
    /// Join token (not needed by a --dev server).
    #[arg(long)]
    token: Option<String>,
    /// Room name.
    #[arg(long, default_value = "hop-tinh")]
    room: String,
    /// Picture source: synthetic[:WxH[@FPS]] | camera[:N] | none
    #[arg(long, default_value = "synthetic")]
    video: String,
    /// Sound source: synthetic | mic[:ID] | none
    #[arg(long, default_value = "synthetic")]
    audio: String,
    /// Seconds to stay in the room.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Report format on stdout when leaving: json | none
    #[arg(long, default_value = "json")]
    report: String,
    /// Upper bound for the video bitrate (kbit/s).
    #[arg(long, default_value_t = 1500)]
    max_video_kbps: u32,
    /// Offer only TCP candidates (as if UDP were blocked).
    #[arg(long)]
    tcp_only: bool,
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
    if s.starts_with("camera") {
        return Err(
            "Phiên bản này chưa dùng được camera thật; hãy chạy với --video synthetic \
             (this build has no camera support yet)"
                .into(),
        );
    }
    Err(format!(
        "--video {s}: expected synthetic[:WxH[@FPS]], camera[:N] or none"
    ))
}

fn parse_audio(s: &str) -> Result<AudioInput, String> {
    match s {
        "none" => Ok(AudioInput::None),
        "synthetic" => Ok(AudioInput::Synthetic),
        m if m.starts_with("mic") => Err(
            "Phiên bản này chưa dùng được micro thật; hãy chạy với --audio synthetic \
             (this build has no microphone support yet)"
                .into(),
        ),
        _ => Err(format!("--audio {s}: expected synthetic, mic[:ID] or none")),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
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
    }
}

async fn join(args: JoinArgs) -> ExitCode {
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
    let mut opts = JoinOptions::synthetic(&args.site, &args.room);
    opts.token = args.token.clone();
    opts.video = video;
    opts.audio = audio;
    opts.max_video_bitrate_bps = args.max_video_kbps.saturating_mul(1000);
    opts.udp = !args.tcp_only;
    eprintln!(
        "[{}] Đang kết nối tới {} (phòng {})…",
        args.site, args.server, args.room
    );
    let (room, mut events) = match Room::connect(&args.server, opts).await {
        Ok(x) => x,
        Err(e) => {
            eprintln!("[{}] {}", args.site, e.vi());
            eprintln!("[{}] detail: {e}", args.site);
            return ExitCode::from(1);
        }
    };
    let deadline = tokio::time::sleep(Duration::from_secs_f64(args.duration));
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.tick().await;
    let mut lost = false;
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            _ = tick.tick() => {
                let r = room.report().await;
                let parts: Vec<String> = r.received.iter().map(|s| format!(
                    "{}: {} hình ({} đã kiểm), {} tiếng", s.site, s.video_frames, s.video_frames_verified, s.audio_frames)).collect();
                eprintln!("[{}] đã gửi {} hình, {} tiếng; nhận {}", args.site, r.sent.video_frames, r.sent.audio_frames,
                    if parts.is_empty() { "chưa có gì".to_string() } else { parts.join("; ") });
            }
            ev = events.recv() => match ev {
                None => break,
                Some(ev) => match ev {
                    RoomEvent::Joined { you, sites, .. } => eprintln!(
                        "[{}] Đã tham gia với tên \"{}\"; trong phòng có {} điểm cầu khác", args.site, you.name, sites.len()),
                    RoomEvent::SiteJoined { site } => eprintln!("[{}] {} ({}) vào phòng", args.site, site.name, site.id),
                    RoomEvent::SiteLeft { site, .. } => eprintln!("[{}] {site} rời phòng", args.site),
                    RoomEvent::MediaConnected => eprintln!("[{}] Đã kết nối hình và tiếng", args.site),
                    RoomEvent::FirstVerifiedFrame { site, since_join } => eprintln!(
                        "[{}] Hình đầu tiên từ {site} sau {} ms", args.site, since_join.as_millis()),
                    RoomEvent::ServerError { code, message, fatal } => {
                        eprintln!("[{}] Máy chủ báo lỗi: {} ({message})", args.site, code.vi());
                        if fatal { lost = true; break; }
                    }
                    RoomEvent::DeviceError { message } => eprintln!("[{}] {message}", args.site),
                    RoomEvent::Disconnected { reason } => {
                        eprintln!("[{}] Mất kết nối với máy chủ ({reason})", args.site);
                        lost = true;
                        break;
                    }
                    _ => {}
                }
            }
        }
    }
    let report = room.leave().await;
    eprintln!("[{}] Đã rời phòng", args.site);
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
