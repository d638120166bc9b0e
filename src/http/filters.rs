//! The filters every route is composed of: the request context (time and client address),
//! the per-IP throttle of a route, the session of a login key, and the JSON body (size limit,
//! read timeout, media type, typed parsing with DRF errors). Each failure is a rejection
//! carrying the API's `Error`, which `error::handle_rejection` turns into its JSON answer.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use warp::http::{HeaderMap, HeaderValue, header};
use warp::{Filter, Rejection};

use super::SharedState;
use crate::error::Error;
use crate::limits::Route;
use crate::service::input::{self, FromBody};
use crate::service::{Ctx, Session};

/// Largest request body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// The peer address of the connection a request came on, and the client address believed
/// (from `X-Forwarded-For` only behind a trusted proxy): set by the server for each request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr {
    pub peer: SocketAddr,
    pub ip: Option<IpAddr>,
}

/// The `Authorization` header values of a request, taken by the server layer (which sees the
/// request before warp does) so that authenticating does not clone the whole header map: the
/// first value (a cheap, reference-counted `HeaderValue`) and whether there were more, which
/// `input::login_key` refuses.
#[derive(Debug, Clone, Default)]
pub struct Authorization {
    first: Option<HeaderValue>,
    several: bool,
}

impl Authorization {
    pub fn of(headers: &HeaderMap) -> Self {
        let mut values = headers.get_all(header::AUTHORIZATION).iter();
        let first = values.next().cloned();
        Self {
            several: first.is_some() && values.next().is_some(),
            first,
        }
    }

    /// The values as `input::login_key` reads them (the second only as a marker that there
    /// were several).
    fn values(&self) -> Vec<&[u8]> {
        match &self.first {
            None => Vec::new(),
            Some(first) if self.several => vec![first.as_bytes(), first.as_bytes()],
            Some(first) => vec![first.as_bytes()],
        }
    }
}

/// The request's `Authorization` values: from the server layer's extension, or, for a route
/// served without that layer (warp's test requests), read from the headers.
fn authorization() -> impl Filter<Extract = (Authorization,), Error = Infallible> + Clone {
    warp::ext::get::<Authorization>()
        .or(warp::header::headers_cloned().map(|headers: HeaderMap| Authorization::of(&headers)))
        .unify()
}

/// The shared state.
pub fn with_state(
    state: &SharedState,
) -> impl Filter<Extract = (SharedState,), Error = Infallible> + Clone + use<> {
    let state = SharedState::clone(state);
    warp::any().map(move || SharedState::clone(&state))
}

/// The time and the client's address.
pub fn request_context(
    state: &SharedState,
) -> impl Filter<Extract = (Ctx,), Error = Infallible> + Clone + use<> {
    with_state(state)
        .and(warp::ext::optional::<ClientAddr>())
        .map(|state: SharedState, client: Option<ClientAddr>| Ctx {
            now: state.clock.now(),
            ip: client.and_then(|c| c.ip),
        })
}

/// The request context, after spending one request of the client's budget for `route` (429
/// `throttled` when it is spent).
pub fn throttled(
    state: &SharedState,
    route: Route,
) -> impl Filter<Extract = (Ctx,), Error = Rejection> + Clone + use<> {
    with_state(state).and(request_context(state)).and_then(
        move |state: SharedState, ctx: Ctx| async move {
            match ctx.ip {
                Some(ip) => match state.ip_limits.take(&(route, ip), ctx.now) {
                    Ok(()) => Ok(ctx),
                    Err(wait) => Err(warp::reject::custom(Error::Throttled { wait })),
                },
                None => Ok(ctx),
            }
        },
    )
}

/// The session of the `Authorization: Token <key>` header (403 without a valid one).
pub fn authenticated(
    state: &SharedState,
) -> impl Filter<Extract = (Session,), Error = Rejection> + Clone + use<> {
    with_state(state)
        .and(request_context(state))
        .and(authorization())
        .and_then(
            |state: SharedState, ctx: Ctx, authorization: Authorization| async move {
                let key =
                    input::login_key(&authorization.values()).map_err(warp::reject::custom)?;
                state
                    .service
                    .authenticate(&key, &ctx)
                    .await
                    .map_err(warp::reject::custom)
            },
        )
}

/// The request body parsed as `T`. The body is at most `MAX_BODY_BYTES` (413), read within
/// `body_read_timeout` (408), `application/json` when not empty (415), and works with and
/// without `Content-Length` (warp's `content_length_limit` would answer 411 to a body-less POST
/// that omits it).
pub fn json<T: FromBody + Send>(
    state: &SharedState,
) -> impl Filter<Extract = (T,), Error = Rejection> + Clone + use<T> {
    body(Duration::from_secs(state.config.body_read_timeout))
        .and_then(|body: Bytes| async move { T::from_body(&body).map_err(warp::reject::custom) })
}

/// The raw body, with the checks of `json`. Only the two headers it needs are read (not a
/// clone of the whole map).
pub fn body(timeout: Duration) -> impl Filter<Extract = (Bytes,), Error = Rejection> + Clone {
    optional_value("content-length")
        .and(optional_value("content-type"))
        .and(warp::body::stream())
        .and_then(
            move |length: Option<HeaderValue>, kind: Option<HeaderValue>, stream| async move {
                read_body(length.as_ref(), kind.as_ref(), stream, timeout)
                    .await
                    .map_err(warp::reject::custom)
            },
        )
}

/// The first value of header `name`, if any.
fn optional_value(
    name: &'static str,
) -> impl Filter<Extract = (Option<HeaderValue>,), Error = Infallible> + Clone {
    warp::header::value(name)
        .map(Some)
        .or(warp::any().map(|| None))
        .unify()
}

async fn read_body<S, B>(
    length: Option<&HeaderValue>,
    kind: Option<&HeaderValue>,
    stream: S,
    timeout: Duration,
) -> Result<Bytes, Error>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let declared = length
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(Error::PayloadTooLarge);
    }
    let body = tokio::time::timeout(timeout, collect_limited(stream))
        .await
        .map_err(|_| Error::RequestTimeout)??;
    if !body.is_empty() && !is_json(kind) {
        return Err(Error::UnsupportedMediaType);
    }
    Ok(body)
}

async fn collect_limited<S, B>(stream: S) -> Result<Bytes, Error>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let mut stream = std::pin::pin!(stream);
    let mut body = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let mut chunk = chunk.map_err(|_| Error::Parse("The request body could not be read."))?;
        if body.len() + chunk.remaining() > MAX_BODY_BYTES {
            return Err(Error::PayloadTooLarge);
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            body.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(body.freeze())
}

/// `application/json`, any case, parameters (such as charset) allowed.
fn is_json(kind: Option<&HeaderValue>) -> bool {
    kind.and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}
