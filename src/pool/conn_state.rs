//! What a server connection carries for the sessions that use it under transaction pooling:
//! the statement names prepared on it and the session parameters applied to it. The pool
//! owns the data (it lives and dies with the connection); what it means is the session's
//! (`session::prepared`, `session::params` implement these types), so `pool` does not
//! depend on `session`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Names prepared on one server connection, oldest first.
#[derive(Default)]
pub struct ServerStatements {
    /// Every name prepared here (`present`), and those whose last Parse or Close went out in
    /// a batch perhaps not answered yet.
    pub(crate) marks: HashMap<String, Mark>,
    /// The names prepared here, oldest first.
    pub(crate) order: VecDeque<String>,
    /// The number of the batch being written to this connection (wrapping).
    pub(crate) batch: u32,
}

/// What is known of one name on a server connection.
#[derive(Clone, Copy)]
pub(crate) struct Mark {
    pub(crate) present: bool,
    /// The batch of the last Parse or Close of the name sent: while that batch is
    /// unanswered, an error in it may leave the name other than `present` says.
    pub(crate) batch: u32,
    /// That was a client's Parse defining the statement under this name.
    pub(crate) defining: bool,
}

/// One value per tracked session parameter (`session::params::TRACKED`); an absent one is
/// the server connection's own default (what `RESET` gives on a pooled connection). Sparse
/// and sorted by position: clients set few of them, and every session, idle ones included,
/// carries two of these.
#[derive(Clone, Default, Debug, PartialEq, Eq)]
pub struct ParamSet(pub(crate) Vec<(u8, Arc<str>)>);
