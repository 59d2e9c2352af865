//! `diemcau-server`: the room server binary, its key and token tools.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use diemcau_protocol::token::{parse_ttl, Claims, Key};
use diemcau_protocol::{Directory, Role};
use diemcau_server::{start, ServerConfig};

/// Điểm cầu room server (SFU).
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a new random token key (64 hex digits) to FILE, readable by its owner only.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Join tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Print a signed join token on stdout.
    Issue(IssueArgs),
}

#[derive(Debug, clap::Args)]
struct IssueArgs {
    /// Key file from `keygen`.
    #[arg(long, required_unless_present = "dev", conflicts_with = "dev")]
    key_file: Option<PathBuf>,
    /// Sign with the public development key (accepted only by --dev servers).
    #[arg(long)]
    dev: bool,
    #[arg(long)]
    site: String,
    /// chair | district | commune | observer
    #[arg(long, value_parser = parse_role)]
    role: Role,
    /// Room the token admits to ("*" = any room).
    #[arg(long, default_value = "*")]
    room: String,
    /// Lifetime, e.g. 8h, 30m, 2d.
    #[arg(long, default_value = "8h")]
    ttl: String,
    /// Check the site against this directory file before signing.
    #[arg(long)]
    directory: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Development mode on loopback: the built-in Nghệ An sample directory, joins
    /// from any site id without a token (as commune), and tokens signed with the public dev
    /// key. Never expose it to a network.
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
    /// UDP port written into ICE candidates when a NAT forwards another public port.
    #[arg(long)]
    advertise_udp_port: Option<u16>,
    /// Site directory (TOML). Default: the built-in sample (dev only).
    #[arg(long)]
    directory: Option<PathBuf>,
    /// Token key file (from `keygen`); required without --dev.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Append-only audit log (JSON lines) of privileged actions and refusals. Without --dev
    /// the default is ./diemcau-audit.jsonl.
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// TLS certificate chain (PEM) for signalling: clients then use wss://. Needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The TLS certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Video slots per site: how many remote videos one site receives at most.
    #[arg(long, default_value_t = 9)]
    video_slots: u8,
    /// Audio slots per site: how many of the loudest remote sites one site hears at most.
    #[arg(long, default_value_t = 3)]
    audio_slots: u8,
    /// Relay mode: also join the parent (province) room at this URL (ws:// or wss://) as
    /// one peer carrying this district's sites; needs --site.
    #[arg(long, requires = "site")]
    upstream: Option<String>,
    /// Relay mode: this district's site id in the parent's directory.
    #[arg(long, requires = "upstream")]
    site: Option<String>,
    /// Relay mode: a join token for --site (role district) from the parent's key.
    #[arg(long, requires = "upstream")]
    token: Option<String>,
    /// Relay mode: the room carried, by the same name here and at the parent.
    #[arg(long, default_value = "hop-tinh")]
    room: String,
    /// Relay mode: start with the district's own meeting; the district chair joins it to the
    /// parent's with `diemcau-cli chair … upstream on`.
    #[arg(long, requires = "upstream")]
    unlinked: bool,
}

fn parse_role(s: &str) -> Result<Role, String> {
    match s {
        "chair" => Ok(Role::Chair),
        "district" => Ok(Role::District),
        "commune" => Ok(Role::Commune),
        "observer" => Ok(Role::Observer),
        _ => Err(format!(
            "{s:?} is not a role (chair, district, commune, observer)"
        )),
    }
}

fn read_key(path: &Path) -> anyhow::Result<Key> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read key file {}", path.display()))?;
    Key::from_hex(&text).with_context(|| {
        format!(
            "{} is not a key file (64 hex digits, from `diemcau-server keygen`)",
            path.display()
        )
    })
}

fn read_directory(path: &Path) -> anyhow::Result<Directory> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read directory file {}", path.display()))?;
    Directory::from_toml(&text).with_context(|| format!("in {}", path.display()))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn keygen(out: &Path) -> anyhow::Result<()> {
    if out.exists() {
        bail!(
            "{} exists; refusing to overwrite a key (tokens signed with it would stop working)",
            out.display()
        );
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).context("no randomness from the operating system")?;
    let key = Key::new(&bytes);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(out)
        .with_context(|| format!("cannot create {}", out.display()))?;
    std::io::Write::write_all(&mut f, format!("{}\n", key.to_hex()).as_bytes())?;
    eprintln!("wrote a new token key to {}", out.display());
    Ok(())
}

