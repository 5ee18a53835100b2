//! Placeholder until the raw serde types land.
#[derive(Debug, Default, serde::Deserialize)]
pub struct FileConfig {}
