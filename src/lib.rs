//! edgebridge: an edge gateway between factory devices and the cloud.
//!
//! ```text
//! devices ──MQTT 3.1/3.1.1/5──▶ device connections (edgebridge's tasks) ──▶ rumqttd router
//!                              │ every PUBLISH and every will                (local fan-out)
//!                              ▼
//!                          intake ──▶ rules (filter · CEL condition · transform)
//!                                        │ one record per matched sink
//!                                        ▼
//!                          buffer[sink] ─▶ sink worker ──▶ mqtt │ http │ kafka │ file
//! cloud ──MQTT subscription──▶ [[downlinks]] ──▶ broker ──▶ devices (never into intake)
//! ```
//!
//! Every stage has one job and one owner; the rule engine never waits on the network, it
//! only appends to buffers. A slow or dead upstream grows its own buffer and nothing else.
//!
//! Module map:
//! - [`config`]: figment loading (defaults ← TOML ← `EDGEBRIDGE_*` env, `${VAR}`) and the
//!   pure validation into a typed [`config::Plan`].
//! - [`broker`]: device connections (auth, ACLs, acks, wills), rumqttd's router for local
//!   subscribers, and intake.
//! - [`rules`]: compiled topic filters, templates and CEL expressions; the router task;
//!   downlinks ([`rules::downlink`]).
//! - [`buffer`]: the per-sink buffer (append / read batch / ack / rewind).
//! - [`sinks`]: one worker per sink: [`sinks::mqtt`] (MQTT 5 or 3.1.1 behind one seam,
//!   with [`sinks::failover`] between its endpoints, several connections in
//!   `connections`, MQTT 5 reason codes in [`sinks::mqtt::puback`]), [`sinks::http`],
//!   [`sinks::kafka`], [`sinks::file`]; each paces what it sends with [`sinks::pacing`]
//!   when it has a `rate`, and MQTT and HTTP combine messages with [`sinks::pack`].
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`, `/api/v1/status` and the status page.
//! - [`app`]: start-up, reload (SIGHUP) and shutdown order.
//! - [`dry_run`]: `edgebridge rules test`, one made-up message through a plan's rules.
//! - [`lock`]: the exclusive lock on `data_dir`, taken first and held for the process's life.

pub mod admin;
pub mod app;
pub mod broker;
pub mod buffer;
pub mod config;
pub mod dry_run;
pub mod lock;
pub mod message;
pub mod metrics;
pub mod pem;
pub mod problems;
pub mod rules;
pub mod sinks;
pub mod topic;
pub mod units;
