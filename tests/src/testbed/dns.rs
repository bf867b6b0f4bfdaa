//! Docker's embedded DNS, as far as xdplb cares: a hickory-server on
//! `127.0.0.11:53` (UDP and TCP) inside the balancer's namespace.
//!
//! - `tasks.<service>` answers with the addresses the test set, TTL 600 (as
//!   Docker does; the daemon must not trust it);
//! - UDP answers are truncated at 512 bytes (or the client's EDNS size) with
//!   TC set, keeping the records that fit, as Docker does; TCP answers are
//!   complete, so more than about 29 tasks forces the resolver onto TCP;
//! - on demand: SERVFAIL, NXDOMAIN, or no answer at all (the client times out).
//!
//! The handler is the one of `lb-user/tests/discovery.rs`, extended to any
//! number of names. Every query is counted by transport.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use hickory_server::{
    authority::MessageResponseBuilder,
    proto::{
        op::{Header, MessageType, OpCode, ResponseCode},
        rr::{rdata::A, RData, Record, RecordType},
        serialize::binary::BinEncoder,
        xfer::Protocol,
    },
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    ServerFuture,
};
use tokio::runtime::Handle;

use crate::netns::NetNs;

/// Where Docker's embedded DNS listens inside every container.
pub const DNS_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11)), 53);

/// Docker's TTL, which the daemon must ignore.
const TTL: u32 = 600;

/// What the server does with the next queries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsMode {
    /// Answer with the current records: NOERROR (NODATA when the name has no
    /// addresses), NXDOMAIN for names never set.
    Answer,
    ServFail,
    NxDomain,
    /// Swallow the query: the client times out.
    Drop,
}

/// Query counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsStats {
    pub udp: u64,
    pub tcp: u64,
    /// UDP answers sent with TC set.
    pub truncated: u64,
    /// Biggest UDP answer, in bytes.
    pub max_udp_len: usize,
}

#[derive(Debug)]
struct Zone {
    mode: DnsMode,
    /// Lower-case names without the trailing dot -> addresses (duplicates
    /// allowed, order kept).
    names: BTreeMap<String, Vec<Ipv4Addr>>,
}

#[derive(Debug, Default)]
struct Counters {
    udp: AtomicU64,
    tcp: AtomicU64,
    truncated: AtomicU64,
    max_udp_len: AtomicUsize,
}

