//! Shared memory of the delivery workers: one slot per worker (a database has
//! `linkhooks.workers_per_database` of them), plus the launcher that starts
//! them (src/worker/launcher.rs). The launcher alone
//! assigns and frees a slot (its `database`); the worker in the slot writes the
//! rest; backends read it to wake their own database's worker when a
//! transaction commits, and for `worker_status()`.

use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use pgrx::prelude::*;
use pgrx::{PGRXSharedMemory, PgAtomic, pg_shmem_init};

/// How many delivery workers one server runs, over all databases.
pub const MAX_WORKERS: usize = 64;
/// How many statements at once may hold a database's worker off (see `pause`).
const MAX_PAUSES: usize = 8;
/// How many CREATE EXTENSIONs the launcher may not have seen yet, by database.
const MAX_CREATED: usize = 8;

/// One delivery worker.
#[repr(C)]
#[derive(Default)]
pub struct Slot {
    /// The database's OID; 0 for a free slot.
    database: AtomicU32,
    /// Which of its database's workers (0 is the one with the housekeeper).
    number: AtomicU32,
    /// 0 while no worker is connected.
    pid: AtomicI32,
    /// Its housekeeper's pid (0 while none is connected) and database: a
    /// housekeeper may outlive the worker whose slot is freed.
    housekeeper_pid: AtomicI32,
    housekeeper_database: AtomicU32,
    latch: AtomicUsize,
    state: AtomicU32,
    in_flight: AtomicI64,
    last_loop_ms: AtomicI64,
    /// Moves when a transaction that recorded clicks or misses commits in this database.
    clicks_generation: AtomicU64,
    /// `extensions_created()` as the worker read it just before it looked for the extension.
    checked_generation: AtomicU64,
}

// SAFETY: only atomics, valid at any address and in any process.
unsafe impl PGRXSharedMemory for Slot {}

/// A statement that needs a database to itself (DROP DATABASE) holds its worker off until then.
#[repr(C)]
#[derive(Default)]
struct Pause {
    database: AtomicU32,
    until_ms: AtomicI64,
}

// SAFETY: only atomics.
unsafe impl PGRXSharedMemory for Pause {}

static SLOTS: PgAtomic<[Slot; MAX_WORKERS]> = unsafe { PgAtomic::new(c"linkhooks_slots") };
static PAUSES: PgAtomic<[Pause; MAX_PAUSES]> = unsafe { PgAtomic::new(c"linkhooks_pauses") };
static LAUNCHER_LATCH: PgAtomic<AtomicUsize> =
    unsafe { PgAtomic::new(c"linkhooks_launcher_latch") };
static LAUNCHER_PID: PgAtomic<AtomicI32> = unsafe { PgAtomic::new(c"linkhooks_launcher_pid") };
/// Databases where a CREATE EXTENSION pg_linkhooks committed, until the launcher takes them (0: free).
static CREATED_IN: PgAtomic<[AtomicU32; MAX_CREATED]> =
    unsafe { PgAtomic::new(c"linkhooks_created_in") };
/// Moves when CREATED_IN was full: then every database is checked again.
static EXTENSIONS_CREATED: PgAtomic<AtomicU64> =
    unsafe { PgAtomic::new(c"linkhooks_extensions_created") };

pub fn init() {
    pg_shmem_init!(SLOTS = std::array::from_fn(|_| Slot::default()));
    pg_shmem_init!(PAUSES = std::array::from_fn(|_| Pause::default()));
    pg_shmem_init!(LAUNCHER_LATCH);
    pg_shmem_init!(LAUNCHER_PID);
    pg_shmem_init!(CREATED_IN = std::array::from_fn(|_| AtomicU32::new(0)));
    pg_shmem_init!(EXTENSIONS_CREATED);
}

/// What a slot's worker is doing, for `worker_status().state`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u32)]
pub enum SlotState {
    Starting = 0,
    /// The launcher found no background worker slot for it (`max_worker_processes`).
    NoProcess = 1,
    Delivering = 2,
    /// The worker found no extension in its database and stopped.
    NoExtension = 3,
}

impl SlotState {
    fn from_u32(value: u32) -> SlotState {
        match value {
            1 => SlotState::NoProcess,
            2 => SlotState::Delivering,
            3 => SlotState::NoExtension,
            _ => SlotState::Starting,
        }
    }
}

fn slots() -> &'static [Slot; MAX_WORKERS] {
    SLOTS.get()
}

fn slot(index: usize) -> &'static Slot {
    &slots()[index]
}

/// Milliseconds since the Unix epoch (0 on a clock before it).
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

// The launcher.

pub fn launcher_started(latch: *mut pg_sys::Latch, pid: i32) {
    LAUNCHER_PID.get().store(pid, Ordering::Release);
    LAUNCHER_LATCH
        .get()
        .store(latch as usize, Ordering::Release);
}

