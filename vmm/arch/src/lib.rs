//! Architecture support for the husk VMM (x86_64 only).
