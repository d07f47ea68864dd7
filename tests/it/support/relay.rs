//! A TCP relay between a client and a server on loopback that cuts its first connection after
//! a given number of bytes from the server: a connection lost in the middle of a large answer
//! (e.g. a paginated list). Later connections pass through untouched.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

pub struct CuttingRelay {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl CuttingRelay {
    /// Relays to `upstream`; the first connection is closed (both ways) once `budget` bytes
    /// have gone from the server to the client.
    pub async fn start(upstream: SocketAddr, budget: usize) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        let cut = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let (cut2, connections2) = (Arc::clone(&cut), Arc::clone(&connections));
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let first = connections2.fetch_add(1, Ordering::SeqCst) == 0;
                let cut = Arc::clone(&cut2);
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(upstream).await else { return };
                    let limit = if first { budget } else { usize::MAX };
                    relay(inbound, outbound, limit).await;
                    if first {
                        cut.store(true, Ordering::SeqCst);
                    }
                });
            }
        });
        Self { addr, cut, connections, task }
    }

    /// Whether the first connection has been cut.
    pub fn has_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// Copies both ways until either side closes, or until `limit` bytes went downstream.
async fn relay(inbound: TcpStream, outbound: TcpStream, limit: usize) {
    let (mut client_read, mut client_write) = inbound.into_split();
    let (mut server_read, mut server_write) = outbound.into_split();
    let upstream = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
    });
    let mut sent = 0usize;
    let mut buffer = vec![0u8; 16 * 1024];
    while sent < limit {
        let n = match server_read.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n.min(limit - sent),
        };
        if client_write.write_all(&buffer[..n]).await.is_err() {
            break;
        }
        sent += n;
    }
    // Dropping both halves of both sockets closes the connection mid-answer.
    upstream.abort();
}

impl Drop for CuttingRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
