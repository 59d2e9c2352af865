//! The signalling WebSocket: the one place where wire messages are read and written.

use std::collections::VecDeque;
use std::time::Duration;

use diemcau_protocol::{ClientMessage, ErrorCode, ServerMessage};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, warn};

use crate::ClientError;

/// A connected signalling channel: send with `outbox`, receive from `inbox`.
pub struct Signal {
    pub outbox: mpsc::UnboundedSender<ClientMessage>,
    pub inbox: mpsc::UnboundedReceiver<ServerMessage>,
    /// Resolves when the server has closed the signalling (after acting on `leave`), or it
    /// broke.
    pub flushed: tokio::sync::oneshot::Receiver<()>,
}

impl Signal {
    /// Waits (10 s at most) for a server message that `pick` accepts; the others are kept in
    /// `backlog`. An error that is fatal, or whose code is in `fail_on`, ends the wait.
    pub async fn expect<T>(
        &mut self,
        backlog: &mut VecDeque<ServerMessage>,
        what: &'static str,
        fail_on: &[ErrorCode],
        mut pick: impl FnMut(&ServerMessage) -> Option<T>,
    ) -> Result<T, ClientError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let msg = tokio::time::timeout_at(deadline, self.inbox.recv())
                .await
                .map_err(|_| ClientError::Timeout(what))?
                .ok_or(ClientError::ServerClosed)?;
            if let Some(t) = pick(&msg) {
                return Ok(t);
            }
            if let ServerMessage::Error {
                code,
                message,
                fatal,
                ..
            } = &msg
            {
                if *fatal || fail_on.contains(code) {
                    return Err(ClientError::Refused {
                        code: *code,
                        message: message.clone(),
                    });
                }
            }
            backlog.push_back(msg);
        }
    }
}

/// What a failed WebSocket connect means for a person: a TLS server asked for plain text,
/// a certificate this machine does not trust, or no server at all.
fn connect_error(url: &str, e: tokio_tungstenite::tungstenite::Error) -> ClientError {
    use tokio_tungstenite::tungstenite::Error;
    match &e {
        Error::Http(resp) if resp.status() == 426 => {
            return ClientError::NeedsTls { url: url.into() };
        }
        Error::Io(io) => {
            let rustls_error = io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>());
            if let Some(rustls::Error::InvalidCertificate(why)) = rustls_error {
                return ClientError::Certificate {
                    url: url.into(),
                    detail: format!("{why:?}"),
                };
            }
            // The system has no trusted roots at all (tokio-tungstenite says so only in
            // words): nothing can be trusted, the same answer for a person.
            if io.kind() == std::io::ErrorKind::NotFound
                && io.to_string().starts_with("no native root CA certificates")
            {
                return ClientError::Certificate {
                    url: url.into(),
                    detail: io.to_string(),
                };
            }
        }
        _ => {}
    }
    ClientError::Unreachable {
        url: url.into(),
        detail: e.to_string(),
    }
}

/// Opens the WebSocket and spawns its reader and writer tasks.
pub async fn connect(url: &str) -> Result<Signal, ClientError> {
    if url.starts_with("wss://") {
        // One crypto provider for the process (aws-lc-rs; another crate may bring ring too,
        // and rustls then refuses to guess). An error means one is installed already.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }
    let (ws, _) = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .map_err(|_| ClientError::Unreachable {
        url: url.into(),
        detail: "timed out".into(),
    })?
    .map_err(|e| connect_error(url, e))?;
    let (mut sink, mut stream) = ws.split();
    let (outbox, mut out_rx) = mpsc::unbounded_channel::<ClientMessage>();
    let (in_tx, inbox) = mpsc::unbounded_channel::<ServerMessage>();
    let (flushed_tx, flushed) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        while let Some(msg) = out_rx.recv().await {
            let leave = matches!(msg, ClientMessage::Leave);
            if sink.send(Message::Text(msg.encode().into())).await.is_err() {
                break;
            }
            if leave {
                break;
            }
        }
        // After `leave`, or when the room drops this connection (a reconnect): close it, so
        // the server sees it go at once instead of waiting for its timeouts.
        let _ = sink.close().await;
    });
    tokio::spawn(async move {
        while let Some(m) = stream.next().await {
            match m {
                Ok(Message::Text(t)) => match ServerMessage::decode(&t) {
                    Ok(msg) => {
                        if in_tx.send(msg).is_err() {
                            break;
                        }
                    }
                    Err(e) => warn!("unreadable server message: {e}"),
                },
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
        debug!("signalling closed");
        // The server closes after it has acted on `leave` (or it is gone): only now may the
        // media path close without the others seeing a lost connection instead of a leave.
        let _ = flushed_tx.send(());
    });
    Ok(Signal {
        outbox,
        inbox,
        flushed,
    })
}
