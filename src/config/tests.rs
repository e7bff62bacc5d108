//! Whole-file tests: defaults, the example file, positions and ordering of messages.

use std::path::Path;
use std::time::Duration;

use super::*;
use crate::config::listener::DEFAULT_BACKOFF;
use crate::types::{Action, TableName};

pub(super) const MINIMAL: &str = "[source]\nurl = \"postgres://walhook@localhost/app\"\n\n[[entity]]\nname = \"Customer\"\ntable = \"customer\"\n";

pub(super) fn no_env(_: &str) -> Option<String> {
    None
}

pub(super) fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse_with_env(text, Path::new("walhook.toml"), &no_env)
}

/// The error lines of a text that must fail.
pub(super) fn errors(text: &str) -> Vec<String> {
    match parse(text) {
        Ok(_) => panic!("config was accepted:\n{text}"),
        Err(ConfigError::Invalid(lines)) => lines,
        Err(e) => panic!("unexpected error {e}"),
    }
}

#[test]
fn cloudevents_mode_chooses_structured_or_binary_and_names_a_wrong_value() {
    let with = |mode: &str| {
        format!("{MINIMAL}\n[[listener]]\nname = \"crm\"\nurl = \"https://example.com/\"\n{mode}\n")
    };
    let format = |text: &str| parse(text).unwrap().listeners[0].format.clone();
    assert_eq!(
        format(&with("")),
        ListenerFormat::CloudEvents(CloudEventsMode::Structured)
    );
    assert_eq!(
        format(&with("cloudevents_mode = \"structured\"")),
        ListenerFormat::CloudEvents(CloudEventsMode::Structured)
    );
    assert_eq!(
        format(&with(
            "format = \"cloudevents\"\ncloudevents_mode = \"binary\""
        )),
        ListenerFormat::CloudEvents(CloudEventsMode::Binary)
    );
    assert_eq!(
        errors(&with("cloudevents_mode = \"bin\"")),
        vec![
            "walhook.toml:11:20: listener[0].cloudevents_mode: unknown CloudEvents content mode \"bin\"; use cloudevents_mode = \"structured\" (the event as the body) or \"binary\" (ce-* headers, data as the body)"
        ]
    );
}

#[test]
fn minimal_file_gets_documented_defaults() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.source.slot, "walhook");
    assert_eq!(c.source.publication, "walhook");
    assert!(c.source.create_publication);
    assert_eq!(c.source.heartbeat, Some(Duration::from_secs(30)));
    assert_eq!(c.source.status_interval, Duration::from_secs(5));
    assert_eq!(c.source.system_name, None);
    assert!(c.source.password.is_none());
    assert_eq!(c.queue.retention, Duration::from_secs(7 * 86_400));
    assert_eq!(c.queue.batch_size, 5000);
    assert_eq!(c.queue.batch_delay, Duration::from_millis(20));
    assert!(c.admin.is_none());
    assert!(c.listeners.is_empty());
    let e = &c.entities[0];
    assert_eq!(e.name.as_str(), "Customer");
    assert_eq!(
        e.table,
        TableName {
            schema: "public".into(),
            name: "customer".into()
        }
    );
    assert_eq!(e.actions, Action::ROW.to_vec());
    assert_eq!(e.id, None);
    assert_eq!(e.track, None);
    assert!(e.exclude.is_empty());
}

