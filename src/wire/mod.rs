//! The wire, below both ingress and egress: protobuf requests and Kafka
//! messages validated into domain commands (`validate`, `messages`), and the
//! domain's values shown on the wire (`convert`). Inputs and outputs both use
//! it; neither reaches into the other.

pub mod convert;
pub mod messages;
pub mod validate;
