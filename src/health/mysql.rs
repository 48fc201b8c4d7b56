//! `kind = "mysql"`: the server greeting (protocol 10); with `user`, a
//! login and the role from `SELECT @@global.read_only` (`0` = primary,
//! `1` = replica), then `COM_QUIT`. MySQL and MariaDB alike.
//!
//! An error packet in place of the greeting ("Too many connections", "Host
//! … is blocked") or at any later step fails the check with the server's
//! code, SQLSTATE where it gave one, and message, as the `mysql` client
//! prints them. Without `user` the probe closes right after the greeting,
//! which the server counts toward `max_connect_errors` (SPEC says so and
//! asks for a `user` in production).
//!
//! The login speaks `mysql_native_password` and the fast path of
//! `caching_sha2_password` (the server still has the account's hash cached
//! and answers "fast auth OK"). Full authentication would send the password
//! itself, which needs TLS or the server's RSA key: the probe refuses and
//! says so rather than send it in clear. Other plugins are reported by
//! name. The password only ever goes into a scramble; no reason and no log
//! line carries it.
//!
//! The packet framing is written here (it is small and fixed); the hashes
//! come from `sha1` and `sha2`. Every length from the server is capped
//! before anything is allocated for it.

use std::net::SocketAddr;

use sha1::Sha1;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Failure, Outcome, Probe, ProbeFuture};
use crate::config::{HealthCheck, Role, Secret};

/// The longest packet a probe reads. A greeting is about 100 bytes, the
/// rest of a check's packets less; something else on the port has its
/// first bytes read as a length of up to 16 MiB ("HTT" → 5 MB), which must
/// not be allocated.
const MAX_PACKET: usize = 64 * 1024;

/// Packets of one login at most: an answer, an auth switch, "fast auth
/// OK", and the OK.
const MAX_LOGIN_PACKETS: usize = 4;

/// The scramble both hashing plugins use: the greeting's 8 + 12 bytes.
const SCRAMBLE_LEN: usize = 20;

// Capability flags (the protocol's names).
const CLIENT_LONG_PASSWORD: u32 = 0x1;
const CLIENT_PROTOCOL_41: u32 = 0x200;
const CLIENT_SECURE_CONNECTION: u32 = 0x8000;
const CLIENT_PLUGIN_AUTH: u32 = 0x8_0000;

/// What the probe asks for, less what the server lacks: 4.1 packets, a
/// scramble answer with a length byte, and plugin names.
const CLIENT_CAPABILITIES: u32 =
    CLIENT_LONG_PASSWORD | CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION | CLIENT_PLUGIN_AUTH;

/// utf8mb4_general_ci: known to MySQL since 5.5 and to every MariaDB.
const UTF8MB4_GENERAL_CI: u8 = 45;

const COM_QUIT: u8 = 0x01;
const COM_QUERY: u8 = 0x03;

const OK: u8 = 0x00;
const ERR: u8 = 0xff;
/// EOF packets, and the auth switch request while logging in.
const EOF: u8 = 0xfe;
const AUTH_MORE_DATA: u8 = 0x01;

const NATIVE_PASSWORD: &str = "mysql_native_password";
const CACHING_SHA2_PASSWORD: &str = "caching_sha2_password";

/// The role's query: `read_only` is what replicas run with and what
/// failover tools (orchestrator, MHA, MaxScale) clear on promotion.
const ROLE_QUERY: &str = "SELECT @@global.read_only";

const FULL_AUTH: &str =
    "caching_sha2_password needs full authentication (TLS/RSA), not supported by the check";

/// Reads the greeting; with a `user`, logs in and reads the role.
#[derive(Debug)]
pub struct MysqlProbe {
    user: Option<String>,
    password: Option<Secret>,
}

impl MysqlProbe {
    pub fn new(settings: &HealthCheck) -> MysqlProbe {
        MysqlProbe {
            user: settings.user.clone(),
            password: settings.password.clone(),
        }
    }
}

impl Probe for MysqlProbe {
    fn check(&self, addr: SocketAddr) -> ProbeFuture<'_> {
        Box::pin(async move {
            let stream = TcpStream::connect(addr)
                .await
                .map_err(|e| Failure::io(&e))?;
            let mut conn = Conn { stream, seq: 0 };
            let greeting = Greeting::parse(&conn.read().await?)?;
            let Some(user) = &self.user else {
                return Ok(Outcome::default());
            };
            let password = self.password.as_ref().map_or("", Secret::expose);
            login(&mut conn, &greeting, user, password.as_bytes()).await?;
            // Logged in, the session ends with COM_QUIT whatever the
            // query said: the server logs no aborted connection.
            let role = read_only(&mut conn).await;
            let quit = conn.command(&[COM_QUIT]).await;
            let role = role?;
            quit?;
            Ok(Outcome { role: Some(role) })
        })
    }
}

