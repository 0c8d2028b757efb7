//! The error codes the server answers with: one table gives each its
//! number, reason phrase, metric label and slot, so responses, logs,
//! metrics and clients cannot drift apart (quinn's `errors!`, rustls's
//! `enum_builder!` are the models).

/// Declares [`ErrorCode`] from one table: `Name = number, "reason"`.
macro_rules! error_codes {
    ($($(#[$doc:meta])* $name:ident = $code:literal, $reason:literal;)*) => {
        /// A STUN/TURN error response code (RFC 8489 §14.8, RFC 8656 §18,
        /// RFC 6062 §6.3).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ErrorCode {
            $($(#[$doc])* $name,)*
        }

        impl ErrorCode {
            /// Every code, in metric order (the table's).
            pub const ALL: [ErrorCode; [$($code),*].len()] = [$(ErrorCode::$name),*];

            /// The numeric code.
            pub const fn code(self) -> u16 {
                match self {
                    $(ErrorCode::$name => $code,)*
                }
            }

            /// The reason phrase the RFCs suggest.
            pub const fn reason(self) -> &'static str {
                match self {
                    $(ErrorCode::$name => $reason,)*
                }
            }

            /// The metric label value (the code as text).
            pub const fn label(self) -> &'static str {
                match self {
                    $(ErrorCode::$name => stringify!($code),)*
                }
            }

            /// The code a response carried, if the server knows it (a
            /// client matches these instead of numbers).
            pub const fn from_code(code: u16) -> Option<ErrorCode> {
                match code {
                    $($code => Some(ErrorCode::$name),)*
                    _ => None,
                }
            }
        }
    };
}

error_codes! {
    /// 300: the client should use ALTERNATE-SERVER (draining, load).
    TryAlternate = 300, "Try Alternate";
    /// 400: malformed or inconsistent request.
    BadRequest = 400, "Bad Request";
    /// 401: missing or wrong credentials.
    Unauthorized = 401, "Unauthorized";
    /// 403: the peer is refused by policy.
    Forbidden = 403, "Forbidden";
    /// 405: mobility is off here, or not for this allocation (RFC 8016
    /// §3.1).
    MobilityForbidden = 405, "Mobility Forbidden";
    /// 420: unknown comprehension-required attribute.
    UnknownAttribute = 420, "Unknown Attribute";
    /// 437: no allocation, or one already exists on this 5-tuple.
    AllocationMismatch = 437, "Allocation Mismatch";
    /// 438: the nonce is stale or forged.
    StaleNonce = 438, "Stale Nonce";
    /// 440: the address family is not served.
    AddressFamilyNotSupported = 440, "Address Family not Supported";
    /// 441: the allocation belongs to another user.
    WrongCredentials = 441, "Wrong Credentials";
    /// 442: the requested transport is not offered.
    UnsupportedTransport = 442, "Unsupported Transport Protocol";
    /// 443: the peer's family differs from every relayed address.
    PeerAddressFamilyMismatch = 443, "Peer Address Family Mismatch";
    /// 446: a connection to that peer exists already (RFC 6062 §6.3).
    ConnectionAlreadyExists = 446, "Connection Already Exists";
    /// 447: the connection to the peer failed or timed out (RFC 6062 §6.3).
    ConnectionTimeoutOrFailure = 447, "Connection Timeout or Failure";
    /// 486: the user's allocation quota is reached.
    AllocationQuotaReached = 486, "Allocation Quota Reached";
    /// 508: no capacity (total quota, ports, permissions, channels).
    InsufficientCapacity = 508, "Insufficient Capacity";
}

impl ErrorCode {
    /// Its slot in [`crate::Counters::errors`]: its place in the table.
    pub const fn index(self) -> usize {
        self as usize
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
            assert_eq!(ErrorCode::from_code(c.code()), Some(c));
        }
        assert_eq!(ErrorCode::from_code(499), None);
    }
}
