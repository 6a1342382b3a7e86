//! One upstream connection's delivery loop, from CONNACK to its end: one `select!` over
//! shutdown, the link's events (acks, refusals, the connection's end), the SAS renewal,
//! the failback, the half-open check, the packer's linger, reading the buffer and the
//! pacer. Each branch is a method of [`Conn`], the connection's state; a method that ends
//! the connection returns `Some(Ended)`.

use super::*;
use crate::sinks::Pacer;

/// Runs one connection (its rumqttc driver started by `session`) until it ends.
pub(super) async fn connection(
    plan: &MqttPlan,
    ctx: &SinkContext,
    client: &Client,
    events: mpsc::Receiver<Result<LinkEvent, LinkError>>,
    backoff: &mut Backoff,
    renew_at: Option<Instant>,
    feed: &mut Feed<'_>,
) -> Ended {
    let stop = feed.source.stop();
    let failback = feed.failback;
    let mut ack_check =
        tokio::time::interval((plan.ack_timeout / 4).max(Duration::from_millis(100)));
    ack_check.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut c = Conn {
        plan,
        ctx,
        client,
        events,
        backoff,
        feed,
        upstream: format!("{}:{}", plan.host, plan.port),
        max_packet: plan.max_packet_size,
        window: Window::default(),
        ready: VecDeque::new(),
        pacer: ctx.pacer(),
        connected_at: None,
        renewing: None,
        throttled: false,
        last_progress: Instant::now(),
        packer: plan
            .pack
            .clone()
            .map(|p| Packer::new(p, plan.inflight as usize)),
        packed: VecDeque::new(),
    };
    loop {
        let window_size = c.window_size();
        if let Some(deadline) = c.renewing {
            if c.window.len() == 0 || Instant::now() >= deadline {
                c.disconnect().await;
                break if c.throttled {
                    Ended::Throttled
                } else {
                    Ended::Again
                };
            }
        }
        let (refill, read) = c.refill(window_size);
        let linger = c.packer.as_ref().and_then(|p| p.next_deadline());
        let paced_until = c.paced_until(window_size);
        let connected = c.connected_at.is_some();
        let ended = tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => Some(c.drain_and_disconnect().await),
            // Another connection of the group failed: all reconnect, and what is
            // unconfirmed here is resent after the rewind.
            _ = cancelled_some(stop.as_ref()) => Some(Ended::Failed),
            event = c.events.recv() => match event {
                Some(Ok(event)) => c.on_event(event).await,
                Some(Err(e)) => Some(c.on_error(e).await),
                None => Some(Ended::Failed),
            },
            _ = sleep_until_some(renew_at), if c.renewing.is_none() && renew_at.is_some() => {
                c.renew_token();
                None
            }
            _ = cancelled_some(failback), if c.renewing.is_none() && failback.is_some() => {
                // The primary answers again (`sinks::failover`): leave this endpoint the
                // way a SAS renewal does.
                let grace = (plan.ack_timeout / 2).min(failover::FAILBACK_GRACE);
                c.renewing = Some(Instant::now() + grace);
                None
            }
            _ = sleep_until_some(c.renewing), if c.renewing.is_some() => None,
            _ = ack_check.tick(), if connected && c.window.len() > 0 => c.half_open(),
            _ = pack::linger_until(linger), if linger.is_some() && c.renewing.is_none() => {
                c.close_lingering().await
            }
            batch = c.feed.source.read_batch(&ctx.buffer, read), if connected && refill => {
                c.take(batch, window_size).await
            }
            // The pacer's wait is a branch of its own, so acks, shutdown and the half-open
            // check go on while it holds records back.
            _ = sleep_until_some(paced_until),
                if connected && c.renewing.is_none() && paced_until.is_some() =>
            {
                c.send_ready(window_size).await
            }
        };
        if let Some(ended) = ended {
            break ended;
        }
    }
}

