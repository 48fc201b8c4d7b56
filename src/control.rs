//! `switchyard status` and `switchyard state`: the command line's side of
//! the admin endpoint, for people at a shell and for scripts.
//!
//! Both speak plain HTTP/1.1 to the endpoint (`GET /api/v1/status`,
//! `PUT …/state`). Where the endpoint is and which token to present
//! default to the `[admin]` table of the config file, so on a node
//! installed from the package `switchyard status` needs no arguments.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;

use crate::config;

/// Where `--admin` points when neither it nor a readable config says.
pub const DEFAULT_ADMIN_URL: &str = "http://127.0.0.1:9900";

/// A connect or a whole exchange with the endpoint must finish within
/// this; a wedged daemon gives a clear error, not a hanging shell.
const TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong, phrased for the person who ran the command: each
/// message says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{0}")]
    Usage(String),
    #[error(
        "cannot reach the admin endpoint at {url}: {reason}\n\
         hint: is switchyard running (`systemctl status switchyard`), and is \
         this its [admin] bind? Pass --admin URL otherwise"
    )]
    Unreachable { url: String, reason: String },
    #[error(
        "the daemon refused the change: {reason}\n\
         hint: pass --token-file with the file named by [admin] token_file \
         (readable by root and the switchyard user)"
    )]
    Unauthorized { reason: String },
    #[error("{message}\nhint: `switchyard status` lists the listeners and backends")]
    NotFound { message: String },
    #[error("the admin endpoint answered {status}: {message}")]
    Refused { status: StatusCode, message: String },
}

/// The admin endpoint's address, from `http://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminUrl {
    /// `host:port` as given (for the `Host` header and messages).
    authority: String,
}

impl AdminUrl {
    pub fn parse(url: &str) -> Result<AdminUrl, ControlError> {
        let bad = |why: &str| ControlError::Usage(format!("--admin {url}: {why}"));
        // `HOST:PORT` alone means http://HOST:PORT.
        let full = match url.contains("://") {
            true => url.to_owned(),
            false => format!("http://{url}"),
        };
        let uri: hyper::Uri = full.parse().map_err(|_| bad("not a URL"))?;
        match uri.scheme_str() {
            Some("http") | None => {}
            Some(_) => return Err(bad("the admin endpoint speaks plain http://")),
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad("give only http://HOST:PORT"));
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        let port = authority.port_u16().unwrap_or(80);
        Ok(AdminUrl {
            authority: format!("{}:{port}", authority.host()),
        })
    }

    /// The URL a daemon bound to `bind` is reached at from this host: an
    /// unspecified address (`0.0.0.0`, `[::]`) is reached on loopback.
    pub fn for_bind(bind: SocketAddr) -> AdminUrl {
        let ip = match bind.ip() {
            ip if !ip.is_unspecified() => ip,
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        };
        AdminUrl {
            authority: SocketAddr::new(ip, bind.port()).to_string(),
        }
    }
}

impl std::fmt::Display for AdminUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}", self.authority)
    }
}

/// The endpoint and token to use: `--admin` / `--token-file` where given,
/// else the config file's `[admin]` (if it can be read), else
/// [`DEFAULT_ADMIN_URL`] and no token.
pub fn target(
    admin: Option<&str>,
    token_file: Option<&Path>,
    config_path: &Path,
) -> Result<(AdminUrl, Option<String>), ControlError> {
    let from_config = || config::load_file(config_path).ok().and_then(|c| c.admin);
    let mut configured = None;
    let url = match admin {
        Some(url) => AdminUrl::parse(url)?,
        None => {
            configured = from_config();
            match &configured {
                Some(a) => AdminUrl::for_bind(a.bind),
                None => AdminUrl::parse(DEFAULT_ADMIN_URL)?,
            }
        }
    };
    let token = match token_file {
        Some(path) => Some(
            config::read_token(path)
                .map_err(|e| ControlError::Usage(format!("--token-file: {e}")))?
                .expose()
                .to_owned(),
        ),
        // The configured token belongs to the configured endpoint only.
        None if admin.is_none() => configured
            .and_then(|a| a.token)
            .map(|t| t.expose().to_owned()),
        None => None,
    };
    Ok((url, token))
}