#[test]
fn example_file_parses_with_its_environment() {
    let env = |name: &str| match name {
        "WALHOOK_DB_PASSWORD" => Some("db-secret".to_owned()),
        "CRM_API_KEY" => Some("api-key".to_owned()),
        "CRM_SIGNING_SECRET" => Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_owned()),
        "ASSETS_CLIENT_SECRET" => Some("client-secret".to_owned()),
        "FORMS_PASSWORD" => Some("forms-password".to_owned()),
        "EVENTGRID_TOPIC_KEY" | "SERVICEBUS_SAS_KEY" => Some("azure-key".to_owned()),
        _ => None,
    };
    let text = include_str!("../../config.example.toml");
    let c = Config::parse_with_env(text, Path::new("config.example.toml"), &env)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        c.source.password.as_ref().map(Secret::expose),
        Some("db-secret")
    );
    assert_eq!(c.source.system_name.as_deref(), Some("CRM"));
    assert_eq!(
        c.admin,
        Some(AdminConfig {
            listen: "127.0.0.1:8187".parse().unwrap(),
            public_url: Some("https://walhook.example.com:8187".parse().unwrap()),
            token: None,
        })
    );
    assert_eq!(c.entities.len(), 2);
    assert_eq!(
        c.entities[1].table,
        TableName {
            schema: "Sales".into(),
            name: "Order".into()
        }
    );
    assert_eq!(c.entities[0].subject.as_deref(), Some("Customer/{id}"));
    let l = &c.listeners[0];
    assert_eq!(l.name, "crm");
    assert_eq!(
        l.url.expose().as_str(),
        "https://crm.example.com/hooks/walhook"
    );
    assert_eq!(l.entities.as_ref().map(|e| e[0].as_str()), Some("Customer"));
    assert_eq!(l.headers[0].0, "X-Api-Key");
    assert_eq!(l.headers[0].1.to_str().unwrap(), "api-key");
    assert!(l.headers[0].1.is_sensitive());
    assert!(l.secret.is_some());
    assert!(l.ca_file.is_none());
    assert_eq!(
        l.rate_limit,
        Some(RateLimit {
            count: 50,
            per: Duration::from_secs(1)
        })
    );
    assert_eq!(l.max_attempts, 12);
    assert_eq!(l.concurrency, 16);
    assert_eq!(l.backoff, DEFAULT_BACKOFF);
    assert_eq!(l.timeout, Duration::from_secs(10));
    assert_eq!(l.debounce, None);
    assert_eq!(
        l.format,
        ListenerFormat::CloudEvents(CloudEventsMode::Structured)
    );
    assert_eq!((l.batch_size, l.batch_bytes), (1, 1 << 20));
    assert_eq!(l.auth, None);

    let assets = &c.listeners[1];
    let ListenerFormat::Template(t) = &assets.format else {
        panic!("{:?}", assets.format)
    };
    assert_eq!(t.content_type, "application/json");
    assert!(t.batch.uses(&Field::Count));
    assert_eq!((assets.batch_size, assets.batch_bytes), (50, 512 << 10));
    let Some(ListenerAuth::OAuth2(o)) = &assets.auth else {
        panic!("{:?}", assets.auth)
    };
    assert_eq!(o.client_secret.expose(), "client-secret");
    assert_eq!(o.scope.as_deref(), Some("api://assets/.default"));

    let forms = &c.listeners[2];
    let ListenerFormat::Form(f) = &forms.format else {
        panic!("{:?}", forms.format)
    };
    assert!(f.columns);
    assert_eq!(
        f.fields.iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>(),
        [
            "entity",
            "BaseId",
            "action",
            "changedFields",
            "eventId",
            "ChangeType"
        ]
    );
    assert_eq!(
        forms.auth,
        Some(ListenerAuth::Basic {
            user: "walhook".into(),
            password: Secret::new("forms-password".into())
        })
    );
    let ListenerFormat::EventGrid(grid) = &c.listeners[3].format else {
        panic!("listener grid is not eventgrid")
    };
    assert_eq!(
        grid.delivery,
        EventGridDelivery::Webhook {
            validation_url: "https://walhook.example.com:8187/eventgrid/validate"
                .parse()
                .unwrap()
        }
    );
    assert_eq!(
        c.listeners[3].event_types.get(Action::Deleted),
        Some(&EventType::Name("AssetChanged".into()))
    );
    assert!(matches!(
        &c.listeners[4].format,
        ListenerFormat::EventGrid(g) if matches!(&g.delivery, EventGridDelivery::Topic { key } if key.expose() == "azure-key")
    ));
    let ListenerFormat::ServiceBus(bus) = &c.listeners[5].format else {
        panic!("listener bus is not servicebus")
    };
    assert_eq!(bus.topic.render("Customer"), "api.event.customer");
    assert_eq!(bus.sas_key.expose(), "azure-key");
}

