//! `kind = "redis"`: `AUTH` when a password is set, `PING` answered
//! `+PONG`, the role from `ROLE` (`master` = primary, `slave` = replica),
//! then `QUIT`.
//!
//! The commands go out in one write and the replies are read in order
//! (Redis answers pipelined commands one at a time, each after the one
//! before), so a check costs one round trip. The first error reply is the
//! reason, in the server's words: a rejected `AUTH` (`WRONGPASS …`) comes
//! before the `NOAUTH` the rest of the pipeline then gets, and a loading
//! server's `LOADING …` before anything `ROLE` says. Every reply is read
//! even after an error, `QUIT`'s `+OK` last: the server then closes first,
//! and the probe's own close is a clean FIN, not a reset over unread
//! replies. A server that closes early (`-ERR max number of clients
//! reached`) still has its error line as the reason.
//!
//! Replies are read by a small RESP2 parser that trusts no length: bulk
//! strings, arrays and nesting are capped, and so is all one check reads.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Failure, Outcome, Probe, ProbeFuture};
use crate::config::{HealthCheck, Role, Secret};

/// All the bytes one check reads. The largest reply is `ROLE` on a master,
/// which lists its replicas at some 40 bytes each: 64 KiB holds well over
/// a thousand.
const MAX_READ: usize = 64 * 1024;

/// Elements of one array reply at most (a master's replicas in `ROLE`).
const MAX_ELEMENTS: usize = 4096;

/// Arrays within arrays at most (`ROLE` nests two deep).
const MAX_DEPTH: usize = 4;

/// Logs in if it has a password, pings and reads the role.
#[derive(Debug)]
pub struct RedisProbe {
    user: Option<String>,
    password: Option<Secret>,
}

impl RedisProbe {
    pub fn new(settings: &HealthCheck) -> RedisProbe {
        RedisProbe {
            user: settings.user.clone(),
            password: settings.password.clone(),
        }
    }

    /// The commands of one check, in the order their replies come.
    fn steps(&self) -> Vec<Step> {
        let mut steps = Vec::with_capacity(4);
        if self.password.is_some() {
            steps.push(Step::Auth);
        }
        steps.extend([Step::Ping, Step::Role, Step::Quit]);
        steps
    }

    /// The steps' commands as one pipelined write.
    fn request(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(96);
        if let Some(password) = &self.password {
            let password = password.expose().as_bytes();
            match &self.user {
                Some(user) => command(&mut out, &[b"AUTH", user.as_bytes(), password]),
                None => command(&mut out, &[b"AUTH", password]),
            }
        }
        command(&mut out, &[b"PING"]);
        command(&mut out, &[b"ROLE"]);
        command(&mut out, &[b"QUIT"]);
        out
    }
}

impl Probe for RedisProbe {
    fn check(&self, addr: SocketAddr) -> ProbeFuture<'_> {
        Box::pin(async move {
            let mut stream = TcpStream::connect(addr)
                .await
                .map_err(|e| Failure::io(&e))?;
            stream
                .write_all(&self.request())
                .await
                .map_err(|e| Failure::io(&e))?;
            let mut replies = Replies::new(stream);
            let mut failed: Option<Failure> = None;
            let mut role = None;
            for step in self.steps() {
                let reply = match replies.next().await {
                    Ok(reply) => reply,
                    // The server's own error line says more than how the
                    // connection ended after it.
                    Err(e) => return Err(failed.unwrap_or(e)),
                };
                if failed.is_some() {
                    continue; // read to QUIT's reply, judge by the first error
                }
                match step.judge(reply) {
                    Ok(seen) => role = role.or(seen),
                    Err(f) => failed = Some(f),
                }
            }
            match failed {
                Some(f) => Err(f),
                None => Ok(Outcome { role }),
            }
        })
    }
}

