//! Unit tests of the mapper.
use bytes::Bytes;
use serde_json::json;

use super::plan::{TemplatePart, split_template};
use super::*;
use crate::error::{Classify, ErrorClass};
use crate::replication::pgoutput::{Column, ReplicaIdentity, TupleData};

const REL: Oid = Oid(16_384);
const INT4: Oid = Oid(23);
const TEXT: Oid = Oid(25);

fn column(name: &str, type_oid: Oid, is_key: bool) -> Column {
    Column {
        is_key,
        name: name.to_owned(),
        type_oid,
        type_modifier: -1,
    }
}

/// public.customer(id int4 primary key, first_name text, city text, password_hash text, bio text)
fn customer(identity: ReplicaIdentity) -> Relation {
    let full = identity == ReplicaIdentity::Full;
    Relation {
        oid: REL,
        namespace: "public".into(),
        name: "customer".into(),
        replica_identity: identity,
        columns: vec![
            column("id", INT4, true),
            column("first_name", TEXT, full),
            column("city", TEXT, full),
            column("password_hash", TEXT, full),
            column("bio", TEXT, full),
        ],
    }
}

fn entity() -> EntityConfig {
    EntityConfig {
        name: EntityName::new("Customer").unwrap(),
        table: TableName {
            schema: "public".into(),
            name: "customer".into(),
        },
        id: None,
        actions: Action::ROW.to_vec(),
        track: None,
        exclude: vec![],
        subject: None,
        derived: vec![],
        row_filter: None,
        children: vec![],
        scheduled_actions: vec![],
        snapshot_action: "Snapshot".into(),
    }
}

fn t(s: &str) -> ColumnValue {
    ColumnValue::Text(Bytes::from(s.to_owned()))
}

fn row(values: Vec<ColumnValue>) -> TupleData {
    TupleData(values)
}

fn tx() -> TxContext {
    TxContext {
        commit_lsn: Lsn(0x10),
        xid: Xid(7),
        commit_time: PgTimestamp(1),
    }
}

fn mapper(entity: EntityConfig, rel: Relation) -> Mapper {
    let mut m = Mapper::new(&[entity]);
    let notes = m.on_relation(rel);
    assert!(notes.is_empty(), "{notes:?}");
    m
}

fn map(m: &mut Mapper, msg: Message) -> Option<EntityEvent> {
    match m.map_change(&tx(), 3, &msg).unwrap()? {
        Mapped::Event(e) => Some(e),
        Mapped::Events(events) => panic!("several events: {events:?}"),
        Mapped::SetAside(r) => panic!("set aside: {}", r.reason),
    }
}

/// The change must be set aside; returns it.
fn set_aside(m: &mut Mapper, msg: Message) -> RejectedChange {
    match m.map_change(&tx(), 3, &msg).unwrap() {
        Some(Mapped::SetAside(r)) => r,
        other => panic!("not set aside: {other:?}"),
    }
}

fn full_row(first: &str, city: &str) -> TupleData {
    row(vec![t("42"), t(first), t(city), t("secret"), t("long bio")])
}

fn update(old: Option<OldTuple>, new: TupleData) -> Message {
    Message::Update {
        relation: REL,
        old,
        new,
    }
}

fn insert(new: TupleData) -> Message {
    Message::Insert { relation: REL, new }
}

fn delete(old: OldTuple) -> Message {
    Message::Delete { relation: REL, old }
}

/// The key-only old tuple a DEFAULT identity sends for the customer table.
fn key_row(id: &str) -> TupleData {
    row(vec![
        t(id),
        ColumnValue::Null,
        ColumnValue::Null,
        ColumnValue::Null,
        ColumnValue::Null,
    ])
}

/// A mapper for `ent` on the customer table with REPLICA IDENTITY FULL, which needs an
/// explicit id.
fn full_identity(mut ent: EntityConfig) -> Mapper {
    ent.id = Some(vec!["id".into()]);
    mapper(ent, customer(ReplicaIdentity::Full))
}

#[test]
fn insert_becomes_created_with_typed_row() {
    let mut m = mapper(entity(), customer(ReplicaIdentity::Default));
    let msg = insert(row(vec![
        t("42"),
        t("Ann"),
        ColumnValue::Null,
        t("x"),
        t("b"),
    ]));
    let e = map(&mut m, msg).unwrap();
    assert_eq!(e.action, Action::Created);
    assert_eq!(e.entity.as_str(), "Customer");
    assert_eq!(e.entity_id, "42");
    assert_eq!((e.commit_lsn, e.seq, e.xid), (Lsn(0x10), 3, Xid(7)));
    assert_eq!(e.table.to_string(), "public.customer");
    assert_eq!(e.changed_fields, None);
    assert_eq!(e.old, None);
    assert_eq!(
        Value::Object(e.row),
        json!({"id": 42, "first_name": "Ann", "city": null, "password_hash": "x", "bio": "b"})
    );
}

