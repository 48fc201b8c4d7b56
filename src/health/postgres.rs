//! `kind = "postgres"`: a session started as `user` on `database` (default:
//! the user's name, as libpq), authenticated (trust, cleartext password,
//! md5 or SCRAM-SHA-256) and read up to ReadyForQuery. The role comes from
//! the `in_hot_standby` parameter the server reports at start-up
//! (PostgreSQL 14+: `on` = replica); a server that does not report it is
//! asked `SELECT pg_is_in_recovery()`. Any ErrorResponse fails the check
//! with the server's own words: severity, message and SQLSTATE.
//!
//! Messages, md5 hashing and the SCRAM exchange come from
//! `postgres-protocol`, the protocol layer of rust-postgres without its
//! client's connection machinery, which one short exchange does not need.
//!
//! Goodbyes, so a probe leaves no noise in the server's log: once the
//! server has let the session in, the probe ends with Terminate. While it is
//! still authenticating, the server waits for a password message and logs
//! any other one ("expected password response, got message type 88"), but
//! takes a plain close silently (psql does that when it needs to ask for a
//! password); so there the probe just closes. Either way it closes with a
//! FIN, not a reset, which the server would log as "could not receive data
//! from client". A probe cut by the listener's `timeout` is dropped where it
//! stands and says no goodbye.

use std::net::SocketAddr;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::backend::{self, ErrorResponseBody, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Failure, MAX_REASON, Outcome, Probe, ProbeFuture, one_line};
use crate::config::{HealthCheck, Role, Secret};

/// The longest server message a probe accepts. A server's largest
/// messages before ReadyForQuery are error reports of a few hundred bytes;
/// a backend that speaks another protocol has its first bytes read as a
/// length of up to 4 GiB ("HTTP" → 1.4 GB), which must not be allocated.
/// 64 KiB is the server's own bound on an authentication message from a
/// client (`PG_MAX_AUTH_TOKEN_LENGTH`).
const MAX_MESSAGE: usize = 65_535;

/// The probe's `application_name`: its sessions are recognisable in
/// `pg_stat_activity` and in the server's connection log lines.
const APPLICATION_NAME: &str = "switchyard-health-check";

/// The query that tells a primary from a replica on servers before 14,
/// which do not report `in_hot_standby`.
const RECOVERY_QUERY: &str = "SELECT pg_is_in_recovery()";

/// Logs in and reads the server's role.
#[derive(Debug)]
pub struct PostgresProbe {
    user: String,
    database: String,
    password: Option<Secret>,
}

impl PostgresProbe {
    pub fn new(settings: &HealthCheck) -> PostgresProbe {
        // Validation requires `user` for this kind; an empty one would be
        // refused by the server in its own words.
        let user = settings.user.clone().unwrap_or_default();
        PostgresProbe {
            database: settings.database.clone().unwrap_or_else(|| user.clone()),
            user,
            password: settings.password.clone(),
        }
    }

    /// Start-up, authentication, the role; the session is closed by the
    /// caller.
    async fn converse(&self, s: &mut Session) -> Result<Outcome, Failure> {
        frontend::startup_message(
            [
                ("user", self.user.as_str()),
                ("database", self.database.as_str()),
                ("application_name", APPLICATION_NAME),
            ],
            &mut s.write,
        )
        .map_err(encode)?;
        s.send().await?;
        self.authenticate(s).await?;
        s.authenticated = true;

        let mut in_hot_standby = None;
        loop {
            match s.recv().await? {
                Message::ReadyForQuery(_) => break,
                Message::ParameterStatus(p) => {
                    if p.name().map_err(invalid)? == "in_hot_standby" {
                        in_hot_standby = Some(p.value().map_err(invalid)? == "on");
                    }
                }
                Message::ErrorResponse(e) => return Err(server_error(&e)),
                Message::BackendKeyData(_) | Message::NoticeResponse(_) => {}
                _ => return Err(s.unexpected("starting the session")),
            }
        }
        let replica = match in_hot_standby {
            Some(replica) => replica,
            None => s.in_recovery().await?,
        };
        let role = if replica {
            Role::Replica
        } else {
            Role::Primary
        };
        Ok(Outcome { role: Some(role) })
    }

