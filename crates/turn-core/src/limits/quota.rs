//! Allocation quotas per user and in total (RFC 8656 §7.2: 486 and 508),
//! and the relayed addresses of every allocation on this host.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Why an allocation was refused by a quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum QuotaError {
    /// The user's allocation quota is reached (486).
    User,
    /// The server's total is reached (508).
    Total,
}

/// Allocation quotas shared by every worker. Touched only when allocations
/// are created or deleted, never per packet.
#[derive(Debug, Default)]
pub struct Quotas {
    user_limit: AtomicUsize,
    total_limit: AtomicUsize,
    total: AtomicUsize,
    per_user: Mutex<HashMap<Arc<str>, usize>>,
    /// Allocations other nodes of a fleet hold, per user, as last heard
    /// (empty without a fleet).
    elsewhere: Mutex<HashMap<String, usize>>,
    /// Their sum, and the fleet's total limit (0: none).
    elsewhere_total: AtomicUsize,
    fleet_limit: AtomicUsize,
}

impl Quotas {
    /// Limits; 0 means unlimited.
    pub fn new(user_limit: usize, total_limit: usize) -> Self {
        Quotas {
            user_limit: AtomicUsize::new(user_limit),
            total_limit: AtomicUsize::new(total_limit),
            ..Default::default()
        }
    }

    /// Changes the limits (reload); allocations already held stay.
    pub fn set_limits(&self, user_limit: usize, total_limit: usize) {
        self.user_limit.store(user_limit, Ordering::SeqCst);
        self.total_limit.store(total_limit, Ordering::SeqCst);
    }

    /// Takes one allocation for `user`.
    pub fn acquire(&self, user: &Arc<str>) -> Result<(), QuotaError> {
        let (user_limit, total_limit) = (
            self.user_limit.load(Ordering::SeqCst),
            self.total_limit.load(Ordering::SeqCst),
        );
        let prev = self.total.fetch_add(1, Ordering::SeqCst);
        let fleet_limit = self.fleet_limit.load(Ordering::SeqCst);
        let fleet_full =
            fleet_limit != 0 && prev + self.elsewhere_total.load(Ordering::SeqCst) >= fleet_limit;
        if (total_limit != 0 && prev >= total_limit) || fleet_full {
            self.total.fetch_sub(1, Ordering::SeqCst);
            return Err(QuotaError::Total);
        }
        let others = if user_limit != 0 {
            let e = self.elsewhere.lock().unwrap_or_else(|p| p.into_inner());
            e.get(&**user).copied().unwrap_or(0)
        } else {
            0
        };
        let mut m = self.per_user.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(user.clone()).or_insert(0);
        if user_limit != 0 && *n + others >= user_limit {
            if *n == 0 {
                m.remove(user);
            }
            self.total.fetch_sub(1, Ordering::SeqCst);
            return Err(QuotaError::User);
        }
        *n += 1;
        Ok(())
    }

    /// Counts an allocation that exists already (taken over from another
    /// process): never refused, even past a limit a reload lowered.
    pub fn adopt(&self, user: &Arc<str>) {
        self.total.fetch_add(1, Ordering::SeqCst);
        *self
            .per_user
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(user.clone())
            .or_insert(0) += 1;
    }

    /// Gives back one allocation of `user`.
    pub fn release(&self, user: &str) {
        self.total.fetch_sub(1, Ordering::SeqCst);
        let mut m = self.per_user.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(user) {
            *n -= 1;
            if *n == 0 {
                m.remove(user);
            }
        }
    }

    /// Allocations held across all workers.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }

    /// Allocations per user held here (what a fleet node tells the others).
    pub fn held_here(&self) -> Vec<(String, usize)> {
        let m = self.per_user.lock().unwrap_or_else(|p| p.into_inner());
        m.iter().map(|(u, n)| (u.to_string(), *n)).collect()
    }

    /// What the other nodes of a fleet hold, per user: counted against
    /// the user quota from now on (replacing what was heard before).
    pub fn set_elsewhere(&self, counts: HashMap<String, usize>) {
        self.elsewhere_total
            .store(counts.values().sum(), Ordering::SeqCst);
        *self.elsewhere.lock().unwrap_or_else(|p| p.into_inner()) = counts;
    }

    /// The fleet's total limit (0: none): allocations here and elsewhere
    /// together, refused with 508 past it.
    pub fn set_fleet_limit(&self, limit: usize) {
        self.fleet_limit.store(limit, Ordering::SeqCst);
    }

    /// Allocations `user` holds.
    pub fn of_user(&self, user: &str) -> usize {
        let m = self.per_user.lock().unwrap_or_else(|p| p.into_inner());
        m.get(user).copied().unwrap_or(0)
    }
}

/// The relayed addresses of every allocation on this host, shared by all
/// workers. A peer that is one of them is another client's relay on this
/// same server (both legs of a call through one server, or `turnpike probe`
/// against a fresh install): it is allowed even in a range the policy
/// refuses by default (a private or loopback relay address), since the
/// packet can only reach that allocation, which forwards it to its client
/// only with a permission. Written on allocation and deletion, read only
/// when the default ranges would refuse a peer: never on the relay path.
#[derive(Debug, Default)]
pub struct RelayedAddrs(std::sync::Mutex<std::collections::HashSet<std::net::SocketAddr>>);

impl RelayedAddrs {
    fn set(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<std::net::SocketAddr>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A relay socket of an allocation opened at `addr`.
    pub fn insert(&self, addr: std::net::SocketAddr) {
        self.set().insert(addr);
    }

    /// The relay socket at `addr` closed.
    pub fn remove(&self, addr: &std::net::SocketAddr) {
        self.set().remove(addr);
    }

    /// Whether `addr` is a live allocation's relayed address on this host.
    pub fn contains(&self, addr: &std::net::SocketAddr) -> bool {
        self.set().contains(addr)
    }
}
