//! http-relay: makes HTTP and gRPC services on machines behind NAT and
//! firewalls reachable through an internet-facing relay server.
//!
//! ```text
//! user-client ──TLS──► relay server ◄──TLS── relay-client ──► backend
//! ```
//!
//! # Layout
//!
//! - [`config`]: typed server and client configuration, layered with figment.
//! - [`tls`]: rustls configurations and the development CA.
//! - [`proto`]: the v1 wire messages (`PROTOCOL.md`).
//! - [`auth`]: JWT validation, JWKS cache, audience policy, dev issuer,
//!   relay-client token sources.
//! - [`broker`]: the in-memory rendezvous of requests and relay-clients.
//! - [`server`]: the relay server's listener, routing and handlers.
//! - [`client`]: the relay-client.
//! - [`error`]: the single mapping of relay errors to HTTP statuses.
//! - [`telemetry`]: logging, OpenTelemetry tracing and metrics.
//! - [`clock`]: deadlines that cannot overflow, and progress stamps.
//! - [`readbuf`]: read buffers of upgraded connections' byte pipes.

#![forbid(unsafe_code)]

pub mod auth;
pub mod broker;
pub mod client;
pub mod clock;
pub mod config;
pub mod error;
pub mod observed;
pub mod proto;
pub mod readbuf;
pub mod server;
pub mod telemetry;
pub mod tls;

/// Locks a mutex of one of the relay's short critical sections. A panic
/// while holding one cannot leave its data half-updated, so a poisoned
/// lock is still usable: no lock can take the process down.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
