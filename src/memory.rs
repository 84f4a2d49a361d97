//! Giving freed heap back to the operating system.
//!
//! glibc's allocator keeps what a thread frees in that thread's arena and returns only the
//! free memory at the top of the main heap. A restore allocates much that it frees again
//! (records read, superseded versions of a payment, the broker client's fetch buffers), on
//! several threads at once, so without a trim the worker's RSS after each restart stayed at
//! the restore's peak, not at what is live (docs/benchmarks.md, "The million-payment run").

use std::time::Duration;

/// How often the worker trims its heap besides after each restore: the command backlog a
/// worker reads after a restart is transient too.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(60);

/// Returns the allocator's free pages to the OS (`malloc_trim(0)`, every arena). A no-op off
/// glibc. Takes milliseconds on a heap of a few hundred MB: call it from a blocking thread.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` takes no pointer and only walks the allocator's own free lists,
    // under the allocator's locks; it is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Caps glibc's arenas at [`ARENAS`]. glibc creates up to eight per core, one per thread that
/// meets a locked one, and a restore's per-partition threads each leave their live payments
/// scattered through an arena of their own, which no trim can give back. Call it first thing
/// in `main`, before any thread starts. `MALLOC_ARENA_MAX` in the environment still wins.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: `mallopt` takes two integers and only sets an allocator parameter.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, ARENAS);
        }
    }
}

/// Arenas the worker's allocator may use: contention stays low with the worker's few busy
/// threads (docs/architecture.md, "Memory").
const ARENAS: i32 = 2;

/// Trims the heap every [`TRIM_INTERVAL`] until the runtime shuts down.
pub fn spawn_periodic_trim() -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {
        let mut every = tokio::time::interval(TRIM_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            every.tick().await;
            if tokio::task::spawn_blocking(release_free_heap)
                .await
                .is_err()
            {
                return;
            }
        }
    })
}
