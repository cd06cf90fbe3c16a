//! What the local backend's calls are, for `deriva_store::observe`: each redb transaction
//! (`backend="redb"`, an `index_db` span with `db.system.name=redb`) and each operation on the
//! leaf files (`backend="files"`, a `leaf_file` span). The `op` labels are the remote
//! backend's where a call means the same.

use deriva_store::observe::{Backend, Call};

/// A redb transaction of `operation` (`read` or `write`) on `table`.
const fn redb(op: &'static str, operation: &'static str, table: &'static str) -> Call {
    Call::Database {
        backend: Backend::Redb,
        op,
        operation,
        table,
    }
}

// `leaves.redb`: the small leaves.
pub(crate) const PUT_LEAF: Call = redb("put_leaf", "write", "leaves");
pub(crate) const GET_LEAF: Call = redb("get_leaf", "read", "leaves");
pub(crate) const FIND_LEAF: Call = redb("find_leaf", "read", "leaves");
pub(crate) const LIST_LEAVES: Call = redb("list_leaves", "read", "leaves");
pub(crate) const DELETE_LEAF: Call = redb("delete_leaf", "write", "leaves");

// `deriva.redb`: recipes, dependents, pins, output sizes, materialization records.
pub(crate) const PUT_RECIPES: Call = redb("put_recipes", "write", "recipes");
pub(crate) const GET_RECIPE: Call = redb("get_recipe", "read", "recipes");
pub(crate) const FIND_RECIPES: Call = redb("find_recipes", "read", "recipes");
pub(crate) const DEPENDENTS: Call = redb("dependents", "read", "dependents");
pub(crate) const FIND_REFERENCES: Call = redb("find_references", "read", "dependents");
pub(crate) const DELETE_RECIPE: Call = redb("delete_recipe", "write", "recipes");
pub(crate) const COLLECT_RECIPE: Call = redb("collect_recipe", "write", "recipes");
pub(crate) const LIST_RECIPES: Call = redb("list_recipes", "read", "recipes");
pub(crate) const COUNT_RECIPES: Call = redb("count_recipes", "read", "recipes");
pub(crate) const PIN: Call = redb("pin", "write", "pins");
pub(crate) const UNPIN: Call = redb("unpin", "write", "pins");
pub(crate) const LIST_PINS: Call = redb("list_pins", "read", "pins");
pub(crate) const CHECK_RECIPES: Call = redb("check", "read", "recipes");
pub(crate) const GET_OUTPUT_SIZE: Call = redb("get_output_size", "read", "output_sizes");
pub(crate) const PUT_OUTPUT_SIZE: Call = redb("put_output_size", "write", "output_sizes");
pub(crate) const GET_RECORD: Call = redb("get_record", "read", "provenance");
pub(crate) const PUT_RECORD: Call = redb("put_record", "write", "provenance");
pub(crate) const AUDIT_RECORD: Call = redb("audit_record", "write", "provenance");
pub(crate) const DELETE_RECORDS: Call = redb("delete_records", "write", "provenance");
pub(crate) const LIST_RECORDS: Call = redb("list_records", "read", "provenance");

// `blobs/`: the leaf files.
pub(crate) const FILE_GET: Call = Call::File { op: "get" };
pub(crate) const FILE_OPEN: Call = Call::File { op: "open" };
pub(crate) const FILE_PUT: Call = Call::File { op: "put" };
pub(crate) const FILE_WRITE: Call = Call::File { op: "write" };
pub(crate) const FILE_HEAD: Call = Call::File { op: "head" };
pub(crate) const FILE_DELETE: Call = Call::File { op: "delete" };
pub(crate) const FILE_LIST: Call = Call::File { op: "list" };
pub(crate) const FILE_CHECK: Call = Call::File { op: "check" };
