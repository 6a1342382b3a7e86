//! A connection's CONNECT: reading it (protocol level 3.1, 3.1.1 or 5; anything else is
//! answered with CONNACK 0x01, or 0x84 in MQTT 5's format above level 5), and admitting
//! it (client id, shutdown, authentication and ACL grants) or refusing it with a CONNACK.

use super::*;

/// Password verifications (argon2: ~20 MiB and tens of ms each) running at once: a
/// flood of CONNECTs with wrong passwords costs time, not memory.
static VERIFY_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Appends device bytes to `buf` until it holds a complete packet; returns its fixed
/// header length and total length.
async fn read_frame(
    io: &mut Transport,
    buf: &mut BytesMut,
    max_size: usize,
) -> Result<(usize, usize), CloseReason> {
    loop {
        match v4::check(buf.iter(), max_size) {
            Ok(header) => return Ok((header.fixed_header_len, header.frame_length())),
            Err(Error::InsufficientBytes(n)) => {
                buf.reserve(n);
                match io.read(buf).await {
                    Ok(0) | Err(_) => return Err(CloseReason::PeerClosed),
                    Ok(_) => {}
                }
            }
            Err(e) => return Err(frame_error(&e)),
        }
    }
}

pub(super) fn frame_error(e: &Error) -> CloseReason {
    match e {
        Error::PayloadSizeLimitExceeded(_) => CloseReason::PacketTooLarge,
        _ => CloseReason::ProtocolError,
    }
}

/// The CONNECT of a connection: what `serve` needs from it.
pub(super) struct Connected {
    pub(super) version: Version,
    pub(super) connect: Connect,
    pub(super) props: Option<ConnectProperties>,
    pub(super) will: Option<LastWill>,
    pub(super) will_props: Option<LastWillProperties>,
    pub(super) login: Option<Login>,
}

/// Reads the CONNECT. `Err` ends the connection with that reason (an unknown protocol
/// level was already answered).
pub(super) async fn read_connect(
    shared: &ListenerShared,
    io: &mut Transport,
    buf: &mut BytesMut,
) -> Result<Connected, CloseReason> {
    let (fixed_header_len, frame_len) = read_frame(io, buf, shared.max_packet_size).await?;
    if buf[0] >> 4 != 1 {
        return Err(CloseReason::ProtocolError);
    }
    let (version, mut frame) = match connect_level(&buf[..frame_len], fixed_header_len) {
        Level::V311 => (Version::V4, buf.split_to(frame_len)),
        Level::V5 => (Version::V5, buf.split_to(frame_len)),
        Level::V31 => {
            let frame = buf.split_to(frame_len);
            match protocol::connect_31_as_311(&frame, fixed_header_len) {
                Some(rewritten) => (Version::V4, rewritten),
                None => return Err(CloseReason::ProtocolError),
            }
        }
        Level::Unknown(level) => {
            shared.metrics.refused.protocol_version.inc();
            info!(listener = %shared.name, level, "refusing a CONNECT with an unknown protocol level");
            // MQTT-3.1.2-2: CONNACK 0x01 and close; a client above level 5 gets MQTT 5's
            // format and code (0x84).
            let connack: &[u8] = if level > 5 {
                &[0x20, 3, 0, 0x84, 0]
            } else {
                &[0x20, 2, 0, 0x01]
            };
            let _ = io.write(BytesMut::from(connack)).await;
            return Err(CloseReason::Refused);
        }
        Level::Malformed => return Err(CloseReason::ProtocolError),
    };
    match protocol::read(version, &mut frame, shared.max_packet_size) {
        Ok(Packet::Connect(connect, props, will, will_props, login)) => Ok(Connected {
            version,
            connect,
            props,
            will,
            will_props,
            login,
        }),
        Ok(_) => Err(CloseReason::ProtocolError),
        Err(e) => Err(frame_error(&e)),
    }
}

pub(super) enum Level {
    V31,
    V311,
    V5,
    Unknown(u8),
    Malformed,
}

pub(super) fn connect_level(frame: &[u8], fixed_header_len: usize) -> Level {
    match protocol::connect_level(frame, fixed_header_len) {
        Some((b"MQTT", 4)) => Level::V311,
        Some((b"MQTT", 5)) => Level::V5,
        Some((b"MQIsdp", 3)) => Level::V31,
        Some((b"MQTT" | b"MQIsdp", level)) => Level::Unknown(level),
        _ => Level::Malformed,
    }
}

