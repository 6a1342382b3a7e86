//! What a device receives: the router's notifications for its subscriptions, delivered
//! at the right QoS with MQTT 5 options, and the router's acks for its own publishes.

use super::*;

impl Session {
    pub(super) async fn on_notification(
        &mut self,
        notification: Notification,
        wake: &mut bool,
    ) -> Result<(), CloseReason> {
        match notification {
            Notification::Forward(forward) => self.deliver(forward).await,
            notification @ Notification::DeviceAck(_) => {
                // rumqttd does not export its ack type; its conversion gives the packet.
                let packet: Option<Packet> = notification.into();
                match packet {
                    Some(packet) => self.on_router_ack(packet).await,
                    None => Ok(()),
                }
            }
            Notification::Unschedule => {
                *wake = true;
                Ok(())
            }
            Notification::Disconnect(d, _) => {
                warn!(listener = %self.shared.name, client_id = %self.client_id.escape_debug(), reason = ?d.reason_code, "the router ended the device's link");
                Err(CloseReason::Router)
            }
            _ => Ok(()),
        }
    }

    /// What the router answers on the connection's link.
    pub(super) async fn on_router_ack(&mut self, packet: Packet) -> Result<(), CloseReason> {
        match packet {
            Packet::SubAck(mut ack, props) => {
                for (i, code) in self.denied_filters.remove(&ack.pkid).unwrap_or_default() {
                    let at = i.min(ack.return_codes.len());
                    ack.return_codes.insert(at, code);
                }
                self.write(Packet::SubAck(ack, props))
            }
            Packet::PubRel(rel, _) => {
                let pkid = rel.pkid;
                if self.self_pubrel.remove(&pkid) {
                    let comp = PubComp {
                        pkid,
                        reason: PubCompReason::Success,
                    };
                    self.router_comps
                        .push_back((pkid, Some(Packet::PubComp(comp, None))));
                    self.send_ready_acks().await
                } else {
                    self.router_comps.push_back((pkid, None));
                    self.write(Packet::PubRel(
                        PubRel {
                            pkid,
                            reason: PubRelReason::Success,
                        },
                        None,
                    ))
                }
            }
            // CONNACK (read at link setup), UNSUBACK (answered by the connection),
            // PINGRESP (likewise): nothing for the device.
            _ => Ok(()),
        }
    }

    /// The ack the connection gives the router for a delivery the device will not ack
    /// (downgraded to QoS 0, or expired); a QoS 2 one's PUBREL is answered here too.
    pub(super) fn self_answer(&mut self, pkid: u16, sub_qos: u8) -> Packet {
        if sub_qos != 1 {
            self.self_pubrel.insert(pkid);
        }
        ack_packet(sub_qos, pkid, false)
    }

    /// Writes a delivery at min(published QoS, subscription QoS).
    pub(super) async fn deliver(&mut self, forward: Forward) -> Result<(), CloseReason> {
        let Forward {
            mut publish,
            properties,
            ..
        } = forward;
        let (marks, mut properties) = links::take_marks(properties);
        let published_qos = marks.qos;
        // Subscription options: no local, retain as published, retain handling (most
        // sessions have none: no per-delivery work then).
        let mut skipped = false;
        let topic = self
            .subscriptions
            .active()
            .then(|| std::str::from_utf8(&publish.topic).ok())
            .flatten();
        if let Some(topic) = topic {
            let own = marks.origin.as_deref() == Some(self.key.as_str());
            match self
                .subscriptions
                .verdict(topic, publish.retain, own, marks.retained)
            {
                Verdict::Deliver { retain } => publish.retain = retain,
                Verdict::Skip => skipped = true,
            }
        }
        // MQTT 5 message expiry: the time spent in the gateway is subtracted; an expired
        // message is not delivered (the router still gets its ack).
        let mut expired = false;
        if let (Some(p), Some(arrived)) = (properties.as_mut(), marks.arrived) {
            if let Some(expiry) = p.message_expiry_interval {
                let spent = now_millis().saturating_sub(arrived) / 1000;
                match u32::try_from(spent) {
                    Ok(spent) if spent < expiry => p.message_expiry_interval = Some(expiry - spent),
                    _ => expired = true,
                }
            }
        }
        let mut frame = BytesMut::new();
        protocol::write(
            self.version,
            Packet::Publish(publish.clone(), properties.clone()),
            &mut frame,
        )
        .map_err(|_| CloseReason::ProtocolError)?;
        let header = v4::check(frame.iter(), usize::MAX).map_err(|_| CloseReason::ProtocolError)?;
        let (sub_qos, pkid) = protocol::publish_qos_pkid(&frame, header.fixed_header_len)
            .ok_or(CloseReason::ProtocolError)?;
        let too_large = frame.len() > self.device_max_packet;
        if too_large {
            debug!(listener = %self.shared.name, client_id = %self.client_id.escape_debug(), bytes = frame.len(), max = self.device_max_packet, "a delivery is over the device's maximum packet size; dropped");
        }
        if expired || skipped || too_large {
            if sub_qos > 0 {
                let answer = self.self_answer(pkid, sub_qos);
                self.router_acks.push_back((pkid, Some(answer)));
                return self.send_ready_acks().await;
            }
            return Ok(());
        }
        let qos = published_qos.min(sub_qos);
        if qos == sub_qos {
            self.out.extend_from_slice(&frame);
            if sub_qos > 0 {
                self.router_acks.push_back((pkid, None));
            }
            return Ok(());
        }
        if qos == 0 {
            let publish = Publish::new(publish.topic, publish.payload, publish.retain);
            self.write(Packet::Publish(publish, properties))?;
            let answer = self.self_answer(pkid, sub_qos);
            self.router_acks.push_back((pkid, Some(answer)));
            return self.send_ready_acks().await;
        }
        // QoS 1 for a QoS 2 subscription: the same frame with the QoS bits changed.
        frame[0] = (frame[0] & !0b0110) | 0b0010;
        self.out.extend_from_slice(&frame);
        self.downgraded.insert(pkid);
        self.router_acks.push_back((pkid, None));
        Ok(())
    }
}
