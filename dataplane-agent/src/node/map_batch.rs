//! Batched map writes: many keys of one map in one bpf(2) call.
//!
//! Programming 10 000 services writes a few hundred thousand map entries; one
//! syscall each costs more than the insert itself. The kernel has taken
//! batches since 5.6 (`BPF_MAP_UPDATE_BATCH`, `BPF_MAP_DELETE_BATCH`, hash
//! and array maps; `BPF_MAP_LOOKUP_BATCH` too), but aya 0.14 has no wrapper
//! for them, so this module is
//! a narrow one over the raw syscall. Nothing else in the agent calls bpf(2)
//! directly.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

/// `enum bpf_cmd` values (include/uapi/linux/bpf.h).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// The `batch` member of `union bpf_attr`, as the kernel lays it out.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    /// In: entries in `keys`/`values`; out: entries the kernel processed.
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Runs one batch command; returns the entries processed and the error, if
/// the kernel stopped early.
fn batch_call(cmd: libc::c_long, attr: &mut BatchAttr) -> (usize, Option<io::Error>) {
    // SAFETY: `attr` is a valid, initialised `bpf_attr` prefix of the size
    // passed; `keys` and `values` point at `count` keys and values of the
    // map's sizes, alive for the call and writable for a lookup, and
    // `in_batch`/`out_batch` at 8 writable bytes or nothing (see the
    // callers). Besides those buffers the kernel writes only `count`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            size_of::<BatchAttr>() as libc::c_uint,
        )
    };
    let done = attr.count as usize;
    if ret < 0 {
        (done, Some(io::Error::last_os_error()))
    } else {
        (done, None)
    }
}

/// Writes `keys[i] -> values[i]` for every i (flags `BPF_ANY`). `K` and `V`
/// must be the map's key and value types (`#[repr(C)]`, no padding), as the
/// kernel copies `size_of` bytes of each.
pub fn update<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> io::Result<()> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    let mut done = 0;
    while done < keys.len() {
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            values: values[done..].as_ptr() as u64,
            count: u32::try_from(keys.len() - done).unwrap_or(u32::MAX),
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        match batch_call(BPF_MAP_UPDATE_BATCH, &mut attr) {
            (n, None) => done += n,
            (n, Some(e)) if e.kind() == io::ErrorKind::Interrupted => done += n,
            (_, Some(e)) => return Err(e),
        }
    }
    Ok(())
}

/// Deletes every key of `keys`; keys already absent are skipped, as the
/// desired state (no entry) holds for them.
pub fn delete<K: aya::Pod>(map: BorrowedFd<'_>, keys: &[K]) -> io::Result<()> {
    let mut done = 0;
    while done < keys.len() {
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            count: u32::try_from(keys.len() - done).unwrap_or(u32::MAX),
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        match batch_call(BPF_MAP_DELETE_BATCH, &mut attr) {
            (n, None) => done += n,
            (n, Some(e)) if e.kind() == io::ErrorKind::Interrupted => done += n,
            // The kernel stops at the first absent key: step over it.
            (n, Some(e)) if e.raw_os_error() == Some(libc::ENOENT) => done += n + 1,
            (_, Some(e)) => return Err(e),
        }
    }
    Ok(())
}

/// Entries read per `BPF_MAP_LOOKUP_BATCH` call.
const LOOKUP_CHUNK: usize = 4096;

/// Every entry of a hash or array map (an array's unused entries included).
/// Reads `LOOKUP_CHUNK` entries per call where aya's iterator makes two
/// calls per entry, which for a 262 144-entry array is most of a start-up.
pub fn lookup_all<K, V>(map: BorrowedFd<'_>) -> io::Result<Vec<(K, V)>>
where
    K: aya::Pod + bytemuck::Zeroable,
    V: aya::Pod + bytemuck::Zeroable,
{
    let mut all = Vec::new();
    let mut keys = vec![K::zeroed(); LOOKUP_CHUNK];
    let mut values = vec![V::zeroed(); LOOKUP_CHUNK];
    // Where the next call resumes. Hash maps use a u32 bucket index; other
    // maps the last key read, which for our arrays is a u32 too. Eight bytes
    // leave room either way.
    let mut position = [0u64; 1];
    let mut first = true;
    loop {
        let position_ptr = position.as_mut_ptr() as u64;
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { position_ptr },
            out_batch: position_ptr,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: LOOKUP_CHUNK as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let (n, error) = batch_call(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = n.min(LOOKUP_CHUNK);
        all.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        match error {
            None => first = false,
            // The end of the map.
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(all),
            Some(e) => return Err(e),
        }
    }
}
