//! The self-service page (issue 13): `GET /` (also `/index.html`), `/app.js` and `/style.css`,
//! embedded at compile time so the binary stays one file with no build step. The page only calls
//! the JSON API; this module only serves the three files.
//!
//! Every answer carries a strict Content-Security-Policy: scripts, styles and fetches from this
//! origin only, images also from `data:` (the QR code that setup returns is a `data:` URI), no
//! inline script or style, no plugins, no framing, and no form submission anywhere — the page
//! submits its forms through `fetch`, so a form that somehow submitted natively (the script
//! failed to load) cannot put a password in a URL. It lives here, beside the files it guards,
//! so the whole page is one file to move when the code base is reshaped.

use warp::http::{HeaderValue, header};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

const INDEX_HTML: &str = include_str!("web/index.html");
const APP_JS: &str = include_str!("web/app.js");
const STYLE_CSS: &str = include_str!("web/style.css");

/// The policy of every file of the page (see the module documentation).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; object-src 'none'; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The page's routes when `enabled` (`web_ui`); otherwise every request is passed on as not
/// found, so the paths answer the API's usual 404 JSON.
pub fn routes(enabled: bool) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let enabled = warp::any()
        .and_then(move || async move {
            if enabled {
                Ok(())
            } else {
                Err(warp::reject::not_found())
            }
        })
        .untuple_one();
    // The path before the method: a method filter first would turn every unknown path into 405.
    let index = warp::path::end()
        .or(warp::path!("index.html"))
        .unify()
        .and(warp::get())
        .map(|| asset(INDEX_HTML, "text/html; charset=utf-8"));
    let script = warp::path!("app.js")
        .and(warp::get())
        .map(|| asset(APP_JS, "text/javascript; charset=utf-8"));
    let style = warp::path!("style.css")
        .and(warp::get())
        .map(|| asset(STYLE_CSS, "text/css; charset=utf-8"));
    enabled.and(index.or(script).unify().or(style).unify())
}

/// One embedded file with its content type and the security headers.
fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    // For browsers that predate `frame-ancestors`.
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // No Referer leaves the page, whatever it links to one day.
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // Like every API answer: nothing of totpd is cached, so an upgrade serves the new page at once
    // and the API's `no-store` rule has no exception to remember.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
