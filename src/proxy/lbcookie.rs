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
pub fn find_cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == name)
        .map(|c| c.value().to_owned())
}

/// Remove cookie `name` from every Cookie header; other cookies are kept
/// exactly as sent. A header left empty is removed.
pub fn strip_cookie(headers: &mut HeaderMap, name: &str) {
    let values: Vec<HeaderValue> = headers.get_all(header::COOKIE).iter().cloned().collect();
    if values.is_empty() {
        return;
    }
    let is_ours = |pair: &str| pair.split_once('=').map_or(pair, |(n, _)| n).trim() == name;
    let mut kept = Vec::with_capacity(values.len());
    let mut changed = false;
    for v in values {
        let Ok(text) = v.to_str() else {
            kept.push(v);
            continue;
        };
        let pairs: Vec<&str> = text
            .split(';')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect();
        if !pairs.iter().any(|p| is_ours(p)) {
            kept.push(v);
            continue;
        }
        changed = true;
        let rest: Vec<&str> = pairs.into_iter().filter(|p| !is_ours(p)).collect();
        if !rest.is_empty()
            && let Ok(v) = HeaderValue::from_str(&rest.join("; "))
        {
            kept.push(v);
        }
    }
    if changed {
        headers.remove(header::COOKIE);
        for v in kept {
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
        let mut h = headers(&["SERVERIDX=1; SERVERID=2"]);
        strip_cookie(&mut h, "SERVERID");
        assert_eq!(cookies(&h), ["SERVERIDX=1"]);
    }
}
