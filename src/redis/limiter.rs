//! Request-rate limits that hold for the sum of all replicas: one GCRA script call on Redis per
//! request, and the in-process limiter of [`crate::limits`] whenever Redis is absent or down.

use std::time::{Duration, Instant};

use crate::limits::{Limits, Rejection};

use super::Redis;

/// Generic cell rate algorithm, one key per scope holding its theoretical arrival time (TAT) in
/// microseconds of the Redis server's clock, so that replicas' clocks do not matter. A burst of
/// up to one minute's worth is admitted, then one request per interval: the same shape as the
/// in-process token bucket. All scopes of a request are checked before any is charged, so a
/// request refused by one scope costs nothing in the others. Returns `{0, 0}` when admitted,
/// else `{i, micros}`: the 1-based scope that refused and when it would admit.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local period = tonumber(ARGV[1])
local next_tat = {}
for i, key in ipairs(KEYS) do
  local tat = now
  local stored = redis.call('GET', key)
  if stored then
    tat = math.max(tonumber(stored) or now, now)
  end
  next_tat[i] = tat + tonumber(ARGV[i + 1])
  local wait = next_tat[i] - period - now
  if wait > 0 then
    return {i, math.ceil(wait)}
  end
end
for i, key in ipairs(KEYS) do
  local ttl = math.ceil((next_tat[i] - now) / 1000) + 1
  redis.call('SET', key, string.format('%.0f', next_tat[i]), 'PX', ttl)
end
return {0, 0}
";

/// The window a limit's burst is measured over.
const PERIOD_MICROS: f64 = 60_000_000.0;

/// A request over a scope's `requests_per_minute`.
#[derive(Debug, Clone, PartialEq)]
pub struct RateRejection {
    /// The scope that refused, as given to [`SharedLimiter::admit_all`].
    pub scope: String,
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
    /// Admits one request of `scope` against `per_minute`: [`SharedLimiter::admit_all`] with one
    /// scope.
    pub async fn admit(
        &self,
        redis: Option<&Redis>,
        scope: &str,
        per_minute: u32,
    ) -> Result<(), RateRejection> {
        self.admit_all(redis, &[(scope, per_minute)]).await
    }

    /// Admits one request into every `(scope, per_minute)` (such as the route's and the token's;
    /// only a hash of the scope reaches Redis), counted across every replica sharing `redis`, in
    /// one atomic script call. With no Redis, or with Redis down or slower than `op_timeout`,
    /// this replica counts on its own.
    pub async fn admit_all(
        &self,
        redis: Option<&Redis>,
        scopes: &[(&str, u32)],
    ) -> Result<(), RateRejection> {
        if scopes.is_empty() {
            return Ok(());
        }
        if let Some(redis) = redis {
            let mut invocation = self.script.prepare_invoke();
            invocation.arg(PERIOD_MICROS);
            for (scope, per_minute) in scopes {
                invocation.key(redis.key("rate", super::hashed(&[scope.as_bytes()])));
                invocation.arg(PERIOD_MICROS / f64::from((*per_minute).max(1)));
            }
            let invocation = &invocation;
            let answer = redis
                .call(super::op::RATE_LIMIT, |mut connection| async move {
                    invocation
                        .invoke_async::<(usize, i64)>(&mut connection)
                        .await
                })
                .await;
            if let Some((refused_by, wait)) = answer {
                let Some((scope, per_minute)) =
                    refused_by.checked_sub(1).and_then(|i| scopes.get(i))
                else {
                    return Ok(());
                };
                return Err(RateRejection {
                    scope: (*scope).to_owned(),
                    per_minute: *per_minute,
                    retry_after: Duration::from_micros(u64::try_from(wait).unwrap_or(0)),
                });
            }
        }
        scopes
            .iter()
            .try_for_each(|(scope, per_minute)| self.admit_locally(scope, *per_minute))
    }

    fn admit_locally(&self, scope: &str, per_minute: u32) -> Result<(), RateRejection> {
        match self
            .local
            .admit(scope, None, Some(per_minute.max(1)), Instant::now())
        {
            Err(Rejection::Rate {
                per_minute,
                retry_after,
            }) => Err(RateRejection {
                scope: scope.to_owned(),
                per_minute,
                retry_after,
            }),
            // No concurrency limit was asked for, so only a rate rejection can come back.
            Ok(_) | Err(Rejection::Concurrency { .. }) => Ok(()),
        }
    }
}
