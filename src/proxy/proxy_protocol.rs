//! PROXY protocol headers (HAProxy's spec, versions 1 and 2), sent to a
//! backend before any client byte so it learns the real client address
//! (nginx, HAProxy and other proxies accept it; PostgreSQL and PgBouncer
//! do not).

use std::net::{IpAddr, SocketAddr};

use crate::config::ProxyProtocol;

/// The v2 signature: `\r\n\r\n\0\r\nQUIT\n`.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Version 2, command PROXY.
const V2_VERSION_PROXY: u8 = 0x21;
/// Address family and transport: TCP over IPv4 / IPv6.
const V2_TCP4: u8 = 0x11;
const V2_TCP6: u8 = 0x21;

/// The header announcing a connection from `client` to `local` (the
/// address the client connected to), or `None` when disabled.
pub fn header(version: ProxyProtocol, client: SocketAddr, local: SocketAddr) -> Option<Vec<u8>> {
    let (client, local) = (unmap(client), unmap(local));
    let same_family = client.is_ipv4() == local.is_ipv4();
    match version {
        ProxyProtocol::Off => None,
        ProxyProtocol::V1 if !same_family => Some(b"PROXY UNKNOWN\r\n".to_vec()),
        ProxyProtocol::V1 => {
            let family = if client.is_ipv4() { "TCP4" } else { "TCP6" };
            Some(
                format!(
                    "PROXY {family} {} {} {} {}\r\n",
                    client.ip(),
                    local.ip(),
                    client.port(),
                    local.port()
                )
                .into_bytes(),
            )
        }
        ProxyProtocol::V2 => {
            let mut h = Vec::with_capacity(16 + 36);
            h.extend_from_slice(&V2_SIGNATURE);
            h.push(V2_VERSION_PROXY);
            match (client.ip(), local.ip()) {
                (IpAddr::V4(src), IpAddr::V4(dst)) => {
                    h.push(V2_TCP4);
                    h.extend_from_slice(&12u16.to_be_bytes());
                    h.extend_from_slice(&src.octets());
                    h.extend_from_slice(&dst.octets());
                }
                (IpAddr::V6(src), IpAddr::V6(dst)) => {
                    h.push(V2_TCP6);
                    h.extend_from_slice(&36u16.to_be_bytes());
                    h.extend_from_slice(&src.octets());
                    h.extend_from_slice(&dst.octets());
                }
                // Mixed families cannot be described: AF_UNSPEC, no address.
                _ => {
                    h.push(0x00);
                    h.extend_from_slice(&0u16.to_be_bytes());
                    return Some(h);
                }
            }
            h.extend_from_slice(&client.port().to_be_bytes());
            h.extend_from_slice(&local.port().to_be_bytes());
            Some(h)
        }
    }
}

/// An IPv4 client seen through a dual-stack socket, as the IPv4 address.
fn unmap(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_text() {
        let h = header(ProxyProtocol::V1, sa("10.0.0.7:51000"), sa("10.0.0.1:5432")).unwrap();
        assert_eq!(h, b"PROXY TCP4 10.0.0.7 10.0.0.1 51000 5432\r\n");
        let h = header(
            ProxyProtocol::V1,
            sa("[2001:db8::7]:1"),
            sa("[2001:db8::1]:2"),
        )
        .unwrap();
        assert_eq!(h, b"PROXY TCP6 2001:db8::7 2001:db8::1 1 2\r\n");
        let h = header(
            ProxyProtocol::V1,
            sa("[::ffff:10.0.0.7]:9"),
            sa("10.0.0.1:80"),
        )
        .unwrap();
        assert_eq!(h, b"PROXY TCP4 10.0.0.7 10.0.0.1 9 80\r\n");
        assert!(header(ProxyProtocol::Off, sa("10.0.0.7:1"), sa("10.0.0.1:2")).is_none());
    }

    #[test]
    fn v2_binary() {
        let h = header(ProxyProtocol::V2, sa("10.0.0.7:51000"), sa("10.0.0.1:5432")).unwrap();
        let mut want = V2_SIGNATURE.to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0, 12, 10, 0, 0, 7, 10, 0, 0, 1]);
        want.extend_from_slice(&51000u16.to_be_bytes());
        want.extend_from_slice(&5432u16.to_be_bytes());
        assert_eq!(h, want);
        let h6 = header(ProxyProtocol::V2, sa("[::1]:1"), sa("[::1]:2")).unwrap();
        assert_eq!(h6.len(), 16 + 36);
        assert_eq!(h6[13], 0x21);
    }
}
