//! Malformed and hostile input: the offender gets a clear error or is dropped, the server
//! logs it and keeps serving everyone else.

use std::time::Duration;

use diemcau_client::RoomEvent;
use diemcau_e2e::{dev_server, join, until_verified, wait_for, MEDIA};
use diemcau_protocol::{ErrorCode, ServerMessage, MAX_MESSAGE_BYTES};
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws(url: &str) -> Ws {
    tokio_tungstenite::connect_async(url)
        .await
        .expect("websocket connects")
        .0
}

async fn send(ws: &mut Ws, text: &str) {
    ws.send(Message::Text(text.to_string().into()))
        .await
        .expect("send");
}

/// The next server message, or `None` if the server closed the connection.
async fn next(ws: &mut Ws) -> Option<ServerMessage> {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("server answers within 5 s");
        match m {
            Some(Ok(Message::Text(t))) => {
                return Some(ServerMessage::decode(&t).expect("server sends valid messages"))
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

async fn expect_error(ws: &mut Ws, want: ErrorCode) -> bool {
    loop {
        match next(ws).await {
            Some(ServerMessage::Error {
                code,
                fatal,
                message,
                ..
            }) => {
                assert_eq!(code, want, "{message}");
                assert!(!message.is_empty());
                return fatal;
            }
            Some(_) => continue,
            None => panic!("connection closed before the {want:?} error"),
        }
    }
}

async fn expect_closed(ws: &mut Ws) {
    while let Some(m) = next(ws).await {
        assert!(
            !matches!(m, ServerMessage::Welcome { .. }),
            "no welcome after a fatal error"
        );
    }
}

async fn ping_works(ws: &mut Ws) {
    send(ws, r#"{"type":"ping","id":42}"#).await;
    loop {
        match next(ws).await {
            Some(ServerMessage::Pong { id: 42 }) => return,
            Some(_) => continue,
            None => panic!("connection closed; expected it to stay open"),
        }
    }
}

fn join_msg(site: &str) -> String {
    format!(r#"{{"type":"join","v":1,"room":"xau","site":"{site}"}}"#)
}

#[tokio::test]
async fn malformed_json_gets_bad_json_and_the_connection_stays() {
    let server = dev_server().await;
    let mut c = ws(&server.url()).await;
    send(&mut c, "{\"type\": \"join\", ").await;
    assert!(!expect_error(&mut c, ErrorCode::BadJson).await);
    send(&mut c, "[1,2,3]").await;
    assert!(!expect_error(&mut c, ErrorCode::BadJson).await);
    c.send(Message::Binary(vec![1, 2, 3].into())).await.unwrap();
    assert!(!expect_error(&mut c, ErrorCode::BadJson).await);
    ping_works(&mut c).await;
    server.stop();
}

#[tokio::test]
async fn unknown_type_is_refused_by_name() {
    let server = dev_server().await;
    let mut c = ws(&server.url()).await;
    send(&mut c, r#"{"type":"dance","steps":3}"#).await;
    assert!(!expect_error(&mut c, ErrorCode::UnknownType).await);
    ping_works(&mut c).await;
    server.stop();
}

#[tokio::test]
async fn wrong_protocol_version_is_fatal() {
    let server = dev_server().await;
    let mut c = ws(&server.url()).await;
    send(
        &mut c,
        r#"{"type":"join","v":99,"room":"xau","site":"tp-vinh"}"#,
    )
    .await;
    assert!(expect_error(&mut c, ErrorCode::UnsupportedVersion).await);
    expect_closed(&mut c).await;
    server.stop();
}

#[tokio::test]
async fn oversized_message_is_refused_and_giant_one_drops_the_connection() {
    let server = dev_server().await;
    let mut c = ws(&server.url()).await;
    let big = format!(
        r#"{{"type":"offer","sdp":"{}"}}"#,
        "v".repeat(MAX_MESSAGE_BYTES + 1)
    );
    send(&mut c, &big).await;
    assert!(!expect_error(&mut c, ErrorCode::TooLarge).await);
    ping_works(&mut c).await;
    // Far above the limit the WebSocket layer itself refuses the frame and drops us.
    let giant = "x".repeat(16 * MAX_MESSAGE_BYTES);
    let _ = c.send(Message::Text(giant.into())).await;
    expect_closed(&mut c).await;
    server.stop();
}

#[tokio::test]
async fn messages_before_join_are_refused() {
    let server = dev_server().await;
    let mut c = ws(&server.url()).await;
    send(&mut c, r#"{"type":"offer","sdp":"v=0"}"#).await;
    assert!(!expect_error(&mut c, ErrorCode::NotJoined).await);
    server.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_sdp_duplicate_site_and_vanishing_clients_leave_the_room_working() {
    let _guard = MEDIA.lock().await;
    let server = dev_server().await;
    let (a, mut a_events) = join(&server, "nghe-an", "xau").await;

    // Garbage SDP: a clear error, the connection stays.
    let mut g = ws(&server.url()).await;
    send(&mut g, &join_msg("hung-nguyen")).await;
    assert!(matches!(
        next(&mut g).await,
        Some(ServerMessage::Welcome { .. })
    ));
    send(&mut g, r#"{"type":"offer","sdp":"this is not SDP at all"}"#).await;
    assert!(!expect_error(&mut g, ErrorCode::BadSdp).await);
    ping_works(&mut g).await;

    // A second join with a site id already present: refused, closed.
    let mut d = ws(&server.url()).await;
    send(&mut d, &join_msg("nghe-an")).await;
    assert!(expect_error(&mut d, ErrorCode::SiteTaken).await);
    expect_closed(&mut d).await;

    // A client that vanishes mid-handshake (joined, offered garbage-free nothing, then gone).
    let mut v = ws(&server.url()).await;
    send(&mut v, &join_msg("ky-son")).await;
    assert!(matches!(
        next(&mut v).await,
        Some(ServerMessage::Welcome { .. })
    ));
    drop(v);
    wait_for(
        &mut a_events,
        Duration::from_secs(5),
        "ky-son to be dropped",
        |e| match e {
            RoomEvent::SiteLeft { site, .. } if site == "ky-son" => Some(()),
            _ => None,
        },
    )
    .await;

    // A TCP connection that says nothing useful and is cut.
    let mut raw = tokio::net::TcpStream::connect(server.signalling)
        .await
        .unwrap();
    raw.write_all(&[0, 3, 1, 2, 3]).await.unwrap();
    drop(raw);

    // Through all of that, a real second site joins and both verify each other.
    let (b, _b_events) = join(&server, "thanh-chuong", "xau").await;
    until_verified(&b, &["nghe-an"], Duration::from_secs(15)).await;
    until_verified(&a, &["thanh-chuong"], Duration::from_secs(15)).await;
    drop(g);
    a.leave().await;
    b.leave().await;
    server.stop();
}
