//! The rebalance's pure core (who is over its share, by how much) as table
//! tests, and rounds on a paused clock over registered relays (no sockets).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::balancer::{ConnectionGuard, RequestFacts};
use crate::lifecycle::RelayTag;
use crate::proxy::testing;
use crate::ws::relay::StopHandle;

fn load(live: u64, weight: u32) -> Load {
    Load { live, weight }
}

#[test]
fn excess_is_measured_against_the_weighted_share() {
    let cases: &[(&[Load], f64, &[u64])] = &[
        // The issue's case: 3 x 1000 and a new empty backend.
        (
            &[load(1000, 1), load(1000, 1), load(1000, 1), load(0, 1)],
            1.2,
            &[250, 250, 250, 0],
        ),
        // Balanced: nothing to do.
        (
            &[load(750, 1), load(750, 1), load(750, 1), load(750, 1)],
            1.2,
            &[0, 0, 0, 0],
        ),
        // Under the threshold (share 100, 115 <= 1.2 x 100) nothing moves...
        (&[load(115, 1), load(85, 1)], 1.2, &[0, 0]),
        // ...above it, everything above the share does.
        (&[load(130, 1), load(70, 1)], 1.2, &[30, 0]),
        // Weights: b1 has twice the share (200 of 300).
        (&[load(200, 2), load(100, 1)], 1.1, &[0, 0]),
        (&[load(100, 2), load(200, 1)], 1.1, &[0, 100]),
        // One backend, or nothing live: nothing to move to.
        (&[load(1000, 1)], 1.2, &[0]),
        (&[load(0, 1), load(0, 1)], 1.2, &[0, 0]),
        // A fraction above the share is not a connection.
        (&[load(2, 1), load(1, 1)], 1.2, &[0, 0]),
        (&[load(3, 1), load(1, 1)], 1.2, &[1, 0]),
    ];
    for (loads, threshold, want) in cases {
        assert_eq!(excess(loads, *threshold), *want, "{loads:?} at {threshold}");
    }
}

const POOL: &str = r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:0"

[[routes]]
pool = "main"

[pools.main]
close_timeout = "1s"
"#;

fn toml(extra: &str, backends: usize) -> String {
    let mut s = POOL.replace(
        "close_timeout = \"1s\"\n",
        &format!("close_timeout = \"1s\"\n{extra}\n"),
    );
    for i in 1..=backends {
        s.push_str(&format!(
            "\n[[pools.main.backends]]\nid = \"b{i}\"\naddress = \"127.0.0.1:{}\"\n",
            9000 + i
        ));
    }
    s
}

/// `n` live relays on `backend`, registered as the tunnel does.
fn open(
    lifecycle: &Lifecycle,
    backend: &Arc<Backend>,
    n: usize,
    tag: impl Fn(usize) -> RelayTag,
) -> Vec<(ConnectionGuard, Arc<StopHandle>)> {
    (0..n)
        .map(|i| {
            let guard = backend.track_websocket();
            let (_, handle) = lifecycle.relay_started_with(backend, tag(i));
            (guard, handle)
        })
        .collect()
}

fn stopped(relays: &[(ConnectionGuard, Arc<StopHandle>)]) -> usize {
    relays
        .iter()
        .filter(|(_, h)| h.reason() == Some(StopReason::Rebalance))
        .count()
}

