//! Where the server asks `auth` whether a request may pass, and counts
//! and logs every refusal once (subject and backend, never the token).

use http::HeaderMap;

use super::State;
use super::places::Place;
use crate::auth::{AuthError, Claims, Role};
use crate::error::RelayError;
use crate::telemetry::limit::Verdict;
use crate::tls::client_cert::{CertRefusal, PeerCert};

fn refuse(state: &State, e: AuthError, sub: Option<&str>, backend: &str) -> RelayError {
    state.metrics.auth_failure(e.reason());
    // Anyone can send bad tokens: the lines are rate-limited per reason,
    // the metric counts every refusal.
    let verdict = state.refusal_log.check(e.reason(), log_suppressed);
    if verdict == Verdict::Log {
        tracing::info!(
            reason = e.reason(),
            sub = sub.unwrap_or("-"),
            backend,
            error = %e,
            "authentication failed"
        );
    }
    RelayError::Auth(e)
}

/// The summary line of refusals whose lines were held back.
pub fn log_suppressed(reason: &'static str, suppressed: u64) {
    if let Some(reason) = reason.strip_prefix("client_cert_") {
        tracing::info!(
            reason,
            suppressed,
            "client certificate refused {suppressed} more times; those lines were not logged"
        );
    } else {
        tracing::info!(
            reason,
            suppressed,
            "authentication failed {suppressed} more times; those lines were not logged"
        );
    }
}

/// A user-client request for `backend`: verifies and checks its token,
/// and removes the token from the headers so it is never relayed.
/// Returns the token's subject (`None` with auth off). A request that
/// passes proves its connection (`places`).
pub async fn user<B>(
    state: &State,
    req: &mut http::Request<B>,
    backend: &str,
) -> Result<Option<String>, RelayError> {
    let subject = user_token(state, req, backend).await?;
    Place::prove(req.extensions());
    Ok(subject)
}

async fn user_token<B>(
    state: &State,
    req: &mut http::Request<B>,
    backend: &str,
) -> Result<Option<String>, RelayError> {
    let Some(auth) = &state.auth else {
        return Ok(None);
    };
    let token = auth
        .take_user_token(req.headers_mut())
        .ok_or_else(|| refuse(state, AuthError::Missing, None, backend))?;
    if token.from_cookie {
        // HTTP/2 names the authority in `:authority`, HTTP/1.1 in `Host`.
        let host = req.uri().authority().map(|a| a.as_str()).or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
        });
        auth.check_cookie_origin(req.method(), req.headers(), host)
            .map_err(|e| refuse(state, e, None, backend))?;
    }
    let token = token.token;
    let claims = auth
        .verify(&token)
        .await
        .map_err(|e| refuse(state, e, None, backend))?;
    auth.check(&claims, Role::User, backend)
        .map_err(|e| refuse(state, e, claims.sub.as_deref(), backend))?;
    Ok(claims.sub)
}

/// First stage for relay-client calls: a valid token (401 otherwise).
/// `backend` is what the call names, for the log line only.
pub async fn relay_token(
    state: &State,
    headers: &HeaderMap,
    backend: &str,
) -> Result<Option<Claims>, RelayError> {
    let Some(auth) = &state.auth else {
        return Ok(None);
    };
    let token = crate::auth::bearer(headers)
        .ok_or_else(|| refuse(state, AuthError::Missing, None, backend))?;
    auth.verify(token)
        .await
        .map(Some)
        .map_err(|e| refuse(state, e, None, backend))
}

/// Between the stages, while the backend is not yet known: the token is a
/// relay token for some backend (403 otherwise).
pub fn relay_role(state: &State, claims: Option<&Claims>) -> Result<(), RelayError> {
    match (&state.auth, claims) {
        (Some(auth), Some(claims)) if !auth.has_role(claims, crate::auth::Role::Relay) => {
            let expected = auth.audience(crate::auth::Role::Relay, "{backend}");
            Err(refuse(
                state,
                AuthError::WrongAudience { expected },
                claims.sub.as_deref(),
                "-",
            ))
        }
        _ => Ok(()),
    }
}

/// Second stage: the token is a relay token for `backend` (403 otherwise).
pub fn relay_access(
    state: &State,
    claims: Option<&Claims>,
    backend: &str,
) -> Result<(), RelayError> {
    match (&state.auth, claims) {
        (Some(auth), Some(claims)) => auth
            .check(claims, Role::Relay, backend)
            .map_err(|e| refuse(state, e, claims.sub.as_deref(), backend)),
        _ => Ok(()),
    }
}

/// With `tls.client_ca`: the relay-client's certificate for `backend`
/// (403 otherwise), counted in `relay_client_cert_refusals_total`.
pub fn relay_cert(state: &State, ext: &http::Extensions, backend: &str) -> Result<(), RelayError> {
    if state.cfg.tls.client_ca.is_none() {
        return Ok(());
    }
    let none = PeerCert(None);
    let peer = ext.get::<PeerCert>().unwrap_or(&none);
    peer.check(backend, state.cfg.tls.client_cert_names_backend)
        .map_err(|e| refuse_cert(state, e, backend))
}

/// With `tls.client_ca`: some client certificate, before anything else of
/// the request is read (which backend it must name is known later).
pub fn relay_cert_presented(state: &State, ext: &http::Extensions) -> Result<(), RelayError> {
    if state.cfg.tls.client_ca.is_none() {
        return Ok(());
    }
    match ext.get::<PeerCert>() {
        Some(PeerCert(Some(_))) => Ok(()),
        _ => Err(refuse_cert(state, CertRefusal::Missing, "-")),
    }
}

fn refuse_cert(state: &State, e: CertRefusal, backend: &str) -> RelayError {
    state.metrics.client_cert_refusal(e.reason());
    // Own keys in the line limiter: a flood of bad tokens must not hide
    // certificate refusals, nor the other way round.
    let key = match e {
        CertRefusal::Missing => "client_cert_missing",
        CertRefusal::WrongName => "client_cert_wrong_name",
    };
    if state.refusal_log.check(key, log_suppressed) == Verdict::Log {
        tracing::info!(reason = e.reason(), backend, error = %e, "client certificate refused");
    }
    RelayError::ClientCert(e)
}

/// A name may have at most `limits.max_tunnels_per_backend` open v2
/// connections; checked before the upgrade, so connections opened at the
/// same instant may pass it by a few.
pub fn tunnel_room(state: &State, backend: &str) -> Result<(), RelayError> {
    let max = state.cfg.limits.max_tunnels_per_backend;
    if state.broker.tunnels_of(backend) < max {
        Ok(())
    } else {
        Err(RelayError::TooManyTunnels(max))
    }
}

/// A relay-client may bring a new name only while fewer than
/// `limits.max_backends` are known. Checked, then registered by the poll
/// or tunnel: first polls of new names at the same instant may pass it
/// by a few, which a bound on memory tolerates.
pub fn backend_room(state: &State, backend: &str) -> Result<(), RelayError> {
    let max = state.cfg.limits.max_backends;
    if state.broker.knows_backend(backend) || state.broker.backend_count() < max {
        Ok(())
    } else {
        Err(RelayError::TooManyBackends(max))
    }
}