    /// Answer the server's authentication requests up to AuthenticationOk.
    async fn authenticate(&self, s: &mut Session) -> Result<(), Failure> {
        let mut scram: Option<sasl::ScramSha256> = None;
        loop {
            match s.recv().await? {
                Message::AuthenticationOk => return Ok(()),
                Message::AuthenticationCleartextPassword => {
                    let password = self.password("password")?;
                    frontend::password_message(password.as_bytes(), &mut s.write)
                        .map_err(encode)?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let password = self.password("md5")?;
                    let hash = md5_hash(self.user.as_bytes(), password.as_bytes(), body.salt());
                    frontend::password_message(hash.as_bytes(), &mut s.write).map_err(encode)?;
                }
                Message::AuthenticationSasl(body) => {
                    let offered: Vec<&str> = body.mechanisms().collect().map_err(invalid)?;
                    if !offered.contains(&sasl::SCRAM_SHA_256) {
                        return Err(Failure(format!(
                            "server offers SASL {}; the probe speaks only {}",
                            offered.join(", "),
                            sasl::SCRAM_SHA_256
                        )));
                    }
                    let password = self.password(sasl::SCRAM_SHA_256)?;
                    // No TLS, so no channel binding (and a server offers
                    // SCRAM-SHA-256-PLUS only over TLS).
                    let exchange = sasl::ScramSha256::new(
                        password.as_bytes(),
                        sasl::ChannelBinding::unsupported(),
                    );
                    frontend::sasl_initial_response(
                        sasl::SCRAM_SHA_256,
                        exchange.message(),
                        &mut s.write,
                    )
                    .map_err(encode)?;
                    scram = Some(exchange);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let exchange = scram
                        .as_mut()
                        .ok_or_else(|| s.unexpected("authenticating"))?;
                    exchange.update(body.data()).map_err(scram_error)?;
                    frontend::sasl_response(exchange.message(), &mut s.write).map_err(encode)?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let mut exchange =
                        scram.take().ok_or_else(|| s.unexpected("authenticating"))?;
                    // The server sends AuthenticationOk with this message and
                    // takes the session as open from here on, so even a
                    // failed verification below ends with Terminate.
                    s.authenticated = true;
                    // Proves the server knew the password, too.
                    exchange.finish(body.data()).map_err(scram_error)?;
                    continue; // AuthenticationOk follows; nothing to answer
                }
                Message::ErrorResponse(e) => return Err(server_error(&e)),
                Message::NoticeResponse(_) => continue,
                Message::AuthenticationKerberosV5 => return Err(unsupported("Kerberos V5")),
                Message::AuthenticationScmCredential => return Err(unsupported("SCM credentials")),
                Message::AuthenticationGss | Message::AuthenticationGssContinue(_) => {
                    return Err(unsupported("GSSAPI"));
                }
                Message::AuthenticationSspi => return Err(unsupported("SSPI")),
                _ => return Err(s.unexpected("authenticating")),
            }
            s.send().await?;
        }
    }

    /// The password for `method`, or why there is none.
    fn password(&self, method: &str) -> Result<&str, Failure> {
        self.password.as_ref().map(Secret::expose).ok_or_else(|| {
            Failure(format!(
                "server asks for a password ({method}); no password_file is set"
            ))
        })
    }
}

impl Probe for PostgresProbe {
    fn check(&self, addr: SocketAddr) -> ProbeFuture<'_> {
        Box::pin(async move {
            let stream = TcpStream::connect(addr)
                .await
                .map_err(|e| Failure::io(&e))?;
            let mut session = Session::new(stream);
            let result = self.converse(&mut session).await;
            session.close().await;
            result
        })
    }
}

