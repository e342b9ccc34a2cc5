//! Schema versions of the on-disk store: refuse newer stores, upgrade older ones in place, one step per version.
//!
//! The history and layout of each version is in `migrations/` at the crate root. Adding a version:
//! write `migrations/000N-….md`, add a `RecordVn` in format.rs if records change, append one step
//! to [`STEPS`], bump [`CURRENT_SCHEMA`], and commit a fixture store written by the previous version.

use std::path::Path;

use super::StoreError;
use super::index::Index;

/// The schema version this code writes.
pub const CURRENT_SCHEMA: u32 = 2;

/// One upgrade step: rewrites a store of version `n` into version `n + 1`.
type Step = fn(&Index) -> Result<(), StoreError>;

/// `STEPS[i]` upgrades version `i + 1` to `i + 2`.
const STEPS: &[Step] = &[
    // v1 → v2: the access order (eviction) and the record-bytes counter; see
    // migrations/0002-access-order.md. A one-time scan of the entries.
    Index::seed_access_order,
];

/// Makes the store at `path` current: records the version of a new store, upgrades an older one,
/// refuses a newer one.
pub(super) fn prepare(index: &Index, path: &Path) -> Result<(), StoreError> {
    prepare_with(index, path, CURRENT_SCHEMA, STEPS)
}

fn prepare_with(
    index: &Index,
    path: &Path,
    current: u32,
    steps: &[Step],
) -> Result<(), StoreError> {
    let found = match index.schema_version()? {
        Some(v) => v,
        // No version and no record: a store created just now (or one whose very first flush
        // was lost in a crash, which holds nothing either).
        None if index.is_empty() => return index.set_schema_version(current),
        None => {
            return Err(StoreError::UnsupportedSchema {
                path: path.to_path_buf(),
                found: 0,
            });
        }
    };
    if found > current {
        return Err(StoreError::NewerSchema {
            path: path.to_path_buf(),
            found,
            supported: current,
        });
    }
    if found == 0 {
        return Err(StoreError::UnsupportedSchema {
            path: path.to_path_buf(),
            found,
        });
    }
    for version in found..current {
        let step =
            steps
                .get(version as usize - 1)
                .ok_or_else(|| StoreError::UnsupportedSchema {
                    path: path.to_path_buf(),
                    found,
                })?;
        tracing::info!(store = %path.display(), from = version, to = version + 1, "upgrading store schema");
        step(index)?;
        // Recorded (and flushed) after each step, so an interrupted upgrade resumes where it stopped.
        // Each step must therefore be safe to re-run on a store it partly converted.
        index.set_schema_version(version + 1)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::index::tests::open_raw;
    use crate::store::{Store, StoreOptions};

    #[test]
    fn a_new_store_records_the_current_version() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path(), StoreOptions::default()).unwrap());
        let index = open_raw(&dir.path().join("db"));
        assert_eq!(index.schema_version().unwrap(), Some(CURRENT_SCHEMA));
    }

    #[test]
    fn a_newer_schema_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path(), StoreOptions::default()).unwrap());
        {
            let index = open_raw(&dir.path().join("db"));
            index.set_schema_version(CURRENT_SCHEMA + 1).unwrap();
        }
        let err = Store::open(dir.path(), StoreOptions::default())
            .err()
            .unwrap();
        match &err {
            StoreError::NewerSchema {
                found, supported, ..
            } => {
                assert_eq!((*found, *supported), (CURRENT_SCHEMA + 1, CURRENT_SCHEMA));
            }
            other => panic!("expected NewerSchema, got {other}"),
        }
        assert!(err.to_string().contains("newer larder"), "{err}");
        // Refusing must not have changed the store.
        let index = open_raw(&dir.path().join("db"));
        assert_eq!(index.schema_version().unwrap(), Some(CURRENT_SCHEMA + 1));
    }

    fn mark_step(index: &Index) -> Result<(), StoreError> {
        assert_eq!(index.schema_version()?, Some(1));
        Ok(())
    }

    #[test]
    fn an_older_schema_runs_each_step_and_records_the_version() {
        let dir = tempfile::tempdir().unwrap();
        let index = open_raw(dir.path());
        index.set_schema_version(1).unwrap();
        prepare_with(&index, dir.path(), 2, &[mark_step]).unwrap();
        assert_eq!(index.schema_version().unwrap(), Some(2));
        // No step known for 2 → 3: refused rather than half-upgraded.
        let err = prepare_with(&index, dir.path(), 3, &[mark_step]).unwrap_err();
        assert!(matches!(
            err,
            StoreError::UnsupportedSchema { found: 2, .. }
        ));
    }
}
