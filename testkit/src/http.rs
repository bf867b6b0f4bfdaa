//! A real HTTP/1.1 server (hyper) for health-check tests: it answers
//! every path with a chosen status after a chosen delay, and records what
//! it was asked.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    server::conn::http1,
    service::service_fn,
    Request, Response,
};
use hyper_util::rt::TokioIo;
use tokio::{
    net::TcpListener,
    task::{JoinHandle, JoinSet},
};

/// A hyper HTTP/1.1 server answering every path with `status` after `delay`
/// (3xx answers redirect to `/elsewhere`, which answers 200 at once).
pub struct HttpServer {
    pub addr: SocketAddr,
    /// Accepted TCP connections.
    pub connections: Arc<AtomicUsize>,
    /// Request paths, in order.
    paths: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl HttpServer {
    pub async fn start(status: u16, delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let paths = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(serve(
            listener,
            status,
            delay,
            connections.clone(),
            paths.clone(),
        ));
        Self {
            addr,
            connections,
            paths,
            task,
        }
    }

    pub fn paths(&self) -> Vec<String> {
        self.paths.lock().expect("paths lock").clone()
    }

    /// Close the listener and every open connection.
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

async fn serve(
    listener: TcpListener,
    status: u16,
    delay: Duration,
    connections: Arc<AtomicUsize>,
    paths: Arc<Mutex<Vec<String>>>,
) {
    // Owned here, so aborting the server task closes its connections too.
    let mut open = JoinSet::new();
    while let Ok((stream, _)) = listener.accept().await {
        connections.fetch_add(1, Ordering::SeqCst);
        let paths = paths.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let paths = paths.clone();
            async move {
                let path = req.uri().path().to_owned();
                paths.lock().expect("paths lock").push(path.clone());
                tokio::time::sleep(delay).await;
                let status = if path == "/elsewhere" { 200 } else { status };
                let mut response = Response::builder().status(status);
                if (300..400).contains(&status) {
                    response = response.header("location", "/elsewhere");
                }
                response.body(Full::new(Bytes::from_static(b"ok\n")))
            }
        });
        open.spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
