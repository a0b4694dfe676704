//! Delivery rows written straight into `linkhooks.deliveries`, without SPI.
//!
//! A saved SPI plan still pays, per click, for plan revalidation, a fresh
//! snapshot, a command-counter bump and a whole executor start-up and
//! shutdown. This writes the row through Postgres's own single-relation insert
//! (`ExecSimpleRelationInsert`, what logical replication applies rows with):
//! NOT NULL checks, every index entry (partial predicates included) and any
//! row triggers a DBA put on the table all still happen.
//!
//! Each backend also builds the index insert state once (the `IndexInfo`s,
//! partial-index predicates compiled), which the executor would build for every
//! statement, and builds it again when the table or any of its indexes changes.
//!
//! The table is partitioned by `created_at` (the transaction's start), so
//! every row of a transaction goes to one partition, which this finds in the
//! partition bounds (`routing`) and writes to directly, checking the
//! partition's constraint as the executor would (compiled once per partition).
//! A statement that stores many clicks keeps its insert open to its end
//! (`writer`).
//!
//! Only the table's own columns are known here. If someone added a column
//! (with a default this code would not apply), changed a type, partitioned
//! the table another way (or with a foreign table), or gave it a rule, a
//! statement trigger or a BEFORE ROW trigger, `insert` returns `None` and the
//! caller falls back to a plain SQL INSERT.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use pgrx::prelude::*;

use crate::error::{Error, Result};
use crate::{linkstore, statements};

mod layout;
mod partitions;
mod writer;

use layout::{Layout, read_layout};
use partitions::{Routing, read_routing};
use writer::{Key, Writer};
pub use writer::{statement_ended, statement_forgotten};

/// A signed delivery ready to insert.
pub struct Queued {
    pub subscription_id: i64,
    pub body: Rc<str>,
    pub signature: String,
}

thread_local! {
    /// Forgotten, with every layout, on any relcache invalidation of the
    /// table, a partition or an index of theirs (ALTER TABLE, ATTACH, DROP).
    static ROUTING: RefCell<Option<Rc<Routing>>> = const { RefCell::new(None) };
    static LAYOUTS: RefCell<Vec<Rc<Layout>>> = const { RefCell::new(Vec::new()) };
    static FORGET_REGISTERED: Cell<bool> = const { Cell::new(false) };
    /// Relcache invalidations seen, of any relation: one arriving while a
    /// layout is read (an index's flags changing) makes that layout stale.
    static INVALIDATIONS: Cell<u64> = const { Cell::new(0) };
}

unsafe extern "C-unwind" fn forget_layout(_: pg_sys::Datum, relid: pg_sys::Oid) {
    INVALIDATIONS.set(INVALIDATIONS.get().wrapping_add(1));
    let concerned = relid == pg_sys::InvalidOid
        || ROUTING.with(|r| r.borrow().as_ref().is_some_and(|r| r.table == relid))
        || LAYOUTS.with(|l| {
            l.borrow().iter().any(|known| {
                relid == known.table
                    || known
                        .indexes
                        .as_ref()
                        .is_some_and(|i| i.oids.contains(&relid))
            })
        });
    if concerned {
        ROUTING.with(|r| *r.borrow_mut() = None);
        LAYOUTS.with(|l| l.borrow_mut().clear());
    }
}

/// When a row this transaction queues comes due: the clock read once the
/// transaction holds its id, not the transaction's start. The worker starts
/// each subscription's walk of the due index at a floor (see `floors`) no later
/// than the oldest start among transactions holding an id when it looked; one
/// that takes its id after that reads the clock later, so its rows never fall
/// below a floor. Every writer of a due time a concurrent claim might not see
/// uses this.
pub fn due_stamp() -> pg_sys::TimestampTz {
    // SAFETY: assigns this transaction's id if it has none (the caller is about
    // to write a row, which would), then reads the clock.
    unsafe {
        pg_sys::GetCurrentTransactionId();
        pg_sys::GetCurrentTimestamp()
    }
}

/// `due_stamp` as SQL takes it.
pub fn due_at() -> pgrx::datum::TimestampWithTimeZone {
    pgrx::datum::TimestampWithTimeZone::try_from(due_stamp())
        .expect("the clock reads a valid timestamp")
}

fn register_forget() {
    if !FORGET_REGISTERED.replace(true) {
        // SAFETY: registering a callback for this backend's life; it only clears RefCells.
        unsafe {
            pg_sys::CacheRegisterRelcacheCallback(Some(forget_layout), pg_sys::Datum::from(0))
        };
    }
}

