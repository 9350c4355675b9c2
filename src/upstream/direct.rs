//! Plain-HTTP/1 upstream connections driven by the task of the request that uses them, the way
//! nginx's one event loop does: the request's own polls write the request and read the answer, so
//! no wake-up crosses to a connection task. A connection between requests waits in a pool that
//! nothing polls; it is checked when it is taken out, and a request it could not even start is
//! sent again on another connection.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use http::{header, HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

use super::{error_chain, OutBody, SendError};

type Connection = http1::Connection<TokioIo<TcpStream>, OutBody>;

/// Idle connections kept per upstream host, as many as the pooled client keeps.
const MAX_IDLE_PER_HOST: usize = 1024;

/// A host's idle connections, most recently used last. Boxed: a connection (a few hundred bytes of
/// state) moves between the pool and an answer's body as one pointer.
#[allow(clippy::vec_box)]
type Idle = HashMap<Arc<str>, Vec<Box<Driver>>>;

/// The idle connections of one upstream client, by `host:port`.
pub(super) struct Direct {
    connector: HttpConnector,
    idle: Mutex<Idle>,
    idle_timeout: Duration,
    sweeping: std::sync::atomic::AtomicBool,
}

/// One connection: the handle a request is sent through and the future that does its I/O.
pub(super) struct Driver {
    sender: http1::SendRequest<OutBody>,
    connection: Connection,
    host: Arc<str>,
    pool: Weak<Direct>,
    idle_since: Instant,
    /// Whether the connection future has not finished (it must not be polled once it has).
    open: bool,
}

