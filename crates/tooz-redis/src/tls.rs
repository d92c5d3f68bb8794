//! TLS material (`ssl_certfile`, `ssl_keyfile`, `ssl_ca_certs`), read when the
//! coordinator connects.

use redis::{ClientTlsConfig, TlsCertificates};
use tooz_core::{Result, ToozError};

use crate::config::{NAME, TlsSettings};

fn read(option: &str, path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        ToozError::invalid_option(NAME, option, format!("cannot read {}: {e}", path.display()))
    })
}

/// The certificates to hand to the client.
pub(crate) fn certificates(t: &TlsSettings) -> Result<TlsCertificates> {
    let client_tls = match (&t.certfile, &t.keyfile) {
        (Some(c), Some(k)) => Some(ClientTlsConfig {
            client_cert: read("ssl_certfile", c)?,
            client_key: read("ssl_keyfile", k)?,
        }),
        _ => None,
    };
    let root_cert = match &t.ca_certs {
        Some(p) => Some(read("ssl_ca_certs", p)?),
        None => None,
    };
    Ok(TlsCertificates {
        client_tls,
        root_cert,
    })
}