/// What the greeting tells a client.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Greeting {
    /// "8.0.36", or MariaDB's "5.5.5-10.11.6-MariaDB".
    version: String,
    capabilities: u32,
    /// The nonce a password is hashed with (20 bytes from any server of
    /// the last twenty years).
    scramble: Vec<u8>,
    /// The server's default plugin; `None` from servers before plugins.
    plugin: Option<String>,
}

impl Greeting {
    /// A HandshakeV10 packet, or the error packet a server sends instead.
    fn parse(packet: &[u8]) -> Result<Greeting, Failure> {
        match packet.first() {
            Some(&10) => {}
            Some(&ERR) => return Err(server_error(packet)),
            Some(&v) => {
                return Err(Failure(format!(
                    "not a MySQL server greeting (protocol version {v})"
                )));
            }
            None => return Err(Failure("an empty greeting".into())),
        }
        let malformed = || Failure("malformed server greeting".into());
        let mut c = Cursor::new(&packet[1..]);
        let version = c.nul_terminated().ok_or_else(malformed)?;
        let _connection_id = c.u32().ok_or_else(malformed)?;
        let mut scramble = c.take(8).ok_or_else(malformed)?.to_vec();
        let _filler = c.u8().ok_or_else(malformed)?;
        let mut capabilities = u32::from(c.u16().ok_or_else(malformed)?);
        let mut plugin = None;
        if !c.is_empty() {
            let _charset = c.u8().ok_or_else(malformed)?;
            let _status = c.u16().ok_or_else(malformed)?;
            capabilities |= u32::from(c.u16().ok_or_else(malformed)?) << 16;
            let data_len = c.u8().ok_or_else(malformed)?;
            c.take(10).ok_or_else(malformed)?; // reserved (MariaDB: its extra capabilities)
            if capabilities & CLIENT_SECURE_CONNECTION != 0 {
                // The rest of the scramble and a NUL; short in some old
                // servers, which a greeting-only check need not mind.
                let len = usize::from(data_len).saturating_sub(8).max(13);
                let part = c.take(len.min(c.remaining())).unwrap_or_default();
                scramble.extend_from_slice(part.strip_suffix(&[0]).unwrap_or(part));
            }
            if capabilities & CLIENT_PLUGIN_AUTH != 0 {
                // Up to its NUL, which some servers leave out (MySQL bug
                // #59453).
                let rest = c.rest();
                let name = rest.split(|&b| b == 0).next().unwrap_or(rest);
                plugin = Some(String::from_utf8_lossy(name).into_owned());
            }
        }
        Ok(Greeting {
            version: String::from_utf8_lossy(version).into_owned(),
            capabilities,
            scramble,
            plugin,
        })
    }
}

/// Log in as `user`: a HandshakeResponse41 in the server's default plugin
/// if the probe speaks it (else in `mysql_native_password`, and a server
/// whose account uses another plugin asks to switch), then whatever the
/// plugin needs, up to the OK packet.
async fn login(
    conn: &mut Conn,
    greeting: &Greeting,
    user: &str,
    password: &[u8],
) -> Result<(), Failure> {
    if user.contains('\0') {
        return Err(Failure("`user` holds a NUL byte".into()));
    }
    let needed = CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION;
    if greeting.capabilities & needed != needed {
        return Err(Failure::server(&format!(
            "server {} predates the 4.1 protocol, which a login needs",
            greeting.version
        )));
    }
    let mut plugin = match greeting.plugin.as_deref() {
        Some(p @ CACHING_SHA2_PASSWORD) => p,
        _ => NATIVE_PASSWORD,
    };
    let answer = scramble(plugin, password, &greeting.scramble)?.unwrap_or_default();
    let capabilities = CLIENT_CAPABILITIES & greeting.capabilities;
    conn.write(&handshake_response(capabilities, user, &answer, plugin))
        .await?;
    let mut switched = false;
    for _ in 0..MAX_LOGIN_PACKETS {
        let packet = conn.read().await?;
        match packet.first().copied() {
            Some(OK) => return Ok(()),
            Some(ERR) => return Err(server_error(&packet)),
            // AuthSwitchRequest: the account's plugin and a new nonce.
            Some(EOF) if !switched => {
                let (name, nonce) = auth_switch(&packet)?;
                let Some(answer) = scramble(name, password, nonce)? else {
                    return Err(unsupported(name));
                };
                plugin = if name == NATIVE_PASSWORD {
                    NATIVE_PASSWORD
                } else {
                    CACHING_SHA2_PASSWORD
                };
                switched = true;
                conn.write(&answer).await?;
            }
            Some(AUTH_MORE_DATA) if plugin == CACHING_SHA2_PASSWORD => match packet.get(1) {
                Some(3) => {} // fast auth OK: the OK packet follows
                Some(4) => return Err(Failure(FULL_AUTH.into())),
                _ => return Err(unexpected(&packet, "the login")),
            },
            _ => return Err(unexpected(&packet, "the login")),
        }
    }
    Err(Failure("the login did not end".into()))
}

