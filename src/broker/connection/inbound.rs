//! What a device sends: each packet of a session (PUBLISH and its acks, SUBSCRIBE,
//! UNSUBSCRIBE, PING, DISCONNECT), the grants checked, and publishes taken into intake
//! with their acks in publish order.

use super::*;

impl Session {
    pub(super) async fn on_packet(
        &mut self,
        packet: Packet,
        (qos, pkid): (u8, u16),
        claim: &Claim,
    ) -> Result<(), CloseReason> {
        match packet {
            Packet::Publish(publish, props) => {
                self.on_publish(publish, props, qos, pkid, claim).await
            }
            Packet::PubAck(ack, _) => {
                let answer = if self.downgraded.remove(&ack.pkid) {
                    self.self_pubrel.insert(ack.pkid);
                    ack_packet(2, ack.pkid, false)
                } else {
                    Packet::PubAck(ack, None)
                };
                self.router_ack(answer).await
            }
            Packet::PubRec(rec, _) => self.router_ack(Packet::PubRec(rec, None)).await,
            Packet::PubComp(comp, _) => {
                let pkid = comp.pkid;
                if let Some(entry) = self
                    .router_comps
                    .iter_mut()
                    .find(|(p, a)| *p == pkid && a.is_none())
                {
                    entry.1 = Some(Packet::PubComp(comp, None));
                }
                self.send_ready_acks().await
            }
            Packet::PubRel(rel, _) => {
                let known = self.inbound_qos2.remove(&rel.pkid);
                let reason = if known || self.version == Version::V4 {
                    PubCompReason::Success
                } else {
                    PubCompReason::PacketIdentifierNotFound
                };
                self.write(Packet::PubComp(
                    PubComp {
                        pkid: rel.pkid,
                        reason,
                    },
                    None,
                ))
            }
            Packet::Subscribe(subscribe, props) => self.on_subscribe(subscribe, props).await,
            Packet::Unsubscribe(unsubscribe, props) => {
                let pkid = unsubscribe.pkid;
                let count = unsubscribe.filters.len();
                for path in &unsubscribe.filters {
                    self.subscriptions.unsubscribe(path);
                }
                if self.persistent {
                    self.shared
                        .links
                        .persist
                        .unsubscribe(&self.key, &unsubscribe.filters);
                }
                if let Some(link) = &self.link {
                    let id = link.id;
                    self.shared
                        .links
                        .send(id, Packet::Unsubscribe(unsubscribe, props))
                        .await
                        .map_err(|_| CloseReason::Router)?;
                }
                // rumqttd answers only filters it had: every UNSUBSCRIBE is answered
                // here, and the router's UNSUBACK is dropped.
                self.write(Packet::UnsubAck(
                    UnsubAck {
                        pkid,
                        reasons: vec![UnsubAckReason::Success; count],
                    },
                    None,
                ))
            }
            Packet::PingReq(_) => self.write(Packet::PingResp(PingResp)),
            Packet::Disconnect(disconnect, _) => {
                if disconnect.reason_code != DisconnectReasonCode::DisconnectWithWillMessage {
                    self.will = None;
                }
                Err(CloseReason::ClientDisconnect)
            }
            _ => Err(CloseReason::ProtocolError),
        }
    }

    pub(super) async fn on_subscribe(
        &mut self,
        mut subscribe: Subscribe,
        props: Option<SubscribeProperties>,
    ) -> Result<(), CloseReason> {
        if subscribe.filters.is_empty() {
            return Err(CloseReason::ProtocolError);
        }
        let v5 = self.version == Version::V5;
        let mut denied = Vec::new();
        for (i, f) in subscribe.filters.iter().enumerate() {
            let code = if !valid_filter(&f.path) {
                Some(if v5 {
                    SubscribeReasonCode::TopicFilterInvalid
                } else {
                    SubscribeReasonCode::Failure
                })
            } else if !self.grants.may_subscribe(&f.path) {
                self.shared.metrics.acl_denied.inc();
                Some(if v5 {
                    SubscribeReasonCode::NotAuthorized
                } else {
                    SubscribeReasonCode::Failure
                })
            } else {
                None
            };
            if let Some(code) = code {
                denied.push((i, code));
            }
        }
        if !denied.is_empty() {
            debug!(listener = %self.shared.name, client_id = %self.client_id.escape_debug(), denied = denied.len(), "subscription refused");
        }
        if denied.len() == subscribe.filters.len() {
            let return_codes = denied.into_iter().map(|(_, c)| c).collect();
            return self.write(Packet::SubAck(
                SubAck {
                    pkid: subscribe.pkid,
                    return_codes,
                },
                None,
            ));
        }
        for &(i, _) in denied.iter().rev() {
            subscribe.filters.remove(i);
        }
        if !denied.is_empty() {
            self.denied_filters.insert(subscribe.pkid, denied);
        }
        self.open_link().await?;
        for f in &subscribe.filters {
            self.subscriptions.subscribe(f);
        }
        if self.subscriptions.wants_origin() {
            self.shared.links.want_origin();
        }
        if self.persistent {
            let filters = subscribe
                .filters
                .iter()
                .map(|f| (f.path.clone(), Subscription::of(f)))
                .collect();
            self.shared.links.session_subscribed(&self.key, filters);
        }
        let Some(id) = self.link.as_ref().map(|l| l.id) else {
            return Err(CloseReason::Router);
        };
        self.shared
            .links
            .send(id, Packet::Subscribe(subscribe, props))
            .await
            .map_err(|_| CloseReason::Router)
    }

