//! ern-registry: a pseudonymised patient registry service for the European Reference
//! Networks on rare diseases. See `docs/architecture.md` for the map.

pub mod aggregate;
pub mod api;
pub mod audit;
pub mod auth;
pub mod config;
pub mod connections;
pub mod consent;
pub mod data_dir;
pub mod domain;
pub mod health;
pub mod keys;
pub mod pseudonym;
pub mod ratelimit;
pub mod refusals;
pub mod startup;
pub mod store;
pub mod synthetic;

/// Generated code of the public contract (`proto/ern_registry/v1`).
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("ern_registry.v1");

    /// Encoded descriptor set of the contract, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("ern_registry_descriptor");
}
