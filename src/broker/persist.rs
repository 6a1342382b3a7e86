//! What rumqttd keeps only in memory and devices expect to outlive a restart (Mosquitto
//! persists both): retained messages, and the subscriptions of persistent sessions with
//! their MQTT 5 options (no local, retain as published, retain handling).
//!
//! Input: every retained publish into the router and every SUBSCRIBE / UNSUBSCRIBE /
//! clean CONNECT of a persistent session (`links.rs`, `connection.rs`). Output: the file
//! `data_dir/broker/state.json`, rewritten whole (temp file, fsync, rename) at most once
//! a second when something changed and at shutdown; read at start and restored into the
//! router before any listener accepts.
//!
//! What is lost in a crash is at most the last second of changes; a corrupt or unreadable
//! file is logged and set aside (`state.json.bad`), the gateway starts without it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use base64::Engine;
use bytes::Bytes;
use parking_lot::Mutex;
use rumqttd::protocol::{Filter, PublishProperties, QoS, RetainForwardRule};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// A retained message as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retained {
    /// Base64.
    pub payload: String,
    pub qos: u8,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_properties: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_format_indicator: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_topic: Option<String>,
}

impl Retained {
    pub fn payload(&self) -> Option<Bytes> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.payload)
            .ok()
            .map(Bytes::from)
    }

    pub fn properties(&self) -> Option<PublishProperties> {
        let p = PublishProperties {
            user_properties: self.user_properties.clone(),
            content_type: self.content_type.clone(),
            payload_format_indicator: self.payload_format_indicator,
            response_topic: self.response_topic.clone(),
            ..Default::default()
        };
        (p != PublishProperties::default()).then_some(p)
    }
}

/// One subscription of a persistent session as stored: its QoS and MQTT 5 options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(from = "StoredSubscription")]
pub struct Subscription {
    pub qos: u8,
    #[serde(default, skip_serializing_if = "is_false")]
    pub no_local: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub retain_as_published: bool,
    /// 0: retained messages at every SUBSCRIBE, 1: at a new subscription only, 2: never.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retain_handling: u8,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &u8) -> bool {
    *n == 0
}

/// What a file holds for a subscription: the QoS alone (files written before the options
/// were kept), or the QoS and the options.
#[derive(Deserialize)]
#[serde(untagged)]
enum StoredSubscription {
    Qos(u8),
    Options {
        qos: u8,
        #[serde(default)]
        no_local: bool,
        #[serde(default)]
        retain_as_published: bool,
        #[serde(default)]
        retain_handling: u8,
    },
}

impl From<StoredSubscription> for Subscription {
    fn from(s: StoredSubscription) -> Self {
        match s {
            StoredSubscription::Qos(qos) => Subscription {
                qos,
                ..Subscription::default()
            },
            StoredSubscription::Options {
                qos,
                no_local,
                retain_as_published,
                retain_handling,
            } => Subscription {
                qos,
                no_local,
                retain_as_published,
                retain_handling,
            },
        }
    }
}

impl Subscription {
    /// What a SUBSCRIBE's filter asks for.
    pub fn of(f: &Filter) -> Self {
        Subscription {
            qos: f.qos as u8,
            no_local: f.nolocal,
            retain_as_published: f.preserve_retain,
            retain_handling: match f.retain_forward_rule {
                RetainForwardRule::OnEverySubscribe => 0,
                RetainForwardRule::OnNewSubscribe => 1,
                RetainForwardRule::Never => 2,
            },
        }
    }

