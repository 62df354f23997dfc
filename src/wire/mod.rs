//! Wire formats, parsed at the edge: the engine only ever sees these typed values.

pub mod base64;
pub mod bridge;
pub mod http;
pub mod mcp;
pub mod openai;
pub mod prometheus;
pub mod transcript;
