//! Authentication: mutual TLS 1.3 with per-monitor keys (rustls, ring provider), and a small PKI
//! tool to make the keys.
//!
//! Every monitor has its own key pair and a certificate signed by the deployment's CA. The bridge
//! accepts a TLS session only if the monitor's certificate chains to that CA, and then serves it
//! only if the certificate's SHA-256 is one the bridge's config lists (so revoking a monitor is
//! deleting its entry). Monitors check the bridge's certificate against the same CA and the name
//! `server_name` (default [`DEFAULT_SERVER_NAME`]). TLS gives each session fresh keys and sequence
//! numbers, so a recorded session cannot be replayed, in whole or in part.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The name monitors expect in the bridge's certificate unless told otherwise.
pub const DEFAULT_SERVER_NAME: &str = "backdoors-bridge";

/// Errors loading or making keys and certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// rustls refused the configuration.
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built.
    #[error("TLS client verifier: {0}")]
    Verifier(String),
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A name that cannot be a TLS server name.
    #[error("{0:?} is not a valid server name")]
    ServerName(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate in a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |what: String| TlsError::Pem {
        path: path.to_owned(),
        what,
    };
    let bytes = std::fs::read(path).map_err(|source| TlsError::Io {
        path: path.to_owned(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(pem("no CERTIFICATE block".into()));
    }
    Ok(certs)
}

/// Reads a private key from a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Io {
        path: path.to_owned(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        what: format!("no usable private key: {e}"),
    })
}

/// SHA-256 of a DER certificate, as lower-case hex.
pub fn fingerprint(cert: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, cert);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn roots(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c)?;
    }
    Ok(roots)
}

/// The bridge's TLS configuration: TLS 1.3 only, client certificates required and chained to `ca`.
pub fn server_config(ca: &Path, cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let p = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), p.clone())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let cfg = ServerConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)?;
    Ok(Arc::new(cfg))
}

/// A monitor's identity: its certificate and key, and the CA it trusts the bridge by.
#[derive(Clone, Debug)]
pub struct Identity {
    /// The monitor's name (sent in HELLO).
    pub name: String,
    /// CA certificate (PEM).
    pub ca: PathBuf,
    /// The monitor's certificate (PEM).
    pub cert: PathBuf,
    /// The monitor's key (PEM).
    pub key: PathBuf,
    /// The name in the bridge's certificate.
    pub server_name: String,
}

impl Identity {
    /// The files `pki init`/`pki issue` write for `name` in `dir`.
    pub fn from_pki_dir(dir: &Path, name: &str) -> Identity {
        Identity {
            name: name.to_owned(),
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
            server_name: DEFAULT_SERVER_NAME.to_owned(),
        }
    }

    /// The TLS client configuration for this identity.
    pub fn client_config(&self) -> Result<(Arc<ClientConfig>, ServerName<'static>), TlsError> {
        let cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots(&self.ca)?)
            .with_client_auth_cert(load_certs(&self.cert)?, load_key(&self.key)?)?;
        let name = ServerName::try_from(self.server_name.clone())
            .map_err(|_| TlsError::ServerName(self.server_name.clone()))?;
        Ok((Arc::new(cfg), name))
    }
}

fn write(path: &Path, text: &str, secret: bool) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| TlsError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)
}

fn read_text(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Makes a CA (`ca.pem`, `ca.key`) and the bridge's certificate (`bridge.pem`, `bridge.key`, for
/// `server_name` and `localhost`) in `dir`. Never overwrites an existing file.
pub fn pki_init(dir: &Path, server_name: &str) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let ca_key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "Backdoors CA");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = params.self_signed(&ca_key)?;
    write(&dir.join("ca.pem"), &ca.pem(), false)?;
    write(&dir.join("ca.key"), &ca_key.serialize_pem(), true)?;
    issue(
        dir,
        "bridge",
        vec![server_name.to_owned(), "localhost".to_owned()],
        ExtendedKeyUsagePurpose::ServerAuth,
    )
}

/// Issues a monitor's key and certificate (`NAME.pem`, `NAME.key`) from the CA in `dir`, and
/// returns the certificate's SHA-256.
pub fn pki_issue(dir: &Path, name: &str) -> Result<String, TlsError> {
    let ok = !name.is_empty()
        && name.len() <= crate::wire::MAX_MONITOR_ID
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && name != "bridge"
        && name != "ca";
    if !ok {
        return Err(TlsError::ServerName(format!(
            "{name} (monitor names are 1..=64 of [A-Za-z0-9_-], not \"bridge\" or \"ca\")"
        )));
    }
    issue(
        dir,
        name,
        vec![name.to_owned()],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    let cert = load_certs(&dir.join(format!("{name}.pem")))?;
    Ok(fingerprint(&cert[0]))
}

fn issue(
    dir: &Path,
    name: &str,
    sans: Vec<String>,
    usage: ExtendedKeyUsagePurpose,
) -> Result<(), TlsError> {
    let ca_pem = read_text(&dir.join("ca.pem"))?;
    let ca_key = KeyPair::from_pem(&read_text(&dir.join("ca.key"))?)?;
    let ca = CertificateParams::from_ca_cert_pem(&ca_pem)?.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(sans)?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![usage];
    let cert = params.signed_by(&key, &ca, &ca_key)?;
    write(&dir.join(format!("{name}.pem")), &cert.pem(), false)?;
    write(&dir.join(format!("{name}.key")), &key.serialize_pem(), true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pki_makes_usable_configs_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        pki_init(dir.path(), DEFAULT_SERVER_NAME).unwrap();
        let fp = pki_issue(dir.path(), "mon1").unwrap();
        assert_eq!(fp.len(), 64);
        let d = dir.path();
        server_config(
            &d.join("ca.pem"),
            &d.join("bridge.pem"),
            &d.join("bridge.key"),
        )
        .unwrap();
        Identity::from_pki_dir(d, "mon1").client_config().unwrap();
        assert!(pki_issue(d, "mon1").is_err(), "overwrote a key");
        assert!(
            pki_init(d, DEFAULT_SERVER_NAME).is_err(),
            "overwrote the CA"
        );
        assert!(pki_issue(d, "../evil").is_err());
        assert!(pki_issue(d, "bridge").is_err());
        let e = load_certs(&d.join("mon1.key")).unwrap_err().to_string();
        assert!(e.contains("no CERTIFICATE"), "{e}");
    }
}
