//! TLS termination (rustls with the `ring` provider): certificates loaded
//! and checked from PEM files, the certificate chosen by SNI, the server
//! config a listener's handshakes use, and the handshake itself.
//!
//! A listener's [`Terminator`] is part of its settings: a reload that
//! changes a certificate publishes a new one, new handshakes use it, and
//! every open connection keeps the config it was accepted with (rustls
//! holds it per connection).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, StoresServerSessions};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// A handshake must be done within this from accept.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The lowest protocol version a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinVersion {
    Tls12,
    Tls13,
}

impl MinVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            MinVersion::Tls12 => "1.2",
            MinVersion::Tls13 => "1.3",
        }
    }
}

/// A certificate's files as the config names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Which of a certificate's two files a loading error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Cert,
    Key,
}

/// Why a certificate could not be loaded: the file it is about and what
/// is wrong, for a config error that names the field.
#[derive(Debug)]
pub struct LoadError {
    pub which: Which,
    pub message: String,
}

/// One loaded certificate: what is served, and what status and metrics
/// show of it.
#[derive(Debug)]
pub struct Certificate {
    pub key: Arc<CertifiedKey>,
    /// subjectAltName DNS names, lower case (wildcards as `*.example.com`).
    pub names: Vec<String>,
    pub not_after: SystemTime,
}

/// A listener's TLS: its certificates and the server config built on them.
#[derive(Debug)]
pub struct Terminator {
    pub min_version: MinVersion,
    pub certificates: Arc<[Certificate]>,
    pub config: Arc<ServerConfig>,
    /// Where the certificates were read from (`--watch` watches them).
    pub files: Vec<CertFiles>,
    /// The files and their contents as loaded: two terminators are the
    /// same when these are (a reload keeps an unchanged one).
    fingerprint: [u8; 32],
}

impl PartialEq for Terminator {
    fn eq(&self, other: &Terminator) -> bool {
        self.min_version == other.min_version && self.fingerprint == other.fingerprint
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Sessions and tickets shared by every listener and every reload of this
/// process, so a reload does not force resumed clients into full
/// handshakes.
fn session_cache() -> Arc<dyn StoresServerSessions> {
    static CACHE: std::sync::LazyLock<Arc<rustls::server::ServerSessionMemoryCache>> =
        std::sync::LazyLock::new(|| rustls::server::ServerSessionMemoryCache::new(20_000));
    CACHE.clone()
}

fn ticketer() -> Result<Arc<dyn rustls::server::ProducesTickets>, rustls::Error> {
    static TICKETER: std::sync::OnceLock<Arc<dyn rustls::server::ProducesTickets>> =
        std::sync::OnceLock::new();
    if let Some(t) = TICKETER.get() {
        return Ok(t.clone());
    }
    let t = rustls::crypto::ring::Ticketer::new()?;
    Ok(TICKETER.get_or_init(|| t).clone())
}

impl Terminator {
    /// Load and check every certificate (a missing file, a PEM that does
    /// not parse, a key that does not match, a certificate outside its
    /// validity period are errors: the index of the entry and the error),
    /// and build the server config. `http` selects ALPN `http/1.1`.
    pub fn load(
        files: &[CertFiles],
        min_version: MinVersion,
        http: bool,
    ) -> Result<Terminator, (usize, LoadError)> {
        use sha2::Digest;
        let provider = provider();
        let mut fingerprint = sha2::Sha256::new();
        let mut certificates = Vec::with_capacity(files.len());
        for (i, f) in files.iter().enumerate() {
            let (cert, bytes) = load_one(f, &provider).map_err(|e| (i, e))?;
            fingerprint.update(f.cert.as_os_str().as_encoded_bytes());
            fingerprint.update([0]);
            fingerprint.update(f.key.as_os_str().as_encoded_bytes());
            fingerprint.update([0]);
            fingerprint.update(bytes);
            certificates.push(cert);
        }
        // The ALPN choice is part of what was loaded (http mode offers
        // http/1.1, tcp mode nothing).
        fingerprint.update([u8::from(http)]);
        let certificates: Arc<[Certificate]> = certificates.into();
        let versions: &[&'static rustls::SupportedProtocolVersion] = match min_version {
            MinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            MinVersion::Tls13 => &[&rustls::version::TLS13],
        };
        let internal = |e: rustls::Error| {
            (
                0,
                LoadError {
                    which: Which::Cert,
                    message: format!("TLS setup failed: {e}"),
                },
            )
        };
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .map_err(internal)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Sni(certificates.clone())));
        if http {
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
        }
        config.session_storage = session_cache();
        config.ticketer = ticketer().map_err(internal)?;
        Ok(Terminator {
            min_version,
            certificates,
            config: Arc::new(config),
            files: files.to_vec(),
            fingerprint: fingerprint.finalize().into(),
        })
    }
}

