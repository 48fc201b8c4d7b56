//! `kind = "redis"`: `AUTH` when a password is set, `PING` answered
//! `+PONG`, `ROLE` for the role, then `QUIT`.
//!
//! The commands go out in one write and the replies are read in order, so
//! a check costs one round trip. Any error reply fails the check with the
//! server's own line (`-LOADING Redis is loading the dataset in memory`,
//! `-MASTERDOWN …`, `-NOAUTH …`, `-WRONGPASS …`). Replies are read with
//! every length capped: a server that is not Redis cannot make the probe
//! allocate or wait for more than the listener's `timeout`.

use std::net::SocketAddr;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::{Failure, Outcome, Probe, ProbeFuture};
use crate::config::{HealthCheck, Role, Secret};

/// The longest reply line read (a status, an error, a length).
const MAX_LINE: usize = 4096;
/// The largest bulk string read (ROLE's elements are host names and
/// offsets).
const MAX_BULK: usize = 64 * 1024;
/// The most elements in one array, and arrays within arrays (ROLE of a
/// master lists its replicas, three levels deep).
const MAX_ELEMENTS: usize = 4096;
const MAX_DEPTH: usize = 4;

/// Checks one Redis server.
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

    /// The commands of one check, as RESP arrays.
    fn commands(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        if let Some(password) = &self.password {
            let mut auth: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(user) = &self.user {
                auth.push(user.as_bytes());
            }
            auth.push(password.expose().as_bytes());
            encode(&mut out, &auth);
        }
        encode(&mut out, &[b"PING"]);
        encode(&mut out, &[b"ROLE"]);
        encode(&mut out, &[b"QUIT"]);
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
                .write_all(&self.commands())
                .await
                .map_err(|e| Failure::io(&e))?;
            let mut replies = BufReader::new(stream);
            if self.password.is_some() {
                match read(&mut replies).await? {
                    Value::Simple(_) => {}
                    other => return Err(unexpected("AUTH", other)),
                }
            }
            match read(&mut replies).await? {
                Value::Simple(s) if s == "PONG" => {}
                other => return Err(unexpected("PING", other)),
            }
            let role = match read(&mut replies).await? {
                Value::Array(items) => match items.first() {
                    Some(Value::Bulk(name)) if name == b"master" => Role::Primary,
                    Some(Value::Bulk(name)) if name == b"slave" => Role::Replica,
                    _ => return Err(Failure("ROLE: not a master or a replica".into())),
                },
                other => return Err(unexpected("ROLE", other)),
            };
            // QUIT's +OK, then the server closes: a clean goodbye.
            let _ = read(&mut replies).await;
            Ok(Outcome { role: Some(role) })
        })
    }
}

/// A command as a RESP array of bulk strings.
fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// A reply, as far as a check looks at it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    Simple(String),
    Error(String),
    Int(i64),
    /// A bulk string; a null one is empty.
    Bulk(Vec<u8>),
    Array(Vec<Value>),
}

/// The failure for a reply that is not what `command` should answer: the
/// server's error line, or what came instead.
fn unexpected(command: &str, value: Value) -> Failure {
    match value {
        Value::Error(line) => Failure(line),
        other => Failure(format!("{command}: unexpected reply {other:?}")),
    }
}

/// Read one reply (arrays nested at most [`MAX_DEPTH`] deep).
async fn read<R: AsyncBufReadExt + Unpin>(r: &mut R) -> Result<Value, Failure> {
    // Arrays being filled: (elements so far, elements still to read).
    let mut open: Vec<(Vec<Value>, usize)> = Vec::new();
    loop {
        let mut value = match read_item(r).await? {
            Item::Value(v) => v,
            Item::Array(0) => Value::Array(Vec::new()),
            Item::Array(n) => {
                if open.len() == MAX_DEPTH {
                    return Err(Failure("reply nested too deep".into()));
                }
                open.push((Vec::with_capacity(n.min(16)), n));
                continue;
            }
        };
        // Close every array this value completes.
        loop {
            let Some((items, left)) = open.last_mut() else {
                return Ok(value);
            };
            items.push(value);
            *left -= 1;
            if *left > 0 {
                break;
            }
            let (items, _) = open.pop().expect("just looked");
            value = Value::Array(items);
        }
    }
}

enum Item {
    Value(Value),
    /// The header of an array of this many elements.
    Array(usize),
}

