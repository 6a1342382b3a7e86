//! A device session's loop: reading packets and router notifications, writing what is
//! due, the in-flight and outbound limits, and how a session ends (its link closed, its
//! will published or dropped).

use super::*;

impl Session {
    pub(super) fn write(&mut self, packet: Packet) -> Result<(), CloseReason> {
        protocol::write(self.version, packet, &mut self.out).map_err(|e| {
            warn!(listener = %self.shared.name, error = ?e, "cannot encode a packet for a device; closing");
            CloseReason::ProtocolError
        })
    }

    pub(super) fn inflight_full(&self) -> bool {
        self.pending.len() >= self.receive_max as usize
    }

    /// Deliveries the device has not acked (PUBACK / PUBREC, then PUBCOMP).
    pub(super) fn outbound_full(&self) -> bool {
        let waiting = self.router_acks.iter().filter(|(_, a)| a.is_none()).count()
            + self
                .router_comps
                .iter()
                .filter(|(_, a)| a.is_none())
                .count();
        waiting >= self.device_receive_max as usize
    }

    /// Serves the device from its CONNACK until the connection ends, and says why.
    pub(super) async fn run(
        &mut self,
        io: &mut Transport,
        buf: &mut BytesMut,
        keep_alive: u16,
        claim: &Claim,
        peer: SocketAddr,
    ) -> CloseReason {
        let keep_alive = match Box::pin(self.start(keep_alive, peer)).await {
            Ok(keep_alive) => keep_alive,
            Err(reason) => return reason,
        };
        let mut last_read = Instant::now();
        let far = Duration::from_secs(86_400 * 365);
        loop {
            if let Err(reason) = self.handle_buffered(io, buf, claim).await {
                return reason;
            }
            if let Err(reason) = Box::pin(self.flush(io)).await {
                return reason;
            }
            // Give a large packet's memory back once it is handled.
            if buf.is_empty() && buf.capacity() > 4096 {
                *buf = BytesMut::new();
            }
            let front = self.pending.front().map(|p| (p.seq, p.since));
            let tracker = self.tracker.clone();
            let durable = async {
                match (front, tracker) {
                    (Some((seq, _)), Some(t)) => t.released(seq).await,
                    (Some(_), None) => true,
                    _ => std::future::pending().await,
                }
            };
            let ack_deadline = front.map_or(Instant::now() + far, |(_, since)| {
                since + DURABLE_ACK_TIMEOUT
            });
            let reading = !self.inflight_full();
            if !reading {
                // The gateway is not reading (the window is full): the device's silence
                // is not its own, so its keep-alive starts over once reading resumes.
                last_read = Instant::now();
            }
            let idle_deadline = last_read + keep_alive.unwrap_or(far);
            tokio::select! {
                biased;
                _ = claim.kick.cancelled() => {
                    Box::pin(self.disconnect(io, DisconnectReasonCode::SessionTakenOver)).await;
                    return CloseReason::TakenOver;
                }
                _ = self.shared.shutdown.cancelled() => {
                    Box::pin(self.disconnect(io, DisconnectReasonCode::ServerShuttingDown)).await;
                    return CloseReason::Shutdown;
                }
                released = durable => {
                    if !released {
                        warn!(listener = %self.shared.name, client_id = %self.client_id.escape_debug(), "a message could not be stored; closing so the device resends");
                        return CloseReason::StoreFailed;
                    }
                    if let Err(reason) = self.write_released() {
                        return reason;
                    }
                }
                n = next_notification(&mut self.link), if !self.outbound_full() => {
                    if let Err(reason) = Box::pin(self.on_notifications(n, io)).await {
                        return reason;
                    }
                }
                read = io.read(buf), if reading => {
                    match read {
                        Ok(0) | Err(_) => return CloseReason::PeerClosed,
                        Ok(_) => last_read = Instant::now(),
                    }
                }
                _ = tokio::time::sleep_until(ack_deadline) => {
                    debug!(listener = %self.shared.name, "message not durable in time; withholding its ack and closing");
                    return CloseReason::DurableTimeout;
                }
                _ = tokio::time::sleep_until(idle_deadline) => {
                    Box::pin(self.disconnect(io, DisconnectReasonCode::KeepAliveTimeout)).await;
                    return CloseReason::KeepAlive;
                }
            }
        }
    }

