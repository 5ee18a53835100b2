//! The relay's unit tests.

/// Every idle connection holds one relay: keep it small (it was 1,200
/// bytes before injected frames were stored compactly).
#[test]
fn relay_state_stays_small() {
    let size = std::mem::size_of::<super::Relay<tokio::net::TcpStream, tokio::net::TcpStream>>();
    assert!(size <= 800, "Relay grew to {size} bytes");
    assert!(std::mem::size_of::<super::Inject>() <= 24);
}