    /// The filter `path` with this QoS and these options.
    pub fn filter(&self, path: String) -> Filter {
        Filter {
            path,
            qos: match self.qos {
                0 => QoS::AtMostOnce,
                1 => QoS::AtLeastOnce,
                _ => QoS::ExactlyOnce,
            },
            nolocal: self.no_local,
            preserve_retain: self.retain_as_published,
            retain_forward_rule: match self.retain_handling {
                0 => RetainForwardRule::OnEverySubscribe,
                1 => RetainForwardRule::OnNewSubscribe,
                _ => RetainForwardRule::Never,
            },
        }
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Topic → its retained message.
    #[serde(default)]
    pub retained: BTreeMap<String, Retained>,
    /// Client id of a persistent session → its subscriptions (filter → QoS and options).
    #[serde(default)]
    pub sessions: BTreeMap<String, BTreeMap<String, Subscription>>,
}

/// The broker's persisted state and where it goes.
pub struct Persist {
    path: PathBuf,
    state: Mutex<State>,
    dirty: AtomicBool,
}

impl Persist {
    /// Reads `data_dir/broker/state.json` (an absent file is an empty state).
    pub fn open(data_dir: &Path) -> anyhow::Result<Persist> {
        let dir = data_dir.join("broker");
        std::fs::create_dir_all(&dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
        let path = dir.join("state.json");
        let state = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<State>(&bytes) {
                Ok(state) => state,
                Err(e) => {
                    let aside = path.with_extension("json.bad");
                    warn!(file = %path.display(), error = %e, moved_to = %aside.display(), "broker state unreadable; starting without retained messages and sessions");
                    let _ = std::fs::rename(&path, &aside);
                    State::default()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
        };
        if !state.retained.is_empty() || !state.sessions.is_empty() {
            info!(
                retained = state.retained.len(),
                sessions = state.sessions.len(),
                "restoring broker state"
            );
        }
        Ok(Persist {
            path,
            state: Mutex::new(state),
            dirty: AtomicBool::new(false),
        })
    }

    pub fn snapshot(&self) -> State {
        self.state.lock().clone()
    }

    /// A retained publish: stored, or removed by an empty payload.
    pub fn retain(
        &self,
        topic: &[u8],
        payload: &[u8],
        qos: u8,
        properties: Option<&PublishProperties>,
    ) {
        let Ok(topic) = std::str::from_utf8(topic) else {
            return;
        };
        let mut state = self.state.lock();
        if payload.is_empty() {
            if state.retained.remove(topic).is_none() {
                return;
            }
        } else {
            let stored = Retained {
                payload: base64::engine::general_purpose::STANDARD.encode(payload),
                qos,
                user_properties: properties
                    .map(|p| p.user_properties.clone())
                    .unwrap_or_default(),
                content_type: properties.and_then(|p| p.content_type.clone()),
                payload_format_indicator: properties.and_then(|p| p.payload_format_indicator),
                response_topic: properties.and_then(|p| p.response_topic.clone()),
            };
            state.retained.insert(topic.to_string(), stored);
        }
        self.dirty.store(true, Ordering::Release);
    }

    /// A persistent session subscribed to `filters`.
    pub fn subscribe(
        &self,
        client_id: &str,
        filters: impl Iterator<Item = (String, Subscription)>,
    ) {
        let mut state = self.state.lock();
        let session = state.sessions.entry(client_id.to_string()).or_default();
        session.extend(filters);
        self.dirty.store(true, Ordering::Release);
    }

    pub fn unsubscribe(&self, client_id: &str, filters: &[String]) {
        let mut state = self.state.lock();
        if let Some(session) = state.sessions.get_mut(client_id) {
            for f in filters {
                session.remove(f);
            }
            if session.is_empty() {
                state.sessions.remove(client_id);
            }
            self.dirty.store(true, Ordering::Release);
        }
    }

    /// A clean session replaced the stored one.
    pub fn forget(&self, client_id: &str) {
        if self.state.lock().sessions.remove(client_id).is_some() {
            self.dirty.store(true, Ordering::Release);
        }
    }

    /// Writes the state if it changed (blocking file I/O: call off the async workers).
    pub fn flush(&self) {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return;
        }
        let bytes = match serde_json::to_vec(&*self.state.lock()) {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "cannot encode the broker state");
                return;
            }
        };
        let tmp = self.path.with_extension("json.tmp");
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| {
                f.write_all(&bytes)?;
                f.sync_data()
            })
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = written {
            // Tried again at the next change.
            self.dirty.store(true, Ordering::Release);
            warn!(file = %self.path.display(), error = %e, "cannot write the broker state");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_survives_a_reopen_and_a_corrupt_file_is_set_aside() {
        let dir = tempfile::tempdir().expect("dir");
        let p = Persist::open(dir.path()).expect("open");
        p.retain(b"a/b", b"on", 1, None);
        p.retain(b"a/c", b"x", 0, None);
        p.retain(b"a/c", b"", 0, None);
        let no_local = Subscription {
            qos: 1,
            no_local: true,
            retain_handling: 2,
            ..Subscription::default()
        };
        p.subscribe("press-1", [("cmd/#".to_string(), no_local)].into_iter());
        p.subscribe(
            "press-2",
            [("x".to_string(), Subscription::default())].into_iter(),
        );
        p.unsubscribe("press-2", &["x".to_string()]);
        p.flush();
        let again = Persist::open(dir.path()).expect("reopen").snapshot();
        assert_eq!(again.retained.keys().collect::<Vec<_>>(), ["a/b"]);
        assert_eq!(again.retained["a/b"].payload().as_deref(), Some(&b"on"[..]));
        assert_eq!(
            again.sessions.keys().collect::<Vec<_>>(),
            ["press-1"],
            "an emptied session is dropped"
        );
        assert_eq!(again.sessions["press-1"]["cmd/#"], no_local);

        std::fs::write(dir.path().join("broker/state.json"), b"{not json").expect("write");
        let fresh = Persist::open(dir.path()).expect("reopen").snapshot();
        assert_eq!(fresh, State::default());
        assert!(dir.path().join("broker/state.json.bad").exists());
    }

    #[test]
    fn a_file_from_before_the_options_were_kept_still_reads() {
        let old = br#"{"retained":{},"sessions":{"press-1":{"cmd/#":1,"cfg/+":0}}}"#;
        let state: State = serde_json::from_slice(old).expect("old format");
        assert_eq!(
            state.sessions["press-1"]["cmd/#"],
            Subscription {
                qos: 1,
                ..Subscription::default()
            }
        );
        assert_eq!(state.sessions["press-1"]["cfg/+"], Subscription::default());
        let options = Subscription {
            qos: 2,
            no_local: true,
            retain_as_published: true,
            retain_handling: 1,
        };
        let path = "a/#".to_string();
        assert_eq!(Subscription::of(&options.filter(path)), options);
    }
}
