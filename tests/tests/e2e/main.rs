//! End-to-end tests: a `--dev` room server and sites (the real client engine, or raw
//! WebSockets for malformed input) on loopback.

mod audio;
mod bad_input;
mod cli;
mod control;
mod media;
mod relay;
mod simulcast;
