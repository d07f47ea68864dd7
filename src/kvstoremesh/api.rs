//! KVStoreMesh's REST API (Cilium: `localhost:9889`, base path `/v1`): `GET /v1/cluster`
//! answers the status of every remote cluster, sorted by name; and the client side of it, as
//! `kvstoremesh-dbg` uses it.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::routing::get;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::status::RemoteCluster;

/// Where the API reads the current status from.
pub type StatusSource = Arc<dyn Fn() -> Vec<RemoteCluster> + Send + Sync>;

pub fn router(source: StatusSource) -> Router {
    Router::new().route(
        "/v1/cluster",
        get(move || {
            let source = Arc::clone(&source);
            async move {
                let mut clusters = source();
                clusters.sort_by(|a, b| a.name.cmp(&b.name));
                match serde_json::to_string(&clusters) {
                    Ok(body) => (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body),
                    Err(error) => {
                        (StatusCode::INTERNAL_SERVER_ERROR, [(header::CONTENT_TYPE, "text/plain")], error.to_string())
                    }
                }
            }
        }),
    )
}

/// Serves the API on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, source: StatusSource, shutdown: CancellationToken) -> std::io::Result<()> {
    axum::serve(listener, router(source)).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("connecting to {host}")]
    Connect {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the answer of {host}")]
    Read {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer from {0} within 10s")]
    Timeout(String),
    #[error("{host} answered {status}")]
    Status { host: String, status: String },
    #[error("unexpected answer from {host}")]
    Body {
        host: String,
        #[source]
        source: serde_json::Error,
    },
}

/// `GET /v1/cluster` from `host` (`localhost:9889`, with or without `http://`). One plain
/// HTTP/1.0 request: the API is local and tiny, which does not justify an HTTP client crate.
pub async fn fetch(host: &str) -> Result<Vec<RemoteCluster>, FetchError> {
    let addr = host.trim_start_matches("http://").trim_end_matches('/').to_owned();
    tokio::time::timeout(Duration::from_secs(10), fetch_from(&addr))
        .await
        .unwrap_or_else(|_| Err(FetchError::Timeout(addr.clone())))
}

async fn fetch_from(addr: &str) -> Result<Vec<RemoteCluster>, FetchError> {
    let host = addr.to_owned();
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|source| FetchError::Connect { host: host.clone(), source })?;
    let request = format!("GET /v1/cluster HTTP/1.0\r\nHost: {addr}\r\nAccept: application/json\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(|source| FetchError::Connect { host: host.clone(), source })?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.map_err(|source| FetchError::Read { host: host.clone(), source })?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(FetchError::Status { host, status: status.to_owned() });
    }
    serde_json::from_str(body).map_err(|source| FetchError::Body { host, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_api_answers_sorted_clusters_and_fetch_reads_them_back() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let source: StatusSource = Arc::new(|| {
            ["c3", "c2"].map(|name| RemoteCluster { name: name.into(), ready: true, ..Default::default() }).to_vec()
        });
        let token = CancellationToken::new();
        let server = tokio::spawn(serve(listener, source, token.clone()));
        let clusters = fetch(&format!("http://{addr}")).await.unwrap();
        assert_eq!(clusters.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["c2", "c3"]);
        assert!(clusters.iter().all(|c| c.ready));
        token.cancel();
        server.await.unwrap().unwrap();
        assert!(matches!(fetch(&addr.to_string()).await, Err(FetchError::Connect { .. })));
    }
}
