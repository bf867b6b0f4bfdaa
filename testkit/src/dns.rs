//! Docker's embedded DNS, as far as xdplb cares: a hickory-server on UDP and
//! TCP of one address.
//!
//! - a name (`tasks.<service>`) answers with the addresses the test set,
//!   TTL 600 (as Docker does; the daemon must not trust it): A records for
//!   an A query, AAAA for AAAA, both for either when [`FakeDns::set_mixed`]
//!   says so; a name without addresses of the asked family is NODATA, a
//!   name never set NXDOMAIN;
//! - a name may be a CNAME ([`FakeDns::set_cname`]): the answer holds the
//!   CNAME only, so the client asks again for the target;
//! - UDP answers are truncated at 512 bytes (or the client's EDNS size)
//!   with TC set, keeping the records that fit, as Docker does; TCP answers
//!   are complete, so more than about 29 tasks forces a client onto TCP;
//! - on demand ([`DnsMode`]): SERVFAIL, NXDOMAIN, or no answer at all (the
//!   client times out).
//!
//! Every query is counted by transport ([`DnsStats`]).

use std::{
    collections::BTreeMap,
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use hickory_server::{
    authority::MessageResponseBuilder,
    proto::{
        op::{Header, MessageType, OpCode, ResponseCode},
        rr::{
            rdata::{A, AAAA, CNAME},
            Name, RData, Record, RecordType,
        },
        serialize::binary::BinEncoder,
        xfer::Protocol,
    },
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    ServerFuture,
};

/// Docker's TTL, which the daemon must ignore.
const TTL: u32 = 600;

/// What the server does with the next queries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsMode {
    /// Answer with the current records: NOERROR (NODATA when the name has no
    /// addresses of the asked family), NXDOMAIN for names never set.
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

#[derive(Debug, Default)]
struct Addrs {
    /// Duplicates allowed, order kept.
    v4: Vec<Ipv4Addr>,
    v6: Vec<Ipv6Addr>,
}

#[derive(Debug)]
struct Zone {
    mode: DnsMode,
    /// Lower-case names without the trailing dot.
    names: BTreeMap<String, Addrs>,
    /// Name -> CNAME target (both as in `names`).
    cnames: BTreeMap<String, String>,
    /// A and AAAA records in every answer, whatever was asked.
    mixed: bool,
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

impl Handler {
    /// The answer records for `name`/`qtype`, or `None` for NXDOMAIN.
    fn records(&self, name: &Name, qtype: RecordType) -> Option<Vec<Record>> {
        let zone = self.zone.lock().expect("DNS zone lock");
        let k = key(&name.to_ascii());
        if let Some(target) = zone.cnames.get(&k) {
            let target = Name::from_ascii(format!("{target}.")).ok()?;
            return Some(vec![Record::from_rdata(
                name.clone(),
                TTL,
                RData::CNAME(CNAME(target)),
            )]);
        }
        let addrs = zone.names.get(&k)?;
        let mut records = Vec::new();
        if qtype == RecordType::A || zone.mixed {
            for ip in &addrs.v4 {
                records.push(Record::from_rdata(name.clone(), TTL, RData::A(A(*ip))));
            }
        }
        if qtype == RecordType::AAAA || zone.mixed {
            for ip in &addrs.v6 {
                records.push(Record::from_rdata(
                    name.clone(),
                    TTL,
                    RData::AAAA(AAAA(*ip)),
                ));
            }
        }
        Some(records)
    }
}

/// How many of `answers` fit in a UDP answer of `max_size` bytes, and
/// whether that is all of them. Measured with hickory-server's own encoder
/// (the one that truncates answers to EDNS clients), so the answer sent
/// afterwards has exactly that size: keep what fits, set TC, as Docker does.
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
        // Cannot happen with address records; send none rather than fail.
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
        let mode = self.zone.lock().expect("DNS zone lock").mode;
        let answer = match mode {
            DnsMode::Drop => return ResponseInfo::from(header),
            DnsMode::ServFail => Err(ResponseCode::ServFail),
            DnsMode::NxDomain => Err(ResponseCode::NXDomain),
            DnsMode::Answer => {
                let query = request.queries()[0].original();
                self.records(query.name(), query.query_type())
                    .ok_or(ResponseCode::NXDomain)
            }
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
            eprintln!("test DNS server: failed to send an answer: {e}");
            ResponseInfo::from(header)
        })
    }
}