#[test]
fn example_file_without_its_environment_names_each_missing_variable() {
    let lines = errors(include_str!("../../config.example.toml"));
    assert_eq!(lines.len(), 7, "{lines:#?}");
    assert!(
        lines[0].contains("source.password: environment variable WALHOOK_DB_PASSWORD is not set")
    );
    assert!(
        lines[1]
            .contains("listener[0].headers.X-Api-Key: environment variable CRM_API_KEY is not set")
    );
    assert!(
        lines[2].contains("listener[0].secret: environment variable CRM_SIGNING_SECRET is not set")
    );
    assert!(lines[3].contains(
        "listener[1].auth.oauth2.client_secret: environment variable ASSETS_CLIENT_SECRET is not set"
    ));
    assert!(lines[4].contains(
        "listener[2].auth.basic.password: environment variable FORMS_PASSWORD is not set"
    ));
    assert!(
        lines[5].contains(
            "listener[4].aeg_sas_key: environment variable EVENTGRID_TOPIC_KEY is not set"
        )
    );
    assert!(
        lines[6]
            .contains("listener[5].sas_key: environment variable SERVICEBUS_SAS_KEY is not set")
    );
}

#[test]
fn unknown_key_names_path_position_and_allowed_keys() {
    let text =
        format!("{MINIMAL}\n[[entity]]\nname = \"Order\"\ntable = \"orders\"\ncolour = \"red\"\n");
    let lines = errors(&text);
    assert_eq!(
        lines,
        vec![
            "walhook.toml:11:1: entity[1].colour: unknown key; expected one of name, table, id, actions, track, exclude, subject, action, where, child, snapshot_action"
        ]
    );
}

#[test]
fn unknown_top_level_section_is_reported() {
    let lines = errors(&format!("{MINIMAL}[sorce]\nurl = \"x\"\n"));
    assert_eq!(lines.len(), 1);
    assert!(lines[0].starts_with("walhook.toml:7:2: sorce: unknown key; expected one of source, queue, admin, entity, listener, monitor"), "{}", lines[0]);
}

#[test]
fn wrong_type_names_found_and_expected() {
    let lines = errors("[source]\nurl = \"postgres://h/db\"\nslot = 5\n");
    assert_eq!(
        lines,
        vec![
            "walhook.toml:3:8: source.slot: wrong type: found integer 5, expected a string; write the value in double quotes"
        ]
    );
}

#[test]
fn single_bracket_entity_suggests_double_brackets() {
    let lines = errors("[source]\nurl = \"postgres://h/db\"\n[entity]\nname = \"A\"\n");
    assert_eq!(lines.len(), 1);
    assert!(lines[0].contains("entity: wrong type"), "{}", lines[0]);
    assert!(
        lines[0].ends_with("write [[entity]] with double brackets"),
        "{}",
        lines[0]
    );
}

#[test]
pub(super) fn syntax_error_is_one_line_with_position() {
    let lines = errors("[source]\nurl = \"postgres://h/db\nslot = \"x\"\n");
    assert_eq!(lines.len(), 1);
    assert!(lines[0].starts_with("walhook.toml:2:"), "{}", lines[0]);
    assert!(lines[0].contains("invalid TOML"), "{}", lines[0]);
}

