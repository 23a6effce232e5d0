//! husk-agent.
fn main() {}
