//! Pre-copy live migration (placeholder until the stream codec lands).
