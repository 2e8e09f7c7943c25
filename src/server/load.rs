//! What the server holds for requests, bounded: requests per backend
//! (`limits.max_requests_per_backend`) and the bytes of request bodies the
//! v1 path buffers whole (`limits.max_buffered_bytes`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::RelayError;
use crate::lock;

/// Requests per backend, in flight or waiting for a relay-client.
#[derive(Debug)]
pub struct BackendLoad {
    max: usize,
    counts: Mutex<HashMap<String, usize>>,
}

/// One admitted request; leaves on drop.
#[derive(Debug)]
pub struct Admitted {
    load: Arc<BackendLoad>,
    backend: String,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut counts = lock(&self.load.counts);
        if let Some(n) = counts.get_mut(&self.backend) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.backend);
            }
        }
    }
}

/// A request's admission, shared: the task of an upgraded connection
/// keeps a clone until the connection ends (the response body, which
/// holds it otherwise, ends with the 101).
#[derive(Clone, Debug)]
pub struct Admission(#[allow(dead_code)] Arc<Admitted>);

impl Admission {
    pub fn new(admitted: Admitted) -> Self {
        Self(Arc::new(admitted))
    }
}

impl BackendLoad {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            counts: Mutex::new(HashMap::new()),
        })
    }

    /// Admits a request of `backend`, or refuses it (503) at the limit.
    pub fn admit(self: &Arc<Self>, backend: &str) -> Result<Admitted, RelayError> {
        let mut counts = lock(&self.counts);
        let n = counts.entry(backend.to_owned()).or_insert(0);
        if *n >= self.max {
            return Err(RelayError::BackendBusy(self.max));
        }
        *n += 1;
        Ok(Admitted {
            load: self.clone(),
            backend: backend.to_owned(),
        })
    }
}

/// Budget unit: permits count KiB, so that budgets beyond 4 GiB fit.
const UNIT: u64 = 1024;

/// The bytes all buffered v1 request bodies may take together.
#[derive(Debug)]
pub struct BodyBudget {
    permits: Arc<Semaphore>,
    /// How long a body waits for room before 503.
    wait: Duration,
}

/// Room taken in the budget; given back on drop.
#[derive(Debug, Default)]
pub struct Reserved(Option<OwnedSemaphorePermit>);

impl BodyBudget {
    pub fn new(bytes: u64, wait: Duration) -> Self {
        let units = usize::try_from(bytes.div_ceil(UNIT))
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Self {
            permits: Arc::new(Semaphore::new(units)),
            wait,
        }
    }

    /// Takes room for `bytes` more; returns the room taken, in bytes
    /// (whole units).
    async fn reserve(
        &self,
        bytes: u64,
        held: &mut Reserved,
        deadline: tokio::time::Instant,
    ) -> Result<u64, RelayError> {
        let units = u32::try_from(bytes.div_ceil(UNIT)).map_err(|_| RelayError::BufferFull)?;
        if units == 0 {
            return Ok(0);
        }
        let permit =
            tokio::time::timeout_at(deadline, self.permits.clone().acquire_many_owned(units))
                .await
                .map_err(|_| RelayError::BufferFull)?
                .map_err(|_| RelayError::BufferFull)?;
        match &mut held.0 {
            Some(p) => p.merge(permit),
            None => held.0 = Some(permit),
        }
        Ok(u64::from(units) * UNIT)
    }

    /// Reads a whole body of at most `limit` bytes (413 over it) within
    /// the budget. A declared length (already checked against `limit` by
    /// `refuse_declared_oversize`) is reserved at once, before reading,
    /// so concurrent uploads do not each hold a part and wait for the
    /// rest; a body of unknown length takes room as its bytes arrive. Room
    /// not found within the wait, counted once per request, is a 503.
    /// Room is held in whole units: a body sent in many small frames
    /// takes what its bytes need, not a unit per frame.
    pub async fn read<B>(
        &self,
        mut body: B,
        limit: u64,
        declared: Option<u64>,
    ) -> Result<(Bytes, Reserved), RelayError>
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let deadline = crate::clock::from_now(self.wait);
        let mut held = Reserved::default();
        let mut room = 0u64;
        if let Some(n) = declared {
            room = self.reserve(n, &mut held, deadline).await?;
        }
        let capacity = declared.and_then(|n| usize::try_from(n).ok()).unwrap_or(0);
        let mut buf = BytesMut::with_capacity(capacity);
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| RelayError::ReadBody(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let len = buf.len() as u64 + data.len() as u64;
            if len > limit {
                return Err(RelayError::BodyTooLarge(limit));
            }
            if len > room {
                room += self.reserve(len - room, &mut held, deadline).await?;
            }
            buf.extend_from_slice(&data);
        }
        Ok((buf.freeze(), held))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_backend_has_its_own_count() {
        let load = BackendLoad::new(2);
        let a1 = load.admit("a").unwrap();
        let _a2 = load.admit("a").unwrap();
        assert!(matches!(load.admit("a"), Err(RelayError::BackendBusy(2))));
        let _b = load.admit("b").unwrap();
        drop(a1);
        let _a3 = load.admit("a").unwrap();
        assert!(matches!(load.admit("a"), Err(RelayError::BackendBusy(2))));
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_waits_briefly_then_refuses() {
        let budget = BodyBudget::new(10 * UNIT, Duration::from_secs(2));
        let soon = || crate::clock::from_now(Duration::from_secs(2));
        let mut first = Reserved::default();
        budget.reserve(8 * 1024, &mut first, soon()).await.unwrap();
        let mut second = Reserved::default();
        let started = tokio::time::Instant::now();
        assert!(matches!(
            budget.reserve(4 * 1024, &mut second, soon()).await,
            Err(RelayError::BufferFull)
        ));
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        drop(first);
        budget.reserve(4 * 1024, &mut second, soon()).await.unwrap();
        budget.reserve(4 * 1024, &mut second, soon()).await.unwrap();
        assert_eq!(budget.permits.available_permits(), 2);
        drop(second);
        assert_eq!(budget.permits.available_permits(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_of_small_frames_takes_the_room_of_its_bytes() {
        use http_body_util::StreamBody;
        // 3,000 one-byte frames need 3 units, not one per frame.
        let budget = BodyBudget::new(10 * UNIT, Duration::from_secs(2));
        let frames = (0..3000).map(|_| {
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from_static(b"x")))
        });
        let body = StreamBody::new(futures_util::stream::iter(frames));
        let (bytes, held) = budget.read(body, 1 << 20, None).await.unwrap();
        assert_eq!(bytes.len(), 3000);
        assert_eq!(budget.permits.available_permits(), 7);
        drop(held);
        assert_eq!(budget.permits.available_permits(), 10);
    }
}
