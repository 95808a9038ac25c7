//! lbctl, the controller of the lbctl XDP load balancer: the service table, its translation
//! into BPF map contents, and the commands that attach the data plane and change the table.
pub mod cluster;
pub mod commands;
pub mod daemon;
pub mod datapath;
pub mod gossip;
pub mod health;
pub mod install;
pub mod instance;
pub mod instances;
pub mod layout;
pub mod maglev;
pub mod map_ops;
pub mod metrics;
pub mod migrate;
pub mod model;
pub mod netdev;
pub mod reserved_ports;
pub mod socket_lb;
pub mod state;
pub mod sync;
pub mod table_diff;
pub mod table_file;
pub mod underlay;
