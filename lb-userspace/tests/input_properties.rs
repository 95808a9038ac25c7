//! Property tests of what lbctl reads from outside: the values of its command-line arguments
//! (ports, VNIs, backends `IP:PORT[@NODE]`, durations, addresses, names) and its state file.
//! Any input: no panic. Valid input: what lbctl writes back parses to the same value. Invalid
//! input: an error that names it.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    str::FromStr,
};

use lb_common::MAX_VNI;
use lb_userspace::{
    dataplane::sync,
    instance::state::{self, State},
    table::{
        BackendSpec, DEFAULT_WEIGHT, HealthUpdate, MAX_DURATION_MS, Proto, Table,
        format_duration_ms, parse_backend_spec, parse_duration_ms, parse_node_ip, parse_port,
        parse_vip, parse_vni, validate_name,
    },
};
use proptest::prelude::*;

/// Text a parser may be given: anything at all, or text made of the characters its valid input
/// is made of (which random strings seldom hit).
fn argument_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[0-9]{0,12}",
        "[0-9.:@a-z_-]{0,30}",
        "([0-9]{1,3}\\.){3}[0-9]{1,3}:[0-9]{1,6}(@[a-z0-9.]{0,4})?",
        "[0-9.+-]{0,8}(ms|s|m|)",
    ]
}

/// Asserts that `result` is an error quoting `input`, as every argument error does.
fn names_input<T: std::fmt::Debug>(result: Result<T, String>, input: &str) {
    let err = result.unwrap_err();
    assert!(err.contains(&format!("'{input}'")), "{err:?} for {input:?}");
}

fn backend_ip() -> impl Strategy<Value = Ipv4Addr> {
    any::<u32>()
        .prop_map(Ipv4Addr::from)
        .prop_filter("an address a backend can have", |ip| {
            !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast())
        })
}

fn node_name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,63}"
}

proptest! {
    #[test]
    fn ports_round_trip_and_others_are_refused_by_value(text in argument_text(), port in 1u16..) {
        prop_assert_eq!(parse_port(&port.to_string()), Ok(port));
        match parse_port(&text) {
            Ok(port) => prop_assert_eq!(parse_port(&port.to_string()), Ok(port)),
            Err(err) => prop_assert!(err.contains(&format!("'{text}'")), "{}", err),
        }
    }

    #[test]
    fn vnis_round_trip_and_others_are_refused_by_value(text in argument_text(), vni in 0..=MAX_VNI) {
        prop_assert_eq!(parse_vni(&vni.to_string()), Ok(vni));
        names_input(parse_vni(&(MAX_VNI + 1 + vni).to_string()), &(MAX_VNI + 1 + vni).to_string());
        match parse_vni(&text) {
            Ok(vni) => prop_assert_eq!(parse_vni(&vni.to_string()), Ok(vni)),
            Err(err) => prop_assert!(err.contains(&format!("'{text}'")), "{}", err),
        }
    }

    #[test]
    fn durations_round_trip_and_are_never_zero(text in argument_text(), ms in 1..=MAX_DURATION_MS) {
        prop_assert_eq!(parse_duration_ms(&format_duration_ms(ms)), Ok(ms));
        match parse_duration_ms(&text) {
            Ok(ms) => {
                prop_assert!((1..=MAX_DURATION_MS).contains(&ms), "{} ms", ms);
                prop_assert_eq!(parse_duration_ms(&format_duration_ms(ms)), Ok(ms));
            }
            Err(err) => prop_assert!(err.contains(&format!("'{text}'")), "{}", err),
        }
    }

    #[test]
    fn backend_specs_round_trip_through_what_lbctl_prints(
        text in argument_text(),
        ip in backend_ip(),
        port in 1u16..,
        node in proptest::option::of(node_name()),
    ) {
        let spec = BackendSpec { addr: SocketAddrV4::new(ip, port).into(), node, weight: DEFAULT_WEIGHT };
        prop_assert_eq!(parse_backend_spec(&spec.to_string()), Ok(spec));
        match parse_backend_spec(&text) {
            Ok(spec) => prop_assert_eq!(parse_backend_spec(&spec.to_string()), Ok(spec)),
            Err(err) => prop_assert!(err.starts_with(&format!("invalid backend '{text}'")), "{}", err),
        }
    }

    #[test]
    fn addresses_round_trip_and_names_are_plain(text in argument_text()) {
        match parse_node_ip(&text) {
            Ok(ip) => prop_assert_eq!(parse_node_ip(&ip.to_string()), Ok(ip)),
            Err(err) => prop_assert!(err.contains(&format!("'{text}'")), "{}", err),
        }
        match parse_vip(&text) {
            Ok(ip) => prop_assert_eq!(parse_vip(&ip.to_string()), Ok(ip)),
            Err(err) => prop_assert!(err.contains(&format!("'{text}'")), "{}", err),
        }
        let plain = !text.is_empty()
            && text.len() <= 63
            && text.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        match validate_name("node", &text) {
            Ok(()) => prop_assert!(plain),
            Err(err) => prop_assert!(!plain && err.contains(&format!("'{text}'")), "{}", err),
        }
        match Proto::from_str(&text) {
            Ok(proto) => prop_assert_eq!(Proto::from_str(&proto.to_string()), Ok(proto)),
            Err(err) => prop_assert!(err.contains(&format!("'{text}'")), "{}", err),
        }
    }
}