/// One request to the endpoint: the status and the body as text.
async fn exchange(
    url: &AdminUrl,
    method: Method,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> Result<(StatusCode, String), ControlError> {
    let unreachable = |reason: String| ControlError::Unreachable {
        url: url.to_string(),
        reason,
    };
    let work = async {
        let stream = tokio::net::TcpStream::connect(&url.authority)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(conn);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &url.authority)
            .header(hyper::header::USER_AGENT, "switchyard-cli");
        if let Some(token) = token {
            request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_owned())))
            .map_err(|e| ControlError::Usage(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        Ok((
            status,
            String::from_utf8_lossy(&bytes).trim_end().to_owned(),
        ))
    };
    tokio::time::timeout(TIMEOUT, work)
        .await
        .map_err(|_| unreachable(format!("no answer within {}s", TIMEOUT.as_secs())))?
}

/// `GET /api/v1/status`, as the endpoint sent it.
pub async fn fetch_status(url: &AdminUrl) -> Result<String, ControlError> {
    match exchange(url, Method::GET, "/api/v1/status", "", None).await? {
        (StatusCode::OK, body) => Ok(body),
        (status, message) => Err(ControlError::Refused { status, message }),
    }
}

/// Set a backend's admin state; the endpoint's answer on success.
pub async fn set_state(
    url: &AdminUrl,
    token: Option<&str>,
    listener: &str,
    backend: &str,
    state: &str,
) -> Result<String, ControlError> {
    use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
    let path = format!(
        "/api/v1/listeners/{}/backends/{}/state",
        utf8_percent_encode(listener, NON_ALPHANUMERIC),
        utf8_percent_encode(backend, NON_ALPHANUMERIC)
    );
    match exchange(url, Method::PUT, &path, state, token).await? {
        (StatusCode::OK, body) => Ok(body),
        (StatusCode::UNAUTHORIZED, message) => Err(ControlError::Unauthorized {
            reason: if token.is_some() {
                format!("wrong token ({message})")
            } else {
                format!("no token given ({message})")
            },
        }),
        (StatusCode::NOT_FOUND, message) => Err(ControlError::NotFound { message }),
        (status, message) => Err(ControlError::Refused { status, message }),
    }
}

/// The parts of `/api/v1/status` the table shows.
#[derive(Debug, Deserialize)]
pub struct Status {
    pub listeners: Vec<ListenerStatus>,
}

#[derive(Debug, Deserialize)]
pub struct ListenerStatus {
    pub name: String,
    pub bind: String,
    pub mode: String,
    pub algorithm: String,
    pub active_connections: u64,
    pub backends: Vec<BackendStatus>,
}

#[derive(Debug, Deserialize)]
pub struct BackendStatus {
    pub name: String,
    pub resolved_address: String,
    pub health: String,
    pub check_reason: Option<String>,
    pub role: Option<String>,
    pub admin_state: String,
    pub in_rotation: bool,
    pub active_connections: u64,
    pub connections_total: u64,
    pub connect_errors_total: u64,
}

impl Status {
    pub fn parse(json: &str) -> Result<Status, ControlError> {
        serde_json::from_str(json).map_err(|e| ControlError::Refused {
            status: StatusCode::OK,
            message: format!("unexpected status document: {e}"),
        })
    }

    /// Listeners with no backend that takes new connections.
    pub fn unusable(&self) -> impl Iterator<Item = &ListenerStatus> {
        self.listeners
            .iter()
            .filter(|l| !l.backends.iter().any(|b| b.in_rotation))
    }

