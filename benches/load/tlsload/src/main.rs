//! TLS load generator for row 8 of `benches/load/run.sh`: new TLS
//! connections with fixed concurrency, each a full handshake (no session is
//! ever resumed), optionally one HTTP request on each.
//!
//! ```text
//! tlsload ADDR [--conns N] [--duration S] [--tls 1.2|1.3] [--sni NAME]
//!              [--suite NAME] [--kx NAME] [--alpn PROTO] [--path PATH | --handshake-only]
//! ```
//!
//! `--conns` tasks each loop until `--duration` seconds have passed:
//! connect, handshake, then (default) send `GET PATH HTTP/1.1` with
//! `Connection: close` and read until the server closes, or
//! (`--handshake-only`) send close_notify and read until the server closes.
//! A connection in progress at the deadline is finished and counted in
//! `handshakes` (the balancer spent CPU on it) but not in `in_window`, which
//! gives `rate`. One line on stdout:
//!
//! ```text
//! handshakes=N in_window=N seconds=S rate=R errors=N resumed=N bad=N p50_ms=X p99_ms=Y version=V suite=S kx=K alpn=A
//! ```
//!
//! `resumed` counts handshakes the client library reports as resumed (it
//! must be 0: the session store forgets every ticket and session, while the
//! client still asks for them, as a browser would, so the server issues and
//! encrypts tickets as for any client); `bad` counts responses that are not
//! `200`. The certificate chain is not checked (like `SSL_VERIFY_NONE`), the
//! handshake signature is (CertificateVerify / ServerKeyExchange). Only one
//! cipher suite (default `TLS13_AES_128_GCM_SHA256`, or for 1.2 the
//! ECDHE-ECDSA and ECDHE-RSA AES-128-GCM suites) and the key-exchange groups
//! `X25519,secp256r1` (`--kx`, in the ring provider's order: the TLS 1.3 key
//! share is X25519) are offered, so servers that prefer X25519 negotiate the
//! same. P-256 is offered too because in TLS 1.2 the client's group list also
//! names the curves it accepts in ECDSA certificates (RFC 8422 §5.1.1), and
//! OpenSSL refuses a P-256 certificate to a client that offers only X25519.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{
    ClientSessionStore, Resumption, Tls12ClientSessionValue, Tls13ClientSessionValue,
};
use rustls::crypto::{WebPkiSupportedAlgorithms, ring};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, HandshakeKind, NamedGroup, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A connection that takes longer than this is an error.
const CONN_TIMEOUT: Duration = Duration::from_secs(10);

struct Args {
    addr: SocketAddr,
    conns: usize,
    duration: Duration,
    tls13: bool,
    sni: String,
    suite: Option<String>,
    kx: String,
    alpn: Option<String>,
    path: Option<String>,
}

