//! Passive health of models: failures in a row put a model in a cool-down, during which requests
//! skip it; after the cool-down one probe request decides whether it is back.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// When a model counts as unhealthy and for how long.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub failures: u32,
    /// Zero turns passive health off.
    pub cooldown: Duration,
}

#[derive(Debug, Default)]
struct ModelState {
    failures: u32,
    cooling_until: Option<Instant>,
    /// A probe is in flight since this instant; others keep skipping the model meanwhile.
    probe_since: Option<Instant>,
}

/// Health of every (upstream, model) seen failing; shared across reloads.
#[derive(Debug, Default)]
pub struct Health {
    /// Upstream name -> model -> state.
    models: Mutex<HashMap<String, HashMap<String, ModelState>>>,
}

/// A model on an upstream: what passive health is kept for.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub upstream: &'a str,
    pub model: &'a str,
}

impl Health {
    /// Whether a request should skip `model` now. After the cool-down, the first caller gets
    /// `false` and becomes the probe; a probe that never reports back is replaced after another
    /// cool-down.
    pub fn should_skip(&self, target: Target<'_>, now: Instant, policy: Policy) -> bool {
        if policy.cooldown.is_zero() {
            return false;
        }
        let Ok(mut models) = self.models.lock() else {
            return false;
        };
        let Some(state) = models
            .get_mut(target.upstream)
            .and_then(|m| m.get_mut(target.model))
        else {
            return false;
        };
        match state.cooling_until {
            None => false,
            Some(until) if now < until => true,
            Some(_) => match state.probe_since {
                Some(since) if now < since + policy.cooldown => true,
                _ => {
                    state.probe_since = Some(now);
                    false
                }
            },
        }
    }

    pub fn record_success(&self, target: Target<'_>) {
        let Ok(mut models) = self.models.lock() else {
            return;
        };
        let removed = models
            .get_mut(target.upstream)
            .and_then(|m| m.remove(target.model));
        if removed.is_some_and(|state| state.cooling_until.is_some()) {
            let (upstream, model) = (target.upstream, target.model);
            tracing::info!(upstream, model, "model answered again: cool-down over");
            crate::record::metrics::cooldown(upstream, model, false);
        }
    }

    pub fn record_failure(&self, target: Target<'_>, now: Instant, policy: Policy) {
        if policy.cooldown.is_zero() {
            return;
        }
        let Ok(mut models) = self.models.lock() else {
            return;
        };
        let (upstream, model) = (target.upstream, target.model);
        let state = models
            .entry(upstream.to_owned())
            .or_default()
            .entry(model.to_owned())
            .or_default();
        state.failures += 1;
        let failed_probe = state.probe_since.take().is_some();
        if failed_probe || state.failures >= policy.failures {
            if state.cooling_until.is_none() {
                crate::record::metrics::cooldown(upstream, model, true);
            }
            state.cooling_until = Some(now + policy.cooldown);
            tracing::warn!(upstream, model, failures = state.failures, cooldown = ?policy.cooldown, "model cooling down");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(model: &str) -> Target<'_> {
        Target {
            upstream: "default",
            model,
        }
    }

    const POLICY: Policy = Policy {
        failures: 2,
        cooldown: Duration::from_secs(30),
    };

    #[test]
    fn cools_down_then_probes_once() {
        let health = Health::default();
        let t0 = Instant::now();
        health.record_failure(t("m"), t0, POLICY);
        assert!(
            !health.should_skip(t("m"), t0, POLICY),
            "one failure is not enough"
        );
        health.record_failure(t("m"), t0, POLICY);
        assert!(health.should_skip(t("m"), t0 + Duration::from_secs(29), POLICY));
        let later = t0 + Duration::from_secs(31);
        assert!(
            !health.should_skip(t("m"), later, POLICY),
            "the first caller probes"
        );
        assert!(
            health.should_skip(t("m"), later, POLICY),
            "others wait for the probe"
        );
        health.record_failure(t("m"), later, POLICY);
        assert!(
            health.should_skip(t("m"), later + Duration::from_secs(1), POLICY),
            "failed probe"
        );
        let again = later + Duration::from_secs(31);
        assert!(!health.should_skip(t("m"), again, POLICY));
        health.record_success(t("m"));
        assert!(!health.should_skip(t("m"), again, POLICY));
        assert!(
            !health.should_skip(t("m"), again, POLICY),
            "healthy again: no more probing"
        );
    }

    #[test]
    fn success_resets_the_count_and_zero_cooldown_disables() {
        let health = Health::default();
        let now = Instant::now();
        health.record_failure(t("m"), now, POLICY);
        health.record_success(t("m"));
        health.record_failure(t("m"), now, POLICY);
        assert!(!health.should_skip(t("m"), now, POLICY));
        let off = Policy {
            failures: 1,
            cooldown: Duration::ZERO,
        };
        health.record_failure(t("x"), now, off);
        assert!(!health.should_skip(t("x"), now, off));
    }
}
