//! What an MQTT 5 upstream's reason codes mean for the message they answer: the one table
//! (shown in the README) from a PUBACK's (or a DISCONNECT's) reason code to what the sink
//! does, as HTTP statuses are classified in `sinks::http`.
//!
//! Input: the reason code of a PUBACK (`client::LinkEvent::PubAck`), or of a DISCONNECT
//! the upstream sent while publishes were outstanding (`client::LinkError`). Output: an
//! [`Action`] for the delivery loop in `super::connection`:
//! - `Delivered`: the record is acked;
//! - `Retry`: the upstream is at fault (busy, over a quota): the sink stops sending, takes
//!   the answers to what is in flight (up to a few seconds), closes the connection, backs
//!   off (the throttle backoff grows while refusals repeat) and resends everything
//!   unconfirmed;
//! - `DeadLetter`: the message is at fault and retrying cannot help: it goes to the
//!   dead-letter file with the reason and is counted (`edgebridge_buffer_dropped_total`).
//!
//! Server busy (0x89) and packet too large (0x95) are DISCONNECT reason codes in MQTT 5: a
//! PUBACK cannot carry them (rumqttc 0.25 rejects such a PUBACK as malformed, which is
//! retried like any protocol error). A DISCONNECT with a code that dead-letters applies to
//! the one publish outstanding; with several outstanding the next connection sends one at
//! a time until the culprit is found (`super::Feed::isolate`).
//!
//! 3.1.1 PUBACKs carry no code: every one is 0x00.

/// What the sink does with the message a reason code answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Delivered,
    /// Back off and resend; `reason` labels `edgebridge_sink_errors_total`.
    Retry {
        reason: &'static str,
    },
    /// Undeliverable; `reason` labels the dead letter and the drop counter.
    DeadLetter {
        reason: &'static str,
    },
}

/// Every reason code edgebridge knows: `(code, name, action)`. Codes not listed are
/// retried (`reason="upstream_refused"`): at-least-once prefers a duplicate to a loss.
pub const TABLE: &[(u8, &str, Action)] = &[
    (0x00, "success", Action::Delivered),
    (0x10, "no matching subscribers", Action::Delivered),
    (
        0x80,
        "unspecified error",
        Action::Retry {
            reason: "upstream_error",
        },
    ),
    (
        0x83,
        "implementation specific error",
        Action::Retry {
            reason: "upstream_error",
        },
    ),
    (
        0x87,
        "not authorized",
        Action::DeadLetter {
            reason: "not_authorized",
        },
    ),
    (
        0x89,
        "server busy",
        Action::Retry {
            reason: "server_busy",
        },
    ),
    (
        0x90,
        "topic name invalid",
        Action::DeadLetter {
            reason: "invalid_topic",
        },
    ),
    (
        0x91,
        "packet identifier in use",
        Action::Retry {
            reason: "upstream_error",
        },
    ),
    (
        0x95,
        "packet too large",
        Action::DeadLetter {
            reason: "too_large",
        },
    ),
    (
        0x97,
        "quota exceeded",
        Action::Retry {
            reason: "quota_exceeded",
        },
    ),
    (
        0x99,
        "payload format invalid",
        Action::DeadLetter {
            reason: "payload_format_invalid",
        },
    ),
];

/// The action for `code`.
pub fn action(code: u8) -> Action {
    TABLE.iter().find(|(c, _, _)| *c == code).map_or(
        Action::Retry {
            reason: "upstream_refused",
        },
        |(_, _, a)| *a,
    )
}

/// `0x97 quota exceeded`, for logs and dead-letter details.
pub fn describe(code: u8) -> String {
    match TABLE.iter().find(|(c, _, _)| *c == code) {
        Some((_, name, _)) => format!("{code:#04x} {name}"),
        None => format!("{code:#04x}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reason_code_table() {
        let expected = [
            (0x00, Action::Delivered),
            (0x10, Action::Delivered),
            (
                0x97,
                Action::Retry {
                    reason: "quota_exceeded",
                },
            ),
            (
                0x89,
                Action::Retry {
                    reason: "server_busy",
                },
            ),
            (
                0x87,
                Action::DeadLetter {
                    reason: "not_authorized",
                },
            ),
            (
                0x90,
                Action::DeadLetter {
                    reason: "invalid_topic",
                },
            ),
            (
                0x99,
                Action::DeadLetter {
                    reason: "payload_format_invalid",
                },
            ),
            (
                0x95,
                Action::DeadLetter {
                    reason: "too_large",
                },
            ),
            (
                0x80,
                Action::Retry {
                    reason: "upstream_error",
                },
            ),
            // Not a PUBACK code at all: retried, never dropped.
            (
                0x42,
                Action::Retry {
                    reason: "upstream_refused",
                },
            ),
        ];
        for (code, want) in expected {
            assert_eq!(action(code), want, "{}", describe(code));
        }
        assert_eq!(describe(0x97), "0x97 quota exceeded");
        assert_eq!(describe(0x42), "0x42");
        let mut codes: Vec<u8> = TABLE.iter().map(|(c, _, _)| *c).collect();
        codes.dedup();
        assert_eq!(codes.len(), TABLE.len(), "one row per code");
    }
}