/// One connection's state; dropped with it.
struct Conn<'a, 'f> {
    plan: &'a MqttPlan,
    ctx: &'a SinkContext,
    client: &'a Client,
    events: mpsc::Receiver<Result<LinkEvent, LinkError>>,
    backoff: &'a mut Backoff,
    feed: &'a mut Feed<'f>,
    /// `host:port`, for the log and the status.
    upstream: String,
    /// The largest packet the upstream takes: `max_packet_size`, or less when an MQTT 5
    /// upstream says so in its CONNACK (rumqttc refuses to send a larger one and would
    /// fail the connection over it, again after every reconnect).
    max_packet: usize,
    window: Window,
    /// Read and checked, not yet handed to rumqttc: held back by the pacer. Dropped with
    /// the connection; the rewind before the next one reads them again.
    ready: VecDeque<Ready>,
    /// AWS counts its limits per connection: a new connection starts a new pacer.
    pacer: Option<Pacer>,
    /// When CONNACK arrived (`None` before): a cloud that closes the connection right
    /// after it usually refuses the client id or its policy (see
    /// `CloudProfile::closed_after_connack_hint`).
    connected_at: Option<Instant>,
    /// Set once the SAS token is due for renewal: no new publishes; the connection closes
    /// once those in flight are acked, or at this deadline (the rest is resent).
    renewing: Option<Instant>,
    /// The upstream refused a publish for now (quota exceeded): the connection closes the
    /// way a renewal does (the acks of those in flight still count), then backs off.
    throttled: bool,
    /// When an acknowledgement last arrived, or the window last became non-empty: while
    /// publishes are outstanding, nothing for `ack_timeout` means a half-open connection.
    last_progress: Instant,
    /// With `pack`: open packs, and closed ones on their way to `ready`.
    packer: Option<Packer>,
    packed: VecDeque<Pack>,
}

impl Conn<'_, '_> {
    /// `inflight`, or one publish at a time while a refusal's culprit is looked for
    /// (`Feed::isolate`).
    fn window_size(&self) -> usize {
        if self.feed.isolate.is_some() {
            1
        } else {
            self.plan.inflight as usize
        }
    }

    /// Whether to read from the buffer now, and up to how many records.
    ///
    /// The window is refilled in chunks, not one record per PUBACK: each read takes the
    /// buffer's lock and a read call. Packing reads whole batches (many records make one
    /// publish), and reads on while the window is full, so that open packs fill up
    /// instead of lingering out half empty; closed packs of [`READY_PACKS`] full packs'
    /// bytes waiting in `ready` stop the reading.
    fn refill(&self, window_size: usize) -> (bool, usize) {
        let outstanding = self.window.len() + self.ready.len();
        match &self.packer {
            Some(p) => {
                let waiting: usize = self.ready.iter().map(|r| r.payload.len()).sum();
                (
                    self.renewing.is_none() && waiting < READY_PACKS * p.plan().max_bytes,
                    self.ctx.batch,
                )
            }
            None => {
                let room = window_size.saturating_sub(outstanding);
                let refill_at = (window_size / 4).max(1);
                (
                    self.renewing.is_none() && room > 0 && (room >= refill_at || outstanding == 0),
                    room.min(self.ctx.batch),
                )
            }
        }
    }

    /// When the pacer lets the next ready publish go (`None`: nothing waits, or the
    /// window is full and an ack comes first).
    fn paced_until(&mut self, window_size: usize) -> Option<Instant> {
        match (self.ready.front(), self.pacer.as_mut()) {
            _ if self.window.len() >= window_size => None,
            (Some(next), Some(p)) => Some(p.ready_at(next.wire_bytes(), Instant::now())),
            (Some(_), None) => Some(Instant::now()),
            (None, _) => None,
        }
    }

    /// An event of the link: CONNACK, a publish written, an acknowledgement.
    async fn on_event(&mut self, event: LinkEvent) -> Option<Ended> {
        if let LinkEvent::ConnAck {
            session_present,
            max_packet_size,
        } = &event
        {
            self.on_connack(*session_present, *max_packet_size);
        }
        match handle_event(self.ctx, &mut self.window, event) {
            Acked::Nothing => None,
            Acked::Confirmed(last_seq) => {
                self.last_progress = Instant::now();
                // An acknowledgement proves the upstream works; a CONNACK alone does not
                // (see `on_error`).
                self.backoff.reset();
                self.ctx.acked();
                resolved(self.feed, last_seq);
                None
            }
            Acked::Refused { entry, code } => self.on_refused(entry, code).await,
        }
    }

    fn on_connack(&mut self, session_present: bool, max_packet_size: Option<usize>) {
        self.connected_at = Some(Instant::now());
        self.last_progress = Instant::now();
        if let Some(limit) = max_packet_size {
            self.max_packet = self.max_packet.min(limit);
        }
        let session = if session_present { "resumed" } else { "new" };
        self.ctx.up(&format!(
            "connected to {} (MQTT {}, {session} session)",
            self.upstream,
            self.plan.protocol.name()
        ));
        if let Some(tap) = &self.ctx.downlink {
            self.client.subscribe_downlinks(tap);
        }
    }

