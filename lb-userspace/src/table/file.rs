//! The table file `lbctl apply` reads and `lbctl export` writes: every service, and optionally
//! every node, as JSON. Values are checked as they are read, by the parsers of the command line,
//! so a bad one is reported with its line and column in the words `service add` would use.
//!
//! ```json
//! {
//!   "nodes": [{"name": "n1", "underlay_ip": "192.168.1.11"}],
//!   "services": [
//!     {"name": "web", "port": 8080, "backends": ["10.0.0.6:80", "10.0.0.7:80@n1*2"],
//!      "scheduler": "maglev", "health": {"http": "/healthz", "interval": "5s"}},
//!     {"name": "dns", "port": 53, "proto": "udp", "vip": "10.1.1.1", "backends": ["10.0.0.6:53"]}
//!   ]
//! }
//! ```
use std::{fmt::Display, net::IpAddr};

use serde::{Deserialize, Deserializer, Serialize, Serializer, de::Error as _};

use crate::table::{
    self, BackendSpec, HealthCheck, HealthUpdate, Node, Proto, Scheduler, ServiceSpec, Table,
    format_duration_ms,
};

/// A whole table file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableFile {
    /// When given, the node list becomes exactly this one; left out, the nodes stay as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<Vec<NodeEntry>>,
    /// Every service; services of the table that are not here are removed.
    pub services: Vec<ServiceEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    #[serde(deserialize_with = "node_name")]
    pub name: String,
    #[serde(deserialize_with = "underlay_ip")]
    pub underlay_ip: IpAddr,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceEntry {
    #[serde(deserialize_with = "service_name")]
    pub name: String,
    #[serde(deserialize_with = "port")]
    pub port: u16,
    #[serde(default = "tcp", deserialize_with = "proto")]
    pub proto: Proto,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "vip"
    )]
    pub vip: Option<IpAddr>,
    /// `IP:PORT` or `IP:PORT@NODE`, then `*WEIGHT` unless 1, in round-robin order.
    #[serde(deserialize_with = "backends", serialize_with = "display_each")]
    pub backends: Vec<BackendSpec>,
    /// `rr` (the default) or `maglev`.
    #[serde(
        default,
        skip_serializing_if = "Scheduler::is_default",
        deserialize_with = "scheduler"
    )]
    pub scheduler: Scheduler,
    #[serde(default, skip_serializing_if = "HealthEntry::is_default")]
    pub health: HealthEntry,
}

/// A service's health checks as `lbctl service health` takes them. What is left out has its
/// default, whatever the service had before: a TCP connect every 2s, timeout 1s, rise 2, fall 3.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthEntry {
    /// Not checked: every backend counts as healthy.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub off: bool,
    /// Probe with an HTTP GET of this path instead of a TCP connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_status: Option<u16>,
    /// Milliseconds; written `2s` or `500ms` in the file.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "duration",
        serialize_with = "duration_text"
    )]
    pub interval: Option<u64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "duration",
        serialize_with = "duration_text"
    )]
    pub timeout: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rise: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fall: Option<u32>,
    /// Refused or unanswered connections in a row that eject a backend (0: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eject_after: Option<u32>,
}

impl HealthEntry {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// The settings this entry declares, over the defaults.
    pub fn check(&self) -> HealthCheck {
        HealthUpdate {
            enabled: Some(!self.off),
            probe: Some(self.http.clone()),
            expect_status: self.expect_status,
            interval_ms: self.interval,
            timeout_ms: self.timeout,
            rise: self.rise,
            fall: self.fall,
            eject_after: self.eject_after,
        }
        .apply(&HealthCheck::default())
    }

    /// The entry that declares `check`: only what differs from the defaults.
    pub fn of(check: &HealthCheck) -> Self {
        let default = HealthCheck::default();
        fn unless_default<T: PartialEq>(value: T, default: T) -> Option<T> {
            (value != default).then_some(value)
        }
        Self {
            off: !check.enabled,
            http: check.http_path.clone(),
            expect_status: unless_default(check.expect_status, default.expect_status),
            interval: unless_default(check.interval_ms, default.interval_ms),
            timeout: unless_default(check.timeout_ms, default.timeout_ms),
            rise: unless_default(check.rise, default.rise),
            fall: unless_default(check.fall, default.fall),
            eject_after: unless_default(check.eject_after, default.eject_after),
        }
    }
}

