//! Which build is running: the package version and the linker's build id
//! (the ELF `.note.gnu.build-id` of the running executable), so two builds
//! of one version are told apart, as a binary upgrade's log and
//! `turnpike_build_info` must (a patched package often keeps its version).
//! Read from the program headers only: a few kilobytes, once.

use std::io::{Read, Seek, SeekFrom};
use std::sync::OnceLock;

/// `NT_GNU_BUILD_ID`, the note type of the linker's build id.
const NT_GNU_BUILD_ID: u32 = 3;
/// `PT_NOTE`, a program header of notes.
const PT_NOTE: u32 = 4;

/// This build: `0.1.0+1a2b3c4d5e6f` (the build id as semver build
/// metadata), or the version alone where the executable carries no build
/// id.
pub fn version() -> &'static str {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION.get_or_init(|| match build() {
        Some(b) => format!("{}+{b}", env!("CARGO_PKG_VERSION")),
        None => env!("CARGO_PKG_VERSION").to_owned(),
    })
}

/// The first 12 hex digits of the running executable's build id.
pub fn build() -> Option<&'static str> {
    static BUILD: OnceLock<Option<String>> = OnceLock::new();
    BUILD
        .get_or_init(|| {
            let mut f = std::fs::File::open("/proc/self/exe").ok()?;
            let id = build_id(&mut f)?;
            Some(id.iter().take(6).map(|b| format!("{b:02x}")).collect())
        })
        .as_deref()
}

/// The build id note of a 64-bit little-endian ELF file, if it has one.
pub fn build_id(f: &mut (impl Read + Seek)) -> Option<Vec<u8>> {
    let mut h = [0u8; 64];
    f.read_exact(&mut h).ok()?;
    // "\x7fELF", 64-bit, little-endian.
    if h[..4] != *b"\x7fELF" || h[4] != 2 || h[5] != 1 {
        return None;
    }
    let u16_at = |b: &[u8], i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
    let u32_at = |b: &[u8], i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or_default());
    let u64_at = |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
    let (phoff, phentsize, phnum) = (u64_at(&h, 32), u16_at(&h, 54) as usize, u16_at(&h, 56));
    if phentsize < 56 {
        return None;
    }
    for i in 0..u64::from(phnum) {
        let mut ph = vec![0u8; phentsize];
        f.seek(SeekFrom::Start(phoff + i * phentsize as u64)).ok()?;
        f.read_exact(&mut ph).ok()?;
        if u32_at(&ph, 0) != PT_NOTE {
            continue;
        }
        let (offset, size) = (u64_at(&ph, 8), u64_at(&ph, 32).min(64 * 1024));
        let mut notes = vec![0u8; size as usize];
        f.seek(SeekFrom::Start(offset)).ok()?;
        f.read_exact(&mut notes).ok()?;
        if let Some(id) = find_build_id(&notes) {
            return Some(id.to_vec());
        }
    }
    None
}

/// The `GNU` build id among `notes` (namesz, descsz, type, then name and
/// descriptor, each padded to 4 bytes).
fn find_build_id(notes: &[u8]) -> Option<&[u8]> {
    let mut at = 0usize;
    let pad = |n: usize| n.div_ceil(4) * 4;
    while at + 12 <= notes.len() {
        let word = |i: usize| u32::from_le_bytes(notes[i..i + 4].try_into().unwrap_or_default()) as usize;
        let (namesz, descsz, kind) = (word(at), word(at + 4), word(at + 8) as u32);
        let name = at + 12;
        let desc = name.checked_add(pad(namesz))?;
        let end = desc.checked_add(pad(descsz))?;
        if end > notes.len() || desc + descsz > notes.len() {
            return None;
        }
        if kind == NT_GNU_BUILD_ID && notes.get(name..name + namesz) == Some(b"GNU\0") {
            return Some(&notes[desc..desc + descsz]);
        }
        at = end;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_test_binary_has_a_build_id_and_garbage_has_none() {
        let mut f = std::fs::File::open("/proc/self/exe").unwrap();
        let id = build_id(&mut f).expect("the linker writes a build id");
        assert!(id.len() >= 8, "{id:?}");
        assert!(build_id(&mut std::io::Cursor::new(vec![0u8; 100])).is_none());
        let mut truncated = std::fs::read("/proc/self/exe").unwrap();
        truncated.truncate(70);
        assert!(build_id(&mut std::io::Cursor::new(truncated)).is_none());
        // Notes that claim more than they hold end the search.
        assert_eq!(
            find_build_id(&[4, 0, 0, 0, 255, 255, 0, 0, 3, 0, 0, 0, b'G', b'N', b'U', 0]),
            None
        );
    }
}