#[test]
fn update_with_full_old_row_reports_changed_fields_and_old_row() {
    let mut m = full_identity(entity());
    let old = OldTuple::Full(full_row("Ann", "Oslo"));
    let e = map(&mut m, update(Some(old), full_row("Bea", "Oslo"))).unwrap();
    assert_eq!(e.action, Action::Updated);
    assert_eq!(e.entity_id, "42");
    assert_eq!(e.changed_fields, Some(vec!["first_name".to_owned()]));
    assert_eq!(e.row.get("first_name"), Some(&json!("Bea")));
    assert_eq!(e.old.unwrap().get("first_name"), Some(&json!("Ann")));
}

#[test]
fn update_without_old_row_has_unknown_changed_fields() {
    let mut m = mapper(entity(), customer(ReplicaIdentity::Default));
    let e = map(&mut m, update(None, full_row("Bea", "Oslo"))).unwrap();
    assert_eq!(e.changed_fields, None);
    assert_eq!(e.old, None);
    assert_eq!(e.row.get("city"), Some(&json!("Oslo")));
}

#[test]
fn update_with_key_old_tuple_does_not_guess_changed_fields() {
    let mut m = mapper(entity(), customer(ReplicaIdentity::Default));
    let key = key_row("41");
    let e = map(
        &mut m,
        update(Some(OldTuple::Key(key)), full_row("Bea", "Oslo")),
    )
    .unwrap();
    assert_eq!(e.entity_id, "42");
    assert_eq!(e.changed_fields, None);
    assert_eq!(e.old, None);
}

#[test]
fn delete_with_key_tuple_has_only_key_columns_in_row() {
    let mut m = mapper(entity(), customer(ReplicaIdentity::Default));
    let key = key_row("42");
    let e = map(&mut m, delete(OldTuple::Key(key))).unwrap();
    assert_eq!(e.action, Action::Deleted);
    assert_eq!(e.entity_id, "42");
    assert_eq!(Value::Object(e.row), json!({"id": 42}));
    assert_eq!(e.old, None);
    assert_eq!(e.changed_fields, None);
}

#[test]
fn delete_with_full_tuple_has_whole_old_row() {
    let mut m = full_identity(entity());
    let msg = delete(OldTuple::Full(full_row("Ann", "Oslo")));
    let e = map(&mut m, msg).unwrap();
    assert_eq!(e.row.len(), 5);
    assert_eq!(e.row.get("city"), Some(&json!("Oslo")));
    assert_eq!(e.old, None);
}

fn order_line() -> Relation {
    Relation {
        oid: REL,
        namespace: "sales".into(),
        name: "order_line".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            column("a", TEXT, true),
            column("b", TEXT, true),
            column("qty", INT4, false),
        ],
    }
}

fn order_line_entity() -> EntityConfig {
    EntityConfig {
        name: EntityName::new("OrderLine").unwrap(),
        table: TableName {
            schema: "sales".into(),
            name: "order_line".into(),
        },
        subject: Some("lines/{id}/{qty}".into()),
        ..entity()
    }
}