async fn read_item<R: AsyncBufReadExt + Unpin>(r: &mut R) -> Result<Item, Failure> {
    let line = read_line(r).await?;
    let (kind, rest) = line.split_at(1);
    let number = |what: &str| {
        rest.parse::<i64>()
            .map_err(|_| Failure(format!("not a Redis reply ({what} {rest:?})")))
    };
    Ok(match kind {
        "+" => Item::Value(Value::Simple(rest.to_owned())),
        "-" => Item::Value(Value::Error(rest.to_owned())),
        ":" => Item::Value(Value::Int(number("integer")?)),
        "$" => {
            let len = number("length")?;
            if len < 0 {
                return Ok(Item::Value(Value::Bulk(Vec::new())));
            }
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            if len > MAX_BULK {
                return Err(Failure(format!("bulk reply of {len} bytes is too long")));
            }
            let mut data = vec![0; len + 2];
            r.read_exact(&mut data).await.map_err(|e| Failure::io(&e))?;
            data.truncate(len);
            Item::Value(Value::Bulk(data))
        }
        "*" => {
            let n = number("count")?;
            if n < 0 {
                return Ok(Item::Value(Value::Array(Vec::new())));
            }
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            if n > MAX_ELEMENTS {
                return Err(Failure(format!("array reply of {n} elements is too long")));
            }
            Item::Array(n)
        }
        _ => return Err(Failure(format!("not a Redis reply ({line:?})"))),
    })
}

/// One CRLF-terminated line, without the CRLF; at most [`MAX_LINE`] bytes.
async fn read_line<R: AsyncBufReadExt + Unpin>(r: &mut R) -> Result<String, Failure> {
    let mut line = Vec::new();
    let read = (&mut *r)
        .take(MAX_LINE as u64 + 2)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| Failure::io(&e))?;
    if read == 0 {
        return Err(Failure("connection closed by the server".into()));
    }
    if !line.ends_with(b"\r\n") || line.len() < 3 {
        return Err(Failure("not a Redis reply (no CRLF line)".into()));
    }
    line.truncate(line.len() - 2);
    String::from_utf8(line).map_err(|_| Failure("not a Redis reply (not UTF-8)".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(bytes: &[u8]) -> Result<Value, Failure> {
        read(&mut BufReader::new(bytes)).await
    }

    #[tokio::test]
    async fn replies_parse_in_order_nested_arrays_included() {
        assert_eq!(parse(b"+PONG\r\n").await, Ok(Value::Simple("PONG".into())));
        assert_eq!(
            parse(b"-LOADING Redis is loading the dataset in memory\r\n").await,
            Ok(Value::Error(
                "LOADING Redis is loading the dataset in memory".into()
            ))
        );
        // ROLE of a master with one replica.
        let role = b"*3\r\n$6\r\nmaster\r\n:3129659\r\n*1\r\n*3\r\n$9\r\n127.0.0.1\r\n$4\r\n9001\r\n$7\r\n3129242\r\n";
        let Value::Array(items) = parse(role).await.unwrap() else {
            panic!("array expected")
        };
        assert_eq!(items[0], Value::Bulk(b"master".to_vec()));
        assert_eq!(items[1], Value::Int(3129659));
        assert_eq!(
            items[2],
            Value::Array(vec![Value::Array(vec![
                Value::Bulk(b"127.0.0.1".to_vec()),
                Value::Bulk(b"9001".to_vec()),
                Value::Bulk(b"3129242".to_vec()),
            ])])
        );
        // Two replies back to back: the reader stops after the first.
        let mut r = BufReader::new(&b"*0\r\n+OK\r\n"[..]);
        assert_eq!(read(&mut r).await, Ok(Value::Array(vec![])));
        assert_eq!(read(&mut r).await, Ok(Value::Simple("OK".into())));
    }

    #[tokio::test]
    async fn what_is_not_redis_is_refused_without_allocating() {
        assert!(parse(b"HTTP/1.1 400 Bad Request\r\n").await.is_err());
        assert!(parse(b"$99999999999\r\n").await.is_err());
        assert!(parse(b"*99999999\r\n").await.is_err());
        assert!(
            parse(b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n+x\r\n")
                .await
                .is_err()
        );
        let long = [b"+".as_slice(), &[b'a'; 10_000], b"\r\n"].concat();
        assert!(parse(&long).await.is_err());
        assert!(parse(b"").await.is_err());
    }

    #[test]
    fn auth_goes_first_with_the_acl_user_when_set() {
        let mut settings = HealthCheck::default();
        assert_eq!(
            RedisProbe::new(&settings).commands(),
            b"*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nROLE\r\n*1\r\n$4\r\nQUIT\r\n"
        );
        settings.user = Some("probe".into());
        settings.password = Some(Secret::from_test("pw"));
        let sent = RedisProbe::new(&settings).commands();
        assert!(
            sent.starts_with(b"*3\r\n$4\r\nAUTH\r\n$5\r\nprobe\r\n$2\r\npw\r\n*1\r\n$4\r\nPING")
        );
    }
}
