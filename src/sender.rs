//! The HTTP side of delivery: a pool of threads that POST signed webhooks
//! with ureq (keep-alive, no redirects, per-request timeout) and hand back
//! outcomes. No Postgres here: the worker's main thread owns all database
//! work and is woken through a socket pair when outcomes arrive.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender, unbounded};

use crate::retry::parse_retry_after;
use crate::signing::{SigningKey, hex_signature, signature_header};
use crate::target;

/// Response bytes read at most; the attempt log keeps the first 1 KiB.
const READ_CAP: u64 = 16 * 1024;
const EXCERPT_LEN: usize = 1024;

/// One HTTP attempt to make.
pub struct Job {
    pub delivery_id: i64,
    pub subscription_id: i64,
    pub attempt: i32,
    pub url: Arc<str>,
    pub event_id: String,
    pub body: String,
    /// Keys that sign this attempt (two during a rotation's grace period).
    pub keys: Vec<SigningKey>,
    /// Set for the 'hex' scheme: the secret text for X-Webhook-Signature.
    pub hex_secret: Option<Arc<str>>,
    pub timeout: Duration,
}

/// What one attempt produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub delivery_id: i64,
    /// With `attempt`, identifies the claim this attempt was made for.
    pub event_id: String,
    pub subscription_id: i64,
    pub attempt: i32,
    pub started_unix_micros: i64,
    pub duration_ms: f64,
    pub status: Option<u16>,
    pub error: Option<String>,
    pub retry_after: Option<Duration>,
    pub excerpt: Option<String>,
}

impl Outcome {
    pub fn finished_micros(&self) -> i64 {
        self.started_unix_micros + (self.duration_ms * 1000.0) as i64
    }
}

/// Resolves host names and keeps only public addresses (unless allowed), so
/// the address that was checked is the one connected to: DNS rebinding
/// cannot swap in a private address between check and connect.
struct PublicOnlyResolver {
    allow_private: Arc<AtomicBool>,
}

impl ureq::Resolver for PublicOnlyResolver {
    fn resolve(&self, netloc: &str) -> io::Result<Vec<SocketAddr>> {
        let addrs: Vec<SocketAddr> = netloc.to_socket_addrs()?.collect();
        if self.allow_private.load(Ordering::Relaxed) {
            return Ok(addrs);
        }
        let public: Vec<SocketAddr> = addrs
            .iter()
            .copied()
            .filter(|a| target::is_public(a.ip()))
            .collect();
        if public.is_empty() {
            let shown = addrs
                .first()
                .map_or_else(|| "no address".to_string(), |a| a.ip().to_string());
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "refused: target resolves to non-public address {shown} (linkhooks.allow_private_targets is off)"
                ),
            ));
        }
        Ok(public)
    }
}

pub struct Pool {
    jobs: Sender<Job>,
    jobs_rx: Receiver<Job>,
    outcomes: Receiver<Outcome>,
    outcomes_tx: Sender<Outcome>,
    wake_rx: UnixStream,
    wake_tx: Arc<UnixStream>,
    agent: ureq::Agent,
    /// Threads with an index at or above this exit after their current job.
    wanted: Arc<AtomicUsize>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    pub fn start(
        threads: usize,
        allow_private: Arc<AtomicBool>,
        user_agent: &str,
    ) -> io::Result<Pool> {
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        wake_tx.set_nonblocking(true)?;
        wake_rx.set_nonblocking(true)?;
        let agent = ureq::AgentBuilder::new()
            .redirects(0)
            .user_agent(user_agent)
            .max_idle_connections(4096)
            .max_idle_connections_per_host(1024)
            .no_delay(true)
            .resolver(PublicOnlyResolver { allow_private })
            .build();
        let (jobs, jobs_rx) = unbounded();
        let (outcomes_tx, outcomes) = unbounded();
        let mut pool = Pool {
            jobs,
            jobs_rx,
            outcomes,
            outcomes_tx,
            wake_rx,
            wake_tx: Arc::new(wake_tx),
            agent,
            wanted: Arc::new(AtomicUsize::new(0)),
            threads: Vec::new(),
        };
        pool.resize(threads);
        Ok(pool)
    }

