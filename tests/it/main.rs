//! Larder's one integration-test binary (one binary links actix once): real origins, real servers on port 0, HTTP on the wire.

mod support;

mod admin;
mod bounds;
mod cli;
mod fuzz_checks;
mod herd;
mod hostile;
mod ops;
mod origin_faults;
mod persistence;
mod poisoning;
mod proxy;
mod range;
mod rawnet;
mod read_only;
mod store;