/// The plugin and nonce of an AuthSwitchRequest.
fn auth_switch(packet: &[u8]) -> Result<(&str, &[u8]), Failure> {
    let rest = &packet[1..];
    if rest.is_empty() {
        // The pre-4.1 switch: to the old, broken password hash.
        return Err(unsupported("mysql_old_password"));
    }
    let (name, nonce) = match rest.iter().position(|&b| b == 0) {
        Some(end) => (&rest[..end], &rest[end + 1..]),
        None => (rest, &[][..]),
    };
    let name = std::str::from_utf8(name)
        .map_err(|_| Failure("an auth switch to a plugin name that is not UTF-8".into()))?;
    Ok((name, nonce))
}

/// The answer to `nonce` for `plugin`: `None` for a plugin the probe does
/// not speak. An empty password is answered with nothing, as every client
/// does.
fn scramble(plugin: &str, password: &[u8], nonce: &[u8]) -> Result<Option<Vec<u8>>, Failure> {
    if plugin != NATIVE_PASSWORD && plugin != CACHING_SHA2_PASSWORD {
        return Ok(None);
    }
    if password.is_empty() {
        return Ok(Some(Vec::new()));
    }
    let Some(nonce) = nonce.get(..SCRAMBLE_LEN) else {
        return Err(Failure::server(&format!(
            "the server's {plugin} nonce has {} bytes, not {SCRAMBLE_LEN}",
            nonce.len()
        )));
    };
    Ok(Some(if plugin == NATIVE_PASSWORD {
        native_password(password, nonce)
    } else {
        caching_sha2_password(password, nonce)
    }))
}

/// SHA1(password) XOR SHA1(nonce + SHA1(SHA1(password))).
fn native_password(password: &[u8], nonce: &[u8]) -> Vec<u8> {
    let stage1 = Sha1::digest(password);
    let stage2 = Sha1::digest(stage1);
    let mix = Sha1::new()
        .chain_update(nonce)
        .chain_update(stage2)
        .finalize();
    stage1.iter().zip(mix.iter()).map(|(a, b)| a ^ b).collect()
}

/// SHA256(password) XOR SHA256(SHA256(SHA256(password)) + nonce).
fn caching_sha2_password(password: &[u8], nonce: &[u8]) -> Vec<u8> {
    let stage1 = Sha256::digest(password);
    let stage2 = Sha256::digest(stage1);
    let mix = Sha256::new()
        .chain_update(stage2)
        .chain_update(nonce)
        .finalize();
    stage1.iter().zip(mix.iter()).map(|(a, b)| a ^ b).collect()
}

/// HandshakeResponse41 without a database or connection attributes.
fn handshake_response(capabilities: u32, user: &str, answer: &[u8], plugin: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(64 + user.len());
    p.extend_from_slice(&capabilities.to_le_bytes());
    p.extend_from_slice(&(MAX_PACKET as u32).to_le_bytes());
    p.push(UTF8MB4_GENERAL_CI);
    p.extend_from_slice(&[0; 23]);
    p.extend_from_slice(user.as_bytes());
    p.push(0);
    // A scramble answer is 20 or 32 bytes: the length fits its byte.
    p.push(answer.len() as u8);
    p.extend_from_slice(answer);
    if capabilities & CLIENT_PLUGIN_AUTH != 0 {
        p.extend_from_slice(plugin.as_bytes());
        p.push(0);
    }
    p
}

/// `SELECT @@global.read_only`, its one row read to the end.
async fn read_only(conn: &mut Conn) -> Result<Role, Failure> {
    let mut query = vec![COM_QUERY];
    query.extend_from_slice(ROLE_QUERY.as_bytes());
    conn.command(&query).await?;
    let head = conn.read().await?;
    let columns = match head.first().copied() {
        Some(ERR) => return Err(server_error(&head)),
        Some(OK) => return Err(Failure(format!("{ROLE_QUERY} returned no result set"))),
        _ => Cursor::new(&head)
            .lenenc_int()
            .filter(|n| (1..=16).contains(n))
            .ok_or_else(|| unexpected(&head, "the query"))?,
    };
    for _ in 0..columns {
        conn.result_packet().await?; // a column definition
    }
    let end_of_columns = conn.result_packet().await?;
    if !is_eof(&end_of_columns) {
        return Err(unexpected(&end_of_columns, "the query"));
    }
    let row = conn.result_packet().await?;
    if is_eof(&row) {
        return Err(Failure(format!("{ROLE_QUERY} returned no row")));
    }
    let value = match row.first() {
        Some(0xfb) => None, // NULL
        _ => Some(
            Cursor::new(&row)
                .lenenc_str()
                .ok_or_else(|| unexpected(&row, "the query"))?
                .to_vec(),
        ),
    };
    let end = conn.result_packet().await?;
    if !is_eof(&end) {
        return Err(Failure(format!("{ROLE_QUERY} returned more than one row")));
    }
    match value.as_deref() {
        Some(b"0") => Ok(Role::Primary),
        Some(b"1") => Ok(Role::Replica),
        Some(other) => Err(Failure::server(&format!(
            "@@global.read_only is {:?}",
            String::from_utf8_lossy(other)
        ))),
        None => Err(Failure("@@global.read_only is NULL".into())),
    }
}

