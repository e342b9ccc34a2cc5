//! Talks to the origin: one awc client per worker, no decompression, no redirects, timeouts from config.
//!
//! Everything awc-specific stays here; the proxy sees `HeaderList`s, status codes and a body it
//! pulls chunk by chunk, so it never holds an awc type across its own logic.

use std::cell::{Cell, RefCell};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::body::{BodySize, MessageBody};
use actix_web::http::{Method, header::HeaderName, header::HeaderValue};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::OriginConfig;
use crate::policy::HeaderList;

/// Why the origin could not give a usable response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made (refused, unreachable, DNS).
    #[error("cannot connect to origin: {0}")]
    Connect(String),
    /// The origin did not send response headers in time.
    #[error("origin did not answer within {0:?}")]
    Timeout(Duration),
    /// The exchange broke before a complete response head arrived.
    #[error("origin response failed: {0}")]
    Protocol(String),
    /// The body broke off or stalled after the head was received.
    #[error("origin body failed: {0}")]
    Body(String),
}

impl UpstreamError {
    /// The status a client gets when no cached copy can stand in: 504 when the origin took
    /// too long to answer (RFC 9110 §15.6.5), 502 otherwise, including a connection that could
    /// not be opened in `connect_timeout` (§15.6.3: no usable answer from the inbound server).
    pub fn status(&self) -> u16 {
        match self {
            UpstreamError::Timeout(_) => 504,
            _ => 502,
        }
    }
}

/// A response head from the origin plus its body, pulled with `next_chunk`.
pub struct UpstreamResponse {
    pub status: u16,
    pub headers: HeaderList,
    pub body: UpstreamBody,
}

/// The origin's body. Each chunk must arrive within the body timeout.
pub struct UpstreamBody {
    inner: awc::ClientResponse,
    idle_timeout: Duration,
    /// The origin-request slot, held until the body is read or dropped.
    _slot: Option<OwnedSemaphorePermit>,
}

impl UpstreamBody {
    /// The longest pause allowed between two chunks (`[origin] body_timeout`).
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// The next chunk, `None` at the clean end, an error if the body broke or stalled.
    pub async fn next_chunk(&mut self) -> Option<Result<Bytes, UpstreamError>> {
        match tokio::time::timeout(self.idle_timeout, self.inner.next()).await {
            Err(_) => Some(Err(UpstreamError::Body(format!(
                "no data for {:?}",
                self.idle_timeout
            )))),
            Ok(None) => None,
            Ok(Some(Ok(chunk))) => Some(Ok(chunk)),
            Ok(Some(Err(e))) => Some(Err(UpstreamError::Body(e.to_string()))),
        }
    }
}

/// The origin, as seen from one worker thread (awc's client is not `Send`).
pub struct Upstream {
    /// Replaced (dropping its pooled connections) when a connection's state is in doubt.
    client: RefCell<awc::Client>,
    connect_timeout: Duration,
    base_url: String,
    response_timeout: Duration,
    body_timeout: Duration,
    /// Shared by every worker: bounds the requests in flight to the origin.
    slots: Option<Arc<Semaphore>>,
}

impl Upstream {
    /// Builds the worker's client from the origin settings.
    pub fn new(cfg: &OriginConfig) -> Self {
        Self {
            client: RefCell::new(build_client(cfg)),
            connect_timeout: cfg.connect_timeout,
            base_url: cfg.base_url.clone(),
            response_timeout: cfg.response_timeout,
            body_timeout: cfg.body_timeout,
            slots: None,
        }
    }

    /// Makes each request take one of `slots` (shared by all workers) from before it is sent
    /// until its body is done, so the origin never sees more requests at once than there are
    /// slots. A request that waits longer than the response timeout for one fails as a timeout.
    pub fn with_request_slots(mut self, slots: Arc<Semaphore>) -> Self {
        self.slots = Some(slots);
        self
    }