/// One edit of a table, as a command makes it; names, ports and addresses come from small
/// pools so that edits collide (duplicates, unknown names) as often as they succeed.
#[derive(Clone, Debug)]
enum Edit {
    AddNode(usize, u8),
    RemoveNode(usize),
    AddService(usize, bool, u16, Option<u8>, Vec<(u8, Option<usize>)>),
    RemoveService(usize),
    AddBackends(usize, Vec<(u8, Option<usize>)>),
    RemoveBackends(usize, Vec<u8>),
    Drain(usize, u8, bool),
    Health(usize, u64, u64),
    Mesh(u32, u16),
}

const NAMES: [&str; 4] = ["web", "dns", "n1", "n2"];

fn backend_list() -> impl Strategy<Value = Vec<(u8, Option<usize>)>> {
    prop::collection::vec((0u8..6, proptest::option::of(0usize..3)), 1..4)
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (0usize..4, 1u8..4).prop_map(|(n, ip)| Edit::AddNode(n, ip)),
        (0usize..4).prop_map(Edit::RemoveNode),
        (
            0usize..4,
            any::<bool>(),
            prop::sample::select(vec![80u16, 8080, 53]),
            proptest::option::of(1u8..3),
            backend_list()
        )
            .prop_map(|(n, udp, port, vip, backends)| Edit::AddService(
                n, udp, port, vip, backends
            )),
        (0usize..4).prop_map(Edit::RemoveService),
        (0usize..4, backend_list()).prop_map(|(n, backends)| Edit::AddBackends(n, backends)),
        (0usize..4, prop::collection::vec(0u8..6, 1..3))
            .prop_map(|(n, backends)| Edit::RemoveBackends(n, backends)),
        (0usize..4, 0u8..6, any::<bool>()).prop_map(|(n, b, on)| Edit::Drain(n, b, on)),
        (0usize..4, 0u64..5_000, 0u64..5_000).prop_map(|(n, i, t)| Edit::Health(n, i, t)),
        (0u32..=MAX_VNI + 1, any::<u16>()).prop_map(|(vni, port)| Edit::Mesh(vni, port)),
    ]
}

fn spec(backend: u8, node: Option<usize>) -> BackendSpec {
    BackendSpec {
        addr: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, backend + 1), 80).into(),
        node: node.map(|n| NAMES[n + 1].to_owned()),
        weight: DEFAULT_WEIGHT,
    }
}

