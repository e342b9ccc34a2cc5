//! Larder's one integration-test binary (one binary links actix once): real origins, real servers on port 0, HTTP on the wire.

mod support;

mod admin;
mod bounds;
mod cli;
mod herd;
mod ops;
mod persistence;
mod proxy;
mod range;
mod store;