    /// Grows or shrinks the pool to `n` threads.
    pub fn resize(&mut self, n: usize) {
        let n = n.max(1);
        self.wanted.store(n, Ordering::Release);
        self.threads.retain(|t| !t.is_finished());
        while self.threads.len() < n {
            let index = self.threads.len();
            let (jobs, outcomes, wake, agent, wanted) = (
                self.jobs_rx.clone(),
                self.outcomes_tx.clone(),
                self.wake_tx.clone(),
                self.agent.clone(),
                self.wanted.clone(),
            );
            let spawned = std::thread::Builder::new()
                .name(format!("linkhooks-http-{index}"))
                .spawn(move || run_thread(index, &jobs, &outcomes, &wake, &agent, &wanted));
            match spawned {
                Ok(handle) => self.threads.push(handle),
                Err(_) => break, // out of threads: run with what we have
            }
        }
    }

    pub fn submit(&self, job: Job) {
        // The receiver lives in self, so sending cannot fail.
        let _ = self.jobs.send(job);
    }

    /// The descriptor that becomes readable when outcomes are waiting.
    pub fn wake_fd(&self) -> RawFd {
        self.wake_rx.as_raw_fd()
    }

    /// Every outcome that has arrived, without blocking.
    pub fn drain(&self) -> Vec<Outcome> {
        let mut buf = [0u8; 256];
        while matches!((&self.wake_rx).read(&mut buf), Ok(n) if n > 0) {}
        self.outcomes.try_iter().collect()
    }

    /// Waits up to `timeout` for the next outcome (used only when shutting down).
    pub fn wait_one(&self, timeout: Duration) -> Option<Outcome> {
        self.outcomes.recv_timeout(timeout).ok()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.wanted.store(0, Ordering::Release);
    }
}

fn run_thread(
    index: usize,
    jobs: &Receiver<Job>,
    outcomes: &Sender<Outcome>,
    wake: &UnixStream,
    agent: &ureq::Agent,
    wanted: &AtomicUsize,
) {
    while index < wanted.load(Ordering::Acquire) {
        let Ok(job) = jobs.recv_timeout(Duration::from_millis(500)) else {
            continue;
        };
        if outcomes.send(deliver(agent, job)).is_err() {
            return;
        }
        // A full socket buffer already means "wake up"; nothing else to do.
        let _ = (&*wake).write(&[1]);
    }
}

fn deliver(agent: &ureq::Agent, job: Job) -> Outcome {
    let started = SystemTime::now();
    let clock = Instant::now();
    let timestamp = started
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut request = agent
        .post(&job.url)
        .timeout(job.timeout)
        .set("content-type", "application/json")
        .set("webhook-id", &job.event_id)
        .set("webhook-timestamp", &timestamp.to_string())
        .set(
            "webhook-signature",
            &signature_header(&job.keys, &job.event_id, timestamp, &job.body),
        );
    if let Some(secret) = &job.hex_secret {
        request = request.set("x-webhook-signature", &hex_signature(secret, &job.body));
    }
    let (status, error, retry_after, excerpt) = match request.send_string(&job.body) {
        Ok(resp) => {
            let status = resp.status();
            let error = (!(200..300).contains(&status))
                .then(|| format!("HTTP {status} (redirects are not followed)"));
            (Some(status), error, None, read_excerpt(resp))
        }
        Err(ureq::Error::Status(status, resp)) => {
            let retry_after = resp.header("retry-after").and_then(parse_retry_after);
            (
                Some(status),
                Some(format!("HTTP {status}")),
                retry_after,
                read_excerpt(resp),
            )
        }
        Err(ureq::Error::Transport(t)) => (None, Some(describe_transport(&t)), None, None),
    };
    Outcome {
        delivery_id: job.delivery_id,
        event_id: job.event_id,
        subscription_id: job.subscription_id,
        attempt: job.attempt,
        started_unix_micros: started
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64),
        duration_ms: clock.elapsed().as_secs_f64() * 1000.0,
        status,
        error,
        retry_after,
        excerpt,
    }
}

