//! The few DTLS 1.2 handshake bytes the front end reads before any state
//! exists (RFC 6347 §4.1 record header, §4.2.2 handshake header, §4.3.2
//! ClientHello and HelloVerifyRequest): enough to answer a ClientHello
//! statelessly and to recognise the cookie coming back.

/// Record header length (RFC 6347 §4.1).
const RECORD: usize = 13;
/// Handshake header length (RFC 6347 §4.2.2).
const HANDSHAKE: usize = 12;
/// Content type `handshake`.
const CONTENT_HANDSHAKE: u8 = 22;
/// Handshake type `client_hello`.
const CLIENT_HELLO: u8 = 1;
/// Handshake type `hello_verify_request`.
const HELLO_VERIFY_REQUEST: u8 = 3;

/// The smallest datagram answered: a ClientHello with an empty session id,
/// cookie and extensions and one cipher suite is 13 + 12 + 43 bytes. A
/// HelloVerifyRequest is at most 13 + 12 + 3 + 32 = 60 bytes here, so the
/// answer is never larger than the request (no amplification).
pub const MIN_CLIENT_HELLO: usize = RECORD + HANDSHAKE + 43;

/// A ClientHello alone in one datagram, unfragmented, in epoch 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientHello<'a> {
    /// client_version: 0xfefd for DTLS 1.2 (and 1.3, which says so in an
    /// extension), 0xfeff for DTLS 1.0.
    pub version: u16,
    /// The handshake message_seq: 0 for a first hello, 1 after a
    /// HelloVerifyRequest.
    pub message_seq: u16,
    /// ClientHello.random.
    pub random: &'a [u8; 32],
    /// The cookie echoed from a HelloVerifyRequest (empty at first).
    pub cookie: &'a [u8],
    /// Where the cookie starts in the datagram.
    cookie_at: usize,
}

/// Reads `datagram` as one ClientHello record, or `None` when it is
/// anything else (which an unknown source gets no answer to).
pub fn client_hello(datagram: &[u8]) -> Option<ClientHello<'_>> {
    if datagram.len() < MIN_CLIENT_HELLO || datagram[0] != CONTENT_HANDSHAKE || datagram[1] != 0xfe {
        return None;
    }
    // Epoch 0: a ClientHello is never encrypted.
    if datagram[3] != 0 || datagram[4] != 0 {
        return None;
    }
    let record_len = u16::from_be_bytes([datagram[11], datagram[12]]) as usize;
    if record_len != datagram.len() - RECORD {
        return None;
    }
    let h = &datagram[RECORD..];
    if h[0] != CLIENT_HELLO {
        return None;
    }
    let length = u24(&h[1..4]);
    let message_seq = u16::from_be_bytes([h[4], h[5]]);
    let fragment_offset = u24(&h[6..9]);
    let fragment_length = u24(&h[9..12]);
    // Unfragmented, and the record holds exactly this message.
    if fragment_offset != 0 || fragment_length != length || HANDSHAKE + length != h.len() {
        return None;
    }
    let body = &h[HANDSHAKE..];
    // client_version (2), random (32), session_id <0..32>, cookie <0..2^8-1>.
    let random: &[u8; 32] = body.get(2..34)?.try_into().ok()?;
    let sid_len = *body.get(34)? as usize;
    if sid_len > 32 {
        return None;
    }
    let cookie_len_at = 35 + sid_len;
    let cookie_len = *body.get(cookie_len_at)? as usize;
    let cookie = body.get(cookie_len_at + 1..cookie_len_at + 1 + cookie_len)?;
    Some(ClientHello {
        version: u16::from_be_bytes([body[0], body[1]]),
        message_seq,
        random,
        cookie,
        cookie_at: RECORD + HANDSHAKE + cookie_len_at + 1,
    })
}

impl ClientHello<'_> {
    /// The same hello as a first one: record sequence 0, message_seq 0, and
    /// a cookie no server issued (one byte flipped), so that the DTLS engine
    /// answers it with a HelloVerifyRequest and then waits for message_seq 1.
    pub fn as_first(&self, datagram: &[u8]) -> Vec<u8> {
        let mut first = datagram.to_vec();
        first[5..11].fill(0);
        first[RECORD + 4..RECORD + 6].fill(0);
        if !self.cookie.is_empty() {
            first[self.cookie_at] ^= 0xff;
        }
        first
    }
}

