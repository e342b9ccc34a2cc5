//! Larder: a caching HTTP reverse proxy that keeps its cache on disk.
//!
//! Data flows one way: request → `key` → `store` lookup → `policy` decision → hit, or an
//! origin fetch (`upstream`) that `policy` judges storable and `store` keeps. `policy` is pure
//! (no I/O, no clock); `store` is the only module that touches sled, bincode and body files;
//! `proxy`, `admin` and `server` are the only modules that see actix.

pub mod admin;
pub mod cli;
pub mod clock;
pub mod config;
pub mod dump;
pub mod key;
pub mod maintenance;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod proxy;
pub mod server;
pub mod store;
pub mod upstream;
