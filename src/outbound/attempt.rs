//! One HTTP attempt: sign, POST, read the status, read at most
//! `BODY_READ_BYTES_MAX` of the answer, all within one deadline.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use reqwest::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use url::Url;

use super::backoff::parse_retry_after;
use super::job::AttemptError;
use super::signing::Secret;

/// Most bytes of an answer's body read (and dropped). A longer body is cut:
/// the connection is closed instead of returned to the pool, so a receiver
/// that sends 10 MB, or never ends its body, costs at most this plus the
/// client's read buffer, and at most `timeout_ms`.
pub const BODY_READ_BYTES_MAX: usize = 4096;

/// Where an endpoint's requests go and how they are signed. No `Debug`:
/// the URL's query may carry a token.
pub struct Target {
    pub url: Url,
    pub secret: Secret,
}

/// The result of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub result: Result<u16, AttemptError>,
    /// From a 429 or 503 answer's `Retry-After`.
    pub retry_after: Option<Duration>,
}

/// Sends one signed attempt. The signature's timestamp is taken now, so
/// every attempt carries a fresh one. The whole exchange (connect, request,
/// answer head, the bounded body read) ends by `timeout`: reqwest's own
/// per-request timeout covers it, and an outer deadline holds even if a
/// future version stops covering the body. Never panics on anything the
/// remote side does.
pub async fn send(
    client: reqwest::Client,
    target: Arc<Target>,
    webhook_id: Arc<str>,
    body: Bytes,
    timeout: Duration,
) -> Outcome {
    let deadline = tokio::time::Instant::now() + timeout;
    let head = tokio::time::timeout_at(deadline, request(&client, &target, &webhook_id, body, timeout)).await;
    let mut response = match head {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Outcome { result: Err(classify(&e)), retry_after: None },
        Err(_) => return Outcome { result: Err(AttemptError::Timeout), retry_after: None },
    };
    let status = response.status();
    let retry_after = match status.as_u16() {
        429 | 503 => response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now())),
        _ => None,
    };
    // The status decided the outcome; a body that dawdles only costs time
    // up to the deadline.
    let _ = tokio::time::timeout_at(deadline, drain_some(&mut response)).await;
    let result = if status.is_success() { Ok(status.as_u16()) } else { Err(AttemptError::Status(status.as_u16())) };
    Outcome { result, retry_after }
}

async fn request(
    client: &reqwest::Client,
    target: &Target,
    webhook_id: &str,
    body: Bytes,
    timeout: Duration,
) -> Result<reqwest::Response, reqwest::Error> {
    let timestamp_s = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let signature = target.secret.sign(webhook_id, timestamp_s, &body);
    client
        .post(target.url.clone())
        .timeout(timeout)
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .header("webhook-id", webhook_id)
        .header("webhook-timestamp", timestamp_s)
        .header("webhook-signature", signature)
        .body(body)
        .send()
        .await
}

/// Reads and drops up to `BODY_READ_BYTES_MAX` bytes so a short answer
/// leaves its connection reusable. Errors here do not change the outcome:
/// the status already decided it.
async fn drain_some(response: &mut reqwest::Response) {
    let mut read = 0;
    while read < BODY_READ_BYTES_MAX {
        match response.chunk().await {
            Ok(Some(chunk)) => read += chunk.len(),
            Ok(None) | Err(_) => return,
        }
    }
}

fn classify(e: &reqwest::Error) -> AttemptError {
    if e.is_timeout() {
        AttemptError::Timeout
    } else if e.is_connect() {
        AttemptError::Connect
    } else {
        AttemptError::Request
    }
}
