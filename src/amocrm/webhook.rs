//! The optional webhook receiver. AmoCRM's webhooks are unsigned, form-encoded and may be
//! lost, so a webhook is only a hint: the handler answers 200 at once (AmoCRM disables a
//! hook after too many slow or failed answers) and wakes the events poller, which reads
//! what changed through the API. Mount the router on the daemon's HTTP server.

use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;
use tokio::sync::Notify;

/// Body bytes read from a webhook at most; the content is not trusted anyway.
pub const WEBHOOK_MAX_BODY_BYTES: usize = 256 << 10;

/// `POST /amocrm/webhook` → 200, and `wake` is notified.
pub fn webhook_router(wake: Arc<Notify>) -> Router {
    Router::new()
        .route(
            "/amocrm/webhook",
            post(move || {
                let wake = wake.clone();
                async move {
                    wake.notify_one();
                    StatusCode::OK
                }
            }),
        )
        .layer(axum::extract::DefaultBodyLimit::max(WEBHOOK_MAX_BODY_BYTES))
}