    /// An MQTT 5 PUBACK refused a publish: dead-letter it, or back off and resend it (see
    /// `puback`).
    async fn on_refused(&mut self, entry: InFlight, code: u8) -> Option<Ended> {
        let detail = format!(
            "{}: PUBACK {} for {} message(s)",
            self.upstream,
            puback::describe(code),
            entry.records().len()
        );
        match puback::action(code) {
            Action::DeadLetter { reason } => {
                self.last_progress = Instant::now();
                self.backoff.reset();
                if dead_letter_all(self.ctx, entry.records(), reason, &detail)
                    .await
                    .is_err()
                {
                    return Some(dead_letter_failed(self.ctx, &self.upstream));
                }
                self.ctx.acked();
                resolved(self.feed, entry.last_seq());
            }
            // Once per connection: later refusals in the same window are resent with it.
            Action::Retry { reason } if !self.throttled => {
                self.ctx.metrics.mark_down(
                    reason,
                    &format!(
                        "{detail}; backing off once the {} in flight are answered; the refused ones will be resent",
                        self.window.len()
                    ),
                );
                // Publishes written before a DISCONNECT are answered before it, but
                // rumqttc stops reading once it has sent one: wait for their acks first,
                // or they would be sent twice.
                self.throttled = true;
                let grace = (self.plan.ack_timeout / 2).min(failover::FAILBACK_GRACE);
                let until = Instant::now() + grace;
                self.renewing = Some(self.renewing.map_or(until, |r| r.min(until)));
            }
            Action::Retry { .. } => {}
            // `handle_event` confirms those itself.
            Action::Delivered => {}
        }
        None
    }

    /// The connection ended with an error (an MQTT 5 DISCONNECT among them).
    async fn on_error(&mut self, e: LinkError) -> Ended {
        if let Some(code) = e.disconnect_code {
            if let Some(ended) = self.on_disconnect(&e, code).await {
                return ended;
            }
        }
        // A connection that lasted restarts the backoff from its minimum; one closed right
        // after CONNACK (a duplicate client id, a policy refusal) must not, or it is
        // retried at `backoff_min` forever.
        let just_accepted = self
            .connected_at
            .is_some_and(|at| at.elapsed() < CLOSED_AFTER_CONNACK);
        if self.connected_at.is_some() && !just_accepted {
            self.backoff.reset();
        }
        let upstream = &self.upstream;
        let mut detail = match self.window.len() {
            0 => format!("{upstream}: {e}"),
            n => format!("{upstream}: {e}; {n} unconfirmed will be resent"),
        };
        let mut reason = e.reason;
        if let (Some(profile), true) = (self.plan.profile, just_accepted) {
            reason = "closed_after_connack";
            detail = format!(
                "{detail}; {} (client id {})",
                profile.closed_after_connack_hint(),
                self.plan.client_id
            );
        }
        self.ctx.metrics.mark_down(reason, &detail);
        Ended::Failed
    }

    /// An MQTT 5 DISCONNECT with reason `code`: dead-letter its message when there is
    /// one culprit (or start looking for it), or back off. `None`: the code means
    /// neither, and the connection ends as any other error.
    async fn on_disconnect(&mut self, e: &LinkError, code: u8) -> Option<Ended> {
        match puback::action(code) {
            Action::DeadLetter { reason } => {
                let detail = format!(
                    "{}: DISCONNECT {} with {} publish(es) outstanding",
                    self.upstream,
                    puback::describe(code),
                    self.window.len()
                );
                match self.window.take_single() {
                    Some(entry) => {
                        if dead_letter_all(self.ctx, entry.records(), reason, &detail)
                            .await
                            .is_err()
                        {
                            return Some(dead_letter_failed(self.ctx, &self.upstream));
                        }
                        resolved(self.feed, entry.last_seq());
                    }
                    // Not one culprit: find it one publish at a time.
                    None if matches!(self.feed.source, Source::Buffer) => {
                        self.feed.isolate = self.feed.isolate.max(self.window.last_seq());
                    }
                    None => {}
                }
                // The message is counted under `reason` by the dead letter; the
                // connection's end under "disconnected".
                self.ctx.metrics.mark_down(e.reason, &detail);
                Some(Ended::Failed)
            }
            Action::Retry { reason } => {
                self.ctx.metrics.mark_down(
                    reason,
                    &format!(
                        "{}: DISCONNECT {}; backing off, {} unconfirmed will be resent",
                        self.upstream,
                        puback::describe(code),
                        self.window.len()
                    ),
                );
                Some(Ended::Throttled)
            }
            Action::Delivered => None,
        }
    }

    /// The SAS token is due: stop taking records, reconnect once those in flight are
    /// acked.
    fn renew_token(&mut self) {
        info!(
            sink = %self.ctx.name,
            in_flight = self.window.len(),
            "renewing the SAS token: reconnecting once the messages in flight are acked"
        );
        // Half the renewal margin at most: the new connection must be up before the token
        // expires.
        let margin = self
            .plan
            .sas
            .as_ref()
            .map_or(Duration::ZERO, |s| cloud::renewal_margin(s.ttl));
        self.renewing = Some(Instant::now() + (self.plan.ack_timeout / 2).min(margin / 2));
    }