    pub(super) async fn on_publish(
        &mut self,
        mut publish: Publish,
        mut props: Option<PublishProperties>,
        qos: u8,
        pkid: u16,
        claim: &Claim,
    ) -> Result<(), CloseReason> {
        let topic = self.publish_topic(&mut publish, &mut props)?;
        if !self.grants.may_publish(&topic) {
            self.shared.metrics.acl_denied.inc();
            debug!(listener = %self.shared.name, client_id = %self.client_id.escape_debug(), topic = %topic.escape_debug(), "publish denied by the ACL");
            // 3.1.1 gets a plain ack (it has no way to say no), 5 "not authorized".
            if qos > 0 {
                self.ack_in_order(ack_packet(qos, pkid, self.version == Version::V5));
            }
            return Ok(());
        }
        if self.shared.stopping.load(Ordering::Relaxed) {
            // Shutting down: the device's unacked messages go to the next start.
            return Err(CloseReason::Shutdown);
        }
        if qos == 2 && !self.inbound_qos2.insert(pkid) {
            // A resent QoS 2 publish (its PUBREC was lost): taken once already.
            self.ack_in_order(ack_packet(qos, pkid, false));
            return Ok(());
        }
        let msg = Message {
            topic,
            payload: publish.payload.clone(),
            qos,
            retain: publish.retain,
            properties: props.as_ref().and_then(protocol::properties_of),
            received_at: now_millis(),
        };
        self.take_in(msg, qos, claim).await?;
        // Local subscribers: the message keeps its own QoS in a property.
        if let Err(e) = self
            .shared
            .links
            .publish(
                publish.topic,
                publish.payload,
                publish.retain,
                qos,
                props,
                Some(&self.key),
            )
            .await
        {
            warn!(listener = %self.shared.name, error = %e, "cannot pass a message to local subscribers");
            return Err(CloseReason::Router);
        }
        if qos > 0 {
            self.ack_in_order(ack_packet(qos, pkid, false));
        }
        Ok(())
    }

    /// A PUBLISH's topic: an MQTT 5 topic alias resolved (or set), checked to be a valid
    /// topic name. Properties a device must not send (subscription identifiers, a spoofed
    /// QoS marker) are dropped from `props`. `Err`: a protocol error (counted).
    fn publish_topic(
        &mut self,
        publish: &mut Publish,
        props: &mut Option<PublishProperties>,
    ) -> Result<String, CloseReason> {
        let invalid = |shared: &ListenerShared| {
            shared.metrics.invalid.inc();
            CloseReason::ProtocolError
        };
        if let Some(p) = props.as_mut() {
            if let Some(alias) = p.topic_alias.take() {
                if alias == 0 || alias > TOPIC_ALIAS_MAX {
                    return Err(invalid(&self.shared));
                }
                if publish.topic.is_empty() {
                    match self.aliases.get(&alias) {
                        Some(t) => publish.topic = t.clone(),
                        None => return Err(invalid(&self.shared)),
                    }
                } else {
                    self.aliases.insert(alias, publish.topic.clone());
                }
            }
            p.subscription_identifiers.clear();
            p.user_properties.retain(|(k, _)| !links::is_mark(k));
        }
        match std::str::from_utf8(&publish.topic) {
            Ok(t) if !t.is_empty() && !t.contains(['+', '#', '\0']) => Ok(t.to_string()),
            _ => Err(invalid(&self.shared)),
        }
    }

    /// Hands a message to intake (QoS 0 is shed above the high-water mark, counted).
    pub(super) async fn take_in(
        &mut self,
        msg: Message,
        qos: u8,
        claim: &Claim,
    ) -> Result<(), CloseReason> {
        let metrics = &self.shared.metrics;
        let intake = &self.shared.intake;
        if qos == 0 {
            let queued = intake.max_capacity() - intake.capacity();
            if queued >= self.shared.qos0_high_water {
                metrics.qos0_shed.inc();
                return Ok(());
            }
        }
        let ack = match (&self.tracker, qos) {
            (Some(tracker), 1 | 2) => {
                self.next_seq += 1;
                Some(AckTicket {
                    tracker: tracker.clone(),
                    seq: self.next_seq,
                })
            }
            _ => None,
        };
        let item = IntakeItem {
            listener: self.shared.index,
            msg,
            client_id: self.client_id.clone(),
            ack,
        };
        if qos == 0 {
            match intake.try_send(item) {
                Ok(()) => metrics.received.inc(),
                Err(_) => metrics.qos0_shed.inc(),
            }
            return Ok(());
        }
        // QoS 1/2: a full intake queue holds this device back (its acks wait too).
        tokio::select! {
            sent = intake.send(item) => match sent {
                Ok(()) => {
                    metrics.received.inc();
                    Ok(())
                }
                Err(_) => Err(CloseReason::Shutdown),
            },
            _ = claim.kick.cancelled() => Err(CloseReason::TakenOver),
            _ = self.shared.shutdown.cancelled() => Err(CloseReason::Shutdown),
        }
    }

    /// Queues an ack behind those still withheld (acks go out in publish order), or
    /// writes it at once when none is.
    pub(super) fn ack_in_order(&mut self, packet: Packet) {
        if self.tracker.is_none() && self.pending.is_empty() {
            let _ = self.write(packet);
            return;
        }
        self.pending.push_back(PendingAck {
            seq: self.next_seq,
            since: Instant::now(),
            packet,
        });
    }

    /// Writes every withheld ack whose message is now durable.
    pub(super) fn write_released(&mut self) -> Result<(), CloseReason> {
        let upto = self.tracker.as_ref().map_or(u64::MAX, |t| t.durable_upto());
        while self.pending.front().is_some_and(|p| p.seq <= upto) {
            if let Some(p) = self.pending.pop_front() {
                self.write(p.packet)?;
            }
        }
        Ok(())
    }
}
