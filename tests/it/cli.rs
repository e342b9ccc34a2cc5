//! The binary's command line: help, version, and config errors that name the key at fault.

use crate::support::*;

#[test]
fn help_and_version() {
    let (code, out, _) = run_binary(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("serve") && out.contains("dump"), "{out}");
    let (code, out, _) = run_binary(&["--version"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("larder "), "{out}");
    let (code, out, _) = run_binary(&["serve", "--help"]);
    assert_eq!(code, 0);
    for flag in [
        "--config",
        "--listen",
        "--origin",
        "--data-dir",
        "--admin-listen",
    ] {
        assert!(out.contains(flag), "serve --help lacks {flag}");
    }
}

#[test]
fn unknown_config_key_exits_nonzero_naming_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = temp_path(&dir, "bad.toml");
    std::fs::write(
        &path,
        "[server]\nlisen = \"127.0.0.1:0\"\n[origin]\nurl = \"http://127.0.0.1:1\"\n",
    )
    .unwrap();
    let (code, _, err) = run_binary(&["serve", "--config", path.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("lisen") && err.contains("bad.toml"), "{err}");
}

#[test]
fn wrong_type_and_bad_value_exit_nonzero_naming_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = temp_path(&dir, "bad.toml");
    std::fs::write(
        &path,
        "[origin]\nurl = \"http://127.0.0.1:1\"\n[storage]\nmax_size = 12\n",
    )
    .unwrap();
    let (code, _, err) = run_binary(&["serve", "--config", path.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("max_size"), "{err}");

    std::fs::write(
        &path,
        "[origin]\nurl = \"http://127.0.0.1:1\"\n[storage]\nmax_size = \"lots\"\n",
    )
    .unwrap();
    let (code, _, err) = run_binary(&["serve", "--config", path.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        err.contains("storage.max_size") && err.contains("bad.toml"),
        "{err}"
    );
}

#[test]
fn missing_origin_and_missing_file_are_clear() {
    let (code, _, err) = run_binary(&["serve"]);
    assert_ne!(code, 0);
    assert!(err.contains("origin"), "{err}");
    let (code, _, err) = run_binary(&["serve", "--config", "/nonexistent/larder.toml"]);
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent/larder.toml"), "{err}");
}