/// One command of a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Auth,
    Ping,
    Role,
    Quit,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::Auth => "AUTH",
            Step::Ping => "PING",
            Step::Role => "ROLE",
            Step::Quit => "QUIT",
        }
    }

    /// Whether `reply` is the right answer to this step; for `ROLE`, the
    /// role it names.
    fn judge(self, reply: Reply) -> Result<Option<Role>, Failure> {
        match (self, reply) {
            (_, Reply::Error(line)) => Err(Failure::server(&line)),
            (Step::Auth | Step::Quit, Reply::Simple(s)) if s == "OK" => Ok(None),
            (Step::Ping, Reply::Simple(s)) if s == "PONG" => Ok(None),
            (Step::Role, Reply::Array(Some(items))) => role_of(&items),
            (step, other) => Err(Failure::server(&format!(
                "{} answered {}",
                step.name(),
                other.describe()
            ))),
        }
    }
}

/// The role a `ROLE` reply names in its first element; `None` for one that
/// is neither (`sentinel`), which fails a check that wants a role.
fn role_of(items: &[Reply]) -> Result<Option<Role>, Failure> {
    match items.first() {
        Some(Reply::Bulk(Some(name))) => Ok(match name.as_slice() {
            b"master" => Some(Role::Primary),
            b"slave" => Some(Role::Replica),
            _ => None,
        }),
        other => Err(Failure::server(&format!(
            "ROLE answered an array starting with {}",
            other.map_or("nothing".into(), Reply::describe)
        ))),
    }
}

/// Append one command, as RESP's array of bulk strings (any bytes, a
/// password's included, go through unescaped).
fn command(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// A RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    /// `+…`
    Simple(String),
    /// `-…`: the error line without its `-`.
    Error(String),
    /// `:…`
    Integer(i64),
    /// `$…`; `None` is the null bulk string.
    Bulk(Option<Vec<u8>>),
    /// `*…`; `None` is the null array.
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// A short description for a reason ("ROLE answered +OK").
    fn describe(&self) -> String {
        match self {
            Reply::Simple(s) => format!("+{s}"),
            Reply::Error(s) => format!("-{s}"),
            Reply::Integer(n) => format!(":{n}"),
            Reply::Bulk(None) => "a null bulk string".into(),
            Reply::Bulk(Some(b)) => {
                let text = String::from_utf8_lossy(&b[..b.len().min(64)]);
                format!("the bulk string {text:?}")
            }
            Reply::Array(None) => "a null array".into(),
            Reply::Array(Some(items)) => format!("an array of {}", items.len()),
        }
    }
}

/// Why bytes from the server are not a reply.
#[derive(Debug, PartialEq, Eq)]
struct Malformed(String);

/// The first reply in `buf`: `Ok(None)` while it is incomplete, else the
/// reply and how many bytes it took.
fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, Malformed> {
    let mut at = 0;
    Ok(parse_at(buf, &mut at, 0)?.map(|reply| (reply, at)))
}

fn parse_at(buf: &[u8], at: &mut usize, depth: usize) -> Result<Option<Reply>, Malformed> {
    let Some(line) = line(buf, at) else {
        return Ok(None);
    };
    let Some((&kind, rest)) = line.split_first() else {
        return Err(Malformed("an empty line".into()));
    };
    let text = || String::from_utf8_lossy(rest).into_owned();
    Ok(Some(match kind {
        b'+' => Reply::Simple(text()),
        b'-' => Reply::Error(text()),
        b':' => Reply::Integer(number(rest)?),
        b'$' => match length(rest, MAX_READ, "bulk string")? {
            None => Reply::Bulk(None),
            Some(len) => {
                let Some(end) = buf.get(*at..*at + len + 2) else {
                    return Ok(None);
                };
                if !end.ends_with(b"\r\n") {
                    return Err(Malformed("a bulk string longer than its length".into()));
                }
                let value = end[..len].to_vec();
                *at += len + 2;
                Reply::Bulk(Some(value))
            }
        },
        b'*' => match length(rest, MAX_ELEMENTS, "array")? {
            None => Reply::Array(None),
            Some(len) => {
                if depth >= MAX_DEPTH {
                    return Err(Malformed(format!(
                        "arrays nested more than {MAX_DEPTH} deep"
                    )));
                }
                // Capacity from what arrived, not from the length claimed.
                let mut items = Vec::with_capacity(len.min(16));
                for _ in 0..len {
                    match parse_at(buf, at, depth + 1)? {
                        Some(item) => items.push(item),
                        None => return Ok(None),
                    }
                }
                Reply::Array(Some(items))
            }
        },
        other => {
            return Err(Malformed(format!(
                "a reply of type {:?}",
                (other as char).escape_default().to_string()
            )));
        }
    }))
}

