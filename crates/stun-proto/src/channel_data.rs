//! TURN ChannelData messages (RFC 8656 §12.4).

/// Length of the ChannelData header (channel number, length).
pub const CHANNEL_DATA_HEADER_LEN: usize = 4;

/// A ChannelData message borrowing the packet it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelData<'a> {
    /// The channel number, 0x4000..=0x7FFF as the top bits guarantee.
    pub channel: u16,
    /// The application data.
    pub data: &'a [u8],
}

impl<'a> ChannelData<'a> {
    /// Parses a ChannelData message at the start of `buf`. The length field
    /// must fit in `buf`; bytes beyond it (UDP padding) are ignored. Returns
    /// `None` for anything that is not ChannelData or runs past the end.
    pub fn parse(buf: &'a [u8]) -> Option<Self> {
        if buf.len() < CHANNEL_DATA_HEADER_LEN || buf[0] >> 6 != 0b01 {
            return None;
        }
        let channel = u16::from_be_bytes([buf[0], buf[1]]);
        let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
        let data = buf.get(CHANNEL_DATA_HEADER_LEN..CHANNEL_DATA_HEADER_LEN + len)?;
        Some(ChannelData { channel, data })
    }

    /// The length of the framed message at the start of a byte stream,
    /// including the padding to a multiple of four that TCP and TLS require
    /// (RFC 8656 §12.5). `None` until the 4-byte header is there.
    pub fn stream_len(buf: &[u8]) -> Option<usize> {
        if buf.len() < CHANNEL_DATA_HEADER_LEN {
            return None;
        }
        let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
        Some((CHANNEL_DATA_HEADER_LEN + len + 3) & !3)
    }

    /// Writes the 4-byte header for `channel` and `len` bytes of data.
    pub fn header(channel: u16, len: u16) -> [u8; CHANNEL_DATA_HEADER_LEN] {
        let c = channel.to_be_bytes();
        let l = len.to_be_bytes();
        [c[0], c[1], l[0], l[1]]
    }
}
