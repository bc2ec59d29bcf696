//! Code generated from `proto/` by `build.rs`.

#![allow(clippy::all, missing_docs)]

pub mod account {
    pub mod v1 {
        tonic::include_proto!("account.v1");
    }
    /// Between the replicas of a group (design 7), on `--raft-addr`.
    pub mod raft {
        pub mod v1 {
            tonic::include_proto!("account.raft.v1");
        }
    }
}

pub mod events {
    tonic::include_proto!("events");
}

/// The encoded `FileDescriptorSet` of both protos, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("descriptor");
