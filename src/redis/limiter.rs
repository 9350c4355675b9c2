//! Request-rate limits that hold for the sum of all replicas: one GCRA script call on Redis per
//! request, and the in-process limiter of [`crate::limits`] whenever Redis is absent or down.

use std::time::{Duration, Instant};

use crate::limits::{Limits, Rejection};

use super::Redis;

/// Generic cell rate algorithm on one key holding the theoretical arrival time (TAT), in
/// microseconds of the Redis server's clock, so that replicas' clocks do not matter. A burst of
/// up to one minute's worth is admitted, then one request per `interval`: the same shape as the
/// in-process token bucket. Returns 0 when admitted, else the microseconds until it would be.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local tat = now
local stored = redis.call('GET', KEYS[1])
if stored then
  tat = math.max(tonumber(stored) or now, now)
end
local next_tat = tat + interval
local wait = next_tat - period - now
if wait > 0 then
  return math.ceil(wait)
end
redis.call('SET', KEYS[1], string.format('%.0f', next_tat), 'PX', math.ceil((next_tat - now) / 1000) + 1)
return 0
";

/// The window a limit's burst is measured over.
const PERIOD_MICROS: f64 = 60_000_000.0;

/// A request over its scope's `requests_per_minute`.
#[derive(Debug, Clone, PartialEq)]
pub struct RateRejection {
    pub per_minute: u32,
    /// When a request of this scope would next be admitted (`Retry-After`).
    pub retry_after: Duration,
}

/// Rate limits for every scope; keep one for the life of the process (its per-replica fallback
/// state must outlive config reloads, like [`Limits`]).
pub struct SharedLimiter {
    script: ::redis::Script,
    /// Per-replica counting while Redis is absent or unavailable. Its own instance: the
    /// concurrency limits in the pipeline's [`Limits`] keep their scopes to themselves.
    local: Limits,
}

impl Default for SharedLimiter {
    fn default() -> Self {
        SharedLimiter {
            script: ::redis::Script::new(GCRA),
            local: Limits::default(),
        }
    }
}

impl SharedLimiter {
    /// Admits one request of `scope` (such as `route:<name>` or `token:<name>`; only its hash
    /// reaches Redis) against `per_minute`, counted across every replica sharing `redis`. With no
    /// Redis, or with Redis down or slower than `op_timeout`, this replica counts on its own.
    pub async fn admit(
        &self,
        redis: Option<&Redis>,
        scope: &str,
        per_minute: u32,
    ) -> Result<(), RateRejection> {
        let per_minute = per_minute.max(1);
        if let Some(redis) = redis {
            let key = redis.key("rate", super::hashed(&[scope.as_bytes()]));
            let interval = PERIOD_MICROS / f64::from(per_minute);
            let mut invocation = self.script.key(key);
            invocation.arg(interval).arg(PERIOD_MICROS);
            let invocation = &invocation;
            let wait = redis
                .call(super::op::RATE_LIMIT, |mut connection| async move {
                    invocation.invoke_async::<i64>(&mut connection).await
                })
                .await;
            if let Some(wait) = wait {
                return match u64::try_from(wait) {
                    Ok(micros) if micros > 0 => Err(RateRejection {
                        per_minute,
                        retry_after: Duration::from_micros(micros),
                    }),
                    _ => Ok(()),
                };
            }
        }
        self.admit_locally(scope, per_minute)
    }

    fn admit_locally(&self, scope: &str, per_minute: u32) -> Result<(), RateRejection> {
        match self
            .local
            .admit(scope, None, Some(per_minute), Instant::now())
        {
            Err(Rejection::Rate {
                per_minute,
                retry_after,
            }) => Err(RateRejection {
                per_minute,
                retry_after,
            }),
            // No concurrency limit was asked for, so only a rate rejection can come back.
            Ok(_) | Err(Rejection::Concurrency { .. }) => Ok(()),
        }
    }
}