#[test]
fn every_problem_is_reported_in_file_order() {
    let text = "\
[source]
url = \"postgres://h/db\"
slot = \"My-Slot\"
heartbeat = \"5 sec\"
status_interval = \"30s\"

[queue]
batch_size = 0

[[entity]]
name = \"9Customer\"
table = \"Public.customer\"
actions = [\"created\", \"created\", \"merged\"]
id = [\"id\"]
exclude = [\"id\", \"secret\"]
subject = \"Customer/{secret}\"

[[entity]]
name = \"Order\"
table = \"orders\"
subject = \"Order/{id\"
";
    let lines = errors(text);
    assert_eq!(
        lines,
        vec![
            "walhook.toml:3:8: source.slot: invalid replication slot name \"My-Slot\"; use 1 to 63 lower-case letters, digits and '_' (PostgreSQL's rule), like \"walhook\"",
            "walhook.toml:4:13: source.heartbeat: invalid duration \"5 sec\"; write a whole number and a unit (ms, s, m, h, d), like \"500ms\", \"5s\", \"10m\", \"2h\" or \"7d\", or \"off\"",
            "walhook.toml:5:19: source.status_interval: 30s is out of range; use a duration above 0 and at most \"10s\", so the server does not time the connection out",
            "walhook.toml:8:14: queue.batch_size: 0 is out of range; use a number from 1 to 100000 (default 5000)",
            "walhook.toml:11:8: entity[0].name: entity name \"9Customer\" must start with a letter and contain only letters, digits, '_', '-' or '.'; rename it, like \"Customer\" or \"SalesOrder\"",
            "walhook.toml:12:9: entity[0].table: table \"Public.customer\" has upper-case letters in the unquoted name \"Public\", which PostgreSQL folds to \"public\"; write it in lower case, or double-quote it ('\"Public\"') if the table was created with that exact case",
            "walhook.toml:13:23: entity[0].actions[1]: action \"created\" is listed twice; remove the duplicate",
            "walhook.toml:13:34: entity[0].actions[2]: unknown action \"merged\"; use created, updated, deleted or truncated",
            "walhook.toml:14:7: entity[0].id: id column \"id\" is also excluded; remove it from exclude or from id; events need their id",
            "walhook.toml:16:11: entity[0].subject: placeholder {secret} names an excluded column; excluded columns must not leave the database; use {id} or another column",
            "walhook.toml:21:11: entity[1].subject: subject \"Order/{id\" has an unclosed '{'; close each placeholder with '}', like \"Customer/{id}\"",
        ]
    );
}

#[test]
fn missing_source_and_entities_are_reported_with_the_fix() {
    let lines = errors("[queue]\nretention = \"1d\"\n");
    assert_eq!(
        lines,
        vec![
            "walhook.toml:1:1: source: missing section [source]; add [source] with url = \"postgres://user@host:5432/dbname\"",
            "walhook.toml:3:1: entity: no [[entity]] is configured, so nothing would be captured; add an [[entity]] section with name = \"Customer\" and table = \"public.customer\"",
        ]
    );
}

#[test]
fn missing_required_keys_point_at_their_section() {
    let lines = errors("[source]\nslot = \"s\"\n\n[[entity]]\nname = \"A\"\n");
    assert_eq!(
        lines,
        vec![
            "walhook.toml:1:1: source.url: missing key; add url = \"postgres://user@host:5432/dbname\"",
            "walhook.toml:4:1: entity[0].table: missing key; add table = \"public.customer\"",
        ]
    );
}

#[test]
fn env_vars_are_substituted_in_every_string_and_escape_is_literal() {
    let text = "[source]\nurl = \"postgres://${DB_USER}@${DB_HOST}/app\"\nsystem_name = \"cost $$${5} ${DB_HOST}$\"\nslot = \"${SLOT}\"\n[[entity]]\nname = \"${ENTITY}\"\ntable = \"customer\"\nid = [\"${ID_COL}\"]\n";
    let env = |name: &str| {
        Some(
            match name {
                "DB_USER" => "walhook",
                "DB_HOST" => "db1",
                "SLOT" => "cdc_1",
                "ENTITY" => "Customer",
                "ID_COL" => "customer_id",
                _ => return None,
            }
            .to_owned(),
        )
    };
    let c = Config::parse_with_env(text, Path::new("w.toml"), &env).unwrap();
    assert_eq!(c.source.url.expose(), "postgres://walhook@db1/app");
    assert_eq!(c.source.system_name.as_deref(), Some("cost $${5} db1$"));
    assert_eq!(c.source.slot, "cdc_1");
    assert_eq!(c.entities[0].name.as_str(), "Customer");
    assert_eq!(c.entities[0].id, Some(vec!["customer_id".to_owned()]));
}

#[test]
fn missing_and_malformed_env_vars_are_errors_naming_them() {
    let text = "[source]\nurl = \"postgres://${NOPE}@h/app\"\nsystem_name = \"${bad name}\"\nslot = \"${OPEN\"\n[[entity]]\nname = \"A\"\ntable = \"a\"\n";
    let lines = errors(text);
    assert_eq!(lines.len(), 3, "{lines:#?}");
    assert!(lines[0].starts_with("walhook.toml:2:7: source.url: environment variable NOPE is not set; set NOPE in walhook's environment"), "{}", lines[0]);
    assert!(lines[1].starts_with("walhook.toml:3:15: source.system_name: ${bad name} is not a valid environment variable name"), "{}", lines[1]);
    assert!(
        lines[2].starts_with("walhook.toml:4:8: source.slot: unterminated ${"),
        "{}",
        lines[2]
    );
}

#[test]
fn substitution_cannot_break_toml_syntax() {
    let env = |_: &str| Some("\"\nslot = \"evil".to_owned());
    let text = "[source]\nurl = \"postgres://h/app\"\nsystem_name = \"${X}\"\n[[entity]]\nname = \"A\"\ntable = \"a\"\n";
    let c = Config::parse_with_env(text, Path::new("w.toml"), &env).unwrap();
    assert_eq!(c.source.slot, "walhook");
    assert_eq!(c.source.system_name.as_deref(), Some("\"\nslot = \"evil"));
}

#[test]
fn secrets_never_appear_in_debug_output_or_errors() {
    let env = |name: &str| (name == "PW").then(|| "hunter2".to_owned());
    let text = "[source]\nurl = \"postgres://u:topsecret@h/app?sslmode=require&password=qsecret\"\npassword = \"${PW}\"\n[[entity]]\nname = \"A\"\ntable = \"a\"\n[[listener]]\nname = \"l\"\nurl = \"https://bob:lsecret@example.com/h?token=tsecret\"\nheaders = { \"X-Key\" = \"hsecret\" }\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n";
    let c = Config::parse_with_env(text, Path::new("w.toml"), &env).unwrap();
    let debug = format!("{c:?}");
    for secret in [
        "topsecret",
        "qsecret",
        "hunter2",
        "lsecret",
        "tsecret",
        "hsecret",
        "MfKQ9r8",
    ] {
        assert!(!debug.contains(secret), "{secret} in {debug}");
    }
    assert_eq!(
        c.source.url_redacted,
        "postgres://u:***@h/app?sslmode=require&password=***"
    );
    assert_eq!(
        c.listeners[0].url.redacted(),
        "https://***@example.com/h?token=***"
    );

    let bad = "[source]\nurl = \"postgres://u:topsecret@h/app\"\npassword = 12345\n";
    let lines = errors(bad).join("\n");
    assert!(
        !lines.contains("12345") && !lines.contains("topsecret"),
        "{lines}"
    );
    let bad = "[source]\nurl = \"topsecret\"\n[[entity]]\nname = \"A\"\ntable = \"a\"\n[[listener]]\nname = \"l\"\nurl = \"ftp://lsecret\"\nsecret = \"not base64 ssecret!\"\n";
    let lines = errors(bad).join("\n");
    assert!(
        lines.contains("source.url: not a PostgreSQL connection string"),
        "{lines}"
    );
    assert!(
        lines.contains("listener[0].url: the URL must start with http:// or https://"),
        "{lines}"
    );
    assert!(
        lines.contains("listener[0].secret: the signing secret is not base64"),
        "{lines}"
    );
    for secret in ["topsecret", "lsecret", "ssecret"] {
        assert!(!lines.contains(secret), "{secret} in {lines}");
    }
}

#[test]
fn config_errors_exit_with_ex_config() {
    assert_eq!(ConfigError::Invalid(vec![]).class(), ErrorClass::Config);
}