pub fn launcher_stopped() {
    LAUNCHER_LATCH.get().store(0, Ordering::Release);
    LAUNCHER_PID.get().store(0, Ordering::Release);
}

/// The launcher that started the workers now running (0: none runs).
pub fn launcher_pid() -> i32 {
    LAUNCHER_PID.get().load(Ordering::Acquire)
}

/// Sets the launcher's latch: a database wants a look (a CREATE EXTENSION, a pause).
pub fn wake_launcher() {
    set_latch(LAUNCHER_LATCH.get().load(Ordering::Acquire));
}

/// Takes a free slot for worker `number` of `database`; None when every slot is taken.
pub fn assign(database: pg_sys::Oid, number: u32) -> Option<usize> {
    let index = slots()
        .iter()
        .position(|s| s.database.load(Ordering::Acquire) == 0)?;
    let s = slot(index);
    s.pid.store(0, Ordering::Relaxed);
    s.latch.store(0, Ordering::Relaxed);
    s.state.store(SlotState::Starting as u32, Ordering::Relaxed);
    s.in_flight.store(0, Ordering::Relaxed);
    s.last_loop_ms.store(0, Ordering::Relaxed);
    s.checked_generation.store(0, Ordering::Relaxed);
    s.number.store(number, Ordering::Relaxed);
    s.database.store(database.to_u32(), Ordering::Release);
    Some(index)
}

pub fn free(index: usize) {
    slot(index).latch.store(0, Ordering::Release);
    slot(index).database.store(0, Ordering::Release);
}

/// Frees every slot: a new launcher starts from nothing.
pub fn free_all() {
    (0..MAX_WORKERS).for_each(free);
}

/// Whether any slot still has a worker connected.
pub fn any_worker_connected() -> bool {
    slots().iter().any(|s| s.pid.load(Ordering::Acquire) != 0)
}

/// Wakes every worker (so that those of a launcher gone see it and stop).
pub fn wake_all_workers() {
    for s in slots() {
        set_latch(s.latch.load(Ordering::Acquire));
    }
}

pub fn state(index: usize) -> SlotState {
    SlotState::from_u32(slot(index).state.load(Ordering::Acquire))
}

pub fn set_state(index: usize, state: SlotState) {
    slot(index).state.store(state as u32, Ordering::Release);
}

pub fn checked_generation(index: usize) -> u64 {
    slot(index).checked_generation.load(Ordering::Acquire)
}

// The worker in a slot.

/// Called by the worker once connected: backends that see its latch wake it.
pub fn worker_started(index: usize, latch: *mut pg_sys::Latch, pid: i32) {
    let s = slot(index);
    s.pid.store(pid, Ordering::Release);
    s.latch.store(latch as usize, Ordering::Release);
}

/// Called as the worker's process exits, however it exits. Clears the slot
/// only while it is still this process's: a launcher that restarted stops
/// waiting for old workers after a while and hands their slots out again, and
/// a late exit must not take the new worker's latch away.
pub fn worker_stopped(index: usize, pid: i32) {
    let s = slot(index);
    if s.pid
        .compare_exchange(pid, 0, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
    {
        s.latch.store(0, Ordering::Release);
        s.in_flight.store(0, Ordering::Relaxed);
    }
}

pub fn worker_pid(index: usize) -> i32 {
    slot(index).pid.load(Ordering::Acquire)
}

pub fn record_loop(index: usize, in_flight: i64) {
    slot(index).in_flight.store(in_flight, Ordering::Relaxed);
    slot(index).last_loop_ms.store(now_ms(), Ordering::Relaxed);
}

/// Reads `extensions_created()` into the slot, before the worker looks for the extension.
pub fn checking_extension(index: usize) {
    slot(index)
        .checked_generation
        .store(extensions_created(), Ordering::Release);
}

pub fn clicks_generation(index: usize) -> u64 {
    slot(index).clicks_generation.load(Ordering::Acquire)
}

// Backends.

/// The slots of `database`'s workers.
fn of(database: pg_sys::Oid) -> impl Iterator<Item = &'static Slot> {
    let wanted = database.to_u32();
    slots()
        .iter()
        .filter(move |s| s.database.load(Ordering::Acquire) == wanted)
}

/// Sets the latches of `database`'s workers (any of them may claim what was queued).
pub fn wake(database: pg_sys::Oid) {
    for s in of(database) {
        set_latch(s.latch.load(Ordering::Acquire));
    }
}

