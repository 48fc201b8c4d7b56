//! lbCookie: the cookie that keeps an HTTP client on one backend, as
//! HAProxy's `cookie NAME insert indirect nocache` does.
//!
//! `<id>` is a hash of the listener and backend names: opaque (no address or
//! index), the same after a restart and on both members of an HA pair.

use hyper::header::{self, HeaderMap, HeaderValue};

use crate::balancer::hash_bytes;
use crate::config::Sticky;

/// The lbCookie value for a backend: 16 hex digits of a stable hash.
pub fn cookie_id(listener: &str, backend: &str) -> String {
    let mut key = Vec::with_capacity(listener.len() + backend.len() + 1);
    key.extend_from_slice(listener.as_bytes());
    key.push(0);
    key.extend_from_slice(backend.as_bytes());
    format!("{:016x}", hash_bytes(&key))
}

/// The value of cookie `name` in the request's Cookie headers, if any.
/// A header is read as UTF-8, which browsers send for non-ASCII values.
pub fn find_cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| std::str::from_utf8(v.as_bytes()).ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == name)
        .map(|c| c.value().to_owned())
}

/// Remove cookie `name` from every Cookie header, keeping every other
/// pair and the separator after it byte for byte (`a=1;b=2` stays
/// without a space): ours goes with the `;` and white space after it, or
/// before it when it comes last; empty segments go too. A header without
/// ours is untouched; one left with no cookie is removed. Works on bytes,
/// so a header with non-ASCII values loses ours too.
pub fn strip_cookie(headers: &mut HeaderMap, name: &str) {
    let is_ours = |pair: &[u8]| {
        let n = pair.split(|&c| c == b'=').next().unwrap_or(pair);
        n.trim_ascii() == name.as_bytes()
    };
    let has_ours = |v: &HeaderValue| v.as_bytes().split(|&c| c == b';').any(is_ours);
    let values: Vec<HeaderValue> = headers.get_all(header::COOKIE).iter().cloned().collect();
    if !values.iter().any(has_ours) {
        return;
    }
    headers.remove(header::COOKIE);
    for v in values {
        if !has_ours(&v) {
            headers.append(header::COOKIE, v);
            continue;
        }
        let mut kept = Vec::with_capacity(v.len());
        // The white space after the `;` that follows the last pair kept.
        let mut gap: &[u8] = b"";
        let mut last_kept = None;
        for (i, segment) in v.as_bytes().split(|&c| c == b';').enumerate() {
            let pair = segment.trim_ascii_start();
            if last_kept.is_some_and(|k| k + 1 == i) {
                gap = &segment[..segment.len() - pair.len()];
            }
            if is_ours(segment) || pair.is_empty() {
                continue;
            }
            if last_kept.is_some() {
                kept.push(b';');
                kept.extend_from_slice(gap);
            }
            kept.extend_from_slice(pair);
            last_kept = Some(i);
        }
        // Bytes of a valid value, fewer: still valid.
        if let Ok(v) = HeaderValue::from_bytes(kept.trim_ascii_end())
            && !v.is_empty()
        {
            headers.append(header::COOKIE, v);
        }
    }
}

/// The `Set-Cookie` value that names backend `id`: `NAME=<id>; Path=/;
/// HttpOnly` (plus `Max-Age`). Built once per backend with the route, not
/// per response.
pub fn set_cookie(sticky: &Sticky, id: &str) -> Option<HeaderValue> {
    let mut c = cookie::Cookie::build((sticky.cookie.as_str(), id))
        .path("/")
        .http_only(true);
    if let Some(age) = sticky.max_age {
        c = c.max_age(cookie::time::Duration::seconds(age.as_secs() as i64));
    }
    HeaderValue::from_str(&c.build().to_string()).ok()
}

/// Add a backend's cookie ([`set_cookie`]), and keep caches from storing
/// it: `Cache-Control: no-cache="set-cookie"`.
pub fn insert(headers: &mut HeaderMap, set_cookie: &HeaderValue) {
    headers.append(header::SET_COOKIE, set_cookie.clone());
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache=\"set-cookie\""),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(cookies: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for c in cookies {
            h.append(header::COOKIE, HeaderValue::from_str(c).unwrap());
        }
        h
    }

    fn cookies(h: &HeaderMap) -> Vec<&str> {
        h.get_all(header::COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }

    #[test]
    fn cookie_ids_are_stable_opaque_and_distinct() {
        assert_eq!(cookie_id("web", "web1"), cookie_id("web", "web1"));
        assert_ne!(cookie_id("web", "web1"), cookie_id("web", "web2"));
        assert_ne!(cookie_id("web", "web1"), cookie_id("api", "web1"));
        assert_eq!(cookie_id("web", "web1").len(), 16);
        // Pinned: an HA pair running two versions must agree.
        assert_eq!(
            cookie_id("web", "web1"),
            format!("{:016x}", hash_bytes(b"web\0web1"))
        );
    }

    #[test]
    fn finds_the_cookie_among_several_headers() {
        let h = headers(&["a=1; b=2", "SERVERID=abc; c=3"]);
        assert_eq!(find_cookie(&h, "SERVERID").as_deref(), Some("abc"));
        assert_eq!(find_cookie(&h, "zzz"), None);
    }

    #[test]
    fn strips_only_our_cookie_and_keeps_the_rest_byte_for_byte() {
        let mut h = headers(&["a=1;  b=\"x y\"", "SERVERID=abc; c=3", "SERVERID=def"]);
        strip_cookie(&mut h, "SERVERID");
        assert_eq!(cookies(&h), ["a=1;  b=\"x y\"", "c=3"]);
        // Separators of the other pairs stay as sent, with or without spaces.
        let mut h = headers(&["a=1;SERVERID=abc;b=2", "c=3;  SERVERID=x; d=4"]);
        strip_cookie(&mut h, "SERVERID");
        assert_eq!(cookies(&h), ["a=1;b=2", "c=3;  d=4"]);
        // Non-ASCII (UTF-8) values elsewhere in the header: ours goes too.
        let mut h = HeaderMap::new();
        let v = HeaderValue::from_bytes("n=caf\u{e9}; SERVERID=abc".as_bytes()).unwrap();
        h.append(header::COOKIE, v);
        assert_eq!(find_cookie(&h, "SERVERID").as_deref(), Some("abc"));
        strip_cookie(&mut h, "SERVERID");
        assert_eq!(h[header::COOKIE].as_bytes(), "n=caf\u{e9}".as_bytes());
        let mut h = headers(&["SERVERIDX=1; SERVERID=2"]);
        strip_cookie(&mut h, "SERVERID");
        assert_eq!(cookies(&h), ["SERVERIDX=1"]);
    }
}
