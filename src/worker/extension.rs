//! Is pg_linkhooks itself installed here? The worker and the housekeeper are
//! superuser sessions that run statements on `linkhooks.…` objects. Any role
//! with CREATE on a database can make a schema called `linkhooks` with
//! look-alike tables and functions; run from a superuser session, their
//! triggers and function bodies would run as the superuser. So only the
//! extension counts, and only if a superuser owns its schema (CREATE EXTENSION
//! makes it so: nobody else can then create, replace or drop objects in it).
//! Every transaction also locks the extension, so a DROP EXTENSION (and a
//! look-alike made after it) waits until that transaction has ended.

use pgrx::prelude::*;

use crate::error::Result;

/// What a database holds under the name `linkhooks`.
pub enum Found {
    /// The extension (its `pg_extension` oid), its schema a superuser's.
    Installed(pg_sys::Oid),
    /// A `linkhooks.deliveries` that is not the extension's, or the extension
    /// in a schema someone else owns: why, for the log.
    LookAlike(String),
    Absent,
}

/// Looks it up (one catalog query).
pub fn find() -> Result<Found> {
    Spi::connect(|client| {
        let rows = client.select(
            "SELECT e.oid, pg_catalog.to_regclass('linkhooks.deliveries') IS NOT NULL,
                    pg_catalog.pg_get_userbyid(n.nspowner)::text, r.rolsuper
               FROM pg_catalog.pg_extension e
               JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
               JOIN pg_catalog.pg_roles r ON r.oid = n.nspowner
              WHERE e.extname = 'pg_linkhooks'",
            None,
            &[],
        )?;
        if let Some(row) = rows.into_iter().next() {
            let owner: String = row.get(3)?.unwrap_or_default();
            return Ok(
                match (
                    row.get::<pg_sys::Oid>(1)?,
                    row.get::<bool>(2)?,
                    row.get::<bool>(4)?,
                ) {
                    (Some(oid), Some(true), Some(true)) => Found::Installed(oid),
                    (_, _, Some(false)) => Found::LookAlike(format!(
                        "its schema \"linkhooks\" is owned by {owner}, not a superuser (a superuser may run ALTER SCHEMA linkhooks OWNER TO CURRENT_USER)"
                    )),
                    _ => Found::Absent, // no deliveries table: not an install this worker can serve
                },
            );
        }
        let look_alike = client
            .select(
                "SELECT pg_catalog.to_regclass('linkhooks.deliveries') IS NOT NULL",
                None,
                &[],
            )?
            .first()
            .get_one::<bool>()?
            .unwrap_or(false);
        Ok(if look_alike {
            Found::LookAlike(
                "a schema \"linkhooks\" with a table \"deliveries\" is there, but not the extension"
                    .into(),
            )
        } else {
            Found::Absent
        })
    })
}

/// Locks the extension `oid` until the transaction ends; false if it is no
/// longer installed (dropped, perhaps made again: then `find` it anew).
pub fn hold(oid: pg_sys::Oid) -> bool {
    // SAFETY: inside a transaction; a lock on an object id, released at its end.
    unsafe {
        pg_sys::LockDatabaseObject(
            pg_sys::ExtensionRelationId,
            oid,
            0,
            pg_sys::AccessShareLock as pg_sys::LOCKMODE,
        );
        // After the lock: a DROP that committed meanwhile is seen.
        pg_sys::get_extension_oid(c"pg_linkhooks".as_ptr(), true) == oid
    }
}
