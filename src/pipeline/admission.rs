//! Admission, once a request is planned: the route's and the caller's concurrency slots (per
//! replica), their request rates (across every replica sharing Redis), and, before anything goes
//! upstream, their spend budgets; and the hook that adds an answer's cost to those budgets.

use std::sync::Arc;
use std::time::Instant;

use crate::auth::Token;
use crate::config::BudgetConfig;
use crate::error::ProxyError;
use crate::limits::{Permit, Rejection};
use crate::record::RequestRecord;
use crate::redis::{BudgetScope, Budgets, Redis};
use crate::runtime::router::Route;

use super::Shared;

/// Takes a slot in the route's and the caller's concurrency limits, held until the answer ends,
/// then one request of their rates. Over a limit, the request is refused at once: load is shed
/// before it reaches streams already running.
pub(super) async fn admit(
    shared: &Shared,
    redis: Option<&Redis>,
    route: &Route,
    caller: Option<&Token>,
    permits: &mut Vec<Permit>,
) -> Result<(), ProxyError> {
    let now = Instant::now();
    let route = (
        &route.limit_scope,
        route.max_concurrent,
        route.requests_per_minute,
    );
    let token = caller.map(|t| (&t.limit_scope, t.max_concurrent, t.requests_per_minute));
    let scopes = [Some(route), token];
    for (scope, concurrent, _) in scopes.iter().flatten() {
        match shared.limits.admit(scope, *concurrent, None, now) {
            Ok(permit) => permits.extend(permit),
            Err(Rejection::Concurrency { limit }) => {
                return Err(ProxyError::Overloaded {
                    scope: scope.to_string(),
                    limit,
                });
            }
            Err(Rejection::Rate { .. }) => {}
        }
    }
    // At most two scopes: kept on the stack.
    let mut rates = [("", 0); 2];
    let mut count = 0;
    for (scope, _, per_minute) in scopes.iter().flatten() {
        if let Some(per_minute) = per_minute {
            rates[count] = (scope.as_str(), *per_minute);
            count += 1;
        }
    }
    let rates = &rates[..count];
    shared
        .limiter
        .admit_all(redis, rates)
        .await
        .map_err(|rejection| ProxyError::RateLimited {
            scope: rejection.scope,
            per_minute: rejection.per_minute,
            retry_after: rejection.retry_after,
        })
}

/// The budgets a request is counted against: its route's and its token's.
fn budgeted<'a>(
    route: &'a Route,
    caller: Option<&'a Token>,
) -> Vec<(BudgetScope, Arc<str>, &'a BudgetConfig)> {
    let route = route
        .budget
        .as_ref()
        .map(|b| (BudgetScope::Route, route.name.clone(), b));
    let token = caller.and_then(|t| Some((BudgetScope::Token, t.name.clone(), t.budget.as_ref()?)));
    route.into_iter().chain(token).collect()
}

/// Refuses a request whose route or token spent its budget for the day or the month; otherwise
/// arranges for the answer's cost to be added to them when the request is recorded.
pub(super) async fn check_budgets(
    shared: &Shared,
    redis: Option<&Redis>,
    route: &Route,
    caller: Option<&Token>,
    record: &mut RequestRecord,
) -> Result<(), ProxyError> {
    let budgeted = budgeted(route, caller);
    if budgeted.is_empty() {
        return Ok(());
    }
    for (scope, name, budget) in &budgeted {
        if let Err(exceeded) = shared.budgets.check(redis, *scope, name, budget).await {
            return Err(ProxyError::BudgetExceeded {
                message: exceeded.message(),
                retry_after: exceeded.retry_after(),
            });
        }
    }
    let scopes: Vec<(BudgetScope, Arc<str>)> = budgeted
        .into_iter()
        .map(|(scope, name, _)| (scope, name))
        .collect();
    let (budgets, redis) = (shared.budgets.clone(), redis.cloned());
    record.on_cost(Box::new(move |cost| spend(budgets, redis, scopes, cost)));
    Ok(())
}

/// Adds `cost` to each scope's spend, off the response path.
fn spend(
    budgets: Arc<Budgets>,
    redis: Option<Redis>,
    scopes: Vec<(BudgetScope, Arc<str>)>,
    cost: f64,
) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        for (scope, name) in scopes {
            budgets.record(redis.as_ref(), scope, &name, cost).await;
        }
    });
}
