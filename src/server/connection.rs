//! One accepted client connection: the deadline for its first request head, its requests in
//! flight, giving up its slot when the listener is full and it is idle, and its graceful drain.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};

use super::version::{self, Builders};

/// Shared by every connection of one listener: raised while the listener is at its connection
/// cap, so that connections with nothing in flight close and make room (what nginx does with its
/// idle keep-alive connections when it runs out of them).
#[derive(Debug, Default)]
pub(crate) struct Pressure {
    raised: AtomicBool,
    notify: Notify,
}

impl Pressure {
    /// Asks every idle connection to close, now and whenever one becomes idle, until lowered.
    pub(crate) fn raise(&self) {
        self.raised.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub(crate) fn lower(&self) {
        self.raised.store(false, Ordering::SeqCst);
    }

    fn is_raised(&self) -> bool {
        self.raised.load(Ordering::SeqCst)
    }
}

/// What a connection's task and its requests share.
#[derive(Debug, Default)]
struct ConnState {
    /// A first request head arrived: the connection is a client's, not a silent socket.
    started: AtomicBool,
    in_flight: AtomicUsize,
    /// Woken when the last request in flight ends while the listener is under pressure.
    idle: Notify,
}

/// Held by a request from its head until its response body is gone.
struct InFlight {
    conn: Arc<ConnState>,
    pressure: Arc<Pressure>,
}

impl InFlight {
    fn begin(conn: &Arc<ConnState>, pressure: &Arc<Pressure>) -> InFlight {
        conn.started.store(true, Ordering::SeqCst);
        conn.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight {
            conn: conn.clone(),
            pressure: pressure.clone(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let left = self.conn.in_flight.fetch_sub(1, Ordering::SeqCst) - 1;
        if left == 0 && self.pressure.is_raised() {
            self.conn.idle.notify_one();
        }
    }
}

/// A response body that keeps its request counted as in flight until hyper drops it.
pub(crate) struct Tracked<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B> Tracked<B> {
    fn new(body: B, in_flight: InFlight) -> Tracked<B> {
        Tracked {
            body,
            _in_flight: in_flight,
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// How long a connection that has not sent a request head may keep its slot when the listener
/// is full or draining (at most the head timeout).
const SILENT_GRACE: Duration = Duration::from_secs(1);

/// How one listener treats its connections.
#[derive(Clone)]
pub(crate) struct ConnPolicy {
    /// A connection must deliver a complete first request head this long after it was accepted.
    pub(crate) head_timeout: Duration,
    pub(crate) pressure: Arc<Pressure>,
    /// Turns `true` when the server drains: idle connections close, busy ones after their answer.
    pub(crate) drain: watch::Receiver<bool>,
}

/// Serves one connection with `handle` until it ends, the client stays silent past the head
/// deadline, or it is asked to close (drain, or pressure while idle).
pub(crate) async fn serve<H, F, B>(
    stream: TcpStream,
    builders: Builders,
    policy: ConnPolicy,
    handle: H,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: Body<Data = bytes::Bytes> + Unpin + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = Arc::new(ConnState::default());
    let accepted = tokio::time::Instant::now();
    let head_deadline = accepted + policy.head_timeout;
    // A fresh connection gets a moment to send its head (it may have waited in the accept queue
    // with its request already sent) before it counts as silent when its slot is wanted.
    let silent_at = accepted + policy.head_timeout.min(SILENT_GRACE);
    let service = {
        let (conn, pressure) = (conn.clone(), policy.pressure.clone());
        service_fn(move |request| {
            let in_flight = InFlight::begin(&conn, &pressure);
            let answer = handle(request);
            async move {
                let response = answer.await?;
                Ok::<_, Infallible>(response.map(|body| Tracked::new(body, in_flight)))
            }
        })
    };
    // The version is told first (within the head deadline like the head itself), then the
    // connection is served in it.
    let mut stream = Some(stream);
    let mut connection: Option<version::Connection<_>> = None;
    let (pressure, mut drain) = (policy.pressure, policy.drain);
    let (mut closing, mut draining) = (false, *drain.borrow());
    loop {
        let reclaim = pressure.notify.notified();
        tokio::pin!(reclaim);
        reclaim.as_mut().enable();
        let started = conn.started.load(Ordering::SeqCst);
        let asked = pressure.is_raised() || draining;
        let silent = tokio::time::Instant::now() >= silent_at;
        if !closing && asked && conn.in_flight.load(Ordering::SeqCst) == 0 {
            match &mut connection {
                Some(connection) if started => connection.graceful_shutdown(),
                _ if silent => return,
                _ => {}
            }
            closing = started;
        }
        tokio::select! {
            h2 = version::is_h2(stream.as_ref()), if connection.is_none() => {
                let (Ok(h2), Some(stream)) = (h2, stream.take()) else {
                    return;
                };
                connection = Some(builders.serve(h2, stream, service.clone()));
            }
            result = version::drive(&mut connection), if connection.is_some() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "client connection ended with an error");
                }
                return;
            }
            // The condition is read when this `select!` starts, which may be long before the
            // deadline: whether a head arrived meanwhile is checked again when it passes.
            () = tokio::time::sleep_until(head_deadline), if !started => {
                if !conn.started.load(Ordering::SeqCst) {
                    tracing::debug!("no request head in time: closing the connection");
                    return;
                }
            }
            () = tokio::time::sleep_until(silent_at), if asked && !started && !silent => {}
            changed = drain.changed(), if !draining => {
                draining = changed.is_err() || *drain.borrow();
            }
            () = &mut reclaim => {}
            () = conn.idle.notified() => {}
        }
    }
}
