//! The upstream in-flight window: what was published and awaits its PUBACK (or the
//! PUBREC/PUBCOMP of QoS 2), in order, and what each event of the MQTT client means for it.

use super::*;

/// A publish handed to rumqttc, waiting for its packet id or its acknowledgement: one
/// record, or the records of a pack, acked together. The records are kept (cheap: the
/// payload is shared) so that a PUBACK that refuses the message can dead-letter them.
#[derive(Clone)]
pub(super) enum InFlight {
    One(Record),
    Pack(Vec<Record>),
}

impl InFlight {
    pub(super) fn records(&self) -> &[Record] {
        match self {
            InFlight::One(record) => std::slice::from_ref(record),
            InFlight::Pack(records) => records,
        }
    }

    /// The newest record it carries.
    pub(super) fn last_seq(&self) -> u64 {
        self.records().iter().map(|r| r.seq).max().unwrap_or(0)
    }

    /// The upstream confirmed it: acks its records and counts each as delivered.
    pub(super) fn confirm(&self, ctx: &SinkContext) {
        for record in self.records() {
            ctx.buffer.ack(record.seq);
            ctx.metrics.delivered(record.msg.received_at);
        }
    }
}

/// One connection's bookkeeping; dropped with the connection.
#[derive(Default)]
pub(super) struct Window {
    /// Handed to rumqttc, packet id not yet known (rumqttc keeps request order).
    pub(super) queued: VecDeque<InFlight>,
    /// Written; waiting for PUBACK (QoS 1) or PUBCOMP (QoS 2).
    pub(super) by_pkid: HashMap<u16, InFlight>,
}

impl Window {
    pub(super) fn len(&self) -> usize {
        self.queued.len() + self.by_pkid.len()
    }

    /// The only publish outstanding, if exactly one is.
    pub(super) fn take_single(&mut self) -> Option<InFlight> {
        if self.len() != 1 {
            return None;
        }
        match self.queued.pop_front() {
            Some(entry) => Some(entry),
            None => {
                let pkid = *self.by_pkid.keys().next()?;
                self.by_pkid.remove(&pkid)
            }
        }
    }

    /// The newest record outstanding.
    pub(super) fn last_seq(&self) -> Option<u64> {
        self.queued
            .iter()
            .chain(self.by_pkid.values())
            .map(InFlight::last_seq)
            .max()
    }
}

/// What one event did to the window.
pub(super) enum Acked {
    Nothing,
    /// Records up to this seq were confirmed (acked and counted).
    Confirmed(u64),
    /// An MQTT 5 PUBACK refused the publish with `code` (see `puback`): the entry is out
    /// of the window, nothing acked yet.
    Refused {
        entry: InFlight,
        code: u8,
    },
}

/// Applies one event to the window.
pub(super) fn handle_event(ctx: &SinkContext, window: &mut Window, event: LinkEvent) -> Acked {
    let (entry, code) = match event {
        LinkEvent::Published(pkid) => {
            let Some(entry) = window.queued.pop_front() else {
                return Acked::Nothing;
            };
            if pkid != 0 {
                window.by_pkid.insert(pkid, entry);
                return Acked::Nothing;
            }
            // QoS 0: written is all the confirmation there will be.
            (entry, 0)
        }
        LinkEvent::PubAck { pkid, code } => match window.by_pkid.remove(&pkid) {
            Some(entry) => (entry, code),
            None => return Acked::Nothing,
        },
        LinkEvent::PubComp(pkid) => match window.by_pkid.remove(&pkid) {
            Some(entry) => (entry, 0),
            None => return Acked::Nothing,
        },
        LinkEvent::ConnAck { .. } => return Acked::Nothing,
    };
    match puback::action(code) {
        Action::Delivered => {
            entry.confirm(ctx);
            Acked::Confirmed(entry.last_seq())
        }
        _ => Acked::Refused { entry, code },
    }
}
