//! `diemcau-server`: the room server binary.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use diemcau_protocol::Directory;
use diemcau_server::{start, ServerConfig};

/// Điểm cầu room server (SFU).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Development mode on loopback: no TLS, the built-in Nghệ An sample directory, and
    /// joins from any site id without a token. Never expose it to a network.
    #[arg(long)]
    dev: bool,
    /// Address for signalling (WebSocket) and ICE-TCP.
    #[arg(long, default_value = "127.0.0.1:7600")]
    listen: SocketAddr,
    /// UDP media port (default: the listen port's number).
    #[arg(long)]
    udp_port: Option<u16>,
    /// Address sites reach this server at, written into ICE candidates (needed when
    /// listening on 0.0.0.0 or ::).
    #[arg(long)]
    advertise_ip: Option<IpAddr>,
    /// Site directory (TOML). Default: the built-in sample.
    #[arg(long)]
    directory: Option<PathBuf>,
    /// Video slots per site: how many remote videos one site receives at most.
    #[arg(long, default_value_t = 9)]
    video_slots: u8,
    /// Audio slots per site: how many of the loudest remote sites one site hears at most.
    #[arg(long, default_value_t = 3)]
    audio_slots: u8,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,str0m=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let directory = match &args.directory {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read directory file {}", p.display()))?;
            Directory::from_toml(&text).with_context(|| format!("in {}", p.display()))?
        }
        None => Directory::sample(),
    };
    if !args.dev {
        anyhow::bail!(
            "without --dev this server needs join tokens, which this version does not have yet; \
             run with --dev on loopback"
        );
    }
    if args.dev && !args.listen.ip().is_loopback() {
        tracing::warn!("--dev on a non-loopback address: anyone who reaches it can join");
    }
    let cfg = ServerConfig {
        listen: args.listen,
        udp_port: args.udp_port,
        advertise_ip: args.advertise_ip,
        dev: args.dev,
        directory: Arc::new(directory),
        video_slots: args.video_slots,
        audio_slots: args.audio_slots,
        connect_timeout: Duration::from_secs(20),
    };
    let sites = cfg.directory.len();
    let server = start(cfg).await?;
    eprintln!(
        "!!! --dev: joins are NOT authenticated; any site id may join. Loopback testing only. !!!"
    );
    eprintln!(
        "directory: {sites} sites; media: UDP {}, ICE-TCP on the signalling port",
        server.media_udp
    );
    // The first stdout line is the address; scripts and tests read it.
    println!("listening {}", server.url());
    tokio::signal::ctrl_c().await.ok();
    eprintln!("stopping");
    server.stop();
    Ok(())
}