impl TableFile {
    /// Reads a table file. The error says what is wrong and where (line and column).
    pub fn parse(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|err| err.to_string())
    }

    /// The file that declares `table`: its services, and its nodes when `with_nodes`.
    pub fn of(table: &Table, with_nodes: bool) -> Self {
        Self {
            nodes: with_nodes.then(|| {
                table
                    .nodes
                    .iter()
                    .map(|n| NodeEntry {
                        name: n.name.clone(),
                        underlay_ip: n.ip,
                    })
                    .collect()
            }),
            // Docker's services are Docker's to declare (`lbctl daemon --docker`): a file
            // exported here and applied elsewhere must not copy them as the operator's.
            services: table
                .services
                .iter()
                .filter(|s| s.origin.is_operator())
                .map(|s| ServiceEntry {
                    name: s.name.clone(),
                    port: s.port,
                    proto: s.proto,
                    vip: s.vip,
                    backends: s.backends.iter().map(table::Backend::spec).collect(),
                    scheduler: s.scheduler,
                    health: HealthEntry::of(&s.health_check),
                })
                .collect(),
        }
    }

    /// Pretty JSON, ending with a newline.
    pub fn to_json(&self) -> String {
        let mut text = serde_json::to_string_pretty(self).expect("plain data encodes");
        text.push('\n');
        text
    }

    /// The declared nodes, if the file declares them.
    pub fn nodes(&self) -> Option<Vec<Node>> {
        self.nodes.as_ref().map(|nodes| {
            nodes
                .iter()
                .map(|n| Node {
                    name: n.name.clone(),
                    ip: n.underlay_ip,
                })
                .collect()
        })
    }

    /// The declared services, as `Table::apply` takes them.
    pub fn services(&self) -> Vec<ServiceSpec> {
        self.services
            .iter()
            .map(|s| ServiceSpec {
                name: s.name.clone(),
                proto: s.proto,
                port: s.port,
                vip: s.vip,
                backends: s.backends.clone(),
                health_check: s.health.check(),
                scheduler: s.scheduler,
            })
            .collect()
    }
}

fn tcp() -> Proto {
    Proto::Tcp
}

/// A string, checked by `check`: a failed check is an error at the value's line and column.
fn checked<'de, D: Deserializer<'de>, T>(
    deserializer: D,
    check: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, D::Error> {
    let text = String::deserialize(deserializer)?;
    check(&text).map_err(D::Error::custom)
}

fn service_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    checked(d, |s| {
        table::validate_name("service", s).map(|()| s.to_owned())
    })
}

fn node_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    checked(d, |s| {
        table::validate_name("node", s).map(|()| s.to_owned())
    })
}

fn underlay_ip<'de, D: Deserializer<'de>>(d: D) -> Result<IpAddr, D::Error> {
    checked(d, table::parse_node_ip)
}

fn proto<'de, D: Deserializer<'de>>(d: D) -> Result<Proto, D::Error> {
    checked(d, str::parse)
}

fn scheduler<'de, D: Deserializer<'de>>(d: D) -> Result<Scheduler, D::Error> {
    checked(d, str::parse)
}

fn vip<'de, D: Deserializer<'de>>(d: D) -> Result<Option<IpAddr>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|s| table::parse_vip(&s).map_err(D::Error::custom))
        .transpose()
}

/// A port is a JSON number, checked as the command line checks it.
fn port<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    let number = i64::deserialize(d)?;
    table::parse_port(&number.to_string()).map_err(D::Error::custom)
}

fn backends<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<BackendSpec>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| table::parse_weighted_backend_spec(s).map_err(D::Error::custom))
        .collect()
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|s| table::parse_duration_ms(&s).map_err(D::Error::custom))
        .transpose()
}

