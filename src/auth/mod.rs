//! Client-facing and upstream authentication.
