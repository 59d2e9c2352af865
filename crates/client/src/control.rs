//! Meeting control from the client side: chair commands with their answers, and a
//! signalling-only control session for operators (`diemcau-cli chair ...`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use diemcau_protocol::{ChairCommand, ClientMessage, ErrorCode, ServerMessage, PROTOCOL_VERSION};
use tokio::sync::{mpsc, oneshot};

use crate::{signal, ClientError};

/// What a chair command returns: nothing, or the roll-call CSV for an export.
pub type ChairResult = Result<Option<String>, ClientError>;

/// Chair commands in flight, matched to their `ack` / `error` / `roll_call_csv` by id.
#[derive(Default)]
pub struct Requests {
    next: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<ChairResult>>>,
}

impl Requests {
    /// Registers a command; returns its id and where its answer will arrive.
    pub fn start(&self) -> (u64, oneshot::Receiver<ChairResult>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .expect("request map lock poisoned")
            .insert(id, tx);
        (id, rx)
    }

    /// Hands a server message to the command it answers; false if it answers none.
    pub fn resolve(&self, msg: &ServerMessage) -> bool {
        let (id, result) = match msg {
            ServerMessage::Ack { id } => (*id, Ok(None)),
            ServerMessage::RollCallCsv { id, csv } => (*id, Ok(Some(csv.clone()))),
            ServerMessage::Error {
                id: Some(id),
                code,
                message,
                ..
            } => (
                *id,
                Err(ClientError::Refused {
                    code: *code,
                    message: message.clone(),
                }),
            ),
            _ => return false,
        };
        let mut pending = self.pending.lock().expect("request map lock poisoned");
        // An export is answered twice (CSV, then ack): the first answer wins.
        if let Some(tx) = pending.remove(&id) {
            let _ = tx.send(result);
        }
        true
    }
}

/// Sends a chair command and waits (10 s at most) for its answer.
pub async fn send_command(
    outbox: &mpsc::UnboundedSender<ClientMessage>,
    requests: &Requests,
    command: ChairCommand,
) -> ChairResult {
    let (id, rx) = requests.start();
    outbox
        .send(ClientMessage::Chair { id, command })
        .map_err(|_| ClientError::ServerClosed)?;
    tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .map_err(|_| ClientError::Timeout("chair command"))?
        .map_err(|_| ClientError::ServerClosed)?
}

/// Trades an enrollment secret for a token on an open signalling connection.
pub async fn enroll(
    sig: &mut signal::Signal,
    site: &str,
    room: &str,
    secret: &str,
) -> Result<String, ClientError> {
    let _ = sig.outbox.send(ClientMessage::Enroll {
        v: PROTOCOL_VERSION,
        room: room.into(),
        site: site.into(),
        secret: secret.into(),
    });
    // Any error answers the enrollment.
    sig.expect(
        &mut VecDeque::new(),
        "enrolled",
        &ErrorCode::ALL,
        |m| match m {
            ServerMessage::Enrolled { token, .. } => Some(token.clone()),
            _ => None,
        },
    )
    .await
}

/// A signalling-only session that gives chair commands (an operator's console).
pub struct ControlSession {
    sig: signal::Signal,
    requests: Requests,
}

impl ControlSession {
    /// Joins `room` as a control session of `site` with `token`.
    pub async fn connect(
        url: &str,
        site: &str,
        room: &str,
        token: &str,
    ) -> Result<Self, ClientError> {
        let mut sig = signal::connect(url).await?;
        let _ = sig.outbox.send(ClientMessage::Join {
            v: PROTOCOL_VERSION,
            room: room.into(),
            site: site.into(),
            token: Some(token.into()),
            control: true,
            resume: false,
            relay: false,
        });
        // Any error answers the join.
        sig.expect(&mut VecDeque::new(), "welcome", &ErrorCode::ALL, |m| {
            matches!(m, ServerMessage::Welcome { .. }).then_some(())
        })
        .await?;
        Ok(ControlSession {
            sig,
            requests: Requests::default(),
        })
    }

    /// Gives one command and waits for its answer.
    pub async fn command(&mut self, command: ChairCommand) -> ChairResult {
        let (id, mut rx) = self.requests.start();
        self.sig
            .outbox
            .send(ClientMessage::Chair { id, command })
            .map_err(|_| ClientError::ServerClosed)?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            tokio::select! {
                r = &mut rx => return r.map_err(|_| ClientError::ServerClosed)?,
                m = tokio::time::timeout_at(deadline, self.sig.inbox.recv()) => {
                    match m {
                        Err(_) => return Err(ClientError::Timeout("chair command")),
                        Ok(None) => return Err(ClientError::ServerClosed),
                        Ok(Some(msg)) => { self.requests.resolve(&msg); }
                    }
                }
            }
        }
    }

    pub fn leave(self) {
        let _ = self.sig.outbox.send(ClientMessage::Leave);
    }
}