struct Handler {
    zone: Arc<Mutex<Zone>>,
    counters: Arc<Counters>,
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// How many of `answers` fit in a UDP answer of `max_size` bytes, and whether
/// that is all of them. Measured with hickory-server's own encoder, so the
/// answer sent afterwards has exactly that size.
fn fit(request: &Request, header: Header, answers: &[Record], max_size: u16) -> (usize, bool) {
    let mut buffer = Vec::new();
    let mut encoder = BinEncoder::new(&mut buffer);
    encoder.set_max_size(max_size);
    match MessageResponseBuilder::from_message_request(request)
        .build(
            header,
            answers.iter(),
            std::iter::empty(),
            std::iter::empty(),
            std::iter::empty(),
        )
        .destructive_emit(&mut encoder)
    {
        Ok(info) => (usize::from(info.answer_count()), info.truncated()),
        // Cannot happen with A records; send none rather than fail the query.
        Err(_) => (0, true),
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let protocol = request.protocol();
        match protocol {
            Protocol::Udp => self.counters.udp.fetch_add(1, Ordering::SeqCst),
            _ => self.counters.tcp.fetch_add(1, Ordering::SeqCst),
        };
        let mut header = Header::response_from_request(request.header());
        header
            .set_message_type(MessageType::Response)
            .set_op_code(OpCode::Query)
            .set_authoritative(true)
            .set_recursion_available(true);
        let builder = MessageResponseBuilder::from_message_request(request);

        let (mode, records) = {
            let zone = self.zone.lock().expect("DNS zone lock");
            let query = request.queries()[0].original();
            let records = zone.names.get(&key(&query.name().to_ascii())).map(|ips| {
                if query.query_type() == RecordType::A {
                    ips.iter()
                        .map(|ip| Record::from_rdata(query.name().clone(), TTL, RData::A(A(*ip))))
                        .collect()
                } else {
                    Vec::new() // NODATA: the tasks have A records only.
                }
            });
            (zone.mode, records)
        };
        let answer = match (mode, records) {
            (DnsMode::Drop, _) => return ResponseInfo::from(header),
            (DnsMode::Answer, Some(records)) => Ok(records),
            (DnsMode::ServFail, _) => Err(ResponseCode::ServFail),
            (DnsMode::NxDomain, _) | (DnsMode::Answer, None) => Err(ResponseCode::NXDomain),
        };
        let result = match answer {
            Err(code) => {
                let response = builder.error_msg(request.header(), code);
                response_handle.send_response(response).await
            }
            Ok(records) => {
                let mut keep = records.len();
                if protocol == Protocol::Udp {
                    // 512 bytes without EDNS (RFC 1035), which Docker enforces.
                    let (fits, truncated) = fit(request, header, &records, request.max_payload());
                    if truncated {
                        header.set_truncated(true);
                        self.counters.truncated.fetch_add(1, Ordering::SeqCst);
                    }
                    keep = fits;
                    let mut buffer = Vec::new();
                    let mut encoder = BinEncoder::new(&mut buffer);
                    let emitted = MessageResponseBuilder::from_message_request(request)
                        .build(
                            header,
                            records[..keep].iter(),
                            std::iter::empty(),
                            std::iter::empty(),
                            std::iter::empty(),
                        )
                        .destructive_emit(&mut encoder);
                    if emitted.is_ok() {
                        self.counters
                            .max_udp_len
                            .fetch_max(buffer.len(), Ordering::SeqCst);
                    }
                }
                let response = builder.build(
                    header,
                    records[..keep].iter(),
                    std::iter::empty(),
                    std::iter::empty(),
                    std::iter::empty(),
                );
                response_handle.send_response(response).await
            }
        };
        result.unwrap_or_else(|e| {
            eprintln!("testbed DNS: failed to send an answer: {e}");
            ResponseInfo::from(header)
        })
    }
}

/// The running DNS server; dropping it stops it.
pub struct Dns {
    zone: Arc<Mutex<Zone>>,
    counters: Arc<Counters>,
    _server: ServerFuture<Handler>,
}

impl Dns {
    /// Binds UDP and TCP `127.0.0.11:53` inside `ns` (whose `lo` must be up)
    /// and serves them on `rt`.
    pub(crate) fn start(ns: &NetNs, rt: &Handle) -> Result<Self> {
        let (udp, tcp) = ns
            .run_in(|| {
                let udp =
                    std::net::UdpSocket::bind(DNS_ADDR).context("binding UDP 127.0.0.11:53")?;
                let tcp =
                    std::net::TcpListener::bind(DNS_ADDR).context("binding TCP 127.0.0.11:53")?;
                udp.set_nonblocking(true)?;
                tcp.set_nonblocking(true)?;
                Ok((udp, tcp))
            })
            .with_context(|| format!("starting the DNS server in {}", ns.name()))?;
        let zone = Arc::new(Mutex::new(Zone {
            mode: DnsMode::Answer,
            names: BTreeMap::new(),
        }));
        let counters = Arc::new(Counters::default());
        let _rt = rt.enter();
        let mut server = ServerFuture::new(Handler {
            zone: Arc::clone(&zone),
            counters: Arc::clone(&counters),
        });
        server.register_socket(tokio::net::UdpSocket::from_std(udp)?);
        server.register_listener(
            tokio::net::TcpListener::from_std(tcp)?,
            Duration::from_secs(5),
        );
        Ok(Self {
            zone,
            counters,
            _server: server,
        })
    }

    /// `name` (e.g. `tasks.web`) answers with `addrs` from the next query on,
    /// and the mode goes back to [`DnsMode::Answer`]. An empty set is NODATA
    /// (NOERROR without records), like a Swarm service scaled to zero.
    pub fn set(&self, name: &str, addrs: impl IntoIterator<Item = Ipv4Addr>) {
        let mut zone = self.zone.lock().expect("DNS zone lock");
        zone.names.insert(key(name), addrs.into_iter().collect());
        zone.mode = DnsMode::Answer;
    }

    /// `name` answers NXDOMAIN from the next query on.
    pub fn remove(&self, name: &str) {
        self.zone
            .lock()
            .expect("DNS zone lock")
            .names
            .remove(&key(name));
    }

    /// The addresses `name` currently answers with.
    pub fn get(&self, name: &str) -> Vec<Ipv4Addr> {
        let zone = self.zone.lock().expect("DNS zone lock");
        zone.names.get(&key(name)).cloned().unwrap_or_default()
    }

    pub fn set_mode(&self, mode: DnsMode) {
        self.zone.lock().expect("DNS zone lock").mode = mode;
    }

    pub fn stats(&self) -> DnsStats {
        DnsStats {
            udp: self.counters.udp.load(Ordering::SeqCst),
            tcp: self.counters.tcp.load(Ordering::SeqCst),
            truncated: self.counters.truncated.load(Ordering::SeqCst),
            max_udp_len: self.counters.max_udp_len.load(Ordering::SeqCst),
        }
    }
}