    /// No acknowledgement for `ack_timeout` with publishes outstanding: half-open.
    fn half_open(&mut self) -> Option<Ended> {
        if self.last_progress.elapsed() < self.plan.ack_timeout {
            return None;
        }
        let detail = format!(
            "{}: no acknowledgement for {} with {} publishes outstanding; reconnecting",
            self.upstream,
            humantime::format_duration(self.plan.ack_timeout),
            self.window.len()
        );
        self.ctx.metrics.mark_down("ack_timeout", &detail);
        Some(Ended::Failed)
    }

    /// Packs whose linger is over close and get ready.
    async fn close_lingering(&mut self) -> Option<Ended> {
        if let Some(packer) = &mut self.packer {
            packer.close_due(Instant::now(), &mut self.packed);
        }
        let (plan, ctx, max_packet) = (self.plan, self.ctx, self.max_packet);
        if stage_packs(plan, ctx, max_packet, &mut self.packed, &mut self.ready)
            .await
            .is_err()
        {
            return Some(dead_letter_failed(ctx, &self.upstream));
        }
        None
    }

    /// Records read from the buffer: packed or checked into `ready`, and what the pacer
    /// allows published.
    async fn take(&mut self, batch: Vec<Record>, window_size: usize) -> Option<Ended> {
        let (plan, ctx, max_packet) = (self.plan, self.ctx, self.max_packet);
        let staged = match &mut self.packer {
            Some(packer) => {
                match pack_batch(plan, ctx, max_packet, packer, batch, &mut self.packed).await {
                    Ok(()) => {
                        stage_packs(plan, ctx, max_packet, &mut self.packed, &mut self.ready).await
                    }
                    failed => failed,
                }
            }
            None => stage(plan, ctx, max_packet, batch, &mut self.ready).await,
        };
        if staged.is_err() {
            return Some(dead_letter_failed(ctx, &self.upstream));
        }
        self.send_ready(window_size).await
    }

    /// Publishes what is ready while the pacer and the window let it.
    async fn send_ready(&mut self, window_size: usize) -> Option<Ended> {
        let sent = publish_ready(
            self.ctx,
            self.client,
            self.plan.qos,
            &mut self.ready,
            &mut self.window,
            window_size,
            self.pacer.as_mut(),
            &mut self.last_progress,
        )
        .await;
        if sent.is_err() {
            // The event loop is gone: its error is next in `events` (or it was aborted);
            // nothing of this batch was acked, the rewind resends it.
            let detail = format!("{}: the connection closed", self.upstream);
            self.ctx.metrics.mark_down("closed", &detail);
            return Some(Ended::Failed);
        }
        None
    }

    /// Shutdown: wait (within the grace period) for the acks of what is in flight, then
    /// say DISCONNECT. Whatever stays unacked remains in the buffer (a refused publish
    /// too: it is dealt with after the restart).
    async fn drain_and_disconnect(&mut self) -> Ended {
        let deadline = Instant::now() + self.ctx.grace;
        while self.window.len() > 0 {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Ok(event))) => {
                    handle_event(self.ctx, &mut self.window, event);
                }
                _ => break,
            }
        }
        self.disconnect().await;
        self.ctx.metrics.mark_stopped();
        Ended::Stopped
    }

    /// Says DISCONNECT and waits (up to 1 s) until the upstream has closed the
    /// connection. Waiting for the close, not only for the DISCONNECT to be written,
    /// matters on a SAS renewal, where the next connection uses the same client id at
    /// once: a broker still tearing down the old one can take that down with the new one.
    /// rumqttd (the Azure stand-in in tests/cloud_profiles.rs) did, on a loaded machine:
    /// the new connection was closed right after its CONNACK. rumqttd queues the old
    /// connection's end to its router before it closes the socket, so after the close the
    /// two cannot cross.
    ///
    /// Acknowledgements that arrive meanwhile still confirm their records (a refusal
    /// among them leaves its record to be resent), so that a connection closed over a
    /// refusal (quota exceeded) does not resend what the upstream had already accepted.
    async fn disconnect(&mut self) {
        if self.client.try_disconnect() {
            // The driver forwards the connection's end as an error, then stops.
            let (ctx, window, events) = (self.ctx, &mut self.window, &mut self.events);
            let closed = async {
                while let Some(Ok(event)) = events.recv().await {
                    handle_event(ctx, window, event);
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), closed).await;
        }
    }
}
