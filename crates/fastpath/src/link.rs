//! XDP attachments as BPF links (Linux 5.9+), made here rather than by aya
//! because a binary upgrade needs the link itself: a link is a descriptor,
//! so the old process passes it to the new one (`SCM_RIGHTS`), which swaps
//! its own program in with one `BPF_LINK_UPDATE` while packets keep being
//! relayed by whichever program is attached; and the old one swaps its
//! program back if the upgrade fails. A link lives while any process holds
//! a descriptor of it.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `enum bpf_cmd` (include/uapi/linux/bpf.h).
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
/// `enum bpf_attach_type`: BPF_XDP.
const BPF_XDP: u32 = 37;

/// The first 64 bytes of `union bpf_attr`, zeroed but for the fields a
/// command reads (the kernel checks that the rest is zero).
type Attr = [u32; 16];

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<i32> {
    // SAFETY: `attr` is a valid, initialised buffer of the size passed; the
    // kernel reads at most that many bytes of it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as i32)
    }
}

/// Attaches `prog` (an XDP program) to interface `ifindex` with XDP
/// `flags` (driver or generic mode) as a link; the link is detached when
/// the last descriptor of it closes.
pub(crate) fn create(prog: BorrowedFd<'_>, ifindex: u32, flags: u32) -> io::Result<OwnedFd> {
    let mut attr: Attr = [0; 16];
    // struct { prog_fd; target_ifindex; attach_type; flags; }
    attr[0] = prog.as_raw_fd() as u32;
    attr[1] = ifindex;
    attr[2] = BPF_XDP;
    attr[3] = flags;
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Puts `prog` on `link` in place of the program it runs, atomically: a
/// packet sees one program or the other.
pub(crate) fn update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr: Attr = [0; 16];
    // struct { link_fd; new_prog_fd; flags; old_prog_fd; }
    attr[0] = link.as_raw_fd() as u32;
    attr[1] = prog.as_raw_fd() as u32;
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}
