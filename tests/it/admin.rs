//! The admin API over HTTP: auth, purge by url/prefix/tag/all, soft purge, bad input, entries and stats.

use std::time::Duration;

use bytes::Bytes;

use crate::support::*;

const TOKEN: &str = "test-token-123";
const WITH_TOKEN: &str = "[admin]\ntoken = \"test-token-123\"\n";

fn admin_url(proxy: &TestProxy, path: &str) -> String {
    format!("http://{}{}", proxy.admin_addr, path)
}

async fn purge(proxy: &TestProxy, json: &str) -> Got {
    try_send(
        "POST",
        &admin_url(proxy, "/purge"),
        &[
            ("authorization", &format!("Bearer {TOKEN}")),
            ("content-type", "application/json"),
        ],
        Bytes::from(json.to_string()),
    )
    .await
    .unwrap()
}

fn purged(got: &Got) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
    v["purged"].as_u64().unwrap()
}

/// An origin with cacheable, tagged, Vary'd paths, and a proxy with all of them stored.
async fn filled() -> (TestOrigin, TestProxy) {
    let origin = TestOrigin::start().await;
    for path in ["/blog/a", "/blog/b", "/shop/x", "/shop/y"] {
        let tag = if path.starts_with("/blog") {
            "blog all"
        } else {
            "shop all"
        };
        origin.route(path, move |req, n| {
            let lang = req.header("accept-language").unwrap_or("-").to_string();
            Reply::ok(format!("{lang} {n}"))
                .header("cache-control", "max-age=600")
                .header("vary", "accept-language")
                .header("etag", "\"e\"")
                .header("surrogate-key", tag)
        });
    }
    let proxy = TestProxy::start_with(&origin, WITH_TOKEN).await;
    for path in ["/blog/a", "/blog/b", "/shop/x", "/shop/y"] {
        for lang in ["en", "de"] {
            get(&proxy.url(path), &[("accept-language", lang)]).await;
        }
    }
    (origin, proxy)
}

async fn is_hit(proxy: &TestProxy, path: &str, lang: &str) -> bool {
    get(&proxy.url(path), &[("accept-language", lang)])
        .await
        .cache_status()
        .starts_with("larder; hit")
}

#[actix_web::test]
async fn purge_requires_the_token() {
    let (_origin, proxy) = filled().await;
    let body = Bytes::from_static(b"{\"all\":true}");
    let none = try_send("POST", &admin_url(&proxy, "/purge"), &[], body.clone())
        .await
        .unwrap();
    assert_eq!(none.status, 401);
    assert!(none.text().contains("error"));
    let wrong = try_send(
        "POST",
        &admin_url(&proxy, "/purge"),
        &[("authorization", "Bearer nope")],
        body,
    )
    .await
    .unwrap();
    assert_eq!(wrong.status, 401);
    for path in ["/entries", "/stats"] {
        assert_eq!(
            get(&admin_url(&proxy, path), &[]).await.status,
            401,
            "{path}"
        );
    }
    // Health needs no token.
    assert_eq!(get(&admin_url(&proxy, "/healthz"), &[]).await.status, 200);
    // Nothing was deleted.
    assert!(is_hit(&proxy, "/blog/a", "en").await);
}