/// Refuses a CONNECT with `code`; MQTT 5 devices also get `why` as the reason string.
pub(super) async fn refuse(
    io: &mut Transport,
    version: Version,
    code: ConnectReturnCode,
    why: &str,
) -> CloseReason {
    let mut out = BytesMut::new();
    let ack = ConnAck {
        session_present: false,
        code,
    };
    let props = (version == Version::V5).then(|| ConnAckProperties {
        reason_string: Some(why.to_string()),
        ..ConnAckProperties::default()
    });
    if protocol::write(version, Packet::ConnAck(ack, props), &mut out).is_ok() {
        let _ = io.write(out).await;
    }
    CloseReason::Refused
}

/// Admits a CONNECT (a valid client id, the gateway not stopping, authenticated) and
/// returns its ACL grants, or refuses it with a CONNACK and returns why the connection
/// ends.
pub(super) async fn admit(
    shared: &ListenerShared,
    io: &mut Transport,
    connected: &Connected,
    cn: Option<&str>,
) -> Result<Grants, CloseReason> {
    let (version, connect) = (connected.version, &connected.connect);
    if !protocol::valid_client_id(&connect.client_id)
        || (connect.client_id.is_empty() && version == Version::V4 && !connect.clean_session)
    {
        shared.metrics.refused.invalid_client_id.inc();
        log_refusal(shared, connect, "invalid client id");
        return Err(Box::pin(refuse(
            io,
            version,
            ConnectReturnCode::ClientIdentifierNotValid,
            "client identifier not valid",
        ))
        .await);
    }
    if shared.stopping.load(Ordering::Relaxed) {
        return Err(Box::pin(refuse(
            io,
            version,
            ConnectReturnCode::ServerUnavailable,
            "the gateway is shutting down",
        ))
        .await);
    }
    match Box::pin(authorize(shared, connected, cn)).await {
        Ok(grants) => Ok(grants),
        Err(code) => {
            log_refusal(shared, connect, "not authorized");
            Err(Box::pin(refuse(io, version, code, "not authorized")).await)
        }
    }
}

pub(super) fn log_refusal(shared: &ListenerShared, connect: &Connect, why: &str) {
    info!(
        listener = %shared.name,
        client_id = %connect.client_id.escape_debug(),
        reason = why,
        "refusing device connection"
    );
}

/// Authenticates the device and settles its ACL grants; the `Err` is the CONNACK code
/// refusing it.
async fn authorize(
    shared: &ListenerShared,
    connected: &Connected,
    cn: Option<&str>,
) -> Result<Grants, ConnectReturnCode> {
    let security = shared.security.read().clone();
    let has_certificate = cn.is_some();
    let anonymous_ok = shared.allow_anonymous;
    let login = connected
        .login
        .as_ref()
        .map(|l| (l.username.clone(), l.password.clone()));
    let result = if login.is_some() && security.users.is_some() {
        // argon2 takes tens of milliseconds: off the async workers, a few at a time.
        let _slot = VERIFY_SLOTS.acquire().await.ok();
        let security = security.clone();
        tokio::task::spawn_blocking(move || {
            let credentials = login.as_ref().map(|(u, p)| (u.as_str(), p.as_bytes()));
            security.authenticate(credentials, has_certificate, anonymous_ok)
        })
        .await
        .unwrap_or(Err(Refusal::BadCredentials))
    } else {
        let credentials = login.as_ref().map(|(u, p)| (u.as_str(), p.as_bytes()));
        security.authenticate(credentials, has_certificate, anonymous_ok)
    };
    let refused = &shared.metrics.refused;
    let username = match result {
        Ok(username) => username,
        Err(Refusal::BadCredentials) => {
            refused.bad_credentials.inc();
            return Err(ConnectReturnCode::BadUserNamePassword);
        }
        Err(Refusal::Anonymous) => {
            refused.not_authorized.inc();
            return Err(ConnectReturnCode::NotAuthorized);
        }
    };
    let identity = Identity {
        username,
        client_id: connected.connect.client_id.clone(),
        cn: cn.map(str::to_string),
    };
    let grants = security.grants(&identity);
    if let Some(will) = &connected.will {
        let allowed = std::str::from_utf8(&will.topic)
            .map(|t| grants.may_publish(t))
            .unwrap_or(false);
        if !allowed {
            shared.metrics.acl_denied.inc();
            refused.not_authorized.inc();
            return Err(ConnectReturnCode::NotAuthorized);
        }
    }
    Ok(grants)
}
