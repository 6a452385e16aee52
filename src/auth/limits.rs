//! Rate limits on the endpoints that guess passwords or send mail (sign-in, signup, recover,
//! otp): a token bucket per client IP and one per account (email), both in memory on each
//! node. A rejected attempt answers 429 with `retry-after`.
//!
//! IPv6 clients are counted by their /64: one host is routinely given a whole /64, so keying
//! on the full address would give an attacker 2^64 buckets. An account bucket exists only
//! for a valid, normalised email (at most 254 bytes): a request naming anything else is
//! counted per IP alone, so junk "emails" cannot park memory or pose as many accounts.

use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::RateLimitConfig;
use crate::error::ApiError;

/// The per-IP bucket a client address counts against: IPv4 addresses (also when they arrive
/// IPv4-mapped on a dual-stack listener) by themselves, IPv6 addresses by their /64.
pub fn ip_bucket(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
    }
}

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

    /// Counts one attempt from `ip` (and for `account` when the request names a valid
    /// email). The IP is checked first, so a client over its limit adds no account bucket.
    pub fn check(&self, ip: IpAddr, account: Option<&str>) -> Result<(), ApiError> {
        let clock = DefaultClock::default();
        if let Some(limiter) = &self.per_ip {
            if let Err(not_until) = limiter.check_key(&ip_bucket(ip)) {
                let wait = not_until.wait_time_from(clock.now());
                return Err(ApiError::RateLimited {
                    retry_after_secs: wait.as_secs() + 1,
                });
            }
        }
        let account = account.and_then(|a| super::normalize_email(a).ok());
        if let (Some(limiter), Some(account)) = (&self.per_account, account) {
            if let Err(not_until) = limiter.check_key(&account) {
                let wait = not_until.wait_time_from(clock.now());
                return Err(ApiError::RateLimited {
                    retry_after_secs: wait.as_secs() + 1,
                });
            }
        }
        Ok(())
    }

    /// How many account buckets are held right now (what the per-account limit costs in
    /// memory).
    pub fn tracked_accounts(&self) -> usize {
        self.per_account.as_ref().map_or(0, |l| l.len())
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

#[cfg(test)]
mod tests {
    use super::ip_bucket;
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an address")
    }

    #[test]
    fn ipv6_clients_in_one_slash_64_share_a_bucket() {
        assert_eq!(
            ip_bucket(ip("2001:db8:1:2:aaaa::1")),
            ip_bucket(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"))
        );
        assert_eq!(ip_bucket(ip("2001:db8:1:2::9")), ip("2001:db8:1:2::"));
        assert_ne!(
            ip_bucket(ip("2001:db8:1:2::1")),
            ip_bucket(ip("2001:db8:1:3::1"))
        );
    }

    #[test]
    fn ipv4_clients_keep_one_bucket_each_even_when_mapped_into_ipv6() {
        assert_eq!(ip_bucket(ip("203.0.113.7")), ip("203.0.113.7"));
        assert_eq!(ip_bucket(ip("::ffff:203.0.113.7")), ip("203.0.113.7"));
        assert_ne!(
            ip_bucket(ip("::ffff:203.0.113.7")),
            ip_bucket(ip("::ffff:203.0.113.8"))
        );
    }
}