/// The cookie of a HelloVerifyRequest record at the start of `datagram`.
pub fn hello_verify_cookie(datagram: &[u8]) -> Option<&[u8]> {
    if datagram.len() < RECORD + HANDSHAKE + 3 || datagram[0] != CONTENT_HANDSHAKE {
        return None;
    }
    let h = &datagram[RECORD..];
    if h[0] != HELLO_VERIFY_REQUEST {
        return None;
    }
    let body = &h[HANDSHAKE..];
    let len = body[2] as usize;
    body.get(3..3 + len)
}

/// DTLS 1.2's version number; older versions have higher numbers.
pub const DTLS_1_2: u16 = 0xfefd;

/// A fatal protocol_version alert (RFC 5246 §7.2.2) in the clear, for a
/// hello that offers only an older DTLS: 15 bytes.
pub fn protocol_version_alert(version: u16) -> [u8; 15] {
    let v = version.to_be_bytes();
    [21, v[0], v[1], 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 70]
}

/// Whether `datagram` starts with a record of epoch 0 (handshake in the
/// clear): anything later is encrypted for an association.
pub fn is_epoch0_handshake(datagram: &[u8]) -> bool {
    datagram.len() > RECORD && datagram[0] == CONTENT_HANDSHAKE && datagram[3] == 0 && datagram[4] == 0
}

fn u24(b: &[u8]) -> usize {
    (b[0] as usize) << 16 | (b[1] as usize) << 8 | b[2] as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as OpenSSL 3 sends it first (trimmed extensions).
    pub(crate) fn hello(message_seq: u16, cookie: &[u8]) -> Vec<u8> {
        let mut body = vec![0xfe, 0xfd];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0); // session id
        body.push(cookie.len() as u8);
        body.extend_from_slice(cookie);
        body.extend_from_slice(&[0, 2, 0xc0, 0x2b]); // one suite
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&[0, 0]); // no extensions
        let mut h = vec![CLIENT_HELLO];
        h.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        h.extend_from_slice(&message_seq.to_be_bytes());
        h.extend_from_slice(&[0, 0, 0]);
        h.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        h.extend_from_slice(&body);
        let mut r = vec![
            CONTENT_HANDSHAKE,
            0xfe,
            0xfd,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            message_seq as u8,
        ];
        r.extend_from_slice(&(h.len() as u16).to_be_bytes());
        r.extend_from_slice(&h);
        r
    }

    #[test]
    fn reads_a_hello_and_its_cookie() {
        let d = hello(1, &[9; 32]);
        let ch = client_hello(&d).expect("a ClientHello");
        assert_eq!(ch.message_seq, 1);
        assert_eq!(ch.cookie, &[9; 32]);
        assert_eq!(ch.random, &[7; 32]);
        let first = ch.as_first(&d);
        let again = client_hello(&first).expect("still a ClientHello");
        assert_eq!(again.message_seq, 0);
        assert_ne!(again.cookie, ch.cookie);
        assert_eq!(&first[5..11], &[0; 6]);
    }

    #[test]
    fn refuses_what_is_not_one_whole_hello() {
        let d = hello(0, &[]);
        for cut in 0..d.len() {
            assert!(client_hello(&d[..cut]).is_none(), "cut at {cut}");
        }
        let mut encrypted = d.clone();
        encrypted[4] = 1;
        assert!(client_hello(&encrypted).is_none());
        let mut fragment = d.clone();
        fragment[RECORD + 11] -= 1;
        assert!(client_hello(&fragment).is_none());
        let mut long_sid = d.clone();
        long_sid[RECORD + HANDSHAKE + 34] = 33;
        assert!(client_hello(&long_sid).is_none());
        let mut trailing = d;
        trailing.push(0);
        assert!(client_hello(&trailing).is_none());
    }
}
