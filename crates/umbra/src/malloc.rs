//! glibc malloc settings for a relay, made once at start.
//!
//! rustls's buffered API allocates one buffer per TLS record in each direction (about 16 KiB)
//! and frees it soon after. With glibc's defaults the freed heap top goes back to the kernel
//! whenever it exceeds 128 KiB, and the next records fault the same pages in again: about
//! 43,000 page faults per second across agent, broker and connector during one TLS/TCP
//! transfer, about 13% of their CPU per byte (benches/README.md). Keeping up to 32 MiB of free
//! heap top per arena ends that churn. Setting the trim threshold turns off glibc's dynamic
//! mmap threshold, so the mmap threshold is set too: blocks up to 4 MiB come from the heap.
//!
//! The same values as the environment variable
//! `GLIBC_TUNABLES=glibc.malloc.trim_threshold=33554432:glibc.malloc.mmap_threshold=4194304`,
//! which was measured; the variable still wins if an operator sets it, because glibc reads it
//! before `main` and this module then leaves malloc alone.

/// Free heap top kept per arena instead of being returned to the kernel.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 32 << 20;
/// Blocks at least this large are mmap'd on their own.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 4 << 20;

/// Applies the settings (glibc on Linux only; elsewhere nothing to do).
pub(crate) fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("GLIBC_TUNABLES").is_none() {
        set(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        set(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn set(param: libc::c_int, value: libc::c_int) {
    // SAFETY: mallopt only changes allocator parameters; it is called before any thread
    // starts, with parameters and values that glibc documents. A refusal (0) leaves the
    // defaults, which only cost speed.
    let _ = unsafe { libc::mallopt(param, value) };
}
