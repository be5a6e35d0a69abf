//! The two invocation routes, served without axum's router: a warm call spends more in a
//! general router (matching, extractors, boxed layers, the middleware's body wrapping) than in
//! its own handler. Every other request, and an invocation the fast path does not take whole
//! (an Invoke API query string, a cluster that may forward it, a name that is not UTF-8), goes through
//! [`super::app`] as before, so both paths answer alike.

use std::sync::Arc;

use axum::Router as AxumRouter;
use axum::extract::{Request, State};
use axum::http::Method;
use axum::response::Response;

use super::App;

/// The API as the listener serves it.
#[derive(Clone)]
pub struct Api {
    router: AxumRouter,
    /// Set: the invocation routes skip `router` while this host is not in a cluster.
    app: Option<Arc<App>>,
}

impl From<AxumRouter> for Api {
    /// `router` alone: every request goes through it.
    fn from(router: AxumRouter) -> Api {
        Api { router, app: None }
    }
}

/// The agent's API: [`super::app`] with the invocation routes' fast path.
pub fn api(app: Arc<App>) -> Api {
    Api {
        router: super::app(app.clone()),
        app: Some(app),
    }
}

/// A request the fast path takes.
#[derive(Debug, PartialEq)]
enum Hot {
    /// `POST /2015-03-31/functions/{name}/invocations`, the name percent-decoded.
    Invoke(String),
    /// `/fn/{name}` or `/fn/{name}/{path}`, with a method function URLs take.
    FunctionUrl,
}

const INVOKE_PREFIX: &str = "/2015-03-31/functions/";
const INVOKE_SUFFIX: &str = "/invocations";

/// What `app()` would route `method path?query` to, for the two routes only; None: ask it.
fn hot(method: &Method, uri: &axum::http::Uri) -> Option<Hot> {
    let path = uri.path();
    if let Some(rest) = path.strip_prefix("/fn/") {
        // `/fn/{name}` or `/fn/{name}/{path}`; `/fn/{name}/` is the fallback's (the `{*path}`
        // route wants a character).
        let (name, routed) = match rest.split_once('/') {
            Some((name, path)) => (name, !path.is_empty()),
            None => (rest, true),
        };
        let url_method = [
            Method::GET,
            Method::PUT,
            Method::POST,
            Method::DELETE,
            Method::PATCH,
            Method::HEAD,
            Method::OPTIONS,
        ]
        .contains(method);
        return (url_method && routed && !name.is_empty()).then_some(Hot::FunctionUrl);
    }
    let raw = path
        .strip_prefix(INVOKE_PREFIX)?
        .strip_suffix(INVOKE_SUFFIX)?;
    // A query (`Qualifier=`) is for axum's `Query` extractor and its rejections.
    if method != Method::POST || raw.is_empty() || raw.contains('/') || uri.query().is_some() {
        return None;
    }
    // As axum's `Path<String>`: percent-decoded, UTF-8 (else its rejection answers).
    let name = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .ok()?;
    Some(Hot::Invoke(name.into_owned()))
}

impl Api {
    /// Answers `req`.
    pub async fn serve(self, req: Request) -> Response {
        let taken = match &self.app {
            // In a cluster the forwarding layer decides where a call runs.
            Some(app) if app.cluster.get().is_none() => {
                hot(req.method(), req.uri()).map(|h| (app.clone(), h))
            }
            _ => None,
        };
        let Some((app, hot)) = taken else {
            return match tower::ServiceExt::oneshot(self.router, req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
        };
        // What the router's middleware does to every request body.
        let req = super::drain::wrap(req);
        match hot {
            Hot::Invoke(name) => super::lambda::invoke(&app, &name, Default::default(), req).await,
            Hot::FunctionUrl => super::lambda::function_url(State(app), req).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hot_of(method: Method, uri: &str) -> Option<Hot> {
        hot(&method, &uri.parse().unwrap())
    }

    #[test]
    fn the_fast_path_takes_exactly_what_the_router_routes_to_the_two_handlers() {
        let invoke = |n: &str| Some(Hot::Invoke(n.to_string()));
        assert_eq!(
            hot_of(Method::POST, "/2015-03-31/functions/echo/invocations"),
            invoke("echo")
        );
        assert_eq!(
            hot_of(
                Method::POST,
                "/2015-03-31/functions/arn%3Aaws%3Alambda%3Aus-east-1%3A1%3Afunction%3Aecho/invocations"
            ),
            invoke("arn:aws:lambda:us-east-1:1:function:echo")
        );
        // Left to the router: its 405, its extractors, its fallback.
        for (m, uri) in [
            (Method::GET, "/2015-03-31/functions/echo/invocations"),
            (
                Method::POST,
                "/2015-03-31/functions/echo/invocations?Qualifier=1",
            ),
            (Method::POST, "/2015-03-31/functions//invocations"),
            (Method::POST, "/2015-03-31/functions/a/b/invocations"),
            (Method::POST, "/2015-03-31/functions/%FF/invocations"),
            (Method::POST, "/2015-03-31/functions/echo"),
            (Method::POST, "/fn/"),
            (Method::POST, "/fn//x"),
            (Method::POST, "/fn/echo/"),
            (Method::TRACE, "/fn/echo"),
            (Method::GET, "/v1/functions"),
        ] {
            assert_eq!(hot_of(m.clone(), uri), None, "{m} {uri}");
        }
        for (m, uri) in [
            (Method::POST, "/fn/echo"),
            (Method::GET, "/fn/echo/a/b"),
            (Method::OPTIONS, "/fn/echo/a"),
            (Method::HEAD, "/fn/echo"),
            (Method::GET, "/fn/echo/a?x=1"),
        ] {
            assert_eq!(hot_of(m.clone(), uri), Some(Hot::FunctionUrl), "{m} {uri}");
        }
    }
}
