//! The API test suite: one binary, every test against a real server over a real socket.

mod helpers;

mod admin;
mod auth;
mod changes;
mod cli;
mod documents;
mod ops;
mod realtime;
mod rules;
mod s3_support;
mod security_auth;
mod security_documents;
mod security_http;
mod security_rules;
mod storage;
mod storage_transform;
mod storage_tus;
