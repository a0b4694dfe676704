//! The HTTP side of delivery: a pool of threads that POST signed webhooks
//! with ureq (keep-alive, no redirects, per-request timeout), and check link
//! destinations (src/probe.rs), and hand back outcomes. No Postgres here: the worker's main thread owns all database
//! work and is woken through a socket pair when outcomes arrive.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender, unbounded};
use ureq::unversioned::transport::time::Duration as TimeoutAfter;
use ureq::unversioned::transport::{ConnectionDetails, Connector, DefaultConnector, Transport};

use crate::probe::{self, Probe, Probed};
use crate::resolve::PublicOnlyResolver;
use crate::retry::parse_retry_after;
use crate::scrub::{self, UrlSecrets};
use crate::signing::{SigningKey, hex_signature, signature_header};

/// Response bytes read at most; the attempt log keeps the first 1 KiB.
const READ_CAP: u64 = 16 * 1024;
const EXCERPT_LEN: usize = 1024;

/// One HTTP attempt to make.
pub struct Job {
    pub delivery_id: i64,
    /// The row's `created_at` (PostgreSQL microseconds): with the id, finds its partition.
    pub created_at: i64,
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
    /// linkhooks.require_https: an http URL stored before it was on (or
    /// restored, or replicated) is refused here too.
    pub require_https: bool,
}

/// What the threads do: deliver webhooks, and check link destinations.
pub enum Work {
    Deliver(Job),
    Check(Probe),
}

/// What they hand back.
pub enum Done {
    Delivered(Outcome),
    Checked(Probed),
}

/// What one attempt produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub delivery_id: i64,
    /// As the job's.
    pub created_at: i64,
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

/// Idle pooled connections older than this are closed, not reused: many
/// servers close idle connections after about 5 s (Node's keepAliveTimeout,
/// Apache's KeepAliveTimeout), and a request written into a connection the
/// server is closing fails without an answer.
const MAX_IDLE_AGE: Duration = Duration::from_secs(4);

/// The HTTP clients the threads share. The pooled one is rebuilt, dropping
/// every idle connection, when linkhooks.allow_private_targets changes: a
/// connection to a private address opened while they were allowed must not be
/// reused once they are not (reuse skips the resolver's check).
struct Agents {
    allow_private: Arc<AtomicBool>,
    user_agent: String,
    idle_age: Duration,
    /// The setting's value the pooled agent was built under, and the agent.
    pooled: Mutex<(bool, ureq::Agent)>,
    /// No pooling: a request that failed on a pooled connection before any
    /// answer is retried once here.
    fresh: ureq::Agent,
}

impl Agents {
    fn new(allow_private: Arc<AtomicBool>, user_agent: &str, idle_age: Duration) -> Agents {
        let allowed = allow_private.load(Ordering::Relaxed);
        Agents {
            pooled: Mutex::new((
                allowed,
                build_agent(&allow_private, user_agent, idle_age, true),
            )),
            fresh: build_agent(&allow_private, user_agent, idle_age, false),
            allow_private,
            user_agent: user_agent.to_string(),
            idle_age,
        }
    }

    /// The pooled agent, rebuilt first if the setting changed since it was built.
    fn pooled(&self) -> ureq::Agent {
        let allowed = self.allow_private.load(Ordering::Relaxed);
        let mut pooled = self.pooled.lock().unwrap_or_else(PoisonError::into_inner);
        if pooled.0 != allowed {
            *pooled = (
                allowed,
                build_agent(&self.allow_private, &self.user_agent, self.idle_age, true),
            );
        }
        pooled.1.clone()
    }
}

fn build_agent(
    allow_private: &Arc<AtomicBool>,
    user_agent: &str,
    idle_age: Duration,
    pooling: bool,
) -> ureq::Agent {
    let (idle, per_host) = if pooling { (4096, 1024) } else { (0, 0) };
    let config = ureq::Agent::config_builder()
        .max_redirects(0)
        .http_status_as_error(false)
        // An environment proxy would be resolved instead of the target.
        .proxy(None)
        .user_agent(user_agent)
        .accept_encoding("identity")
        .max_idle_connections(idle)
        .max_idle_connections_per_host(per_host)
        .max_idle_age(idle_age)
        .no_delay(true)
        .build();
    ureq::Agent::with_parts(
        config,
        connector(),
        PublicOnlyResolver {
            allow_private: allow_private.clone(),
        },
    )
}

/// ureq's connectors, behind a check that time is left.
fn connector() -> impl Connector<Out = impl Transport> {
    NoTimeLeft.chain(DefaultConnector::new())
}

