//! WebSocket protocol pieces berth implements itself: the opening handshake
//! checks, the frame-header parser, and the frame-aware relay.

pub mod frame;
pub mod handshake;
pub mod relay;
