//! Cache poisoning and deception: a response is stored only under its own request's key; unkeyed override fields never reach the origin; Authorization, Cookie and Set-Cookie follow the documented rules; a URL that merely looks static is cached only if the origin says so.

use crate::support::*;

const HOST: &[(&str, &str)] = &[("host", "shop.test")];

async fn entries(proxy: &TestProxy) -> Vec<String> {
    let got = get(&format!("http://{}/entries", proxy.admin_addr), &[]).await;
    got.text()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["url"].as_str().unwrap().to_string()
        })
        .collect()
}

// RFC 9111 §2: the key is the request's URI (Host + path + query); one host's response is
// never found under another host's or path's key.
#[actix_web::test]
async fn a_response_is_stored_only_under_the_key_of_its_request() {
    let origin = TestOrigin::start().await;
    origin.route("/p?x=1", |seen, _| {
        Reply::ok(format!("for {}", seen.header("host").unwrap_or("")))
            .header("cache-control", "max-age=60")
            // A Content-Location elsewhere must not make it stored there too.
            .header("content-location", "/other")
    });
    let proxy = TestProxy::start(&origin).await;
    let a = get(&proxy.url("/p?x=1"), &[("host", "a.test")]).await;
    assert_eq!(a.text(), "for a.test");
    let b = get(&proxy.url("/p?x=1"), &[("host", "b.test")]).await;
    assert_eq!(
        b.text(),
        "for b.test",
        "b.test is not served a.test's response"
    );
    assert!(b.cache_status().contains("fwd=miss"));
    assert_eq!(origin.hits("/p?x=1"), 2);
    let other = get(&proxy.url("/other"), &[("host", "a.test")]).await;
    assert!(
        other.cache_status().contains("fwd=miss"),
        "{}",
        other.cache_status()
    );
    let mut urls = entries(&proxy).await;
    urls.sort();
    assert_eq!(urls, ["http://a.test/p?x=1", "http://b.test/p?x=1"]);
}

// Fields that make frameworks answer for another host, path, scheme or method are not part
// of the key, so they are removed before forwarding: the origin answers the request the
// key describes, and one client's header cannot shape what everyone else is served.
#[actix_web::test]
async fn unkeyed_override_fields_never_reach_the_origin() {
    let origin = TestOrigin::start().await;
    origin.route("/home", |seen, _| {
        let host = seen.header("x-forwarded-host").unwrap_or("shop.test");
        Reply::ok(format!("<script src=//{host}/app.js>")).header("cache-control", "max-age=60")
    });
    let proxy = TestProxy::start(&origin).await;
    let overrides = [
        ("host", "shop.test"),
        ("x-forwarded-host", "evil.test"),
        ("x-forwarded-server", "evil.test"),
        ("x-forwarded-port", "8443"),
        ("x-forwarded-scheme", "nothttps"),
        ("x-forwarded-prefix", "/evil"),
        ("x-original-url", "/admin"),
        ("x-rewrite-url", "/admin"),
        ("x-original-host", "evil.test"),
        ("x-host", "evil.test"),
        ("x-http-method-override", "DELETE"),
        ("x-http-method", "DELETE"),
        ("x-method-override", "DELETE"),
        ("forwarded", "host=evil.test;proto=https"),
        ("x-forwarded-proto", "https"),
    ];
    let first = get(&proxy.url("/home"), &overrides).await;
    assert_eq!(first.text(), "<script src=//shop.test/app.js>");
    let seen = &origin.seen("/home")[0];
    for (name, _) in &overrides[1..overrides.len() - 1] {
        assert_eq!(seen.header(name), None, "{name} was forwarded");
    }
    // Larder's own forwarding fields say what Larder saw.
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("host"), Some("shop.test"));
    let victim = get(&proxy.url("/home"), HOST).await;
    assert_eq!(victim.text(), "<script src=//shop.test/app.js>");
}

// RFC 9111 §3.5: a response to a request with Authorization is stored only if it says
// s-maxage, public or must-revalidate.
#[actix_web::test]
async fn authorization_requests_are_stored_only_when_the_response_allows_it() {
    let origin = TestOrigin::start().await;
    for (path, cc) in [
        ("/auth/max-age", "max-age=60"),
        ("/auth/s-maxage", "s-maxage=60"),
        ("/auth/public", "public, max-age=60"),
        ("/auth/must-revalidate", "max-age=60, must-revalidate"),
    ] {
        origin.fixed(path, Reply::ok("secret").header("cache-control", cc));
    }
    let proxy = TestProxy::start(&origin).await;
    let auth = [("host", "shop.test"), ("authorization", "Bearer alice")];
    for (path, stored) in [
        ("/auth/max-age", false),
        ("/auth/s-maxage", true),
        ("/auth/public", true),
        ("/auth/must-revalidate", true),
    ] {
        let first = get(&proxy.url(path), &auth).await;
        assert_eq!(
            first.cache_status().contains("stored"),
            stored,
            "{path}: {}",
            first.cache_status()
        );
        if !stored {
            assert!(
                first.cache_status().contains("detail=authorization"),
                "{path}"
            );
        }
        let second = get(&proxy.url(path), HOST).await;
        assert_eq!(second.cache_status().contains("hit"), stored, "{path}");
    }
}

