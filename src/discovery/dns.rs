//! DNS discovery (hickory-resolver): A and AAAA records of a host name, or
//! SRV records of a service name and the addresses of their targets.
//!
//! Every lookup asks the servers: the resolver caches nothing (TTLs are
//! capped at zero), because the point is to see a change within one
//! `dns_interval`, and the interval already paces the queries. A and AAAA
//! are asked separately so that one failing cannot pass for "no address"
//! (a name on a dual-stack pool would lose half its backends during a
//! resolver hiccup): the answer is a failure if either query fails, "no
//! address" only if both say so.
//!
//! SRV: targets of the lowest priority present are the primaries, all
//! higher priorities one backup tier; weights map by [`srv_weight`]. A
//! target whose name has no address is left out; a target whose lookup
//! *fails* makes the whole answer a failure, so a flaky resolver cannot
//! shrink the set one target at a time. Addresses the server put in the
//! answer's additional section are used without asking again.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{IntoName, Name, RData, Record};

use super::{Answer, Found, LookupFuture, Source, srv_weight};
use crate::config::{DnsQuery, DnsSettings};

/// The resolver every discovered name of the process asks, or why there is
/// none (an unreadable /etc/resolv.conf): then every lookup fails with that
/// reason, and the listeners serve what else they have.
#[derive(Debug)]
pub struct Resolver(Result<TokioResolver, String>);

impl Resolver {
    pub fn new(settings: &DnsSettings) -> Resolver {
        Resolver(build(settings))
    }

    /// The resolver, or the failed answer every lookup gives without one.
    fn get(&self) -> Result<&TokioResolver, Answer> {
        self.0.as_ref().map_err(|why| Answer::Failed(why.clone()))
    }
}

fn build(settings: &DnsSettings) -> Result<TokioResolver, String> {
    let mut builder = match &settings.servers {
        Some(servers) => {
            let servers = servers
                .iter()
                .map(|s| {
                    let mut server = NameServerConfig::udp_and_tcp(s.ip());
                    for c in &mut server.connections {
                        c.port = s.port();
                    }
                    server
                })
                .collect();
            let mut b = TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            );
            // Named servers are the whole truth: /etc/hosts does not
            // shadow them.
            b.options_mut().use_hosts_file = ResolveHosts::Never;
            b
        }
        None => TokioResolver::builder_tokio()
            .map_err(|e| format!("cannot read the system's DNS configuration: {e}"))?,
    };
    let opts = builder.options_mut();
    opts.positive_max_ttl = Some(Duration::ZERO);
    opts.negative_max_ttl = Some(Duration::ZERO);
    // Two tries per server inside the lookup's bound (the watch cuts it
    // off there in any case).
    let timeout = settings.interval.min(super::MAX_LOOKUP_TIMEOUT);
    opts.timeout = (timeout / 2).max(Duration::from_millis(50));
    opts.attempts = 1;
    builder
        .build()
        .map_err(|e| format!("cannot set up the DNS resolver: {e}"))
}

/// The source for `query`.
pub fn source(query: &DnsQuery, resolver: &Arc<Resolver>) -> Arc<dyn Source> {
    match query {
        DnsQuery::Host { host, port } => Arc::new(HostLookup {
            resolver: resolver.clone(),
            host: host.clone(),
            port: *port,
        }),
        DnsQuery::Srv { name } => Arc::new(SrvLookup {
            resolver: resolver.clone(),
            name: name.clone(),
        }),
    }
}

/// `host:port`: every A and AAAA address of `host`, on `port`.
#[derive(Debug)]
struct HostLookup {
    resolver: Arc<Resolver>,
    host: String,
    port: u16,
}

