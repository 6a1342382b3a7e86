//! PEM files of TLS credentials, read one way for every side: the device listeners'
//! certificate, key and client CA (`broker::transport`) and the sinks' CA, client
//! certificate and key (`sinks::credentials`). Errors say which file (`what`) and why;
//! they never quote the file.

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

/// The certificate chain in `pem` (at least one certificate).
pub fn certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{what}: not PEM ({e})"))?;
    if chain.is_empty() {
        return Err(format!("{what}: no certificate in it"));
    }
    Ok(chain)
}

/// The private key in `pem`.
pub fn private_key(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, String> {
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| format!("{what}: not PEM ({e})"))?
        .ok_or_else(|| format!("{what}: no private key in it"))
}

/// The CA certificates in `pem` as trust roots (at least one).
pub fn roots(pem: &[u8], what: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        let cert = cert.map_err(|e| format!("{what}: not PEM ({e})"))?;
        roots
            .add(cert)
            .map_err(|e| format!("{what}: not a usable CA certificate ({e})"))?;
    }
    if roots.is_empty() {
        return Err(format!("{what}: no certificate in it"));
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_file_and_never_quote_it() {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["a".into()])
            .expect("params")
            .self_signed(&key)
            .expect("cert")
            .pem();
        assert_eq!(certificates(cert.as_bytes(), "c").expect("chain").len(), 1);
        assert!(private_key(key.serialize_pem().as_bytes(), "k").is_ok());
        assert!(roots(cert.as_bytes(), "ca").is_ok());

        let secret = key.serialize_pem();
        for (result, want) in [
            (
                certificates(secret.as_bytes(), "cert.pem").map(drop),
                "cert.pem: no certificate in it",
            ),
            (
                private_key(cert.as_bytes(), "key.pem").map(drop),
                "key.pem: no private key in it",
            ),
            (
                roots(b"", "ca.pem").map(drop),
                "ca.pem: no certificate in it",
            ),
        ] {
            let e = result.expect_err(want);
            assert_eq!(e, want);
        }
        let broken = format!("{}\n-----BEGIN CERTIFICATE-----\nMIIB", &secret[..40]);
        let e = certificates(broken.as_bytes(), "cert.pem").expect_err("broken");
        assert!(e.starts_with("cert.pem: not PEM"), "{e}");
        assert!(!e.contains(&secret[30..40]), "{e}");
    }
}
