//! Documents, collections and the change log on PostgreSQL.

use super::PgStore;
use crate::store::DocumentStore;

impl DocumentStore for PgStore {}
