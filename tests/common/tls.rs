//! TLS for the end-to-end tests: a CA made with rcgen, leaf certificates
//! for given names as PEM files, clients that trust only that CA, and the
//! `[listener.tls]` table that loads them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

use super::within;

pub struct Ca {
    pub issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub fn new() -> Ca {
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "switchyard test CA");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        Ca {
            issuer: CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// A leaf for `names`, valid from yesterday for `days` more days
    /// (negative: already expired); its chain and key as PEM files in
    /// `dir`, and its DER.
    pub fn leaf(
        &self,
        dir: &Path,
        file: &str,
        names: &[&str],
        days: i64,
    ) -> (PathBuf, PathBuf, Vec<u8>) {
        let mut p = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::days(if days < 0 { 30 } else { 1 });
        p.not_after = now + time::Duration::days(days);
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap();
        let leaf = p.signed_by(&key, &self.issuer).unwrap();
        let (cert, key_path) = (
            dir.join(format!("{file}.pem")),
            dir.join(format!("{file}.key")),
        );
        std::fs::write(&cert, format!("{}{}", leaf.pem(), self.issuer.pem())).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert, key_path, leaf.der().to_vec())
    }

    pub fn client(&self, sni: bool) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.issuer.der().clone()).unwrap();
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        cfg.enable_sni = sni;
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
    }
}

pub type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// A verified TLS connection to `addr` for `name`; the certificate the
/// server presented.
pub async fn connect(ca: &Ca, addr: SocketAddr, name: &str, sni: bool) -> (Tls, Vec<u8>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(name.to_owned()).unwrap();
    let tls = within("TLS handshake", ca.client(sni).connect(name, tcp))
        .await
        .expect("handshake verifies against the test CA");
    let presented: CertificateDer<'_> = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let der = presented.to_vec();
    (tls, der)
}

pub fn tls_table(files: &[(PathBuf, PathBuf)]) -> String {
    let mut s = String::from("[listener.tls]\ncertificates = [\n");
    for (cert, key) in files {
        s += &format!(
            "  {{ cert = \"{}\", key = \"{}\" }},\n",
            cert.display(),
            key.display()
        );
    }
    s + "]\n"
}

/// Write `msg` over TLS and read as many bytes back.
pub async fn echo_tls(s: &mut Tls, msg: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(msg).await.unwrap();
    let mut back = vec![0; msg.len()];
    within("the echo over TLS", s.read_exact(&mut back))
        .await
        .unwrap();
    back
}
