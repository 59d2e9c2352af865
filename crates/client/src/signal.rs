//! The signalling WebSocket: the one place where wire messages are read and written.

use diemcau_protocol::{ClientMessage, ServerMessage};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, warn};

use crate::ClientError;

/// A connected signalling channel: send with `outbox`, receive from `inbox`.
pub struct Signal {
    pub outbox: mpsc::UnboundedSender<ClientMessage>,
    pub inbox: mpsc::UnboundedReceiver<ServerMessage>,
    /// Resolves when the writer has sent `leave` and closed the socket (or failed).
    pub flushed: tokio::sync::oneshot::Receiver<()>,
}

/// Opens the WebSocket and spawns its reader and writer tasks.
pub async fn connect(url: &str) -> Result<Signal, ClientError> {
    let (ws, _) = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .map_err(|_| ClientError::Unreachable {
        url: url.into(),
        detail: "timed out".into(),
    })?
    .map_err(|e| ClientError::Unreachable {
        url: url.into(),
        detail: e.to_string(),
    })?;
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
                let _ = sink.close().await;
                break;
            }
        }
        let _ = flushed_tx.send(());
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
    });
    Ok(Signal {
        outbox,
        inbox,
        flushed,
    })
}