/// Fails a connect that would start with no time left. ureq gives a socket
/// 1 s when the time left is exactly zero (a zero socket timeout means none),
/// so a name resolved at the deadline could let the connect run a second
/// past it.
#[derive(Debug)]
struct NoTimeLeft;

impl Connector for NoTimeLeft {
    type Out = ();

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<()>,
    ) -> Result<Option<()>, ureq::Error> {
        match details.timeout.after {
            TimeoutAfter::Exact(left) if left.is_zero() => {
                Err(ureq::Error::Timeout(details.timeout.reason))
            }
            _ => Ok(chained),
        }
    }
}

pub struct Pool {
    jobs: Sender<Work>,
    jobs_rx: Receiver<Work>,
    outcomes: Receiver<Done>,
    outcomes_tx: Sender<Done>,
    wake_rx: UnixStream,
    wake_tx: Arc<UnixStream>,
    agents: Arc<Agents>,
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
        let agents = Arc::new(Agents::new(allow_private, user_agent, MAX_IDLE_AGE));
        let (jobs, jobs_rx) = unbounded();
        let (outcomes_tx, outcomes) = unbounded();
        let mut pool = Pool {
            jobs,
            jobs_rx,
            outcomes,
            outcomes_tx,
            wake_rx,
            wake_tx: Arc::new(wake_tx),
            agents,
            wanted: Arc::new(AtomicUsize::new(0)),
            threads: Vec::new(),
        };
        pool.resize(threads);
        if pool.threads.is_empty() {
            // Claimed jobs would wait in the queue for good, their leases renewed:
            // better to fail, and be started again, than to look alive.
            return Err(io::Error::other(
                "no thread could be started (the process or thread limit is reached)",
            ));
        }
        Ok(pool)
    }

    /// Grows or shrinks the pool to `n` threads.
    pub fn resize(&mut self, n: usize) {
        let n = n.max(1);
        self.wanted.store(n, Ordering::Release);
        self.threads.retain(|t| !t.is_finished());
        while self.threads.len() < n {
            let index = self.threads.len();
            let (jobs, outcomes, wake, agents, wanted) = (
                self.jobs_rx.clone(),
                self.outcomes_tx.clone(),
                self.wake_tx.clone(),
                self.agents.clone(),
                self.wanted.clone(),
            );
            let spawned = std::thread::Builder::new()
                .name(format!("linkhooks-http-{index}"))
                .spawn(move || run_thread(index, &jobs, &outcomes, &wake, &agents, &wanted));
            match spawned {
                Ok(handle) => self.threads.push(handle),
                Err(_) => break, // out of threads: run with what we have
            }
        }
    }

    pub fn submit(&self, work: Work) {
        // The receiver lives in self, so sending cannot fail.
        let _ = self.jobs.send(work);
    }

    /// The descriptor that becomes readable when outcomes are waiting.
    pub fn wake_fd(&self) -> RawFd {
        self.wake_rx.as_raw_fd()
    }

    /// Everything that has come back, without blocking.
    pub fn drain(&self) -> Vec<Done> {
        let mut buf = [0u8; 256];
        while matches!((&self.wake_rx).read(&mut buf), Ok(n) if n > 0) {}
        self.outcomes.try_iter().collect()
    }

    /// Waits up to `timeout` for the next delivery outcome (used only when
    /// shutting down, when check results no longer matter).
    pub fn wait_one(&self, timeout: Duration) -> Option<Outcome> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.outcomes.recv_deadline(deadline).ok()? {
                Done::Delivered(outcome) => return Some(outcome),
                Done::Checked(_) => continue,
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.wanted.store(0, Ordering::Release);
    }
}

fn run_thread(
    index: usize,
    jobs: &Receiver<Work>,
    outcomes: &Sender<Done>,
    wake: &UnixStream,
    agents: &Agents,
    wanted: &AtomicUsize,
) {
    while index < wanted.load(Ordering::Acquire) {
        let Ok(work) = jobs.recv_timeout(Duration::from_millis(500)) else {
            continue;
        };
        let done = match work {
            Work::Deliver(job) => Done::Delivered(deliver(agents, job)),
            // Unpooled: a destination's connection is not worth keeping between checks.
            Work::Check(check) => Done::Checked(probe::run(&agents.fresh, check)),
        };
        if outcomes.send(done).is_err() {
            return;
        }
        // A full socket buffer already means "wake up"; nothing else to do.
        let _ = (&*wake).write(&[1]);
    }
}

