//! `connections = N`: one MQTT sink over N upstream connections (AWS IoT Core limits
//! each connection to 100 PUBLISH/s and 512 KiB/s, so a gateway that forwards more opens
//! more of them).
//!
//! Input: the sink's buffer, read by one dispatcher task that routes each record to one
//! connection by its upstream topic, so the messages of one topic always take the same
//! connection and keep their order. Topics are dealt out in turn as they first appear
//! (so N connections carry N times one's pacing budget even with a few dozen topics,
//! where hashing leaves some connections with twice the topics of others and the
//! busiest one holds the dispatcher back); the table lives as long as the connections
//! and past [`MAX_ASSIGNED`] topics new ones go by hash. Output: N connections, each the same session
//! as a single-connection sink (`super::connection`: its own client id from
//! `client_ids`, in-flight window, acks straight to the buffer).
//!
//! The connections live and fail together: when one ends, the others close too (their
//! unconfirmed records are resent, as after any reconnect), the buffer is rewound and the
//! group reconnects after the backoff. Splitting failure handling per connection would
//! need a read cursor per connection; one shared rewind keeps the buffer's single reader
//! and costs, on a failure, duplicates within the other connections' windows.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::config::MqttPlan;
use super::{session, Feed, Source};
use crate::buffer::Record;
use crate::sinks::supervise::{supervise, Ended, Session};
use crate::sinks::{Backoff, SinkContext};

pub(super) async fn run(plan: MqttPlan, ctx: SinkContext) {
    let ctx = Arc::new(ctx);
    let backoff = ctx.backoff(plan.backoff_min, plan.backoff_max);
    supervise(
        &ctx,
        backoff,
        &mut Group {
            plan,
            ctx: ctx.clone(),
        },
    )
    .await;
}

/// The connections of one sink: a session is one life of the group, from connecting all
/// of them until the first one ends.
struct Group {
    plan: MqttPlan,
    /// The context again, shared with the connection tasks.
    ctx: Arc<SinkContext>,
}

impl Session for Group {
    async fn run(&mut self, _: &SinkContext, backoff: &mut Backoff) -> Ended {
        let (plan, ctx) = (&self.plan, &self.ctx);
        ctx.buffer.rewind();
        let stop = CancellationToken::new();
        let mut routes = Vec::with_capacity(plan.client_ids.len());
        let mut members = JoinSet::new();
        for client_id in &plan.client_ids {
            // A window's worth queued per connection: the dispatcher stays ahead of it.
            let (tx, records) = mpsc::channel(usize::from(plan.inflight).max(16));
            routes.push(tx);
            let member = MqttPlan {
                client_id: client_id.clone(),
                ..plan.clone()
            };
            let mut feed = Feed {
                source: Source::Routed {
                    records,
                    stop: stop.clone(),
                },
                failback: None,
                isolate: None,
            };
            let (ctx, mut member_backoff) = (ctx.clone(), backoff.clone());
            members.spawn(async move {
                let outcome = session(&member, &ctx, &mut member_backoff, &mut feed).await;
                (outcome, member_backoff)
            });
        }
        let dispatcher = tokio::spawn(dispatch(ctx.clone(), routes, stop.clone()));
        // The first connection to end ends the group.
        let first = members.join_next().await;
        stop.cancel();
        while members.join_next().await.is_some() {}
        let _ = dispatcher.await;
        match first {
            Some(Ok((outcome, member_backoff))) => {
                // The connection that ended knows whether acks arrived (a reset backoff).
                *backoff = member_backoff;
                outcome
            }
            // A connection task panicked: treat it like a failed connection.
            _ => Ended::Failed,
        }
    }
}

/// Reads the buffer and hands each record to the connection of its topic, until `stop`.
async fn dispatch(
    ctx: Arc<SinkContext>,
    routes: Vec<mpsc::Sender<Record>>,
    stop: CancellationToken,
) {
    let route = async {
        let mut assignments = Assignments::new(routes.len());
        loop {
            for record in ctx.buffer.read_batch(ctx.batch).await {
                let n = assignments.connection_of(&record.msg.topic);
                if routes[n].send(record).await.is_err() {
                    return;
                }
            }
        }
    };
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = route => {}
    }
}

/// Topics the dispatcher assigns in turn; past this many, new topics go by hash, so the
/// table stays bounded whatever the devices publish.
const MAX_ASSIGNED: usize = 65_536;

/// Which connection carries which topic, for one life of the group.
struct Assignments {
    topics: HashMap<String, usize>,
    connections: usize,
}

impl Assignments {
    fn new(connections: usize) -> Self {
        Assignments {
            topics: HashMap::new(),
            connections: connections.max(1),
        }
    }

    fn connection_of(&mut self, topic: &str) -> usize {
        if let Some(&n) = self.topics.get(topic) {
            return n;
        }
        if self.topics.len() >= MAX_ASSIGNED {
            return connection_of(topic, self.connections);
        }
        let n = self.topics.len() % self.connections;
        self.topics.insert(topic.to_string(), n);
        n
    }
}

/// The connection (index below `count`) that carries `topic`. `DefaultHasher::new()` is
/// keyed with constants, so the choice is the same for the whole run.
fn connection_of(topic: &str, count: usize) -> usize {
    let mut hasher = DefaultHasher::new();
    topic.hash(&mut hasher);
    (hasher.finish() % count.max(1) as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_dealt_out_in_turn_and_keep_their_connection() {
        let mut a = Assignments::new(3);
        let first: Vec<usize> = (0..6).map(|i| a.connection_of(&format!("t{i}"))).collect();
        assert_eq!(first, [0, 1, 2, 0, 1, 2]);
        assert_eq!(a.connection_of("t4"), 1, "a topic keeps its connection");
        let mut full = Assignments::new(4);
        for i in 0..MAX_ASSIGNED {
            full.connection_of(&i.to_string());
        }
        let extra = full.connection_of("one more");
        assert_eq!(
            extra,
            connection_of("one more", 4),
            "by hash past the bound"
        );
        assert_eq!(full.topics.len(), MAX_ASSIGNED);
    }

    #[test]
    fn a_topic_always_takes_the_same_connection_and_topics_spread() {
        let mut used = [0u32; 4];
        for i in 0..400 {
            let topic = format!("dt/edge-01/line{}/press{}", i % 7, i);
            let n = connection_of(&topic, 4);
            assert_eq!(n, connection_of(&topic, 4));
            used[n] += 1;
        }
        assert!(used.iter().all(|&u| u > 50), "{used:?}");
        assert_eq!(connection_of("any", 1), 0);
    }
}