fn usage() -> ! {
    eprintln!(
        "usage: tlsload ADDR [--conns N] [--duration S] [--tls 1.2|1.3] [--sni NAME] [--suite NAME] \
         [--kx NAME] [--alpn PROTO|none] [--path PATH | --handshake-only]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut it = std::env::args().skip(1);
    let Some(addr) = it.next().and_then(|a| a.parse().ok()) else {
        usage()
    };
    let mut a = Args {
        addr,
        conns: 50,
        duration: Duration::from_secs(5),
        tls13: true,
        sni: "bench.test".into(),
        suite: None,
        kx: "X25519,secp256r1".into(),
        alpn: Some("http/1.1".into()),
        path: Some("/".into()),
    };
    while let Some(flag) = it.next() {
        if flag == "--handshake-only" {
            a.path = None;
            continue;
        }
        let Some(v) = it.next() else { usage() };
        match flag.as_str() {
            "--conns" => a.conns = v.parse().unwrap_or_else(|_| usage()),
            "--duration" => {
                a.duration = Duration::from_secs_f64(v.parse().unwrap_or_else(|_| usage()))
            }
            "--tls" => {
                a.tls13 = match v.as_str() {
                    "1.3" => true,
                    "1.2" => false,
                    _ => usage(),
                }
            }
            "--sni" => a.sni = v,
            "--suite" => a.suite = Some(v),
            "--kx" => a.kx = v,
            "--alpn" => a.alpn = (v != "none").then_some(v),
            "--path" => a.path = Some(v),
            _ => usage(),
        }
    }
    if a.conns == 0 {
        usage()
    }
    a
}

/// Checks the handshake signature, not the chain (the bench's certificates
/// are self-signed), like OpenSSL clients with `SSL_VERIFY_NONE`.
#[derive(Debug)]
struct SignatureOnly(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for SignatureOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// A session store that keeps nothing: every handshake is a full one,
/// although the client offers resumption (the server issues tickets).
#[derive(Debug)]
struct Forget;

impl ClientSessionStore for Forget {
    fn set_kx_hint(&self, _: ServerName<'static>, _: NamedGroup) {}
    fn kx_hint(&self, _: &ServerName<'_>) -> Option<NamedGroup> {
        None
    }
    fn set_tls12_session(&self, _: ServerName<'static>, _: Tls12ClientSessionValue) {}
    fn tls12_session(&self, _: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        None
    }
    fn remove_tls12_session(&self, _: &ServerName<'static>) {}
    fn insert_tls13_ticket(&self, _: ServerName<'static>, _: Tls13ClientSessionValue) {}
    fn take_tls13_ticket(&self, _: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        None
    }
}

fn client_config(a: &Args) -> Result<ClientConfig, String> {
    let mut p = ring::default_provider();
    let default_suites: &[&str] = if a.tls13 {
        &["TLS13_AES_128_GCM_SHA256"]
    } else {
        &[
            "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
            "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        ]
    };
    let wanted: Vec<&str> = match &a.suite {
        Some(s) => s.split(',').collect(),
        None => default_suites.to_vec(),
    };
    p.cipher_suites
        .retain(|s| wanted.iter().any(|w| format!("{:?}", s.suite()) == *w));
    if p.cipher_suites.is_empty() {
        return Err(format!(
            "no cipher suite of {wanted:?} in the ring provider"
        ));
    }
    p.kx_groups.retain(|g| {
        a.kx.split(',')
            .any(|k| format!("{:?}", g.name()).eq_ignore_ascii_case(k))
    });
    if p.kx_groups.is_empty() {
        return Err(format!(
            "no key-exchange group {} in the ring provider",
            a.kx
        ));
    }
    let algs = p.signature_verification_algorithms;
    let version: &'static rustls::SupportedProtocolVersion = if a.tls13 {
        &rustls::version::TLS13
    } else {
        &rustls::version::TLS12
    };
    let mut cfg = ClientConfig::builder_with_provider(Arc::new(p))
        .with_protocol_versions(&[version])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SignatureOnly(algs)))
        .with_no_client_auth();
    cfg.resumption = Resumption::store(Arc::new(Forget));
    cfg.alpn_protocols = a.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(cfg)
}

#[derive(Default)]
struct Stats {
    handshakes: u64,
    in_window: u64,
    errors: u64,
    resumed: u64,
    bad: u64,
    lat_us: Vec<u32>,
    first_error: Option<String>,
    info: Option<String>,
}

struct Done {
    resumed: bool,
    ok: bool,
    info: String,
}

async fn one(
    connector: &TlsConnector,
    addr: SocketAddr,
    name: &ServerName<'static>,
    request: Option<&[u8]>,
    want_info: bool,
) -> Result<Done, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
    let mut tls = connector
        .connect(name.clone(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (_, conn) = tls.get_ref();
    let resumed = conn.handshake_kind() == Some(HandshakeKind::Resumed);
    let info = if want_info {
        format!(
            "version={:?} suite={:?} kx={:?} alpn={}",
            conn.protocol_version()
                .unwrap_or(rustls::ProtocolVersion::Unknown(0)),
            conn.negotiated_cipher_suite().map(|s| s.suite()),
            conn.negotiated_key_exchange_group().map(|g| g.name()),
            conn.alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .unwrap_or_else(|| "none".into())
        )
        .replace("Some(", "")
        .replace(')', "")
    } else {
        String::new()
    };
    match request {
        Some(req) => tls
            .write_all(req)
            .await
            .map_err(|e| format!("write: {e}"))?,
        None => tls
            .shutdown()
            .await
            .map_err(|e| format!("close_notify: {e}"))?,
    }
    // Read until the server closes (its close_notify or its FIN).
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 4096];
    loop {
        match tls.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                if head.len() < 16 {
                    head.extend_from_slice(&buf[..n]);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            // After our close_notify a reset is a close too.
            Err(_) if request.is_none() => break,
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    let ok =
        request.is_none() || head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200");
    Ok(Done { resumed, ok, info })
}

async fn worker(
    connector: TlsConnector,
    addr: SocketAddr,
    name: ServerName<'static>,
    request: Option<Arc<[u8]>>,
    deadline: Instant,
    want_info: bool,
) -> Stats {
    let mut s = Stats::default();
    while Instant::now() < deadline {
        let t0 = Instant::now();
        let r = tokio::time::timeout(
            CONN_TIMEOUT,
            one(
                &connector,
                addr,
                &name,
                request.as_deref(),
                want_info && s.info.is_none(),
            ),
        )
        .await
        .unwrap_or_else(|_| Err(format!("no close within {}s", CONN_TIMEOUT.as_secs())));
        let t1 = Instant::now();
        match r {
            Ok(d) => {
                s.handshakes += 1;
                if t1 <= deadline {
                    s.in_window += 1;
                }
                s.resumed += u64::from(d.resumed);
                s.bad += u64::from(!d.ok);
                s.lat_us
                    .push((t1 - t0).as_micros().min(u32::MAX as u128) as u32);
                if s.info.is_none() && !d.info.is_empty() {
                    s.info = Some(d.info);
                }
            }
            Err(e) => {
                s.errors += 1;
                s.first_error.get_or_insert(e);
                // Do not spin on a refused port.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    s
}

fn main() {
    let a = parse_args();
    let cfg = match client_config(&a) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tlsload: {e}");
            std::process::exit(2);
        }
    };
    let name = match ServerName::try_from(a.sni.clone()) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("tlsload: --sni {}: {e}", a.sni);
            std::process::exit(2);
        }
    };
    let request: Option<Arc<[u8]>> = a.path.as_ref().map(|p| {
        format!(
            "GET {p} HTTP/1.1\r\nHost: {}\r\nUser-Agent: tlsload\r\nConnection: close\r\n\r\n",
            a.sni
        )
        .into_bytes()
        .into()
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let connector = TlsConnector::from(Arc::new(cfg));
    let start = Instant::now();
    let deadline = start + a.duration;
    let mut total = Stats::default();
    rt.block_on(async {
        let tasks: Vec<_> = (0..a.conns)
            .map(|i| {
                tokio::spawn(worker(
                    connector.clone(),
                    a.addr,
                    name.clone(),
                    request.clone(),
                    deadline,
                    i == 0,
                ))
            })
            .collect();
        for t in tasks {
            let s = t.await.expect("worker panicked");
            total.handshakes += s.handshakes;
            total.in_window += s.in_window;
            total.errors += s.errors;
            total.resumed += s.resumed;
            total.bad += s.bad;
            total.lat_us.extend(s.lat_us);
            if total.first_error.is_none() {
                total.first_error = s.first_error;
            }
            if total.info.is_none() {
                total.info = s.info;
            }
        }
    });
    let secs = a.duration.as_secs_f64();
    total.lat_us.sort_unstable();
    let pct = |p: f64| -> f64 {
        if total.lat_us.is_empty() {
            return 0.0;
        }
        let i = ((p * total.lat_us.len() as f64).ceil() as usize).clamp(1, total.lat_us.len()) - 1;
        f64::from(total.lat_us[i]) / 1000.0
    };
    if let Some(e) = &total.first_error {
        eprintln!("tlsload: {} errors, first: {e}", total.errors);
    }
    println!(
        "handshakes={} in_window={} seconds={:.3} rate={:.0} errors={} resumed={} bad={} p50_ms={:.3} p99_ms={:.3} {}",
        total.handshakes,
        total.in_window,
        secs,
        total.in_window as f64 / secs,
        total.errors,
        total.resumed,
        total.bad,
        pct(0.50),
        pct(0.99),
        total
            .info
            .as_deref()
            .unwrap_or("version=none suite=none kx=none alpn=none"),
    );
}