#[actix_web::test]
async fn purge_by_url_removes_all_variants_and_only_them() {
    let (origin, proxy) = filled().await;
    let host = proxy.addr.to_string();
    let r = purge(&proxy, &format!("{{\"url\":\"http://{host}/blog/a\"}}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(purged(&r), 2);
    assert!(!is_hit(&proxy, "/blog/a", "en").await);
    assert!(!is_hit(&proxy, "/blog/a", "de").await);
    assert!(is_hit(&proxy, "/blog/b", "en").await);
    assert!(is_hit(&proxy, "/shop/x", "de").await);
    assert_eq!(origin.hits("/blog/a"), 4);
}

#[actix_web::test]
async fn prefix_purge_leaves_other_urls_alone() {
    let (_origin, proxy) = filled().await;
    let host = proxy.addr.to_string();
    let r = purge(&proxy, &format!("{{\"prefix\":\"http://{host}/blog/\"}}")).await;
    assert_eq!(purged(&r), 4);
    assert!(!is_hit(&proxy, "/blog/a", "en").await);
    assert!(!is_hit(&proxy, "/blog/b", "de").await);
    assert!(is_hit(&proxy, "/shop/x", "en").await);
    assert!(is_hit(&proxy, "/shop/y", "de").await);
}

#[actix_web::test]
async fn tag_purge_removes_every_tagged_entry() {
    let (_origin, proxy) = filled().await;
    let r = purge(&proxy, "{\"tag\":\"shop\"}").await;
    assert_eq!(purged(&r), 4);
    assert!(!is_hit(&proxy, "/shop/x", "en").await);
    assert!(!is_hit(&proxy, "/shop/y", "de").await);
    assert!(is_hit(&proxy, "/blog/a", "en").await);
    let r = purge(&proxy, "{\"all\":true}").await;
    assert_eq!(purged(&r), 6, "4 blog + the 2 shop variants just refetched");
    assert!(!is_hit(&proxy, "/blog/b", "de").await);
}

// Soft purge marks stale: the next request revalidates (the origin sees a conditional), and
// inside stale-while-revalidate the stale body is served meanwhile.
#[actix_web::test]
async fn soft_purge_makes_the_next_request_revalidate() {
    let origin = TestOrigin::start().await;
    origin.route("/soft", |req, n| {
        if req.header("if-none-match") == Some("\"s\"") {
            Reply::status(304)
                .header("etag", "\"s\"")
                .header("cache-control", "max-age=600")
        } else {
            Reply::ok(format!("body {n}"))
                .header("etag", "\"s\"")
                .header("cache-control", "max-age=600")
        }
    });
    origin.route("/soft-swr", |req, n| {
        if req.header("if-none-match") == Some("\"w\"") {
            Reply::status(304)
                .header("etag", "\"w\"")
                .header("cache-control", "max-age=600, stale-while-revalidate=60")
        } else {
            Reply::ok(format!("swr {n}"))
                .header("etag", "\"w\"")
                .header("cache-control", "max-age=600, stale-while-revalidate=60")
        }
    });
    let proxy = TestProxy::start_with(&origin, WITH_TOKEN).await;
    let host = proxy.addr.to_string();
    get(&proxy.url("/soft"), &[]).await;
    get(&proxy.url("/soft-swr"), &[]).await;

    let r = purge(
        &proxy,
        &format!("{{\"url\":\"http://{host}/soft\",\"soft\":true}}"),
    )
    .await;
    assert_eq!(purged(&r), 1);
    let after = get(&proxy.url("/soft"), &[]).await;
    assert_eq!(after.text(), "body 1");
    assert_eq!(after.cache_status(), "larder; fwd=stale; fwd-status=304");
    assert_eq!(
        origin.seen("/soft")[1].header("if-none-match"),
        Some("\"s\"")
    );

    purge(
        &proxy,
        &format!("{{\"url\":\"http://{host}/soft-swr\",\"soft\":true}}"),
    )
    .await;
    let stale = get(&proxy.url("/soft-swr"), &[]).await;
    assert_eq!(stale.text(), "swr 1");
    assert!(
        stale
            .cache_status()
            .contains("detail=stale-while-revalidate"),
        "{}",
        stale.cache_status()
    );
    for _ in 0..50 {
        if origin.hits("/soft-swr") == 2 {
            break;
        }
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        origin.seen("/soft-swr")[1].header("if-none-match"),
        Some("\"w\"")
    );
}

// Soft purge by prefix and by tag over HTTP: the matched entries stay (no new 200 body from the
// origin) but the next request for each revalidates with its validator (RFC 9111 §4.3.1), and
// an entry outside the selector is still a plain hit.
#[actix_web::test]
async fn soft_prefix_and_tag_purges_make_only_the_matched_entries_revalidate() {
    let origin = TestOrigin::start().await;
    for (path, tag) in [
        ("/s/a", "ta"),
        ("/s/b", "tb"),
        ("/t/c", "tc"),
        ("/t/d", "tb"),
    ] {
        let etag = format!("\"{}\"", path.replace('/', ""));
        origin.route(path, move |req, n| {
            if req.header("if-none-match") == Some(etag.as_str()) {
                Reply::status(304)
                    .header("etag", etag.as_str())
                    .header("cache-control", "max-age=600")
            } else {
                Reply::ok(format!("{n}"))
                    .header("etag", etag.as_str())
                    .header("cache-control", "max-age=600")
                    .header("surrogate-key", tag)
            }
        });
    }
    let proxy = TestProxy::start_with(&origin, WITH_TOKEN).await;
    let host = proxy.addr.to_string();
    for path in ["/s/a", "/s/b", "/t/c", "/t/d"] {
        get(&proxy.url(path), &[]).await;
    }

    let r = purge(
        &proxy,
        &format!("{{\"prefix\":\"http://{host}/s/\",\"soft\":true}}"),
    )
    .await;
    assert_eq!(purged(&r), 2);
    let r = purge(&proxy, r#"{"tag":"tb","soft":true}"#).await;
    assert_eq!(
        purged(&r),
        2,
        "/s/b (already soft-purged) and /t/d carry tb"
    );

    for path in ["/s/a", "/s/b", "/t/d"] {
        let after = get(&proxy.url(path), &[]).await;
        assert_eq!(after.text(), "1", "{path}: the stored body, not a new one");
        assert_eq!(
            after.cache_status(),
            "larder; fwd=stale; fwd-status=304",
            "{path}"
        );
        let expected = format!("\"{}\"", path.replace('/', ""));
        assert_eq!(
            origin.seen(path)[1].header("if-none-match"),
            Some(expected.as_str()),
            "{path}: revalidated with its ETag"
        );
    }
    let untouched = get(&proxy.url("/t/c"), &[]).await;
    assert!(
        untouched.cache_status().starts_with("larder; hit"),
        "{}",
        untouched.cache_status()
    );
    assert_eq!(origin.hits("/t/c"), 1);
}

#[actix_web::test]
async fn bad_purge_requests_are_400_and_delete_nothing() {
    let (_origin, proxy) = filled().await;
    for bad in [
        "not json",
        "{}",
        "{\"url\":\"http://a/\",\"tag\":\"t\"}",
        "{\"everything\":true}",
        "{\"all\":false}",
        "{\"url\":\"/relative\"}",
        "{\"prefix\":\"blog\"}",
        "{\"tag\":\"\"}",
        "[1,2]",
        // serde would read this array as {"all": true}; only an object is a purge request.
        "[null,null,null,true]",
        "\"all\"",
    ] {
        let r = purge(&proxy, bad).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert!(r.text().contains("error"), "{bad}");
    }
    for path in ["/blog/a", "/blog/b", "/shop/x", "/shop/y"] {
        assert!(is_hit(&proxy, path, "en").await, "{path} lost");
    }
}

#[actix_web::test]
async fn entries_and_stats_describe_the_store() {
    let (_origin, proxy) = filled().await;
    let auth = format!("Bearer {TOKEN}");
    let host = proxy.addr.to_string();
    let prefix = format!("http://{host}/blog/");
    let url = format!(
        "{}?prefix={}&limit=10",
        admin_url(&proxy, "/entries"),
        prefix.replace(':', "%3A").replace('/', "%2F")
    );
    let r = get(&url, &[("authorization", &auth)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let lines: Vec<serde_json::Value> = r
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    for line in &lines {
        assert!(line["url"].as_str().unwrap().starts_with(&prefix));
        assert_eq!(line["status"], 200);
        assert_eq!(line["etag"], "\"e\"");
        assert_eq!(line["state"], "fresh");
        assert!(line["vary"]["accept-language"].is_string());
        assert_eq!(line["tags"], serde_json::json!(["blog", "all"]));
        assert_eq!(line["body_blake3"].as_str().unwrap().len(), 64);
    }
    let tagged = get(
        &format!("{}?tag=shop", admin_url(&proxy, "/entries")),
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(tagged.text().lines().count(), 4);
    let limited = get(
        &format!("{}?limit=3", admin_url(&proxy, "/entries")),
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(limited.text().lines().count(), 3);

    let stats = get(&admin_url(&proxy, "/stats"), &[("authorization", &auth)]).await;
    let v: serde_json::Value = serde_json::from_slice(&stats.body).unwrap();
    assert_eq!(v["entries"], 8);
}

// `larder dump` reads through the admin API while the server runs, and the store directly after.
#[actix_web::test]
async fn dump_works_while_running_and_after_stop() {
    let origin = TestOrigin::start().await;
    origin.fixed(
        "/d1",
        Reply::ok("one")
            .header("cache-control", "max-age=600")
            .header("etag", "\"d\"")
            .header("surrogate-key", "t1"),
    );
    origin.fixed(
        "/d2",
        Reply::ok("two").header("cache-control", "max-age=600"),
    );
    let data = tempfile::tempdir().unwrap();
    let config_path = data.path().join("larder.toml");
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        &config_path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[origin]\nurl = \"{}\"\n[storage]\npath = \"{}\"\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\ntoken = \"{TOKEN}\"\n",
            origin.url(),
            data.path().join("cache").display()
        ),
    )
    .unwrap();
    let config = config_path.to_str().unwrap();
    let server = LarderProcess::spawn(&["--config", config]);
    get(&server.url("/d1"), &[]).await;
    get(&server.url("/d2"), &[]).await;

    let check = |out: &str| {
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{out}");
        let d1 = lines
            .iter()
            .find(|l| l["url"].as_str().unwrap().ends_with("/d1"))
            .unwrap();
        for field in [
            "url",
            "method",
            "status",
            "vary",
            "etag",
            "last_modified",
            "stored_at",
            "fresh_until",
            "stale_while_revalidate",
            "stale_if_error",
            "state",
            "size",
            "tags",
            "body_blake3",
            "body_location",
        ] {
            assert!(d1.get(field).is_some(), "missing {field}");
        }
        assert_eq!(d1["etag"], "\"d\"");
        assert_eq!(d1["size"], 3);
        assert_eq!(d1["tags"], serde_json::json!(["t1"]));
        assert_eq!(d1["body_location"], "inline");
    };
    let (code, out, err) = run_binary(&["dump", "--config", config]);
    assert_eq!(code, 0, "{err}");
    check(&out);
    let (code, out, _) = run_binary(&[
        "dump", "--config", config, "--tag", "t1", "--format", "table",
    ]);
    assert_eq!(code, 0);
    // Header, the one tagged entry, and the totals line.
    assert_eq!(out.lines().count(), 3, "{out}");
    assert_eq!(
        out.lines().last(),
        Some("TOTAL 1 entries, 3 bytes"),
        "{out}"
    );
    assert!(out.contains("/d1") && !out.contains("/d2"), "{out}");
    let (code, _, err) = run_binary(&["dump", "--config", config, "--offline"]);
    assert_ne!(code, 0);
    assert!(err.contains("--offline"), "{err}");

    assert!(server.terminate().success());
    let (code, out, err) = run_binary(&["dump", "--config", config]);
    assert_eq!(code, 0, "{err}");
    check(&out);
}

// Purge consistency: a fetch that was in flight when the purge came is neither stored over it
// (/racing) nor handed to a request that arrives after it (/joining).
#[actix_web::test]
async fn fetch_in_flight_during_purge_is_not_stored_or_shared() {
    let origin = TestOrigin::start().await;
    for path in ["/racing", "/joining"] {
        origin.route(path, |_, n| {
            Reply::ok(format!("version {n}"))
                .header("cache-control", "max-age=600")
                .delay(Duration::from_millis(500))
        });
    }
    let proxy = TestProxy::start_with(&origin, WITH_TOKEN).await;
    let host = proxy.addr.to_string();
    let in_flight = |path: &str| {
        let url = proxy.url(path);
        actix_web::rt::spawn(async move { get(&url, &[]).await })
    };

    let racing = in_flight("/racing");
    let joining = in_flight("/joining");
    actix_web::rt::time::sleep(Duration::from_millis(150)).await;
    let r = purge(&proxy, &format!("{{\"prefix\":\"http://{host}/\"}}")).await;
    assert_eq!(r.status, 200);

    // Arrives after the purge: must not join the fetch that began before it.
    let after = get(&proxy.url("/joining"), &[]).await;
    assert_eq!(after.text(), "version 2");
    assert!(
        !after.cache_status().contains("collapsed"),
        "{}",
        after.cache_status()
    );
    assert_eq!(joining.await.unwrap().text(), "version 1");

    // The pre-purge fetch still answers its own client, but is not stored.
    assert_eq!(racing.await.unwrap().text(), "version 1");
    let next = get(&proxy.url("/racing"), &[]).await;
    assert!(
        next.cache_status().contains("fwd=miss"),
        "pre-purge response was stored: {}",
        next.cache_status()
    );
    assert_eq!(next.text(), "version 2");
}

fn auth() -> String {
    format!("Bearer {TOKEN}")
}

// RFC 9110 §11.1: the auth-scheme is case-insensitive; a wrong token gets the same JSON 401
// (application/json, an "error" member) as a missing one.
#[actix_web::test]
async fn bearer_scheme_is_case_insensitive_and_401s_are_json() {
    let (_origin, proxy) = filled().await;
    let stats = admin_url(&proxy, "/stats");
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let r = get(&stats, &[("authorization", &format!("{scheme} {TOKEN}"))]).await;
        assert_eq!(r.status, 200, "{scheme}: {}", r.text());
    }
    for header in [
        None,
        Some("Bearer nope"),
        Some("Basic dGVzdA=="),
        Some(TOKEN),
    ] {
        let headers: Vec<(&str, &str)> = header.map(|h| ("authorization", h)).into_iter().collect();
        let r = get(&stats, &headers).await;
        assert_eq!(r.status, 401, "{header:?}");
        assert_eq!(
            r.header("content-type"),
            Some("application/json"),
            "{header:?}"
        );
        let v: serde_json::Value = serde_json::from_slice(&r.body)
            .unwrap_or_else(|e| panic!("{header:?}: 401 body is not JSON ({e}): {}", r.text()));
        assert!(v["error"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    }
}

// Keys are always http:// (Larder serves plain HTTP): an https:// url or prefix could only
// ever purge nothing, so it is refused with 400 and a message saying why, and nothing is lost.
#[actix_web::test]
async fn https_purge_selectors_are_refused() {
    let (_origin, proxy) = filled().await;
    let host = proxy.addr.to_string();
    for body in [
        format!("{{\"url\":\"https://{host}/blog/a\"}}"),
        format!("{{\"prefix\":\"https://{host}/blog/\"}}"),
        format!("{{\"prefix\":\"HTTPS://{host}/\",\"soft\":true}}"),
    ] {
        let r = purge(&proxy, &body).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert!(r.text().contains("http://"), "{body}: {}", r.text());
    }
    for path in ["/blog/a", "/blog/b"] {
        for lang in ["en", "de"] {
            assert!(is_hit(&proxy, path, lang).await, "{path} {lang} lost");
        }
    }
}

// /stats has entries, bytes, hits and misses (plus the store's detail): after one miss and one
// hit, one entry, one hit, one miss, and bytes at least the stored body.
#[actix_web::test]
async fn stats_count_entries_bytes_hits_and_misses() {
    let origin = TestOrigin::start().await;
    let body = "s".repeat(5000);
    origin.fixed(
        "/st",
        Reply::ok(body.clone()).header("cache-control", "max-age=600"),
    );
    let proxy = TestProxy::start_with(&origin, WITH_TOKEN).await;
    let stats = || async {
        let r = get(&admin_url(&proxy, "/stats"), &[("authorization", &auth())]).await;
        assert_eq!(r.status, 200);
        serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()
    };
    let empty = stats().await;
    assert_eq!(
        (
            &empty["entries"],
            &empty["hits"],
            &empty["misses"],
            &empty["bytes"]
        ),
        (&0.into(), &0.into(), &0.into(), &0.into()),
        "{empty}"
    );
    assert!(
        get(&proxy.url("/st"), &[])
            .await
            .cache_status()
            .contains("fwd=miss")
    );
    assert!(
        get(&proxy.url("/st"), &[])
            .await
            .cache_status()
            .starts_with("larder; hit")
    );
    let v = stats().await;
    assert_eq!(v["entries"], 1, "{v}");
    assert_eq!(v["hits"], 1, "{v}");
    assert_eq!(v["misses"], 1, "{v}");
    assert_eq!(v["requests"]["hit"], 1, "{v}");
    assert_eq!(v["requests"]["pass"], 0, "{v}");
    let bytes = v["bytes"].as_u64().unwrap();
    assert!(bytes >= body.len() as u64, "{v}");
    assert_eq!(bytes, v["usage_bytes"].as_u64().unwrap(), "{v}");
    assert_eq!(v["body_bytes"], body.len() as u64, "{v}");
}

// The token can come from [admin] token_file or from LARDER_ADMIN_TOKEN (the built binary).
#[actix_web::test]
async fn admin_token_from_token_file_and_environment() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    // Trailing newline as an editor leaves it: not part of the token.
    std::fs::write(&token_file, "from-the-file\n").unwrap();
    let config = dir.path().join("larder.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[origin]\nurl = \"{}\"\n[storage]\npath = \"{}\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n",
            origin.url(),
            dir.path().join("file-data").display(),
            token_file.display()
        ),
    )
    .unwrap();
    let check = |admin: std::net::SocketAddr, good: &'static str| async move {
        let url = format!("http://{admin}/stats");
        assert_eq!(get(&url, &[]).await.status, 401, "{good}");
        let wrong = get(&url, &[("authorization", "Bearer other")]).await;
        assert_eq!(wrong.status, 401, "{good}");
        let right = get(&url, &[("authorization", &format!("Bearer {good}"))]).await;
        assert_eq!(right.status, 200, "{good}: {}", right.text());
    };
    let from_file = LarderProcess::spawn(&["--config", config.to_str().unwrap()]);
    check(from_file.admin_addr, "from-the-file").await;
    drop(from_file);

    let data = dir.path().join("env-data");
    let args = [
        "--origin",
        &origin.url(),
        "--data-dir",
        data.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ];
    let from_env = LarderProcess::spawn_env(&args, &[("LARDER_ADMIN_TOKEN", "from-the-env")]);
    check(from_env.admin_addr, "from-the-env").await;
}

// Without a token the admin API may only listen on loopback: on any other address the binary
// refuses to start, logs why, exits non-zero, and has opened nothing.
#[test]
fn admin_without_token_off_loopback_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // TEST-NET-1 (RFC 5737): not an address of this machine, so nothing could bind it anyway;
    // the refusal must come before any bind is tried.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_larder"))
        .args(["serve", "--origin", "http://127.0.0.1:9", "--data-dir"])
        .arg(&data)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "192.0.2.1:0"])
        .env_remove("LARDER_ADMIN_TOKEN")
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let refusal = "refusing to start the admin API on 192.0.2.1:0 without a token";
    let log_line = stderr
        .lines()
        .find(|l| l.contains("ERROR") && l.contains(refusal));
    assert!(log_line.is_some(), "no log line says so: {stderr}");
    assert!(stderr.contains("larder: error:"), "{stderr}");
    assert!(!data.exists(), "the store was opened before the refusal");
}