    /// Joins the session to the router (resuming a persistent one) and writes the
    /// CONNACK. Returns the keep-alive the device is held to: 1.5 times its keep alive
    /// (MQTT 5: the listener's limit, which the CONNACK tells it), `None` for none.
    async fn start(
        &mut self,
        keep_alive: u16,
        peer: SocketAddr,
    ) -> Result<Option<Duration>, CloseReason> {
        let start = self.shared.links.session(&self.key, !self.persistent);
        if start.discard {
            if let Err(e) = self.shared.links.discard(&self.key).await {
                warn!(listener = %self.shared.name, error = %e, "cannot drop an old session from the router");
                return Err(CloseReason::Router);
            }
        }
        let session_present = start.present;
        if session_present {
            self.subscriptions = self.shared.links.take_options(&self.key);
        }
        if start.subscribed {
            Box::pin(self.open_link()).await?;
        }
        // MQTT 5 server keep alive: the device is told the listener's limit and held to
        // it. A 3.1.x device cannot be told, so it keeps its own.
        let server_keep_alive = match (self.version, self.shared.max_keep_alive) {
            (Version::V5, Some(max)) if keep_alive == 0 || keep_alive > max => Some(max),
            _ => None,
        };
        let keep_alive = server_keep_alive.unwrap_or(keep_alive);
        let props =
            (self.version == Version::V5).then(|| self.connack_properties(server_keep_alive));
        let ack = ConnAck {
            session_present,
            code: ConnectReturnCode::Success,
        };
        self.write(Packet::ConnAck(ack, props))?;
        debug!(listener = %self.shared.name, %peer, client_id = %self.client_id.escape_debug(), "device connected");
        Ok((keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500)))
    }

    /// An MQTT 5 CONNACK's properties: the listener's limits.
    fn connack_properties(&self, server_keep_alive: Option<u16>) -> ConnAckProperties {
        ConnAckProperties {
            session_expiry_interval: None,
            receive_max: Some(self.shared.max_inflight),
            max_qos: None,
            retain_available: None,
            max_packet_size: u32::try_from(self.shared.max_packet_size).ok(),
            assigned_client_identifier: None,
            topic_alias_max: Some(TOPIC_ALIAS_MAX),
            reason_string: None,
            user_properties: Vec::new(),
            wildcard_subscription_available: None,
            subscription_identifiers_available: None,
            shared_subscription_available: None,
            server_keep_alive,
            response_information: None,
            server_reference: None,
            authentication_method: None,
            authentication_data: None,
        }
    }

    /// Handles every complete packet in `buf`, as far as the in-flight window allows.
    /// `Err`: the connection ends, for that reason (the device told why, if it can be).
    async fn handle_buffered(
        &mut self,
        io: &mut Transport,
        buf: &mut BytesMut,
        claim: &Claim,
    ) -> Result<(), CloseReason> {
        while !self.inflight_full() {
            match self.next_packet(buf) {
                Ok(Some((packet, meta))) => {
                    if let Err(reason) = Box::pin(self.on_packet(packet, meta, claim)).await {
                        if reason == CloseReason::ClientDisconnect {
                            Box::pin(self.flush(io)).await.ok();
                        }
                        return Err(self.closing(io, reason).await);
                    }
                }
                Ok(None) => break,
                Err(reason) => return Err(self.closing(io, reason).await),
            }
        }
        Ok(())
    }

    /// Router notifications: `first`, and those already waiting after it (up to
    /// `NOTIFICATION_BATCH`, while the device's window has room), written in one flush.
    async fn on_notifications(
        &mut self,
        first: Result<Option<Notification>, rumqttd::local::LinkError>,
        io: &mut Transport,
    ) -> Result<(), CloseReason> {
        let mut next = Some(first);
        let mut wake = false;
        let mut handled = 0;
        while let Some(n) = next.take() {
            match n {
                Ok(Some(notification)) => {
                    Box::pin(self.on_notification(notification, &mut wake)).await?;
                }
                Ok(None) => break,
                Err(_) => return Err(CloseReason::Router),
            }
            handled += 1;
            if handled < NOTIFICATION_BATCH && !self.outbound_full() {
                if let Some(link) = self.link.as_mut() {
                    next = link.rx.next().now_or_never();
                }
            }
        }
        Box::pin(self.flush(io)).await?;
        if wake {
            if let Some(link) = &self.link {
                if Box::pin(link.rx.wake()).await.is_err() {
                    return Err(CloseReason::Router);
                }
            }
        }
        Ok(())
    }

    pub(super) async fn flush(&mut self, io: &mut Transport) -> Result<(), CloseReason> {
        if self.out.is_empty() {
            return Ok(());
        }
        let data = self.out.split();
        // Do not keep a large delivery's buffer for an idle connection.
        if self.out.capacity() > 16 * 1024 {
            self.out = BytesMut::new();
        }
        // A device that stops reading must not hold its task (and so a takeover or
        // the shutdown) forever.
        tokio::select! {
            written = io.write(data) => written.map_err(|_| CloseReason::PeerClosed),
            _ = self.kick.cancelled() => Err(CloseReason::TakenOver),
            _ = self.shared.shutdown.cancelled() => Err(CloseReason::Shutdown),
        }
    }

    /// Ends the connection for a fault of the device's: MQTT 5 devices are told why.
    pub(super) async fn closing(&mut self, io: &mut Transport, reason: CloseReason) -> CloseReason {
        let code = match reason {
            CloseReason::ProtocolError => Some(DisconnectReasonCode::ProtocolError),
            CloseReason::PacketTooLarge => Some(DisconnectReasonCode::PacketTooLarge),
            CloseReason::Shutdown => Some(DisconnectReasonCode::ServerShuttingDown),
            CloseReason::TakenOver => Some(DisconnectReasonCode::SessionTakenOver),
            _ => None,
        };
        if let Some(code) = code {
            Box::pin(self.disconnect(io, code)).await;
        }
        reason
    }

    /// MQTT 5 devices are told why the server closes.
    pub(super) async fn disconnect(
        &mut self,
        io: &mut Transport,
        reason_code: DisconnectReasonCode,
    ) {
        if self.version == Version::V5 {
            let why = match reason_code {
                DisconnectReasonCode::SessionTakenOver => {
                    "another connection took this client id over"
                }
                DisconnectReasonCode::ServerShuttingDown => "the gateway is shutting down",
                DisconnectReasonCode::KeepAliveTimeout => {
                    "no packet within 1.5 times the keep alive"
                }
                DisconnectReasonCode::PacketTooLarge => {
                    "packet over the listener's maximum packet size"
                }
                _ => "protocol error",
            };
            let props = DisconnectProperties {
                session_expiry_interval: None,
                reason_string: Some(why.to_string()),
                user_properties: Vec::new(),
                server_reference: None,
            };
            let packet = Packet::Disconnect(Disconnect { reason_code }, Some(props));
            if self.write(packet).is_ok() {
                let data = self.out.split();
                let _ = tokio::time::timeout(CLOSE_WAIT, io.write(data)).await;
            }
        }
    }

    /// The next complete packet in `buf`, if any.
    pub(super) fn next_packet(
        &mut self,
        buf: &mut BytesMut,
    ) -> Result<Option<(Packet, PublishMeta)>, CloseReason> {
        let max = self.shared.max_packet_size;
        let (fixed_header_len, frame_len) = match v4::check(buf.iter(), max) {
            Ok(header) => (header.fixed_header_len, header.frame_length()),
            Err(Error::InsufficientBytes(n)) => {
                buf.reserve(n);
                return Ok(None);
            }
            Err(e) => return Err(frame_error(&e)),
        };
        let packet_type = buf[0] >> 4;
        if packet_type == 1 || protocol::server_only(packet_type) {
            debug!(listener = %self.shared.name, packet_type, "a device sent a packet it must not send; closing");
            return Err(CloseReason::ProtocolError);
        }
        // QoS and packet id of a PUBLISH (rumqttd keeps them crate-private).
        let meta = if packet_type == 3 {
            match protocol::publish_qos_pkid(&buf[..frame_len], fixed_header_len) {
                Some(meta @ (0..=2, _)) => meta,
                _ => return Err(CloseReason::ProtocolError),
            }
        } else {
            (0, 0)
        };
        match protocol::read(self.version, buf, max) {
            Ok(packet) => Ok(Some((packet, meta))),
            Err(e) => {
                self.shared.metrics.invalid.inc();
                Err(frame_error(&e))
            }
        }
    }

    /// The device acked a delivery: the router gets the ack once every earlier one is
    /// known (rumqttd refuses acks out of order).
    pub(super) async fn router_ack(&mut self, answer: Packet) -> Result<(), CloseReason> {
        let pkid = match &answer {
            Packet::PubAck(a, _) => a.pkid,
            Packet::PubRec(r, _) => r.pkid,
            _ => return Ok(()),
        };
        if let Some(entry) = self
            .router_acks
            .iter_mut()
            .find(|(p, a)| *p == pkid && a.is_none())
        {
            entry.1 = Some(answer);
        }
        self.send_ready_acks().await
    }

    pub(super) async fn send_ready_acks(&mut self) -> Result<(), CloseReason> {
        let Some(id) = self.link.as_ref().map(|l| l.id) else {
            return Ok(());
        };
        while let Some((_, Some(_))) = self.router_acks.front() {
            if let Some((_, Some(packet))) = self.router_acks.pop_front() {
                self.shared
                    .links
                    .send(id, packet)
                    .await
                    .map_err(|_| CloseReason::Router)?;
            }
        }
        while let Some((_, Some(_))) = self.router_comps.front() {
            if let Some((_, Some(packet))) = self.router_comps.pop_front() {
                self.shared
                    .links
                    .send(id, packet)
                    .await
                    .map_err(|_| CloseReason::Router)?;
            }
        }
        Ok(())
    }

    pub(super) async fn open_link(&mut self) -> Result<(), CloseReason> {
        if self.link.is_some() {
            return Ok(());
        }
        match self.shared.links.open(&self.key, !self.persistent).await {
            Ok((id, rx)) => {
                self.link = Some(OwnLink { id, rx });
                Ok(())
            }
            Err(e) => {
                warn!(listener = %self.shared.name, error = %e, "cannot join a device to the router");
                Err(CloseReason::Router)
            }
        }
    }

    /// Closes the link and, on an abnormal end, publishes the will.
    pub(super) async fn end(&mut self, reason: CloseReason, claim: &Claim) {
        if let (true, Some((will, props))) = (reason.abnormal(), self.will.take()) {
            let delay = props.as_ref().and_then(|p| p.delay_interval).unwrap_or(0);
            if delay == 0 {
                publish_will(&self.shared, &self.client_id, will, props).await;
            } else {
                // MQTT 5 will delay: published later unless the client id connects
                // again meanwhile (a takeover by that new connection included).
                let shared = self.shared.clone();
                let client_id = self.client_id.clone();
                let Some(pending) = shared.links.delay_will(&self.key, claim.generation) else {
                    return self.close_link(claim).await;
                };
                tokio::spawn(async move {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(u64::from(delay))) => {}
                        () = shared.shutdown.cancelled() => {}
                    }
                    if pending.due() {
                        publish_will(&shared, &client_id, will, props).await;
                    }
                });
            }
        }
        self.close_link(claim).await;
    }

    pub(super) async fn close_link(&mut self, claim: &Claim) {
        if self.persistent {
            self.shared
                .links
                .keep_options(&self.key, std::mem::take(&mut self.subscriptions));
            self.shared
                .links
                .session_ended(&self.key, self.session_expiry);
        }
        if let Some(link) = self.link.take() {
            self.shared.links.close(link.id).await;
        }
        self.shared.links.release(&self.key, claim.generation);
    }
}
