//! basalt: a self-hosted Backend-as-a-Service. One server gives single-page and mobile apps
//! auth, a JSON document database with realtime subscriptions, file storage and sandboxed
//! functions. `main.rs` is a thin CLI over this library; the tests drive the same library.

pub mod app;
pub mod audit;
pub mod auth;
pub mod changes;
pub mod cli;
pub mod config;
pub mod documents;
pub mod error;
pub mod http;
pub mod ids;
pub mod query;
pub mod realtime;
pub mod rules;
pub mod storage;
pub mod store;
pub mod telemetry;
