//! The husk microVM monitor.
