//! The Điểm cầu room server: WebSocket signalling, an SFU on `str0m`, and the site directory.
//!
//! One TCP port carries the signalling WebSocket and ICE-TCP; one UDP port (by default the
//! same number) carries ICE-lite media with DTLS-SRTP. [`start`] binds both and spawns:
//! - the accept loop ([`signalling`]), which classifies each TCP connection by its first
//!   bytes and runs either a WebSocket session or an RFC 4571 ICE-TCP link;
//! - the media engine ([`sfu::Engine`]), a single task that owns every site's `Rtc` and
//!   forwards media between the sites of a room through bounded receive slots ([`slots`]).
//!
//! Signalling sessions and ICE-TCP links talk to the engine over one command channel; the
//! engine answers each site through that site's own outbox. No locks guard media state.

pub mod audit;
pub mod meeting;
pub mod sfu;
pub mod signalling;
pub mod slots;
pub mod tls;
pub mod upstream;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use diemcau_protocol::token::Key;
use diemcau_protocol::Directory;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub use sfu::Stats;

/// How a server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Signalling (and ICE-TCP) address. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// UDP media port; `None` = the same number as the listen port.
    pub udp_port: Option<u16>,
    /// Address written into ICE candidates; required when `listen` is a wildcard address.
    pub advertise_ip: Option<IpAddr>,
    /// UDP port written into the UDP candidate when it differs from the bound one (a NAT
    /// or firewall forwarding another public port).
    pub advertise_udp_port: Option<u16>,
    /// Loopback development mode: unauthenticated joins, sample directory.
    pub dev: bool,
    pub directory: Arc<Directory>,
    pub video_slots: u8,
    pub audio_slots: u8,
    pub connect_timeout: Duration,
    /// Token signing key (production). `None` with `dev` accepts only dev tokens.
    pub key: Option<Key>,
    /// Append-only JSONL audit log; `None` logs privileged actions to the log output only.
    pub audit_log: Option<std::path::PathBuf>,
    /// TLS for signalling (`wss://`, see [`tls::load`]); `None` serves plain `ws://`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Relay mode: also join this parent room as one peer for this server's sites.
    pub upstream: Option<upstream::UpstreamConfig>,
}

impl ServerConfig {
    /// A `--dev` server on loopback with the sample directory.
    pub fn dev(listen: SocketAddr) -> Self {
        ServerConfig {
            listen,
            udp_port: None,
            advertise_ip: None,
            advertise_udp_port: None,
            dev: true,
            directory: Arc::new(Directory::sample()),
            video_slots: 9,
            audio_slots: 3,
            connect_timeout: Duration::from_secs(20),
            key: None,
            audit_log: None,
            tls: None,
            upstream: None,
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("listening on {0} (all interfaces) needs --advertise-ip: the address sites reach this server at")]
    NeedAdvertiseIp(IpAddr),
    #[error("without --dev the server needs a token key (--key-file)")]
    NeedKey,
    #[error("cannot open the audit log {path}: {source}")]
    Audit {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// A started server. Dropping it does not stop it; call [`RunningServer::stop`].
pub struct RunningServer {
    pub signalling: SocketAddr,
    /// Whether signalling is TLS (`wss://`).
    pub tls: bool,
    pub media_udp: SocketAddr,
    pub stats: Arc<Stats>,
    tasks: Vec<JoinHandle<()>>,
    shutdown: tokio::sync::watch::Sender<()>,
}

impl RunningServer {
    /// `ws://host:port` (or `wss://` with TLS) for clients.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "wss" } else { "ws" };
        format!("{scheme}://{}", self.signalling)
    }

    /// Stops accepting, closes every connection and the media engine.
    pub fn stop(self) {
        let _ = self.shutdown.send(());
        for t in self.tasks {
            t.abort();
        }
    }
}

/// Binds the ports and starts serving on the current tokio runtime.
pub async fn start(cfg: ServerConfig) -> Result<RunningServer, ServerError> {
    if !cfg.dev && cfg.key.is_none() {
        return Err(ServerError::NeedKey);
    }
    let audit = match &cfg.audit_log {
        Some(p) => audit::AuditLog::open(p).map_err(|source| ServerError::Audit {
            path: p.clone(),
            source,
        })?,
        None => audit::AuditLog::disabled(),
    };
    let ip = cfg.listen.ip();
    let advertise = match (cfg.advertise_ip, ip.is_unspecified()) {
        (Some(a), _) => a,
        (None, false) => ip,
        (None, true) => return Err(ServerError::NeedAdvertiseIp(ip)),
    };
    // With port 0 the TCP port is picked first and UDP must get the same number; retry if
    // that number happens to be taken for UDP.
    let mut attempts = 0;
    let (listener, udp) = loop {
        attempts += 1;
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| ServerError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let tcp_addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let udp_addr = SocketAddr::new(ip, cfg.udp_port.unwrap_or(tcp_addr.port()));
        match UdpSocket::bind(udp_addr).await {
            Ok(u) => break (listener, u),
            Err(_) if cfg.listen.port() == 0 && attempts < 20 => continue,
            Err(source) => {
                return Err(ServerError::Bind {
                    addr: udp_addr,
                    source,
                })
            }
        }
    };
    let signalling = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let media_udp = udp.local_addr().map_err(|source| ServerError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let stats = Arc::new(Stats::default());
    let engine_cfg = sfu::EngineConfig {
        dev: cfg.dev,
        directory: cfg.directory.clone(),
        video_slots: cfg.video_slots,
        audio_slots: cfg.audio_slots,
        udp_candidate: SocketAddr::new(
            advertise,
            cfg.advertise_udp_port.unwrap_or(media_udp.port()),
        ),
        tcp_candidate: SocketAddr::new(advertise, signalling.port()),
        connect_timeout: cfg.connect_timeout,
        key: cfg.key.clone(),
        enrollment_ttl: Duration::from_secs(15 * 60),
        relay_site: cfg.upstream.as_ref().map(|u| u.site.clone()),
        relay_room: cfg.upstream.as_ref().map(|u| u.room.clone()),
    };
    let udp_candidate = engine_cfg.udp_candidate;
    let (tx, rx) = mpsc::unbounded_channel();
    let (shutdown, shutdown_rx) = tokio::sync::watch::channel(());
    let mut engine = sfu::Engine::new(engine_cfg, Arc::new(udp), stats.clone(), audit);
    let (link_tx, link_rx) =
        tokio::sync::watch::channel(cfg.upstream.as_ref().is_some_and(|u| u.link_at_start));
    if cfg.upstream.is_some() {
        engine = engine.with_link_switch(link_tx);
    }
    let uplink_tx = tx.clone();
    let mut tasks = vec![
        tokio::spawn(engine.run(rx)),
        tokio::spawn(signalling::accept_loop(
            listener,
            tx,
            shutdown_rx,
            cfg.tls.clone().map(tokio_rustls::TlsAcceptor::from),
        )),
    ];
    if let Some(up) = cfg.upstream.clone() {
        tasks.push(tokio::spawn(upstream::run(
            up,
            uplink_tx,
            udp_candidate,
            link_rx,
        )));
    }
    Ok(RunningServer {
        signalling,
        tls: cfg.tls.is_some(),
        media_udp,
        stats,
        tasks,
        shutdown,
    })
}
