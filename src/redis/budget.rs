//! Spend budgets per token and per route, per UTC day and UTC month, from each answer's
//! `usage.cost`: held in Redis (shared, kept across restarts) or counted per replica without it;
//! while Redis is down, the last spend read from it plus what this replica spent since.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use crate::config::BudgetConfig;

use super::Redis;

/// Whose spend a budget limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BudgetScope {
    Token,
    Route,
}

impl BudgetScope {
    /// The `scope` label value.
    pub fn label(self) -> &'static str {
        match self {
            BudgetScope::Token => "token",
            BudgetScope::Route => "route",
        }
    }
}

/// The UTC calendar period a budget covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Period {
    Day,
    Month,
}

impl Period {
    /// The `period` label value.
    pub fn label(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Month => "month",
        }
    }

    /// The period holding `now`: its stamp (`2025-01-31`, `2025-01`) and when the next begins.
    fn window(self, now: SystemTime) -> (String, SystemTime) {
        let text = humantime::format_rfc3339_seconds(now).to_string();
        let fallback = now + Duration::from_secs(86_400);
        let start_of = |date: &str| humantime::parse_rfc3339(&format!("{date}T00:00:00Z")).ok();
        match self {
            Period::Day => {
                let date = text.get(..10).unwrap_or_default().to_owned();
                let end =
                    start_of(&date).map_or(fallback, |start| start + Duration::from_secs(86_400));
                (date, end)
            }
            Period::Month => {
                let year: u32 = text.get(..4).and_then(|y| y.parse().ok()).unwrap_or(1970);
                let month: u32 = text.get(5..7).and_then(|m| m.parse().ok()).unwrap_or(1);
                let next = if month >= 12 {
                    (year + 1, 1)
                } else {
                    (year, month + 1)
                };
                let end = start_of(&format!("{:04}-{:02}-01", next.0, next.1)).unwrap_or(fallback);
                (format!("{year:04}-{month:02}"), end)
            }
        }
    }
}

/// A request refused because its token or route has spent its budget for the period. The
/// pipeline answers it with 429 and `code: "budget_exceeded"`.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetExceeded {
    pub scope: BudgetScope,
    pub name: String,
    pub period: Period,
    pub budget_usd: f64,
    pub spent_usd: f64,
    /// When the period ends and spending starts again from zero.
    pub resets_at: SystemTime,
}

impl BudgetExceeded {
    /// Time until the reset, for `Retry-After`.
    pub fn retry_after(&self) -> Duration {
        self.resets_at
            .duration_since(SystemTime::now())
            .unwrap_or_default()
    }

    /// The reset as RFC 3339 UTC, e.g. `2025-02-01T00:00:00Z`.
    pub fn resets_at_rfc3339(&self) -> String {
        humantime::format_rfc3339_seconds(self.resets_at).to_string()
    }

    /// The error message for the client: the budget, the spend and when it resets.
    pub fn message(&self) -> String {
        let period = match self.period {
            Period::Day => "daily",
            Period::Month => "monthly",
        };
        format!(
            "Budget exceeded: {} \"{}\" has spent {:.4} USD of its {period} budget of {} USD; it resets at {}.",
            self.scope.label(),
            self.name,
            self.spent_usd,
            usd(self.budget_usd),
            self.resets_at_rfc3339()
        )
    }
}

/// An amount in USD with cents, and with as many more digits as a budget below a cent needs
/// (`0.0004`, not `0.00`).
fn usd(amount: f64) -> String {
    let cents = format!("{amount:.2}");
    if cents.parse::<f64>().is_ok_and(|rounded| rounded == amount) {
        cents
    } else {
        amount.to_string()
    }
}

/// The spend of one scope, name and period, as this replica knows it.
#[derive(Debug, Default)]
struct Tally {
    stamp: String,
    /// The total last read from (or written to) Redis.
    known: f64,
    /// Spent by this replica and not yet in Redis (all of it, without Redis).
    pending: f64,
}

impl Tally {
    /// Starts over when a new period has begun.
    fn roll(&mut self, stamp: &str) -> &mut Tally {
        if self.stamp != stamp {
            *self = Tally {
                stamp: stamp.to_owned(),
                ..Tally::default()
            };
        }
        self
    }
}

