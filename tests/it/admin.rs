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