    /// Sends `method path_and_query` with `headers` (already filtered for forwarding) and a
    /// request body (`()` for none, a sized or chunked stream otherwise); returns once the
    /// response head has arrived.
    pub async fn send<B>(
        &self,
        method: &str,
        path_and_query: &str,
        headers: &HeaderList,
        body: B,
    ) -> Result<UpstreamResponse, UpstreamError>
    where
        B: MessageBody + 'static,
    {
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|_| UpstreamError::Protocol(format!("invalid method {method:?}")))?;
        let slot = match &self.slots {
            Some(slots) => {
                match tokio::time::timeout(self.response_timeout, slots.clone().acquire_owned())
                    .await
                {
                    Ok(Ok(permit)) => Some(permit),
                    Ok(Err(_)) => None,
                    Err(_) => return Err(UpstreamError::Timeout(self.response_timeout)),
                }
            }
            None => None,
        };
        let url = format!("{}{}", self.base_url, path_and_query);
        let mut request = self.client.borrow().request(method, url.as_str());
        for (name, value) in headers.iter() {
            // Values came from a parsed HTTP message, so conversion only fails on hostile bytes: drop those.
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(value),
            ) {
                request = request.append_header((n, v));
            }
        }
        let progress = Rc::new(Cell::new(Instant::now()));
        let body = Progress {
            inner: Box::pin(body),
            last: progress.clone(),
        };
        let sending = request.send_body(body);
        let response = await_head(sending, &progress, self.response_timeout)
            .await?
            .map_err(|e| classify(e, self.response_timeout))?;
        let status = response.status().as_u16();
        if (100..200).contains(&status) {
            // awc reads an interim 1xx as the response and pools the connection with the
            // final response still unread, where the next request would take it for its own.
            // Drop every pooled connection of this worker (a fresh client), then fail this one.
            self.client.replace(build_client_with(self.connect_timeout));
            return Err(UpstreamError::Protocol(format!(
                "origin sent an interim {status} response, which this proxy does not read past"
            )));
        }
        let headers = response
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .collect();
        Ok(UpstreamResponse {
            status,
            headers,
            body: UpstreamBody {
                inner: response,
                idle_timeout: self.body_timeout,
                _slot: slot,
            },
        })
    }
}

/// Waits for the response head, allowing `timeout` after the request body last made progress
/// (its last chunk read, or its end): an upload that keeps moving is never cut, and once the
/// request is sent the origin has `timeout` to answer. A body-less request gets `timeout` from
/// the start. Connecting is bounded separately, by the connector's `connect_timeout`.
async fn await_head<F: std::future::Future>(
    sending: F,
    progress: &Cell<Instant>,
    timeout: Duration,
) -> Result<F::Output, UpstreamError> {
    let mut sending = std::pin::pin!(sending);
    loop {
        let deadline = progress.get() + timeout;
        match tokio::time::timeout_at(deadline, &mut sending).await {
            Ok(out) => return Ok(out),
            // The body moved since the deadline was set: the origin is still receiving.
            Err(_) if progress.get() + timeout > Instant::now() => continue,
            Err(_) => return Err(UpstreamError::Timeout(timeout)),
        }
    }
}

/// A request body that records when it last yielded a chunk or ended (see `await_head`).
struct Progress<B> {
    inner: Pin<Box<B>>,
    last: Rc<Cell<Instant>>,
}

impl<B: MessageBody> MessageBody for Progress<B> {
    type Error = B::Error;

    fn size(&self) -> BodySize {
        self.inner.size()
    }

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let polled = self.inner.as_mut().poll_next(cx);
        if let Poll::Ready(Some(Ok(_)) | None) = &polled {
            self.last.set(Instant::now());
        }
        polled
    }
}

fn build_client(cfg: &OriginConfig) -> awc::Client {
    build_client_with(cfg.connect_timeout)
}

fn build_client_with(connect_timeout: Duration) -> awc::Client {
    let connector = awc::Connector::new()
        .timeout(connect_timeout)
        // The per-host pool is the bound on concurrent origin connections per worker.
        .limit(256);
    awc::Client::builder()
        .connector(connector)
        // awc's timeout covers the whole exchange, request body included: a slow upload to a
        // healthy origin would get a 504. `send` times only the wait for the head instead.
        .disable_timeout()
        // A proxy passes redirects to its client and adds no User-Agent of its own.
        .disable_redirects()
        .no_default_headers()
        .finish()
}

fn classify(e: awc::error::SendRequestError, timeout: Duration) -> UpstreamError {
    use awc::error::{ConnectError, SendRequestError as E};
    match e {
        E::Timeout => UpstreamError::Timeout(timeout),
        // No connection within connect_timeout is an unreachable origin, like a refusal.
        E::Connect(ConnectError::Timeout) => {
            UpstreamError::Connect("connection timed out".to_string())
        }
        E::Connect(c) => UpstreamError::Connect(c.to_string()),
        other => UpstreamError::Protocol(other.to_string()),
    }
}