type TallyKey = (BudgetScope, String, Period);

/// Budgets for every token and route; keep one for the life of the process (spend not yet in
/// Redis must outlive config reloads).
#[derive(Debug, Default)]
pub struct Budgets {
    tallies: Mutex<HashMap<TallyKey, Tally>>,
}

const PERIODS: [Period; 2] = [Period::Day, Period::Month];

/// Keys outlive their period by this much, then Redis drops them.
const KEY_GRACE: Duration = Duration::from_secs(3600);

impl Budgets {
    /// Before a request: refuses it when `scope` `name` has already spent `budget` for the
    /// current day or month. One Redis round trip (bounded by `op_timeout`) when Redis is up.
    pub async fn check(
        &self,
        redis: Option<&Redis>,
        scope: BudgetScope,
        name: &str,
        budget: &BudgetConfig,
    ) -> Result<(), BudgetExceeded> {
        let limits: Vec<(Period, f64)> = [
            (Period::Day, budget.usd_per_day),
            (Period::Month, budget.usd_per_month),
        ]
        .into_iter()
        .filter_map(|(period, usd)| Some((period, usd?)))
        .collect();
        if limits.is_empty() {
            return Ok(());
        }
        let now = SystemTime::now();
        let windows: Vec<(String, SystemTime)> = limits
            .iter()
            .map(|(period, _)| period.window(now))
            .collect();
        let read = match redis {
            Some(redis) => {
                let keys: Vec<String> = limits
                    .iter()
                    .zip(&windows)
                    .map(|((period, _), (stamp, _))| key(redis, scope, name, *period, stamp))
                    .collect();
                let keys = &keys;
                redis
                    .call(super::op::BUDGET_CHECK, |mut connection| async move {
                        ::redis::cmd("MGET")
                            .arg(keys)
                            .query_async::<Vec<Option<f64>>>(&mut connection)
                            .await
                    })
                    .await
            }
            None => None,
        };
        let mut tallies = self.tallies.lock().unwrap_or_else(PoisonError::into_inner);
        for (at, ((period, usd), (stamp, resets_at))) in limits.iter().zip(&windows).enumerate() {
            let tally = tallies
                .entry((scope, name.to_owned(), *period))
                .or_default()
                .roll(stamp);
            if let Some(values) = &read {
                tally.known = values.get(at).copied().flatten().unwrap_or(0.0);
            }
            let spent = tally.known + tally.pending;
            publish(scope, name, *period, spent);
            if spent >= *usd {
                return Err(BudgetExceeded {
                    scope,
                    name: name.to_owned(),
                    period: *period,
                    budget_usd: *usd,
                    spent_usd: spent,
                    resets_at: *resets_at,
                });
            }
        }
        Ok(())
    }

    /// After an answer: adds its `usage.cost` to the day and the month of `scope` `name`, in
    /// Redis when it is up (one atomic round trip, bounded by `op_timeout`, which also carries
    /// what this replica spent while Redis was down), else on this replica. Call it for scopes
    /// that have a budget, once the cost is known (a stream's last usage event included).
    pub async fn record(
        &self,
        redis: Option<&Redis>,
        scope: BudgetScope,
        name: &str,
        cost_usd: f64,
    ) {
        if !cost_usd.is_finite() || cost_usd <= 0.0 {
            return;
        }
        let now = SystemTime::now();
        let windows = PERIODS.map(|period| period.window(now));
        // What each period adds: this answer and whatever had not reached Redis yet.
        let adds = {
            let mut tallies = self.tallies.lock().unwrap_or_else(PoisonError::into_inner);
            PERIODS
                .iter()
                .zip(&windows)
                .map(|(period, (stamp, _))| {
                    let tally = tallies
                        .entry((scope, name.to_owned(), *period))
                        .or_default()
                        .roll(stamp);
                    cost_usd + std::mem::take(&mut tally.pending)
                })
                .collect::<Vec<f64>>()
        };
        let written = match redis {
            Some(redis) => {
                let mut pipe = ::redis::pipe();
                pipe.atomic();
                for ((period, (stamp, end)), add) in PERIODS.iter().zip(&windows).zip(&adds) {
                    let expires = (*end + KEY_GRACE)
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    let key = key(redis, scope, name, *period, stamp);
                    pipe.cmd("INCRBYFLOAT").arg(&key).arg(*add);
                    pipe.cmd("EXPIREAT").arg(&key).arg(expires).ignore();
                }
                let pipe = &pipe;
                redis
                    .call(super::op::BUDGET_RECORD, |mut connection| async move {
                        pipe.query_async::<Vec<f64>>(&mut connection).await
                    })
                    .await
            }
            None => None,
        };
        let mut tallies = self.tallies.lock().unwrap_or_else(PoisonError::into_inner);
        for (at, (period, (stamp, _))) in PERIODS.iter().zip(&windows).enumerate() {
            let tally = tallies
                .entry((scope, name.to_owned(), *period))
                .or_default()
                .roll(stamp);
            match written.as_ref().and_then(|totals| totals.get(at)) {
                Some(total) => tally.known = *total,
                None => tally.pending += adds[at],
            }
            publish(scope, name, *period, tally.known + tally.pending);
        }
    }
}

