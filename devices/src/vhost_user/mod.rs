//! What both vhost-user servers share.

mod connections;

pub(crate) use connections::accepted_connections;
