//! Tests for sender.rs against real sockets on 127.0.0.1: what is sent, and
//! the faults an attempt must survive within its deadline.

use super::*;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::os::fd::FromRawFd;
use std::sync::mpsc;
use std::thread::JoinHandle;

const TOKEN: &str = "SECRETTOKEN";

/// Reads one request (headers and body); None if the client closed first.
fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Vec<String>> {
    let mut headers = Vec::new();
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end().to_string();
        if line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length: ") {
            len = v.parse().ok()?;
        }
        headers.push(line);
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    Some(headers)
}

fn answer(stream: &mut TcpStream, status: &str, extra: &str) {
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\n{extra}content-length: 2\r\n\r\nok"
    );
}

fn url_of(listener: &TcpListener) -> String {
    format!(
        "http://{}/hook?token={TOKEN}",
        listener.local_addr().unwrap()
    )
}

/// A one-request server answering 400 with the request's path and signature
/// headers as JSON, slashes escaped as PHP's json_encode writes them.
fn serve_echo() -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = url_of(&listener);
    let handle = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let lines = read_request(&mut reader).unwrap();
        let header = |name: &str| {
            let prefix = format!("{name}: ");
            lines
                .iter()
                .find_map(|l| l.strip_prefix(&prefix))
                .unwrap_or_default()
                .to_string()
        };
        let path = lines[0].split(' ').nth(1).unwrap_or_default();
        let body = format!(
            "{{\"path\":\"{path}\",\"signature\":\"{}\",\"hex\":\"{}\"}}",
            header("webhook-signature"),
            header("x-webhook-signature")
        )
        .replace('/', "\\/");
        let _ = write!(
            stream,
            "HTTP/1.1 400 Bad Request\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
    });
    (url, handle)
}

/// A one-connection, one-request HTTP server answering `status` with `extra` headers.
fn serve_once(status: &str, extra: &'static str) -> (String, JoinHandle<Vec<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = url_of(&listener);
    let status = status.to_string();
    let handle = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let headers = read_request(&mut reader).unwrap();
        answer(&mut stream, &status, extra);
        headers
    });
    (url, handle)
}

/// A keep-alive server: `on_request(connection, request)` says whether to
/// answer 200 (true) or to close the connection without an answer (false).
/// Returns the URL and a counter of accepted connections.
fn serve_keep_alive(
    on_request: impl Fn(usize, usize) -> bool + Send + Sync + 'static,
) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = url_of(&listener);
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let on_request = Arc::new(on_request);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let conn = counter.fetch_add(1, Ordering::SeqCst);
            let on_request = on_request.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                for n in 0.. {
                    if read_request(&mut reader).is_none() || !on_request(conn, n) {
                        return; // dropping the stream closes it
                    }
                    answer(&mut stream, "200 OK", "");
                }
            });
        }
    });
    (url, accepted)
}

fn job(url: &str) -> Job {
    Job {
        delivery_id: 1,
        created_at: 0,
        subscription_id: 2,
        attempt: 1,
        url: url.into(),
        event_id: "evt".into(),
        body: "{}".into(),
        keys: vec![SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap()],
        hex_secret: Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()),
        timeout: Duration::from_secs(5),
        require_https: false,
    }
}

fn job_with_timeout(url: &str, ms: u64) -> Job {
    Job {
        timeout: Duration::from_millis(ms),
        ..job(url)
    }
}

fn agents(allow_private: bool) -> Agents {
    Agents::new(
        Arc::new(AtomicBool::new(allow_private)),
        "pg_linkhooks/test",
        MAX_IDLE_AGE,
    )
}

/// Asserts a timed-out outcome that ended by its deadline and names no secret.
fn assert_timed_out(out: &Outcome, timeout_ms: f64) {
    let err = out.error.as_deref().unwrap_or("");
    assert_eq!(out.status, None, "{err}");
    assert!(err.contains("timeout"), "{err}");
    assert!(!err.contains(TOKEN), "{err}");
    assert!(
        out.duration_ms >= timeout_ms * 0.9 && out.duration_ms < timeout_ms * 1.5,
        "took {} ms for a {timeout_ms} ms timeout: {err}",
        out.duration_ms
    );
}

#[test]
fn success_sends_signed_headers() {
    let (url, server) = serve_once("204 No Content", "");
    let out = deliver(&agents(true), job(&url));
    assert_eq!(out.status, Some(204));
    assert_eq!(out.error, None);
    let headers = server.join().unwrap().join("\n").to_ascii_lowercase();
    assert!(headers.contains("webhook-id: evt"));
    assert!(headers.contains("webhook-signature: v1,"));
    assert!(headers.contains("x-webhook-signature: "));
    assert!(headers.contains("content-type: application/json"));
    assert!(headers.contains("user-agent: pg_linkhooks/test"));
}