/// One attempt: every phase (DNS, connect, TLS, write, read) shares one
/// deadline, `job.timeout` from the start.
fn deliver(agents: &Agents, job: Job) -> Outcome {
    let started = SystemTime::now();
    let clock = Instant::now();
    let deadline = clock + job.timeout;
    let timestamp = started
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let signature = signature_header(&job.keys, &job.event_id, timestamp, &job.body);
    let hex = job
        .hex_secret
        .as_ref()
        .map(|secret| hex_signature(secret, &job.body));
    let post = |agent: &ureq::Agent| {
        let mut request = agent
            .post(&*job.url)
            .config()
            .timeout_global(Some(deadline.saturating_duration_since(Instant::now())))
            .https_only(job.require_https)
            .build()
            .content_type("application/json")
            .header("webhook-id", &job.event_id)
            .header("webhook-timestamp", &timestamp.to_string())
            .header("webhook-signature", &signature);
        if let Some(hex) = &hex {
            request = request.header("x-webhook-signature", hex);
        }
        request.send(job.body.as_bytes())
    };
    let mut result = post(&agents.pooled());
    let mut retried = false;
    if let Err(e) = &result
        && closed_before_answer(e)
        && Instant::now() < deadline
    {
        // Most likely a pooled connection the receiver had just closed: the
        // request never reached it, so this must not cost an attempt.
        result = post(&agents.fresh);
        retried = true;
    }
    let (status, error, retry_after, excerpt) = match result {
        Ok(mut resp) => {
            let status = resp.status().as_u16();
            let error = match status {
                200..=299 => None,
                300..=399 => Some(format!("HTTP {status} (redirects are not followed)")),
                _ => Some(format!("HTTP {status}")),
            };
            let retry_after = (status >= 400)
                .then(|| resp.headers().get("retry-after"))
                .flatten()
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            let excerpt = read_excerpt(resp.body_mut()).map(|text| {
                let sent = sent_signatures(&signature).chain(hex.as_deref());
                let text = scrub::without_signatures(text, sent);
                scrub::cut(UrlSecrets::of(&job.url).redact(text), EXCERPT_LEN)
            });
            (Some(status), error, retry_after, excerpt)
        }
        Err(e) => {
            let mut text = describe_error(&e, &job.url, job.timeout);
            if retried {
                text.push_str(" (also on a fresh connection)");
            }
            (None, Some(text), None, None)
        }
    };
    Outcome {
        delivery_id: job.delivery_id,
        created_at: job.created_at,
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

/// True when the connection closed before any answer arrived: the request
/// may be sent again on a fresh connection within the same attempt.
fn closed_before_answer(e: &ureq::Error) -> bool {
    use io::ErrorKind::*;
    matches!(e, ureq::Error::Io(io) if matches!(
        io.kind(),
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
    ))
}

/// Reads the body up to a cap, within the attempt's deadline (reading it
/// whole lets the connection be reused).
fn read_excerpt(body: &mut ureq::Body) -> Option<String> {
    let mut bytes = Vec::new();
    body.as_reader()
        .take(READ_CAP)
        .read_to_end(&mut bytes)
        .ok()?;
    if bytes.is_empty() {
        return None;
    }
    // Cut after the secrets are replaced, so none that starts inside the excerpt is cut in two.
    bytes.truncate(EXCERPT_LEN + SECRET_SLACK);
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// Room past the excerpt for a secret that starts inside it: a URL is at most
/// 2,048 characters, and a receiver may escape some of them.
const SECRET_SLACK: usize = 4096;

/// The signatures a `webhook-signature` header carries (`v1,<sig> v1,<sig>`):
/// a receiver that echoes the request's headers would otherwise put them in
/// the attempt log, which analysts read.
fn sent_signatures(header: &str) -> impl Iterator<Item = &str> {
    header
        .split(' ')
        .filter_map(|token| token.split_once(',').map(|(_, signature)| signature))
}

/// A transport error without the URL (URLs may carry tokens): variants that
/// may quote the URL get a fixed text, and any other text is scrubbed of it
/// (a TLS error names the host).
pub fn describe_error(e: &ureq::Error, url: &str, timeout: Duration) -> String {
    let text = match e {
        ureq::Error::Timeout(_) => format!(
            "timeout: no answer within timeout_ms ({} ms)",
            timeout.as_millis()
        ),
        ureq::Error::BadUri(_) | ureq::Error::Http(_) => "invalid target URL".to_string(),
        ureq::Error::RequireHttpsOnly(_) => {
            "refused: the target URL is not https (linkhooks.require_https is on)".to_string()
        }
        ureq::Error::HostNotFound => "host not found".to_string(),
        other => {
            let mut text = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(s) = source {
                let more = s.to_string();
                if !text.contains(&more) {
                    text.push_str(": ");
                    text.push_str(&more);
                }
                source = s.source();
            }
            text
        }
    };
    UrlSecrets::of(url).redact(text)
}

#[cfg(test)]
#[path = "sender_tests.rs"]
mod tests;
