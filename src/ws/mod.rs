//! WebSocket protocol pieces berth implements itself: the opening handshake
//! checks, the frame-header parser, and the frame-aware relay (a pure frame
//! processor and the I/O driver that runs it over any byte stream).

pub mod frame;
pub mod handshake;
pub mod relay;
