//! The TCP side of the server: one port carries both the signalling WebSocket and ICE-TCP.
//!
//! A new connection is classified by its first bytes: `GET ` starts an HTTP upgrade to the
//! WebSocket; 0x16 starts a TLS handshake, inside which the WebSocket then runs (`wss://`,
//! when the server has a certificate); anything else is taken as RFC 4571-framed ICE-TCP
//! (a 2-byte length, then a STUN/DTLS/RTP packet), which offices behind UDP-blocking
//! firewalls fall back to. A server with TLS refuses plain-text WebSockets: join tokens
//! must not cross the network in the clear.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use diemcau_protocol::{ClientMessage, ErrorCode, LeaveReason, ServerMessage, MAX_MESSAGE_BYTES};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, info, warn};

use crate::sfu::{Command, ConnId, JoinAsk};

/// How long a connection may take to say what it is, and a WebSocket to send `join`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(15);
/// An ICE-TCP link with no packet for this long is closed.
const ICE_TCP_IDLE: Duration = Duration::from_secs(30);
/// Frames above this are refused by the WebSocket layer itself (the connection drops);
/// between [`MAX_MESSAGE_BYTES`] and this, the client gets a `too_large` error and stays.
const HARD_FRAME_LIMIT: usize = 4 * MAX_MESSAGE_BYTES;

/// Accepts connections until the task is aborted; every connection task ends when
/// `shutdown` changes (or its sender is dropped).
pub async fn accept_loop(
    listener: TcpListener,
    engine: mpsc::UnboundedSender<Command>,
    shutdown: tokio::sync::watch::Receiver<()>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let next_id = Arc::new(AtomicU64::new(1));
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let engine = engine.clone();
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        let mut shutdown = shutdown.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let serve = async move {
                match tokio::time::timeout(HELLO_TIMEOUT, sniff(&stream)).await {
                    Ok(Ok(Kind::WebSocket)) if tls.is_some() => refuse_plain(stream, from).await,
                    Ok(Ok(Kind::WebSocket)) => serve_websocket(stream, from, id, engine).await,
                    Ok(Ok(Kind::Tls)) => match tls {
                        Some(acceptor) => {
                            match tokio::time::timeout(HELLO_TIMEOUT, acceptor.accept(stream)).await
                            {
                                Ok(Ok(s)) => serve_websocket(s, from, id, engine).await,
                                Ok(Err(e)) => debug!(%from, "TLS handshake failed: {e}"),
                                Err(_) => debug!(%from, "TLS handshake stalled; dropped"),
                            }
                        }
                        None => {
                            debug!(%from, "a TLS handshake, but this server has no certificate")
                        }
                    },
                    Ok(Ok(Kind::IceTcp)) => serve_ice_tcp(stream, from, engine).await,
                    Ok(Err(e)) => debug!(%from, "connection closed before saying anything: {e}"),
                    Err(_) => debug!(%from, "connection silent; dropped"),
                }
            };
            tokio::select! {
                _ = serve => {}
                _ = shutdown.changed() => {}
            }
        });
    }
}

enum Kind {
    WebSocket,
    Tls,
    IceTcp,
}