/// Applies `edit` as lbctl would, and checks that a refused edit changed nothing. Returns
/// whether it was applied.
fn apply(table: &mut Table, edit: Edit) -> bool {
    let specs = |list: Vec<(u8, Option<usize>)>| -> Vec<BackendSpec> {
        list.into_iter().map(|(b, n)| spec(b, n)).collect()
    };
    let before = table.clone();
    let result = match edit {
        Edit::AddNode(n, ip) => table
            .add_node(NAMES[n], Ipv4Addr::new(192, 168, 1, ip).into())
            .map(drop),
        Edit::RemoveNode(n) => table.remove_node(NAMES[n]).map(drop),
        Edit::AddService(n, udp, port, vip, backends) => {
            let proto = if udp { Proto::Udp } else { Proto::Tcp };
            let vip = vip.map(|v| Ipv4Addr::new(10, 1, 1, v).into());
            table.add_service(NAMES[n], proto, port, vip, &specs(backends))
        }
        Edit::RemoveService(n) => table.remove_service(NAMES[n]).map(drop),
        Edit::AddBackends(n, backends) => table.add_backends(NAMES[n], &specs(backends)),
        Edit::RemoveBackends(n, backends) => {
            let list: Vec<BackendSpec> = backends.into_iter().map(|b| spec(b, None)).collect();
            table.remove_backends(NAMES[n], &list)
        }
        Edit::Drain(n, b, on) => table.set_drained(NAMES[n], spec(b, None), on).map(drop),
        Edit::Health(n, interval_ms, timeout_ms) => {
            let update = HealthUpdate {
                interval_ms: Some(interval_ms),
                timeout_ms: Some(timeout_ms),
                ..HealthUpdate::default()
            };
            table.update_health_check(NAMES[n], &update).map(drop)
        }
        Edit::Mesh(vni, port) => table.set_mesh(Some(vni), Some(port)),
    };
    if result.is_err() {
        assert_eq!(
            *table, before,
            "a refused edit changed the table: {result:?}"
        );
    }
    result.is_ok()
}

fn state_after(edits: Vec<Edit>) -> State {
    let mut state = State::default();
    for edit in edits {
        apply(&mut state.table, edit);
    }
    state
}

/// The edits reach the tables they are meant to: of many random runs, most edits are applied
/// (a strategy that only made refused edits would leave every table empty and the properties
/// above vacuous), and some are refused (the refusals are exercised too).
#[test]
fn random_edits_are_mostly_applied_and_sometimes_refused() {
    use proptest::{strategy::ValueTree, test_runner::TestRunner};
    let mut runner = TestRunner::deterministic();
    let (mut applied, mut refused, mut services) = (0, 0, 0);
    for _ in 0..200 {
        let edits = prop::collection::vec(edit(), 0..40)
            .new_tree(&mut runner)
            .unwrap()
            .current();
        let mut table = Table::default();
        for edit in edits {
            if apply(&mut table, edit) {
                applied += 1;
            } else {
                refused += 1;
            }
        }
        services += table.services.len();
    }
    let share = f64::from(applied) / f64::from(applied + refused);
    assert!(
        share > 0.2 && refused > 0,
        "{applied} edits applied, {refused} refused"
    );
    assert!(services > 40, "the runs left {services} services in all");
}

/// The number of values in `json`, itself and every value nested in it (what [`replace_nth`]
/// counts).
fn count_values(json: &serde_json::Value) -> usize {
    1 + match json {
        serde_json::Value::Array(items) => items.iter().map(count_values).sum(),
        serde_json::Value::Object(fields) => fields.values().map(count_values).sum(),
        _ => 0,
    }
}

/// A folder of its own for one property's state files, removed when dropped.
struct StateDir(PathBuf);