fn display_each<S: Serializer, T: Display>(values: &[T], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(values.iter().map(ToString::to_string))
}

fn duration_text<S: Serializer>(ms: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match ms {
        Some(ms) => s.serialize_str(&format_duration_ms(*ms)),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"{
  "nodes": [{"name": "n1", "underlay_ip": "192.168.1.11"}],
  "services": [
    {"name": "web", "port": 8080, "backends": ["10.0.0.6:80", "10.0.0.7:80@n1*3"],
     "scheduler": "maglev",
     "health": {"http": "/healthz", "interval": "5s", "timeout": "500ms"}},
    {"name": "dns", "port": 53, "proto": "UDP", "vip": "10.1.1.1", "backends": ["10.0.0.6:53"],
     "health": {"off": true}}
  ]
}"#;

    #[test]
    fn a_file_declares_services_and_nodes_with_defaults() {
        let file = TableFile::parse(EXAMPLE).unwrap();
        assert_eq!(
            file.nodes(),
            Some(vec![Node {
                name: "n1".into(),
                ip: "192.168.1.11".parse().unwrap()
            }])
        );
        let services = file.services();
        let web = &services[0];
        assert_eq!((web.proto, web.port, web.vip), (Proto::Tcp, 8080, None));
        assert_eq!(web.backends[1].to_string(), "10.0.0.7:80@n1*3");
        assert_eq!((web.backends[0].weight, web.backends[1].weight), (1, 3));
        assert_eq!(web.scheduler, Scheduler::Maglev);
        assert_eq!(
            web.health_check,
            HealthCheck {
                http_path: Some("/healthz".into()),
                interval_ms: 5_000,
                timeout_ms: 500,
                ..HealthCheck::default()
            }
        );
        let dns = &services[1];
        assert_eq!(dns.proto, Proto::Udp);
        assert_eq!(dns.vip, Some("10.1.1.1".parse().unwrap()));
        assert!(!dns.health_check.enabled);
        assert_eq!(dns.scheduler, Scheduler::RoundRobin, "the default");
        let no_nodes = TableFile::parse(r#"{"services": []}"#).unwrap();
        assert_eq!(no_nodes.nodes(), None, "nodes left out: left as they are");
    }

    #[test]
    fn bad_values_are_named_with_their_line_and_column() {
        let service = |fields: &str| format!("{{\"services\": [\n  {{{fields}}}\n]}}");
        for (text, wanted) in [
            (
                service(r#""name": "web", "port": 8080, "backends": ["10.0.0.300:80"]"#),
                "invalid backend '10.0.0.300:80': '10.0.0.300' is not an IPv4 address at line 2",
            ),
            (
                service(r#""name": "web", "port": 0, "backends": []"#),
                "invalid port '0': must be between 1 and 65535 at line 2 column 27",
            ),
            (
                service(r#""name": "web", "port": 65536, "backends": []"#),
                "invalid port '65536'",
            ),
            (
                service(r#""name": "web", "port": "80", "backends": []"#),
                "invalid type: string \"80\", expected i64 at line 2",
            ),
            (
                service(r#""name": "web", "prot": "udp", "port": 80, "backends": []"#),
                "unknown field `prot`, expected one of",
            ),
            (
                service(r#""name": "web", "port": 80"#),
                "missing field `backends` at line 2 column 29",
            ),
            (
                service(r#""name": "w/b", "port": 80, "backends": []"#),
                "invalid service name 'w/b'",
            ),
            (
                service(r#""name": "web", "port": 80, "proto": "sctp", "backends": []"#),
                "invalid protocol 'sctp': expected tcp or udp",
            ),
            (
                service(r#""name": "web", "port": 80, "vip": "0.0.0.0", "backends": []"#),
                "invalid VIP '0.0.0.0'",
            ),
            (
                service(r#""name": "web", "port": 80, "backends": ["10.0.0.6:80@n 1"]"#),
                "invalid node name 'n 1'",
            ),
            (
                service(r#""name": "web", "port": 80, "backends": ["10.0.0.6:80*300"]"#),
                "invalid weight '300': a whole number from 0 (no new flows) to 256 at line 2",
            ),
            (
                service(r#""name": "web", "port": 80, "backends": [], "scheduler": "wlc""#),
                "invalid scheduler 'wlc': expected rr (round-robin) or maglev at line 2",
            ),
            (
                service(
                    r#""name": "web", "port": 80, "backends": [], "health": {"interval": "2"}"#,
                ),
                "invalid duration '2'",
            ),
            (
                service(r#""name": "web", "port": 80, "backends": [], "health": {"tcp": true}"#),
                "unknown field `tcp`",
            ),
            (
                r#"{"nodes": [{"name": "n1", "underlay_ip": "127.0.0.1"}], "services": []}"#.into(),
                "invalid underlay IP '127.0.0.1'",
            ),
            (r#"{"services": [}"#.into(), "at line 1 column 15"),
            (r#"{"servics": []}"#.into(), "unknown field `servics`"),
        ] {
            let err = TableFile::parse(&text).unwrap_err();
            assert!(err.contains(wanted), "{text}: {err}");
        }
    }

    #[test]
    fn a_file_of_ipv6_nodes_applies_and_exports_and_one_of_two_families_is_refused() {
        let text = r#"{
  "nodes": [{"name": "n1", "underlay_ip": "2001:db8::1"},
            {"name": "n2", "underlay_ip": "2001:db8::2"}],
  "services": [{"name": "web", "port": 8080,
                "backends": ["10.0.0.7:80@n2", "[2001:db8:5::7]:80@n1"]}]
}"#;
        let file = TableFile::parse(text).unwrap();
        let mut table = Table::default();
        let nodes = file.nodes().unwrap();
        assert_eq!(table.apply(Some(&nodes), &file.services()), Ok(true));
        assert_eq!(table.nodes[1].ip.to_string(), "2001:db8::2");
        let exported = TableFile::of(&table, true).to_json();
        assert!(
            exported.contains(r#""underlay_ip": "2001:db8::2""#),
            "{exported}"
        );
        assert_eq!(TableFile::parse(&exported).unwrap(), file);

        // An IPv4 node among IPv6 ones: refused, the table as it was.
        let mixed = text.replace("2001:db8::2", "10.0.0.2");
        let file = TableFile::parse(&mixed).unwrap();
        let before = table.clone();
        let err = table
            .apply(Some(&file.nodes().unwrap()), &file.services())
            .unwrap_err();
        assert!(err.contains("one family"), "{err}");
        assert_eq!(table, before);
        let err = TableFile::parse(&text.replace("2001:db8::2", "fe80::2")).unwrap_err();
        assert!(
            err.contains("invalid underlay IP 'fe80::2': link-local"),
            "{err}"
        );
    }

    #[test]
    fn health_entries_name_only_what_differs_from_the_defaults() {
        assert_eq!(
            HealthEntry::of(&HealthCheck::default()),
            HealthEntry::default()
        );
        for check in [
            HealthCheck::default(),
            HealthCheck {
                enabled: false,
                http_path: Some("/up".into()),
                expect_status: 204,
                interval_ms: 1_500,
                timeout_ms: 250,
                rise: 1,
                fall: 5,
                eject_after: 0,
            },
        ] {
            assert_eq!(HealthEntry::of(&check).check(), check);
        }
    }

    #[test]
    fn an_exported_table_applies_back_to_itself() {
        let mut table = Table::default();
        let file = TableFile::parse(EXAMPLE).unwrap();
        table
            .apply(file.nodes().as_deref(), &file.services())
            .unwrap();
        let exported = TableFile::of(&table, true);
        assert_eq!(exported, file);
        let reread = TableFile::parse(&exported.to_json()).unwrap();
        assert_eq!(reread, file);
        // Into an empty table, and over itself (no change).
        let mut copy = Table::default();
        copy.apply(reread.nodes().as_deref(), &reread.services())
            .unwrap();
        assert_eq!(copy.services, table.services);
        assert_eq!(
            table.apply(reread.nodes().as_deref(), &reread.services()),
            Ok(false)
        );
    }
}