/// A transaction in `database` that recorded clicks or misses committed.
pub fn clicks_committed(database: pg_sys::Oid) {
    for s in of(database) {
        s.clicks_generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// Whether a worker of `database` other than the one in `slot` is connected.
pub fn sibling_connected(database: pg_sys::Oid, slot: usize) -> bool {
    slots().iter().enumerate().any(|(index, s)| {
        index != slot
            && s.database.load(Ordering::Acquire) == database.to_u32()
            && s.pid.load(Ordering::Acquire) != 0
    })
}

pub fn extension_created(database: pg_sys::Oid) {
    let taken = CREATED_IN.get().iter().any(|entry| {
        entry
            .compare_exchange(0, database.to_u32(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    });
    if !taken {
        EXTENSIONS_CREATED.get().fetch_add(1, Ordering::AcqRel); // every database, then
    }
    wake_launcher();
}

/// The databases where CREATE EXTENSION committed since the last call (the launcher's).
pub fn take_created() -> Vec<pg_sys::Oid> {
    CREATED_IN
        .get()
        .iter()
        .map(|entry| entry.swap(0, Ordering::AcqRel))
        .filter(|&oid| oid != 0)
        .map(pg_sys::Oid::from)
        .collect()
}

pub fn extensions_created() -> u64 {
    EXTENSIONS_CREATED.get().load(Ordering::Acquire)
}

/// One of `database`'s workers as shared memory shows it.
pub struct WorkerView {
    pub number: u32,
    /// 0 while no worker is connected.
    pub pid: i32,
    pub state: SlotState,
    pub in_flight: i64,
    pub last_loop_ms: i64,
}

/// `database`'s workers, by number.
pub fn view(database: pg_sys::Oid) -> Vec<WorkerView> {
    let mut workers: Vec<WorkerView> = of(database)
        .map(|s| WorkerView {
            number: s.number.load(Ordering::Relaxed),
            pid: s.pid.load(Ordering::Acquire),
            state: SlotState::from_u32(s.state.load(Ordering::Acquire)),
            in_flight: s.in_flight.load(Ordering::Relaxed),
            last_loop_ms: s.last_loop_ms.load(Ordering::Relaxed),
        })
        .collect();
    workers.sort_by_key(|w| w.number);
    workers
}

/// Whether a worker, or a housekeeper, is connected to `database`.
pub fn worker_connected(database: pg_sys::Oid) -> bool {
    of(database).any(|s| s.pid.load(Ordering::Acquire) != 0)
        || !housekeepers(database, |_| true).is_empty()
}

/// The housekeepers still connected to `database` whose worker has stopped.
pub fn orphaned_housekeepers(database: pg_sys::Oid) -> Vec<i32> {
    housekeepers(database, |s| {
        s.database.load(Ordering::Acquire) != database.to_u32()
            || s.pid.load(Ordering::Acquire) == 0
    })
}

fn housekeepers(database: pg_sys::Oid, keep: impl Fn(&Slot) -> bool) -> Vec<i32> {
    slots()
        .iter()
        .filter(|s| s.housekeeper_database.load(Ordering::Acquire) == database.to_u32() && keep(s))
        .map(|s| s.housekeeper_pid.load(Ordering::Acquire))
        .filter(|pid| *pid != 0)
        .collect()
}

/// Called by a housekeeper once connected.
pub fn housekeeper_started(index: usize, database: pg_sys::Oid, pid: i32) {
    let s = slot(index);
    s.housekeeper_pid.store(0, Ordering::Release);
    s.housekeeper_database
        .store(database.to_u32(), Ordering::Release);
    s.housekeeper_pid.store(pid, Ordering::Release);
}

/// Called as a housekeeper exits: clears only its own pid, as `worker_stopped` does.
pub fn housekeeper_stopped(index: usize, pid: i32) {
    let _ =
        slot(index)
            .housekeeper_pid
            .compare_exchange(pid, 0, Ordering::AcqRel, Ordering::Acquire);
}

/// Holds `database`'s worker off until `unpause` or for `for_ms` at most (a
/// backend that dies meanwhile must not stop delivery for good). False when
/// every pause entry is taken.
pub fn pause(database: pg_sys::Oid, for_ms: i64) -> bool {
    let now = now_ms();
    for p in PAUSES.get() {
        let current = p.database.load(Ordering::Acquire);
        let free = current == 0 || p.until_ms.load(Ordering::Acquire) < now;
        if free
            && p.database
                .compare_exchange(
                    current,
                    database.to_u32(),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
        {
            p.until_ms.store(now + for_ms, Ordering::Release);
            return true;
        }
    }
    false
}

pub fn unpause(database: pg_sys::Oid) {
    for p in PAUSES.get() {
        if p.database.load(Ordering::Acquire) == database.to_u32() {
            p.until_ms.store(0, Ordering::Release);
            let _ = p.database.compare_exchange(
                database.to_u32(),
                0,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }
}

pub fn paused(database: pg_sys::Oid) -> bool {
    let now = now_ms();
    PAUSES.get().iter().any(|p| {
        p.database.load(Ordering::Acquire) == database.to_u32()
            && p.until_ms.load(Ordering::Acquire) >= now
    })
}

fn set_latch(latch: usize) {
    if latch != 0 {
        // SAFETY: the latch lives in its process's PGPROC in shared memory, mapped
        // at the same address in every backend; SetLatch on another process's
        // latch is how Postgres itself wakes processes (a latch since reused by
        // another process only gets a spurious wake-up).
        unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) };
    }
}
