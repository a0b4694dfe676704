//! Where may a URL point? Destination checks for links and SSRF checks for
//! webhook targets. Pure logic: the same rules run when a row is written and,
//! for webhook hosts, again on every address DNS returns at connect time.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use thiserror::Error;
use url::{Host, Url};

/// Longest URL we store or call, in bytes.
pub const MAX_URL_LEN: usize = 2048;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {MAX_URL_LEN} characters (got {0})")]
    TooLong(usize),
    // Stored and used as written: a redirect's Location header, a request line.
    #[error("must not contain spaces or control characters (percent-encode them: a space is %20)")]
    Whitespace,
    #[error("must be an absolute http or https URL ({0})")]
    Unparsable(String),
    #[error("must use http or https (got '{0}')")]
    Scheme(String),
    #[error("must use https (set linkhooks.require_https = off to allow http)")]
    HttpsRequired,
    #[error("must not contain credentials (user:password@)")]
    Credentials,
    #[error("must have a host")]
    NoHost,
    #[error(
        "must not point at a private, loopback, link-local or otherwise non-public address ({0}); \
         set linkhooks.allow_private_targets = on to allow it"
    )]
    PrivateTarget(String),
}

/// Checks a link destination (or expired_url): an absolute http(s) URL
/// without credentials, at most [`MAX_URL_LEN`] long.
pub fn check_destination(raw: &str) -> Result<Url, UrlError> {
    parse_http_url(raw)
}

/// Checks a webhook target URL when a subscription is written. Unless private
/// targets are allowed, an address literal must be public and not one of
/// `own_addresses` (this host's: it may have a public one).
pub fn check_webhook_url(
    raw: &str,
    require_https: bool,
    allow_private: bool,
    own_addresses: &[IpAddr],
) -> Result<Url, UrlError> {
    let url = parse_http_url(raw)?;
    if require_https && url.scheme() != "https" {
        return Err(UrlError::HttpsRequired);
    }
    if !allow_private {
        let literal = |ip: IpAddr| {
            if is_own_address(ip, own_addresses) {
                return Err(UrlError::PrivateTarget(format!(
                    "{ip}, an address of this host"
                )));
            }
            check_public(ip)
        };
        match url.host() {
            Some(Host::Ipv4(ip)) => literal(IpAddr::V4(ip))?,
            Some(Host::Ipv6(ip)) => literal(IpAddr::V6(ip))?,
            Some(Host::Domain(name)) if is_local_hostname(name) => {
                return Err(UrlError::PrivateTarget(name.to_string()));
            }
            Some(Host::Domain(_)) => {}
            None => return Err(UrlError::NoHost),
        }
    }
    Ok(url)
}

fn parse_http_url(raw: &str) -> Result<Url, UrlError> {
    if raw.trim().is_empty() {
        return Err(UrlError::Empty);
    }
    if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(UrlError::Whitespace);
    }
    let chars = raw.chars().count();
    if chars > MAX_URL_LEN {
        return Err(UrlError::TooLong(chars));
    }
    let url = Url::parse(raw).map_err(|e| UrlError::Unparsable(e.to_string()))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(UrlError::Scheme(url.scheme().to_string()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(UrlError::Credentials);
    }
    if url.host().is_none() {
        return Err(UrlError::NoHost);
    }
    Ok(url)
}

