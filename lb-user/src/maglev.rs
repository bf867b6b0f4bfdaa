//! Maglev table builder (placeholder, being written).