impl Source for HostLookup {
    fn lookup(&self) -> LookupFuture<'_> {
        Box::pin(async move {
            let resolver = match self.resolver.get() {
                Ok(r) => r,
                Err(failed) => return failed,
            };
            match addresses(resolver, self.host.as_str()).await {
                Ok(ips) => Answer::of(
                    ips.into_iter()
                        .map(|ip| Found {
                            addr: SocketAddr::new(ip, self.port),
                            backup: false,
                            weight: None,
                        })
                        .collect(),
                ),
                Err(why) => Answer::Failed(why),
            }
        })
    }
}

/// `_service._proto.name`: the SRV records' targets and ports.
#[derive(Debug)]
struct SrvLookup {
    resolver: Arc<Resolver>,
    name: String,
}

impl Source for SrvLookup {
    fn lookup(&self) -> LookupFuture<'_> {
        Box::pin(async move {
            let resolver = match self.resolver.get() {
                Ok(r) => r,
                Err(failed) => return failed,
            };
            let lookup = match resolver.srv_lookup(self.name.as_str()).await {
                Ok(lookup) => lookup,
                Err(e) if e.is_no_records_found() => return Answer::Empty,
                Err(e) => return Answer::Failed(e.to_string()),
            };
            let records: Vec<_> = lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    // A target of "." says the service is not offered there.
                    RData::SRV(srv) if !srv.target.is_root() => Some(srv.clone()),
                    _ => None,
                })
                .collect();
            // Each target's addresses: from the additional section where
            // the server gave them, else asked for, all at once.
            let mut known = glue(lookup.additionals());
            let mut asks = tokio::task::JoinSet::new();
            for srv in &records {
                let target = srv.target.clone();
                if known.contains_key(&target) {
                    continue;
                }
                known.insert(target.clone(), Vec::new());
                let resolver = resolver.clone();
                asks.spawn(async move {
                    let ips = addresses(&resolver, target.clone()).await;
                    (target, ips)
                });
            }
            while let Some(joined) = asks.join_next().await {
                let Ok((target, ips)) = joined else {
                    return Answer::Failed("a target lookup did not finish".into());
                };
                match ips {
                    Ok(ips) => {
                        known.insert(target, ips);
                    }
                    Err(why) => return Answer::Failed(format!("target {target}: {why}")),
                }
            }
            let resolved = |srv: &&hickory_resolver::proto::rr::rdata::SRV| {
                known.get(&srv.target).is_some_and(|ips| !ips.is_empty())
            };
            let Some(primary) = records.iter().filter(resolved).map(|s| s.priority).min() else {
                return Answer::Empty;
            };
            let mut found = Vec::new();
            for srv in records.iter().filter(resolved) {
                for ip in &known[&srv.target] {
                    found.push(Found {
                        addr: SocketAddr::new(*ip, srv.port),
                        backup: srv.priority != primary,
                        weight: Some(srv_weight(srv.weight)),
                    });
                }
            }
            Answer::of(found)
        })
    }
}

/// Addresses in an answer's additional section, by owner name.
fn glue(additionals: &[Record]) -> HashMap<Name, Vec<IpAddr>> {
    let mut glue: HashMap<Name, Vec<IpAddr>> = HashMap::new();
    for r in additionals {
        let ip = match &r.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            _ => continue,
        };
        glue.entry(r.name.clone()).or_default().push(ip);
    }
    glue
}

/// Every A and AAAA address of `host`; empty when it has none; an error
/// when either query failed.
async fn addresses(
    resolver: &TokioResolver,
    host: impl IntoName + Clone,
) -> Result<Vec<IpAddr>, String> {
    let (v4, v6) = tokio::join!(
        resolver.ipv4_lookup(host.clone()),
        resolver.ipv6_lookup(host)
    );
    let mut ips = Vec::new();
    for answer in [v4, v6] {
        match answer {
            Ok(lookup) => ips.extend(lookup.answers().iter().filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None, // the CNAMEs on the way
            })),
            Err(e) if no_address(&e) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(ips)
}

/// NXDOMAIN, or the name exists with no record of the type.
fn no_address(e: &NetError) -> bool {
    e.is_no_records_found()
}
