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
    // A wrong type names the key and the file, like every other config error.
    assert!(
        err.contains("max_size") && err.contains("bad.toml"),
        "{err}"
    );

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

// A config file and flags together: each flag wins over its key in the file, and the keys no
// flag names still come from the file.
#[actix_web::test]
async fn flags_override_the_config_file() {
    let origin = TestOrigin::start().await;
    origin.fixed("/fl", Reply::ok("from the flag's origin"));
    let dir = tempfile::tempdir().unwrap();
    // If the file's listen address won, the bind would fail: this test holds it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (file_data, flag_data) = (dir.path().join("file-data"), dir.path().join("flag-data"));
    let config = dir.path().join("larder.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"{}\"\n[origin]\nurl = \"http://127.0.0.1:9\"\n\
             [storage]\npath = \"{}\"\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"file-token\"\n",
            taken.local_addr().unwrap(),
            file_data.display()
        ),
    )
    .unwrap();
    let larder = LarderProcess::spawn(&[
        "--config",
        config.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--origin",
        &origin.url(),
        "--data-dir",
        flag_data.to_str().unwrap(),
    ]);
    assert_ne!(larder.addr, taken.local_addr().unwrap());
    let r = get(&larder.url("/fl"), &[]).await;
    assert_eq!(r.text(), "from the flag's origin");
    assert!(flag_data.exists(), "--data-dir not used");
    assert!(!file_data.exists(), "the file's [storage] path was used");
    // [admin] comes from the file: its token guards the admin API.
    let stats = format!("http://{}/stats", larder.admin_addr);
    assert_eq!(get(&stats, &[]).await.status, 401);
    let ok = get(&stats, &[("authorization", "Bearer file-token")]).await;
    assert_eq!(ok.status, 200);
}
