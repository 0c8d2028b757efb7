//! `user_max_bps`: one user's token buckets, shared by every worker of the
//! host, so the cap holds per host whichever workers the user's
//! allocations landed on (the kernel spreads clients over workers by
//! their addresses and ports).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use super::Bucket;

/// The host's users with a live allocation, each with its buckets. The
/// book holds them weakly: a user's entry lives as long as one of its
/// allocations does. Written on allocation and deletion only.
#[derive(Debug, Default)]
pub struct UserBandwidth(Mutex<HashMap<Arc<str>, Weak<UserBuckets>>>);

/// One user's buckets: client to peers, peers to client. Each allocation
/// of the user holds one reference, so the count of references is the
/// count of the user's allocations on the host.
#[derive(Debug)]
pub struct UserBuckets {
    name: Arc<str>,
    directions: Mutex<[Bucket; 2]>,
}

impl UserBandwidth {
    fn book(&self) -> MutexGuard<'_, HashMap<Arc<str>, Weak<UserBuckets>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An allocation of `name` starts: its user's buckets, made on the
    /// user's first.
    pub fn join(&self, name: &Arc<str>) -> Arc<UserBuckets> {
        let mut book = self.book();
        if let Some(b) = book.get(name).and_then(Weak::upgrade) {
            return b;
        }
        let b = Arc::new(UserBuckets {
            name: name.clone(),
            directions: Mutex::new([Bucket::new(), Bucket::new()]),
        });
        book.insert(name.clone(), Arc::downgrade(&b));
        b
    }

    /// An allocation ends: its reference goes, and the user's entry with
    /// the last one. Under the book's lock, so a `join` on another worker
    /// either finds the buckets alive or makes new ones, never a dead
    /// entry it would then replace.
    pub fn leave(&self, buckets: Arc<UserBuckets>) {
        let mut book = self.book();
        if Arc::strong_count(&buckets) == 1 {
            book.remove(&buckets.name);
        }
        drop(buckets);
    }

    /// Users with a live allocation.
    pub fn users(&self) -> usize {
        self.book().len()
    }
}

impl UserBuckets {
    /// Both directions' buckets, for one packet's or one grant's check.
    pub fn lock(&self) -> MutexGuard<'_, [Bucket; 2]> {
        self.directions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The user's allocations on the host.
    pub fn allocations(self: &Arc<Self>) -> usize {
        Arc::strong_count(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_allocations_share_one_entry_that_goes_with_the_last() {
        let book = UserBandwidth::default();
        let alice: Arc<str> = Arc::from("alice");
        let a1 = book.join(&alice);
        let a2 = book.join(&alice);
        let bob = book.join(&Arc::from("bob"));
        assert!(Arc::ptr_eq(&a1, &a2));
        assert_eq!((a1.allocations(), book.users()), (2, 2));
        book.leave(a1);
        assert_eq!((a2.allocations(), book.users()), (1, 2));
        book.leave(a2);
        book.leave(bob);
        assert_eq!(book.users(), 0, "no entry outlives its user's allocations");
        let again = book.join(&alice);
        assert_eq!(again.allocations(), 1);
    }
}