#[test]
fn composite_ids_are_json_arrays_that_never_collide() {
    let mut m = mapper(order_line_entity(), order_line());
    let ins = |a: &str, b: &str| insert(row(vec![t(a), t(b), t("1")]));
    let first = map(&mut m, ins("a,b", "c")).unwrap();
    let second = map(&mut m, ins("a", "b,c")).unwrap();
    assert_eq!(first.entity_id, r#"["a,b","c"]"#);
    assert_eq!(second.entity_id, r#"["a","b,c"]"#);
    assert_eq!(first.subject.as_deref(), Some(r#"lines/["a,b","c"]/1"#));
    let null_part = insert(row(vec![t("x"), ColumnValue::Null, t("1")]));
    assert_eq!(map(&mut m, null_part).unwrap().entity_id, r#"["x",null]"#);
}

#[test]
fn subject_template_renders_id_and_columns() {
    let mut ent = entity();
    ent.subject = Some("Customer/{id} in {city}".into());
    let mut m = mapper(ent, customer(ReplicaIdentity::Default));
    let e = map(&mut m, insert(full_row("Ann", "Oslo"))).unwrap();
    assert_eq!(e.subject.as_deref(), Some("Customer/42 in Oslo"));
}

#[test]
fn update_touching_no_tracked_column_is_dropped() {
    let mut ent = entity();
    ent.track = Some(vec!["city".into()]);
    let mut m = full_identity(ent);
    let old = OldTuple::Full(full_row("Ann", "Oslo"));
    assert_eq!(
        map(&mut m, update(Some(old), full_row("Bea", "Oslo"))),
        None
    );
    let old = OldTuple::Full(full_row("Ann", "Oslo"));
    let e = map(&mut m, update(Some(old), full_row("Ann", "Bergen"))).unwrap();
    assert_eq!(e.changed_fields, Some(vec!["city".to_owned()]));
}

#[test]
fn tracked_update_with_unknown_old_row_is_emitted() {
    let mut ent = entity();
    ent.track = Some(vec!["city".into()]);
    let mut m = mapper(ent, customer(ReplicaIdentity::Default));
    let e = map(&mut m, update(None, full_row("Bea", "Oslo"))).unwrap();
    assert_eq!(e.changed_fields, None);
}

#[test]
fn excluded_columns_never_appear_in_row_old_or_changed_fields() {
    let mut ent = entity();
    ent.exclude = vec!["password_hash".into()];
    let mut m = full_identity(ent);
    let old = OldTuple::Full(full_row("Ann", "Oslo"));
    let new = row(vec![
        t("42"),
        t("Bea"),
        t("Oslo"),
        t("changed"),
        t("long bio"),
    ]);
    let e = map(&mut m, update(Some(old), new)).unwrap();
    assert!(!e.row.contains_key("password_hash"));
    assert!(!e.old.unwrap().contains_key("password_hash"));
    assert_eq!(e.changed_fields, Some(vec!["first_name".to_owned()]));
    let ins = map(&mut m, insert(full_row("A", "B"))).unwrap();
    assert!(!ins.row.contains_key("password_hash"));
}

#[test]
fn excluded_column_can_still_be_tracked_without_leaking() {
    let mut ent = entity();
    ent.exclude = vec!["password_hash".into()];
    ent.track = Some(vec!["password_hash".into()]);
    let mut m = full_identity(ent);
    let old = OldTuple::Full(full_row("Ann", "Oslo"));
    let new = row(vec![
        t("42"),
        t("Ann"),
        t("Oslo"),
        t("changed"),
        t("long bio"),
    ]);
    let e = map(&mut m, update(Some(old), new)).unwrap();
    assert_eq!(e.changed_fields, Some(vec![]));
}

#[test]
fn actions_not_configured_emit_nothing() {
    let mut ent = entity();
    ent.actions = vec![Action::Created];
    let mut m = mapper(ent, customer(ReplicaIdentity::Default));
    assert_eq!(map(&mut m, update(None, full_row("Bea", "Oslo"))), None);
    let key = key_row("42");
    assert_eq!(map(&mut m, delete(OldTuple::Key(key))), None);
    assert!(map(&mut m, insert(full_row("A", "B"))).is_some());
}

#[test]
fn unchanged_toast_takes_old_value_and_is_not_a_change() {
    let mut m = full_identity(entity());
    let old = OldTuple::Full(full_row("Ann", "Oslo"));
    let new = row(vec![
        t("42"),
        t("Bea"),
        t("Oslo"),
        t("secret"),
        ColumnValue::UnchangedToast,
    ]);
    let e = map(&mut m, update(Some(old), new)).unwrap();
    assert_eq!(e.row.get("bio"), Some(&json!("long bio")));
    assert_eq!(e.changed_fields, Some(vec!["first_name".to_owned()]));
}

#[test]
fn unchanged_toast_without_old_value_is_absent_not_null() {
    let mut m = mapper(entity(), customer(ReplicaIdentity::Default));
    let new = row(vec![
        t("42"),
        t("Bea"),
        t("Oslo"),
        t("secret"),
        ColumnValue::UnchangedToast,
    ]);
    let e = map(&mut m, update(None, new)).unwrap();
    assert!(!e.row.contains_key("bio"));
    assert_eq!(e.row.len(), 4);
}

#[test]
fn change_for_unknown_relation_is_a_permanent_error() {
    let mut m = Mapper::new(&[entity()]);
    let err = m
        .map_change(&tx(), 0, &insert(full_row("A", "B")))
        .unwrap_err();
    assert!(matches!(err, MapError::UnknownRelation { oid: REL }));
    assert_eq!(err.class(), ErrorClass::Permanent);
}

#[test]
fn tables_that_are_not_entities_are_ignored() {
    let mut m = mapper(entity(), order_line());
    let msg = insert(row(vec![t("a"), t("b"), t("1")]));
    assert_eq!(map(&mut m, msg), None);
}

#[test]
fn row_with_wrong_column_count_is_an_error() {
    let mut m = mapper(entity(), customer(ReplicaIdentity::Default));
    let err = m
        .map_change(&tx(), 0, &insert(row(vec![t("1")])))
        .unwrap_err();
    assert!(matches!(
        err,
        MapError::ColumnCount {
            expected: 5,
            got: 1,
            ..
        }
    ));
}

#[test]
fn a_missing_id_column_sets_the_entitys_changes_aside_with_the_reason() {
    let mut ent = entity();
    ent.id = Some(vec!["nope".into()]);
    let mut m = Mapper::new(&[ent]);
    let notes = m.on_relation(customer(ReplicaIdentity::Default));
    assert_eq!(notes.len(), 1, "{notes:?}");
    let r = set_aside(&mut m, insert(full_row("Ann", "Oslo")));
    for needle in [
        "entity Customer",
        "id column \"nope\"",
        "id, first_name, city, password_hash, bio",
    ] {
        assert!(r.reason.contains(needle), "{}", r.reason);
        assert!(notes[0].message.contains(needle), "{}", notes[0].message);
    }
    assert_eq!(r.entity_id, None);
    assert_eq!(
        (r.commit_lsn, r.seq, r.action),
        (Lsn(0x10), 3, Action::Created)
    );
    let row: Value = serde_json::from_str(r.row.as_deref().unwrap()).unwrap();
    assert_eq!(row["first_name"], json!("Ann"));
}

#[test]
fn missing_track_exclude_or_subject_columns_are_noted_and_capture_goes_on() {
    for (role, configure) in [
        (
            "track",
            (|e: &mut EntityConfig| e.track = Some(vec!["nope".into()])) as fn(&mut EntityConfig),
        ),
        ("exclude", |e| e.exclude = vec!["nope".into()]),
        ("subject", |e| e.subject = Some("x/{nope}".into())),
    ] {
        let mut ent = entity();
        configure(&mut ent);
        let mut m = Mapper::new(&[ent]);
        m.set_primary_key(entity().table, vec!["id".into()]);
        let notes = m.on_relation(customer(ReplicaIdentity::Full));
        assert_eq!(notes.len(), 1, "{role}: {notes:?}");
        let msg = &notes[0].message;
        assert!(msg.contains(&format!("{role} of entity Customer")), "{msg}");
        assert!(msg.contains("\"nope\""), "{msg}");
        let old = OldTuple::Full(full_row("Ann", "Oslo"));
        // A track list left without columns filters nothing.
        let e = map(&mut m, update(Some(old), full_row("Bea", "Oslo"))).unwrap();
        assert_eq!(e.entity_id, "42");
    }
}

#[test]
fn renamed_columns_are_followed_within_a_session_and_exclusion_still_holds() {
    let mut ent = entity();
    ent.exclude = vec!["password_hash".into()];
    ent.track = Some(vec!["city".into()]);
    ent.id = Some(vec!["id".into()]);
    let mut m = mapper(ent, customer(ReplicaIdentity::Full));
    let mut renamed = customer(ReplicaIdentity::Full);
    renamed.columns[3].name = "pw".into();
    renamed.columns[2].name = "town".into();
    let notes = m.on_relation(renamed);
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(
        notes
            .iter()
            .any(|n| n.message.contains("renamed to \"pw\""))
    );
    let old = OldTuple::Full(full_row("Ann", "Oslo"));
    let e = map(&mut m, update(Some(old), full_row("Ann", "Bergen"))).unwrap();
    assert!(!e.row.contains_key("pw"), "{:?}", e.row);
    assert_eq!(e.changed_fields, Some(vec!["town".to_owned()]));
    // An update not touching the (renamed) tracked column is still filtered.
    let old = OldTuple::Full(full_row("Ann", "Oslo"));
    assert_eq!(
        map(&mut m, update(Some(old), full_row("Bea", "Oslo"))),
        None
    );
}

#[test]
fn a_renamed_id_column_is_not_followed() {
    let mut ent = entity();
    ent.id = Some(vec!["id".into()]);
    let mut m = mapper(ent, customer(ReplicaIdentity::Full));
    let mut renamed = customer(ReplicaIdentity::Full);
    renamed.columns[0].name = "customer_id".into();
    let notes = m.on_relation(renamed);
    assert!(
        notes.iter().any(|n| n.message.contains("set aside")),
        "{notes:?}"
    );
    let r = set_aside(&mut m, insert(full_row("Ann", "Oslo")));
    assert!(r.reason.contains("id column \"id\""), "{}", r.reason);
}

#[test]
fn table_without_key_and_without_id_sets_changes_aside() {
    let mut rel = customer(ReplicaIdentity::Nothing);
    for c in &mut rel.columns {
        c.is_key = false;
    }
    let mut m = Mapper::new(&[entity()]);
    m.on_relation(rel);
    let r = set_aside(&mut m, insert(full_row("A", "B")));
    assert_eq!(
        r.reason,
        "table public.customer has no primary key; set id = [...] for entity Customer"
    );
}

#[test]
fn full_identity_needs_configured_or_supplied_primary_key() {
    let mut m = Mapper::new(&[entity()]);
    m.on_relation(customer(ReplicaIdentity::Full));
    let r = set_aside(&mut m, insert(full_row("A", "B")));
    assert!(r.reason.contains("REPLICA IDENTITY FULL"), "{}", r.reason);
    let mut m = Mapper::new(&[entity()]);
    m.set_primary_key(entity().table, vec!["id".into()]);
    assert!(m.on_relation(customer(ReplicaIdentity::Full)).is_empty());
    let e = map(&mut m, insert(full_row("A", "B"))).unwrap();
    assert_eq!(e.entity_id, "42");
}

#[test]
fn id_outside_replica_identity_sets_only_deletes_aside() {
    let mut ent = entity();
    ent.id = Some(vec!["first_name".into()]);
    let mut m = mapper(ent.clone(), customer(ReplicaIdentity::Default));
    let e = map(&mut m, insert(full_row("Ann", "B"))).unwrap();
    assert_eq!(e.entity_id, "Ann");
    let r = set_aside(&mut m, delete(OldTuple::Key(key_row("42"))));
    assert!(r.reason.contains("REPLICA IDENTITY FULL"), "{}", r.reason);
    ent.actions = vec![Action::Created, Action::Updated];
    let mut m = mapper(ent, customer(ReplicaIdentity::Default));
    assert_eq!(map(&mut m, delete(OldTuple::Key(key_row("42")))), None);
}

#[test]
fn subject_may_not_use_excluded_columns() {
    let mut ent = entity();
    ent.exclude = vec!["password_hash".into()];
    ent.subject = Some("c/{password_hash}".into());
    let mut m = Mapper::new(&[ent]);
    m.on_relation(customer(ReplicaIdentity::Default));
    let r = set_aside(&mut m, insert(full_row("A", "B")));
    assert!(r.reason.contains("excluded column"), "{}", r.reason);
    assert!(!r.row.unwrap().contains("secret"));
}

#[test]
fn resent_relation_replaces_the_cached_one() {
    let mut m = mapper(entity(), customer(ReplicaIdentity::Default));
    let mut altered = customer(ReplicaIdentity::Default);
    altered.columns.push(column("zip", INT4, false));
    assert!(m.on_relation(altered).is_empty());
    let new = row(vec![t("42"), t("A"), t("B"), t("s"), t("b"), t("0150")]);
    let e = map(&mut m, insert(new)).unwrap();
    assert_eq!(e.row.get("zip"), Some(&json!(150)));
    let old_shape = insert(full_row("A", "B"));
    let err = m.map_change(&tx(), 0, &old_shape).unwrap_err();
    assert_eq!(err.class(), ErrorClass::Permanent);
}

#[test]
fn truncate_becomes_an_event_only_when_the_entity_asks_for_it() {
    let m = mapper(entity(), customer(ReplicaIdentity::Default));
    assert!(matches!(
        m.map_truncate(&tx(), 5, REL),
        Truncation::NotWanted(..)
    ));
    assert_eq!(m.map_truncate(&tx(), 5, Oid(1)), Truncation::NotEntity);
    let mut ent = entity();
    ent.actions.push(Action::Truncated);
    let m = mapper(ent, customer(ReplicaIdentity::Default));
    let Truncation::Event(e) = m.map_truncate(&tx(), 5, REL) else {
        panic!("no event");
    };
    assert_eq!(
        (e.action, e.entity_id.as_str(), e.seq, e.row.len()),
        (Action::Truncated, TRUNCATED_ID, 5, 0)
    );
    assert_eq!(e.changed_fields, Some(vec![]));
}

#[test]
fn approx_bytes_grows_with_the_row() {
    let mut m = mapper(entity(), customer(ReplicaIdentity::Default));
    let small = map(&mut m, insert(full_row("A", "B"))).unwrap();
    let big_text = "x".repeat(1 << 20);
    let big = map(&mut m, insert(full_row(&big_text, "B"))).unwrap();
    assert!(small.approx_bytes() < 2048, "{}", small.approx_bytes());
    assert!(big.approx_bytes() > 1 << 20);
    assert!(big.approx_bytes() < (1 << 20) + 4096);
}

#[test]
fn template_splitting_handles_unclosed_braces() {
    let parts: Vec<String> = split_template("a{b}c{d")
        .into_iter()
        .map(|p| match p {
            TemplatePart::Literal(s) => format!("L:{s}"),
            TemplatePart::Placeholder(s) => format!("P:{s}"),
        })
        .collect();
    assert_eq!(parts, ["L:a", "P:b", "L:c{d"]);
}

/// `Moved` when city changes to Paris; `Renamed` when first_name changes.
fn with_rules(replace_moved: bool) -> EntityConfig {
    use crate::condition::{Condition, Test};
    let mut ent = entity();
    ent.derived = vec![
        crate::config::DerivedAction {
            name: "Moved".into(),
            when: Condition::Column {
                column: "city".into(),
                test: Test::ChangedTo(json!("Paris")),
            },
            replace: replace_moved,
        },
        crate::config::DerivedAction {
            name: "Renamed".into(),
            when: Condition::Column {
                column: "first_name".into(),
                test: Test::Changed(true),
            },
            replace: false,
        },
    ];
    ent
}

/// Every event a change became, as (action name, derived name).
fn all_events(m: &mut Mapper, msg: Message) -> Vec<EntityEvent> {
    match m.map_change(&tx(), 3, &msg).unwrap() {
        None => vec![],
        Some(Mapped::Event(e)) => vec![e],
        Some(Mapped::Events(events)) => events,
        Some(Mapped::SetAside(r)) => panic!("set aside: {}", r.reason),
    }
}

fn names(events: &[EntityEvent]) -> Vec<&str> {
    events.iter().map(EntityEvent::action_name).collect()
}

#[test]
fn matching_rules_emit_derived_actions_before_the_row_action_they_accompany() {
    let mut m = full_identity(with_rules(false));
    let old = OldTuple::Full(full_row("Ann", "Oslo"));
    let events = all_events(&mut m, update(Some(old), full_row("Bea", "Paris")));
    assert_eq!(names(&events), ["Moved", "Renamed", "Updated"]);
    for e in &events {
        assert_eq!((e.action, e.seq), (Action::Updated, 3));
        assert_eq!(
            e.changed_fields,
            Some(vec!["first_name".to_owned(), "city".to_owned()])
        );
    }
    // A change no rule matches is its row action alone.
    let old = OldTuple::Full(full_row("Bea", "Paris"));
    let events = all_events(&mut m, update(Some(old), full_row("Bea", "Rome")));
    assert_eq!(names(&events), ["Updated"]);
    assert_eq!(events[0].derived, None);
    // Inserting a row in Paris counts as changing city to Paris.
    let events = all_events(&mut m, insert(full_row("Cy", "Paris")));
    assert_eq!(names(&events), ["Moved", "Renamed", "Created"]);
}

#[test]
fn a_replacing_rule_drops_the_row_action_and_unknown_old_rows_match_no_change_test() {
    let mut m = full_identity(with_rules(true));
    let old = OldTuple::Full(full_row("Ann", "Oslo"));
    let events = all_events(&mut m, update(Some(old), full_row("Ann", "Paris")));
    assert_eq!(names(&events), ["Moved"]);
    // With DEFAULT identity nothing is known to have changed: no rule matches.
    let mut m = mapper(with_rules(true), customer(ReplicaIdentity::Default));
    let events = all_events(&mut m, update(None, full_row("Ann", "Paris")));
    assert_eq!(names(&events), ["Updated"]);
}

#[test]
fn rules_see_updates_that_track_filters_out_and_follow_renamed_columns() {
    let mut ent = with_rules(false);
    ent.track = Some(vec!["bio".into()]);
    let mut m = full_identity(ent);
    let old = OldTuple::Full(full_row("Ann", "Oslo"));
    let events = all_events(&mut m, update(Some(old), full_row("Ann", "Paris")));
    assert_eq!(names(&events), ["Moved"]);

    let mut renamed = customer(ReplicaIdentity::Full);
    renamed.columns[2].name = "town".into();
    let notes = m.on_relation(renamed);
    assert!(
        notes
            .iter()
            .any(|n| n.message.contains("[[entity.action]] Moved")
                && n.message.contains("renamed to \"town\"")),
        "{notes:?}"
    );
    let old = OldTuple::Full(full_row("Ann", "Oslo"));
    let events = all_events(&mut m, update(Some(old), full_row("Ann", "Paris")));
    assert_eq!(names(&events), ["Moved"]);

    // A dropped column disables the rules that name it, with a note.
    let mut dropped = customer(ReplicaIdentity::Full);
    dropped.columns.remove(1);
    let notes = m.on_relation(dropped);
    assert!(
        notes
            .iter()
            .any(|n| n.message.contains("no longer tested for action Renamed")),
        "{notes:?}"
    );
}

/// public.customer_attribute(customer_id int4, attr_name text, value text), key
/// (customer_id, attr_name) unless FULL.
fn attributes(identity: ReplicaIdentity) -> Relation {
    let full = identity == ReplicaIdentity::Full;
    Relation {
        oid: Oid(16_500),
        namespace: "public".into(),
        name: "customer_attribute".into(),
        replica_identity: identity,
        columns: vec![
            column("customer_id", INT4, true),
            column("attr_name", TEXT, true),
            column("value", TEXT, full),
        ],
    }
}

fn with_child(include: bool) -> EntityConfig {
    let mut ent = entity();
    ent.subject = Some("customers/{id}".into());
    ent.children = vec![crate::config::ChildTable {
        table: TableName {
            schema: "public".into(),
            name: "customer_attribute".into(),
        },
        parent: vec!["customer_id".into()],
        field: "attr_name".into(),
        include,
    }];
    ent
}

#[test]
fn child_row_changes_become_one_updated_event_per_parent_naming_the_attributes() {
    let mut m = Mapper::new(&[with_child(true)]);
    assert!(
        m.on_relation(attributes(ReplicaIdentity::Default))
            .is_empty()
    );
    let rel = Oid(16_500);
    let attr = |id: &str, name: &str, value: &str| row(vec![t(id), t(name), t(value)]);
    let mut gathered = ChildEvents::default();
    let changes = [
        Message::Insert {
            relation: rel,
            new: attr("42", "colour", "red"),
        },
        Message::Update {
            relation: rel,
            old: None,
            new: attr("42", "size", "XL"),
        },
        Message::Insert {
            relation: rel,
            new: attr("7", "colour", "blue"),
        },
        Message::Delete {
            relation: rel,
            old: OldTuple::Key(row(vec![t("42"), t("colour"), ColumnValue::Null])),
        },
    ];
    for (seq, msg) in changes.iter().enumerate() {
        // A child table is not an entity: no event of its own.
        assert_eq!(m.map_change(&tx(), seq as u32, msg).unwrap(), None);
        gathered.add(seq as u32 + 10, m.map_child(msg));
    }
    let events = gathered.finish(&tx());
    assert!(gathered.is_empty());
    assert_eq!(events.len(), 2);
    let e = &events[0];
    assert_eq!(
        (e.entity.as_str(), e.entity_id.as_str(), e.action, e.seq),
        ("Customer", "42", Action::Updated, 10)
    );
    assert_eq!(e.variant_key(), "child/public.customer_attribute");
    assert_eq!(e.table.to_string(), "public.customer");
    assert_eq!(e.subject.as_deref(), Some("customers/42"));
    assert_eq!(
        e.changed_fields,
        Some(vec!["colour".to_owned(), "size".to_owned()])
    );
    assert_eq!(
        Value::Object(e.row.clone()),
        json!({"customer_attribute": {
            "colour": null,
            "size": {"customer_id": 42, "attr_name": "size", "value": "XL"}
        }})
    );
    assert_eq!(events[1].entity_id, "7");
    assert_eq!(events[1].seq, 12);
}

#[test]
fn a_child_row_moved_to_another_parent_updates_both_and_without_include_carries_no_rows() {
    let mut m = Mapper::new(&[with_child(false)]);
    m.on_relation(attributes(ReplicaIdentity::Full));
    let rel = Oid(16_500);
    let mut gathered = ChildEvents::default();
    gathered.add(
        0,
        m.map_child(&Message::Update {
            relation: rel,
            old: Some(OldTuple::Full(row(vec![t("1"), t("colour"), t("red")]))),
            new: row(vec![t("2"), t("colour"), t("red")]),
        }),
    );
    let events = gathered.finish(&tx());
    let ids: Vec<&str> = events.iter().map(|e| e.entity_id.as_str()).collect();
    assert_eq!(ids, ["1", "2"]);
    assert!(events.iter().all(|e| e.row.is_empty()));

    // A child configuration naming a missing column is noted; nothing is reported.
    let mut bad = with_child(false);
    bad.children[0].field = "name".into();
    let mut m = Mapper::new(&[bad]);
    let notes = m.on_relation(attributes(ReplicaIdentity::Full));
    assert!(
        notes[0].message.contains("column \"name\" (named in field"),
        "{notes:?}"
    );
    assert!(
        m.map_child(&Message::Insert {
            relation: rel,
            new: row(vec![t("1"), t("colour"), t("red")]),
        })
        .is_empty()
    );
}

fn chunk(rows: Vec<Vec<Option<&str>>>) -> Chunk {
    let columns = customer(ReplicaIdentity::Default)
        .columns
        .into_iter()
        .filter(|c| c.name != "password_hash")
        .map(|c| ChunkColumn {
            name: c.name,
            type_oid: c.type_oid.0,
            key: c.is_key,
        })
        .collect();
    Chunk {
        run: 1,
        token: uuid::Uuid::nil(),
        entity: "Customer".into(),
        listener: Some("audit".into()),
        schema: "public".into(),
        table: "customer".into(),
        columns,
        rows: rows
            .into_iter()
            .map(|r| r.into_iter().map(|v| v.map(str::to_owned)).collect())
            .collect(),
    }
}

#[test]
fn a_snapshot_row_is_the_row_an_insert_of_the_same_values_gives() {
    let ent = EntityConfig {
        exclude: vec!["password_hash".into()],
        subject: Some("c/{id}/{first_name}".into()),
        ..entity()
    };
    let mut m = mapper(ent, customer(ReplicaIdentity::Default));
    let created = map(
        &mut m,
        insert(row(vec![
            t("42"),
            t("Ada"),
            ColumnValue::Null,
            t("s"),
            t("b"),
        ])),
    )
    .unwrap();
    // The chunk leaves the excluded column out, as `walhook backfill` does.
    let c = chunk(vec![
        vec![Some("42"), Some("Ada"), None, Some("b")],
        vec![Some("7"), None, Some("Paris"), None],
    ]);
    let mapped = m.map_snapshot(&tx(), 5, &c).unwrap();
    let events: Vec<EntityEvent> = mapped
        .into_iter()
        .map(|m| match m {
            Mapped::Event(e) => e,
            other => panic!("not an event: {other:?}"),
        })
        .collect();
    let [first, second] = events.as_slice() else {
        panic!("{events:?}")
    };
    assert_eq!(first.row, created.row);
    assert_eq!(first.entity_id, created.entity_id);
    assert_eq!(first.subject, created.subject);
    assert_eq!(first.changed_fields, created.changed_fields);
    assert_eq!(first.action_name(), "Snapshot");
    assert_eq!(first.action, Action::Created);
    assert_eq!(first.only_listener.as_deref(), Some("audit"));
    assert_eq!((first.seq, second.seq), (5, 6));
    assert_eq!(second.entity_id, "7");
    assert_eq!(second.row["city"], json!("Paris"));
    assert_eq!(second.row["first_name"], Value::Null);
}

#[test]
fn a_snapshot_of_an_entity_this_walhook_does_not_capture_is_an_error_not_events() {
    let m = mapper(entity(), customer(ReplicaIdentity::Default));
    let mut c = chunk(vec![vec![Some("1"), None, None, None]]);
    c.entity = "Order".into();
    assert!(matches!(
        m.map_snapshot(&tx(), 0, &c),
        Err(SnapshotError::UnknownEntity { .. })
    ));
    let mut short = chunk(vec![vec![Some("1")]]);
    short.listener = None;
    assert!(matches!(
        m.map_snapshot(&tx(), 0, &short),
        Err(SnapshotError::Shape { .. })
    ));
}
