//! Many tasks in one namespace: a Swarm service with hundreds of replicas,
//! without hundreds of namespaces.
//!
//! One namespace on the overlay bridge holds every address
//! (`10.20.1.1`, `10.20.1.2`, ... as `/16`, so the balancer's `10.20.0.1` is
//! on-link for the answers; the balancer gets the route `10.20.1.0/24 dev
//! eth1`). One HTTP server bound to `0.0.0.0:80` answers every one of them
//! with the address the connection arrived on (`getsockname`), so each
//! address is a distinct task to the balancer and to the test:
//!
//! - any `GET` answers `10.20.1.7 many\n` (the first word is the "backend
//!   name" the client records);
//! - requests are counted per local address.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    server::conn::http1,
    service::service_fn,
    Request, Response,
};
use hyper_util::rt::TokioIo;
use testkit::netns::NetNs;
use tokio::{
    net::{TcpListener, TcpSocket},
    runtime::Handle,
    sync::watch,
    task::JoinSet,
};

use super::HTTP_PORT;

/// The most tasks one [`ManyTasks`] can hold (`10.20.1.1` to `10.20.1.254`).
pub const MAX_MANY_TASKS: usize = 254;

/// Task `i`'s address: `10.20.1.(1+i)`.
pub fn many_task_addr(i: usize) -> Ipv4Addr {
    assert!(i < MAX_MANY_TASKS, "at most {MAX_MANY_TASKS} many-tasks");
    Ipv4Addr::new(10, 20, 1, u8::try_from(1 + i).expect("checked above"))
}

/// The namespace with many addresses and its server; dropping it stops the
/// server.
pub struct ManyTasks {
    addrs: Vec<Ipv4Addr>,
    requests: Arc<Mutex<BTreeMap<Ipv4Addr, u64>>>,
    stop: watch::Sender<bool>,
    // Dropped after the server (which holds sockets of the namespace).
    ns: NetNs,
}

impl ManyTasks {
    /// Serves `0.0.0.0:80` in `ns`, whose `eth0` already carries `addrs`.
    pub(crate) fn start(ns: NetNs, addrs: Vec<Ipv4Addr>, rt: &Handle) -> Result<Self> {
        let socket = ns
            .run_in(|| {
                let s = TcpSocket::new_v4()?;
                s.set_reuseaddr(true)?;
                s.bind((Ipv4Addr::UNSPECIFIED, HTTP_PORT).into())
                    .context("binding TCP port 80")?;
                Ok(s)
            })
            .context("starting the many-tasks server")?;
        let listener = {
            let _rt = rt.enter();
            // Health checks of every task arrive together, once per check
            // interval: std's backlog of 128 would drop some of their SYNs.
            socket.listen(4096)?
        };
        let requests: Arc<Mutex<BTreeMap<Ipv4Addr, u64>>> = Arc::default();
        let (stop, stop_rx) = watch::channel(false);
        rt.spawn(serve(listener, Arc::clone(&requests), stop_rx));
        Ok(Self {
            addrs,
            requests,
            stop,
            ns,
        })
    }

    /// Every task address, in order.
    pub fn addrs(&self) -> &[Ipv4Addr] {
        &self.addrs
    }

    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// HTTP requests per local address, counted by the server.
    pub fn requests(&self) -> BTreeMap<Ipv4Addr, u64> {
        self.requests.lock().expect("many-tasks lock").clone()
    }
}

impl Drop for ManyTasks {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn serve(
    listener: TcpListener,
    requests: Arc<Mutex<BTreeMap<Ipv4Addr, u64>>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut open = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                // getsockname: the task address the client (the balancer) chose.
                let Ok(local) = stream.local_addr() else { continue };
                let IpAddr::V4(local) = local.ip() else { continue };
                let requests = Arc::clone(&requests);
                open.spawn(async move {
                    let service = service_fn(move |_req: Request<Incoming>| {
                        *requests
                            .lock()
                            .expect("many-tasks lock")
                            .entry(local)
                            .or_default() += 1;
                        let body = format!("{local} many\n");
                        async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = open.join_next(), if !open.is_empty() => {}
        }
    }
    open.shutdown().await;
}
