//! One destination health check: a HEAD (or GET) of a link's destination on
//! the delivery threads, under the webhooks' rules: the same resolver (no
//! private addresses unless allowed), no redirects followed, one deadline for
//! every phase, and errors that never quote the URL. No Postgres here.

use std::io::Read;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::destination::{self, Method};
use crate::sender::describe_error;

/// Body bytes read at most from a GET (reading a little lets the server finish cleanly).
const READ_CAP: u64 = 4 * 1024;

/// A check to make.
pub struct Probe {
    pub link_id: i64,
    pub url: String,
    pub method: Method,
    /// Failed checks in a row that make the link broken (from its rule).
    pub failures_to_break: i32,
    pub timeout: Duration,
}

/// What a check found.
#[derive(Debug, Clone)]
pub struct Probed {
    pub link_id: i64,
    pub url: String,
    pub failures_to_break: i32,
    pub checked_unix_micros: i64,
    pub healthy: bool,
    pub http_status: Option<u16>,
    /// Why it failed: "HTTP 503", a DNS or connection error, "timeout: …".
    pub reason: Option<String>,
}

pub fn run(agent: &ureq::Agent, probe: Probe) -> Probed {
    let started = SystemTime::now();
    let deadline = Instant::now() + probe.timeout;
    let mut answer = request(agent, &probe.url, probe.method, deadline);
    if probe.method == Method::Head && matches!(answer, Ok(s) if destination::head_refused(s)) {
        answer = request(agent, &probe.url, Method::Get, deadline);
    }
    let (healthy, http_status, reason) = match answer {
        Ok(status) if destination::status_is_healthy(status) => (true, Some(status), None),
        Ok(status) => (false, Some(status), Some(format!("HTTP {status}"))),
        Err(e) => (
            false,
            None,
            Some(describe_error(&e, &probe.url, probe.timeout)),
        ),
    };
    Probed {
        link_id: probe.link_id,
        url: probe.url,
        failures_to_break: probe.failures_to_break,
        checked_unix_micros: started
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64),
        healthy,
        http_status,
        reason,
    }
}

/// The answer's status, within what is left of the deadline.
fn request(
    agent: &ureq::Agent,
    url: &str,
    method: Method,
    deadline: Instant,
) -> Result<u16, ureq::Error> {
    let left = Some(deadline.saturating_duration_since(Instant::now()));
    let mut response = match method {
        Method::Head => agent
            .head(url)
            .config()
            .timeout_global(left)
            .build()
            .call()?,
        Method::Get => agent
            .get(url)
            .config()
            .timeout_global(left)
            .build()
            .call()?,
    };
    if method == Method::Get {
        // A slow or endless body is not the check's business: read a little, within the deadline.
        let _ = response
            .body_mut()
            .as_reader()
            .take(READ_CAP)
            .read_to_end(&mut Vec::new());
    }
    Ok(response.status().as_u16())
}