/// Names that always mean "this machine or this LAN".
fn is_local_hostname(name: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    const SUFFIXES: [&str; 5] = [
        ".localhost",
        ".local",
        ".internal",
        ".home.arpa",
        ".localdomain",
    ];
    name == "localhost"
        || name == "localhost.localdomain"
        || SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// Errors unless `ip` is a globally routable unicast address.
pub fn check_public(ip: IpAddr) -> Result<(), UrlError> {
    if is_public(ip) {
        Ok(())
    } else {
        Err(UrlError::PrivateTarget(ip.to_string()))
    }
}

/// True for globally routable unicast addresses only.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

const BLOCKED_V4: [&str; 15] = [
    "0.0.0.0/8",       // "this network", unspecified
    "10.0.0.0/8",      // private
    "100.64.0.0/10",   // carrier-grade NAT
    "127.0.0.0/8",     // loopback
    "169.254.0.0/16",  // link-local (cloud metadata lives here)
    "172.16.0.0/12",   // private
    "192.0.0.0/24",    // IETF protocol assignments
    "192.0.2.0/24",    // documentation
    "192.88.99.0/24",  // 6to4 relay anycast
    "192.168.0.0/16",  // private
    "198.18.0.0/15",   // benchmarking
    "198.51.100.0/24", // documentation
    "203.0.113.0/24",  // documentation
    "224.0.0.0/4",     // multicast
    "240.0.0.0/4",     // reserved and broadcast
];

/// Inside 2000::/3, the only IPv6 space allotted for global unicast.
const BLOCKED_V6: [&str; 3] = [
    "2001::/23",     // IETF protocol assignments: Teredo 2001::/32, benchmarking, ORCHID
    "2001:db8::/32", // documentation
    "3fff::/20",     // documentation (RFC 9637)
];

fn is_public_v4(ip: Ipv4Addr) -> bool {
    !BLOCKED_V4
        .iter()
        .any(|net| net.parse::<Ipv4Net>().is_ok_and(|n| n.contains(&ip)))
}

/// Whether `ip` is one of `own` (this host's addresses), also when written as
/// an IPv6 address that carries it: `[::ffff:1.2.3.4]` reaches 1.2.3.4.
pub fn is_own_address(ip: IpAddr, own: &[IpAddr]) -> bool {
    own.contains(&ip)
        || matches!(ip, IpAddr::V6(v6)
            if embedded_v4(v6).is_some_and(|v4| own.contains(&IpAddr::V4(v4))))
}

/// The IPv4 address an IPv6 one carries to a gateway or the local stack.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let seg = ip.segments();
    let embedded =
        |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    if seg[..6] == [0, 0, 0, 0, 0, 0xffff] // ::ffff:0:0/96, IPv4-mapped
        || seg[..6] == [0, 0, 0, 0, 0xffff, 0] // ::ffff:0:0:0/96, IPv4-translated
        || seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
    // 64:ff9b::/96, well-known NAT64
    {
        return Some(embedded(seg[6], seg[7]));
    }
    (seg[0] == 0x2002).then(|| embedded(seg[1], seg[2])) // 6to4
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    // Addresses that carry an IPv4 address are judged by that address.
    if let Some(v4) = embedded_v4(ip) {
        return is_public_v4(v4);
    }
    let seg = ip.segments();
    // Everything outside 2000::/3 is not global unicast: ::/128, ::1,
    // IPv4-compatible ::/96, 64:ff9b:1::/48 (local-use NAT64), 100::/64,
    // 5f00::/16 (SRv6), fc00::/7, fe80::/10, fec0::/10, ff00::/8, ...
    if seg[0] & 0xe000 != 0x2000 {
        return false;
    }
    !BLOCKED_V6
        .iter()
        .any(|net| net.parse::<Ipv6Net>().is_ok_and(|n| n.contains(&ip)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations() {
        assert!(check_destination("https://acme.com/sale?x=1#top").is_ok());
        assert!(check_destination("http://acme.com").is_ok());
        assert_eq!(check_destination(""), Err(UrlError::Empty));
        assert!(matches!(
            check_destination("acme.com/sale"),
            Err(UrlError::Unparsable(_))
        ));
        assert_eq!(
            check_destination("ftp://acme.com/x"),
            Err(UrlError::Scheme("ftp".into()))
        );
        assert_eq!(
            check_destination("javascript:alert(1)"),
            Err(UrlError::Scheme("javascript".into()))
        );
        assert_eq!(
            check_destination("https://bob:pw@acme.com/"),
            Err(UrlError::Credentials)
        );
        assert_eq!(
            check_destination("https://bob@acme.com/"),
            Err(UrlError::Credentials)
        );
        let long = format!("https://acme.com/{}", "a".repeat(MAX_URL_LEN));
        assert!(matches!(
            check_destination(&long),
            Err(UrlError::TooLong(_))
        ));
        // Stored as written and sent as a Location header: no padding, no header injection.
        for bad in [
            " https://acme.com/",
            "https://acme.com/ ",
            "https://acme.com/gone\r\nSet-Cookie: s=1",
            "https://acme.com/a\tb",
            "https://acme.com/a b",
            "https://acme.com/\u{a0}",
        ] {
            assert_eq!(check_destination(bad), Err(UrlError::Whitespace), "{bad:?}");
        }
        assert_eq!(check_destination("   "), Err(UrlError::Empty));
        let wide = format!("https://acme.com/{}", "é".repeat(MAX_URL_LEN - 20));
        assert!(
            check_destination(&wide).is_ok(),
            "the limit counts characters"
        );
    }

    #[test]
    fn webhook_urls() {
        assert!(check_webhook_url("https://hooks.example.com/in", true, false, &[]).is_ok());
        assert_eq!(
            check_webhook_url("http://hooks.example.com/in", true, false, &[]),
            Err(UrlError::HttpsRequired)
        );
        assert!(check_webhook_url("http://hooks.example.com/in", false, false, &[]).is_ok());
        // The sender sends the URL as written, and its HTTP stack refuses a space.
        assert_eq!(
            check_webhook_url("https://hooks.example.com/in ", true, false, &[]),
            Err(UrlError::Whitespace)
        );
        for bad in [
            "https://localhost/x",
            "https://LOCALHOST./x",
            "https://api.localhost/x",
            "https://printer.local/x",
            "https://metadata.google.internal/x",
            "https://127.0.0.1/x",
            "https://10.1.2.3/x",
            "https://169.254.169.254/latest/meta-data",
            "https://[::1]/x",
            "https://[::ffff:127.0.0.1]/x",
            "https://[64:ff9b:1::a00:1]/x",
            "https://[64:ff9b::7f00:1]/x",
            "https://[fe80::1]/x",
            "https://0.0.0.0/x",
            "https://100.64.0.1/x",
            "https://224.0.0.1/x",
        ] {
            assert!(
                matches!(
                    check_webhook_url(bad, true, false, &[]),
                    Err(UrlError::PrivateTarget(_))
                ),
                "{bad} should be refused"
            );
            assert!(
                check_webhook_url(bad, true, true, &[]).is_ok(),
                "{bad} allowed when private targets are"
            );
        }
    }

    #[test]
    fn this_hosts_own_public_address_is_refused_unless_private_targets_are_allowed() {
        let own: IpAddr = "1.2.3.4".parse().unwrap();
        assert!(matches!(
            check_webhook_url("https://1.2.3.4/in", true, false, &[own]),
            Err(UrlError::PrivateTarget(shown)) if shown == "1.2.3.4, an address of this host"
        ));
        assert!(check_webhook_url("https://1.2.3.5/in", true, false, &[own]).is_ok());
        assert!(check_webhook_url("https://1.2.3.4/in", true, true, &[own]).is_ok());
        // An IPv6 literal carrying it reaches it too (a socket to ::ffff:1.2.3.4 connects over IPv4).
        for carried in [
            "[::ffff:1.2.3.4]",
            "[::ffff:102:304]",
            "[64:ff9b::102:304]",
            "[2002:102:304::1]",
        ] {
            assert!(
                matches!(
                    check_webhook_url(&format!("https://{carried}/in"), true, false, &[own]),
                    Err(UrlError::PrivateTarget(shown)) if shown.ends_with("an address of this host")
                ),
                "{carried}"
            );
        }
    }

    #[test]
    fn public_and_private_addresses() {
        let public = [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
            "::ffff:0:808:808", // IPv4-translated, public inside
            "64:ff9b::808:808", // well-known NAT64, public inside
            "2002:808:808::1",  // 6to4, public inside
            "2a00:1450:4001::1",
            "2001:4860:4860::8888", // outside 2001::/23
            "9.9.9.9",
            "100.128.0.1", // just past 100.64/10
            "198.20.0.1",  // just past 198.18/15
            "192.0.1.1",   // just past 192.0.0/24
        ];
        for ip in public {
            assert!(is_public(ip.parse().unwrap()), "{ip} is public");
        }
        let private = [
            "127.0.0.1",
            "127.255.255.254",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "239.1.1.1",
            "::",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "2002:7f00:1::1",
            "::127.0.0.1",
            "2001:db8::1",
            // local-use NAT64 (RFC 8215) translates into the operator's own network
            "64:ff9b:1::a00:1",
            "64:ff9b:1::808:808",
            // IPv4-mapped and -translated: judged by the embedded address
            "::ffff:127.0.0.1",
            "::ffff:0:0",
            "::ffff:0:7f00:1",
            "::ffff:0:a9fe:a9fe",
            "64:ff9b::7f00:1",
            "64:ff9b::a9fe:a9fe",
            // 6to4 with a private address inside
            "2002:a00:1::1",
            "2002:c0a8:101::1",
            // Teredo, benchmarking, ORCHID, documentation
            "2001::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "2001:2::1",
            "2001:20::1",
            "3fff::1",
            // discard, SRv6, site-local, IPv4-compatible, multicast
            "100::1",
            "5f00::1",
            "fec0::1",
            "::8.8.8.8",
            "ff0e::1",
            // IPv4 special ranges
            "100.127.255.255",
            "192.0.0.8",
            "192.0.0.170",
            "192.0.2.1",
            "192.88.99.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.1",
            "203.0.113.1",
            "224.0.0.251",
            "240.0.0.1",
        ];
        for ip in private {
            assert!(!is_public(ip.parse().unwrap()), "{ip} is not public");
        }
    }
}
