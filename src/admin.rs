//! The admin listener (shard 0 only): liveness and readiness.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::http::conn::{Handler, Request};
use crate::http::{write_error, write_response, Method};

/// Per-connection state of the admin listener.
pub struct AdminConn {
    pub ready: Arc<AtomicBool>,
}

impl Handler for AdminConn {
    async fn handle(&mut self, req: Request<'_>, out: &mut Vec<u8>) -> bool {
        let keep = req.head.keep_alive;
        match (req.path(), req.head.method) {
            (b"/healthz", Method::Get) => write_response(out, 200, "", br#"{"status":"ok"}"#, keep),
            (b"/readyz", Method::Get) => {
                if self.ready.load(Ordering::Acquire) {
                    write_response(out, 200, "", br#"{"status":"ready"}"#, keep)
                } else {
                    write_response(out, 503, "retry-after: 1\r\n", br#"{"status":"starting"}"#, keep)
                }
            }
            (b"/healthz" | b"/readyz", _) => {
                write_error(out, 405, "method_not_allowed", "use GET", "allow: GET\r\n", keep)
            }
            _ => write_error(out, 404, "not_found", "no such endpoint", "", keep),
        }
        true
    }
}