#[tokio::test(start_paused = true)]
async fn a_round_sheds_each_backends_excess_once_over_the_window() {
    let ctx = testing::context(&toml("", 4));
    let pool = Arc::clone(&ctx.routing.load().pools["main"]);
    let life = &ctx.lifecycle;
    let ip = |i: usize| RelayTag {
        peer: Some(IpAddr::from([10, 0, 0, (i % 200) as u8])),
        placement: None,
    };
    let b: Vec<_> = (0..4).map(|i| Arc::clone(&pool.backends[i])).collect();
    let on1 = open(life, &b[0], 40, ip);
    let on2 = open(life, &b[1], 40, ip);
    let on3 = open(life, &b[2], 40, ip);
    let round = plan(&pool, life, 1.2).expect("imbalanced");
    assert_eq!(round.chosen.len(), 30);
    assert_eq!(round.shedding.len(), 3);
    assert!(!round.cookie && !round.hash);
    let window = Duration::from_secs(10);
    let start = tokio::time::Instant::now();
    let task = tokio::spawn({
        let pool = Arc::clone(&pool);
        async move { round.run(&pool, window).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Shedding backends are passed over while b4 can take connections.
    assert!(b[0].is_shedding() && !b[3].is_shedding());
    assert_eq!(pool.pick(&[]).unwrap().id, "b4");
    // Halfway, about half are closed; each relay is told at most once.
    tokio::time::sleep_until(start + window / 2).await;
    let half = stopped(&on1) + stopped(&on2) + stopped(&on3);
    assert!((12..=18).contains(&half), "{half}");
    task.await.unwrap();
    assert_eq!([stopped(&on1), stopped(&on2), stopped(&on3)], [10, 10, 10]);
    assert!(b.iter().all(|b| !b.is_shedding()));
    // Without cookie affinity nobody is re-pinned.
    assert!(!b[0].take_rebalance_ticket(IpAddr::from([10, 0, 0, 1])));
}

#[tokio::test(start_paused = true)]
async fn a_backend_back_at_its_share_is_passed_over() {
    let ctx = testing::context(&toml("", 2));
    let pool = Arc::clone(&ctx.routing.load().pools["main"]);
    let (b1, b2) = (&pool.backends[0], &pool.backends[1]);
    let on1 = open(&ctx.lifecycle, b1, 30, |_| RelayTag::default());
    let _on2 = open(&ctx.lifecycle, b2, 10, |_| RelayTag::default());
    let round = plan(&pool, &ctx.lifecycle, 1.2).expect("imbalanced");
    assert_eq!(round.chosen.len(), 10);
    // New clients arrive on b2 before the round runs: b1's 30 are now its
    // share of 60, so none of them is closed.
    let _more = open(&ctx.lifecycle, b2, 20, |_| RelayTag::default());
    round.run(&pool, Duration::from_secs(5)).await;
    assert_eq!(stopped(&on1), 0);
    assert!(!b1.is_shedding());
}

#[tokio::test(start_paused = true)]
async fn no_round_while_a_backend_ramps_up() {
    let ctx = testing::context(&toml("slow_start = \"60s\"", 2));
    let pool = Arc::clone(&ctx.routing.load().pools["main"]);
    let _on1 = open(&ctx.lifecycle, &pool.backends[0], 50, |_| {
        RelayTag::default()
    });
    pool.backends[1].joined_ago(Duration::from_secs(30));
    assert!(plan(&pool, &ctx.lifecycle, 1.2).is_none());
    pool.backends[1].joined_ago(Duration::from_secs(60));
    assert_eq!(plan(&pool, &ctx.lifecycle, 1.2).unwrap().chosen.len(), 25);
    // Nor from a backend that is down or draining.
    pool.backends[1].set_state(BackendState::Down);
    assert!(plan(&pool, &ctx.lifecycle, 1.2).is_none());
}

#[tokio::test(start_paused = true)]
async fn cookie_clients_closed_by_a_round_are_re_pinned_elsewhere() {
    let cookie = "affinity = \"cookie\"\n\n[pools.main.cookie]\nsecret = \"0123456789abcdef0123456789abcdef\"\n";
    let ctx = testing::context(&toml(cookie, 2));
    let pool = Arc::clone(&ctx.routing.load().pools["main"]);
    let b1 = Arc::clone(&pool.backends[0]);
    let peer = |i: usize| IpAddr::from([10, 0, 0, i as u8]);
    let on1 = open(&ctx.lifecycle, &b1, 20, |i| RelayTag {
        peer: Some(peer(i)),
        placement: None,
    });
    let round = plan(&pool, &ctx.lifecycle, 1.2).expect("imbalanced");
    assert!(round.cookie);
    round.run(&pool, Duration::from_secs(2)).await;
    let closed: Vec<usize> = (0..20)
        .filter(|&i| on1[i].1.reason() == Some(StopReason::Rebalance))
        .collect();
    assert_eq!(closed.len(), 10);
    // A closed client's cookie for b1 now sends it to b2, once; a client
    // that was not closed stays.
    let signer = crate::affinity::CookieSigner::new(b"0123456789abcdef0123456789abcdef");
    let cookie = format!("berth_main={}", signer.sign("main", "b1"));
    let mut headers = http::HeaderMap::new();
    headers.insert("cookie", cookie.parse().unwrap());
    let uri: http::Uri = "/".parse().unwrap();
    let choose = |ip: IpAddr| {
        let facts = RequestFacts {
            headers: &headers,
            uri: &uri,
            peer: ip,
            tls: false,
            claim: None,
        };
        let c = pool.choose(&facts, &[]).unwrap();
        (c.backend.id.clone(), c.result.unwrap())
    };
    let kept = (0..20).find(|i| !closed.contains(i)).unwrap();
    assert_eq!(choose(peer(closed[0])), ("b2".to_string(), "rebind"));
    assert_eq!(choose(peer(closed[0])), ("b1".to_string(), "hit"));
    assert_eq!(choose(peer(kept)), ("b1".to_string(), "hit"));
}

#[tokio::test(start_paused = true)]
async fn in_a_hash_pool_only_the_keys_that_moved_are_closed() {
    let hash = "affinity = \"hash\"\n\n[pools.main.hash]\nkey = \"header:x-key\"\n";
    // Two backends hold 300 keys; then b3 joins (a reload: same backends).
    let before = testing::context(&toml(hash, 2));
    let old = Arc::clone(&before.routing.load().pools["main"]);
    let uri: http::Uri = "/".parse().unwrap();
    let mut placed = Vec::new();
    for i in 0..300 {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-key", format!("user-{i}").parse().unwrap());
        let facts = RequestFacts {
            headers: &headers,
            uri: &uri,
            peer: IpAddr::from([127, 0, 0, 1]),
            tls: false,
            claim: None,
        };
        let choice = old.choose(&facts, &[]).unwrap();
        assert!(choice.placement.is_some());
        placed.push(choice);
    }
    let config = testing::config(&toml(hash, 3));
    let pool = Arc::new(Pool::new(
        config.pools["main"].clone(),
        &before.metrics,
        Some(&old),
    ));
    let life = &before.lifecycle;
    let relays: Vec<(ConnectionGuard, Arc<StopHandle>)> = placed
        .iter()
        .map(|c| {
            let guard = c.backend.track_websocket();
            let tag = RelayTag {
                peer: None,
                placement: c.placement.clone(),
            };
            (guard, life.relay_started_with(&c.backend, tag).1)
        })
        .collect();
    let round = plan(&pool, life, 1.2).expect("b1 and b2 hold 150 each, b3 none");
    round.run(&pool, Duration::from_secs(3)).await;
    let b3 = &pool.backends[2];
    let mut moved = 0;
    for (c, (_, handle)) in placed.iter().zip(&relays) {
        let home = pool
            .hash_home(c.placement.as_ref().unwrap().key_hash)
            .unwrap();
        let key_moved = Arc::ptr_eq(&home, b3);
        moved += usize::from(key_moved);
        assert_eq!(
            handle.reason() == Some(StopReason::Rebalance),
            key_moved,
            "closed exactly when the key moved"
        );
    }
    assert!((60..140).contains(&moved), "{moved}");
}