/// Read one certificate chain and its key; the certificate and the bytes
/// of both files (for the fingerprint).
fn load_one(
    f: &CertFiles,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<(Certificate, Vec<u8>), LoadError> {
    let err = |which, message: String| LoadError { which, message };
    let read = |which, path: &Path| {
        std::fs::read(path).map_err(|e| err(which, format!("cannot read {}: {e}", path.display())))
    };
    let cert_pem = read(Which::Cert, &f.cert)?;
    let key_pem = read(Which::Key, &f.key)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| err(Which::Cert, format!("{}: not PEM: {e}", f.cert.display())))?;
    let Some(leaf) = chain.first() else {
        return Err(err(
            Which::Cert,
            format!("{}: no CERTIFICATE in the file", f.cert.display()),
        ));
    };
    let (names, not_before, not_after) = describe(leaf).map_err(|e| {
        err(
            Which::Cert,
            format!("{}: not a certificate: {e}", f.cert.display()),
        )
    })?;
    let now = SystemTime::now();
    if now < not_before {
        return Err(err(
            Which::Cert,
            format!(
                "{}: not valid before {}",
                f.cert.display(),
                humantime::format_rfc3339_seconds(not_before)
            ),
        ));
    }
    if now > not_after {
        return Err(err(
            Which::Cert,
            format!(
                "{}: expired at {}",
                f.cert.display(),
                humantime::format_rfc3339_seconds(not_after)
            ),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        err(
            Which::Key,
            format!("{}: no private key in PEM: {e}", f.key.display()),
        )
    })?;
    let signing = provider.key_provider.load_private_key(key).map_err(|e| {
        err(
            Which::Key,
            format!("{}: unusable private key: {e}", f.key.display()),
        )
    })?;
    let key = CertifiedKey::new(chain, signing);
    key.keys_match().map_err(|e| {
        err(
            Which::Key,
            format!(
                "{}: does not match the certificate {} ({e})",
                f.key.display(),
                f.cert.display()
            ),
        )
    })?;
    let mut bytes = cert_pem;
    bytes.extend_from_slice(&key_pem);
    Ok((
        Certificate {
            key: Arc::new(key),
            names,
            not_after,
        },
        bytes,
    ))
}

/// A certificate's subjectAltName DNS names and validity period.
fn describe(
    der: &CertificateDer<'_>,
) -> Result<(Vec<String>, SystemTime, SystemTime), x509_cert::der::Error> {
    use x509_cert::der::Decode;
    use x509_cert::ext::pkix::SubjectAltName;
    use x509_cert::ext::pkix::name::GeneralName;
    let cert = x509_cert::Certificate::from_der(der.as_ref())?;
    let tbs = cert.tbs_certificate();
    let validity = tbs.validity();
    let mut names = Vec::new();
    if let Some((_critical, san)) = tbs.get_extension::<SubjectAltName>()? {
        for name in san.0 {
            if let GeneralName::DnsName(n) = name {
                names.push(n.as_str().to_ascii_lowercase());
            }
        }
    }
    Ok((
        names,
        validity.not_before.to_system_time(),
        validity.not_after.to_system_time(),
    ))
}

/// Whether a certificate name matches a requested host name: equal, or a
/// `*.` wildcard standing for exactly one leftmost label (RFC 6125 §6.4.3).
pub fn name_matches(pattern: &str, host: &str) -> bool {
    let host = host.trim_end_matches('.');
    match pattern.strip_prefix("*.") {
        Some(suffix) => matches!(host.split_once('.'),
            Some((label, rest)) if !label.is_empty() && rest.eq_ignore_ascii_case(suffix)),
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// The certificate for a ClientHello: the first whose names match its SNI
/// (an exact name before a wildcard), else the first certificate.
#[derive(Debug)]
struct Sni(Arc<[Certificate]>);

impl Sni {
    fn choose(&self, sni: Option<&str>) -> Option<&Certificate> {
        let matching = |host: &str, wildcards: bool| {
            self.0.iter().find(|c| {
                c.names
                    .iter()
                    .any(|n| n.starts_with("*.") == wildcards && name_matches(n, host))
            })
        };
        sni.and_then(|host| matching(host, false).or_else(|| matching(host, true)))
            .or_else(|| self.0.first())
    }
}

impl ResolvesServerCert for Sni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.choose(hello.server_name()).map(|c| c.key.clone())
    }
}

/// How a handshake ended.
pub enum Handshake {
    Done(Box<TlsStream<TcpStream>>),
    /// The client closed (or sent nothing and went) before a ClientHello:
    /// not a failed handshake (port checks, load balancer probes).
    Silent,
    Failed(String),
}

/// Run the server side of a handshake on an accepted connection, within
/// [`HANDSHAKE_TIMEOUT`].
pub async fn handshake(config: Arc<ServerConfig>, stream: TcpStream) -> Handshake {
    let work = async {
        // A connection closed before its first byte is not a handshake.
        let mut first = [0u8; 1];
        match stream.peek(&mut first).await {
            Ok(0) | Err(_) => return Handshake::Silent,
            Ok(_) => {}
        }
        match tokio_rustls::TlsAcceptor::from(config).accept(stream).await {
            Ok(tls) => Handshake::Done(Box::new(tls)),
            Err(e) => Handshake::Failed(e.to_string()),
        }
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, work).await {
        Ok(h) => h,
        Err(_) => Handshake::Failed(format!(
            "no complete handshake within {}s",
            HANDSHAKE_TIMEOUT.as_secs()
        )),
    }
}

/// Failed handshakes are summed up in the log at most once a minute per
/// listener, never a line each: scanners would flood it.
#[derive(Debug, Default)]
pub struct FailureLog(std::sync::Mutex<FailureWindow>);

#[derive(Debug, Default)]
struct FailureWindow {
    since: Option<std::time::Instant>,
    count: u64,
    last: String,
}

/// How often the failure summary may be written.
const SUMMARY_EVERY: Duration = Duration::from_secs(60);

impl FailureLog {
    /// Note a failure; `Some((count, last error))` when a summary is due.
    pub fn note(&self, error: String) -> Option<(u64, String)> {
        let mut w = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        w.count += 1;
        w.last = error;
        match w.since {
            Some(since) if now.duration_since(since) < SUMMARY_EVERY => None,
            _ => {
                w.since = Some(now);
                let count = std::mem::take(&mut w.count);
                Some((count, std::mem::take(&mut w.last)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_one_label() {
        assert!(name_matches("*.example.com", "a.example.com"));
        assert!(name_matches("*.example.com", "A.Example.COM."));
        assert!(!name_matches("*.example.com", "example.com"));
        assert!(!name_matches("*.example.com", "a.b.example.com"));
        assert!(!name_matches("*.example.com", ".example.com"));
        assert!(name_matches("www.example.com", "WWW.example.com"));
        assert!(!name_matches("www.example.com", "xwww.example.com"));
    }

    #[test]
    fn failures_are_summed_once_a_minute() {
        let log = FailureLog::default();
        assert_eq!(log.note("a".into()), Some((1, "a".into())));
        assert_eq!(log.note("b".into()), None);
        assert_eq!(log.note("c".into()), None);
        // The next summary (a minute on) carries the two since.
        log.0.lock().unwrap().since = Some(std::time::Instant::now() - SUMMARY_EVERY);
        assert_eq!(log.note("d".into()), Some((3, "d".into())));
    }
}
