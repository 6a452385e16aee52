//! Documents, collections and the change log on SQLite.

use super::SqliteStore;
use crate::store::DocumentStore;

impl DocumentStore for SqliteStore {}