// The cookie policy (README "Cookies"): a request's Cookie does not by itself stop caching,
// as RFC 9111 has it; a personalized response must say `private`, or `Vary: Cookie` to be
// stored per cookie value.
#[actix_web::test]
async fn requests_with_cookie_follow_the_responses_cache_control() {
    let origin = TestOrigin::start().await;
    origin.route("/c/shared", |seen, _| {
        Reply::ok(format!("page; cookie={}", seen.header("cookie").is_some()))
            .header("cache-control", "max-age=60")
    });
    origin.route("/c/private", |seen, _| {
        Reply::ok(format!(
            "hello {}",
            seen.header("cookie").unwrap_or("guest")
        ))
        .header("cache-control", "private, max-age=60")
    });
    origin.route("/c/vary", |seen, _| {
        Reply::ok(format!(
            "hello {}",
            seen.header("cookie").unwrap_or("guest")
        ))
        .header("cache-control", "max-age=60")
        .header("vary", "cookie")
    });
    let proxy = TestProxy::start(&origin).await;
    let alice = [("host", "shop.test"), ("cookie", "user=alice")];
    let bob = [("host", "shop.test"), ("cookie", "user=bob")];

    assert!(
        get(&proxy.url("/c/shared"), &alice)
            .await
            .cache_status()
            .contains("stored")
    );
    let guest = get(&proxy.url("/c/shared"), HOST).await;
    assert!(guest.cache_status().contains("hit"));

    // RFC 9111 §5.2.2.7: private is never stored in a shared cache.
    assert_eq!(
        get(&proxy.url("/c/private"), &alice).await.text(),
        "hello user=alice"
    );
    assert_eq!(
        get(&proxy.url("/c/private"), &bob).await.text(),
        "hello user=bob"
    );
    assert_eq!(origin.hits("/c/private"), 2);

    // RFC 9111 §4.1: Vary: Cookie keys the variants on the cookie value.
    assert_eq!(
        get(&proxy.url("/c/vary"), &alice).await.text(),
        "hello user=alice"
    );
    let b = get(&proxy.url("/c/vary"), &bob).await;
    assert_eq!(b.text(), "hello user=bob");
    assert!(b.cache_status().contains("fwd="));
    let a = get(&proxy.url("/c/vary"), &alice).await;
    assert_eq!(a.text(), "hello user=alice");
    assert!(a.cache_status().contains("hit"));
}

// Set-Cookie is a cookie for one user: by default such a response is not stored.
#[actix_web::test]
async fn set_cookie_responses_are_not_shared_by_default() {
    let origin = TestOrigin::start().await;
    origin.route("/login", |_, n| {
        Reply::ok("welcome")
            .header("cache-control", "max-age=60")
            .header("set-cookie", &format!("session={n}"))
    });
    let proxy = TestProxy::start(&origin).await;
    let first = get(&proxy.url("/login"), HOST).await;
    assert!(
        first.cache_status().contains("detail=set-cookie"),
        "{}",
        first.cache_status()
    );
    let second = get(&proxy.url("/login"), HOST).await;
    assert_eq!(
        second.header("set-cookie"),
        Some("session=2"),
        "each user gets their own"
    );
    assert!(entries(&proxy).await.is_empty());
}

// `[cache] share_set_cookie = true`: the operator allows it, and the stored response is
// replayed with its Set-Cookie (their origin sets only non-personal cookies).
#[actix_web::test]
async fn set_cookie_responses_are_shared_when_the_operator_allows_it() {
    let origin = TestOrigin::start().await;
    origin.route("/banner", |_, n| {
        Reply::ok("banner")
            .header("cache-control", "max-age=60")
            .header("set-cookie", &format!("seen={n}"))
    });
    let proxy = TestProxy::start_with(&origin, "[cache]\nshare_set_cookie = true\n").await;
    assert!(
        get(&proxy.url("/banner"), HOST)
            .await
            .cache_status()
            .contains("stored")
    );
    let second = get(&proxy.url("/banner"), HOST).await;
    assert!(second.cache_status().contains("hit"));
    assert_eq!(second.header("set-cookie"), Some("seen=1"));
    assert_eq!(origin.hits("/banner"), 1);
}

// Web cache deception: /account.php/x.css looks static, but the origin (which ignores the
// suffix and serves the account page) gives no caching permission: nothing is stored, and
// no heuristic freshness applies without Last-Modified (RFC 9111 §4.2.2).
#[actix_web::test]
async fn path_confusion_is_cached_only_if_the_origin_says_so() {
    let origin = TestOrigin::start().await;
    origin.route_prefix("/account.php", |seen, _| {
        Reply::ok(format!(
            "account of {}",
            seen.header("cookie").unwrap_or("nobody")
        ))
        .header("content-type", "text/css")
    });
    origin.fixed(
        "/static/site.css",
        Reply::ok("body{}")
            .header("content-type", "text/css")
            .header("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT"),
    );
    let proxy = TestProxy::start(&origin).await;
    let victim = [("host", "shop.test"), ("cookie", "user=victim")];
    let first = get(&proxy.url("/account.php/x.css"), &victim).await;
    assert_eq!(first.text(), "account of user=victim");
    assert!(
        first.cache_status().contains("detail=no-freshness"),
        "{}",
        first.cache_status()
    );
    let attacker = get(&proxy.url("/account.php/x.css"), HOST).await;
    assert_eq!(attacker.text(), "account of nobody");
    assert_eq!(origin.hits("/account.php/x.css"), 2);
    // With Last-Modified the origin has given a heuristic lifetime, and it is stored.
    let css = get(&proxy.url("/static/site.css"), HOST).await;
    assert!(
        css.cache_status().contains("stored"),
        "{}",
        css.cache_status()
    );
    assert_eq!(entries(&proxy).await, ["http://shop.test/static/site.css"]);
}
