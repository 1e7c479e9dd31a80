//! Connections of `sidrec serve`: the accept loop, the timeouts that keep one client from
//! holding the server, and shutdown with a deadline.
//!
//! `axum::serve` has no header-read timeout and waits without limit for every connection
//! on graceful shutdown, so one client that sends half a request head keeps SIGTERM from
//! ever finishing, and sockets that say nothing stay open for good. This loop runs each
//! connection with hyper's HTTP/1 server directly:
//!
//! * **head**: a request head must be complete within `header_timeout` of the server
//!   starting to wait for it (the connection opening, or the previous answer going out),
//!   else the connection is closed (hyper's `header_read_timeout`). A client that dribbles
//!   a byte at a time is cut off as surely as one that stops.
//! * **body**: the body must then arrive within `header_timeout` too, and be at most
//!   `max_body` bytes; it is read here, before the router sees the request, so a stalled
//!   upload is answered `408` and an oversized one `413`, both as JSON.
//! * **idle**: a connection with no request being decoded and no byte moving either way
//!   for `idle_timeout` is closed (a client that stops reading its answer, a silent
//!   socket). Time spent decoding never counts: the client is waiting on us.
//! * **shutdown**: when the shutdown future resolves, the listener closes, every
//!   connection is asked to finish its current request and close, and after
//!   `shutdown_timeout` whatever is still open is dropped.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::service::Service as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::{ApiError, ServeOptions};

/// How long a connection may take over each part of its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// A request head, and then its body, must each arrive within this.
    pub header: Duration,
    /// A connection with nothing being decoded and no byte moving is closed after this.
    pub idle: Duration,
    /// After shutdown begins, connections still open after this are dropped.
    pub shutdown: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            header: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            shutdown: Duration::from_secs(10),
        }
    }
}

/// Serves `router` on `listener` until `shutdown` resolves; then lets requests in flight
/// finish for up to `opts.timeouts.shutdown` and returns. Bodies over `opts.max_body`
/// bytes get 413.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    opts: &ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let (timeouts, max_body) = (opts.timeouts, opts.max_body);
    let (stop_tx, stop_rx) = watch::channel(false);
    let app = TowerToHyperService::new(router);
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    conns.spawn(connection(stream, app.clone(), timeouts, max_body, stop_rx.clone()));
                }
                Err(e) if is_per_connection(&e) => {}
                Err(e) => {
                    // Out of file descriptors and the like: wait for some to be freed
                    // rather than spin.
                    eprintln!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            // Reap finished connections so the set holds only open ones.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(timeouts.shutdown, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        eprintln!(
            "shutdown: {} connection(s) still open after {:.1} s; closing them",
            conns.len(),
            timeouts.shutdown.as_secs_f64()
        );
        conns.shutdown().await;
    }
    Ok(())
}

/// Errors of accepting one connection that say nothing about the listener.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    )
}

/// One connection, from accept to close.
async fn connection(
    stream: TcpStream,
    app: TowerToHyperService<Router>,
    timeouts: Timeouts,
    max_body: usize,
    mut stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: activity.clone(),
    });
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |req| {
            let (app, activity) = (app.clone(), activity.clone());
            async move {
                Ok::<_, Infallible>(handle(app, activity, req, timeouts.header, max_body).await)
            }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.header)
        .keep_alive(true)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let mut stopping = false;
    if *stop.borrow_and_update() {
        stopping = true;
        conn.as_mut().graceful_shutdown();
    }
    loop {
        // While a request is being decoded the client waits on us: look again later.
        let wait = if activity.busy() {
            timeouts.idle
        } else {
            timeouts.idle.saturating_sub(activity.quiet_for())
        };
        tokio::select! {
            // Errors here are the client's (gone away, bad head, too slow): nothing
            // to report to anyone.
            _ = conn.as_mut() => return,
            _ = stop.changed(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            () = tokio::time::sleep(wait) => {
                if !activity.busy() && activity.quiet_for() >= timeouts.idle {
                    // Dropping the connection closes the socket.
                    return;
                }
            }
        }
    }
}

/// Reads the body (bounded in time and size), then hands the request to the router
/// while the connection counts as busy.
async fn handle(
    app: TowerToHyperService<Router>,
    activity: Arc<Activity>,
    req: Request<Incoming>,
    body_timeout: Duration,
    max_body: usize,
) -> Response {
    let (parts, body) = req.into_parts();
    let collected =
        tokio::time::timeout(body_timeout, Limited::new(body, max_body).collect()).await;
    let bytes = match collected {
        Ok(Ok(c)) => c.to_bytes(),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return closing(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is over the length limit of {max_body} bytes"),
            )
        }
        Ok(Err(_)) => {
            return closing(
                StatusCode::BAD_REQUEST,
                "the request body could not be read".into(),
            )
        }
        Err(_) => {
            return closing(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {:.1} s",
                    body_timeout.as_secs_f64()
                ),
            )
        }
    };
    let _busy = Busy::enter(&activity);
    let req = Request::from_parts(parts, axum::body::Body::from(bytes));
    match app.call(req).await {
        Ok(resp) => resp,
        Err(never) => match never {},
    }
}

/// A JSON error after which the connection closes (what is left of the request on the
/// wire cannot be trusted to end where a next request begins).
fn closing(status: StatusCode, message: String) -> Response {
    let mut resp = ApiError { status, message }.into_response();
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// When a connection last moved a byte, and whether a request on it is being decoded.
struct Activity {
    start: Instant,
    /// Milliseconds from `start` to the last byte read or written.
    last: AtomicU64,
    busy: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        self.last.store(now, Ordering::Relaxed);
    }

    fn quiet_for(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }

    fn busy(&self) -> bool {
        self.busy.load(Ordering::SeqCst) > 0
    }
}

/// Marks a connection busy while a request on it is decoded.
struct Busy<'a>(&'a Activity);

impl<'a> Busy<'a> {
    fn enter(a: &'a Activity) -> Self {
        a.busy.fetch_add(1, Ordering::SeqCst);
        Busy(a)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        // The answer is about to be written: the idle clock starts now, not when the
        // request arrived (decoding may have taken longer than the idle timeout).
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A socket that notes every byte that moves on it in its [`Activity`].
struct Watched<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