impl StateDir {
    fn new(tag: &str) -> StateDir {
        let dir = std::env::temp_dir().join(format!("lbctl-props-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        StateDir(dir)
    }

    fn file(&self) -> PathBuf {
        self.0.join("state.json")
    }

    /// Loads `text` as the state file.
    fn load(&self, text: &[u8]) -> anyhow::Result<State> {
        std::fs::write(self.file(), text).unwrap();
        state::load(&self.0)
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A JSON value to put where another was: of any type, including numbers no field holds.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::{Value, json};
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop::sample::select(vec![0u64, 1, 255, 65_535, 65_536, 16_384, 65_536 * 256])
            .prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        "[ -~]{0,12}".prop_map(Value::from),
        Just(json!([])),
        Just(json!({})),
    ]
}

/// Replaces the `pick`-th value of `json` (counting every value, depth first) with `new`.
fn replace_nth(json: &mut serde_json::Value, pick: &mut usize, new: &serde_json::Value) -> bool {
    if *pick == 0 {
        *json = new.clone();
        return true;
    }
    *pick -= 1;
    let children: Vec<&mut serde_json::Value> = match json {
        serde_json::Value::Array(items) => items.iter_mut().collect(),
        serde_json::Value::Object(fields) => fields.values_mut().collect(),
        _ => Vec::new(),
    };
    children
        .into_iter()
        .any(|child| replace_nth(child, pick, new))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Every table the commands can make is one lbctl reads back: the file's checks refuse
    /// nothing lbctl writes.
    #[test]
    fn tables_made_by_commands_are_saved_and_read_back_unchanged(
        edits in prop::collection::vec(edit(), 0..40),
    ) {
        let state = state_after(edits);
        prop_assert_eq!(state.table.validate(), Ok(()));
        let dir = StateDir::new("roundtrip");
        state::save(&dir.0, &state).unwrap();
        prop_assert_eq!(state::load(&dir.0).unwrap(), state);
    }

    /// A file cut short anywhere (a half-written file, had writes not been atomic) is an error
    /// naming the file, never a smaller table.
    #[test]
    fn a_state_file_cut_anywhere_is_refused_naming_the_file(
        edits in prop::collection::vec(edit(), 0..40),
        cut in any::<prop::sample::Index>(),
    ) {
        let dir = StateDir::new("cut");
        state::save(&dir.0, &state_after(edits)).unwrap();
        let text = std::fs::read(dir.file()).unwrap();
        let whole = text.trim_ascii_end();
        let len = cut.index(whole.len());
        let err = format!("{:#}", dir.load(&text[..len]).unwrap_err());
        prop_assert!(err.contains(&dir.file().display().to_string()), "{}", err);
        prop_assert!(err.contains("damaged"), "{}", err);
    }

    /// Any bytes at all, and any value put anywhere in a valid file: no panic; a file that
    /// loads holds a table that passes the checks and translates into map contents.
    #[test]
    fn any_state_file_loads_or_is_refused_without_panicking(
        edits in prop::collection::vec(edit(), 0..20),
        bytes in prop::collection::vec(any::<u8>(), 0..200),
        pick in any::<usize>(),
        value in json_value(),
    ) {
        let dir = StateDir::new("any");
        if let Err(err) = dir.load(&bytes) {
            let err = format!("{err:#}");
            prop_assert!(err.contains(&dir.file().display().to_string()), "{}", err);
        }
        let mut json = serde_json::to_value(state_after(edits)).unwrap();
        let mut pick = pick % count_values(&json);
        replace_nth(&mut json, &mut pick, &value);
        match dir.load(&serde_json::to_vec(&json).unwrap()) {
            Ok(state) => {
                prop_assert_eq!(state.table.validate(), Ok(()));
                let _ = sync::desired(&state.table, Some("n1"));
            }
            Err(err) => {
                let err = format!("{err:#}");
            prop_assert!(err.contains(&dir.file().display().to_string()), "{}", err);
            }
        }
    }
}
