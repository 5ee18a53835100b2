//! What a client operation failed at, shared by every module that opens or
//! drives connections (the bottom of the tool: it imports none of them).

/// What a client stage failed at (handshake mode counts errors by stage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    Tcp,
    Tls,
    Upgrade,
    Echo,
    Close,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Tcp => "tcp",
            Stage::Tls => "tls",
            Stage::Upgrade => "upgrade",
            Stage::Echo => "echo",
            Stage::Close => "close",
        }
    }
}

/// A failed client operation: the stage and the reason.
#[derive(Debug)]
pub struct StageError {
    pub stage: Stage,
    pub error: anyhow::Error,
}

impl std::fmt::Display for StageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {:#}", self.stage.name(), self.error)
    }
}

pub fn stage<E: Into<anyhow::Error>>(stage: Stage) -> impl FnOnce(E) -> StageError {
    move |e: E| StageError {
        stage,
        error: e.into(),
    }
}
