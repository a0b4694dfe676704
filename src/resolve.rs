//! Name resolution for webhook targets: bounded by the attempt's deadline,
//! and, unless private targets are allowed, keeping only public addresses
//! that are not this host's own. The addresses checked are the ones
//! connected to, so DNS rebinding cannot swap in a private address between
//! check and connect. No Postgres here.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant};

use ureq::http::Uri;
use ureq::unversioned::resolver::{ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::NextTimeout;
use ureq::unversioned::transport::time::Duration as TimeoutAfter;

use crate::target;

/// How long the list of this host's interface addresses is trusted.
const OWN_ADDRESSES_TTL: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct PublicOnlyResolver {
    pub allow_private: Arc<AtomicBool>,
}

impl Resolver for PublicOnlyResolver {
    fn resolve(
        &self,
        uri: &Uri,
        _config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let (host, port) = host_and_port(uri).ok_or(ureq::Error::HostNotFound)?;
        let deadline = match timeout.after {
            TimeoutAfter::Exact(d) => Some(Instant::now() + d),
            TimeoutAfter::NotHappening => None,
        };
        let addrs = match LOOKUPS.lookup(host, port, deadline) {
            Lookup::Found(addrs) => addrs,
            Lookup::Failed(e) => return Err(ureq::Error::Io(e)),
            Lookup::TimedOut => return Err(ureq::Error::Timeout(timeout.reason)),
        };
        let addrs = if self.allow_private.load(Ordering::Relaxed) {
            addrs
        } else {
            keep_allowed(&addrs, &own_addresses()).map_err(|refusal| {
                ureq::Error::Io(io::Error::new(io::ErrorKind::PermissionDenied, refusal))
            })?
        };
        let mut out = self.empty();
        // ureq holds at most 16 addresses per name.
        for a in addrs.into_iter().take(16) {
            out.push(a);
        }
        if out.is_empty() {
            return Err(ureq::Error::HostNotFound);
        }
        Ok(out)
    }
}

/// The host without IPv6 brackets and the port (explicit or the scheme's).
fn host_and_port(uri: &Uri) -> Option<(&str, u16)> {
    let authority = uri.authority()?;
    let port = match (authority.port_u16(), uri.scheme_str()) {
        (Some(p), _) => p,
        (None, Some("https")) => 443,
        (None, Some("http")) => 80,
        _ => return None,
    };
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Some((host, port))
}

enum Lookup {
    Found(Vec<SocketAddr>),
    Failed(io::Error),
    TimedOut,
}

/// How long a name's addresses are reused. getaddrinfo keeps no cache (without
/// nscd), and ureq resolves before it reuses a pooled connection, so each
/// delivery would otherwise ask the name servers and start a thread. Short:
/// a receiver that moves is followed within seconds.
const NAME_TTL: Duration = Duration::from_secs(5);
/// Names kept at most (one per receiver host: more means the cache restarts).
const NAMES_KEPT: usize = 1024;
/// Lookups running at most. Each runs on a thread that outlives its deadline
/// when the name servers do not answer; without a cap a burst of deliveries
/// to such a name would start thousands.
const LOOKUPS_IN_FLIGHT: usize = 32;

/// Name lookups: a short cache, and a cap on the threads running them.
struct Lookups {
    names: Mutex<HashMap<String, (Instant, Vec<IpAddr>)>>,
    in_flight: Arc<AtomicUsize>,
}

static LOOKUPS: LazyLock<Lookups> = LazyLock::new(Lookups::new);

impl Lookups {
    fn new() -> Lookups {
        Lookups {
            names: Mutex::new(HashMap::new()),
            in_flight: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Resolves `host`, giving up at `deadline`. getaddrinfo cannot be
    /// cancelled, so a name lookup runs on a helper thread that is left to
    /// finish on its own when the deadline passes; IP literals need no thread.
    fn lookup(&self, host: &str, port: u16, deadline: Option<Instant>) -> Lookup {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Lookup::Found(vec![SocketAddr::new(ip, port)]);
        }
        let with_port = |ips: &[IpAddr]| ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect();
        if let Some((at, ips)) = self.names().get(host)
            && at.elapsed() < NAME_TTL
        {
            return Lookup::Found(with_port(ips));
        }
        let found = match deadline {
            None => resolve_name(host),
            Some(deadline) => match self.resolve_by(host, deadline) {
                Some(result) => result,
                None => return Lookup::TimedOut,
            },
        };
        match found {
            Ok(ips) => {
                let mut names = self.names();
                if names.len() >= NAMES_KEPT {
                    names.retain(|_, (at, _)| at.elapsed() < NAME_TTL);
                }
                if names.len() < NAMES_KEPT {
                    names.insert(host.to_string(), (Instant::now(), ips.clone()));
                }
                Lookup::Found(with_port(&ips))
            }
            Err(e) => Lookup::Failed(e),
        }
    }

    /// The name's addresses from a helper thread, or None past `deadline`.
    fn resolve_by(&self, host: &str, deadline: Instant) -> Option<io::Result<Vec<IpAddr>>> {
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= LOOKUPS_IN_FLIGHT {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Some(Err(io::Error::other(format!(
                "{LOOKUPS_IN_FLIGHT} name lookups are already waiting for the name servers"
            ))));
        }
        let (tx, rx) = mpsc::sync_channel(1);
        let name = host.to_string();
        let in_flight = self.in_flight.clone();
        let spawned = std::thread::Builder::new()
            .name("linkhooks-dns".into())
            .spawn(move || {
                let _ = tx.send(resolve_name(&name));
                in_flight.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Some(Err(e));
        }
        rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .ok()
    }

    fn names(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Vec<IpAddr>)>> {
        self.names.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn resolve_name(host: &str) -> io::Result<Vec<IpAddr>> {
    Ok((host, 0).to_socket_addrs()?.map(|a| a.ip()).collect())
}

/// The addresses a target may be reached at when private targets are not
/// allowed: public ones that are not this host's own. Errors name the first
/// refused address (never the URL).
pub fn keep_allowed(addrs: &[SocketAddr], own: &[IpAddr]) -> Result<Vec<SocketAddr>, String> {
    let kept: Vec<SocketAddr> = addrs
        .iter()
        .copied()
        .filter(|a| target::is_public(a.ip()) && !target::is_own_address(a.ip(), own))
        .collect();
    if !kept.is_empty() {
        return Ok(kept);
    }
    Err(match addrs.first() {
        None => "refused: target resolves to no address".to_string(),
        Some(a) if target::is_public(a.ip()) => format!(
            "refused: target resolves to {}, an address of this host (linkhooks.allow_private_targets is off)",
            a.ip()
        ),
        Some(a) => format!(
            "refused: target resolves to non-public address {} (linkhooks.allow_private_targets is off)",
            a.ip()
        ),
    })
}

/// This host's interface addresses, refreshed every few seconds (interfaces
/// can gain addresses while the server runs).
pub fn own_addresses() -> Vec<IpAddr> {
    static CACHE: Mutex<Option<(Instant, Vec<IpAddr>)>> = Mutex::new(None);
    let mut cache = CACHE.lock().unwrap_or_else(PoisonError::into_inner);
    match &*cache {
        Some((at, addrs)) if at.elapsed() < OWN_ADDRESSES_TTL => addrs.clone(),
        _ => {
            let addrs = interface_addresses();
            *cache = Some((Instant::now(), addrs.clone()));
            addrs
        }
    }
}

/// Every IPv4 and IPv6 address on this host's interfaces (empty if the
/// kernel will not say: the public-address rules still apply).
fn interface_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: cursor is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cursor };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr whose family says its real type.
            let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
            if family == libc::AF_INET {
                // SAFETY: family AF_INET means the sockaddr is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::from(
                    u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                ));
            } else if family == libc::AF_INET6 {
                // SAFETY: family AF_INET6 means the sockaddr is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
            }
        }
        cursor = ifa.ifa_next;
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sock(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn interface_addresses_include_loopback() {
        let own = own_addresses();
        assert!(own.contains(&"127.0.0.1".parse().unwrap()), "{own:?}");
    }

    #[test]
    fn own_public_address_is_refused() {
        // A host with a public address of its own must not be reachable as a target.
        let own: Vec<IpAddr> = vec!["8.8.8.8".parse().unwrap()];
        let err = keep_allowed(&[sock("8.8.8.8:443")], &own).unwrap_err();
        assert!(err.contains("an address of this host"), "{err}");
        assert_eq!(
            keep_allowed(&[sock("8.8.8.8:443"), sock("1.1.1.1:443")], &own),
            Ok(vec![sock("1.1.1.1:443")])
        );
        // Also as an IPv6 address carrying it: connecting to ::ffff:8.8.8.8 reaches 8.8.8.8.
        for carried in [
            "[::ffff:8.8.8.8]:443",
            "[64:ff9b::808:808]:443",
            "[2002:808:808::1]:443",
        ] {
            let err = keep_allowed(&[sock(carried)], &own).unwrap_err();
            assert!(err.contains("an address of this host"), "{carried}: {err}");
        }
    }

    #[test]
    fn private_addresses_are_dropped_and_named() {
        let err =
            keep_allowed(&[sock("10.0.0.1:80"), sock("[64:ff9b:1::a00:1]:80")], &[]).unwrap_err();
        assert!(err.contains("non-public address 10.0.0.1"), "{err}");
        assert_eq!(
            keep_allowed(&[sock("10.0.0.1:80"), sock("1.1.1.1:80")], &[]),
            Ok(vec![sock("1.1.1.1:80")])
        );
        assert!(keep_allowed(&[], &[]).is_err());
    }

    #[test]
    fn literals_resolve_without_a_thread_and_names_within_the_deadline() {
        let lookups = Lookups::new();
        let Lookup::Found(a) = lookups.lookup("::1", 8080, Some(Instant::now())) else {
            panic!("literal")
        };
        assert_eq!(a, vec![sock("[::1]:8080")]);
        // A deadline already passed: a name lookup gives up at once.
        assert!(matches!(
            lookups.lookup("localhost", 80, Some(Instant::now())),
            Lookup::TimedOut | Lookup::Found(_)
        ));
        let started = Instant::now();
        let _ = lookups.lookup(
            "localhost",
            80,
            Some(Instant::now() + Duration::from_millis(200)),
        );
        assert!(started.elapsed() < Duration::from_millis(400));
    }

    #[test]
    fn a_name_is_looked_up_once_in_a_while_and_few_lookups_wait_at_a_time() {
        let lookups = Lookups::new();
        let deadline = || Some(Instant::now() + Duration::from_secs(5));
        let Lookup::Found(first) = lookups.lookup("localhost", 80, deadline()) else {
            panic!("localhost resolves")
        };
        // Found again with no time left: from the cache, each with the port asked for.
        let Lookup::Found(again) = lookups.lookup("localhost", 8080, Some(Instant::now())) else {
            panic!("cached")
        };
        assert_eq!(
            again,
            first
                .iter()
                .map(|a| SocketAddr::new(a.ip(), 8080))
                .collect::<Vec<_>>()
        );
        // With every lookup thread taken, a name not known fails at once; literals still resolve.
        lookups
            .in_flight
            .store(LOOKUPS_IN_FLIGHT, Ordering::Release);
        let Lookup::Failed(e) = lookups.lookup("localhost.localdomain", 80, deadline()) else {
            panic!("over the cap")
        };
        assert!(
            e.to_string().contains("name lookups are already waiting"),
            "{e}"
        );
        assert!(matches!(
            lookups.lookup("127.0.0.1", 80, deadline()),
            Lookup::Found(_)
        ));
        assert_eq!(lookups.in_flight.load(Ordering::Acquire), LOOKUPS_IN_FLIGHT);
    }

    #[test]
    fn hosts_and_ports() {
        let uri: Uri = "https://[::1]/x?token=1".parse().unwrap();
        assert_eq!(host_and_port(&uri), Some(("::1", 443)));
        let uri: Uri = "http://hooks.example.com:8080/x".parse().unwrap();
        assert_eq!(host_and_port(&uri), Some(("hooks.example.com", 8080)));
    }
}