/// The table's routing, read afresh when it changed.
///
/// # Safety
/// `rel` is the deliveries table, open and locked.
unsafe fn routing_of(rel: pg_sys::Relation) -> Result<Rc<Routing>> {
    if let Some(known) = ROUTING.with(|r| r.borrow().clone()) {
        return Ok(known);
    }
    register_forget();
    let seen = INVALIDATIONS.get();
    // SAFETY: as the caller promises.
    let fresh = Rc::new(unsafe { read_routing(rel) }?);
    if INVALIDATIONS.get() == seen {
        ROUTING.with(|r| *r.borrow_mut() = Some(fresh.clone()));
    }
    Ok(fresh)
}

/// The layout of a relation rows go into, read afresh when it changed.
///
/// # Safety
/// `rel` is open and locked.
unsafe fn layout_of(rel: pg_sys::Relation) -> Rc<Layout> {
    let table = unsafe { (*rel).rd_id };
    if let Some(known) = LAYOUTS.with(|l| l.borrow().iter().find(|l| l.table == table).cloned()) {
        return known;
    }
    register_forget();
    let seen = INVALIDATIONS.get();
    // SAFETY: as the caller promises.
    let fresh = Rc::new(unsafe { read_layout(rel) });
    if INVALIDATIONS.get() == seen {
        LAYOUTS.with(|l| l.borrow_mut().push(fresh.clone()));
    }
    fresh
}

/// Inserts one delivery per entry of `rows` for one event and returns their ids,
/// or `None` when the table's layout is not the one this module knows.
pub fn insert(
    event_id: &str,
    event_type: &str,
    signed_at: i64,
    rows: &[Queued],
) -> Result<Option<Vec<i64>>> {
    let event_uuid = uuid::Uuid::parse_str(event_id)
        .map_err(|e| Error::invalid("event_id", format!("must be a UUID ({e})")))?;
    // A statement's writer is kept while it runs in the subtransaction it started in.
    // SAFETY: reads the current subtransaction's id.
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    let key = statements::current()
        .filter(|running| running.subxact == subxact)
        .map(|running| Key {
            statement: running.id,
            subxact,
            invalidations: INVALIDATIONS.get(),
        });
    if let Some(ids) = key.and_then(|key| {
        writer::with_kept(key, |w| w.write(event_uuid, event_type, signed_at, rows))
    }) {
        return Ok(Some(ids));
    }
    // SAFETY: opens and locks the relations the writer closes.
    let Some(writer) = (unsafe { open(key.is_some()) })? else {
        return Ok(None);
    };
    let ids = writer.write(event_uuid, event_type, signed_at, rows);
    match key {
        // Reading the layout may have seen invalidations: the writer is as fresh as what it read.
        Some(key) => writer::keep(
            Key {
                invalidations: INVALIDATIONS.get(),
                ..key
            },
            writer,
        ),
        None => writer.close(),
    }
    Ok(Some(ids))
}

/// A writer into the relation of `deliveries` that rows created now go into,
/// or `None` when there is none this module can write (the SQL INSERT then
/// writes the row, or raises the error).
///
/// # Safety
/// The writer must be closed, or forgotten at an abort.
unsafe fn open(kept: bool) -> Result<Option<Writer>> {
    let table = linkstore::relations()?.deliveries;
    let lock = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
    let close = |rel| {
        // SAFETY: a relation opened below; the lock stays to the end of the transaction.
        unsafe { pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE) }
    };
    // Locking the table first takes in any change to it, its partitions or
    // their indexes, so what is read next is current for as long as the lock
    // is held (maintain_partitions locks the table out while it attaches).
    // SAFETY: opened and locked like a query's result relation; closed below or by the writer.
    let parent = unsafe { pg_sys::table_open(table, lock) };
    // SAFETY: the table is open and locked.
    let routing = match unsafe { routing_of(parent) } {
        // SAFETY (inserts_simply): the table is open and locked.
        Ok(routing)
            if routing.known
                && routing.id_sequence != pg_sys::InvalidOid
                && unsafe { layout::inserts_simply(parent) } =>
        {
            routing
        }
        other => {
            close(parent);
            return other.map(|_| None);
        }
    };
    // Every row of a transaction is created at its start.
    // SAFETY: reads the transaction's start time.
    let now = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    let Some(target) = routing.target(now) else {
        close(parent);
        return Ok(None); // no partition holds it: the SQL INSERT raises the error
    };
    let rel = if target == table {
        parent
    } else {
        // SAFETY: as the table above; a partition found in its current bounds.
        unsafe { pg_sys::table_open(target, lock) }
    };
    // SAFETY: open and locked.
    let layout = unsafe { layout_of(rel) };
    if rel != parent {
        close(parent);
    }
    if layout.values.is_none() {
        close(rel);
        return Ok(None);
    }
    // SAFETY: open and locked, with a known layout.
    Ok(Some(unsafe {
        Writer::open(rel, layout, routing.id_sequence, kept)
    }))
}
