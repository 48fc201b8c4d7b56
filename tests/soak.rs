//! Chaos soak (placeholder until written).
fn main() {}