fn issue(a: &IssueArgs) -> anyhow::Result<()> {
    let key = match &a.key_file {
        Some(p) => read_key(p)?,
        None => Key::dev(),
    };
    if let Some(d) = &a.directory {
        if !read_directory(d)?.contains(&a.site) {
            bail!("site {} is not in {}", a.site, d.display());
        }
    }
    let ttl =
        parse_ttl(&a.ttl).with_context(|| format!("--ttl {}: use e.g. 8h, 30m, 2d", a.ttl))?;
    let now = unix_now();
    let claims = Claims {
        site: a.site.clone(),
        role: a.role,
        room: a.room.clone(),
        iat: now,
        exp: now
            .checked_add(ttl)
            .with_context(|| format!("--ttl {} is too long", a.ttl))?,
    };
    println!("{}", key.sign(&claims));
    Ok(())
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
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::Keygen { out }) => return keygen(out),
        Some(Command::Token {
            command: TokenCommand::Issue(a),
        }) => return issue(a),
        None => {}
    }
    let args = cli.run;
    let directory = match &args.directory {
        Some(p) => read_directory(p)?,
        None if args.dev => Directory::sample(),
        None => bail!("--directory FILE is required without --dev"),
    };
    let key = match &args.key_file {
        Some(p) => Some(read_key(p)?),
        None if args.dev => None,
        None => bail!(
            "--key-file FILE is required without --dev (create one with `diemcau-server keygen --out FILE`)"
        ),
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(diemcau_server::tls::load(c, k).map_err(anyhow::Error::msg)?),
        _ => None,
    };
    if tls.is_none() && !args.dev {
        tracing::warn!(
            "no --tls-cert/--tls-key: signalling (join tokens, enrollment secrets) crosses the network unencrypted"
        );
    }
    if args.dev && !args.listen.ip().is_loopback() {
        tracing::warn!("--dev on a non-loopback address: anyone who reaches it can join");
    }
    let cfg = ServerConfig {
        listen: args.listen,
        udp_port: args.udp_port,
        advertise_ip: args.advertise_ip,
        advertise_udp_port: args.advertise_udp_port,
        dev: args.dev,
        directory: Arc::new(directory),
        video_slots: args.video_slots,
        audio_slots: args.audio_slots,
        connect_timeout: Duration::from_secs(20),
        key,
        // A production server always keeps an audit log (default: ./diemcau-audit.jsonl).
        audit_log: args
            .audit_log
            .clone()
            .or_else(|| (!args.dev).then(|| PathBuf::from("diemcau-audit.jsonl"))),
        tls,
        upstream: match (&args.upstream, &args.site) {
            (Some(url), Some(site)) => {
                if !url.starts_with("ws://") && !url.starts_with("wss://") {
                    bail!("--upstream {url}: use ws://HOST:PORT or wss://HOST:PORT");
                }
                Some(diemcau_server::upstream::UpstreamConfig {
                    url: url.clone(),
                    site: site.clone(),
                    token: args.token.clone(),
                    room: args.room.clone(),
                    link_at_start: !args.unlinked,
                })
            }
            _ => None,
        },
    };
    let sites = cfg.directory.len();
    let server = start(cfg).await?;
    if args.dev {
        eprintln!(
            "!!! --dev: joins without a token are NOT authenticated, and the public dev key is accepted. Loopback testing only. !!!"
        );
    }
    eprintln!(
        "directory: {sites} sites; media: UDP {}, ICE-TCP on the signalling port",
        server.media_udp
    );
    if let Some(up) = &args.upstream {
        eprintln!(
            "relay: carrying room {} to {up} as {}",
            args.room,
            args.site.as_deref().unwrap_or_default()
        );
    }
    // The first stdout line is the address; scripts and tests read it.
    println!("listening {}", server.url());
    tokio::signal::ctrl_c().await.ok();
    eprintln!("stopping");
    server.stop();
    Ok(())
}