/// One probe's connection: the socket and its buffers.
struct Session {
    stream: TcpStream,
    read: BytesMut,
    write: BytesMut,
    /// The tag of the last message received, for "unexpected message".
    tag: u8,
    /// The server has let the session in: Terminate is the goodbye now.
    authenticated: bool,
}

impl Session {
    fn new(stream: TcpStream) -> Session {
        Session {
            stream,
            read: BytesMut::with_capacity(4096),
            write: BytesMut::with_capacity(256),
            tag: 0,
            authenticated: false,
        }
    }

    /// Send what has been written into `write`.
    async fn send(&mut self) -> Result<(), Failure> {
        self.stream
            .write_all(&self.write)
            .await
            .map_err(|e| Failure::io(&e))?;
        self.write.clear();
        Ok(())
    }

    /// The next message from the server.
    async fn recv(&mut self) -> Result<Message, Failure> {
        loop {
            if let Some(header) = backend::Header::parse(&self.read).map_err(invalid)? {
                self.tag = header.tag();
                let len = header.len() as usize; // at least 4: checked by parse
                if len > MAX_MESSAGE {
                    return Err(Failure(format!(
                        "not a PostgreSQL server (a message of {len} bytes)"
                    )));
                }
                if let Some(message) = Message::parse(&mut self.read).map_err(invalid)? {
                    return Ok(message);
                }
            }
            match self.stream.read_buf(&mut self.read).await {
                Ok(0) => return Err(Failure("server closed the connection".into())),
                Ok(_) => {}
                Err(e) => return Err(Failure::io(&e)),
            }
        }
    }

    /// Whether the server is in recovery (a replica), by query: read to
    /// ReadyForQuery even after an error, so the session ends cleanly.
    async fn in_recovery(&mut self) -> Result<bool, Failure> {
        frontend::query(RECOVERY_QUERY, &mut self.write).map_err(encode)?;
        self.send().await?;
        let mut answer = None;
        let mut error = None;
        loop {
            let message = match self.recv().await {
                Ok(message) => message,
                // A FATAL error ends the session: its words say more than
                // the close that follows.
                Err(closed) => return Err(error.unwrap_or(closed)),
            };
            match message {
                Message::ReadyForQuery(_) => break,
                Message::DataRow(row) => {
                    if let Some(Some(value)) = row.ranges().next().map_err(invalid)? {
                        answer = Some(&row.buffer()[value] == b"t");
                    }
                }
                Message::ErrorResponse(e) => error = Some(server_error(&e)),
                Message::RowDescription(_)
                | Message::CommandComplete(_)
                | Message::EmptyQueryResponse
                | Message::NoticeResponse(_)
                | Message::ParameterStatus(_) => {}
                _ => return Err(self.unexpected("reading pg_is_in_recovery()")),
            }
        }
        if let Some(error) = error {
            return Err(error);
        }
        answer.ok_or_else(|| Failure("pg_is_in_recovery() returned no value".into()))
    }

    fn unexpected(&self, doing: &str) -> Failure {
        Failure(format!(
            "unexpected message {:?} from the server while {doing}",
            self.tag as char
        ))
    }

    /// Say goodbye (see the module doc) and close.
    async fn close(mut self) {
        if self.authenticated {
            self.write.clear();
            frontend::terminate(&mut self.write);
            // A write error means the server has gone already (it closes
            // after a FATAL error): no one is left to say goodbye to.
            if self.stream.write_all(&self.write).await.is_err() {
                return;
            }
        }
        // Shutting down can only fail on a connection already reset; the
        // result is the same either way.
        self.stream.shutdown().await.ok();
        // Closing with unread bytes in the socket would reset the
        // connection; discard what has arrived (nothing is waited for).
        let mut sink = [0u8; 1024];
        while matches!(self.stream.try_read(&mut sink), Ok(n) if n > 0) {}
    }
}

