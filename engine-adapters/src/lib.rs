#![doc = include_str!("../README.md")]

pub mod engine;
pub mod fabric_kv;
pub mod worker;