impl Direct {
    pub(super) fn new(connector: HttpConnector, idle_timeout: Duration) -> Arc<Direct> {
        Arc::new(Direct {
            connector,
            idle: Mutex::new(HashMap::new()),
            idle_timeout,
            sweeping: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Sends `request` (absolute URI, `http`) on an idle connection to its host or a new one, and
    /// returns the answer's head; its body drives the connection until it is read to the end.
    pub(super) async fn request(
        self: &Arc<Direct>,
        mut request: Request<OutBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let target = request.uri().clone();
        let host = target.authority().map_or("", |a| a.as_str());
        origin_form(&mut request, host)?;
        loop {
            let (mut driver, reused) = match self.checkout(host).await {
                Some(driver) => (driver, true),
                None => (self.connect(&target, host).await?, false),
            };
            match driver.exchange(request).await {
                Ok(response) => return Ok(response.map(|body| UpstreamBody::driven(body, driver))),
                Err(mut failed) => match failed.take_message() {
                    // The connection had closed while idle: nothing was sent, so send it again.
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(SendError::transport(error_chain(failed.error()))),
                },
            }
        }
    }

    /// The most recently used idle connection to `host` that is still open and ready.
    async fn checkout(&self, host: &str) -> Option<Box<Driver>> {
        loop {
            let mut driver = self.lock().get_mut(host)?.pop()?;
            if driver.idle_since.elapsed() >= self.idle_timeout {
                continue;
            }
            // One turn of the connection reads what came while it was idle: a close, or junk.
            if poll_fn(|cx| Poll::Ready(driver.turn(cx))).await {
                return Some(driver);
            }
        }
    }

    async fn connect(
        self: &Arc<Direct>,
        target: &Uri,
        host: &str,
    ) -> Result<Box<Driver>, SendError> {
        let mut connector = self.connector.clone();
        let io = connector
            .call(target.clone())
            .await
            .map_err(|e| SendError::connect(error_chain(&e)))?;
        let (sender, connection) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| SendError::connect(error_chain(&e)))?;
        Ok(Box::new(Driver {
            sender,
            connection,
            host: Arc::from(host),
            pool: Arc::downgrade(self),
            idle_since: Instant::now(),
            open: true,
        }))
    }

    /// Keeps a connection whose answer was read to the end for the next request to its host.
    fn put(self: &Arc<Direct>, mut driver: Box<Driver>) {
        driver.idle_since = Instant::now();
        let mut idle = self.lock();
        let list = idle.entry(driver.host.clone()).or_default();
        if list.len() < MAX_IDLE_PER_HOST {
            list.push(driver);
        }
        drop(idle);
        if !self
            .sweeping
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tokio::spawn(sweep(Arc::downgrade(self), self.idle_timeout));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Closes connections idle for `every` or longer, until the pool is gone: nothing else polls an
/// idle connection, so one its host closed would otherwise hold its socket until it is next used.
async fn sweep(pool: Weak<Direct>, every: Duration) {
    let mut interval = tokio::time::interval(every.max(Duration::from_millis(100)));
    interval.tick().await;
    loop {
        interval.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let mut idle = pool.lock();
        for list in idle.values_mut() {
            list.retain(|driver| driver.idle_since.elapsed() < every);
        }
        idle.retain(|_, list| !list.is_empty());
    }
}

impl Driver {
    /// Writes `request` and reads the answer's head, polling the connection in this task.
    async fn exchange(
        &mut self,
        request: Request<OutBody>,
    ) -> Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<OutBody>>> {
        let mut answer = pin!(self.sender.try_send_request(request));
        poll_fn(|cx| {
            self.drive(cx);
            answer.as_mut().poll(cx)
        })
        .await
    }

    /// Polls the connection unless it has finished; whether it is still open.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if self.open && Pin::new(&mut self.connection).poll(cx).is_ready() {
            self.open = false;
        }
        self.open
    }

    /// Polls the connection once; whether it is still open and ready for a request.
    fn turn(&mut self, cx: &mut Context<'_>) -> bool {
        self.drive(cx) && self.sender.is_ready()
    }

    /// Back to the pool, if the connection finished the exchange and can take another.
    fn release(mut self: Box<Driver>) {
        if !self.turn(&mut Context::from_waker(Waker::noop())) {
            return;
        }
        if let Some(pool) = self.pool.upgrade() {
            pool.put(self);
        }
    }
}

/// An HTTP/1 request line takes the path only; the host goes in `Host`.
fn origin_form(request: &mut Request<OutBody>, host: &str) -> Result<(), SendError> {
    if !request.headers().contains_key(header::HOST) {
        let value = HeaderValue::from_str(host)
            .map_err(|_| SendError::connect(format!("invalid upstream host {host:?}")))?;
        request.headers_mut().insert(header::HOST, value);
    }
    let path = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    *request.uri_mut() = Uri::from(path);
    Ok(())
}

/// An upstream answer's body; on a direct connection it also drives that connection, which goes
/// back to the pool once the body has been read to its end.
pub struct UpstreamBody {
    body: Incoming,
    driver: Option<Box<Driver>>,
}

impl UpstreamBody {
    pub(super) fn pooled(body: Incoming) -> UpstreamBody {
        UpstreamBody { body, driver: None }
    }

    fn driven(body: Incoming, driver: Box<Driver>) -> UpstreamBody {
        UpstreamBody {
            body,
            driver: Some(driver).filter(|driver| driver.open),
        }
    }

    fn ended(&mut self) {
        if let Some(driver) = self.driver.take() {
            driver.release();
        }
    }
}

impl http_body::Body for UpstreamBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        // The body first: taking a frame tells the connection it may read the next.
        let mut frame = Pin::new(&mut this.body).poll_frame(cx);
        if frame.is_pending() {
            if let Some(driver) = this.driver.as_mut() {
                if !driver.drive(cx) {
                    // Done or failed: the body has its end or its error; the socket is closed.
                    this.driver = None;
                }
                frame = Pin::new(&mut this.body).poll_frame(cx);
            }
        }
        if let Poll::Ready(None) = frame {
            this.ended();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for UpstreamBody {
    /// An empty body may never be polled: its connection is still good for the next request.
    fn drop(&mut self) {
        if http_body::Body::is_end_stream(&self.body) {
            self.ended();
        }
    }
}