/// `key_prefix` + `budget-day` / `budget-month` + the hash of scope, name and period stamp.
fn key(redis: &Redis, scope: BudgetScope, name: &str, period: Period, stamp: &str) -> String {
    let id = super::hashed(&[scope.label().as_bytes(), name.as_bytes(), stamp.as_bytes()]);
    let kind = match period {
        Period::Day => "budget-day",
        Period::Month => "budget-month",
    };
    redis.key(kind, id)
}

fn publish(scope: BudgetScope, name: &str, period: Period, spent: f64) {
    metrics::gauge!(
        super::BUDGET_SPENT,
        "scope" => scope.label(),
        "name" => name.to_owned(),
        "period" => period.label()
    )
    .set(spent);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> SystemTime {
        humantime::parse_rfc3339(text).unwrap()
    }

    #[test]
    fn periods_are_utc_days_and_months() {
        let (stamp, end) = Period::Day.window(at("2024-02-29T23:59:59Z"));
        assert_eq!(stamp, "2024-02-29");
        assert_eq!(end, at("2024-03-01T00:00:00Z"));
        let (stamp, end) = Period::Month.window(at("2024-12-31T10:00:00Z"));
        assert_eq!(stamp, "2024-12");
        assert_eq!(end, at("2025-01-01T00:00:00Z"));
        let (stamp, end) = Period::Month.window(at("2025-01-01T00:00:00Z"));
        assert_eq!(stamp, "2025-01");
        assert_eq!(end, at("2025-02-01T00:00:00Z"));
    }

    #[test]
    fn budgets_below_a_cent_keep_their_digits() {
        assert_eq!(usd(1.0), "1.00");
        assert_eq!(usd(50.5), "50.50");
        assert_eq!(usd(0.0004), "0.0004");
        assert_eq!(usd(12.345), "12.345");
    }

    #[tokio::test]
    async fn without_redis_spend_counts_on_this_replica() {
        let budgets = Budgets::default();
        let budget = BudgetConfig {
            usd_per_day: Some(1.0),
            usd_per_month: Some(100.0),
        };
        assert!(budgets
            .check(None, BudgetScope::Token, "t", &budget)
            .await
            .is_ok());
        budgets.record(None, BudgetScope::Token, "t", 0.6).await;
        assert!(budgets
            .check(None, BudgetScope::Token, "t", &budget)
            .await
            .is_ok());
        budgets.record(None, BudgetScope::Token, "t", 0.4).await;
        let refused = budgets
            .check(None, BudgetScope::Token, "t", &budget)
            .await
            .unwrap_err();
        assert_eq!(refused.period, Period::Day);
        assert!((refused.spent_usd - 1.0).abs() < 1e-9);
        assert!(
            refused.message().contains("daily budget of 1.00 USD"),
            "{}",
            refused.message()
        );
        assert!(
            budgets
                .check(None, BudgetScope::Route, "t", &budget)
                .await
                .is_ok(),
            "scopes are apart"
        );
    }
}