/// Reads the body up to a cap (reading it whole lets the connection be reused).
fn read_excerpt(resp: ureq::Response) -> Option<String> {
    let mut bytes = Vec::new();
    resp.into_reader()
        .take(READ_CAP)
        .read_to_end(&mut bytes)
        .ok()?;
    if bytes.is_empty() {
        return None;
    }
    bytes.truncate(EXCERPT_LEN);
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// A transport error without the URL (URLs may carry tokens).
fn describe_transport(t: &ureq::Transport) -> String {
    let mut text = t.kind().to_string();
    if let Some(msg) = t.message() {
        text.push_str(": ");
        text.push_str(msg);
    }
    let mut source = std::error::Error::source(t);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::net::TcpListener;

    /// A one-connection HTTP server on 127.0.0.1 answering `status` with `extra` headers.
    fn serve_once(
        status: &str,
        extra: &'static str,
    ) -> (String, std::thread::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!(
            "http://{}/hook?token=SECRETTOKEN",
            listener.local_addr().unwrap()
        );
        let status = status.to_string();
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = io::BufReader::new(stream.try_clone().unwrap());
            let mut headers = Vec::new();
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let line = line.trim_end().to_string();
                if line.is_empty() {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length: ") {
                    len = v.parse().unwrap();
                }
                headers.push(line);
            }
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            let mut stream = stream;
            write!(
                stream,
                "HTTP/1.1 {status}\r\n{extra}content-length: 2\r\n\r\nok"
            )
            .unwrap();
            headers
        });
        (url, handle)
    }

    fn job(url: &str) -> Job {
        Job {
            delivery_id: 1,
            subscription_id: 2,
            attempt: 1,
            url: url.into(),
            event_id: "evt".into(),
            body: "{}".into(),
            keys: vec![SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap()],
            hex_secret: Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()),
            timeout: Duration::from_secs(5),
        }
    }

    fn agent(allow_private: bool) -> ureq::Agent {
        ureq::AgentBuilder::new()
            .redirects(0)
            .resolver(PublicOnlyResolver {
                allow_private: Arc::new(AtomicBool::new(allow_private)),
            })
            .build()
    }

    #[test]
    fn success_sends_signed_headers() {
        let (url, server) = serve_once("204 No Content", "");
        let out = deliver(&agent(true), job(&url));
        assert_eq!(out.status, Some(204));
        assert_eq!(out.error, None);
        let headers = server.join().unwrap().join("\n").to_ascii_lowercase();
        assert!(headers.contains("webhook-id: evt"));
        assert!(headers.contains("webhook-signature: v1,"));
        assert!(headers.contains("x-webhook-signature: "));
    }

    #[test]
    fn retry_after_is_read() {
        let (url, server) = serve_once("429 Too Many Requests", "retry-after: 7\r\n");
        let out = deliver(&agent(true), job(&url));
        server.join().unwrap();
        assert_eq!(out.status, Some(429));
        assert_eq!(out.retry_after, Some(Duration::from_secs(7)));
        assert_eq!(out.excerpt.as_deref(), Some("ok"));
    }

    #[test]
    fn redirects_are_not_followed() {
        let (url, server) = serve_once("302 Found", "location: http://127.0.0.1:9/elsewhere\r\n");
        let out = deliver(&agent(true), job(&url));
        server.join().unwrap();
        assert_eq!(out.status, Some(302));
        assert!(out.error.is_some());
    }

    #[test]
    fn private_targets_are_refused_at_connect_time_without_leaking_the_url() {
        let out = deliver(
            &agent(false),
            job("http://127.0.0.1:9/hook?token=SECRETTOKEN"),
        );
        assert_eq!(out.status, None);
        let err = out.error.unwrap();
        assert!(err.contains("non-public address 127.0.0.1"), "{err}");
        assert!(!err.contains("SECRETTOKEN"), "{err}");
    }
}
