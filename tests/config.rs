//! Loading configuration files from disk through the public API.

use std::path::Path;

use walhook::config::{Config, ConfigError};
use walhook::error::{Classify, ErrorClass};

const BODY: &str = "[source]\nurl = \"postgres://walhook@localhost/app\"\npassword_file = \"secrets/db\"\n\n[[entity]]\nname = \"Customer\"\ntable = \"public.customer\"\n";

#[test]
fn load_reads_the_file_and_its_relative_password_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("secrets")).unwrap();
    std::fs::write(dir.path().join("secrets/db"), "pa ss\r\n").unwrap();
    let path = dir.path().join("walhook.toml");
    std::fs::write(&path, BODY).unwrap();

    let config = Config::load(&path).unwrap();
    assert_eq!(config.path, path);
    assert_eq!(config.source.password.unwrap().expose(), "pa ss");
    assert_eq!(config.entities[0].name.as_str(), "Customer");
}

#[test]
fn missing_config_file_is_a_config_error_naming_the_path() {
    let err = Config::load(Path::new("/nonexistent/walhook.toml")).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }));
    assert_eq!(err.class(), ErrorClass::Config);
    assert!(
        err.to_string().contains("/nonexistent/walhook.toml"),
        "{err}"
    );
}

#[test]
fn problems_in_a_loaded_file_name_the_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("walhook.toml");
    std::fs::write(&path, BODY.replace("public.customer", "a.b.c")).unwrap();

    let err = Config::load(&path).unwrap_err().to_string();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(
        lines[0].starts_with(&format!(
            "{}:3:17: source.password_file: cannot read ",
            path.display()
        )),
        "{err}"
    );
    assert!(
        lines[1].starts_with(&format!(
            "{}:7:9: entity[0].table: table \"a.b.c\" has too many dots",
            path.display()
        )),
        "{err}"
    );
}

#[test]
fn listener_and_monitor_secrets_load_from_files_next_to_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    std::fs::write(secrets.join("db"), "pa ss\n").unwrap();
    std::fs::write(
        secrets.join("signing"),
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n",
    )
    .unwrap();
    std::fs::write(secrets.join("api-key"), "k3y\n").unwrap();
    std::fs::write(secrets.join("smtp"), "smtp-pw\n").unwrap();
    let path = dir.path().join("walhook.toml");
    std::fs::write(
        &path,
        format!(
            "{BODY}
[[listener]]
name = \"crm\"
url = \"https://crm.example.com/hooks?token=abc\"
secret_file = \"secrets/signing\"
header_files = {{ \"X-Api-Key\" = \"secrets/api-key\" }}

[[monitor]]
name = \"ops\"
smtp_url = \"smtps://walhook@mail.example.com\"
smtp_password_file = \"secrets/smtp\"
from = \"walhook@example.com\"
to = [\"dba@example.com\"]
"
        ),
    )
    .unwrap();

    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let l = &config.listeners[0];
    assert!(l.secret.is_some());
    assert_eq!(l.headers[0].1.to_str().unwrap(), "k3y");
    assert_eq!(l.url.redacted(), "https://crm.example.com/hooks?token=***");
    let smtp = &config.monitors[0].email.as_ref().unwrap().smtp;
    assert_eq!(
        smtp.credentials.as_ref().unwrap().password.expose(),
        "smtp-pw"
    );
    let debug = format!("{config:?}");
    for secret in ["pa ss", "MfKQ9r8", "k3y", "smtp-pw", "token=abc"] {
        assert!(!debug.contains(secret), "{secret} in {debug}");
    }

    // An empty secret file is named, with the key and the fix; its content is not.
    std::fs::write(secrets.join("api-key"), "\n").unwrap();
    let err = Config::load(&path).unwrap_err().to_string();
    assert!(
        err.contains("listener[0].header_files.X-Api-Key: ") && err.contains("api-key is empty"),
        "{err}"
    );
}