/// Fills `dir` with `n` entries whose URLs are about 2 KiB long, directly through the store.
async fn fill_long_urls(dir: &std::path::Path, n: usize) {
    use larder::key::{PrimaryKey, VariantKey};
    use larder::policy::{Freshness, HeaderList};
    use larder::store::{BodyInfo, Entry, Store, StoreOptions};
    let store = Store::open(dir, StoreOptions::default()).unwrap();
    let now = std::time::SystemTime::now();
    let long = "p".repeat(2000);
    for i in 0..n {
        let primary = PrimaryKey::new("http", "fill.example", &format!("/{long}/{i}"));
        let entry = Entry {
            url: primary.url().to_string(),
            status: 200,
            headers: HeaderList::new(),
            vary: Vec::new(),
            freshness: Freshness {
                request_time: now,
                response_time: now,
                corrected_initial_age: Duration::ZERO,
                lifetime: Duration::from_secs(3600),
                stale_while_revalidate: Duration::ZERO,
                stale_if_error: Duration::ZERO,
                must_revalidate: false,
                no_cache: false,
            },
            tags: Vec::new(),
            stored_at: now,
            body: BodyInfo::default(),
        };
        let mut w = store.begin_write(VariantKey::new(&primary, &[]), entry);
        w.write(b"x").await.unwrap();
        w.commit(Some(1)).await.unwrap();
    }
    store.flush().await.unwrap();
}

