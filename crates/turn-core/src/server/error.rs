//! The error codes the server answers with: one type carries the code, the
//! reason phrase and the metric slot, so responses and metrics cannot drift.

/// A STUN/TURN error response code (RFC 8489 §14.8, RFC 8656 §18).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// 300: the client should use ALTERNATE-SERVER (draining).
    TryAlternate,
    /// 400: malformed or inconsistent request.
    BadRequest,
    /// 401: missing or wrong credentials.
    Unauthorized,
    /// 403: the peer is refused by policy.
    Forbidden,
    /// 420: unknown comprehension-required attribute.
    UnknownAttribute,
    /// 437: no allocation, or one already exists on this 5-tuple.
    AllocationMismatch,
    /// 438: the nonce is stale or forged.
    StaleNonce,
    /// 440: the address family is not served.
    AddressFamilyNotSupported,
    /// 441: the allocation belongs to another user.
    WrongCredentials,
    /// 442: the requested transport is not offered.
    UnsupportedTransport,
    /// 443: the peer's family differs from every relayed address.
    PeerAddressFamilyMismatch,
    /// 446: a connection to that peer exists already (RFC 6062 §6.3).
    ConnectionAlreadyExists,
    /// 447: the connection to the peer failed or timed out (RFC 6062 §6.3).
    ConnectionTimeoutOrFailure,
    /// 486: the user's allocation quota is reached.
    AllocationQuotaReached,
    /// 508: no capacity (total quota, ports, permissions, channels).
    InsufficientCapacity,
}

impl ErrorCode {
    /// Every code, in metric order.
    pub const ALL: [ErrorCode; 15] = [
        ErrorCode::TryAlternate,
        ErrorCode::BadRequest,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::UnknownAttribute,
        ErrorCode::AllocationMismatch,
        ErrorCode::StaleNonce,
        ErrorCode::AddressFamilyNotSupported,
        ErrorCode::WrongCredentials,
        ErrorCode::UnsupportedTransport,
        ErrorCode::PeerAddressFamilyMismatch,
        ErrorCode::ConnectionAlreadyExists,
        ErrorCode::ConnectionTimeoutOrFailure,
        ErrorCode::AllocationQuotaReached,
        ErrorCode::InsufficientCapacity,
    ];

    /// The numeric code.
    pub const fn code(self) -> u16 {
        match self {
            ErrorCode::TryAlternate => 300,
            ErrorCode::BadRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::UnknownAttribute => 420,
            ErrorCode::AllocationMismatch => 437,
            ErrorCode::StaleNonce => 438,
            ErrorCode::AddressFamilyNotSupported => 440,
            ErrorCode::WrongCredentials => 441,
            ErrorCode::UnsupportedTransport => 442,
            ErrorCode::PeerAddressFamilyMismatch => 443,
            ErrorCode::ConnectionAlreadyExists => 446,
            ErrorCode::ConnectionTimeoutOrFailure => 447,
            ErrorCode::AllocationQuotaReached => 486,
            ErrorCode::InsufficientCapacity => 508,
        }
    }

    /// The reason phrase the RFCs suggest.
    pub const fn reason(self) -> &'static str {
        match self {
            ErrorCode::TryAlternate => "Try Alternate",
            ErrorCode::BadRequest => "Bad Request",
            ErrorCode::Unauthorized => "Unauthorized",
            ErrorCode::Forbidden => "Forbidden",
            ErrorCode::UnknownAttribute => "Unknown Attribute",
            ErrorCode::AllocationMismatch => "Allocation Mismatch",
            ErrorCode::StaleNonce => "Stale Nonce",
            ErrorCode::AddressFamilyNotSupported => "Address Family not Supported",
            ErrorCode::WrongCredentials => "Wrong Credentials",
            ErrorCode::UnsupportedTransport => "Unsupported Transport Protocol",
            ErrorCode::PeerAddressFamilyMismatch => "Peer Address Family Mismatch",
            ErrorCode::ConnectionAlreadyExists => "Connection Already Exists",
            ErrorCode::ConnectionTimeoutOrFailure => "Connection Timeout or Failure",
            ErrorCode::AllocationQuotaReached => "Allocation Quota Reached",
            ErrorCode::InsufficientCapacity => "Insufficient Capacity",
        }
    }

    /// The metric label value (the code as text).
    pub const fn label(self) -> &'static str {
        match self {
            ErrorCode::TryAlternate => "300",
            ErrorCode::BadRequest => "400",
            ErrorCode::Unauthorized => "401",
            ErrorCode::Forbidden => "403",
            ErrorCode::UnknownAttribute => "420",
            ErrorCode::AllocationMismatch => "437",
            ErrorCode::StaleNonce => "438",
            ErrorCode::AddressFamilyNotSupported => "440",
            ErrorCode::WrongCredentials => "441",
            ErrorCode::UnsupportedTransport => "442",
            ErrorCode::PeerAddressFamilyMismatch => "443",
            ErrorCode::ConnectionAlreadyExists => "446",
            ErrorCode::ConnectionTimeoutOrFailure => "447",
            ErrorCode::AllocationQuotaReached => "486",
            ErrorCode::InsufficientCapacity => "508",
        }
    }

    /// Its slot in [`crate::Counters::errors`].
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|c| *c == self).unwrap_or(0)
    }

    /// Challenges to unauthenticated sources (401, 438) go without a reason
    /// phrase, to keep the reflection small; the code says it all.
    pub(super) fn is_challenge(self) -> bool {
        matches!(self, ErrorCode::Unauthorized | ErrorCode::StaleNonce)
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorCode;

    #[test]
    fn labels_match_codes() {
        for c in ErrorCode::ALL {
            assert_eq!(c.label(), c.code().to_string());
            assert_eq!(ErrorCode::ALL[c.index()], c);
        }
    }
}