/// An EOF packet: 0xfe and at most 8 bytes (a row that starts with 0xfe
/// is an 8-byte length, so at least 9).
fn is_eof(packet: &[u8]) -> bool {
    packet.first() == Some(&EOF) && packet.len() < 9
}

/// An ERR packet as the `mysql` client shows it: `ERROR 1045 (28000):
/// Access denied …`. Errors sent before the client said it speaks 4.1 (a
/// greeting refused) carry no SQLSTATE: `ERROR 1040: Too many connections`.
fn server_error(packet: &[u8]) -> Failure {
    let mut c = Cursor::new(packet.get(1..).unwrap_or_default());
    let Some(code) = c.u16() else {
        return Failure("an error packet without a code".into());
    };
    let rest = c.rest();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Failure::server(&match rest.strip_prefix(b"#") {
        Some(r) if r.len() >= 5 => format!("ERROR {code} ({}): {}", text(&r[..5]), text(&r[5..])),
        _ => format!("ERROR {code}: {}", text(rest)),
    })
}

fn unsupported(plugin: &str) -> Failure {
    Failure::server(&format!(
        "server asks for {plugin} authentication, which the check does not speak"
    ))
}

fn unexpected(packet: &[u8], during: &str) -> Failure {
    match packet.first() {
        Some(b) => Failure(format!(
            "unexpected packet from the server during {during} (first byte {b:#04x})"
        )),
        None => Failure(format!(
            "unexpected empty packet from the server during {during}"
        )),
    }
}

/// A connection and the sequence number of its next packet.
struct Conn {
    stream: TcpStream,
    seq: u8,
}

impl Conn {
    async fn read(&mut self) -> Result<Vec<u8>, Failure> {
        let mut header = [0u8; 4];
        self.stream.read_exact(&mut header).await.map_err(closed)?;
        let len =
            usize::from(header[0]) | usize::from(header[1]) << 8 | usize::from(header[2]) << 16;
        if len > MAX_PACKET {
            return Err(Failure(format!(
                "a packet of {len} bytes from the server, more than the check reads ({MAX_PACKET})"
            )));
        }
        // Follow the server's count: the next packet of this exchange is ours.
        self.seq = header[3].wrapping_add(1);
        let mut payload = vec![0; len];
        self.stream.read_exact(&mut payload).await.map_err(closed)?;
        Ok(payload)
    }

    /// A packet of a result set: an error packet ends it with the
    /// server's words.
    async fn result_packet(&mut self) -> Result<Vec<u8>, Failure> {
        let packet = self.read().await?;
        match packet.first() {
            Some(&ERR) => Err(server_error(&packet)),
            _ => Ok(packet),
        }
    }

    async fn write(&mut self, payload: &[u8]) -> Result<(), Failure> {
        // The probe's packets are a few dozen bytes: one frame each.
        let len = (payload.len() as u32).to_le_bytes();
        let mut packet = Vec::with_capacity(4 + payload.len());
        packet.extend_from_slice(&len[..3]);
        packet.push(self.seq);
        packet.extend_from_slice(payload);
        self.seq = self.seq.wrapping_add(1);
        self.stream
            .write_all(&packet)
            .await
            .map_err(|e| Failure::io(&e))
    }

    /// A command starts an exchange: its packets count from 0.
    async fn command(&mut self, payload: &[u8]) -> Result<(), Failure> {
        self.seq = 0;
        self.write(payload).await
    }
}

fn closed(e: std::io::Error) -> Failure {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        Failure("server closed the connection".into())
    } else {
        Failure::io(&e)
    }
}

