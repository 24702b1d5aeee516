//! The end of the shutdown grace: a tower layer that ends every call still open when the
//! deadline passes, with UNAVAILABLE.
//!
//! On SIGTERM the server stops accepting connections and tells clients to go away (HTTP/2
//! GOAWAY), and calls in flight may finish; but a stream stays open as long as its client
//! keeps it open (an idle `SubmitCases` until the client's own deadline, if it has one),
//! and an orchestrator kills the process after its own grace (30 s for Kubernetes and
//! Docker). So at `--shutdown-grace-secs` after the signal, this layer ends each call
//! itself: a call that has not answered yet answers UNAVAILABLE; an open response stream
//! ends with UNAVAILABLE as its status; an open request stream is released (the handler
//! reading it sees UNAVAILABLE), which lets the connection close. UNAVAILABLE because the
//! call did not fail: this instance went away, and a retry elsewhere or later is right.
//!
//! Writes are answered only after their commit, so a call ended here was never told its
//! write succeeded; whether a write it started is committed, the writer decides, and the
//! shutdown waits for the writer to finish (`startup`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::Frame;
use prost::bytes::Bytes;
use tokio::sync::watch;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::codegen::http::{self, HeaderMap};

/// What a call still open at the deadline is told.
const GONE: &str = "the server is shutting down; retry on another instance or later";

/// Ends calls at the shutdown deadline: `deadline` turns `true` when it has passed.
#[derive(Clone)]
pub struct DrainLayer {
    deadline: watch::Receiver<bool>,
}

impl DrainLayer {
    pub fn new(deadline: watch::Receiver<bool>) -> DrainLayer {
        DrainLayer { deadline }
    }
}

impl<S> tower_layer::Layer<S> for DrainLayer {
    type Service = Drain<S>;

    fn layer(&self, inner: S) -> Drain<S> {
        Drain {
            inner,
            deadline: self.deadline.clone(),
        }
    }
}

/// The service of [`DrainLayer`].
#[derive(Clone)]
pub struct Drain<S> {
    inner: S,
    deadline: watch::Receiver<bool>,
}

type Deadline = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Resolves when the deadline has passed; never, if its sender is gone without setting it.
fn passed(deadline: &watch::Receiver<bool>) -> Deadline {
    let mut deadline = deadline.clone();
    Box::pin(async move {
        if deadline.wait_for(|passed| *passed).await.is_err() {
            std::future::pending::<()>().await;
        }
    })
}

impl<S> Service<http::Request<Body>> for Drain<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let deadline = self.deadline.clone();
        let request = request.map(|body| {
            Body::new(DrainBody {
                inner: Some(body),
                deadline: passed(&deadline),
                side: Side::Request,
            })
        });
        let call = self.inner.call(request);
        Box::pin(async move {
            tokio::select! {
                response = call => Ok(response?.map(|body| {
                    Body::new(DrainBody {
                        inner: Some(body),
                        deadline: passed(&deadline),
                        side: Side::Response,
                    })
                })),
                () = passed(&deadline) => Ok(Status::unavailable(GONE).into_http()),
            }
        })
    }
}

enum Side {
    Request,
    Response,
}

/// A body that ends at the deadline.
struct DrainBody {
    /// `None` once ended.
    inner: Option<Body>,
    deadline: Deadline,
    side: Side,
}

impl http_body::Body for DrainBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        if let Poll::Ready(frame) = Pin::new(inner).poll_frame(cx) {
            // Trailers are the last frame: nothing may follow them.
            if frame
                .as_ref()
                .is_none_or(|f| f.as_ref().is_ok_and(Frame::is_trailers))
            {
                self.inner = None;
            }
            return Poll::Ready(frame);
        }
        if self.deadline.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        // Past the deadline: the rest of the body is not read (dropping it releases the
        // HTTP/2 stream) or not sent.
        self.inner = None;
        let status = Status::unavailable(GONE);
        Poll::Ready(Some(match self.side {
            Side::Request => Err(status),
            Side::Response => {
                let mut trailers = HeaderMap::new();
                let _ = status.add_header(&mut trailers);
                Ok(Frame::trailers(trailers))
            }
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }
}
