//! Rate limits on the endpoints that guess passwords or send mail (sign-in, signup, recover,
//! otp): a token bucket per client IP and one per account (email), both in memory on each
//! node. A rejected attempt answers 429 with `retry-after`.

use std::net::IpAddr;
use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::RateLimitConfig;
use crate::error::ApiError;

pub struct AuthRateLimits {
    per_ip: Option<DefaultKeyedRateLimiter<IpAddr>>,
    per_account: Option<DefaultKeyedRateLimiter<String>>,
}

fn per_minute(n: u32) -> Option<Quota> {
    NonZeroU32::new(n).map(Quota::per_minute)
}

impl AuthRateLimits {
    pub fn new(config: &RateLimitConfig) -> Self {
        if !config.enabled {
            return AuthRateLimits {
                per_ip: None,
                per_account: None,
            };
        }
        AuthRateLimits {
            per_ip: per_minute(config.auth_per_ip_per_minute).map(RateLimiter::keyed),
            per_account: per_minute(config.auth_per_account_per_minute).map(RateLimiter::keyed),
        }
    }

    /// Counts one attempt from `ip` (and for `account` when the request names one).
    pub fn check(&self, ip: IpAddr, account: Option<&str>) -> Result<(), ApiError> {
        let clock = DefaultClock::default();
        if let Some(limiter) = &self.per_ip {
            if let Err(not_until) = limiter.check_key(&ip) {
                let wait = not_until.wait_time_from(clock.now());
                return Err(ApiError::RateLimited {
                    retry_after_secs: wait.as_secs() + 1,
                });
            }
        }
        if let (Some(limiter), Some(account)) = (&self.per_account, account) {
            if let Err(not_until) = limiter.check_key(&account.trim().to_lowercase()) {
                let wait = not_until.wait_time_from(clock.now());
                return Err(ApiError::RateLimited {
                    retry_after_secs: wait.as_secs() + 1,
                });
            }
        }
        Ok(())
    }

    /// Drops the state of keys that are back to a full bucket; run periodically so memory
    /// does not grow with the number of distinct IPs seen.
    pub fn shrink(&self) {
        if let Some(l) = &self.per_ip {
            l.retain_recent();
            l.shrink_to_fit();
        }
        if let Some(l) = &self.per_account {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}