/// Reads the protocol's little-endian integers and strings off a packet;
/// `None` past its end.
struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8]) -> Cursor<'a> {
        Cursor { buf, at: 0 }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.at
    }

    fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let bytes = self.buf.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(bytes)
    }

    fn rest(&mut self) -> &'a [u8] {
        let bytes = &self.buf[self.at..];
        self.at = self.buf.len();
        bytes
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A string up to its NUL, stepping past the NUL.
    fn nul_terminated(&mut self) -> Option<&'a [u8]> {
        let rest = &self.buf[self.at..];
        let end = rest.iter().position(|&b| b == 0)?;
        self.at += end + 1;
        Some(&rest[..end])
    }

    /// A length-encoded integer (0xfb, NULL, is not one).
    fn lenenc_int(&mut self) -> Option<u64> {
        let wide = |b: &[u8]| b.iter().rev().fold(0u64, |n, &x| n << 8 | u64::from(x));
        match self.u8()? {
            n @ 0..=0xfa => Some(u64::from(n)),
            0xfc => self.take(2).map(wide),
            0xfd => self.take(3).map(wide),
            0xfe => self.take(8).map(wide),
            _ => None,
        }
    }

    /// A length-encoded string; its length is checked against the packet,
    /// so it allocates nothing it was not sent.
    fn lenenc_str(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.lenenc_int()?).ok()?;
        self.take(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::settings_from;
    use std::future::Future;
    use tokio::net::TcpListener;

    /// The greeting of MariaDB 10.11.19 (Debian 12) as sent, read off the
    /// wire: its header too.
    const MARIADB_GREETING: &str = "640000000a352e352e352d31302e31312e31392d4d6172696144422d302b64\
        6562313275310004000000\
        6f2a236d7e515b5400fef7080200ff81150000000000001d000000\
        7263764949717e482b3a2547006d7973716c5f6e61746976655f70617373776f726400";

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn mariadb_greeting() -> Vec<u8> {
        unhex(MARIADB_GREETING)[4..].to_vec()
    }

    /// A MySQL 8 greeting: every capability, caching_sha2_password.
    fn mysql8_greeting(nonce: &[u8; 20]) -> Vec<u8> {
        let mut g = vec![10];
        g.extend_from_slice(b"8.0.36\0");
        g.extend_from_slice(&[9, 0, 0, 0]);
        g.extend_from_slice(&nonce[..8]);
        g.push(0);
        g.extend_from_slice(&[0xff, 0xff, 0xff, 0x02, 0x00, 0xff, 0xdf, 21]);
        g.extend_from_slice(&[0; 10]);
        g.extend_from_slice(&nonce[8..]);
        g.push(0);
        g.extend_from_slice(b"caching_sha2_password\0");
        g
    }

    #[test]
    fn a_mariadb_greeting_parses() {
        let g = Greeting::parse(&mariadb_greeting()).unwrap();
        assert_eq!(g.version, "5.5.5-10.11.19-MariaDB-0+deb12u1");
        assert_eq!(g.capabilities, 0x81ff_f7fe);
        assert_eq!(
            g.capabilities & CLIENT_LONG_PASSWORD,
            0,
            "MariaDB says it is not MySQL"
        );
        assert_eq!(g.scramble, b"o*#m~Q[TrcvIIq~H+:%G");
        assert_eq!(g.plugin.as_deref(), Some(NATIVE_PASSWORD));
    }

    #[test]
    fn a_mysql8_greeting_parses_and_a_missing_plugin_nul_is_forgiven() {
        let nonce = *b"abcdefghijklmnopqrst";
        let g = Greeting::parse(&mysql8_greeting(&nonce)).unwrap();
        assert_eq!(g.version, "8.0.36");
        assert_eq!(g.capabilities, 0xdfff_ffff);
        assert_eq!(g.scramble, nonce);
        assert_eq!(g.plugin.as_deref(), Some(CACHING_SHA2_PASSWORD));

        let mut no_nul = mysql8_greeting(&nonce);
        no_nul.pop();
        assert_eq!(Greeting::parse(&no_nul).unwrap(), g);
    }

    #[test]
    fn what_is_not_a_greeting_fails() {
        assert_eq!(
            Greeting::parse(&[9, b'x', 0]),
            Err(Failure(
                "not a MySQL server greeting (protocol version 9)".into()
            ))
        );
        assert_eq!(
            Greeting::parse(&[]),
            Err(Failure("an empty greeting".into()))
        );
        let whole = mariadb_greeting();
        for cut in [1, 10, 40, 44] {
            assert_eq!(
                Greeting::parse(&whole[..cut]),
                Err(Failure("malformed server greeting".into())),
                "cut at {cut}"
            );
        }
    }

    /// Errors in place of the greeting come without SQLSTATE (the server
    /// does not know yet that the client speaks 4.1); later ones with it.
    #[test]
    fn error_packets_read_as_the_mysql_client_prints_them() {
        let mut blocked = vec![ERR, 0x69, 0x04];
        blocked.extend_from_slice(
            b"Host '10.0.0.7' is blocked because of many connection errors; \
              unblock with 'mariadb-admin flush-hosts'",
        );
        assert_eq!(
            Greeting::parse(&blocked),
            Err(Failure(
                "ERROR 1129: Host '10.0.0.7' is blocked because of many connection errors; \
                 unblock with 'mariadb-admin flush-hosts'"
                    .into()
            ))
        );
        let mut too_many = vec![ERR, 0x10, 0x04];
        too_many.extend_from_slice(b"Too many connections");
        assert_eq!(
            server_error(&too_many),
            Failure("ERROR 1040: Too many connections".into())
        );
        let mut denied = vec![ERR, 0x15, 0x04];
        denied.extend_from_slice(
            b"#28000Access denied for user 'probe'@'localhost' (using password: YES)",
        );
        assert_eq!(
            server_error(&denied),
            Failure(
                "ERROR 1045 (28000): Access denied for user 'probe'@'localhost' (using password: YES)"
                    .into()
            )
        );
        assert_eq!(
            server_error(&[ERR, 1]),
            Failure("an error packet without a code".into())
        );
    }

    /// Known answers: the vectors of go-sql-driver/mysql's auth tests,
    /// checked against Python's hashlib.
    #[test]
    fn scrambles_match_known_answers() {
        let nonce = [
            70, 114, 92, 94, 1, 38, 11, 116, 63, 114, 23, 101, 126, 103, 26, 95, 81, 17, 24, 21,
        ];
        assert_eq!(
            scramble(NATIVE_PASSWORD, b"secret", &nonce)
                .unwrap()
                .unwrap(),
            [
                53, 177, 140, 159, 251, 189, 127, 53, 109, 252, 172, 50, 211, 192, 240, 164, 26,
                48, 207, 45
            ]
        );
        let nonce = [
            10, 47, 74, 111, 75, 73, 34, 48, 88, 76, 114, 74, 37, 13, 3, 80, 82, 2, 23, 21,
        ];
        let hex = |b: Vec<u8>| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        assert_eq!(
            hex(caching_sha2_password(b"secret", &nonce)),
            "f490e76f66d9d86665ce54d98c78d0acfe2fb0b08b423da807144873d30b312c"
        );
        assert_eq!(
            hex(caching_sha2_password(b"secret2", &nonce)),
            "abc3934a012cf342e876071c8ee202de51785b430258a7a0138bc79c4d800bc6"
        );
        // The nonce of an auth switch ends in a NUL: only 20 bytes count.
        let mut switch_nonce = nonce.to_vec();
        switch_nonce.push(0);
        assert_eq!(
            scramble(CACHING_SHA2_PASSWORD, b"secret", &switch_nonce).unwrap(),
            Some(caching_sha2_password(b"secret", &nonce))
        );
        // No password, no answer; an unknown plugin, none at all.
        assert_eq!(scramble(NATIVE_PASSWORD, b"", &nonce), Ok(Some(vec![])));
        assert_eq!(scramble("client_ed25519", b"secret", &nonce), Ok(None));
        assert_eq!(
            scramble(NATIVE_PASSWORD, b"secret", &nonce[..8]),
            Err(Failure(
                "the server's mysql_native_password nonce has 8 bytes, not 20".into()
            ))
        );
    }

    #[test]
    fn the_handshake_response_is_laid_out_as_41_wants() {
        let p = handshake_response(
            CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION | CLIENT_PLUGIN_AUTH,
            "probe",
            &[7; 20],
            NATIVE_PASSWORD,
        );
        let mut want = vec![0x00, 0x82, 0x08, 0x00, 0x00, 0x00, 0x01, 0x00, 45];
        want.extend_from_slice(&[0; 23]);
        want.extend_from_slice(b"probe\0");
        want.push(20);
        want.extend_from_slice(&[7; 20]);
        want.extend_from_slice(b"mysql_native_password\0");
        assert_eq!(p, want);
        // Without plugin support, no plugin name.
        let old = handshake_response(CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION, "u", &[], "x");
        assert_eq!(old.len(), 4 + 4 + 1 + 23 + 2 + 1);
    }

    #[test]
    fn length_encoded_values_are_bounded_by_the_packet() {
        assert_eq!(Cursor::new(&[0xfa]).lenenc_int(), Some(250));
        assert_eq!(Cursor::new(&[0xfc, 0x34, 0x12]).lenenc_int(), Some(0x1234));
        assert_eq!(Cursor::new(&[0xfd, 1, 2, 3]).lenenc_int(), Some(0x030201));
        assert_eq!(
            Cursor::new(&[0xfe, 1, 0, 0, 0, 0, 0, 0, 0x80]).lenenc_int(),
            Some(0x8000_0000_0000_0001)
        );
        assert_eq!(Cursor::new(&[0xfb]).lenenc_int(), None);
        assert_eq!(Cursor::new(&[0xfc, 1]).lenenc_int(), None);
        assert_eq!(Cursor::new(b"\x011").lenenc_str(), Some(&b"1"[..]));
        // A string claiming 2^64 - 1 bytes in a packet of 9.
        assert_eq!(
            Cursor::new(&[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).lenenc_str(),
            None
        );
    }

    // A fake server on loopback, speaking from a script.

    fn frame(seq: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = (payload.len() as u32).to_le_bytes()[..3].to_vec();
        p.push(seq);
        p.extend_from_slice(payload);
        p
    }

    /// The next packet from the probe, `None` once it has closed.
    async fn recv(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
        let mut header = [0u8; 4];
        s.read_exact(&mut header).await.ok()?;
        let len = usize::from(header[0]) | usize::from(header[1]) << 8;
        let mut payload = vec![0; len];
        s.read_exact(&mut payload).await.unwrap();
        Some((header[3], payload))
    }

    async fn serve<F, T>(
        script: impl FnOnce(TcpStream) -> F + Send + 'static,
    ) -> (SocketAddr, tokio::task::JoinHandle<T>)
    where
        F: Future<Output = T> + Send,
        T: Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            script(s).await
        });
        (addr, task)
    }

    fn probe(user: Option<&str>, password: Option<&str>) -> MysqlProbe {
        let mut lines = "kind = \"mysql\"\n".to_owned();
        if let Some(user) = user {
            lines += &format!("user = \"{user}\"\n");
        }
        MysqlProbe::new(&settings_from(&lines, password))
    }

    /// The user name and scramble answer of a HandshakeResponse41.
    fn response_fields(p: &[u8]) -> (String, Vec<u8>, String) {
        let mut c = Cursor::new(&p[32..]);
        let user = String::from_utf8(c.nul_terminated().unwrap().to_vec()).unwrap();
        let len = usize::from(c.u8().unwrap());
        let answer = c.take(len).unwrap().to_vec();
        let plugin = String::from_utf8(c.nul_terminated().unwrap().to_vec()).unwrap();
        (user, answer, plugin)
    }

    /// A one-column result set with one row holding `value`.
    fn result_set(value: &[u8]) -> Vec<u8> {
        let mut column = Vec::new();
        for part in ["def", "", "", "", "@@global.read_only", ""] {
            column.push(part.len() as u8);
            column.extend_from_slice(part.as_bytes());
        }
        column.extend_from_slice(&[0x0c, 0x3f, 0, 1, 0, 0, 0, 8, 0x81, 0, 0, 0, 0]);
        let mut row = vec![value.len() as u8];
        row.extend_from_slice(value);
        let eof = [EOF, 0, 0, 2, 0];
        [
            frame(1, &[1]),
            frame(2, &column),
            frame(3, &eof),
            frame(4, &row),
            frame(5, &eof),
        ]
        .concat()
    }

    const OK_PACKET: [u8; 7] = [OK, 0, 0, 2, 0, 0, 0];

    #[tokio::test]
    async fn without_a_user_the_greeting_is_all() {
        let (addr, server) = serve(|mut s| async move {
            s.write_all(&unhex(MARIADB_GREETING)).await.unwrap();
            recv(&mut s).await
        })
        .await;
        assert_eq!(probe(None, None).check(addr).await, Ok(Outcome::default()));
        assert_eq!(server.await.unwrap(), None, "the probe sent nothing");
    }

    /// A native-password login, the role query and its goodbye, packet by
    /// packet.
    #[tokio::test]
    async fn a_native_login_reads_the_role_and_quits() {
        let (addr, server) = serve(|mut s| async move {
            s.write_all(&unhex(MARIADB_GREETING)).await.unwrap();
            let (seq, response) = recv(&mut s).await.unwrap();
            assert_eq!(seq, 1);
            let capabilities = u32::from_le_bytes(response[..4].try_into().unwrap());
            assert_eq!(
                capabilities,
                CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION | CLIENT_PLUGIN_AUTH
            );
            s.write_all(&frame(2, &OK_PACKET)).await.unwrap();
            let query = recv(&mut s).await.unwrap();
            s.write_all(&result_set(b"1")).await.unwrap();
            let quit = recv(&mut s).await.unwrap();
            (response, query, quit, recv(&mut s).await)
        })
        .await;
        let result = probe(Some("probe"), Some("secret")).check(addr).await;
        assert_eq!(
            result,
            Ok(Outcome {
                role: Some(Role::Replica)
            })
        );
        let (response, query, quit, after) = server.await.unwrap();
        let (user, answer, plugin) = response_fields(&response);
        assert_eq!(user, "probe");
        assert_eq!(answer, native_password(b"secret", b"o*#m~Q[TrcvIIq~H+:%G"));
        assert_eq!(plugin, NATIVE_PASSWORD);
        assert_eq!(query, (0, b"\x03SELECT @@global.read_only".to_vec()));
        assert_eq!(quit, (0, vec![COM_QUIT]));
        assert_eq!(after, None, "closed after COM_QUIT");
    }

    /// An account on caching_sha2_password behind a native default: the
    /// server switches, the probe answers the new nonce, "fast auth OK".
    #[tokio::test]
    async fn an_auth_switch_to_caching_sha2_takes_the_fast_path() {
        let nonce = *b"ABCDEFGHIJKLMNOPQRST";
        let (addr, server) = serve(move |mut s| async move {
            s.write_all(&unhex(MARIADB_GREETING)).await.unwrap();
            recv(&mut s).await.unwrap();
            let mut switch = vec![EOF];
            switch.extend_from_slice(b"caching_sha2_password\0");
            switch.extend_from_slice(&nonce);
            switch.push(0);
            s.write_all(&frame(2, &switch)).await.unwrap();
            let answer = recv(&mut s).await.unwrap();
            s.write_all(&frame(4, &[AUTH_MORE_DATA, 3])).await.unwrap();
            s.write_all(&frame(5, &OK_PACKET)).await.unwrap();
            recv(&mut s).await.unwrap();
            s.write_all(&result_set(b"0")).await.unwrap();
            recv(&mut s).await.unwrap();
            answer
        })
        .await;
        let result = probe(Some("probe"), Some("secret")).check(addr).await;
        assert_eq!(
            result,
            Ok(Outcome {
                role: Some(Role::Primary)
            })
        );
        assert_eq!(
            server.await.unwrap(),
            (3, caching_sha2_password(b"secret", &nonce))
        );
    }

    /// Full authentication would need the password itself: the probe
    /// stops and closes, and the password never leaves it.
    #[tokio::test]
    async fn full_caching_sha2_authentication_is_refused_without_the_password() {
        let nonce = *b"abcdefghijklmnopqrst";
        let (addr, server) = serve(move |mut s| async move {
            s.write_all(&frame(0, &mysql8_greeting(&nonce)))
                .await
                .unwrap();
            let (_, response) = recv(&mut s).await.unwrap();
            s.write_all(&frame(2, &[AUTH_MORE_DATA, 4])).await.unwrap();
            let mut after = Vec::new();
            s.read_to_end(&mut after).await.unwrap();
            (response, after)
        })
        .await;
        let result = probe(Some("probe"), Some("secret")).check(addr).await;
        assert_eq!(result, Err(Failure(FULL_AUTH.into())));
        let (response, after) = server.await.unwrap();
        let (_, answer, plugin) = response_fields(&response);
        assert_eq!(plugin, CACHING_SHA2_PASSWORD);
        assert_eq!(answer, caching_sha2_password(b"secret", &nonce));
        assert!(after.is_empty(), "sent after the refusal: {after:?}");
    }

    #[tokio::test]
    async fn a_refused_login_fails_with_the_servers_error() {
        let (addr, server) = serve(|mut s| async move {
            s.write_all(&unhex(MARIADB_GREETING)).await.unwrap();
            recv(&mut s).await.unwrap();
            let mut denied = vec![ERR, 0x15, 0x04];
            denied.extend_from_slice(
                b"#28000Access denied for user 'probe'@'localhost' (using password: YES)",
            );
            s.write_all(&frame(2, &denied)).await.unwrap();
            recv(&mut s).await
        })
        .await;
        let result = probe(Some("probe"), Some("wrong")).check(addr).await;
        assert_eq!(
            result,
            Err(Failure(
                "ERROR 1045 (28000): Access denied for user 'probe'@'localhost' (using password: YES)"
                    .into()
            ))
        );
        assert_eq!(server.await.unwrap(), None);
    }

    #[tokio::test]
    async fn an_unknown_plugin_is_named() {
        let (addr, server) = serve(|mut s| async move {
            s.write_all(&unhex(MARIADB_GREETING)).await.unwrap();
            recv(&mut s).await.unwrap();
            let mut switch = vec![EOF];
            switch.extend_from_slice(b"client_ed25519\0");
            switch.extend_from_slice(&[b'n'; 32]);
            s.write_all(&frame(2, &switch)).await.unwrap();
            recv(&mut s).await
        })
        .await;
        assert_eq!(
            probe(Some("probe"), Some("secret")).check(addr).await,
            Err(Failure(
                "server asks for client_ed25519 authentication, which the check does not speak"
                    .into()
            ))
        );
        assert_eq!(server.await.unwrap(), None);
    }

    /// Something else on the port: its first bytes are not taken as a
    /// length to allocate, and a port that closes at once fails.
    #[tokio::test]
    async fn other_protocols_and_early_closes_fail() {
        let (addr, server) = serve(|mut s| async move {
            s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                .await
                .unwrap();
        })
        .await;
        assert_eq!(
            probe(None, None).check(addr).await,
            Err(Failure(
                "a packet of 5526600 bytes from the server, more than the check reads (65536)"
                    .into()
            ))
        );
        server.await.unwrap();

        let (addr, server) = serve(|s| async move { drop(s) }).await;
        assert_eq!(
            probe(None, None).check(addr).await,
            Err(Failure("server closed the connection".into()))
        );
        server.await.unwrap();
    }

    #[tokio::test]
    async fn an_odd_read_only_value_fails() {
        let (addr, server) = serve(|mut s| async move {
            s.write_all(&unhex(MARIADB_GREETING)).await.unwrap();
            recv(&mut s).await.unwrap();
            s.write_all(&frame(2, &OK_PACKET)).await.unwrap();
            recv(&mut s).await.unwrap();
            s.write_all(&result_set(b"maybe")).await.unwrap();
            (recv(&mut s).await, recv(&mut s).await)
        })
        .await;
        assert_eq!(
            probe(Some("probe"), None).check(addr).await,
            Err(Failure("@@global.read_only is \"maybe\"".into()))
        );
        assert_eq!(
            server.await.unwrap(),
            (Some((0, vec![COM_QUIT])), None),
            "a goodbye after a failed query too"
        );
    }
}