/// A plain-text WebSocket to a TLS server: an HTTP answer that says why, then close.
async fn refuse_plain(mut stream: TcpStream, from: SocketAddr) {
    warn!(%from, "plain ws:// refused: this server requires wss://");
    let body = "Use wss:// (TLS) for this server.\n";
    let answer = format!(
        "HTTP/1.1 426 Upgrade Required\r\nUpgrade: TLS/1.2, HTTP/1.1\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.shutdown().await;
}

async fn sniff(stream: &TcpStream) -> std::io::Result<Kind> {
    let mut buf = [0u8; 4];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if n >= 4 {
            return Ok(if &buf == b"GET " {
                Kind::WebSocket
            } else if buf[0] == 0x16 {
                Kind::Tls
            } else {
                Kind::IceTcp
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn serve_ice_tcp(
    stream: TcpStream,
    from: SocketAddr,
    engine: mpsc::UnboundedSender<Command>,
) {
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(512);
    if engine.send(Command::TcpOpened { peer: from, tx }).is_err() {
        return;
    }
    debug!(%from, "ICE-TCP connection");
    let writer = tokio::spawn(async move {
        while let Some(pkt) = rx.recv().await {
            let len = (pkt.len() as u16).to_be_bytes();
            if wr.write_all(&len).await.is_err() || wr.write_all(&pkt).await.is_err() {
                break;
            }
        }
    });
    let mut buf = vec![0u8; 65_536];
    loop {
        let mut len = [0u8; 2];
        // ICE consent checks arrive every few seconds; a silent link is dead.
        match tokio::time::timeout(ICE_TCP_IDLE, rd.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => break,
            Err(_) => {
                debug!(%from, "ICE-TCP link idle; closed");
                break;
            }
        }
        let n = usize::from(u16::from_be_bytes(len));
        if rd.read_exact(&mut buf[..n]).await.is_err() {
            break;
        }
        let packet = Command::TcpPacket {
            peer: from,
            data: buf[..n].to_vec(),
        };
        if engine.send(packet).is_err() {
            break;
        }
    }
    let _ = engine.send(Command::TcpClosed { peer: from });
    writer.abort();
}

async fn serve_websocket<S>(
    stream: S,
    from: SocketAddr,
    conn: ConnId,
    engine: mpsc::UnboundedSender<Command>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = WebSocketConfig::default()
        .max_message_size(Some(HARD_FRAME_LIMIT))
        .max_frame_size(Some(HARD_FRAME_LIMIT));
    let upgrade = tokio_tungstenite::accept_async_with_config(stream, Some(config));
    let ws = match tokio::time::timeout(HELLO_TIMEOUT, upgrade).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            debug!(%from, "WebSocket handshake failed: {e}");
            return;
        }
        Err(_) => {
            debug!(%from, "WebSocket handshake stalled; dropped");
            return;
        }
    };
    let (mut sink, mut incoming) = ws.split();
    let (to_client, mut outbox) = mpsc::unbounded_channel::<ServerMessage>();
    let writer = async move {
        while let Some(msg) = outbox.recv().await {
            let fatal = matches!(msg, ServerMessage::Error { fatal: true, .. });
            if sink.send(Message::Text(msg.encode().into())).await.is_err() {
                break;
            }
            if fatal {
                let _ = sink.close().await;
                break;
            }
        }
    };
    let reader = read_loop(&mut incoming, from, conn, &engine, to_client);
    tokio::pin!(writer);
    let (left, writer_done) = tokio::select! {
        left = reader => (left, false),
        _ = &mut writer => (false, true),
    };
    if !left {
        let _ = engine.send(Command::Leave {
            conn,
            reason: LeaveReason::Disconnected,
        });
    }
    // Let the writer deliver what is queued (a fatal error's explanation above all). It ends
    // when every sender is gone: ours now, the engine's once it has removed the site.
    if !writer_done {
        let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    }
    debug!(%from, conn, "signalling connection closed");
}

/// Reads client messages until the socket closes; true if the client left cleanly.
async fn read_loop<S>(
    incoming: &mut S,
    from: SocketAddr,
    conn: ConnId,
    engine: &mpsc::UnboundedSender<Command>,
    to_client: mpsc::UnboundedSender<ServerMessage>,
) -> bool
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let mut joined = false;
    let reply = |code: ErrorCode, msg: String, fatal: bool| {
        let _ = to_client.send(ServerMessage::error(code, msg, fatal));
    };
    loop {
        let next = if joined {
            incoming.next().await
        } else {
            match tokio::time::timeout(HELLO_TIMEOUT, incoming.next()).await {
                Ok(m) => m,
                Err(_) => {
                    warn!(%from, "no join within {HELLO_TIMEOUT:?}; closing");
                    reply(ErrorCode::NotJoined, "no join message in time".into(), true);
                    return false;
                }
            }
        };
        let text = match next {
            None => return false,
            Some(Err(e)) => {
                warn!(%from, "signalling read error: {e}");
                return false;
            }
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Binary(_))) => {
                warn!(%from, "binary signalling message refused");
                reply(
                    ErrorCode::BadJson,
                    "signalling messages are JSON text".into(),
                    false,
                );
                continue;
            }
            Some(Ok(Message::Close(_))) => return false,
            Some(Ok(_)) => continue,
        };
        let msg = match ClientMessage::decode(&text) {
            Ok(m) => m,
            Err(e) => {
                warn!(%from, "bad signalling message: {e}");
                // A join in a version we do not speak cannot go on; anything else may.
                let fatal = e.code() == ErrorCode::UnsupportedVersion;
                reply(e.code(), e.to_string(), fatal);
                if fatal {
                    return false;
                }
                continue;
            }
        };
        match msg {
            ClientMessage::Ping { id } => {
                let _ = to_client.send(ServerMessage::Pong { id });
            }
            ClientMessage::Join {
                room,
                site,
                token,
                control,
                resume,
                relay,
                ..
            } => {
                if joined {
                    reply(ErrorCode::AlreadyJoined, "already joined".into(), false);
                    continue;
                }
                joined = true;
                info!(%from, %site, %room, control, relay, "join");
                let _ = engine.send(Command::Join {
                    conn,
                    ask: JoinAsk {
                        room,
                        site,
                        token,
                        control,
                        resume,
                        relay,
                    },
                    from,
                    to_client: to_client.clone(),
                });
            }
            ClientMessage::Enroll {
                room, site, secret, ..
            } => {
                let _ = engine.send(Command::Enroll {
                    room,
                    site,
                    secret,
                    from,
                    to_client: to_client.clone(),
                });
            }
            _ if !joined => {
                reply(
                    ErrorCode::NotJoined,
                    "send join before anything else".into(),
                    false,
                );
            }
            ClientMessage::Offer { sdp } => {
                let _ = engine.send(Command::Offer { conn, sdp });
            }
            ClientMessage::RequestKeyframe { site } => {
                let _ = engine.send(Command::RequestKeyframe { conn, site });
            }
            ClientMessage::ReceiveVideo { on } => {
                let _ = engine.send(Command::ReceiveVideo { conn, on });
            }
            ClientMessage::RaiseHand { raised_at_ms } => {
                let _ = engine.send(Command::RaiseHand { conn, raised_at_ms });
            }
            ClientMessage::LowerHand => {
                let _ = engine.send(Command::LowerHand { conn });
            }
            ClientMessage::Chair { id, command } => {
                let _ = engine.send(Command::Chair { conn, id, command });
            }
            ClientMessage::UnmuteReply { accept } => {
                let _ = engine.send(Command::UnmuteReply { conn, accept });
            }
            msg @ (ClientMessage::RelaySites { .. }
            | ClientMessage::RelaySources { .. }
            | ClientMessage::RelayHand { .. }
            | ClientMessage::RelayUnmuteReply { .. }
            | ClientMessage::RelayLeft { .. }) => {
                let _ = engine.send(Command::FromRelay { conn, msg });
            }
            ClientMessage::Leave => {
                let _ = engine.send(Command::Leave {
                    conn,
                    reason: LeaveReason::Left,
                });
                return true;
            }
        }
    }
}
