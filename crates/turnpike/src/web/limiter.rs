//! Per-IP admission for the ICE page's credentials: at most N per window
//! for each address, in a table of bounded size.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Addresses tracked at once. Past this, with no expired entry to drop,
/// new addresses are refused until the window passes: a flood from many
/// addresses costs memory no more than this.
const MAX_TRACKED: usize = 16_384;

/// A fixed window per address.
pub struct PerIpLimiter {
    per_window: u32,
    window: Duration,
    seen: HashMap<IpAddr, (Instant, u32)>,
}

impl PerIpLimiter {
    /// `per_window` admissions per `window` for each address.
    pub fn new(per_window: u32, window: Duration) -> Self {
        PerIpLimiter {
            per_window,
            window,
            seen: HashMap::new(),
        }
    }

    /// Admits one more from `ip` now, or says how long until it may ask.
    pub fn allow(&mut self, ip: IpAddr) -> Result<(), Duration> {
        self.allow_at(ip, Instant::now())
    }

    fn allow_at(&mut self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        if !self.seen.contains_key(&ip) && self.seen.len() >= MAX_TRACKED {
            let window = self.window;
            self.seen
                .retain(|_, (start, _)| now.duration_since(*start) < window);
            if self.seen.len() >= MAX_TRACKED {
                return Err(window);
            }
        }
        let e = self.seen.entry(ip).or_insert((now, 0));
        if now.duration_since(e.0) >= self.window {
            *e = (now, 0);
        }
        if e.1 >= self.per_window {
            return Err(self.window.saturating_sub(now.duration_since(e.0)));
        }
        e.1 += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_gets_its_share_per_window() {
        let mut l = PerIpLimiter::new(2, Duration::from_secs(60));
        let t = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(l.allow_at(a, t).is_ok());
        assert!(l.allow_at(a, t).is_ok());
        let wait = l.allow_at(a, t + Duration::from_secs(20)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(40));
        assert!(l.allow_at(b, t).is_ok(), "another address is not held back");
        assert!(l.allow_at(a, t + Duration::from_secs(60)).is_ok(), "a new window");
    }

    #[test]
    fn the_table_stays_bounded() {
        let mut l = PerIpLimiter::new(1, Duration::from_secs(60));
        let t = Instant::now();
        for i in 0..MAX_TRACKED as u32 {
            assert!(l.allow_at(IpAddr::from(i.to_be_bytes()), t).is_ok());
        }
        let late: IpAddr = "203.0.113.9".parse().unwrap();
        assert!(l.allow_at(late, t).is_err(), "full: a new address waits");
        assert!(
            l.allow_at(late, t + Duration::from_secs(61)).is_ok(),
            "expired entries make room"
        );
        assert!(l.seen.len() <= MAX_TRACKED);
    }
}