    /// The table `switchyard status` prints; ANSI colour when `colour`.
    pub fn table(&self, colour: bool) -> String {
        const HEADINGS: [&str; 8] = [
            "BACKEND", "ADDRESS", "HEALTH", "ADMIN", "ROLE", "ACTIVE", "TOTAL", "ERRORS",
        ];
        let mut out = String::new();
        for (i, l) in self.listeners.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            let usable = l.backends.iter().any(|b| b.in_rotation);
            let _ = writeln!(
                out,
                "{} {} ({}, {}) active {}{}",
                paint(colour, BOLD, &l.name),
                l.bind,
                l.mode,
                l.algorithm,
                l.active_connections,
                if usable {
                    String::new()
                } else {
                    format!("  {}", paint(colour, RED, "NO USABLE BACKEND"))
                },
            );
            let rows: Vec<[String; 8]> = l
                .backends
                .iter()
                .map(|b| {
                    [
                        b.name.clone(),
                        b.resolved_address.clone(),
                        b.health.clone(),
                        b.admin_state.clone(),
                        b.role.clone().unwrap_or_else(|| "-".into()),
                        b.active_connections.to_string(),
                        b.connections_total.to_string(),
                        b.connect_errors_total.to_string(),
                    ]
                })
                .collect();
            let mut widths = HEADINGS.map(str::len);
            for row in &rows {
                for (w, cell) in widths.iter_mut().zip(row) {
                    *w = (*w).max(cell.chars().count());
                }
            }
            let line = |cells: [&str; 8], paints: [Option<&str>; 8]| {
                let mut s = String::from(" ");
                for (k, cell) in cells.iter().enumerate() {
                    let pad = widths[k] - cell.chars().count();
                    // Numbers right-aligned, words left-aligned.
                    let (before, after) = if k >= 5 { (pad, 0) } else { (0, pad) };
                    let shown = match paints[k] {
                        Some(code) => paint(colour, code, cell),
                        None => (*cell).to_owned(),
                    };
                    let _ = write!(s, " {}{shown}{}", " ".repeat(before), " ".repeat(after));
                }
                s.truncate(s.trim_end().len());
                s
            };
            let _ = writeln!(out, "{}", line(HEADINGS, [None; 8]));
            for (row, b) in rows.iter().zip(&l.backends) {
                let health = (b.health == "up").then_some(GREEN).or(Some(RED));
                let admin = (b.admin_state != "ready").then_some(YELLOW);
                let cells = row.each_ref().map(String::as_str);
                let mut text = line(cells, [None, None, health, admin, None, None, None, None]);
                if b.health != "up"
                    && let Some(reason) = b.check_reason.as_deref().filter(|r| !r.is_empty())
                {
                    let _ = write!(text, "  ({reason})");
                }
                let _ = writeln!(out, "{text}");
            }
        }
        out
    }
}

const BOLD: &str = "1";
const RED: &str = "31";
const GREEN: &str = "32";
const YELLOW: &str = "33";

fn paint(colour: bool, code: &str, text: &str) -> String {
    if colour {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_urls() {
        assert_eq!(
            AdminUrl::parse("http://127.0.0.1:9900")
                .unwrap()
                .to_string(),
            "http://127.0.0.1:9900"
        );
        assert_eq!(
            AdminUrl::parse("127.0.0.1:9901/").unwrap().to_string(),
            "http://127.0.0.1:9901"
        );
        assert_eq!(
            AdminUrl::parse("http://lb1").unwrap().to_string(),
            "http://lb1:80"
        );
        assert!(AdminUrl::parse("https://127.0.0.1:9900").is_err());
        assert!(AdminUrl::parse("http://127.0.0.1:9900/api").is_err());
        assert_eq!(
            AdminUrl::for_bind("0.0.0.0:9900".parse().unwrap()).to_string(),
            "http://127.0.0.1:9900"
        );
        assert_eq!(
            AdminUrl::for_bind("[::]:9900".parse().unwrap()).to_string(),
            "http://[::1]:9900"
        );
        assert_eq!(
            AdminUrl::for_bind("10.0.0.5:9900".parse().unwrap()).to_string(),
            "http://10.0.0.5:9900"
        );
    }
}