#[test]
fn retry_after_is_read() {
    let (url, server) = serve_once("429 Too Many Requests", "retry-after: 7\r\n");
    let out = deliver(&agents(true), job(&url));
    server.join().unwrap();
    assert_eq!(out.status, Some(429));
    assert_eq!(out.retry_after, Some(Duration::from_secs(7)));
    assert_eq!(out.excerpt.as_deref(), Some("ok"));
}

#[test]
fn redirects_are_not_followed() {
    let (url, server) = serve_once("302 Found", "location: http://127.0.0.1:9/elsewhere\r\n");
    let out = deliver(&agents(true), job(&url));
    server.join().unwrap();
    assert_eq!(out.status, Some(302));
    assert!(out.error.is_some());
}

#[test]
fn private_targets_are_refused_at_connect_time_without_leaking_the_url() {
    let out = deliver(
        &agents(false),
        job(&format!("http://127.0.0.1:9/hook?token={TOKEN}")),
    );
    assert_eq!(out.status, None);
    let err = out.error.unwrap();
    assert!(err.contains("non-public address 127.0.0.1"), "{err}");
    assert!(!err.contains(TOKEN), "{err}");
}

/// A listener whose accept queue is full: it never accepts, and its backlog
/// is taken by connections made until one cannot complete. Returns the
/// listener and the connections (both must stay open).
fn full_accept_queue() -> (TcpListener, Vec<TcpStream>) {
    // SAFETY: plain socket calls on a descriptor we own; it is handed to
    // TcpListener, which closes it.
    let listener = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        assert_eq!(
            libc::bind(fd, (&addr as *const libc::sockaddr_in).cast(), len),
            0
        );
        assert_eq!(libc::listen(fd, 0), 0);
        TcpListener::from_raw_fd(fd)
    };
    let addr = listener.local_addr().unwrap();
    let mut filled = Vec::new();
    for _ in 0..64 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(s) => filled.push(s),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => return (listener, filled),
            Err(e) => panic!("filling the accept queue: {e}"),
        }
    }
    panic!("the accept queue never filled");
}

#[test]
fn connect_to_a_full_accept_queue_ends_at_the_deadline() {
    let (listener, _filled) = full_accept_queue();
    let out = deliver(&agents(true), job_with_timeout(&url_of(&listener), 1000));
    assert_timed_out(&out, 1000.0);
}

/// Answers with `addr` once the attempt's time is up, as a name server
/// answering at the deadline does.
#[derive(Debug)]
struct AnswersLate(std::net::SocketAddr);

impl ureq::unversioned::resolver::Resolver for AnswersLate {
    fn resolve(
        &self,
        _uri: &ureq::http::Uri,
        _config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        if let TimeoutAfter::Exact(left) = timeout.after {
            std::thread::sleep(left + Duration::from_millis(20));
        }
        let mut addrs = self.empty();
        addrs.push(self.0);
        Ok(addrs)
    }
}

#[test]
fn a_connect_that_would_start_past_the_deadline_is_not_tried() {
    let (listener, _filled) = full_accept_queue();
    let agent = ureq::Agent::with_parts(
        ureq::Agent::config_builder().build(),
        connector(),
        AnswersLate(listener.local_addr().unwrap()),
    );
    let started = Instant::now();
    let result = agent
        .post(&url_of(&listener))
        .config()
        .timeout_global(Some(Duration::from_millis(200)))
        .build()
        .send("{}");
    let took = started.elapsed();
    assert!(
        matches!(result, Err(ureq::Error::Timeout(_))),
        "{result:?}"
    );
    // Without the check, the connect would wait ureq's 1 s for a zero timeout.
    assert!(took < Duration::from_millis(600), "took {took:?}");
}

#[test]
fn a_server_that_accepts_but_never_answers_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = url_of(&listener);
    std::thread::spawn(move || {
        let held: Vec<TcpStream> = listener.incoming().map_while(Result::ok).collect();
        drop(held);
    });
    let out = deliver(&agents(true), job_with_timeout(&url, 1000));
    assert_timed_out(&out, 1000.0);
}

#[test]
fn a_reused_connection_keeps_the_deadline_while_writing() {
    // The first request is answered; on the same connection the server then
    // stops reading, so a large second body fills the socket buffers.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = url_of(&listener);
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        read_request(&mut reader).unwrap();
        answer(&mut stream, "200 OK", "");
        let _ = stop_rx.recv(); // hold the connection open, unread
    });
    let agents = agents(true);
    assert_eq!(deliver(&agents, job(&url)).status, Some(200));
    // More than the loopback socket buffers hold; one signature only, as
    // signing is part of the attempt's time.
    let big = Job {
        body: "x".repeat(24 << 20),
        hex_secret: None,
        ..job_with_timeout(&url, 1000)
    };
    let out = deliver(&agents, big);
    drop(stop_tx);
    assert_timed_out(&out, 1000.0);
}