/// An ErrorResponse as one line: severity, message and SQLSTATE, e.g.
/// `FATAL: password authentication failed for user "x" (28P01)`.
fn server_error(body: &ErrorResponseBody) -> Failure {
    let (mut severity, mut localized, mut message, mut code) = (None, None, None, None);
    let mut fields = body.fields();
    // A malformed field ends the list; what came before it still counts.
    while let Ok(Some(field)) = fields.next() {
        let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
        match field.type_() {
            b'V' => severity = Some(value), // never localized (9.6+)
            b'S' => localized = Some(value),
            b'M' => message = Some(value),
            b'C' => code = Some(value),
            _ => {}
        }
    }
    let severity = severity.or(localized).unwrap_or_else(|| "ERROR".into());
    let message = message.unwrap_or_else(|| "(no message)".into());
    let mut line = format!(
        "{}: {}",
        one_line(&severity, 20),
        one_line(&message, MAX_REASON)
    );
    if let Some(code) = code {
        line += &format!(" ({})", one_line(&code, 5));
    }
    Failure(line)
}

fn unsupported(method: &str) -> Failure {
    Failure(format!(
        "server asks for {method} authentication, which the probe does not speak"
    ))
}

fn invalid(e: std::io::Error) -> Failure {
    Failure(format!("invalid message from the server: {e}"))
}

/// A message that cannot be encoded: a NUL in the user or database name.
fn encode(e: std::io::Error) -> Failure {
    Failure(format!("cannot encode a message: {e}"))
}

