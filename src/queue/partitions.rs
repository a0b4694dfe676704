//! Where the deliveries table puts a row: the table itself, or the partition
//! whose range holds the row's `created_at`, read from the relcache's
//! partition descriptor and found with `routing::slot`.

use pgrx::IntoDatum;
use pgrx::prelude::*;
use std::ffi::CStr;

use crate::error::Result;
use crate::routing::{self, Bound};

/// Where the deliveries table puts a row, as this backend last saw it.
pub(super) struct Routing {
    pub(super) table: pg_sys::Oid,
    /// The identity sequence of `id` (the partitioned table's).
    pub(super) id_sequence: pg_sys::Oid,
    /// `None` when the table is not partitioned: rows go into it.
    partitions: Option<Partitions>,
    /// False when the table is partitioned in a way this module does not route.
    pub(super) known: bool,
}

/// A range partitioning on `created_at`: the bounds in order, the partition
/// of each gap between them (`routing::slot`), and the default partition.
struct Partitions {
    bounds: Vec<Bound>,
    gaps: Vec<Option<pg_sys::Oid>>,
    default: Option<pg_sys::Oid>,
}

impl Routing {
    /// The relation a row created at `created_at` goes into, if any.
    pub(super) fn target(&self, created_at: i64) -> Option<pg_sys::Oid> {
        match &self.partitions {
            None => Some(self.table),
            Some(p) => p.gaps[routing::slot(&p.bounds, created_at)].or(p.default),
        }
    }
}

/// # Safety
/// `rel` is open and locked.
pub(super) unsafe fn read_routing(rel: pg_sys::Relation) -> Result<Routing> {
    unsafe {
        let table = (*rel).rd_id;
        let desc = (*rel).rd_att;
        let attrs = (*desc).attrs.as_slice((*desc).natts as usize);
        let id_sequence = attrs
            .iter()
            .position(|a| !a.attisdropped && CStr::from_ptr(a.attname.data.as_ptr()) == c"id")
            .map_or(pg_sys::InvalidOid, |n| {
                pg_sys::getIdentitySequence(table, n as i16 + 1, true)
            });
        if (*(*rel).rd_rel).relkind != pg_sys::RELKIND_PARTITIONED_TABLE as std::ffi::c_char {
            return Ok(Routing {
                table,
                id_sequence,
                partitions: None,
                known: true,
            });
        }
        let key: Option<String> =
            pgrx::direct_function_call(pg_sys::pg_get_partkeydef, &[table.into_datum()]);
        let partdesc = pg_sys::RelationGetPartitionDesc(rel, true);
        let bounds_info = (*partdesc).boundinfo;
        // No partition at all leaves the arrays null.
        let known = key.as_deref() == Some("RANGE (created_at)")
            && (*partdesc).nparts > 0
            && std::slice::from_raw_parts((*partdesc).is_leaf, (*partdesc).nparts as usize)
                .iter()
                .all(|leaf| *leaf);
        if !known || bounds_info.is_null() {
            // Not routed here, or no partition at all: the SQL INSERT says why.
            return Ok(Routing {
                table,
                id_sequence,
                partitions: None,
                known: false,
            });
        }
        let oids = std::slice::from_raw_parts((*partdesc).oids, (*partdesc).nparts as usize);
        let info = &*bounds_info;
        let n = info.ndatums as usize;
        let datums = std::slice::from_raw_parts(info.datums, n);
        let kinds = std::slice::from_raw_parts(info.kind, n);
        let bounds = (0..n)
            .map(|i| match *kinds[i] {
                pg_sys::PartitionRangeDatumKind::PARTITION_RANGE_DATUM_MINVALUE => Bound::Min,
                pg_sys::PartitionRangeDatumKind::PARTITION_RANGE_DATUM_MAXVALUE => Bound::Max,
                _ => Bound::Value((*datums[i]).value() as i64),
            })
            .collect();
        let part = |index: i32| (index >= 0).then(|| oids[index as usize]);
        let gaps = std::slice::from_raw_parts(info.indexes, info.nindexes as usize)
            .iter()
            .map(|&index| part(index))
            .collect::<Vec<_>>();
        Ok(Routing {
            table,
            id_sequence,
            known: gaps.len() == n + 1,
            partitions: Some(Partitions {
                bounds,
                gaps,
                default: part(info.default_index),
            }),
        })
    }
}