/// The running server; dropping it stops it.
pub struct FakeDns {
    addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    counters: Arc<Counters>,
    _server: ServerFuture<Handler>,
}

impl FakeDns {
    /// Serves on `udp` and `tcp` (bound already, to the same address), on
    /// the tokio runtime of the caller's context.
    pub fn serve(udp: std::net::UdpSocket, tcp: std::net::TcpListener) -> io::Result<Self> {
        udp.set_nonblocking(true)?;
        tcp.set_nonblocking(true)?;
        let addr = udp.local_addr()?;
        let zone = Arc::new(Mutex::new(Zone {
            mode: DnsMode::Answer,
            names: BTreeMap::new(),
            cnames: BTreeMap::new(),
            mixed: false,
        }));
        let counters = Arc::new(Counters::default());
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
            addr,
            zone,
            counters,
            _server: server,
        })
    }

    /// Serves on an ephemeral port of 127.0.0.1, UDP and TCP alike.
    pub fn ephemeral() -> io::Result<Self> {
        // UDP on an ephemeral port, then TCP on the same port (again if that
        // TCP port happens to be taken).
        for _ in 0..100 {
            let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
            if let Ok(tcp) = std::net::TcpListener::bind(udp.local_addr()?) {
                return Self::serve(udp, tcp);
            }
        }
        Err(io::Error::other(
            "no port of 127.0.0.1 was free for both UDP and TCP in 100 tries",
        ))
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn zone(&self) -> std::sync::MutexGuard<'_, Zone> {
        self.zone.lock().expect("DNS zone lock")
    }

    /// `name` (e.g. `tasks.web`) answers with the IPv4 addresses `addrs`
    /// from the next query on (its IPv6 ones stay), and the mode goes back
    /// to [`DnsMode::Answer`]. An empty set is NODATA (NOERROR without
    /// records), like a Swarm service scaled to zero.
    pub fn set(&self, name: &str, addrs: impl IntoIterator<Item = Ipv4Addr>) {
        let mut zone = self.zone();
        zone.names.entry(key(name)).or_default().v4 = addrs.into_iter().collect();
        zone.mode = DnsMode::Answer;
    }

    /// Like [`Self::set`], for the IPv6 addresses (AAAA records).
    pub fn set_v6(&self, name: &str, addrs: impl IntoIterator<Item = Ipv6Addr>) {
        let mut zone = self.zone();
        zone.names.entry(key(name)).or_default().v6 = addrs.into_iter().collect();
        zone.mode = DnsMode::Answer;
    }

    /// Answer A and AAAA records alike, whatever the query asked for.
    pub fn set_mixed(&self, mixed: bool) {
        self.zone().mixed = mixed;
    }

    /// `name` is a CNAME to `target` (`None`: not any more).
    pub fn set_cname(&self, name: &str, target: Option<&str>) {
        let mut zone = self.zone();
        match target {
            Some(t) => zone.cnames.insert(key(name), key(t)),
            None => zone.cnames.remove(&key(name)),
        };
    }

    /// `name` answers NXDOMAIN from the next query on.
    pub fn remove(&self, name: &str) {
        let mut zone = self.zone();
        zone.names.remove(&key(name));
        zone.cnames.remove(&key(name));
    }

    /// The IPv4 addresses `name` currently answers with.
    pub fn get(&self, name: &str) -> Vec<Ipv4Addr> {
        self.zone()
            .names
            .get(&key(name))
            .map(|a| a.v4.clone())
            .unwrap_or_default()
    }

    pub fn set_mode(&self, mode: DnsMode) {
        self.zone().mode = mode;
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