// Each /entries stream holds a thread until its client has read it: at most
// larder::admin::MAX_ENTRY_STREAMS run at once, the next gets 503 (JSON), and a slot frees up
// when a client goes away.
#[actix_web::test]
async fn entries_streams_are_bounded() {
    let origin = TestOrigin::start().await;
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    // ~7 MB of lines: more than the stream's channel and the sockets' buffers hold, so a
    // client that reads nothing keeps its stream (and thread) busy.
    fill_long_urls(dir.path(), 3000).await;
    let proxy = TestProxy::start_in(&origin, WITH_TOKEN, dir).await;
    let admin = proxy.admin_addr;
    let open_stream = move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(admin).unwrap();
        write!(
            s,
            "GET /entries HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
        )
        .unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).unwrap();
        assert_eq!(
            &head, b"HTTP/1.1 200",
            "a stream below the bound was refused"
        );
        s
    };
    let held = tokio::task::spawn_blocking(move || {
        (0..larder::admin::MAX_ENTRY_STREAMS)
            .map(|_| open_stream())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let entries = format!("http://{admin}/entries?limit=1");
    let busy = get(&entries, &[("authorization", &auth())]).await;
    assert_eq!(busy.status, 503, "{}", busy.text());
    assert_eq!(busy.header("content-type"), Some("application/json"));
    assert!(busy.text().contains("error"));
    // Other endpoints are not affected.
    assert_eq!(
        get(&admin_url(&proxy, "/stats"), &[("authorization", &auth())])
            .await
            .status,
        200
    );
    drop(held);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = get(&entries, &[("authorization", &auth())]).await;
        if r.status == 200 {
            assert_eq!(r.text().lines().count(), 1);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no slot freed: {}",
            r.status
        );
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The /entries line for `path` on `proxy`, if stored.
async fn entry_line(proxy: &TestProxy, path: &str) -> Option<serde_json::Value> {
    let r = get(
        &format!(
            "{}?prefix=http%3A%2F%2F{}{path}",
            admin_url(proxy, "/entries"),
            proxy.addr
        ),
        &[("authorization", &auth())],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.text()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["url"].as_str().is_some_and(|u| u.ends_with(path)))
}

// Purge consistency with revalidations in flight: a 304 or 200 that answers a request sent
// before the purge must not undo it: no soft-purged entry made fresh again by the 304's
// update, no hard-purged URL stored again by the refresh's body (store purge generation).
#[actix_web::test]
async fn purge_during_a_revalidation_is_not_undone_by_its_result() {
    // (path, stale-while-revalidate i.e. background refresh, origin answers 304, soft purge)
    let cases = [
        ("/fg-304-soft", false, true, true),
        ("/bg-304-soft", true, true, true),
        ("/bg-200-soft", true, false, true),
        ("/bg-200-hard", true, false, false),
    ];
    let origin = TestOrigin::start().await;
    for (path, swr, not_modified, _) in cases {
        let cc = if swr {
            "max-age=10, stale-while-revalidate=600"
        } else {
            "max-age=10"
        };
        origin.route(path, move |req, n| {
            // Every origin answer after the first takes a while: the purge lands meanwhile.
            let delay = Duration::from_millis(if n > 1 { 500 } else { 0 });
            if not_modified && req.header("if-none-match") == Some("\"p\"") {
                Reply::status(304)
                    .header("etag", "\"p\"")
                    .header("cache-control", "max-age=600")
                    .delay(delay)
            } else {
                Reply::ok(format!("v{n}"))
                    .header("etag", "\"p\"")
                    .header("cache-control", if n > 1 { "max-age=600" } else { cc })
                    .delay(delay)
            }
        });
    }
    let proxy = TestProxy::start_with(&origin, WITH_TOKEN).await;
    let host = proxy.addr.to_string();
    for (path, ..) in cases {
        get(&proxy.url(path), &[]).await;
    }
    proxy.advance(Duration::from_secs(30));
    let mut foreground = Vec::new();
    for (path, swr, ..) in cases {
        let url = proxy.url(path);
        let request = actix_web::rt::spawn(async move { get(&url, &[]).await });
        if swr {
            let stale = request.await.unwrap();
            assert!(
                stale
                    .cache_status()
                    .contains("detail=stale-while-revalidate"),
                "{path}: {}",
                stale.cache_status()
            );
        } else {
            foreground.push((path, request));
        }
    }
    // Every revalidation has reached the origin and waits there.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while cases.iter().any(|(p, ..)| origin.hits(p) < 2) {
        assert!(
            std::time::Instant::now() < deadline,
            "revalidations not sent"
        );
        actix_web::rt::time::sleep(Duration::from_millis(10)).await;
    }
    for (path, _, _, soft) in cases {
        let r = purge(
            &proxy,
            &format!("{{\"url\":\"http://{host}{path}\",\"soft\":{soft}}}"),
        )
        .await;
        assert_eq!(purged(&r), 1, "{path}");
    }
    for (path, request) in foreground {
        // Its request began before the purge, so it may get the revalidated copy itself.
        assert_eq!(request.await.unwrap().status, 200, "{path}");
    }
    // Let the background results land (the origin answers 500 ms after the request).
    actix_web::rt::time::sleep(Duration::from_millis(1200)).await;
    for (path, _, _, soft) in cases {
        let line = entry_line(&proxy, path).await;
        if soft {
            let line = line.unwrap_or_else(|| panic!("{path}: the soft-purged entry is gone"));
            assert_ne!(
                line["state"], "fresh",
                "{path}: the purge was undone: {line}"
            );
        } else {
            assert!(
                line.is_none(),
                "{path}: stored again after a hard purge: {line:?}"
            );
        }
    }
    // And the next requests see it: revalidated (or served stale meanwhile), never a fresh hit.
    for (path, ..) in cases {
        let r = get(&proxy.url(path), &[]).await;
        let cs = r.cache_status();
        assert!(
            !cs.starts_with("larder; hit") || cs.contains("detail=stale"),
            "{path}: fresh hit after the purge: {cs}"
        );
    }
}

// The tag index is written in the same transaction as its entry: SIGKILL the binary while it
// stores tagged responses, reopen the store, and every entry is found by each of its tags (so
// a tag purge reaches it), and every tag-scan result carries that tag.
#[actix_web::test]
async fn tags_survive_sigkill_with_their_entries() {
    use futures_util::StreamExt;
    let origin = TestOrigin::start().await;
    origin.route_prefix("/t/", |req, _| {
        let i: usize = req.path.rsplit('/').next().unwrap().parse().unwrap();
        // Some bodies over the 16 KiB inline limit, so body files are in the mix.
        let size = if i.is_multiple_of(7) { 20_000 } else { 300 };
        Reply::ok(vec![b'b'; size])
            .header("cache-control", "max-age=600")
            .header("surrogate-key", &format!("group-{} all", i % 5))
    });
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (url, path) = (origin.url(), data.display().to_string());
    let server = LarderProcess::spawn(&[
        "--origin",
        &url,
        "--data-dir",
        &path,
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ]);
    // Some entries surely flushed (sled flushes every 500 ms)...
    for i in 0..40 {
        get(&server.url(&format!("/t/{i}")), &[]).await;
    }
    actix_web::rt::time::sleep(Duration::from_millis(800)).await;
    // ...then a burst of tagged writes, killed part-way.
    let urls: Vec<String> = (40..1000).map(|i| server.url(&format!("/t/{i}"))).collect();
    let mut burst = futures_util::stream::iter(urls)
        .map(|u| async move { try_send("GET", &u, &[], Bytes::new()).await })
        .buffer_unordered(16);
    let mut done = 0;
    while burst.next().await.is_some() {
        done += 1;
        if done == 150 {
            break;
        }
    }
    server.kill();
    drop(burst);

    let store = larder::store::Store::open(&data, larder::store::StoreOptions::default()).unwrap();
    assert!(
        store.quarantined().is_none(),
        "the store did not reopen cleanly"
    );
    let all: Vec<_> = store.entries(None, None).map(|e| e.unwrap()).collect();
    assert!(all.len() >= 40, "only {} entries survived", all.len());
    let mut by_tag: std::collections::HashMap<String, std::collections::HashSet<_>> =
        Default::default();
    for tag in ["all", "group-0", "group-1", "group-2", "group-3", "group-4"] {
        let found = by_tag.entry(tag.to_string()).or_default();
        for item in store.entries(None, Some(tag)) {
            let (key, entry) = item.unwrap();
            assert!(
                entry.tags.iter().any(|t| t == tag),
                "{} under {tag}",
                entry.url
            );
            found.insert(key);
        }
    }
    for (key, entry) in &all {
        assert_eq!(entry.tags.len(), 2, "{}", entry.url);
        for tag in &entry.tags {
            assert!(
                by_tag[tag].contains(key),
                "{} is not found by its tag {tag}",
                entry.url
            );
        }
    }
    let now = std::time::SystemTime::now();
    assert_eq!(store.purge_tag("all", false, now).unwrap(), all.len());
    assert_eq!(store.entries(None, None).count(), 0);
}

/// Table lines: STATUS, STATE, WHERE and URL start, and SIZE ends, where their headings do.
fn assert_table_aligned(out: &str) {
    let mut lines = out.lines();
    let header = lines.next().expect("a header line");
    let at = |name: &str| {
        header
            .find(name)
            .unwrap_or_else(|| panic!("{name} in {header:?}"))
    };
    let (state, size_end, place, url) = (at("STATE"), at("SIZE") + 4, at("WHERE"), at("URL"));
    let mut rows = 0;
    for line in lines.filter(|l| !l.starts_with("TOTAL ")) {
        rows += 1;
        let starts: Vec<usize> = line
            .char_indices()
            .filter(|&(i, c)| c != ' ' && (i == 0 || line.as_bytes()[i - 1] == b' '))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(starts.len(), 5, "{line:?}\n{out}");
        assert_eq!(starts[0], 0, "STATUS: {line:?}\n{out}");
        assert_eq!(starts[1], state, "STATE: {line:?}\n{out}");
        let size_len = line[starts[2]..].find(' ').unwrap();
        assert_eq!(starts[2] + size_len, size_end, "SIZE: {line:?}\n{out}");
        assert_eq!(starts[3], place, "WHERE: {line:?}\n{out}");
        assert_eq!(starts[4], url, "URL: {line:?}\n{out}");
    }
    assert!(rows > 0, "{out}");
}

// `larder dump` with --prefix, --limit and --format table, through the admin API while the
// server runs and offline after it stopped; the state (fresh/stale/expired) and body location
// (inline/file) fields say what they should.
#[actix_web::test]
async fn dump_filters_states_locations_and_table() {
    let origin = TestOrigin::start().await;
    // Age beyond max-age makes a response stale on arrival (RFC 9111 §4.2.3).
    origin.fixed(
        "/a/fresh",
        Reply::ok("f").header("cache-control", "max-age=600"),
    );
    origin.fixed(
        "/a/stale",
        Reply::ok("s")
            .header("cache-control", "max-age=600, stale-while-revalidate=3600")
            .header("age", "700"),
    );
    origin.fixed(
        "/a/expired",
        Reply::ok("e")
            .header("cache-control", "max-age=600")
            .header("etag", "\"x\"")
            .header("age", "700"),
    );
    origin.fixed(
        "/b/big",
        Reply::ok(vec![b'B'; 100_000]).header("cache-control", "max-age=600"),
    );
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("larder.toml");
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        &config_path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[origin]\nurl = \"{}\"\n[storage]\npath = \"{}\"\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\ntoken = \"{TOKEN}\"\n",
            origin.url(),
            dir.path().join("cache").display()
        ),
    )
    .unwrap();
    let config = config_path.to_str().unwrap().to_string();
    let server = LarderProcess::spawn(&["--config", &config]);
    for path in ["/a/fresh", "/a/stale", "/a/expired", "/b/big"] {
        let r = get(&server.url(path), &[]).await;
        assert!(
            r.cache_status().contains("stored"),
            "{path}: {}",
            r.cache_status()
        );
    }
    let host = server.addr.to_string();
    let a_prefix = format!("http://{host}/a/");
    let dump = |extra: &[&str]| {
        let mut args = vec!["dump", "--config", config.as_str()];
        args.extend_from_slice(extra);
        let (code, out, err) = run_binary(&args);
        assert_eq!(code, 0, "{args:?}: {err}");
        out
    };
    let jsonl = |out: &str| -> Vec<serde_json::Value> {
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let check = |online: bool| {
        let all = jsonl(&dump(&[]));
        assert_eq!(all.len(), 4, "online={online}");
        let by_path = |p: &str| {
            all.iter()
                .find(|l| l["url"].as_str().unwrap().ends_with(p))
                .unwrap_or_else(|| panic!("{p} not dumped"))
                .clone()
        };
        assert_eq!(by_path("/a/fresh")["state"], "fresh");
        assert_eq!(by_path("/a/stale")["state"], "stale");
        assert_eq!(by_path("/a/expired")["state"], "expired");
        assert_eq!(by_path("/a/fresh")["body_location"], "inline");
        assert_eq!(by_path("/b/big")["body_location"], "file");
        assert_eq!(by_path("/b/big")["size"], 100_000);

        let a = jsonl(&dump(&["--prefix", &a_prefix]));
        assert_eq!(a.len(), 3, "online={online}: {a:?}");
        assert!(
            a.iter()
                .all(|l| l["url"].as_str().unwrap().starts_with(&a_prefix))
        );
        let limited = jsonl(&dump(&["--prefix", &a_prefix, "--limit", "2"]));
        assert_eq!(limited.len(), 2, "online={online}");
        assert_eq!(jsonl(&dump(&["--limit", "1"])).len(), 1, "online={online}");

        let table = dump(&["--format", "table"]);
        // Header, four entries, the totals line.
        assert_eq!(table.lines().count(), 6, "online={online}: {table}");
        assert_table_aligned(&table);
        assert!(
            table.contains("100000") && table.contains("expired"),
            "{table}"
        );
        let table = dump(&["--format", "table", "--prefix", &a_prefix, "--limit", "2"]);
        assert_eq!(table.lines().count(), 4, "online={online}: {table}");
        assert!(
            table
                .lines()
                .last()
                .unwrap()
                .starts_with("TOTAL 2 entries, "),
            "online={online}: {table}"
        );
        assert_table_aligned(&table);
    };
    check(true);
    assert!(server.terminate().success());
    check(false);
    // And --offline works the same once the store is free.
    let offline = jsonl(&dump(&["--offline", "--prefix", &a_prefix, "--limit", "2"]));
    assert_eq!(offline.len(), 2);
}