/// The line at `*at` without its CRLF, stepping past it; `None` until the
/// CRLF has arrived.
fn line<'a>(buf: &'a [u8], at: &mut usize) -> Option<&'a [u8]> {
    let rest = buf.get(*at..)?;
    let end = rest.windows(2).position(|w| w == b"\r\n")?;
    *at += end + 2;
    Some(&rest[..end])
}

fn number(digits: &[u8]) -> Result<i64, Malformed> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            Malformed(format!(
                "{:?} where a number belongs",
                String::from_utf8_lossy(&digits[..digits.len().min(32)])
            ))
        })
}

/// A bulk string's or array's length: `None` for -1 (null), an error past
/// `max`.
fn length(digits: &[u8], max: usize, what: &str) -> Result<Option<usize>, Malformed> {
    match number(digits)? {
        -1 => Ok(None),
        n if n >= 0 && n as u64 <= max as u64 => Ok(Some(n as usize)),
        n => Err(Malformed(format!("{what} length {n} (at most {max})"))),
    }
}

/// Replies read off a connection, at most [`MAX_READ`] bytes in all.
struct Replies {
    stream: TcpStream,
    buf: Vec<u8>,
    read: usize,
}

impl Replies {
    fn new(stream: TcpStream) -> Replies {
        Replies {
            stream,
            buf: Vec::with_capacity(512),
            read: 0,
        }
    }

