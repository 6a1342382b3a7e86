//! A sink's TLS files (CA, client certificate and key), read at each connection attempt so
//! that renewed ones are used by the next connection without a restart, and the last set
//! that loaded kept: files that do not load (half written, a key that does not match the
//! certificate) are refused, reported once per change (error log line,
//! `edgebridge_credentials_reloads_total{source="sink:<name>",outcome="refused"}`), and
//! the last good set is used instead. Before any set loaded, the error is the caller's.
//!
//! Input: the paths of a sink's `tls` settings. Output: their contents ([`LoadedTls`]).

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::IntCounterVec;
use tracing::{error, info};

use crate::pem;

/// How often a running sink that keeps its connection (HTTP, Kafka) reads its TLS files
/// again; the MQTT sink reads them at each connection attempt.
pub const CREDENTIALS_POLL: Duration = Duration::from_secs(5);

/// A CA bundle and a client certificate and key as read from their files (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedTls {
    /// Empty when the sink names no CA.
    pub ca: Vec<u8>,
    /// Certificate chain and key.
    pub client_auth: Option<(Vec<u8>, Vec<u8>)>,
}

/// One sink's TLS files and what was last read from them.
pub struct TlsFiles {
    source: String,
    reloads: IntCounterVec,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The last set that loaded, with the digest of the files it came from.
    good: Option<(u64, LoadedTls)>,
    /// The digest of the files last refused (each change is reported once).
    refused: Option<u64>,
}

impl TlsFiles {
    /// For sink `sink`; changes are counted in `reloads` (`source`, `outcome`).
    pub fn new(sink: &str, reloads: IntCounterVec) -> Arc<TlsFiles> {
        Arc::new(TlsFiles {
            source: format!("sink:{sink}"),
            reloads,
            state: Mutex::new(State::default()),
        })
    }

    /// The files as they are now if they load, else the last set that did; an error when
    /// none has yet.
    pub fn read(
        &self,
        ca: Option<&Path>,
        client_auth: Option<(&Path, &Path)>,
    ) -> Result<LoadedTls, String> {
        let now = read_files(ca, client_auth);
        let digest = {
            let mut hasher = DefaultHasher::new();
            match &now {
                Ok(loaded) => (&loaded.ca, &loaded.client_auth).hash(&mut hasher),
                Err(e) => e.hash(&mut hasher),
            }
            hasher.finish()
        };
        let checked = now.and_then(|loaded| check(&loaded).map(|()| loaded));
        let mut state = self.state.lock();
        match checked {
            Ok(loaded) => {
                match &state.good {
                    Some((seen, _)) if *seen == digest => {}
                    Some(_) => {
                        info!(source = %self.source, "new TLS files loaded: the next connection uses them");
                        self.reloads
                            .with_label_values(&[&self.source, "applied"])
                            .inc();
                    }
                    None => {}
                }
                state.good = Some((digest, loaded.clone()));
                state.refused = None;
                Ok(loaded)
            }
            Err(why) => {
                let Some((_, good)) = &state.good else {
                    return Err(why);
                };
                let good = good.clone();
                if state.refused != Some(digest) {
                    state.refused = Some(digest);
                    error!(source = %self.source, error = %why, "new TLS files refused: the last ones that loaded stay in use");
                    self.reloads
                        .with_label_values(&[&self.source, "refused"])
                        .inc();
                }
                Ok(good)
            }
        }
    }
}

fn read_files(ca: Option<&Path>, client_auth: Option<(&Path, &Path)>) -> Result<LoadedTls, String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    Ok(LoadedTls {
        ca: match ca {
            Some(p) => read(p)?,
            None => Vec::new(),
        },
        client_auth: match client_auth {
            Some((cert, key)) => Some((read(cert)?, read(key)?)),
            None => None,
        },
    })
}

/// Whether `tls` makes a client configuration: PEM that parses, at least one CA
/// certificate when a CA is named, a certificate chain with a key that matches it.
fn check(tls: &LoadedTls) -> Result<(), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = if tls.ca.is_empty() {
        rustls::RootCertStore::empty()
    } else {
        pem::roots(&tls.ca, "CA file")?
    };
    let Some((cert, key)) = &tls.client_auth else {
        return Ok(());
    };
    let chain = pem::certificates(cert, "certificate file")?;
    let key = pem::private_key(key, "key file")?;
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("certificate and key: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(cn: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        (
            p.self_signed(&key).expect("cert").pem(),
            key.serialize_pem(),
        )
    }

    #[test]
    fn a_broken_set_is_refused_once_and_the_last_good_one_stays() {
        let dir = tempfile::tempdir().expect("dir");
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("c.key"));
        let reloads = IntCounterVec::new(prometheus::Opts::new("r", "r"), &["source", "outcome"])
            .expect("counter");
        let files = TlsFiles::new("cloud", reloads.clone());
        let read = || files.read(None, Some((&cert, &key)));
        assert!(read().is_err(), "nothing to fall back on yet");

        let (a_cert, a_key) = pair("edge-a");
        std::fs::write(&cert, &a_cert).expect("write");
        std::fs::write(&key, &a_key).expect("write");
        let a = read().expect("loads");
        assert_eq!(
            a.client_auth.as_ref().map(|(c, _)| c.as_slice()),
            Some(a_cert.as_bytes())
        );

        let (b_cert, b_key) = pair("edge-b");
        std::fs::write(&cert, &b_cert).expect("write");
        assert_eq!(
            read().expect("the last good"),
            a,
            "B's certificate with A's key"
        );
        assert_eq!(read().expect("the last good"), a);
        let count = |outcome: &str| reloads.with_label_values(&["sink:cloud", outcome]).get();
        assert_eq!(count("refused"), 1, "reported once per change");

        std::fs::write(&key, &b_key).expect("write");
        let b = read().expect("loads");
        assert_eq!(
            b.client_auth.as_ref().map(|(c, _)| c.as_slice()),
            Some(b_cert.as_bytes())
        );
        assert_eq!(count("applied"), 1);

        std::fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nbm9wZQ==\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        assert_eq!(read().expect("the last good"), b);
        assert_eq!(count("refused"), 2);
    }
}
