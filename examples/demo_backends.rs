//! Two demo backends for the quick start: tiny HTTP servers on
//! 127.0.0.1:9001 and 127.0.0.1:9002 (or the ports given as arguments) that
//! answer every request with their own name, so balancing is visible.
//!
//! `cargo run --release --example demo_backends [PORT…]`

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let mut ports: Vec<u16> = std::env::args()
        .skip(1)
        .map(|p| p.parse().expect("ports are numbers"))
        .collect();
    if ports.is_empty() {
        ports = vec![9001, 9002];
    }
    let mut tasks = Vec::new();
    for (i, port) in ports.into_iter().enumerate() {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let name = format!("demo{}", i + 1);
        eprintln!("{name} listening on 127.0.0.1:{port}");
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else { continue };
                let body = format!("hello from {name} (port {port})\n");
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    // One request per connection is enough for a demo.
                    if s.read(&mut buf).await.unwrap_or(0) > 0 {
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = s.write_all(resp.as_bytes()).await;
                    }
                });
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}