    async fn next(&mut self) -> Result<Reply, Failure> {
        loop {
            let parsed = parse(&self.buf)
                .map_err(|m| Failure::server(&format!("invalid reply from the server: {}", m.0)))?;
            if let Some((reply, used)) = parsed {
                self.buf.drain(..used);
                return Ok(reply);
            }
            if self.read >= MAX_READ {
                return Err(Failure(format!(
                    "the server's replies exceed {MAX_READ} bytes"
                )));
            }
            let mut chunk = [0u8; 4096];
            let room = chunk.len().min(MAX_READ - self.read);
            let n = self
                .stream
                .read(&mut chunk[..room])
                .await
                .map_err(|e| Failure::io(&e))?;
            if n == 0 {
                return Err(Failure("server closed the connection".into()));
            }
            self.read += n;
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::settings_from;
    use std::future::Future;
    use tokio::net::TcpListener;

    fn parsed(bytes: &[u8]) -> Reply {
        let (reply, used) = parse(bytes).unwrap().expect("a whole reply");
        assert_eq!(used, bytes.len(), "the whole input taken");
        reply
    }

    fn bulk(s: &str) -> Reply {
        Reply::Bulk(Some(s.as_bytes().to_vec()))
    }

    #[test]
    fn every_reply_type_parses() {
        assert_eq!(parsed(b"+PONG\r\n"), Reply::Simple("PONG".into()));
        assert_eq!(
            parsed(b"-LOADING Redis is loading the dataset in memory\r\n"),
            Reply::Error("LOADING Redis is loading the dataset in memory".into())
        );
        assert_eq!(parsed(b":-42\r\n"), Reply::Integer(-42));
        assert_eq!(parsed(b"$5\r\nmas\r\n\r\n"), bulk("mas\r\n"));
        assert_eq!(parsed(b"$0\r\n\r\n"), bulk(""));
        assert_eq!(parsed(b"$-1\r\n"), Reply::Bulk(None));
        assert_eq!(parsed(b"*-1\r\n"), Reply::Array(None));
        assert_eq!(parsed(b"*0\r\n"), Reply::Array(Some(vec![])));
    }

    /// ROLE as a master with one replica and as a replica (Redis 7).
    #[test]
    fn role_replies_parse_and_name_the_role() {
        let master = b"*3\r\n$6\r\nmaster\r\n:3129659\r\n*1\r\n*3\r\n$9\r\n127.0.0.1\r\n$4\r\n9001\r\n$7\r\n3129242\r\n";
        let Reply::Array(Some(items)) = parsed(master) else {
            panic!("an array");
        };
        assert_eq!(items[1], Reply::Integer(3_129_659));
        assert_eq!(
            items[2],
            Reply::Array(Some(vec![Reply::Array(Some(vec![
                bulk("127.0.0.1"),
                bulk("9001"),
                bulk("3129242")
            ]))]))
        );
        assert_eq!(role_of(&items), Ok(Some(Role::Primary)));

        let replica =
            b"*5\r\n$5\r\nslave\r\n$9\r\n127.0.0.1\r\n:9000\r\n$9\r\nconnected\r\n:3167038\r\n";
        let Reply::Array(Some(items)) = parsed(replica) else {
            panic!("an array");
        };
        assert_eq!(role_of(&items), Ok(Some(Role::Replica)));

        assert_eq!(role_of(&[bulk("sentinel"), Reply::Array(None)]), Ok(None));
        assert_eq!(
            role_of(&[Reply::Integer(1)]),
            Err(Failure("ROLE answered an array starting with :1".into()))
        );
        assert_eq!(
            role_of(&[]),
            Err(Failure(
                "ROLE answered an array starting with nothing".into()
            ))
        );
    }

    #[test]
    fn an_incomplete_reply_waits_for_more_at_every_cut() {
        let whole: &[u8] = b"*2\r\n$6\r\nmaster\r\n*1\r\n+OK\r\n";
        for cut in 0..whole.len() {
            assert_eq!(parse(&whole[..cut]), Ok(None), "cut at {cut}");
        }
        // Pipelined replies: one at a time, each with its own length.
        let two = b"+PONG\r\n+OK\r\n";
        assert_eq!(parse(two), Ok(Some((Reply::Simple("PONG".into()), 7))));
    }

    #[test]
    fn lengths_and_types_are_not_trusted() {
        let err = |b: &[u8]| parse(b).unwrap_err().0;
        assert_eq!(
            err(b"$99999999999\r\n"),
            "bulk string length 99999999999 (at most 65536)"
        );
        assert_eq!(err(b"$-2\r\n"), "bulk string length -2 (at most 65536)");
        assert_eq!(err(b"*5000\r\n"), "array length 5000 (at most 4096)");
        assert_eq!(
            err(b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n"),
            "arrays nested more than 4 deep"
        );
        assert_eq!(
            err(b"$2\r\nabcd\r\n"),
            "a bulk string longer than its length"
        );
        assert_eq!(err(b"$x\r\n"), "\"x\" where a number belongs");
        assert_eq!(err(b"\r\n"), "an empty line");
        assert_eq!(
            err(b"HTTP/1.1 400 Bad Request\r\n"),
            "a reply of type \"H\""
        );
        // A huge claimed array allocates nothing up front: it just waits.
        assert_eq!(parse(b"*4096\r\n:1\r\n"), Ok(None));
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let probe = |user: Option<&str>, password: Option<&str>| {
            let mut lines = "kind = \"redis\"\n".to_owned();
            if let Some(user) = user {
                lines += &format!("user = \"{user}\"\n");
            }
            RedisProbe::new(&settings_from(&lines, password))
        };
        let tail = "*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nROLE\r\n*1\r\n$4\r\nQUIT\r\n";
        assert_eq!(
            String::from_utf8(probe(None, None).request()).unwrap(),
            tail
        );
        assert_eq!(
            String::from_utf8(probe(Some("u"), None).request()).unwrap(),
            tail,
            "no AUTH without a password"
        );
        assert_eq!(
            String::from_utf8(probe(None, Some("p w\r\n")).request()).unwrap(),
            format!("*2\r\n$4\r\nAUTH\r\n$5\r\np w\r\n\r\n{tail}")
        );
        assert_eq!(
            String::from_utf8(probe(Some("probe"), Some("s3")).request()).unwrap(),
            format!("*3\r\n$4\r\nAUTH\r\n$5\r\nprobe\r\n$2\r\ns3\r\n{tail}")
        );
        assert_eq!(
            probe(Some("probe"), Some("s3")).steps(),
            [Step::Auth, Step::Ping, Step::Role, Step::Quit]
        );
    }

    /// A fake server on loopback: reads the probe's request, then writes
    /// `answer` and closes; yields the request it read.
    async fn serve(answer: &'static [u8]) -> (SocketAddr, impl Future<Output = Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut request = vec![0u8; 4096];
            let mut got = 0;
            // The whole pipeline arrives in the one write; read up to QUIT.
            while !request[..got].ends_with(b"QUIT\r\n") {
                let n = s.read(&mut request[got..]).await.unwrap();
                assert!(n > 0, "the probe closed before QUIT");
                got += n;
            }
            request.truncate(got);
            // A probe that stops reading early (its cap) may reset the
            // connection under this write: that is its business.
            let _ = s.write_all(answer).await;
            request
        });
        (addr, async move { task.await.unwrap() })
    }

    fn probe(password: Option<&str>) -> RedisProbe {
        RedisProbe::new(&settings_from("kind = \"redis\"", password))
    }

    #[tokio::test]
    async fn a_master_passes_with_its_role() {
        let (addr, server) =
            serve(b"+OK\r\n+PONG\r\n*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n+OK\r\n").await;
        let result = probe(Some("pw")).check(addr).await;
        assert_eq!(
            result,
            Ok(Outcome {
                role: Some(Role::Primary)
            })
        );
        assert!(
            server
                .await
                .starts_with(b"*2\r\n$4\r\nAUTH\r\n$2\r\npw\r\n")
        );
    }

    /// A wrong password: the reason is AUTH's error, not the NOAUTH that
    /// PING and ROLE get after it.
    #[tokio::test]
    async fn a_rejected_auth_is_the_reason() {
        let (addr, server) = serve(
            b"-WRONGPASS invalid username-password pair or user is disabled.\r\n\
              -NOAUTH Authentication required.\r\n-NOAUTH Authentication required.\r\n+OK\r\n",
        )
        .await;
        let result = probe(Some("nope")).check(addr).await;
        assert_eq!(
            result,
            Err(Failure(
                "WRONGPASS invalid username-password pair or user is disabled.".into()
            ))
        );
        server.await;
    }

    #[tokio::test]
    async fn a_loading_server_fails_with_its_words() {
        let (addr, server) = serve(
            b"-LOADING Redis is loading the dataset in memory\r\n\
              *5\r\n$5\r\nslave\r\n$9\r\n127.0.0.1\r\n:6379\r\n$7\r\nconnect\r\n:-1\r\n+OK\r\n",
        )
        .await;
        let result = probe(None).check(addr).await;
        assert_eq!(
            result,
            Err(Failure(
                "LOADING Redis is loading the dataset in memory".into()
            ))
        );
        server.await;
    }

    /// A server that refuses the client and closes (maxclients): its
    /// error line is the reason, not the closed connection.
    #[tokio::test]
    async fn an_error_before_an_early_close_is_the_reason() {
        let (addr, server) = serve(b"-ERR max number of clients reached\r\n").await;
        let result = probe(None).check(addr).await;
        assert_eq!(
            result,
            Err(Failure("ERR max number of clients reached".into()))
        );
        server.await;
    }

    #[tokio::test]
    async fn a_wrong_answer_to_ping_or_an_early_close_fails() {
        let (addr, server) = serve(b"$4\r\nPONG\r\n").await;
        assert_eq!(
            probe(None).check(addr).await,
            Err(Failure("PING answered the bulk string \"PONG\"".into()))
        );
        server.await;

        let (addr, server) = serve(b"+PONG\r\n").await;
        assert_eq!(
            probe(None).check(addr).await,
            Err(Failure("server closed the connection".into()))
        );
        server.await;
    }

    /// A backend that speaks something else with a long answer: the probe
    /// stops at its cap instead of reading on.
    #[tokio::test]
    async fn an_endless_answer_is_cut_at_the_read_cap() {
        static ANSWER: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
            let mut a = b"$65536\r\n".to_vec();
            a.resize(70_000, b'x');
            a
        });
        let (addr, server) = serve(ANSWER.as_slice()).await;
        assert_eq!(
            probe(None).check(addr).await,
            Err(Failure("the server's replies exceed 65536 bytes".into()))
        );
        server.await;
    }
}