fn scram_error(e: std::io::Error) -> Failure {
    Failure(format!("{}: {e}", sasl::SCRAM_SHA_256))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::path::Path;

    /// A probe from config text, as the daemon builds it (a password can
    /// only come from a file).
    fn probe(user: &str, database: Option<&str>, password: Option<&str>) -> PostgresProbe {
        let dir = tempfile::tempdir().unwrap();
        let mut check = format!("kind = \"postgres\"\nuser = \"{user}\"\n");
        if let Some(db) = database {
            check += &format!("database = \"{db}\"\n");
        }
        if let Some(pw) = password {
            let file = dir.path().join("pw");
            std::fs::write(&file, format!("{pw}\n")).unwrap();
            check += &format!("password_file = \"{}\"\n", file.display());
        }
        let toml = format!(
            "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:1\"\n\
             [listener.health_check]\n{check}\
             [[listener.backend]]\nname = \"b\"\naddress = \"127.0.0.1:2\"\n"
        );
        let config = crate::config::load_str(&toml, Path::new("test.toml")).unwrap();
        PostgresProbe::new(&config.listeners[0].health_check)
    }

    /// A backend message: tag, length, body.
    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn auth(code: i32, extra: &[u8]) -> Vec<u8> {
        let mut body = code.to_be_bytes().to_vec();
        body.extend_from_slice(extra);
        msg(b'R', &body)
    }

    fn param(name: &str, value: &str) -> Vec<u8> {
        msg(b'S', format!("{name}\0{value}\0").as_bytes())
    }

    fn ready() -> Vec<u8> {
        msg(b'Z', b"I")
    }

    fn error(fields: &[(u8, &str)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (t, v) in fields {
            body.push(*t);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        msg(b'E', &body)
    }

    fn parse_error(bytes: Vec<u8>) -> Failure {
        match Message::parse(&mut BytesMut::from(&bytes[..])).unwrap() {
            Some(Message::ErrorResponse(e)) => server_error(&e),
            _ => panic!("not an ErrorResponse"),
        }
    }

    /// A server on loopback that runs `script` on its one connection.
    async fn serve<F, Fut, T>(script: F) -> (SocketAddr, tokio::task::JoinHandle<T>)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            script(stream).await
        });
        (addr, task)
    }

    /// The StartupMessage's parameters, after checking protocol 3.0.
    async fn read_startup(s: &mut TcpStream) -> Vec<(String, String)> {
        let len = s.read_i32().await.unwrap() as usize;
        let mut body = vec![0; len - 4];
        s.read_exact(&mut body).await.unwrap();
        assert_eq!(body[..4], 196_608i32.to_be_bytes(), "protocol 3.0");
        let text = String::from_utf8(body[4..].to_vec()).unwrap();
        let words: Vec<&str> = text.trim_end_matches('\0').split('\0').collect();
        words
            .chunks(2)
            .map(|kv| (kv[0].to_owned(), kv[1].to_owned()))
            .collect()
    }

    /// The next frontend message as (tag, body), or `None` at EOF.
    async fn read_msg(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
        let tag = s.read_u8().await.ok()?;
        let len = s.read_i32().await.unwrap() as usize;
        let mut body = vec![0; len - 4];
        s.read_exact(&mut body).await.unwrap();
        Some((tag, body))
    }

    #[test]
    fn an_error_response_reads_as_severity_message_and_sqlstate() {
        let e = parse_error(error(&[
            (b'S', "FATAL"),
            (b'V', "FATAL"),
            (b'C', "28P01"),
            (b'M', "password authentication failed for user \"x\""),
            (b'R', "auth_failed"),
        ]));
        assert_eq!(
            e.0,
            "FATAL: password authentication failed for user \"x\" (28P01)"
        );
    }

    #[test]
    fn the_unlocalized_severity_wins_and_lines_are_flattened() {
        // lc_messages = 'de_DE': S is localized, V is not.
        let e = parse_error(error(&[
            (b'S', "FATAL"),
            (b'M', "das Datenbanksystem fährt herunter\nbitte warten"),
            (b'V', "FATAL"),
            (b'C', "57P03"),
        ]));
        assert_eq!(
            e.0,
            "FATAL: das Datenbanksystem fährt herunter bitte warten (57P03)"
        );
        // Before 9.6 there is no V; without a code, none is shown.
        let e = parse_error(error(&[(b'S', "ERREUR"), (b'M', "oups")]));
        assert_eq!(e.0, "ERREUR: oups");
        let e = parse_error(error(&[]));
        assert_eq!(e.0, "ERROR: (no message)");
    }

    #[test]
    fn a_long_message_is_cut_but_keeps_its_sqlstate() {
        let long = "é".repeat(1000);
        let e = parse_error(error(&[(b'V', "ERROR"), (b'M', &long), (b'C', "XX000")]));
        let expected = format!("ERROR: {}… (XX000)", "é".repeat(MAX_REASON));
        assert_eq!(e.0, expected);
    }

    #[test]
    fn the_database_defaults_to_the_user_name() {
        let p = probe("app", None, None);
        assert_eq!((p.user.as_str(), p.database.as_str()), ("app", "app"));
        let p = probe("app", Some("orders"), Some("pw"));
        assert_eq!(p.database, "orders");
        assert_eq!(p.password.as_ref().map(Secret::expose), Some("pw"));
    }

    /// md5 login (the digest of PostgreSQL's documented scheme), the role
    /// from `in_hot_standby`, and Terminate at the end.
    #[tokio::test]
    async fn md5_login_reads_the_role_from_in_hot_standby_and_terminates() {
        let (addr, server) = serve(|mut s| async move {
            let startup = read_startup(&mut s).await;
            s.write_all(&auth(5, &[0x2a, 0x3d, 0x8f, 0xe0]))
                .await
                .unwrap();
            let password = read_msg(&mut s).await;
            let mut reply = auth(0, &[]);
            reply.extend(msg(b'K', &[0, 0, 0, 7, 0, 0, 0, 9]));
            reply.extend(param("server_version", "16.4"));
            reply.extend(param("in_hot_standby", "on"));
            reply.extend(ready());
            s.write_all(&reply).await.unwrap();
            let goodbye = read_msg(&mut s).await;
            let after = read_msg(&mut s).await;
            (startup, password, goodbye, after)
        })
        .await;
        let result = probe("md5_user", None, Some("password")).check(addr).await;
        assert_eq!(
            result,
            Ok(Outcome {
                role: Some(Role::Replica)
            })
        );
        let (startup, password, goodbye, after) = server.await.unwrap();
        let kv = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        assert_eq!(
            startup,
            [
                kv("user", "md5_user"),
                kv("database", "md5_user"),
                kv("application_name", APPLICATION_NAME)
            ]
        );
        assert_eq!(
            password,
            Some((b'p', b"md562af4dd09bbb41884907a838a3233294\0".to_vec()))
        );
        assert_eq!(goodbye, Some((b'X', vec![])), "Terminate");
        assert_eq!(after, None, "then the probe closes");
    }

    /// A server before 14 reports no `in_hot_standby`: the probe asks, and
    /// reads the query's answer up to ReadyForQuery before Terminate.
    #[tokio::test]
    async fn without_in_hot_standby_the_role_comes_from_pg_is_in_recovery() {
        let (addr, server) = serve(|mut s| async move {
            read_startup(&mut s).await;
            s.write_all(&auth(3, &[])).await.unwrap();
            let password = read_msg(&mut s).await;
            let mut reply = auth(0, &[]);
            reply.extend(param("server_version", "13.16"));
            reply.extend(ready());
            s.write_all(&reply).await.unwrap();
            let query = read_msg(&mut s).await;
            let mut answer = Vec::new();
            let mut row = 1i16.to_be_bytes().to_vec();
            row.extend(b"pg_is_in_recovery\0");
            row.extend(0i32.to_be_bytes()); // table
            row.extend(0i16.to_be_bytes()); // column
            row.extend(16i32.to_be_bytes()); // bool
            row.extend(1i16.to_be_bytes()); // size
            row.extend((-1i32).to_be_bytes()); // modifier
            row.extend(0i16.to_be_bytes()); // text
            answer.extend(msg(b'T', &row));
            let mut data = 1i16.to_be_bytes().to_vec();
            data.extend(1i32.to_be_bytes());
            data.extend(b"f");
            answer.extend(msg(b'D', &data));
            answer.extend(msg(b'C', b"SELECT 1\0"));
            answer.extend(ready());
            s.write_all(&answer).await.unwrap();
            (
                password,
                query,
                read_msg(&mut s).await,
                read_msg(&mut s).await,
            )
        })
        .await;
        let result = probe("app", Some("db"), Some("s3cret")).check(addr).await;
        assert_eq!(
            result,
            Ok(Outcome {
                role: Some(Role::Primary)
            })
        );
        let (password, query, goodbye, after) = server.await.unwrap();
        assert_eq!(password, Some((b'p', b"s3cret\0".to_vec())), "cleartext");
        assert_eq!(
            query,
            Some((b'Q', b"SELECT pg_is_in_recovery()\0".to_vec()))
        );
        assert_eq!(goodbye, Some((b'X', vec![])));
        assert_eq!(after, None);
    }

    /// An error from the query fails the check; the probe still reads on to
    /// ReadyForQuery and says goodbye.
    #[tokio::test]
    async fn an_error_after_start_up_fails_the_check_and_still_terminates() {
        let (addr, server) = serve(|mut s| async move {
            read_startup(&mut s).await;
            let mut reply = auth(0, &[]);
            reply.extend(ready());
            s.write_all(&reply).await.unwrap();
            read_msg(&mut s).await; // the query
            let mut answer = error(&[
                (b'V', "ERROR"),
                (b'C', "42501"),
                (b'M', "permission denied for function pg_is_in_recovery"),
            ]);
            answer.extend(ready());
            s.write_all(&answer).await.unwrap();
            (read_msg(&mut s).await, read_msg(&mut s).await)
        })
        .await;
        let result = probe("app", None, None).check(addr).await;
        assert_eq!(
            result,
            Err(Failure(
                "ERROR: permission denied for function pg_is_in_recovery (42501)".into()
            ))
        );
        let (goodbye, after) = server.await.unwrap();
        assert_eq!(goodbye, Some((b'X', vec![])));
        assert_eq!(after, None);
    }

    /// A FATAL error while starting up (here: no free slot) is the reason;
    /// the server closes, and the probe sends nothing more.
    #[tokio::test]
    async fn a_fatal_error_at_start_up_is_the_reason_and_no_terminate_follows() {
        let (addr, server) = serve(|mut s| async move {
            read_startup(&mut s).await;
            let e = error(&[
                (b'S', "FATAL"),
                (b'V', "FATAL"),
                (b'C', "53300"),
                (b'M', "sorry, too many clients already"),
            ]);
            s.write_all(&e).await.unwrap();
            s.shutdown().await.unwrap();
            read_msg(&mut s).await
        })
        .await;
        let result = probe("app", None, Some("pw")).check(addr).await;
        assert_eq!(
            result,
            Err(Failure(
                "FATAL: sorry, too many clients already (53300)".into()
            ))
        );
        assert_eq!(server.await.unwrap(), None);
    }

    /// Asked for a password it does not have, the probe closes without a
    /// word: the server takes that silently while it waits for a password.
    #[tokio::test]
    async fn a_password_request_without_a_password_closes_silently() {
        let (addr, server) = serve(|mut s| async move {
            read_startup(&mut s).await;
            s.write_all(&auth(10, b"SCRAM-SHA-256\0\0")).await.unwrap();
            read_msg(&mut s).await
        })
        .await;
        let result = probe("app", None, None).check(addr).await;
        assert_eq!(
            result,
            Err(Failure(
                "server asks for a password (SCRAM-SHA-256); no password_file is set".into()
            ))
        );
        assert_eq!(server.await.unwrap(), None, "no message, just a close");
    }

    /// The client's SCRAM message goes out with the mechanism, and a server
    /// that offers only other SASL mechanisms is named.
    #[tokio::test]
    async fn scram_starts_with_a_client_first_message_and_other_mechanisms_fail() {
        let (addr, server) = serve(|mut s| async move {
            read_startup(&mut s).await;
            s.write_all(&auth(10, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"))
                .await
                .unwrap();
            read_msg(&mut s).await
        })
        .await;
        // The server hangs up instead of sending its challenge.
        let result = probe("app", None, Some("pw")).check(addr).await;
        assert_eq!(result, Err(Failure("server closed the connection".into())));
        let (tag, body) = server.await.unwrap().expect("SASLInitialResponse");
        assert_eq!(tag, b'p');
        let (mechanism, rest) = body.split_at(body.iter().position(|&b| b == 0).unwrap());
        assert_eq!(mechanism, b"SCRAM-SHA-256");
        let first = String::from_utf8(rest[5..].to_vec()).unwrap();
        assert!(
            first.starts_with("n,,n=,r="),
            "client-first-message: {first}"
        );
        assert!(!first.contains("pw"), "no password on the wire");

        let (addr, _server) = serve(|mut s| async move {
            read_startup(&mut s).await;
            s.write_all(&auth(10, b"OAUTHBEARER\0\0")).await.unwrap();
            read_msg(&mut s).await
        })
        .await;
        let result = probe("app", None, Some("pw")).check(addr).await;
        assert_eq!(
            result,
            Err(Failure(
                "server offers SASL OAUTHBEARER; the probe speaks only SCRAM-SHA-256".into()
            ))
        );
    }

    /// A backend that speaks another protocol is no server, and its first
    /// bytes are never taken for a length to allocate.
    #[tokio::test]
    async fn another_protocol_is_not_a_postgresql_server() {
        let (addr, _server) = serve(|mut s| async move {
            read_startup(&mut s).await;
            s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                .await
                .unwrap();
            read_msg(&mut s).await
        })
        .await;
        let result = probe("app", None, None).check(addr).await;
        assert_eq!(
            result,
            Err(Failure(
                "not a PostgreSQL server (a message of 1414811695 bytes)".into()
            ))
        );
    }

    #[tokio::test]
    async fn a_server_that_closes_at_once_fails_the_check() {
        let (addr, _server) = serve(|mut s| async move {
            read_startup(&mut s).await;
        })
        .await;
        let result = probe("app", None, None).check(addr).await;
        assert_eq!(result, Err(Failure("server closed the connection".into())));
    }
}