#[test]
fn a_pooled_connection_closed_by_the_receiver_is_retried_on_a_fresh_one() {
    // Connection 0 answers its first request, then closes on the second
    // without an answer: a receiver closing an idle connection just as the
    // request arrives. The attempt must still succeed.
    let (url, accepted) = serve_keep_alive(|conn, n| !(conn == 0 && n == 1));
    let agents = agents(true);
    assert_eq!(deliver(&agents, job(&url)).status, Some(200));
    let out = deliver(&agents, job(&url));
    assert_eq!(out.status, Some(200), "{:?}", out.error);
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[test]
fn a_fresh_connection_closed_again_fails_once_without_the_url() {
    // Every connection closes on its first request: one retry, then an error.
    let (url, accepted) = serve_keep_alive(|_, _| false);
    let out = deliver(&agents(true), job(&url));
    assert_eq!(out.status, None);
    let err = out.error.unwrap();
    assert!(err.contains("also on a fresh connection"), "{err}");
    assert!(!err.contains(TOKEN), "{err}");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[test]
fn idle_pooled_connections_are_not_reused_after_the_idle_age() {
    let (url, accepted) = serve_keep_alive(|_, _| true);
    let agents = Agents::new(
        Arc::new(AtomicBool::new(true)),
        "pg_linkhooks/test",
        Duration::from_millis(100),
    );
    assert_eq!(deliver(&agents, job(&url)).status, Some(200));
    assert_eq!(deliver(&agents, job(&url)).status, Some(200));
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "reused while fresh");
    std::thread::sleep(Duration::from_millis(300)); // idle past the age
    assert_eq!(deliver(&agents, job(&url)).status, Some(200));
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "a new connection after idling"
    );
}

#[test]
fn turning_private_targets_off_drops_pooled_connections_to_them() {
    let (url, accepted) = serve_keep_alive(|_, _| true);
    let allow = Arc::new(AtomicBool::new(true));
    let agents = Agents::new(allow.clone(), "pg_linkhooks/test", MAX_IDLE_AGE);
    assert_eq!(deliver(&agents, job(&url)).status, Some(200));
    allow.store(false, Ordering::Relaxed); // what the worker does on SIGHUP
    let out = deliver(&agents, job(&url));
    assert_eq!(out.status, None, "a pooled connection was reused");
    let err = out.error.unwrap();
    assert!(err.contains("non-public address 127.0.0.1"), "{err}");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[test]
fn connection_refused_names_no_url() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = url_of(&listener);
    drop(listener);
    let out = deliver(&agents(true), job(&url));
    let err = out.error.unwrap();
    assert!(err.to_lowercase().contains("refused"), "{err}");
    assert!(!err.contains(TOKEN), "{err}");
}

#[test]
fn error_text_is_scrubbed_of_the_url() {
    let url = "https://hooks.example.com/in/abc?token=SECRETTOKEN";
    let e = ureq::Error::BadUri(url.to_string());
    assert_eq!(
        describe_error(&e, url, Duration::from_secs(1)),
        "invalid target URL"
    );
    let e = ureq::Error::Io(io::Error::other(format!("oops {url}")));
    assert_eq!(
        describe_error(&e, url, Duration::from_secs(1)),
        "io: oops <url>"
    );
    // A TLS error names the host it expected, which may be the secret part.
    let e = ureq::Error::Io(io::Error::other(
        "certificate not valid for name \"hooks.example.com\"",
    ));
    assert!(!describe_error(&e, url, Duration::from_secs(1)).contains("example.com"));
}

#[test]
fn an_http_url_is_refused_when_https_is_required_naming_the_setting_not_the_url() {
    // Refused before any connection: nothing listens there.
    let url = format!("http://127.0.0.1:9/hook?token={TOKEN}");
    let out = deliver(
        &agents(true),
        Job {
            require_https: true,
            ..job(&url)
        },
    );
    assert_eq!(out.status, None);
    assert_eq!(
        out.error.as_deref(),
        Some("refused: the target URL is not https (linkhooks.require_https is on)")
    );
}

#[test]
fn echoed_signatures_and_the_url_stay_out_of_the_excerpt() {
    // A receiver that echoes the request (headers, path) as an escaping JSON encoder writes it.
    let (url, _accepted) = serve_echo();
    let out = deliver(&agents(true), job(&url));
    let excerpt = out.excerpt.unwrap_or_default();
    assert!(excerpt.contains("\"path\":\"<url>\""), "{excerpt}");
    assert!(!excerpt.contains(TOKEN), "{excerpt}");
    let signature = excerpt.split("v1,").nth(1).unwrap_or_default();
    assert!(signature.starts_with("[signature]"), "{excerpt}");
    assert!(excerpt.contains("\"hex\":\"[signature]\""), "{excerpt}");
}
